"""Tolerances for comparing two training runs that should be the same run.

Two runs that split the same global batch differently (one batch or micro-batches, one process
or several) add the same fp32 numbers in a different order, so their gradients differ in the
last bits: about n * 2**-24 relative for a sum of n terms, far below 1e-5 for these models.
Adam then divides each gradient by its own running size. For almost every weight that keeps the
difference at the same tiny relative size, but for a weight whose gradient is mostly
cancellation (a sum of terms of both signs that nearly cancel), the last-bit difference is a
large part of the gradient itself, and its normalised update can change by up to 2 x lr per
step (from +lr to -lr). So the check is two-sided:

- every weight lies within 2 x lr x steps of the other run's (the most Adam can move it);
- all but a tiny share (1e-4) of the weights lie within 1% of lr (plus fp32 rounding of the
  weight itself, 4 ulp per step): a wrong token weighting of micro-batches or ranks changes
  the update direction of a large share of the weights by more than that (measured on the tiny
  preset, 3 steps: a mean of micro-batch means instead of one mean over tokens moves 38% of the
  weights by more than 1% of lr; the last-bit differences of a correct run move 1 in ~3 million).
"""

from __future__ import annotations

import torch

STRAY_SHARE = 1e-4


def assert_same_adam_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float,
                              steps: int) -> None:
    assert a.keys() == b.keys()
    eps32 = 2.0 ** -23
    stray = total = 0
    worst = (0.0, "")
    for k in a:
        wa, wb = a[k].double(), b[k].double()
        diff = (wa - wb).abs()
        bound = 2 * lr * steps + 4 * steps * eps32 * wa.abs().max().item()
        assert diff.max().item() <= bound, f"{k}: {diff.max().item():.3g} apart, more than Adam can move ({bound:.3g})"
        near = 0.01 * lr + 4 * steps * eps32 * wa.abs()
        stray += int((diff > near).sum())
        total += diff.numel()
        if diff.max().item() > worst[0]:
            worst = (diff.max().item(), k)
    assert stray <= STRAY_SHARE * total, (f"{stray} of {total} weights differ by more than 1% of lr "
                                          f"(largest {worst[0]:.3g} in {worst[1]})")
