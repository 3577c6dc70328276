"""Question answering on any data: exact match after VQA normalisation (the VQA challenge's
`vqaEval.py` simplified: one reference, no soft score), broken down by a record's `answer_type`
(else the reference's). Each turn is asked alone with its record's images, through `model.answer`.
"""

from __future__ import annotations

import os
import re
import time
import unicodedata
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from nanovlm.data.datasets import SkipCounter
from nanovlm.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from nanovlm.data.processors import IMAGE_PLACEHOLDER
from nanovlm.data.records import Records, SampleError, open_records, record_to_chat, source_key

ANSWER_TYPES = ("yes/no", "number", "other")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")  # 3.5 keeps its point
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def normalize_answer(text: Any) -> str:
    """What exact match compares: casefolded and trimmed; a comma between digits removed, a point
    kept; apostrophes dropped and other punctuation and symbols (Unicode P*, S*) spaces; a, an,
    the dropped unless nothing else is left; zero to twenty as digits; whitespace collapsed."""
    text = ("" if text is None else str(text)).casefold().strip()
    text = _DECIMAL_POINT.sub("\0", _DIGIT_COMMA.sub("", text))  # shelter decimal points from the next pass
    text = "".join("" if ch in "'\u2019" else " " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    words = text.replace("\0", ".").split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in [w for w in words if w not in ARTICLES] or words)


def answer_type(reference: str) -> str:
    """The VQA answer type of a reference: yes/no, number (digits or a number word), or other."""
    norm = normalize_answer(reference)
    return "yes/no" if norm in ("yes", "no") else "number" if _NUMBER.fullmatch(norm) else "other"


def question_key(question: str) -> str:
    """Lower case, whitespace collapsed, final punctuation dropped: `What colour is it? ` == `what colour is it`."""
    return " ".join(question.casefold().split()).rstrip(" ?.!")


def qa_items(data: str | Records, image_folder: str | None = None, split: str = "train",
             indices: Sequence[int] | None = None, limit: int = 0, *, skips: SkipCounter | None = None
             ) -> list[dict[str, Any]]:
    """`{"id", "images", "question", "answer", "type"}` per turn of the records `indices` (None: all)
    of `split` of `data`, at most `limit` (0: all); unreadable records are counted in `skips`."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: every question), got {limit}.")
    records = data if isinstance(data, Records) else open_records(data, split, image_folder)
    items: list[dict[str, Any]] = []
    for i in range(len(records)) if indices is None else indices:
        try:
            images, messages, _ = record_to_chat(records[int(i)])
            turns = _turns(messages)
        except SampleError as e:
            if skips is not None:
                skips.skip(e.reason, e.detail, records.where(int(i)))
            continue
        sources = [_resolve(s, image_folder or records.base_dir) for s in images]
        for t, (question, answer, kind) in enumerate(turns):
            items.append({"id": f"{records.where(int(i))} q{t + 1}", "images": sources, "question": question,
                          "answer": answer, "type": kind, "source": records.source_of(int(i))})
            if limit and len(items) >= limit:
                return items
    return items


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(question, answer, answer type): each assistant message with the user message before it."""
    pairs, question = [], None
    for m in messages:
        content = m.get("content")
        if m["role"] == "system":
            continue
        if not isinstance(content, str):
            raise SampleError("non_string_text", f"a {m['role']} text is {type(content).__name__}, not a string.")
        if m["role"] == "user":  # asked as `answer` asks it: the images first; the text keeps its lines
            question = content.replace(IMAGE_PLACEHOLDER, "").strip()
        elif question is not None and content.strip():
            pairs.append((question, content.strip(), m.get("answer_type")))
            question = None
    if not pairs:
        raise SampleError("empty_text", "the record has no question with an answer.")
    return pairs


def _resolve(source: Any, base_dir: str | None) -> Any:
    """A relative image path (alone or in a `{bytes: None, path}` dict) joined to `base_dir`."""
    if isinstance(source, dict) and not source.get("bytes") and source.get("path"):
        source = source["path"]
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        return os.path.abspath(os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path)
    return source


class _Images:
    """The previous item's images are kept: a record's questions come together (decoded once)."""

    def __init__(self):
        self.last: tuple[list, list] = ([], [])
        self.decoded = 0

    def get(self, sources: Sequence[Any]) -> list[Any]:
        keys = [source_key(s) or id(s) for s in sources]
        if keys != self.last[0]:
            kept = dict(zip(*self.last))
            self.last = (keys, [kept[k] if k in kept else self._load(s) for k, s in zip(keys, sources)])
        for image in self.last[1]:
            if isinstance(image, ImageError):
                raise image
        return list(self.last[1])

    def _load(self, source: Any) -> Any:
        try:
            image = load_image(source, max_pixels=DEFAULT_MAX_PIXELS)
            self.decoded += 1
            return image
        except ImageError as e:
            return e


def answer_budget(model, items: Sequence[dict[str, Any]], margin: int = 4, cap: int = 256) -> int:
    """New tokens for the longest reference plus `margin`: a prediction cut at the budget is
    longer than every reference, so the cut never makes a wrong answer match."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not items:
        return 32
    return max(1, min(cap, max(len(tok.encode(it["answer"])) for it in items) + margin))


def predict(model, items: Sequence[dict[str, Any]], batch_size: int = 64, max_new_tokens: int | None = None,
            autocast_dtype=None, on_batch: Callable[[int], None] | None = None,
            images: _Images | None = None) -> list[str | dict[str, str]]:
    """Greedy answers for `items`; an unreadable image's item gets `{"skip": reason, "error": message}`."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}.")
    max_new_tokens = max_new_tokens or answer_budget(model, items)
    images = images or _Images()
    device = getattr(model, "device", None)
    device_type = device.type if isinstance(device, torch.device) else "cpu"
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out: list[str | dict[str, str]] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results: list = [None] * len(chunk)
            answerable, entries = [], []
            for j, it in enumerate(chunk):
                try:
                    entries.append(images.get(it["images"]) or None)
                    answerable.append(j)
                except ImageError as e:
                    results[j] = {"skip": e.reason, "error": str(e)}
            if answerable:
                with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                                     enabled=autocast_dtype not in (None, torch.float32)):
                    answers = model.answer(entries, [chunk[j]["question"] for j in answerable],
                                           max_new_tokens=max_new_tokens, greedy=True, batch_size=len(answerable))
                for j, a in zip(answerable, answers):
                    results[j] = a
            out.extend(results)
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return out


def _rate(correct: int, n: int) -> dict[str, Any]:
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None}


def score(items: Sequence[dict[str, Any]], predictions: Sequence[str | dict[str, str]]) -> dict[str, Any]:
    """The report without timing: accuracy, breakdowns, and every item (see `evaluate`)."""
    by_type = {t: [0, 0] for t in ANSWER_TYPES} if any(it.get("type") is None for it in items) else {}
    by_question: dict[str, list[int]] = {}
    by_source: dict[str, list[int]] = {}
    rows, correct, n, skips = [], 0, 0, SkipCounter()
    for it, pred in zip(items, predictions):
        row = {"id": it["id"], "question": it["question"], "reference": it["answer"],
               "images": [s if isinstance(s, str) else s.get("path") if isinstance(s, dict) else
                          getattr(s, "filename", None) or None for s in it["images"]]}
        if isinstance(pred, dict):  # an image that could not be read: not scored
            skips.skip(pred["skip"], pred["error"], it["id"])
            rows.append({**row, "prediction": None, "correct": None, "skipped": pred["skip"]})
            continue
        kind, ok = it.get("type") or answer_type(it["answer"]), normalize_answer(pred) == normalize_answer(it["answer"])
        n, correct = n + 1, correct + ok
        for entry in (by_type.setdefault(kind, [0, 0]), by_question.setdefault(question_key(it["question"]), [0, 0]),
                      by_source.setdefault(it.get("source") or "", [0, 0])):
            entry[0] += ok
            entry[1] += 1
        rows.append({**row, "prediction": pred, "correct": ok, "type": kind})
    repeated = sorted(((q, c) for q, c in by_question.items() if c[1] >= 2), key=lambda qc: (-qc[1][1], qc[0]))
    return {"accuracy": correct / n if n else None, "n": n, "correct": correct,
            "per_type": {t: _rate(*c) for t, c in by_type.items()}, "per_question": {q: _rate(*c) for q, c in repeated},
            "per_source": {s: _rate(*c) for s, c in by_source.items()} if len(by_source) > 1 else {},
            "skipped": skips.as_dict(), "skip_examples": dict(skips.examples), "items": rows}


def evaluate(model, items: Sequence[dict[str, Any]], batch_size: int = 64, max_new_tokens: int | None = None,
             progress: bool = False, *, rank: int = 0, world_size: int = 1,
             gather: Callable[[Any], list] | None = None, autocast_dtype=None) -> dict[str, Any]:
    """`score`'s report plus timing; each rank answers items rank::world_size, `gather` all-gathers them."""
    items = list(items)
    max_new_tokens = max_new_tokens or answer_budget(model, items)  # from all items: every rank the same
    mine = items[rank::world_size]
    bar = tqdm(total=len(mine), desc="eval", unit="q", leave=False, dynamic_ncols=True) if progress else None
    t0 = time.perf_counter()
    images = _Images()
    try:
        preds = predict(model, mine, batch_size, max_new_tokens, autocast_dtype,
                        on_batch=bar.update if bar is not None else None, images=images)
    finally:
        if bar is not None:
            bar.close()
    if world_size > 1:  # each rank answered items rank::world_size: all of them back in order, on every rank
        merged = [None] * len(items)
        for r, shard in enumerate(gather(preds) if gather is not None else [preds]):
            merged[r::world_size] = shard
        preds = merged
    report = score(items, preds)
    wall = time.perf_counter() - t0
    return {**report, "max_new_tokens": max_new_tokens, "images_decoded": images.decoded, "wall_time_s": round(wall, 3),
            "questions_per_s": round(len(items) / wall, 2) if wall > 0 else None}


def format_report(report: dict[str, Any], title: str | None = None, max_questions: int = 10) -> str:
    """A few lines for the terminal: the accuracy as a percentage, then the breakdowns."""
    def percent(e: dict[str, Any]) -> str:
        return f"{100 * e['accuracy']:.2f}% ({e['correct']}/{e['n']})"

    title = title or report.get("data") or "eval"
    lines = [f"{title}: no question could be scored" if report["accuracy"] is None else
             f"{title}: accuracy {percent(report)} exact match after VQA normalisation"]
    types = " | ".join(f"{t} {percent(e)}" for t, e in report["per_type"].items() if e["n"])
    lines += [f"  by answer type: {types}"] if types else []
    lines += ["  by source: " + " | ".join(f"{s} {percent(e)}" for s, e in report.get("per_source", {}).items()
                                            if e["n"])] if report.get("per_source") else []
    asked = report["per_question"]
    if asked:
        shown = list(asked.items())[:max_questions]
        more = f", the {len(shown)} most asked" if len(asked) > len(shown) else ""
        lines.append(f"  by question ({len(asked)} asked more than once{more}):")
        lines += [f"    {percent(e):>20}  {q}" for q, e in shown]
    if report.get("skipped"):
        parts = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items())
        first = next(iter(report["skip_examples"].values()), "")
        lines.append(f"  skipped {sum(report['skipped'].values())} question(s) whose images could not be read "
                     f"({parts}); first: {first}")
    return "\n".join(lines)
