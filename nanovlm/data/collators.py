"""Collators: processed samples -> a batch for `model(input_ids, images, attention_mask, labels)`.
`VLMCollator` left-pads, `PackingCollator` (`packing.py`) packs; both drop skip markers and
over-long samples into `batch["skips"]` and find `supervised_index` on the CPU.
"""

from __future__ import annotations

from typing import Any, Sequence

from nanovlm.data.packing import PackingCollator, fill_rows, filter_samples


class VLMCollator:
    def __init__(self, pad_token_id: int, max_length: int | None = None, strict: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (nanovlm pads with the EOS token).")
        self.pad_token_id, self.max_length, self.strict = int(pad_token_id), max_length, strict

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skips = filter_samples(samples, self.max_length, self.strict)
        length = max((len(s["input_ids"]) for s in kept), default=0)
        batch = fill_rows(kept, [[b] for b in range(len(kept))], length, self.pad_token_id, left_pad=True)
        return {**batch, "images": [s["images"] for s in kept], "skips": skips, "ids": [s.get("id") for s in kept]}


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
