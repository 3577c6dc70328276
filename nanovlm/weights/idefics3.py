"""Idefics3 / SmolVLM directories in the transformers layout <-> our `VisionLanguageModel`, both
ways through one key table (`hf_siglip`'s, the connector's linear layer, `hf_llama`'s); a key is
copied, fused (q, k, v) or reordered (`positions`, as `Idefics3VisionEmbeddings` reads them).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import torch

from tokenizers import Tokenizer

from nanovlm.config import IDEFICS3_LAYOUT, VLMConfig
from nanovlm.weights import hf_llama, hf_siglip
from nanovlm.weights.common import (Rule, WeightLoadError, fuse, load_checked, read_json, read_model_config,
                                    safetensors_tensors)

VISION, CONNECTOR, TEXT = "model.vision_model.", "model.connector.", "model.text_model."


def _keys() -> dict[str, tuple[tuple[str, ...], str]]:
    """ours -> (transformers' names, kind), with `{i}` for the block index."""
    keys: dict[str, tuple[tuple[str, ...], str]] = {}
    for ours, theirs in hf_siglip.KEYS.items():
        names = (theirs,) if isinstance(theirs, str) else theirs
        kind = "fuse" if len(names) > 1 else "positions" if ours.endswith("position_embedding") else "copy"
        keys["vision_encoder." + ours] = (tuple(VISION + n for n in names), kind)
    keys["MP.proj.weight"] = ((CONNECTOR + "modality_projection.proj.weight",), "copy")
    for ours, theirs in hf_llama.KEYS.items():
        keys["decoder." + ours] = ((theirs.replace("model.", TEXT, 1),), "copy")
    return keys


KEYS = _keys()

# The tokens of Idefics3's prompt layout, as vlm_extra_tokens names them.
IDEFICS3_TOKENS = {**IDEFICS3_LAYOUT["vlm_extra_tokens"], "end_of_utterance_token": "<end_of_utterance>"}

# Idefics3VisionConfig's defaults, for config.json files that leave them out.
_VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
# transformers' PIL resampling numbers -> vlm_image_resample.
RESAMPLE_CODES = {1: "lanczos", 3: "bicubic"}


def expanded_keys(cfg: Any) -> dict[str, tuple[tuple[str, ...], str]]:
    """KEYS written out per block of each tower; a tied head (it is the embedding) has no entry."""
    out = {}
    for ours, (names, kind) in KEYS.items():
        if cfg.lm_tie_weights and ours == "decoder.head.weight":
            continue
        blocks = cfg.vit_n_blocks if ours.startswith("vision_encoder.") else cfg.lm_n_blocks
        for i in range(blocks) if "{i}" in ours else [None]:
            out[ours.format(i=i)] = (tuple(n.format(i=i) for n in names), kind)
    return out


def module_names(ours: str) -> list[str]:
    """One of our module names -> transformers' module name(s) (three for a fused qkv_proj)."""
    indices = re.findall(r"\.(\d+)\.", ours)
    template = re.sub(r"\.\d+\.", ".{i}.", ours, count=1)
    for suffix in (".weight", ""):
        entry = KEYS.get(template + suffix)
        if entry is not None:
            names = [n.format(i=indices[0]) if indices else n for n in entry[0]]
            return [n[: len(n) - len(suffix)] if suffix else n for n in names]
    raise KeyError(f"{ours} is not a module or tensor of the model; module names look like "
                   "decoder.blocks.0.attn.q_proj or vision_encoder.blocks.0.attn.qkv_proj.")


def tile_position_ids(grid: int) -> torch.Tensor:
    """The position row `Idefics3VisionEmbeddings` reads for each patch of a full tile, computed as it does."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    coords = torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor(grid))
    buckets = torch.bucketize(torch.clamp(coords, max=1.0 - 1e-6), boundaries, right=True)  # (grid,)
    return (buckets[:, None] * grid + buckets[None, :]).flatten()  # (grid * grid,)


def _positions_in(grid: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def transform(table: torch.Tensor) -> torch.Tensor:
        if table.shape[0] != grid * grid:
            raise ValueError(f"{table.shape[0]} positions do not fit a {grid}x{grid} patch grid")
        return table[tile_position_ids(grid)].unsqueeze(0)  # (1, grid * grid, D)
    return transform


def _positions_out(grid: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    def transform(ours: torch.Tensor) -> list[torch.Tensor]:
        if not torch.equal(tile_position_ids(grid), torch.arange(grid * grid)):
            raise ValueError(f"transformers' Idefics3 reads a {grid}x{grid} position grid with rows repeated, so "
                             "its table cannot hold ours; choose vit_img_size / vit_patch_size of another size")
        return [ours[0]]  # (N, D)
    return transform


def _split(n: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    return lambda fused: list(fused.chunk(n, dim=0))


def table(cfg: Any) -> dict[str, Rule]:
    """ours <- the file's tensors, as `common.convert` applies it."""
    forward = {"copy": None, "fuse": fuse, "positions": _positions_in(cfg.vit_grid)}
    return {ours: Rule(names, forward[kind]) for ours, (names, kind) in expanded_keys(cfg).items()}


def to_transformers(cfg: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (tied head left out) -> transformers' names: the table read backwards."""
    inverse = {"copy": lambda t: [t], "fuse": None, "positions": _positions_out(cfg.vit_grid)}
    out: dict[str, torch.Tensor] = {}
    for ours, (names, kind) in expanded_keys(cfg).items():
        parts = (inverse[kind] or _split(len(names)))(state[ours])
        out.update({name: part.contiguous() for name, part in zip(names, parts)})
    return out


def is_idefics3(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("model_type") == "idefics3"
    except (OSError, ValueError, AttributeError):
        return False  # not ours to judge: the nanovlm reader reports it


def _optional_json(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    return read_json(path) if os.path.isfile(path) else {}


def processor_files(directory: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(image processor settings, processor settings, chat template) from the files transformers 4 or 5 writes."""
    processor = _optional_json(directory, "processor_config.json")
    image = _optional_json(directory, "preprocessor_config.json") or processor.get("image_processor") or {}
    template = processor.get("chat_template")
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            template = f.read()
    template = template or _optional_json(directory, "chat_template.json").get("chat_template") \
        or _optional_json(directory, "tokenizer_config.json").get("chat_template")
    return image, processor, template


def _image_fields(image: dict[str, Any], source: str) -> dict[str, Any]:
    """vit_pixel_*, max_img_size, vlm_image_splitting and vlm_image_resample of an image processor."""
    wrong = []
    mean, std = image.get("image_mean", [0.5] * 3), image.get("image_std", [0.5] * 3)
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else list(v) for v in (mean, std))
    if len(set(mean)) > 1 or len(set(std)) > 1:
        wrong.append(f"per-channel normalisation (mean {mean}, std {std}); only one value for all channels "
                     "is supported")
    if not image.get("do_rescale", True) or abs(image.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        wrong.append("pixels not rescaled by 1/255")
    resample = image.get("resample", 1)
    if resample not in RESAMPLE_CODES:
        wrong.append(f"resample={resample} (supported: 1 Lanczos, 3 bicubic)")
    if wrong:
        raise WeightLoadError(f"{source}'s image processor uses settings this loader does not implement: "
                              f"{'; '.join(wrong)}.")
    normalise = image.get("do_normalize", True)
    return {"vit_pixel_mean": float(mean[0]) if normalise else None,
            "vit_pixel_std": float(std[0]) if normalise else None,
            "max_img_size": int((image.get("size") or {}).get("longest_edge", 4 * 364)),
            "vlm_image_splitting": bool(image.get("do_image_splitting", True)),
            "vlm_image_resample": RESAMPLE_CODES[resample], "resize_to_max_side_len": True}


def idefics3_config(directory: str) -> VLMConfig:
    """The VLMConfig of an Idefics3 directory (its tokenizer.json gives the image tokens' ids)."""
    config, _ = read_model_config(directory, "Idefics3", ("idefics3",), "Idefics3 / SmolVLM models")
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise WeightLoadError(f"{directory} has no tokenizer.json; an Idefics3 checkpoint's tokenizer holds its "
                              "image tokens.")
    vocab = Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).token_to_id
    vision = {**_VISION_DEFAULTS, **{k: v for k, v in (config.get("vision_config") or {}).items() if v is not None}}
    text = {"rms_norm_eps": 1e-5, **(config.get("text_config") or {})}  # Idefics3Config's text default
    image, processor, template = processor_files(directory)
    fields = {**hf_siglip._vit_fields(vision, naflex=False), **hf_llama.llama_fields(text, directory),
              **_image_fields(image, directory)}
    tile = (image.get("max_image_size") or {}).get("longest_edge", fields["vit_img_size"])
    if tile != fields["vit_img_size"]:
        raise WeightLoadError(f"{directory}: the image processor cuts {tile}-pixel tiles but the vision model reads "
                              f"{fields['vit_img_size']}-pixel images; set max_image_size to the vision image_size.")
    tokens = {name: text_ for name, text_ in IDEFICS3_TOKENS.items() if vocab(text_) is not None}
    missing = [t for name, t in IDEFICS3_TOKENS.items() if name in ("image_token", "global_image_token",
                                                                      "fake_image_token") and name not in tokens]
    if missing:
        raise WeightLoadError(f"{directory}'s tokenizer lacks {', '.join(missing)}; an Idefics3 checkpoint's "
                              "tokenizer holds its image tokens.")
    # Turns end with <end_of_utterance> where the template writes it (SmolVLM's); else config.json's eos.
    eou = IDEFICS3_TOKENS["end_of_utterance_token"]
    eos = vocab(eou) if eou in (template or eou) else None
    fields.update(
        mp_pixel_shuffle_factor=int(config.get("scale_factor", 2)),
        lm_tie_weights=bool(config.get("tie_word_embeddings", False)),
        vlm_image_layout="idefics3", vlm_extra_tokens=tokens, vlm_extra_tokens_in_vocab=True,
        vlm_image_token_id=vocab(IDEFICS3_TOKENS["image_token"]), lm_tokenizer=directory, vit_model_type="",
        lm_model_type="", vlm_load_backbone_weights=False, lm_max_length=fields["lm_max_position_embeddings"],
        lm_eos_token_id=eos if eos is not None else int(text.get("eos_token_id") or 2))
    if template:
        fields["lm_chat_template"] = template
    cfg = VLMConfig(**fields)
    seq = processor.get("image_seq_len")
    if seq is not None and seq != cfg.mp_image_token_length:
        raise WeightLoadError(f"{directory}: processor_config.json's image_seq_len is {seq} but the model gives "
                              f"{cfg.mp_image_token_length} tokens per tile; fix image_seq_len.")
    return cfg


def load_idefics3(cls: type, directory: str):
    """A `cls` (VisionLanguageModel) with an Idefics3 directory's weights, fp32 on the CPU."""
    cfg = idefics3_config(directory)
    model = cls(cfg, load_backbone=False)

    def ignore(name: str) -> bool:
        tied_head = cfg.lm_tie_weights and name == "lm_head.weight"
        return name.endswith(("position_ids", "rotary_emb.inv_freq")) or tied_head

    return load_checked(model, safetensors_tensors(directory), table(cfg), directory, ignore,
                        model.state_dict_for_saving())
