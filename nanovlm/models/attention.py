"""Attention without a mask (the vision encoder's), with a plain path for CPU training.

On the CPU, PyTorch's fused attention kernel is made for long sequences: on the 64-token rows
of a small ViT forward and backward take ~5x longer than two matmuls and a softmax (measured in
docs/benchmarks.md). So while autograd records on the CPU the scores are computed explicitly,
in the dtype of q (bf16 under autocast: casting the (B, heads, T, T) scores to fp32 and back
cost as much as the two matmuls; the softmax still sums in fp32); inference, and every other
device, call `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLAIN_MAX_TOKENS = 256  # longer rows keep the fused kernel (memory grows with tokens squared)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (B, heads, T, head_dim) tensors, no mask."""
    training_on_cpu = q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
    if not training_on_cpu or q.shape[-2] > PLAIN_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, heads, T, T), in q's dtype
    probs = scores.softmax(dim=-1)  # accumulated in fp32 for bf16 scores, rounded to bf16
    return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v
