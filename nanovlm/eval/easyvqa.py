"""easy-VQA: exact-match accuracy, overall and per question type, through batched generation.

The questions come from the packaged `easy_vqa` data (train: 38,575 questions on 4,000 images;
test: 9,673 on 1,000). A question's type follows from its answer: a shape (circle, rectangle,
triangle), a colour, or yes/no. Prompts are built exactly as `model.answer` builds them (the
image string, the question, the chat template, left padding), answers are decoded greedily and
compared after lower-casing and trimming spaces and a final full stop.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

TYPES = ("shape", "color", "yes/no")
SHAPES = frozenset({"circle", "rectangle", "triangle"})
SPLITS = ("train", "test")


def question_type(answer: str) -> str:
    answer = normalize(answer)
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def load_questions(split: str = "test", limit: int = 0) -> list[dict[str, Any]]:
    """The split's questions in the dataset's order: question, answer, type, image path."""
    from nanovlm.data.easyvqa import easyvqa_questions

    if split not in SPLITS:
        raise ValueError(f"easy-VQA has splits {', '.join(SPLITS)}, not {split!r}.")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: every question), got {limit}.")
    items = [{"question": q, "answer": a, "type": question_type(a), "image": path}
             for path, q, a, _ in easyvqa_questions(split)]
    return items[:limit] if limit else items


class _ImageCache:
    """Each image decoded once: a question set asks about each image about ten times."""

    def __init__(self):
        self._images: dict[str, Any] = {}

    def __call__(self, path: str):
        img = self._images.get(path)
        if img is None:
            from nanovlm.data.images import load_image

            img = self._images[path] = load_image(path)
        return img


@torch.no_grad()
def predict(model, items: list[dict[str, Any]], batch_size: int = 64, max_new_tokens: int = 8,
            autocast_dtype: torch.dtype | None = None,
            on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers for `items` (dicts with `question` and `image`), in order."""
    from nanovlm.generation import build_prompts, decode_until_eos, generate

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}.")
    images = _ImageCache()
    device = model.device
    tok = model.tokenizer
    eos = model.cfg.lm_eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids, mask, tiles = build_prompts(model, [images(it["image"]) for it in chunk],
                                             [it["question"] for it in chunk])
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype not in (None, torch.float32)):
                new = generate(model, ids, tiles, mask, max_new_tokens=max_new_tokens, greedy=True)
            out.extend(decode_until_eos(tok, row, eos) for row in new.tolist())
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return out


def score(items: list[dict[str, Any]], predictions: list[str], n_examples: int = 8) -> dict[str, Any]:
    """Accuracy overall and per type, with the first `n_examples` answered questions."""
    per_type = {t: {"n": 0, "correct": 0} for t in TYPES}
    correct = 0
    for it, pred in zip(items, predictions):
        ok = normalize(pred) == normalize(it["answer"])
        correct += ok
        per_type[it["type"]]["n"] += 1
        per_type[it["type"]]["correct"] += ok
    for entry in per_type.values():
        entry["accuracy"] = entry["correct"] / entry["n"] if entry["n"] else None
    n = len(items)
    examples = [{"question": it["question"], "answer": it["answer"], "prediction": pred,
                 "correct": normalize(pred) == normalize(it["answer"]), "type": it["type"], "image": it["image"]}
                for it, pred in list(zip(items, predictions))[:n_examples]]
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "per_type": per_type,
            "examples": examples}


def evaluate(model, split: str = "test", limit: int = 0, batch_size: int = 64, *, rank: int = 0,
             world_size: int = 1, gather: Callable[[Any], list] | None = None,
             autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, Any]:
    """Score `model` on the first `limit` questions of `split` (0: all).

    With several processes, each answers questions rank::world_size and `gather` (an all-gather
    of Python objects) brings the answers together; every rank gets the same report."""
    items = load_questions(split, limit)
    mine = items[rank::world_size]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"easyvqa {split}", unit="q", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        preds = predict(model, mine, batch_size, autocast_dtype=autocast_dtype,
                        on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    from nanovlm.eval.vqa import merge_shards

    preds = merge_shards(preds, len(items), world_size, gather)
    report = score(items, preds)
    wall = time.perf_counter() - t0
    report.update({"task": "easyvqa", "split": split, "wall_time_s": round(wall, 3),
                   "questions_per_s": round(len(items) / wall, 2) if wall > 0 else None})
    return report


def format_report(report: dict[str, Any]) -> str:
    types = " | ".join(f"{t} {100 * e['accuracy']:.2f}% ({e['correct']}/{e['n']})"
                       for t, e in report["per_type"].items() if e["n"])
    return (f"easyvqa {report['split']}: accuracy {100 * report['accuracy']:.2f}% "
            f"({report['correct']}/{report['n']}) | {types}")


def format_examples(report: dict[str, Any], n: int = 5) -> str:
    lines = []
    for ex in report["examples"][:n]:
        mark = "ok " if ex["correct"] else "XX "
        lines.append(f"  {mark}Q: {ex['question']}  A: {ex['prediction']!r}  (expected {ex['answer']!r})")
    return "\n".join(lines)
