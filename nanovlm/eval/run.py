"""`nanovlm eval`: load a checkpoint, score it on a split of any data, print the accuracy and
write a JSON report. `--task NAME` names packaged data (easyvqa), `--data` any other source; the
split is the source's test split where it has one, else its train split (a single file)."""

from __future__ import annotations

import os

import torch

from nanovlm.data.datasets import SkipCounter
from nanovlm.data.records import PACKAGED, PACKAGED_NAMES, DataError, mixture_sources, splits
from nanovlm.eval import vqa
from nanovlm.fileio import atomic_write_json
from nanovlm.models.quantization import check_quantize
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.runtime import default_device, pick_dtype
from nanovlm.weights.nanovlm import checkpoint_directory


def run_eval(model_dir: str, task: str | None = None, split: str | None = None, limit: int = 0, batch_size: int = 64,
             out: str | None = None, precision: str = "auto", *, data: str | None = None,
             image_folder: str | None = None, quantize: str = "none") -> int:
    check_quantize(quantize)
    if task is not None and data is not None:
        raise ValueError("give --task or --data, not both: --task scores a benchmark, --data your own questions.")
    if task is None and data is None:
        raise ValueError(f"give --task NAME (one of: {', '.join(PACKAGED_NAMES)}) or --data FILE (your own questions); "
                         "see nanovlm eval --help.")
    if task is not None and task not in PACKAGED:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(PACKAGED_NAMES)}, or give --data FILE.")
    if task is not None and image_folder is not None:
        raise ValueError("--image-folder goes with --data (where a LLaVA file's image paths start), not --task.")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: every question), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    source = task or data
    have = splits(source)
    if split is not None and split not in have:
        raise ValueError(f"--split {split!r} is not a split of {source}; choose one of: {', '.join(have)}.")
    split = split or ("test" if "test" in have else "train")
    model_dir = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    # The data first: a wrong path should not wait for the model to load.
    skips = SkipCounter()
    items = vqa.qa_items(source, image_folder, split, limit=limit, skips=skips)
    if not items:
        first = next(iter(skips.examples.values()), "")
        raise DataError(f"{source} holds no question with an answer that can be read"
                        + (f" ({skips.summary()}; first: {first.rstrip('.')})." if first else "."))
    paths = {s for it in items for s in it["images"] if isinstance(s, str)}
    if paths and not any(os.path.isfile(p) for p in paths):  # a wrong folder
        raise DataError(f"none of the {len(paths)} image files that {source} names exists (the first: "
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
    named_split = split if len(have) > 1 else None
    report = {"data": source, "split": split, "limit": limit, "model": os.path.abspath(model_dir),
              "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "quantize": model.decoder.quantization,
              "records_skipped": skips.as_dict(), **report}
    replaced = out is not None and os.path.exists(out)
    out = out or free_name(default_report_path(model_dir, source, named_split, limit))
    atomic_write_json(out, report)
    print(vqa.format_report(report, title=" ".join(filter(None, [source, named_split]))))
    if skips.total:
        print(f"  {skips.summary()} (records that could not be read)")
    print(f"{len(items)} questions in {report['wall_time_s']:.1f} s ({report['questions_per_s']} questions/s); "
          f"report written to {out}" + (" (it replaced the one there)" if replaced else ""))
    return 0


def default_report_path(model: str, data: str, split: str | None, limit: int = 0) -> str:
    """`eval-<model>-<data>[-<split>][-first<N>].json` in the current directory, never inside the
    model's folder (it may be read-only or shared). <model> is the last two parts of its path
    (`runs/demo/final` -> `demo-final`); the split is named where the data has several."""
    def tail(path: str, n: int) -> str:
        path = os.path.abspath(path) if os.path.exists(path) else path
        return "-".join([p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".", "..")][-n:])

    stem = "+".join(os.path.splitext(tail(os.path.expanduser(d), 1))[0] for d in mixture_sources(data)) or "data"
    return "-".join(filter(None, ["eval", tail(model, 2) or "model", stem, split, f"first{limit}" if limit else ""])) \
        + ".json"


def free_name(path: str) -> str:
    """`path`, or `<stem>-2.json`, `-3`, ... where a report is there already: none is overwritten."""
    stem, ext = os.path.splitext(path)
    k = 2
    while os.path.exists(path):
        path, k = f"{stem}-{k}{ext}", k + 1
    return path
