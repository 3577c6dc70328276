"""The training run's data: the loader, the held-out validation part, and sizes fitted to the data.

The validation part: samples grouped by image (records sharing a picture stay on one side), groups
ordered by a hash of (seed, key), so every rank and every `--resume` makes the same choice. With
`fit_batch`, small data lowers the batch sizes so that an epoch holds STEPS_PER_EPOCH steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch.utils.data import Subset

from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.data.augment import ShiftedSamples
from nanovlm.data.collators import build_collator
from nanovlm.data.datasets import ResumableLoader, ShardedBatchSampler, SkipCounter, build_dataset
from nanovlm.train.distributed import DistInfo

STEPS_PER_EPOCH = 4  # the fewest a fitted batch leaves in an epoch


@dataclass
class Data:
    train: Any  # a resumable loader: iteration yields collated batches; state_dict / load_state_dict
    val: Any | None  # map-style dataset of held-out samples (or None)
    collate: Callable[[list], dict]
    skips: Any | None = None  # a SkipCounter
    batches_per_epoch: int | None = None  # micro-batches per rank in one epoch, when known
    source: Any | None = None  # the training dataset itself (the vision stage reads its samples)
    train_indices: Sequence[int] = ()  # indices into `source` that training uses
    val_records: Sequence[int] | None = None  # records of the data file held out (for accuracy)
    val_source: str | None = None  # the data file those records come from
    batch_size: int = 0  # batch_size and vision_warmup_batch_size as fitted to the data
    vision_batch_size: int = 0


def validation_split(keys: Sequence[str], fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of samples with the given group keys (see module doc)."""
    n = len(keys)
    want = min(cap, math.ceil(fraction * n), n - 1) if fraction > 0 else 0
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    held: list[int] = []
    for key in sorted(groups, key=lambda k: hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8).digest()):
        if len(held) >= want:
            break
        if len(held) + len(groups[key]) < n:  # never hold out everything
            held.extend(groups[key])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def build_data(vlm_cfg: VLMConfig, cfg: TrainConfig, tokenizer, info: DistInfo, say=print) -> Data:
    """The data `cfg.data` names (and `val_data`, when given), through `make_data`."""
    dataset = build_dataset(cfg, vlm_cfg, tokenizer, split="train")
    val_set = build_dataset(cfg.replace(data=cfg.val_data, data_weights=""), vlm_cfg, tokenizer) if cfg.val_data \
        else None
    return make_data(dataset, build_collator(cfg, vlm_cfg, tokenizer), cfg, info, val_set=val_set, say=say)


def make_data(dataset, collate: Callable[[list], dict], cfg: TrainConfig, info: DistInfo, val_set=None,
              say=print) -> Data:
    """A map-style dataset -> the resumable, rank-sharded training loader and the validation part."""
    names, source = _sources(dataset)
    if val_set is not None:
        train_idx, val_records = list(range(len(dataset))), _records(val_set, range(len(val_set)))
        val_source = cfg.val_data
    else:
        keys = dataset.group_keys() if hasattr(dataset, "group_keys") else [f"#{i}" for i in range(len(dataset))]
        train_idx, val_idx = [], []
        members_of = [[i for i, k in enumerate(source) if k == s] for s in range(len(names))]
        for members in filter(None, members_of):  # a mixture holds out a part of each source
            t, v = validation_split([keys[i] for i in members], cfg.val_fraction,
                                    math.ceil(cfg.val_size * len(members) / len(keys)), cfg.seed)
            train_idx += [members[i] for i in t]
            val_idx += [members[i] for i in v]
        train_idx, val_idx = sorted(train_idx), sorted(val_idx)
        val_set = Subset(dataset, val_idx) if val_idx else None
        val_records, val_source = _records(dataset, val_idx), cfg.data
    batch, vision_batch = _fit_batch(dataset, train_idx, cfg, info.world_size, say)
    # Every rank gets a full micro-batch at every step: the short last batch of an epoch is dropped.
    sampler = ShardedBatchSampler(len(train_idx), batch * info.world_size, rank=info.rank, world_size=info.world_size,
                                  seed=cfg.seed, shuffle=True, drop_last=True,
                                  **_weighted(train_idx, names, source, cfg.source_weights(), say))
    shift = cfg.recipe.image_shift
    train_set = ShiftedSamples(dataset, train_idx, shift, cfg.seed, sampler) if shift else Subset(dataset, train_idx)
    loader = ResumableLoader(train_set, sampler, collate, num_workers=cfg.num_workers,
                             pin_memory=info.device.type == "cuda")
    return Data(train=loader, val=val_set, collate=collate, skips=SkipCounter(strict=cfg.strict),
                batches_per_epoch=len(sampler), source=dataset, train_indices=train_idx,
                val_records=val_records or None, val_source=val_source, batch_size=batch,
                vision_batch_size=vision_batch)


def _fit_batch(dataset, train_idx: list[int], cfg: TrainConfig, world: int, say) -> tuple[int, int]:
    """(batch_size, vision_warmup_batch_size), lowered with `fit_batch` so that an epoch holds STEPS_PER_EPOCH."""
    n, fit = len(train_idx), cfg.recipe.fit_batch
    batch = min(cfg.batch_size, n // (STEPS_PER_EPOCH * world)) if fit else cfg.batch_size
    vision_batch = min(cfg.recipe.vision_warmup_batch_size, max(1, n // STEPS_PER_EPOCH)) if fit \
        else cfg.recipe.vision_warmup_batch_size
    if batch < 1 or n < batch * world:
        merged = (f" (made of {len(_records(dataset, train_idx))} records: those that share an image are one "
                  "sample)") if getattr(dataset, "plan", None) is not None else ""
        need = (f"too few to train on (at least {STEPS_PER_EPOCH * world} are needed); bring more data" if fit else
                f"fewer than one global batch (batch_size {cfg.batch_size} x {world} process(es)); lower batch_size "
                "or bring more data")
        raise ValueError(f"the training data has {n} sample{'s' if n != 1 else ''}{merged}, {need}.")
    fitted = [f"batch_size {batch} (of {cfg.batch_size})"] if batch != cfg.batch_size else []
    if vision_batch != cfg.recipe.vision_warmup_batch_size and cfg.recipe.vision_warmup != "off":
        fitted.append(f"vision_warmup_batch_size {vision_batch} (of {cfg.recipe.vision_warmup_batch_size})")
    if fitted:
        say(f"{n} training samples: {' and '.join(fitted)}, so that an epoch holds {STEPS_PER_EPOCH} steps "
            "(fit_batch=false keeps them)")
    return batch, vision_batch


def _sources(dataset) -> tuple[list[str], list[int]]:
    """The names of the data's sources and each sample's source (a single source: all 0)."""
    records = getattr(dataset, "records", None)
    names = [m.name for m in getattr(records, "members", [])]
    if len(names) < 2:
        return [getattr(records, "name", "data")], [0] * len(dataset)
    return names, [names.index(records.source_of(_records(dataset, [i])[0])) for i in range(len(dataset))]


def _weighted(train_idx: list[int], names: list[str], source: list[int], weights: list[float], say) -> dict:
    """The sampler's groups and per-epoch counts: each source draws its weight's share of the data's size."""
    if not weights:
        return {}
    groups: list[list[int]] = [[] for _ in names]
    for pos, i in enumerate(train_idx):
        groups[source[i]].append(pos)
    if not all(groups):  # a source with no training sample (a mixture keeps only sources that have the split)
        raise ValueError(f"data_weights: source {names[[bool(g) for g in groups].index(False)]} has no training "
                         "sample left after the validation part; bring more data or leave it out.")
    counts = [max(1, round(len(train_idx) * w / sum(weights))) for w in weights]
    say("mixture: " + ", ".join(f"{n} {len(g)} samples, {c} a pass (weight {w:g})"
                                for n, g, c, w in zip(names, groups, counts, weights)))
    return {"groups": groups, "counts": counts}


def _records(dataset, samples: Sequence[int]) -> list[int]:
    """The data file's records that these samples are made of (several where `multi_turn` merged some)."""
    if not hasattr(dataset, "records_of"):
        return list(samples)
    return sorted(r for i in samples for r in dataset.records_of(i))


def total_steps_for(cfg: TrainConfig, batches_per_epoch: int | None) -> int:
    """`max_training_steps`, or fewer when `max_epochs` passes over the data come first."""
    if not (cfg.recipe.max_epochs and batches_per_epoch):
        return cfg.max_training_steps
    epochs = math.ceil(cfg.recipe.max_epochs * batches_per_epoch / cfg.gradient_accumulation_steps)
    return min(cfg.max_training_steps, max(1, epochs))


def n_samples(batch: dict) -> int:
    """Samples in a batch: one per row, or the packed samples of each row."""
    if "n_samples" in batch:
        return int(batch["n_samples"])
    ids = batch.get("ids")
    if ids and isinstance(ids[0], (list, tuple)):
        return sum(len(row) for row in ids)
    return int(batch["input_ids"].shape[0])


def to_device(batch: dict, device) -> dict:
    if device.type == "cpu":
        return batch
    out = {k: (v.to(device, non_blocking=True) if k in ("input_ids", "attention_mask", "labels", "position_ids",
                                                         "supervised_index") else v) for k, v in batch.items()}
    images = batch.get("images")
    out["images"] = [x.to(device, non_blocking=True) for x in images] if isinstance(images, (list, tuple)) else \
        images.to(device, non_blocking=True) if hasattr(images, "to") else images
    return out
