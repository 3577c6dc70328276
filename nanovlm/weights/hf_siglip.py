"""SigLIP / SigLIP2 vision towers in the transformers layout -> our `ViT` (text tower and pooling
head ignored). q, k, v are fused; the position table is resized as transformers resizes it at run
time (bicubic; NaFlex: antialiased bilinear); NaFlex's linear patch embedding becomes a convolution.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from nanovlm.config import VIT_ACTIVATIONS
from nanovlm.sources import resolve
from nanovlm.weights.common import (HF_PATTERNS, Rule, WeightLoadError, check_architecture, expand_blocks, fuse,
                                    load_checked, read_model_config, safetensors_tensors)

_ATTN = "encoder.layers.{i}.self_attn"

# ours <- transformers' (relative to the vision tower); tuples are fused in order.
KEYS = {
    "patch_embedding.conv.weight": "embeddings.patch_embedding.weight",
    "patch_embedding.conv.bias": "embeddings.patch_embedding.bias",
    "patch_embedding.position_embedding": "embeddings.position_embedding.weight",
    "blocks.{i}.ln1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "blocks.{i}.ln1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "blocks.{i}.attn.qkv_proj.weight": (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
    "blocks.{i}.attn.qkv_proj.bias": (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
    "blocks.{i}.attn.out_proj.weight": f"{_ATTN}.out_proj.weight",
    "blocks.{i}.attn.out_proj.bias": f"{_ATTN}.out_proj.bias",
    "blocks.{i}.ln2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "blocks.{i}.ln2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "blocks.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "layer_norm.weight": "post_layernorm.weight",
    "layer_norm.bias": "post_layernorm.bias",
}

# SiglipVisionConfig's / Siglip2VisionConfig's defaults, for config.json files that leave them out.
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
             "layer_norm_eps": 1e-6, "num_patches": 256}
_KINDS = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


def resize_positions(grid: int, naflex: bool):
    """(N, D) learned positions of a square grid -> (1, grid * grid, D)."""

    def transform(pos: torch.Tensor) -> torch.Tensor:
        N, D = pos.shape
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} positions do not form a square grid")
        if side == grid:
            return pos.reshape(1, N, D)
        x = pos.float().reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        if naflex:  # as Siglip2VisionEmbeddings.resize_positional_embeddings
            x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
        else:  # as SiglipVisionEmbeddings.interpolate_pos_encoding
            x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # (1, grid * grid, D)

    return transform


def patch_linear_to_conv(patch: int, channels: int):
    """NaFlex's linear patch embedding (D, patch * patch * C), (row, column, channel) order -> a conv weight."""

    def transform(weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 4:
            return weight
        D, K = weight.shape
        if K != patch * patch * channels:
            raise ValueError(f"a linear patch embedding of {K} inputs does not fit {patch}x{patch}x{channels} patches")
        return weight.reshape(D, patch, patch, channels).permute(0, 3, 1, 2)  # (D, C, patch, patch)

    return transform


def table(cfg: Any, naflex: bool, prefix: str) -> dict:
    transforms = {
        "patch_embedding.conv.weight": patch_linear_to_conv(cfg.vit_patch_size, 3),
        "patch_embedding.position_embedding": resize_positions(cfg.vit_grid, naflex),
        "blocks.{i}.attn.qkv_proj.weight": fuse,
        "blocks.{i}.attn.qkv_proj.bias": fuse,
    }
    rules = {ours: Rule(tuple(prefix + n for n in ((theirs,) if isinstance(theirs, str) else theirs)),
                        transforms.get(ours)) for ours, theirs in KEYS.items()}
    return expand_blocks(rules, cfg.vit_n_blocks)


def _vision_config(directory: str) -> tuple[dict[str, Any], bool]:
    """-> (vision config with defaults filled in, is NaFlex)."""
    if not os.path.isdir(directory):
        raise WeightLoadError(f"{directory} is not a directory; give a transformers SigLIP directory "
                              "(config.json + model.safetensors).")
    config, kind = read_model_config(directory, "SigLIP", tuple(_KINDS),
                                     f"SigLIP / SigLIP2 vision towers (model_type {', '.join(_KINDS)})")
    vision = (config.get("vision_config") or {}) if kind in ("siglip", "siglip2") else config
    vision = {**_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    # Fixed-resolution SigLIP2 checkpoints (siglip2-base-patch16-512) use the SigLIP classes;
    # only model_type siglip2* is the NaFlex variant.
    return vision, kind.startswith("siglip2")


def _vit_fields(vision: dict[str, Any], naflex: bool) -> dict[str, Any]:
    patch = vision["patch_size"]
    img = math.isqrt(vision["num_patches"]) * patch if naflex else vision["image_size"]
    return {
        "vit_hidden_dim": vision["hidden_size"],
        "vit_inter_dim": vision["intermediate_size"],
        "vit_n_heads": vision["num_attention_heads"],
        "vit_n_blocks": vision["num_hidden_layers"],
        "vit_patch_size": patch,
        "vit_ln_eps": float(vision["layer_norm_eps"]),
        "vit_hidden_act": vision["hidden_act"],
        "vit_img_size": img,
    }


def config_from_source(name: str) -> dict[str, Any]:
    """The `vit_*` fields of a SigLIP / SigLIP2 directory (or hub id when online)."""
    return _vit_fields(*_vision_config(_resolve_vision(name)))


def _resolve_vision(name: str) -> str:
    if not name:
        raise WeightLoadError("no vision checkpoint given; set vit_model_type to a SigLIP directory.")
    return resolve(name, allow_patterns=HF_PATTERNS)


def load_siglip_vision(cls: type, cfg: Any):
    """A `cls(cfg)` (ViT) with the SigLIP weights `cfg.vit_model_type` names (any vit_img_size), fp32."""
    directory = _resolve_vision(cfg.vit_model_type)
    vision, naflex = _vision_config(directory)
    found = _vit_fields(vision, naflex)
    found.pop("vit_img_size")  # any size works: the positions are resized
    wrong = []
    if vision["hidden_act"] not in VIT_ACTIVATIONS:
        wrong.append(f"the checkpoint's hidden_act is {vision['hidden_act']!r}; "
                     f"this ViT implements {' and '.join(map(repr, VIT_ACTIVATIONS))}")
        found.pop("vit_hidden_act")
    check_architecture(found, cfg, directory)
    if cfg.vit_cls_flag:
        wrong.append("vit_cls_flag is True but SigLIP has no CLS token; set it to False")
    if vision["num_channels"] != 3:
        wrong.append(f"the checkpoint takes {vision['num_channels']} image channels; this ViT takes 3")
    if wrong:
        raise WeightLoadError(f"cannot load {directory}: {'; '.join(wrong)}.")

    tensors = safetensors_tensors(directory)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""

    def ignore(name: str) -> bool:
        if prefix and not name.startswith(prefix):
            return True  # the text tower, logit_scale, logit_bias
        rest = name[len(prefix):]
        return rest.startswith("head.") or rest.endswith("position_ids")

    return load_checked(cls(cfg), tensors, table(cfg, naflex, prefix), directory, ignore)
