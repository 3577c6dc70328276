"""Packing: several samples per fixed-length row, kept apart by segment ids.

The rows are filled first-fit-decreasing (longest sample first, into the first row with room
for its tokens and its image tiles), which wastes little space with few rows. In a packed row
`attention_mask` holds the sample's segment id (1, 2, 3, ...; 0 for padding at the end of the
row); the language model turns it into a block-diagonal causal mask and restarts positions at
0 in every segment, so each sample sees exactly what it would see alone and a packed batch
gives the same per-token loss as the samples one by one. (The original nanoVLM lets packed
samples attend to one another and continues their positions; that leaks across documents.)

`max_images_per_pack` caps the image tiles per row (what the vision encoder must process), so
a row of many image-heavy samples cannot exhaust memory; a sample with more tiles than the cap
gets a row of its own.

A sample that brings its own `position_ids` (a shared image prompt with independent branches,
`independent_turns`) keeps them in the row; the batch then carries `position_ids` for all rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.datasets import SampleError, is_skip
from nanovlm.models.linear_cross_entropy import supervised_index


# What every collator asks of its samples (`collators.py` imports these: packing never imports it).
def filter_samples(samples: Sequence[dict[str, Any]], max_length: int | None, strict: bool = False
                   ) -> tuple[list[dict[str, Any]], Counter]:
    """(usable samples, {reason: count} of the rest)."""
    kept, skips = [], Counter()
    for s in samples:
        if is_skip(s):
            skips[s["skip"]] += 1
        elif max_length and len(s["input_ids"]) > max_length:
            if strict:
                raise SampleError("too_long", f"{len(s['input_ids'])} tokens, more than lm_max_length = {max_length}.",
                                  s.get("id"))
            skips["too_long"] += 1
        else:
            kept.append(s)
    return kept, skips


def sample_positions(sample: dict[str, Any]) -> torch.Tensor:
    """A sample's own `position_ids`, or 0, 1, 2, ... (the positions it gets alone)."""
    if "position_ids" in sample:
        return torch.as_tensor(sample["position_ids"], dtype=torch.long)
    return torch.arange(len(sample["input_ids"]))


def wants_positions(samples: Sequence[dict[str, Any]]) -> bool:
    return any("position_ids" in s for s in samples)


def plan_packs(lengths: Sequence[int], n_images: Sequence[int], pack_length: int,
               max_images_per_pack: int = 0) -> list[list[int]]:
    """First-fit-decreasing: lists of sample indices, each fitting `pack_length` tokens and (when
    the cap is > 0) `max_images_per_pack` image tiles. Every length must be <= pack_length.
    Deterministic: ties keep the input order, and each row lists its samples in input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    images: list[int] = []
    for i in order:
        if lengths[i] > pack_length:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than pack_length = {pack_length}.")
        for r in range(len(rows)):
            fits_images = not max_images_per_pack or images[r] + n_images[i] <= max_images_per_pack
            if lengths[i] <= room[r] and fits_images:
                rows[r].append(i)
                room[r] -= lengths[i]
                images[r] += n_images[i]
                break
        else:
            rows.append([i])
            room.append(pack_length - lengths[i])
            images.append(n_images[i])
    return [sorted(r) for r in rows]


def pack_samples(samples: Sequence[dict[str, Any]], pack_length: int, pad_token_id: int,
                 max_images_per_pack: int = 0) -> dict[str, Any]:
    """Samples (each at most pack_length tokens) -> a packed batch of (n_rows, pack_length)."""
    plan = plan_packs([len(s["input_ids"]) for s in samples], [s["images"].shape[0] for s in samples],
                      pack_length, max_images_per_pack)
    n_rows = len(plan)
    input_ids = torch.full((n_rows, pack_length), pad_token_id, dtype=torch.long)
    segments = torch.zeros((n_rows, pack_length), dtype=torch.long)
    labels = torch.full((n_rows, pack_length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n_rows, pack_length), dtype=torch.long) if wants_positions(samples) else None
    images, ids = [], []
    for r, row in enumerate(plan):
        at = 0
        for seg, i in enumerate(row, start=1):
            s = samples[i]
            n = len(s["input_ids"])
            input_ids[r, at:at + n] = s["input_ids"]
            segments[r, at:at + n] = seg
            labels[r, at:at + n] = s["labels"]  # already shifted within the sample; its last label is IGNORE_INDEX
            if positions is not None:
                positions[r, at:at + n] = sample_positions(s)
            at += n
        # Image tensors in the order their tokens appear in the row.
        row_images = [samples[i]["images"] for i in row]
        images.append(torch.cat(row_images) if row_images else samples[0]["images"][:0])
        ids.append([samples[i].get("id") for i in row])
    batch = {"input_ids": input_ids, "attention_mask": segments, "labels": labels,
             "supervised_index": supervised_index(labels), "images": images, "ids": ids}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


class PackingCollator:
    """Collate a pool of samples into fixed-length packed rows (see the module docstring)."""

    def __init__(self, pad_token_id: int, pack_length: int, max_images_per_pack: int = 0, strict: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (nanovlm pads with the EOS token).")
        if pack_length < 2:
            raise ValueError(f"pack_length must be at least 2, got {pack_length}.")
        self.pad_token_id = int(pad_token_id)
        self.pack_length = int(pack_length)
        self.max_images_per_pack = int(max_images_per_pack or 0)
        self.strict = strict

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skips = filter_samples(samples, self.pack_length, self.strict)
        if not kept:
            empty = torch.zeros((0, self.pack_length), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone(),
                    "supervised_index": supervised_index(empty), "images": [], "skips": dict(skips), "ids": []}
        batch = pack_samples(kept, self.pack_length, self.pad_token_id, self.max_images_per_pack)
        batch["skips"] = dict(skips)
        return batch
