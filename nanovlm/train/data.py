"""The training run's data: the loader, the held-out validation part, and the step budget.

The validation part is chosen from the training data itself, deterministically: samples are
grouped by their images (`group_keys()` of the dataset: records that share a picture stay on
one side), the groups are ordered by a hash of (seed, key), and the first groups are held out
until `val_fraction` of the samples (at most `val_size`) are. The choice depends on nothing but
the data and the seed, so every torchrun rank and every `--resume` makes the same one, and no
held-out image is ever trained on (not by the vision warm-up either). `val_data=FILE` holds out
nothing and validates on that file instead.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.train import distributed as dist


@dataclass
class Data:
    """What the loop needs from the data layer."""
    train: Any  # a resumable loader: iteration yields collated batches; state_dict / load_state_dict
    val: Any | None  # map-style dataset of held-out samples (or None)
    collate: Callable[[list], dict]
    skips: Any | None = None  # a SkipCounter
    batches_per_epoch: int | None = None  # micro-batches per rank in one epoch, when known
    source: Any | None = None  # the training dataset itself (the vision warm-up reads its samples)
    train_indices: Sequence[int] = ()  # indices into `source` that training uses
    val_records: Sequence[int] | None = None  # records of the data file held out (for accuracy)
    val_source: str | None = None  # the data file those records come from


def validation_split(keys: Sequence[str], fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of samples with the given group keys (see module doc)."""
    n = len(keys)
    want = min(cap, math.ceil(fraction * n)) if fraction > 0 else 0
    want = min(want, n - 1)
    if want <= 0:
        return list(range(n)), []
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups, key=lambda k: hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8).digest())
    held: list[int] = []
    for key in order:
        if len(held) >= want:
            break
        if len(held) + len(groups[key]) >= n:
            continue  # never hold out everything
        held.extend(groups[key])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def build_data(vlm_cfg: VLMConfig, train_cfg: TrainConfig, tokenizer, info: dist.DistInfo) -> Data:
    """The data `train_cfg.data` names (and `val_data`, when given), through `make_data`."""
    from torch.utils.data import IterableDataset

    from nanovlm.data.collators import build_collator
    from nanovlm.data.datasets import build_dataset

    dataset = build_dataset(train_cfg, vlm_cfg, tokenizer, split="train", rank=info.rank, world_size=info.world_size)
    if isinstance(dataset, IterableDataset):
        raise ValueError("streaming data is not supported by the training loop yet; set streaming=false.")
    val_set = None
    if train_cfg.val_data:
        from dataclasses import replace

        val_set = build_dataset(replace(train_cfg, data=train_cfg.val_data, streaming=False), vlm_cfg, tokenizer,
                                split="train")
    return make_data(dataset, build_collator(train_cfg, vlm_cfg, tokenizer), train_cfg, info, val_set=val_set)


def make_data(dataset, collate: Callable[[list], dict], train_cfg: TrainConfig, info: dist.DistInfo,
              val_set=None) -> Data:
    """A map-style dataset -> the resumable, rank-sharded training loader and the validation part."""
    from torch.utils.data import Subset

    from nanovlm.data.datasets import ResumableLoader, ShardedBatchSampler, SkipCounter

    if val_set is not None:
        train_idx, val_idx = list(range(len(dataset))), []
        val_records, val_source = _records(val_set, range(len(val_set))), train_cfg.val_data
    else:
        keys = dataset.group_keys() if hasattr(dataset, "group_keys") else [f"#{i}" for i in range(len(dataset))]
        train_idx, val_idx = validation_split(keys, train_cfg.val_fraction, train_cfg.val_size, train_cfg.seed)
        val_set = Subset(dataset, val_idx) if val_idx else None
        val_records, val_source = _records(dataset, val_idx), train_cfg.data
    train_set = Subset(dataset, train_idx)
    global_micro = train_cfg.batch_size * info.world_size
    if len(train_set) < global_micro:
        merged = (f" (made of {len(_records(dataset, train_idx))} records: those that share an image are one "
                  "sample)") if getattr(dataset, "plan", None) is not None else ""
        raise ValueError(f"the training data has {len(train_set)} sample{'s' if len(train_set) != 1 else ''}"
                         f"{merged}, fewer than one global batch "
                         f"(batch_size {train_cfg.batch_size} x {info.world_size} process(es)); "
                         "lower batch_size or bring more data.")
    # Every rank gets a full micro-batch at every step: the short last batch of an epoch is dropped.
    sampler = ShardedBatchSampler(len(train_set), global_micro, rank=info.rank, world_size=info.world_size,
                                  seed=train_cfg.seed, shuffle=True, drop_last=True)
    loader = ResumableLoader(train_set, sampler, collate, num_workers=train_cfg.num_workers,
                             pin_memory=info.device.type == "cuda")
    return Data(train=loader, val=val_set, collate=collate, skips=SkipCounter(strict=train_cfg.strict),
                batches_per_epoch=len(sampler), source=dataset, train_indices=train_idx,
                val_records=val_records or None, val_source=val_source)


def _records(dataset, samples: Sequence[int]) -> list[int]:
    """The data file's records that these samples are made of (several where `multi_turn` merged some)."""
    if not hasattr(dataset, "records_of"):
        return list(samples)
    return sorted(r for i in samples for r in dataset.records_of(i))


def total_steps_for(train_cfg: TrainConfig, data: Data) -> int:
    """`max_training_steps`, or fewer when `max_epochs` passes over the data come first."""
    steps = train_cfg.max_training_steps
    if train_cfg.max_epochs and data.batches_per_epoch:
        per_step = train_cfg.gradient_accumulation_steps
        steps = min(steps, max(1, math.ceil(train_cfg.max_epochs * data.batches_per_epoch / per_step)))
    return steps


def epoch_of(data: Data, micro_batches: int) -> float:
    return micro_batches / data.batches_per_epoch if data.batches_per_epoch else 0.0


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
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "position_ids", "supervised_index"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    images = batch.get("images")
    if isinstance(images, (list, tuple)):
        out["images"] = [x.to(device, non_blocking=True) for x in images]
    elif hasattr(images, "to"):
        out["images"] = images.to(device, non_blocking=True)
    return out
