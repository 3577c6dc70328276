"""Vocabulary projection and cross-entropy in one pass, a chunk of positions at a time.

Training only needs the loss and its gradients, not the (positions, vocab) logits: with the
49,152-word SmolLM2 vocabulary those are the largest tensor of a small model's step, written,
read back by log-softmax, kept for backward and read again. Here each chunk of positions gets
its logits, its share of the loss, and the gradients for the hidden states and the head weight
right away (d loss / d logits = softmax - one-hot); backward only scales them by the incoming
gradient. Same matmuls as the plain path, no full logits tensor, no separate log-softmax
backward.

The loss is the *sum* over positions, in fp32. Under autocast the matmuls and the softmax run in
the autocast dtype, as `nn.Linear` would: on a CPU the (positions, vocab) passes, not the matmuls,
are the head's time, and fp32 doubles their bytes. The target's p - 1 comes from the other tokens'
share, exact where p is near 1. `supervised_index` picks the positions that have a target.
"""

from __future__ import annotations

import torch

from nanovlm.config import IGNORE_INDEX

W_ROWS = 1024  # positions per product for the head's gradient (see `_chunked`)
TINY = torch.finfo(torch.float32).tiny  # a target probability that underflows is scored as this one


def supervised_index(targets: torch.Tensor) -> torch.Tensor:
    """(n_supervised,) int64: the flat indices b * T + t of the entries of `targets` (B, T) that
    are not IGNORE_INDEX, ascending. The collators compute it on the CPU: found on an
    accelerator, its data-dependent length makes the host wait for the device (a sync)."""
    return (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


def _chunked(h, weight, targets, chunk_size: int, want_h: bool, want_w: bool):
    """(loss sum in fp32, d loss / d h or None, d loss / d weight in fp32 or None).

    The head's gradient sums d_logits^T h over positions; it is taken once per `W_ROWS` positions
    (a few chunks' d_logits kept), not per chunk: each product is a (vocab, C) tensor converted to
    fp32 and added, which cost more than the matmul itself for 64-position chunks."""
    dtype = _compute_dtype(h)
    w = weight.to(dtype)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = None
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (d_logits, h) chunks not yet in grad_w
    for start in range(0, h.shape[0], chunk_size):
        hc = h[start:start + chunk_size].to(dtype)  # (n, C)
        tc = targets[start:start + chunk_size]  # (n,)
        d_logits = torch.softmax(hc @ w.t(), dim=-1)  # (n, V) probabilities in the compute dtype
        rows = torch.arange(tc.shape[0], device=tc.device)
        p_target = d_logits[rows, tc].float()  # (n,)
        d_logits[rows, tc] = 0
        rest = d_logits.sum(dim=-1).float()  # (n,) the other tokens' share: precise where the target's is near 1
        total = p_target + rest  # 1 up to the probabilities' rounding
        # -log(p_target / total), from the rest where the target is likely, from p_target elsewhere
        loss += torch.where(rest < p_target, -torch.log1p(-rest / total),
                            total.log() - p_target.clamp_min(TINY).log()).sum()
        if not (want_h or want_w):
            continue
        d_logits[rows, tc] = (-rest / total).to(d_logits.dtype)  # softmax - one-hot at the target
        if want_h:
            grad_h[start:start + chunk_size] = (d_logits @ w).to(h.dtype)
        if want_w:
            pending.append((d_logits, hc))
            if sum(d.shape[0] for d, _ in pending) >= W_ROWS or start + chunk_size >= h.shape[0]:
                d, x = torch.cat([d for d, _ in pending]), torch.cat([x for _, x in pending])
                grad_w = (d.t() @ x).float() if grad_w is None else grad_w.add_(d.t() @ x)
                pending = []
    if want_w and grad_w is None:  # no positions
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        loss, grad_h, grad_w = _chunked(h, weight, targets, chunk_size, ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """sum_i cross_entropy(h[i] @ weight.T, targets[i]) in fp32, without the (n, vocab) logits.

    h: (n, C) hidden states, weight: (vocab, C) the head, targets: (n,) token ids (no ignore
    index: pass only the supervised positions). Without autograd (no_grad, or nothing that needs
    a gradient) only the loss is computed. `chunk_size` (positions per chunk): by default 128 on
    CPU (the fastest measured there), and 1024 elsewhere (fewer, larger kernels for a GPU).
    """
    if chunk_size is None:
        chunk_size = 128 if h.device.type == "cpu" else 1024
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_size)
    return _chunked(h, weight, targets, chunk_size, False, False)[0]
