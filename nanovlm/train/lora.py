"""LoRA training runs (`lora_rank` > 0): adapters on frozen towers, the projector trained whole.

Step checkpoints hold what trains plus the base's settings and SHA-256; `--resume` rebuilds and checks it.
"""

from __future__ import annotations

import hashlib

import torch

from nanovlm.config import LoraConfig, TrainConfig, VLMConfig, lora_target_names
from nanovlm.models.lora import add_lora, is_adapter_parameter
from nanovlm.train.step import auto_skip


def check_run(vlm_cfg: VLMConfig, cfg: TrainConfig) -> None:
    """A LoRA run's settings that the configs alone cannot check; ValueError in one sentence."""
    rank, warmup = cfg.lora.lora_rank, cfg.recipe.vision_warmup
    if rank and warmup != "off" and not (warmup == "auto" and auto_skip(vlm_cfg, cfg.init_from)):
        raise ValueError(f"lora_rank={rank} keeps the vision encoder as built, but vision_warmup={warmup} would "
                         "first train it; set vision_warmup=off.")


def prepare(model, vlm_cfg: VLMConfig, lora: LoraConfig, seed: int) -> dict:
    """Add the adapters `lora` asks for (in place) and return the base reference they train on."""
    add_lora(model, lora.lora_rank, lora.lora_scale_alpha, lora.lora_dropout, lora_target_names(lora.lora_targets))
    base = {k: v for k, v in model.state_dict_for_saving().items()  # what does not train: the base
            if not k.startswith("MP.") and not is_adapter_parameter(k)}
    return {"vit_model_type": vlm_cfg.vit_model_type, "lm_model_type": vlm_cfg.lm_model_type,
            "vlm_load_backbone_weights": vlm_cfg.vlm_load_backbone_weights, "seed": seed,
            "sha256": digest(base)}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def check_base(saved: dict | None, fresh: dict | None, path: str) -> None:
    """The checkpoint at `path` was trained on the base this run built (or neither is LoRA)."""
    if saved is None and fresh is None:
        return
    if saved is None or fresh is None:
        raise ValueError(f"--resume: {path} was written {'without' if saved is None else 'with'} LoRA "
                         f"adapters but this run has lora_rank={'> 0' if saved is None else '0'}; "
                         "resume with the run's own lora settings.")
    if saved.get("sha256") != fresh["sha256"]:
        changed = [k for k in fresh if k != "sha256" and saved.get(k) != fresh[k]]
        why = f"the settings {', '.join(changed)} differ" if changed else "the base weight files changed since"
        raise ValueError(f"--resume: the base weights differ from those the LoRA adapters in {path} were trained "
                         f"on ({why}); resume with the same base.")
