"""Evaluation during and after training: validation loss, and the accuracy `eval_task` names.

Which accuracy (the data's held-out validation questions, or a test split the data ships
with) is `nanovlm.eval.tasks`'s choice; this module runs it across ranks and records it under
names that say what it measured and on how many questions (`<name>_accuracy`,
`<name>_questions`, `<name>_what`).
"""

from __future__ import annotations

from typing import Any

import torch

from nanovlm.config import IGNORE_INDEX, TrainConfig
from nanovlm.train import distributed as dist



def resolve_task(train_cfg: TrainConfig) -> str:
    from nanovlm.eval.tasks import resolve_task as resolve

    return resolve(train_cfg.eval_task, train_cfg.data)


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
                            loss_reduction="sum", position_ids=batch.get("position_ids"), return_logits=False,
                            supervised_index=batch.get("supervised_index"))
        total[0] += loss.double()
        total[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
    dist.all_reduce_sum(total, info)
    return float(total[0] / total[1]) if total[1] > 0 else None


def accuracy(model, task: str, data, train_cfg: TrainConfig, limit: int, info: dist.DistInfo, amp: dict,
             progress: bool = False) -> dict[str, Any] | None:
    """The task's report (`nanovlm.eval.tasks`), or None when the run measures no accuracy."""
    from nanovlm.eval.tasks import task_report

    return task_report(task, model, data=train_cfg.data, val_source=data.val_source, val_records=data.val_records,
                       image_folder=train_cfg.image_folder, limit=limit, batch_size=train_cfg.eval_batch_size,
                       rank=info.rank, world_size=info.world_size, gather=lambda x: dist.gather_objects(x, info),
                       autocast_dtype=amp["dtype"] if amp["enabled"] else None, progress=progress)


def accuracy_fields(report: dict | None) -> dict[str, Any]:
    """A report as metric fields named for what they measured (`<name>_what`: in words)."""
    if report is None:
        return {}
    name = report["name"]
    out: dict[str, Any] = {f"{name}_accuracy": report["accuracy"], f"{name}_questions": report["n"],
                           f"{name}_what": report["what"]}
    for kind, entry in (report.get("per_type") or {}).items():  # the task's question kinds
        if entry.get("n"):
            out[f"{name}_accuracy_{kind.replace('/', '_')}"] = entry["accuracy"]
    return out
