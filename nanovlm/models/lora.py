"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation
of Large Language Models"), laid out so that they are exactly PEFT's adapters on transformers'
Idefics3 model (`nanovlm.weights.peft` writes them).

A `LoRALinear` is the `nn.Linear` it replaces, with the same `weight` and `bias` parameters
(so the state-dict names of the base weights do not change) plus `lora_A` and `lora_B`:
y = x W^T + b + scaling * B (A dropout(x)), scaling = alpha / rank. A starts Kaiming-uniform
and B at zero, as in the paper and PEFT, so a model with fresh adapters computes exactly what
it did without them.

Our vision encoder fuses q, k and v into one `qkv_proj` layer where SigLIP / Idefics3 have three.
Its adapter is three independent (A, B) pairs, one per output slice (`n_slices = 3`): its update
is the three PEFT adapters of q_proj, k_proj and v_proj stacked, and is written as exactly those.
A holds (n_slices, rank, in_features) and B (n_slices, out_features / n_slices, rank); a plain
layer has n_slices = 1.

`add_lora` wraps the layers `lora_targets` names (`nanovlm.config.LORA_TARGETS`) in every block,
`merge_lora` folds the adapters into the weights and gives back plain linear layers (for export).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import LORA_TARGETS

# target name -> (model part, module path inside each of the part's blocks, output slices)
TARGET_MODULES: dict[str, tuple[str, str, int]] = {
    "lm_q": ("decoder", "attn.q_proj", 1),
    "lm_k": ("decoder", "attn.k_proj", 1),
    "lm_v": ("decoder", "attn.v_proj", 1),
    "lm_o": ("decoder", "attn.out_proj", 1),
    "lm_gate": ("decoder", "mlp.gate_proj", 1),
    "lm_up": ("decoder", "mlp.up_proj", 1),
    "lm_down": ("decoder", "mlp.down_proj", 1),
    "vit_qkv": ("vision_encoder", "attn.qkv_proj", 3),
    "vit_out": ("vision_encoder", "attn.out_proj", 1),
    "vit_fc1": ("vision_encoder", "mlp.fc1", 1),
    "vit_fc2": ("vision_encoder", "mlp.fc2", 1),
}

ADAPTER_PARAMETERS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """`base` (frozen) plus a rank-`rank` update per output slice; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, n_slices: int = 1):
        nn.Module.__init__(self)
        if rank < 1 or base.out_features % n_slices:
            raise ValueError(f"a LoRA adapter needs rank >= 1 and {n_slices} equal output slices of "
                             f"{base.out_features} features, got rank {rank}.")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n_slices, rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_slices, self.out_features // n_slices, rank, **kw))
        for a in self.lora_A:  # each slice as PEFT initialises its lora_A (an nn.Linear's default)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B (A dropout(x)) for every slice, (..., out_features)."""
        S, r = self.lora_A.shape[:2]
        z = F.linear(self.lora_dropout(x), self.lora_A.reshape(S * r, self.in_features))  # (..., S * r)
        if S == 1:
            return F.linear(z, self.lora_B[0]) * self.scaling  # (..., out_features)
        z = z.unflatten(-1, (S, r))  # (..., S, r)
        return torch.einsum("...sr,sor->...so", z, self.lora_B).flatten(-2) * self.scaling  # (..., out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_update(x)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, (out_features, in_features): the slices' B A stacked."""
        return torch.bmm(self.lora_B, self.lora_A).flatten(0, 1) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, "
                f"slices={self.lora_A.shape[0]}, merged={self.merged}")


def target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[str, int]]:
    """module name -> (target, output slices) of every layer `targets` names, in model order."""
    out: dict[str, tuple[str, int]] = {}
    for target in targets:
        if target not in TARGET_MODULES:
            raise ValueError(f"unknown LoRA target {target!r}; choose from {', '.join(TARGET_MODULES)}.")
    for target, (part, path, slices) in TARGET_MODULES.items():
        if target in targets:
            for i in range(len(getattr(model, part).blocks)):
                out[f"{part}.blocks.{i}.{path}"] = (target, slices)
    return out


def target_of(module_name: str) -> str:
    """The target name of one adapted module (`decoder.blocks.3.mlp.up_proj` -> `lm_up`)."""
    for target, (part, path, _) in TARGET_MODULES.items():
        head, _, tail = module_name.partition(".blocks.")
        if head == part and tail.partition(".")[2] == path and tail.partition(".")[0].isdigit():
            return target
    raise ValueError(f"{module_name} is not a layer LoRA can adapt; the targets are {', '.join(TARGET_MODULES)}.")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS[:7]) -> nn.Module:
    """Wrap the `targets` layers of every block in LoRALinear (in place; returns the model) and
    record the settings in `model.lora_settings`. The base weights stay where they are."""
    if getattr(model, "lora_settings", None):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) them before adding new ones.")
    chosen = target_modules(model, targets)
    if not chosen:
        raise ValueError(f"no LoRA target given; choose from {', '.join(TARGET_MODULES)}.")
    for name, (_, slices) in chosen.items():
        base = model.get_submodule(name)
        layer = LoRALinear(base, rank, alpha, dropout, slices).train(base.training)  # an eval model stays one
        model.set_submodule(name, layer)
    model.lora_settings = {"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout),
                           "targets": [t for t in TARGET_MODULES if t in targets]}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter_parameter(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_PARAMETERS


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name (`....q_proj.lora_A`)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_parameter(k)}


def adapter_files_payload(model: nn.Module) -> tuple | None:
    """What `nanovlm.weights.peft.write_adapter` writes for this model: (settings, adapter tensors,
    the tensors of modules trained whole: the projector), or None without adapters."""
    if not getattr(model, "lora_settings", None):
        return None
    return model.lora_settings, adapter_state(model), {"MP.proj.weight": model.MP.proj.weight}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back (in place; returns
    the model): it then computes what it did with adapters and saves as a model without them."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.register_parameter("bias", layer.bias)
        plain.train(layer.training)
        for p in (plain.weight, plain.bias):
            if p is not None:
                p.requires_grad_(True)
        model.set_submodule(name, plain)
    model.lora_settings = None
    return model
