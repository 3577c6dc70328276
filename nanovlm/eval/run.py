"""`nanovlm eval`: load a checkpoint, score it on a task, print the accuracy, write a JSON report."""

from __future__ import annotations

import os

TASKS = ("easyvqa",)
TASK_SPLITS = {"easyvqa": ("train", "test")}


def run_eval(model_dir: str, task: str | None = None, split: str | None = None, limit: int = 0, batch_size: int = 64,
             out: str | None = None, precision: str = "auto", *, data: str | None = None,
             image_folder: str | None = None, quantize: str = "none") -> int:
    """`--task NAME` (a benchmark) or `--data FILE` (any supported data layout, `run_data_eval`)."""
    import torch

    from nanovlm.eval import easyvqa
    from nanovlm.fileio import atomic_write_json
    from nanovlm.models.quantization import check_quantize
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import default_device, pick_dtype
    from nanovlm.weights.nanovlm import checkpoint_directory

    check_quantize(quantize)
    if task is not None and data is not None:
        raise ValueError("give --task or --data, not both: --task scores a benchmark, --data your own questions.")
    if task is None and data is None:
        raise ValueError(f"give --task NAME (one of: {', '.join(TASKS)}) or --data FILE (your own questions); "
                         "see nanovlm eval --help.")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}, or give --data FILE.")
    if task is not None and split is not None and split not in TASK_SPLITS[task]:
        raise ValueError(f"--split {split!r} is not a split of {task}; choose one of: {', '.join(TASK_SPLITS[task])}.")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: every question), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    model_dir = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    if data is not None:
        return run_data_eval(model_dir, data, image_folder=image_folder, split=split or "train", limit=limit,
                             batch_size=batch_size, out=out, precision=precision, quantize=quantize)
    if image_folder is not None:
        raise ValueError("--image-folder goes with --data (where a LLaVA file's image paths start), not --task.")
    split = split or "test"
    device = default_device()
    # Weights stay fp32; bf16 autocast where the hardware has fast bf16 matmuls.
    model = VisionLanguageModel.from_pretrained(model_dir, device=device, require_tokenizer=True, quantize=quantize)
    dtype = pick_dtype(precision, device)
    report = easyvqa.evaluate(model, split=split, limit=limit, batch_size=batch_size,
                              autocast_dtype=dtype if dtype != torch.float32 else None, progress=True)
    report["model"] = os.path.abspath(model_dir)
    report["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    report["quantize"] = model.decoder.quantization
    out = out or default_report_path(model_dir, task, split, limit)
    atomic_write_json(out, report)
    print(easyvqa.format_report(report))
    print(easyvqa.format_examples(report))
    print(f"{report['n']} questions in {report['wall_time_s']:.1f} s ({report['questions_per_s']} questions/s); "
          f"report written to {out}")
    return 0


def run_data_eval(model_dir: str, data: str, *, image_folder: str | None = None, split: str = "train",
                  limit: int = 0, batch_size: int = 64, out: str | None = None, precision: str = "auto",
                  quantize: str = "none") -> int:
    """`nanovlm eval --data FILE`: every (question, answer) turn of FILE, exact match after VQA
    normalisation (`nanovlm.eval.vqa`); the report goes to `out`, by default
    `default_data_report_path` in the current directory (never into the model's folder)."""
    import torch

    from nanovlm.data.datasets import DataError, SkipCounter
    from nanovlm.eval import vqa
    from nanovlm.fileio import atomic_write_json
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import default_device, pick_dtype

    # The data first: a wrong path should not wait for the model to load.
    skips = SkipCounter()
    items = vqa.qa_items(data, image_folder=image_folder, split=split, limit=limit, skips=skips)
    if not items:
        first = next(iter(skips.examples.values()), "")
        raise DataError(f"{data} holds no question with an answer that can be read"
                        + (f" ({skips.summary()}; first: {first.rstrip('.')})." if first else "."))
    paths = {s for it in items for s in it["images"] if isinstance(s, str)}
    if paths and not any(os.path.isfile(p) for p in paths):  # before the model loads: a wrong folder
        raise DataError(f"none of the {len(paths)} image files that {data} names exists (the first: "
                        f"{min(paths)}); check the image paths, or give --image-folder.")
    device = default_device()
    model = VisionLanguageModel.from_pretrained(model_dir, device=device, require_tokenizer=True, quantize=quantize)
    dtype = pick_dtype(precision, device)
    report = vqa.evaluate(model, items, batch_size=batch_size, progress=True,
                          autocast_dtype=dtype if dtype != torch.float32 else None)
    if report["n"] == 0:
        first = next(iter(report["skip_examples"].values()), "")
        raise DataError(f"none of the {len(items)} questions' images could be read (first: {first.rstrip('.')}); "
                        "check the image paths, or give --image-folder.")
    report = {"data": data, "split": split, "limit": limit, "model": os.path.abspath(model_dir),
              "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "quantize": model.decoder.quantization,
              "records_skipped": skips.as_dict(), **report}
    out = out or default_data_report_path(data, limit)
    atomic_write_json(out, report)
    print(vqa.format_report(report))
    if skips.total:
        print(f"  {skips.summary()} (records that could not be read)")
    print(f"{len(items)} questions in {report['wall_time_s']:.1f} s ({report['questions_per_s']} questions/s); "
          f"report written to {out}")
    return 0


def default_data_report_path(data: str, limit: int = 0) -> str:
    """`eval_<data stem>[_limit<N>].json` in the current directory: not inside the model's folder
    (which may be read-only or shared), and a `--limit` run never replaces a full run's report."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(os.path.expanduser(data))))[0] or "data"
    return f"eval_{stem}" + (f"_limit{limit}" if limit else "") + ".json"


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
