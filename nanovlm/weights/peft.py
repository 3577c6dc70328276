"""LoRA adapters in PEFT's layout for transformers' `Idefics3ForConditionalGeneration`, modules
named by the Idefics3 key table; our fused vision `qkv_proj` adapter is written as q, k and v's.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from nanovlm.fileio import atomic_write_json
from nanovlm.weights.idefics3 import module_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Our linear modules that take adapters ({i}: the block), and their transformers names per output slice.
TARGETABLE = ("decoder.blocks.{i}.attn.q_proj", "decoder.blocks.{i}.attn.k_proj", "decoder.blocks.{i}.attn.v_proj",
              "decoder.blocks.{i}.attn.out_proj", "decoder.blocks.{i}.mlp.gate_proj", "decoder.blocks.{i}.mlp.up_proj",
              "decoder.blocks.{i}.mlp.down_proj", "vision_encoder.blocks.{i}.attn.qkv_proj",
              "vision_encoder.blocks.{i}.attn.out_proj", "vision_encoder.blocks.{i}.mlp.fc1",
              "vision_encoder.blocks.{i}.mlp.fc2", "MP.proj")
IDEFICS3_NAMES: dict[str, tuple[str, ...]] = {
    ours: tuple(n.replace(".0.", ".{i}.", 1) if "{i}" in ours else n for n in module_names(ours.replace("{i}", "0")))
    for ours in TARGETABLE}
_OURS = {theirs: (ours, s) for ours, names in IDEFICS3_NAMES.items() for s, theirs in enumerate(names)}


def _template(module: str) -> tuple[str, str]:
    """A module name with its block index as `{i}`, and the index ("" for none)."""
    m = re.search(r"\.(\d+)\.", module)
    return (f"{module[:m.start()]}.{{i}}.{module[m.end():]}", m.group(1)) if m else (module, "")


def idefics3_names(module: str) -> tuple[str, ...]:
    """transformers Idefics3 module name(s) of one of our linear modules (three for a fused qkv)."""
    template, i = _template(module)
    if template not in IDEFICS3_NAMES:
        raise ValueError(f"{module} has no Idefics3 counterpart; PEFT adapters exist for the linear layers of "
                         f"{', '.join(IDEFICS3_NAMES)}.")
    return tuple(t.replace("{i}", i) for t in IDEFICS3_NAMES[template])


def from_idefics3_name(module: str) -> tuple[str, int]:
    """(our module name, output slice) of a transformers Idefics3 module name."""
    template, i = _template(module)
    if template not in _OURS:
        raise ValueError(f"{module} is not a module of ours in the Idefics3 layout (see nanovlm.weights.peft).")
    ours, s = _OURS[template]
    return ours.replace("{i}", i), s


def peft_tensors(adapters: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's state dict from our adapter tensors (`<module>.lora_A` / `.lora_B`, one row per output
    slice) and the weights of modules saved whole (`MP.proj.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in adapters.items():
        module, _, kind = key.rpartition(".")
        names = idefics3_names(module)
        if value.shape[0] != len(names):
            raise ValueError(f"{key} has {value.shape[0]} slices; its Idefics3 module(s) {', '.join(names)} need "
                             f"{len(names)}.")
        for s, name in enumerate(names):
            out[f"{_PREFIX}{name}.{kind}.weight"] = value[s].detach().contiguous()
    for key, value in whole.items():
        module, _, param = key.rpartition(".")
        (name,) = idefics3_names(module)
        out[f"{_PREFIX}{name}.{param}"] = value.detach().contiguous()
    return out


def adapter_config(settings: dict, adapter_modules: list[str], whole_modules: list[str]) -> dict:
    """PEFT's adapter_config.json for `settings` (rank, alpha, dropout) on our module names."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "auto_mapping": {"base_model_class": "Idefics3ForConditionalGeneration",
                         "parent_library": "transformers.models.idefics3.modeling_idefics3"},
        "r": settings["rank"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
        "target_modules": sorted(n for m in adapter_modules for n in idefics3_names(m)),
        "modules_to_save": sorted(n for m in whole_modules for n in idefics3_names(m)) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
    }


def write_adapter(directory: str, settings: dict, adapters: dict[str, torch.Tensor],
                  whole: dict[str, torch.Tensor]) -> None:
    adapter_modules = sorted({k.rpartition(".")[0] for k in adapters})
    whole_modules = sorted({k.rpartition(".")[0] for k in whole})
    atomic_write_json(os.path.join(directory, ADAPTER_CONFIG), adapter_config(settings, adapter_modules, whole_modules))
    save_file(peft_tensors(adapters, whole), os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def has_adapter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings: rank, alpha, dropout, modules, our adapter tensors) of a plain-LoRA PEFT directory."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    with open(path) as f:
        config = json.load(f)
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"{path}: only plain LoRA adapters load here (peft_type LORA without "
                         f"{', '.join(unsupported) or 'other adapter types'}).")
    slices: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, value in load_file(os.path.join(directory, ADAPTER_WEIGHTS)).items():
        inner = key.removeprefix(_PREFIX)
        for kind in ("lora_A", "lora_B"):
            if inner.endswith(f".{kind}.weight"):
                module, s = from_idefics3_name(inner[: -len(f".{kind}.weight")])
                slices.setdefault(module, {}).setdefault(kind, {})[s] = value
    tensors = {f"{module}.{kind}": torch.stack([parts[s] for s in sorted(parts)])
               for module, kinds in slices.items() for kind, parts in kinds.items()}
    settings = {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
                "dropout": float(config.get("lora_dropout") or 0.0), "modules": sorted(slices)}
    return settings, tensors
