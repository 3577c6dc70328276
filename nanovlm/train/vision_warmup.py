"""Vision warm-up: the vision encoder alone learns per-image labels before the VLM stage.

nanoVLM starts from a pretrained SigLIP. A vision encoder trained from scratch through the
language model learns slowly: on easy-VQA the shape of the object stayed near chance (40-48%,
chance 33%) after 900 steps, most likely because the answer is read at a position that must
first learn from the question what is asked (docs/benchmarks.md, fifth and sixth rounds). The
same encoder with a direct readout learns shape in two to three minutes on 2 CPU cores. So,
where the data gives each image class labels of its own (easy-VQA: shape and colour, recovered
from the training questions; `ImageTargets`), a warm-up stage trains the encoder with one
linear head per label kind on its mean-pooled output (cross-entropy over the known labels),
then drops the heads and hands the encoder to the VLM stage.

The stage has its own AdamW (betas 0.9 / 0.999, weight decay 0.1 on matrices), a linear
warm-up over the first 1% of steps and a cosine decay, bf16 autocast where training uses it,
and gradient clipping at 1.0. It draws its heads and batches from its own seeded generators, so
it does not move the random state of the stage after it. Under torchrun every rank runs the
same warm-up on the same images (the same numbers on each; DDP's initial broadcast makes them
identical anyway). A resumed run skips it: its checkpoint holds the warmed-up encoder.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import IGNORE_INDEX
from nanovlm.train.optim import WarmupCosine, clip_grad_norm

# The encoder fits its 4,000 easy-VQA training images within the warm-up; decay 0.1 on its
# matrices generalised better than 0.01 (shape on the test images 97.2% against 96.1%, one seed).
WEIGHT_DECAY = 0.1


def pooled_features(vision_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(batch, n_tiles, 3, S, S) pixels -> (batch, hidden): the encoder's output averaged over
    every patch of every tile of an image."""
    b, t = pixels.shape[:2]
    out = vision_encoder(pixels.flatten(0, 1))  # (b * t, patches, hidden)
    return out.view(b, t * out.shape[1], out.shape[2]).mean(1)


def _per_kind(logits: torch.Tensor, targets: torch.Tensor, classes: list[int]):
    """(kind's logits, kind's targets, known mask) for each label kind, in column order."""
    start = 0
    for k, n in enumerate(classes):
        yield logits[:, start:start + n].float(), targets[:, k], targets[:, k] != IGNORE_INDEX
        start += n


def warmup_loss(logits: torch.Tensor, targets: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Sum over label kinds of the mean cross-entropy of that kind's slice of `logits` over the
    images whose label is known (a kind with none known adds nothing)."""
    loss = logits.new_zeros((), dtype=torch.float32)
    for part, target, known in _per_kind(logits, targets, classes):  # no host sync: sum / count
        total = F.cross_entropy(part, target, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss + total / known.sum().clamp(min=1)
    return loss


def kind_accuracy(logits: torch.Tensor, targets: torch.Tensor, classes: list[int]) -> list[tuple[int, int]]:
    """(right, known) per label kind."""
    return [(int((part[known].argmax(-1) == target[known]).sum()), int(known.sum()))
            for part, target, known in _per_kind(logits, targets, classes)]


def vision_warmup(model: nn.Module, data: Any, steps: int, lr: float, batch_size: int, *, seed: int,
                  amp: dict, fused: bool, say: Callable[[str], None], progress: bool = True) -> dict[str, Any]:
    """Train `model.vision_encoder` for `steps` steps on `data` (an `ImageTargets`); returns a
    summary (steps, seconds, last loss, each kind's accuracy over the last tenth of the steps)
    and the trained `heads` (the VLM stage does not use them; a benchmark can)."""
    device = next(model.parameters()).device
    encoder = model.vision_encoder
    classes = list(data.classes.values())
    with torch.random.fork_rng(devices=[]):  # seeded, and no draw from the global generator
        torch.manual_seed(seed)
        heads = nn.Linear(model.cfg.vit_hidden_dim, sum(classes)).to(device)
    params = list(encoder.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY, "lr": lr, "base_lr": lr},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}],
                                  betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
    schedule = WarmupCosine(optimizer, steps, warmup_ratio=0.01)
    generator = torch.Generator().manual_seed(seed)
    n_images = int(data.targets.shape[0])
    autocast = torch.autocast(**amp) if amp.get("enabled") else contextlib.nullcontext()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True, desc="vision warm-up")
    say(f"vision warm-up: {steps} steps of the vision encoder alone on {n_images} images "
        f"({', '.join(f'{k} ({n} classes)' for k, n in data.classes.items())}), batch {batch_size}, lr {lr:g}")
    t0 = time.perf_counter()
    tail = max(1, steps // 10)
    right = [0] * len(classes)
    known = [0] * len(classes)
    encoder.train()
    loss = torch.zeros(())
    try:
        for step in range(steps):
            schedule.apply(step)
            idx = torch.randint(0, n_images, (batch_size,), generator=generator)
            pixels = data.normalize(data.images[idx]).to(device, non_blocking=True)
            targets = data.targets[idx].to(device, non_blocking=True)
            with autocast:
                logits = heads(pooled_features(encoder, pixels))
            loss = warmup_loss(logits, targets, classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(params, 1.0)
            optimizer.step()
            if step >= steps - tail:
                for k, (r, n) in enumerate(kind_accuracy(logits.detach(), targets, classes)):
                    right[k] += r
                    known[k] += n
            if bar is not None:
                bar.update(1)
                if step % 50 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    for p in heads.parameters():
        p.grad = None
    encoder.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    accuracy = {k: (right[i] / known[i] if known[i] else None) for i, k in enumerate(data.classes)}
    say(f"vision warm-up done in {seconds:.0f} s: loss {loss.item():.4f}, training-batch accuracy "
        + ", ".join(f"{k} {a:.1%}" for k, a in accuracy.items() if a is not None))
    return {"steps": steps, "time_s": round(seconds, 1), "loss": round(loss.item(), 4), "accuracy": accuracy,
            "heads": heads}
