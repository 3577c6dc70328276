"""Scaled dot-product attention, with a plain path for CPU training.

On the CPU, PyTorch's fused attention kernel is made for long sequences: on the 64-token rows
of a small ViT forward and backward take ~5x longer than two matmuls and a softmax, and on the
256-token packed rows of the easyvqa language model ~2x longer (measured in
docs/benchmarks.md). So while autograd records on the CPU, for rows of up to
`PLAIN_MAX_TOKENS` keys, the scores are computed explicitly, in the dtype of q (bf16 under
autocast: casting the (B, heads, T, T) scores to fp32 and back cost as much as the two matmuls;
the softmax still sums in fp32). Inference, longer rows and every other device call
`F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLAIN_MAX_TOKENS = 256  # longer rows keep the fused kernel (memory grows with tokens squared)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (B, heads, T_q, head_dim) queries and
    (B, heads, T_kv, head_dim) keys and values, as `F.scaled_dot_product_attention`: `attn_mask`
    is boolean (True: may attend), broadcast to (B, heads, T_q, T_kv); `is_causal` masks the
    upper triangle. Every query must be allowed at least one key."""
    training_on_cpu = q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
    if not training_on_cpu or k.shape[-2] > PLAIN_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, heads, T_q, T_kv), in q's dtype
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1)  # accumulated in fp32 for bf16 scores, rounded to bf16
    return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v
