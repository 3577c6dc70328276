"""Packing: several samples per fixed-length row, first-fit-decreasing by tokens and image tiles.
`attention_mask` holds each sample's segment id (0: padding), which the language model makes a
block-diagonal causal mask: a packed batch gives the same loss as the samples one by one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.datasets import SampleError, is_skip, skip_marker
from nanovlm.models.linear_cross_entropy import supervised_index


def filter_samples(samples: Sequence[dict[str, Any]], max_length: int | None, strict: bool = False
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(usable samples, skip markers of the rest): what every collator asks of its samples."""
    kept, skips = [], []
    for s in samples:
        if is_skip(s):
            skips.append(s)
        elif max_length and len(s["input_ids"]) > max_length:
            error = f"{len(s['input_ids'])} tokens, more than lm_max_length = {max_length}."
            if strict:
                raise SampleError("too_long", error, s.get("id"))
            skips.append(skip_marker("too_long", error, s.get("id")))
        else:
            kept.append(s)
    return kept, skips


def fill_rows(samples: Sequence[dict[str, Any]], plan: Sequence[Sequence[int]], length: int, pad_token_id: int,
              left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Rows of `length` tokens, row r holding the samples `plan[r]` in order; `attention_mask`: segment ids."""
    shape = (len(plan), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    segments, labels = torch.zeros(shape, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long) if any("position_ids" in s for s in samples) else None
    for r, row in enumerate(plan):
        at = length - sum(len(samples[i]["input_ids"]) for i in row) if left_pad else 0
        for seg, i in enumerate(row, start=1):
            s, n = samples[i], len(samples[i]["input_ids"])
            # labels are shifted within each sample: its last label is IGNORE_INDEX
            input_ids[r, at:at + n], segments[r, at:at + n], labels[r, at:at + n] = s["input_ids"], seg, s["labels"]
            if positions is not None:  # a sample's own position_ids, or the 0, 1, 2, ... it gets alone
                positions[r, at:at + n] = torch.as_tensor(s["position_ids"]) if "position_ids" in s else torch.arange(n)
            at += n
    batch = {"input_ids": input_ids, "attention_mask": segments, "labels": labels,
             "supervised_index": supervised_index(labels)}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def plan_packs(lengths: Sequence[int], n_images: Sequence[int], pack_length: int,
               max_images_per_pack: int = 0) -> list[list[int]]:
    """First-fit-decreasing: lists of sample indices, each within `pack_length` tokens and (> 0) image tiles."""
    rows: list[list[int]] = []
    room: list[int] = []
    images: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > pack_length:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than pack_length = {pack_length}.")
        r = next((r for r in range(len(rows)) if lengths[i] <= room[r]
                  and (not max_images_per_pack or images[r] + n_images[i] <= max_images_per_pack)), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(pack_length)
            images.append(0)
        rows[r].append(i)
        room[r] -= lengths[i]
        images[r] += n_images[i]
    return [sorted(r) for r in rows]


class PackingCollator:
    """Collate a pool of samples into fixed-length packed rows (see the module docstring)."""

    def __init__(self, pad_token_id: int, pack_length: int, max_images_per_pack: int = 0, strict: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (nanovlm pads with the EOS token).")
        if pack_length < 2:
            raise ValueError(f"pack_length must be at least 2, got {pack_length}.")
        self.pad_token_id, self.pack_length = int(pad_token_id), int(pack_length)
        self.max_images_per_pack, self.strict = int(max_images_per_pack or 0), strict

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skips = filter_samples(samples, self.pack_length, self.strict)
        plan = plan_packs([len(s["input_ids"]) for s in kept], [s["images"].shape[0] for s in kept],
                          self.pack_length, self.max_images_per_pack)
        batch = fill_rows(kept, plan, self.pack_length, self.pad_token_id)
        return {**batch, "skips": skips, "ids": [[kept[i].get("id") for i in row] for row in plan],
                "images": [torch.cat([kept[i]["images"] for i in row]) for row in plan]}  # in their tokens' order
