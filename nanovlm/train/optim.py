"""AdamW with one parameter group per part of the model, and the learning-rate schedule.

As in nanoVLM, the projector (`MP`), the vision backbone and the language backbone each get their
own learning rate; a rate of 0 freezes that part (requires_grad False, so no gradient is computed
and the optimizer holds no state for it). Weight decay applies only to matrices (>= 2-D weights:
linear layers, embeddings); norms and biases are not decayed. The schedule is a linear warm-up to
each group's rate followed by a cosine decay to `min_lr_ratio` of it.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from nanovlm.config import TrainConfig
from nanovlm.models.lora import is_adapter_parameter

# Model attribute -> the TrainConfig learning-rate field that drives it.
PARTS = {"MP": "lr_mp", "vision_encoder": "lr_vision_backbone", "decoder": "lr_language_backbone"}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups (`name`, `params`, `lr`, `weight_decay`); freezes parts whose rate is 0.

    Every parameter of the model must belong to one of PARTS (a new part would otherwise go
    silently untrained). With `lora_rank` > 0 only the LoRA adapters (`nanovlm.models.lora`, added
    beforehand) train in the vision encoder and the language model, at their part's rate; the
    projector trains whole."""
    groups: list[dict] = []
    seen: set[int] = set()
    lora = cfg.lora_rank > 0
    if lora and not any(is_adapter_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError("lora_rank > 0 but the model has no LoRA adapters; add them first "
                         "(nanovlm.models.lora.add_lora).")
    for part, lr_field in PARTS.items():
        lr = float(getattr(cfg, lr_field))
        module = getattr(model, part)
        decay, no_decay = [], []
        for name, p in module.named_parameters():  # deduplicated: a tied head is the embedding
            if id(p) in seen:
                continue
            seen.add(id(p))
            trains = lr > 0 and (not lora or part == "MP" or is_adapter_parameter(name))
            p.requires_grad_(trains)
            if trains:
                (decay if p.dim() >= 2 else no_decay).append(p)
        if decay:
            groups.append({"name": f"{part}.decay", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"name": f"{part}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    stray = [n for n, p in model.named_parameters() if id(p) not in seen]
    if stray:
        raise ValueError(f"parameters outside {', '.join(PARTS)} have no learning rate: {', '.join(stray[:5])}.")
    if not groups:
        raise ValueError("lr_mp, lr_vision_backbone and lr_language_backbone are all 0: nothing would train.")
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def fused_adamw_available(device: torch.device) -> bool:
    """Fused AdamW (one kernel for the whole update) exists for CUDA, and for CPU since torch 2.4."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        try:  # probe: older builds raise on CPU tensors
            p = nn.Parameter(torch.zeros(2))
            p.grad = torch.zeros(2)
            torch.optim.AdamW([p], fused=True).step()
            return True
        except (RuntimeError, TypeError):
            return False
    return False


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused where the device supports it (measured faster on this
    CPU and on CUDA, see docs/benchmarks.md), unless `fused` says otherwise."""
    groups = param_groups(model, cfg)
    fused = fused_adamw_available(device) if fused is None else fused
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def set_rates(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Each group's rate set to `factor` x its `base_lr`; returns `factor`."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return factor


class WarmupStableDecay:
    """Linear warm-up over `warmup_steps`, the full rate, then a cosine decay to 0 over the last
    `decay_steps` of `steps`, all counted from `start` (a later cycle begins where one ended)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int, decay_steps: int,
                 start: int = 0):
        self.optimizer, self.start = optimizer, start
        self.steps, self.warmup_steps = steps, warmup_steps
        self.decay_steps = max(1, min(decay_steps, steps - warmup_steps))

    @property
    def total_steps(self) -> int:
        """The step at which this cycle ends."""
        return self.start + self.steps

    def factor(self, step: int) -> float:
        t = step - self.start
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        decay_from = self.steps - self.decay_steps
        if t < decay_from:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - decay_from) / self.decay_steps)))

    def apply(self, step: int) -> float:
        return set_rates(self.optimizer, self.factor(step))


class WarmupCosine:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` x each group's rate.

    `factor(step)` is the multiplier for the update made at `step` (0-based); `apply(step)` writes
    `base_lr * factor(step)` into the optimizer. The schedule is a pure function of the step, so
    its state is just that step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.0,
                 min_lr_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = int(round(warmup_ratio * total_steps))
        self.min_lr_ratio = min_lr_ratio
        self.step_count = 0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Set the rates for the update at `step`; returns the multiplier."""
        self.step_count = step
        return set_rates(self.optimizer, self.factor(step))

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        # The step count is restored; the shape of the schedule comes from the (possibly edited)
        # config, so a resumed run may be extended with a larger max_training_steps.
        self.step_count = int(state["step_count"])


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of `params` to a total norm of `max_norm` (when > 0), then step.

    Returns the total norm before clipping (a tensor, not synced to the host), or None without
    clipping. A fused AdamW takes the clip as its `grad_scale`: the kernel divides each gradient
    by it as it reads it (and stores the result, as clip_grad_norm_ would), so the separate
    multiply over every gradient (a read and a write of all of them, ~0.9 GB a step for the
    222M shape in fp32) is not made. The same arithmetic as clip_grad_norm_ (coefficient
    max_norm / (norm + 1e-6), at most 1), applied as a division by its inverse."""
    if max_norm <= 0:
        optimizer.step()
        return None
    if not optimizer.defaults.get("fused"):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    optimizer.grad_scale = (norm + 1e-6).div(max_norm).clamp(min=1.0)  # read by fused Adam(W).step
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm
