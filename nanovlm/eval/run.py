"""`nanovlm eval`: load a checkpoint, score it on a task, print the accuracy, write a JSON report."""

from __future__ import annotations

import os

TASKS = ("easyvqa",)


def run_eval(model_dir: str, task: str = "easyvqa", split: str = "test", limit: int = 0, batch_size: int = 64,
             out: str | None = None, precision: str = "auto") -> int:
    import torch

    from nanovlm.eval import easyvqa
    from nanovlm.fileio import atomic_write_json
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import default_device, pick_dtype

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: every question), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} does not exist; give a checkpoint directory "
                                "such as runs/demo/final.")
    device = default_device()
    # Weights stay fp32; bf16 autocast where the hardware has fast bf16 matmuls.
    model = VisionLanguageModel.from_pretrained(model_dir, device=device)
    dtype = pick_dtype(precision, device)
    report = easyvqa.evaluate(model, split=split, limit=limit, batch_size=batch_size,
                              autocast_dtype=dtype if dtype != torch.float32 else None, progress=True)
    report["model"] = os.path.abspath(model_dir)
    report["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    out = out or default_report_path(model_dir, task, split, limit)
    atomic_write_json(out, report)
    print(easyvqa.format_report(report))
    print(easyvqa.format_examples(report))
    print(f"{report['n']} questions in {report['wall_time_s']:.1f} s ({report['questions_per_s']} questions/s); "
          f"report written to {out}")
    return 0


def default_report_path(model: str, task: str, split: str, limit: int = 0) -> str:
    """`eval-<model>-<task>-<split>[-first<N>].json` in the current directory: never inside the
    model's folder (which may be read-only or shared), and a `--limit` run never replaces the
    report of a full one. <model> is the last two parts of the path (`runs/demo/final` ->
    `demo-final`), so that two models' reports do not collide either."""
    parts = [p for p in os.path.normpath(os.path.abspath(model) if os.path.exists(model) else model).split(os.sep)
             if p not in ("", ".", "..")]
    name = "-".join(parts[-2:]) or "model"
    first = f"-first{limit}" if limit else ""
    return f"eval-{name}-{task}-{split}{first}.json"
