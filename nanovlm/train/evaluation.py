"""Evaluation during and after training: validation loss, and accuracy on what the data names.

`eval_task` follows the data: `auto` (the default) is `easyvqa` (its test split) for
`data=easyvqa` and `val` (exact match on the held-out validation questions, through `generate`)
for any other data; `none` (or empty) measures the loss only. Naming a task the data does not
have is an error, not a silent skip. Every accuracy is recorded under a name that says what it
measured and on how many questions (`val_accuracy` / `val_questions`, `easyvqa_test_accuracy` /
`easyvqa_test_questions`).
"""

from __future__ import annotations

from typing import Any

import torch

from nanovlm.config import ConfigError, TrainConfig
from nanovlm.train import distributed as dist

IGNORE_INDEX = -100
TASKS = ("auto", "val", "easyvqa", "none")


def is_easyvqa(data: str) -> bool:
    return str(data).strip().lower() in ("easyvqa", "easy-vqa", "easy_vqa")


def resolve_task(train_cfg: TrainConfig) -> str:
    """The accuracy a run measures: `val`, `easyvqa` or `none` (see the module docstring)."""
    task = (train_cfg.eval_task or "none").strip().lower()
    if task not in TASKS:
        raise ConfigError(f"eval_task must be one of {', '.join(TASKS)}, got {train_cfg.eval_task!r}.")
    if task == "auto":
        return "easyvqa" if is_easyvqa(train_cfg.data) else "val"
    if task == "easyvqa" and not is_easyvqa(train_cfg.data):
        raise ConfigError(f"eval_task=easyvqa scores easy-VQA's test split, but the run trains on data="
                          f"{train_cfg.data}; use eval_task=auto to score its own held-out questions.")
    return task


@torch.no_grad()
def validation_loss(model, val_set, collate, batch_size: int, info: dist.DistInfo, amp: dict) -> float | None:
    """Mean loss per supervised token over the held-out samples (shared out over the ranks)."""
    from nanovlm.train.data import to_device

    if val_set is None or len(val_set) == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    indices = list(range(len(val_set)))[info.rank::info.world_size]
    for start in range(0, len(indices), batch_size):
        batch = collate([val_set[i] for i in indices[start:start + batch_size]])
        if batch["input_ids"].shape[0] == 0:
            continue
        batch = to_device(batch, info.device)
        with torch.autocast(**amp):
            _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"],
                            loss_reduction="sum", position_ids=batch.get("position_ids"), return_logits=False)
        total[0] += loss.double()
        total[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
    dist.all_reduce_sum(total, info)
    return float(total[0] / total[1]) if total[1] > 0 else None


def accuracy(model, task: str, data, train_cfg: TrainConfig, limit: int, info: dist.DistInfo, amp: dict,
             progress: bool = False) -> dict[str, Any] | None:
    """The task's report (see `nanovlm.eval`), or None when the run measures no accuracy."""
    autocast = amp["dtype"] if amp["enabled"] else None
    if task == "easyvqa":
        from nanovlm.eval import easyvqa

        report = easyvqa.evaluate(model, "test", limit, train_cfg.eval_batch_size, rank=info.rank,
                                  world_size=info.world_size, gather=lambda x: dist.gather_objects(x, info),
                                  autocast_dtype=autocast, progress=progress)
        report["name"] = "easyvqa_test"
        return report
    if task != "val" or not data.val_records:
        return None
    from nanovlm.eval import vqa

    items = vqa.qa_items(data.val_source, train_cfg.image_folder, indices=list(data.val_records), limit=limit)
    report = vqa.evaluate(model, items, batch_size=train_cfg.eval_batch_size, progress=progress, rank=info.rank,
                          world_size=info.world_size, gather=lambda x: dist.gather_objects(x, info),
                          autocast_dtype=autocast)
    report["name"] = "val"
    return report


def accuracy_fields(report: dict | None) -> dict[str, float | int]:
    """A report as metric fields named for what they measured."""
    if report is None:
        return {}
    name = report["name"]
    out: dict[str, float | int] = {f"{name}_accuracy": report["accuracy"], f"{name}_questions": report["n"]}
    for kind, entry in (report.get("per_type") or {}).items():  # easy-VQA's kinds, or answer types
        if entry.get("n"):
            out[f"{name}_accuracy_{kind.replace('/', '_')}"] = entry["accuracy"]
    return out
