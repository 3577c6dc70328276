"""AdamW with matrix-only weight decay, the learning-rate schedule, and the clipped step: every stage's.

As in nanoVLM, the projector and each backbone get a rate (0 freezes that part). The schedule: linear
warm-up, the full rate, a cosine decay.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from nanovlm.models.lora import is_adapter_parameter

PARTS = ("MP", "vision_encoder", "decoder")  # the VLM's parts, each with its own rate


def decay_groups(name: str, params: list, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of `params` at rate `lr`: matrices decayed, the rest not (empty groups left out)."""
    groups = [{"name": f"{name}.decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"name": f"{name}.no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [{**g, "lr": lr, "base_lr": lr} for g in groups if g["params"]]


def param_groups(model: nn.Module, rates: dict[str, float], weight_decay: float, lora: bool = False) -> list[dict]:
    """The VLM's AdamW groups, a rate per part (0: frozen); with `lora`, only the towers' adapters train."""
    if lora and not any(is_adapter_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError("lora_rank > 0 but the model has no LoRA adapters; add them first "
                         "(nanovlm.models.lora.add_lora).")
    groups, seen = [], set()
    for part in PARTS:
        trained = []
        for name, p in getattr(model, part).named_parameters():  # deduplicated: a tied head is the embedding
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(rates[part] > 0 and (not lora or part == "MP" or is_adapter_parameter(name)))
                trained += [p] if p.requires_grad else []
        groups += decay_groups(part, trained, float(rates[part]), weight_decay)
    stray = [n for n, p in model.named_parameters() if id(p) not in seen]
    if stray:
        raise ValueError(f"parameters outside {', '.join(PARTS)} have no learning rate: {', '.join(stray[:5])}.")
    if not groups:
        raise ValueError("lr_mp, lr_vision_backbone and lr_language_backbone are all 0: nothing would train.")
    return groups


def fused_adamw_available(device: torch.device) -> bool:
    """Fused AdamW (one kernel for the whole update) exists for CUDA, and for CPU since torch 2.4."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters or device.type not in ("cpu", "cuda"):
        return False
    try:  # probe: older builds raise on CPU tensors
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def build_optimizer(groups: list[dict], fused: bool, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over `groups` (each with its `base_lr`), in one fused kernel where `fused`."""
    return torch.optim.AdamW(groups, betas=betas, eps=1e-8, fused=fused or None)


def vlm_optimizer(model: nn.Module, cfg, fused: bool) -> torch.optim.AdamW:
    """The VLM stage's AdamW: `param_groups` at `cfg`'s rates (a TrainConfig)."""
    rates = {"MP": cfg.lr_mp, "vision_encoder": cfg.lr_vision_backbone, "decoder": cfg.lr_language_backbone}
    return build_optimizer(param_groups(model, rates, cfg.weight_decay, bool(cfg.lora.lora_rank)), fused)


class Schedule:
    """Linear warm-up over `warmup_share` of the steps, the full rate, a cosine decay to `min_lr_ratio` over the
    last `decay_share`; a cut `total_steps` stretches the decay, `cycle` starts the shape again at a step."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, steps: int, warmup_share: float,
                 decay_share: float = 1.0, min_lr_ratio: float = 0.0):
        if steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {steps}.")
        self.optimizer, self.warmup_share, self.decay_share, self.min_lr_ratio = (optimizer, warmup_share,
                                                                                  decay_share, min_lr_ratio)
        self.cycle(0, steps)

    def cycle(self, start: int, steps: int) -> None:
        self.start, self.total_steps = start, start + steps
        self.warmup_steps = round(self.warmup_share * steps)

    def factor(self, step: int) -> float:
        t, steps = step - self.start, self.total_steps - self.start
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        decay = max(1, min(round(self.decay_share * steps), steps - self.warmup_steps))
        progress = min(1.0, max(0, t - (steps - decay)) / decay)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Each group's rate set to `base_lr` x the factor of `step`; returns the factor."""
        factor = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        return factor


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_norm: float) -> torch.Tensor | None:
    """Clip to `max_norm` (> 0) and step; returns the norm before clipping (a tensor, no sync) or None.
    A fused AdamW takes the clip as its `grad_scale`: no separate pass over every gradient."""
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
