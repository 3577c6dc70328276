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
    from nanovlm.weights.nanovlm import checkpoint_directory

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: every question), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    model_dir = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    device = default_device()
    # Weights stay fp32; bf16 autocast where the hardware has fast bf16 matmuls.
    model = VisionLanguageModel.from_pretrained(model_dir, device=device, require_tokenizer=True)
    dtype = pick_dtype(precision, device)
    report = easyvqa.evaluate(model, split=split, limit=limit, batch_size=batch_size,
                              autocast_dtype=dtype if dtype != torch.float32 else None, progress=True)
    report["model"] = os.path.abspath(model_dir)
    report["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    out = out or os.path.join(model_dir, f"eval_{task}_{split}.json")
    atomic_write_json(out, report)
    print(easyvqa.format_report(report))
    print(easyvqa.format_examples(report))
    print(f"{report['n']} questions in {report['wall_time_s']:.1f} s ({report['questions_per_s']} questions/s); "
          f"report written to {out}")
    return 0
