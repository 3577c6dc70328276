"""The accuracy a training run measures: the tasks `eval_task` names.

`auto` (the default) follows the data: data that ships with a test split of its own (the
packaged easy-VQA) is scored on that split, any other data on its held-out validation
questions (`val`: exact match through `generate`, `nanovlm.eval.vqa`); `none` measures the loss
only. Naming a task the data does not have is an error, not a silent skip. A report carries
`name` (the prefix of its metric fields) and `what` (a few words for plots and logs).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from nanovlm.config import ConfigError

TASKS = ("auto", "val", "easyvqa", "none")
# Data names with a test split of their own -> the task that scores it.
DATA_TASKS = {"easyvqa": "easyvqa", "easy-vqa": "easyvqa", "easy_vqa": "easyvqa"}


def resolve_task(eval_task: str, data: str) -> str:
    """`val`, `easyvqa` or `none`, for the run's `eval_task` and `data` (see the module doc)."""
    task = (eval_task or "none").strip().lower()
    if task not in TASKS:
        raise ConfigError(f"eval_task must be one of {', '.join(TASKS)}, got {eval_task!r}.")
    own = DATA_TASKS.get(str(data).strip().lower())
    if task == "auto":
        return own or "val"
    if task not in ("val", "none") and task != own:
        raise ConfigError(f"eval_task={task} scores that task's own test split, but the run trains on data={data}; "
                          "use eval_task=auto to score the data's own held-out questions.")
    return task


def task_report(task: str, model, *, val_source: Any = None, val_records: Sequence[int] | None = None,
                image_folder: str | None = None, limit: int = 0, batch_size: int = 64, rank: int = 0,
                world_size: int = 1, gather: Callable[[Any], list] | None = None, autocast_dtype=None,
                progress: bool = False) -> dict[str, Any] | None:
    """The task's report, or None when there is nothing to score."""
    if task == "easyvqa":
        from nanovlm.eval import easyvqa

        report = easyvqa.evaluate(model, "test", limit, batch_size, rank=rank, world_size=world_size, gather=gather,
                                  autocast_dtype=autocast_dtype, progress=progress)
        return {**report, "name": "easyvqa_test", "what": "easy-VQA test questions"}
    if task != "val" or not val_records:
        return None
    from nanovlm.eval import vqa

    items = vqa.qa_items(val_source, image_folder, indices=list(val_records), limit=limit)
    report = vqa.evaluate(model, items, batch_size=batch_size, progress=progress, rank=rank, world_size=world_size,
                          gather=gather, autocast_dtype=autocast_dtype)
    return {**report, "name": "val", "what": "held-out validation questions"}


def format_report(report: dict[str, Any]) -> str:
    if report["name"] == "easyvqa_test":
        from nanovlm.eval import easyvqa

        return easyvqa.format_report(report) + "\na few answered test questions:\n" + easyvqa.format_examples(report)
    from nanovlm.eval import vqa

    return vqa.format_report(report, title=report["what"])
