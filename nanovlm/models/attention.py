"""Attention: the one entry point of the vision encoder and the language model.

`attention(q, k, v, mask, is_causal, dropout_p)` is softmax(q k^T / sqrt(head_dim)) v for
every caller: the ViT (no mask), the language model's training and prefill (causal, or a
boolean mask built from segment ids) and its KV-cache decode (a few new queries against the
cache). Grouped-query heads (Llama's GQA: fewer key/value heads than query heads, kv head j
serving query heads j * groups .. (j + 1) * groups - 1) are never repeated in memory.

Which kernel:
- The plain path, two matmuls and a softmax in the dtype of q (bf16 under autocast; the
  softmax still sums in fp32), where the runtime switched a CPU training run to it
  (`nanovlm.runtime.cpu_training_attention`); the (B, heads, T, T) scores stay in q's dtype.
- One query row under `torch.compile` on the CPU (the compiled decode step): multiply-and-sum
  in fp32 (`_one_query`), which inductor turns into loops fused with their neighbours: SDPA's CPU
  kernel costs more per call than a one-query attention needs; the loops read the cache once.
- `F.scaled_dot_product_attention` (SDPA) everywhere else: inference, longer rows, every
  other device.

Grouped heads, by one rule too: without a mask SDPA takes them itself (`enable_gqa=True`,
which every fused kernel accepts). With a mask, and on the plain path, the query heads that
share a kv head are folded onto the query axis, (B, n_kv_heads, groups * T_q, head_dim), so one
matmul serves them all. (In torch 2.13's dispatch order, flash > memory-efficient > math >
cuDNN, flash takes no mask and the memory-efficient kernel no grouped heads: a masked
`enable_gqa` call on CUDA would run the math kernel. Read from torch's sdp_utils.cpp, not
measured here.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovlm.runtime import cpu_training_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v -> (B, n_heads, T_q, head_dim).

    q: (B, n_heads, T_q, head_dim); k, v: (B, n_kv_heads, T_kv, head_dim), n_heads a multiple
    of n_kv_heads. `mask`: boolean, True where a query may attend, shaped (B or 1, 1, T_q or 1,
    T_kv) (one mask for all heads); every query must be allowed at least one key. `is_causal`
    (instead of a mask): query i sees keys 0..i, counted from the first key, as in SDPA.
    """
    if mask is not None and is_causal:
        raise ValueError("attention takes a mask or is_causal, not both; fold the causal part into the mask.")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly.")
    if cpu_training_attention(q, k):
        return _plain(q, k, v, mask, is_causal, dropout_p)
    if q.shape[2] == 1 and q.device.type == "cpu" and torch.compiler.is_compiling() and not dropout_p:
        return _one_query(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal, enable_gqa=groups > 1)
    B, n_heads, T_q, head_dim = q.shape
    folded_q = q.reshape(B, k.shape[1], groups * T_q, head_dim)  # (B, n_kv_heads, groups * T_q, head_dim)
    folded_mask = mask.expand(-1, -1, T_q, -1).repeat(1, 1, groups, 1)  # (B, 1, groups * T_q, T_kv)
    y = F.scaled_dot_product_attention(folded_q, k, v, attn_mask=folded_mask, dropout_p=dropout_p)
    return y.view(B, n_heads, T_q, head_dim)


def _plain(q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """Two matmuls and a softmax, the query groups folded onto the query axis."""
    B, n_heads, T_q, head_dim = q.shape
    n_kv_heads, T_kv = k.shape[1], k.shape[2]
    groups = n_heads // n_kv_heads
    q = (q * head_dim**-0.5).reshape(B, n_kv_heads, groups * T_q, head_dim)  # (B, n_kv_heads, groups * T_q, head_dim)
    scores = q @ k.transpose(-1, -2)  # (B, n_kv_heads, groups * T_q, T_kv), in q's dtype
    if is_causal:
        mask = torch.ones(T_q, T_kv, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.view(B, n_kv_heads, groups, T_q, T_kv).masked_fill(~mask.unsqueeze(-3), float("-inf"))
        scores = scores.view(B, n_kv_heads, groups * T_q, T_kv)
    probs = scores.softmax(dim=-1)  # accumulated in fp32 for bf16 scores, rounded to bf16
    y = (F.dropout(probs, dropout_p) if dropout_p else probs) @ v  # (B, n_kv_heads, groups * T_q, head_dim)
    return y.view(B, n_heads, T_q, head_dim)


def _one_query(q, k, v, mask) -> torch.Tensor:
    """One query per head as multiply-and-sum in fp32 (a causal mask over one query allows every key)."""
    B, n_heads, _, head_dim = q.shape
    n_kv_heads, T_kv, dtype = k.shape[1], k.shape[2], q.dtype
    q = q.float().view(B, n_kv_heads, n_heads // n_kv_heads, 1, head_dim) * head_dim**-0.5
    scores = (q * k.float()[:, :, None]).sum(-1)  # (B, n_kv_heads, groups, T_kv)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, T_kv), float("-inf"))
    probs = scores.softmax(dim=-1)
    y = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # (B, n_kv_heads, groups, head_dim)
    return y.view(B, n_heads, 1, head_dim).to(dtype)
