"""Evaluation during and after training: the validation loss, the accuracy `eval_task` names, the best checkpoint.

Reports are recorded as `<name>_accuracy`, `<name>_questions` and `<name>_what` (what was measured).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.eval.tasks import task_report
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train.data import to_device
from nanovlm.train.step import summed_loss


@torch.no_grad()
def validation_loss(model, val_set, collate, batch_size: int, info: dist.DistInfo, amp: dict) -> float | None:
    """Mean loss per supervised token over the held-out samples (shared out over the ranks)."""
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
            loss = summed_loss(model, batch)
        total += torch.stack([loss.double(), (batch["labels"] != IGNORE_INDEX).sum().double()])
    model.train(was_training)
    dist.all_reduce_sum(total, info)
    return float(total[0] / total[1]) if total[1] > 0 else None


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
    for source, entry in (report.get("per_source") or {}).items():  # each source of a mixture
        if entry.get("n"):
            out[f"{name}_accuracy_source_{source}"] = entry["accuracy"]
    return out


def evaluate(run, limit: int, final: bool) -> dict:
    """Validation loss and the task's accuracy (`nanovlm.eval.tasks`) now; logs them, keeps the best checkpoint."""
    state, info, cfg = run.state, run.info, run.cfg
    val = validation_loss(run.model, run.data.val, run.data.collate, cfg.batch_size, info, run.amp)
    report = task_report(run.task, run.model, data=cfg.data, val_source=run.data.val_source,
                         val_records=run.data.val_records, image_folder=cfg.image_folder, limit=limit,
                         batch_size=cfg.eval_batch_size, rank=info.rank, world_size=info.world_size,
                         gather=lambda x: dist.gather_objects(x, info),
                         autocast_dtype=run.amp["dtype"] if run.amp["enabled"] else None,
                         progress=final and run.bar is None and info.is_main)
    record = {"step": state.step, **({"val_loss": val} if val is not None else {}),
              **accuracy_fields(report), **({"final": True} if final else {})}
    if run.log is not None:
        run.log.log(record)
        if not final:
            run.say(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in record.items()
                                                     if k != "step" and not k.endswith("_what")))
    # The best checkpoint: by held-out accuracy where measured, else by validation loss (never by a test split).
    metric, value, higher = ("val_accuracy", record.get("val_accuracy"), True) if "val_accuracy" in record \
        else ("val_loss", val, False)
    best = state.best
    if value is not None and (best is None or best["metric"] != metric
                              or (value > best["value"] if higher else value < best["value"])):
        state.best = {"step": state.step, "metric": metric, "value": value}
        if info.is_main:
            ckpt.write_dir(os.path.join(run.run_dir, "checkpoints", "best"), run.model, run.tokenizer, dict(state.best))
    return {"record": record, "val": val, "report": report}
