"""The accuracy a training run measures (`eval_task`): `auto` scores the data's test split where
it has one, else the held-out validation questions; `test` / `val` ask for one; `none`: loss only."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from nanovlm.config import ConfigError
from nanovlm.data.records import splits
from nanovlm.eval import vqa

TASKS = ("auto", "test", "val", "none")


def resolve_task(eval_task: str, data: str) -> str:
    task = (eval_task or "none").strip().lower()
    if task not in TASKS:
        raise ConfigError(f"eval_task must be one of {', '.join(TASKS)}, got {eval_task!r}.")
    if task in ("auto", "test"):
        have = splits(data)
        if task == "test" and "test" not in have:
            raise ConfigError(f"eval_task=test scores the data's test split, but data={data} has splits "
                              f"{', '.join(have)}; use eval_task=auto to score its held-out questions.")
        return "test" if "test" in have else "val"
    return task


def task_report(task: str, model, *, data: str, val_source: Any = None, val_records: Sequence[int] | None = None,
                image_folder: str | None = None, limit: int = 0, batch_size: int = 64, rank: int = 0,
                world_size: int = 1, gather: Callable[[Any], list] | None = None, autocast_dtype=None,
                progress: bool = False) -> dict[str, Any] | None:
    """The task's report, or None when there is nothing to score."""
    if task == "test":
        items, name, what = vqa.qa_items(data, image_folder, "test", limit=limit), "test", f"{data} test split"
    elif task == "val" and val_records:
        items = vqa.qa_items(val_source, image_folder, indices=list(val_records), limit=limit)
        name, what = "val", "held-out validation questions"
    else:
        return None
    report = vqa.evaluate(model, items, batch_size=batch_size, progress=progress, rank=rank, world_size=world_size,
                          gather=gather, autocast_dtype=autocast_dtype)
    return {**report, "name": name, "what": what}
