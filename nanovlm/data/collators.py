"""Collators: processed samples -> a batch for `model(input_ids, images, attention_mask, labels)`.

`VLMCollator` left-pads to the longest sample of the batch (left, so that generation from a
batch of prompts continues every row at the same position). Samples longer than `max_length`
are dropped; they and the skip markers a dataset returns for broken samples are counted in
`batch["skips"]` ({reason: count}), because a collator running in a DataLoader worker cannot
share a counter with the trainer. A batch may end up empty (B = 0) when every sample was
skipped; trainers step over it.

Batch keys: `input_ids` (B, T), `attention_mask` (B, T) long (1 = token, 0 = padding),
`labels` (B, T) with IGNORE_INDEX on padding, `supervised_index` (the flat indices of the
labels that are not IGNORE_INDEX, found here on the CPU so that the training forward on an
accelerator does not have to), `images` (a list with one (n_i, 3, S, S) tensor per row),
`skips`, `ids` (sample ids, for error messages), and `position_ids` (B, T) when a sample
brings its own (a shared prompt with independent branches: see
`nanovlm.models.language_model.build_attention_mask`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.packing import PackingCollator, filter_samples, sample_positions, wants_positions
from nanovlm.models.linear_cross_entropy import supervised_index


class VLMCollator:
    def __init__(self, pad_token_id: int, max_length: int | None = None, strict: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (nanovlm pads with the EOS token).")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.strict = strict

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skips = filter_samples(samples, self.max_length, self.strict)
        B = len(kept)
        T = max((len(s["input_ids"]) for s in kept), default=0)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long) if wants_positions(kept) else None
        for b, s in enumerate(kept):
            n = len(s["input_ids"])
            input_ids[b, T - n:] = s["input_ids"]
            attention_mask[b, T - n:] = 1
            labels[b, T - n:] = s["labels"]
            if positions is not None:
                positions[b, T - n:] = sample_positions(s)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "supervised_index": supervised_index(labels), "images": [s["images"] for s in kept],
                 "skips": dict(skips), "ids": [s.get("id") for s in kept]}
        if positions is not None:
            batch["position_ids"] = positions
        return batch


def build_collator(train_cfg, vlm_cfg, tokenizer):
    """The collator a run asks for: packing (`train_cfg.packing`) or left padding."""
    strict = train_cfg.strict
    if train_cfg.packing:
        pack_length = train_cfg.pack_length or vlm_cfg.lm_max_length
        if pack_length > vlm_cfg.lm_max_position_embeddings:
            raise ValueError(f"pack_length ({pack_length}) exceeds lm_max_position_embeddings "
                             f"({vlm_cfg.lm_max_position_embeddings}).")
        return PackingCollator(tokenizer.pad_token_id, pack_length,
                               max_images_per_pack=train_cfg.max_images_per_pack, strict=strict)
    return VLMCollator(tokenizer.pad_token_id, vlm_cfg.lm_max_length, strict=strict)
