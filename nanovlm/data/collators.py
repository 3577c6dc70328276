"""Collators: processed samples -> a batch for `model(input_ids, images, attention_mask, labels)`.
`VLMCollator` left-pads, `PackingCollator` (`packing.py`) packs; both drop skip markers and
over-long samples into `batch["skips"]` and find `supervised_index` on the CPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.packing import PackingCollator, filter_samples, sample_positions
from nanovlm.models.linear_cross_entropy import supervised_index


class VLMCollator:
    def __init__(self, pad_token_id: int, max_length: int | None = None, strict: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (nanovlm pads with the EOS token).")
        self.pad_token_id, self.max_length, self.strict = int(pad_token_id), max_length, strict

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skips = filter_samples(samples, self.max_length, self.strict)
        B, T = len(kept), max((len(s["input_ids"]) for s in kept), default=0)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long) if any("position_ids" in s for s in kept) else None
        for b, s in enumerate(kept):
            n = len(s["input_ids"])
            input_ids[b, T - n:], attention_mask[b, T - n:], labels[b, T - n:] = s["input_ids"], 1, s["labels"]
            if positions is not None:
                positions[b, T - n:] = sample_positions(s)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "supervised_index": supervised_index(labels), "images": [s["images"] for s in kept],
                 "skips": skips, "ids": [s.get("id") for s in kept]}
        if positions is not None:
            batch["position_ids"] = positions
        return batch


def build_collator(train_cfg, vlm_cfg, tokenizer):
    """The collator a run asks for: packing (`train_cfg.packing`) or left padding."""
    if not train_cfg.packing:
        return VLMCollator(tokenizer.pad_token_id, vlm_cfg.lm_max_length, strict=train_cfg.strict)
    pack_length = train_cfg.pack_length or vlm_cfg.lm_max_length
    if pack_length > vlm_cfg.lm_max_position_embeddings:
        raise ValueError(f"pack_length ({pack_length}) exceeds lm_max_position_embeddings "
                         f"({vlm_cfg.lm_max_position_embeddings}).")
    return PackingCollator(tokenizer.pad_token_id, pack_length, max_images_per_pack=train_cfg.max_images_per_pack,
                           strict=train_cfg.strict)
