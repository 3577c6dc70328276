"""Question answering on any data: exact match after VQA normalisation, with breakdowns.

Knows no dataset. `qa_items` reads the records of every layout training reads (Cauldron
parquet / arrow / `save_to_disk`, LLaVA `.json` / `.jsonl`, through `nanovlm.data.datasets`)
and turns each (question, answer) turn into one item, asked on its own with its record's
images. `evaluate` answers the items through `model.answer` (the one-call path users have) in
batches and scores them: `nanovlm eval --data FILE` and the training loop's validation both
use it. Scoring is exact match of `normalize_answer(prediction)` against
`normalize_answer(reference)`, the usual simplification of the VQA challenge's answer
normalisation (Antol et al. 2015, the official `vqaEval.py`): one reference per question, no
ten-annotator soft score, no contraction table.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

ANSWER_TYPES = ("yes/no", "number", "other")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
IMAGE_PLACEHOLDER = "<image>"

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")  # 3.5 keeps its point
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _is_punctuation(ch: str) -> bool:
    # Unicode punctuation (P*) and symbols (S*: $ % + = < > ^ ` | ~ ° ...), in any script.
    return unicodedata.category(ch)[0] in "PS"


def normalize_answer(text: Any) -> str:
    """An answer reduced to what exact match should compare, in this order:

    1. lower case (Unicode `casefold`), surrounding whitespace dropped;
    2. a comma between digits removed (`1,000` -> `1000`); a point between digits kept (`3.5`);
    3. apostrophes removed (`dog's` -> `dogs`, `don't` -> `dont`); every other punctuation mark
       or symbol (Unicode categories P and S: `.,;:!?"()[]{}-/\\*#$%&+=<>@^_|~` ...) becomes a
       space (`t-shirt` -> `t shirt`, `yes.` -> `yes`);
    4. the articles a, an, the dropped, unless nothing else is left (`A` stays `a`, so
       multiple-choice letters still compare);
    5. the number words zero to twenty written as digits (`Two` -> `2`);
    6. whitespace collapsed to single spaces.

    Not a string (None, a number) -> its `str`, so a stray value never crashes a report.
    """
    text = ("" if text is None else str(text)).casefold().strip()
    text = _DIGIT_COMMA.sub("", text)
    text = _DECIMAL_POINT.sub("\0", text)  # shelter decimal points from the punctuation pass
    text = "".join("" if ch in "'\u2019" else " " if _is_punctuation(ch) else ch for ch in text)
    words = text.replace("\0", ".").split()
    kept = [w for w in words if w not in ARTICLES] or words
    return " ".join(NUMBER_WORDS.get(w, w) for w in kept)


def answer_type(reference: str) -> str:
    """The VQA answer type of a reference: yes/no, number (digits or a number word), or other."""
    norm = normalize_answer(reference)
    if norm in ("yes", "no"):
        return "yes/no"
    return "number" if _NUMBER.fullmatch(norm) else "other"


def question_key(question: str) -> str:
    """What makes two questions 'the same question' in the per-question breakdown: lower case,
    whitespace collapsed, final punctuation dropped (`What colour is it? ` == `what colour is it`)."""
    return " ".join(question.casefold().split()).rstrip(" ?.!")


# ---------------------------------------------------------------------------------- items
def qa_items(data: Any, image_folder: str | None = None, split: str = "train", indices: Sequence[int] | None = None,
             limit: int = 0, *, skips=None) -> list[dict[str, Any]]:
    """One item per (question, answer) turn of the records of `data`:
    `{"id", "images": [image sources], "question", "answer"}`.

    data: a local data path in any layout training reads (see `nanovlm.data.datasets`), or
    records already opened (`open_records`' result, a list of dicts). LLaVA image paths are
    relative to `image_folder`, default the data file's folder; items hold them as absolute
    paths, Cauldron images as their stored `{bytes, path}` dicts. Every turn is asked alone
    with all of its record's images; `<image>` placeholders are removed from the question.
    indices: the records to read, in that order (the training loop's held-out records); None:
    all. limit: at most this many items (0: all). A record that cannot be read (broken JSON, no
    answer, a non-string text) is left out; `skips` (a `SkipCounter`), when given, counts it.
    Raises `DataError` for a missing, unreadable or unknown-layout source.
    """
    from nanovlm.data.datasets import DataError, SampleError, _check_layout, open_records, record_to_chat

    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: every question), got {limit}.")
    if isinstance(data, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(data))
        if not os.path.exists(path):
            raise DataError(f"data file {data} does not exist.")
        records = open_records(path, split)
        name = os.path.basename(os.path.normpath(path))
        base_dir = image_folder or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        _check_layout(records, name)
    else:
        records, name, base_dir = data, getattr(data, "name", "records"), image_folder
    if image_folder is not None and not os.path.isdir(image_folder):
        raise DataError(f"image folder {image_folder} does not exist.")
    order = range(len(records)) if indices is None else indices
    items: list[dict[str, Any]] = []
    for i in order:
        try:
            images, messages, _ = record_to_chat(records[int(i)])
            turns = _turns(messages)
        except SampleError as e:
            if skips is not None:
                skips.skip(e.reason, e.detail, f"{name}[{i}]")
            continue
        sources = [_resolve(s, base_dir) for s in images]
        for t, (question, answer) in enumerate(turns):
            items.append({"id": f"{name}[{i}]#{t}", "images": sources, "question": question, "answer": answer})
            if limit and len(items) >= limit:
                return items
    return items


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) pairs: each assistant message with the user message just before it."""
    from nanovlm.data.datasets import SampleError

    pairs, question = [], None
    for m in messages:
        content = m.get("content")
        if m["role"] == "system":
            continue
        if not isinstance(content, str):
            raise SampleError("non_string_text", f"a {m['role']} text is {type(content).__name__}, not a string.")
        if m["role"] == "user":
            # As a user asks it through `answer` (the images come first there); the text keeps its lines.
            question = content.replace(IMAGE_PLACEHOLDER, "").strip()
        elif question is not None and content.strip():
            pairs.append((question, content.strip()))
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


# ---------------------------------------------------------------------------------- images
def _image_key(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    data = source.get("bytes") if isinstance(source, dict) else source
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha1(bytes(data)).hexdigest()  # equal images in two records decode once
    return id(source)  # a PIL image, kept alive by its item


def _image_name(source: Any) -> str | None:
    """How the report names an image: its path, or None for images held as bytes."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        return source["path"]
    return getattr(source, "filename", None) or None


class _Images:
    """Each distinct image decoded once, and let go after its last question (records keep
    their questions together, so the cache holds about one record's images at a time)."""

    def __init__(self, items: Sequence[dict[str, Any]], max_pixels: int | None = None):
        from nanovlm.data.images import DEFAULT_MAX_PIXELS

        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self._keys: dict[int, Any] = {}  # id(source) -> key: a record's bytes are hashed once
        self.uses = Counter(self.key(s) for it in items for s in it["images"])
        self.cache: dict[Any, Any] = {}
        self.decoded = 0

    def key(self, source: Any) -> Any:
        k = self._keys.get(id(source))  # the items keep every source alive: ids stay unique
        if k is None:
            k = self._keys[id(source)] = _image_key(source)
        return k

    def get(self, sources: Sequence[Any]) -> list[Any]:
        """The item's PIL images; an ImageError for one that cannot be read."""
        from nanovlm.data.images import ImageError, load_image

        out = []
        for s in sources:
            key = self.key(s)
            img = self.cache.get(key)
            if img is None:
                try:
                    img = load_image(s, max_pixels=self.max_pixels)
                    self.decoded += 1
                except ImageError as e:
                    img = e  # remembered too: the record's other questions do not try again
                self.cache[key] = img
            if isinstance(img, ImageError):
                raise img
            out.append(img)
        return out

    def done(self, sources: Sequence[Any]) -> None:
        for s in sources:
            key = self.key(s)
            self.uses[key] -= 1
            if self.uses[key] <= 0:
                self.cache.pop(key, None)


# ---------------------------------------------------------------------------------- evaluation
def answer_budget(model, items: Sequence[dict[str, Any]], margin: int = 4, cap: int = 256) -> int:
    """New tokens enough for the longest reference plus `margin`: a prediction cut off at the
    budget is longer than every reference, so the cut never makes a wrong answer match."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not items:
        return 32
    longest = max(len(tok.encode(it["answer"])) for it in items)
    return max(1, min(cap, longest + margin))


def predict(model, items: Sequence[dict[str, Any]], batch_size: int = 64, max_new_tokens: int | None = None,
            autocast_dtype=None, on_batch: Callable[[int], None] | None = None,
            images: _Images | None = None) -> list[str | dict[str, str]]:
    """Greedy answers for `items`, in order; an item whose image cannot be read gets
    `{"skip": reason, "error": message}` instead of an answer."""
    import torch

    from nanovlm.data.images import ImageError

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}.")
    if max_new_tokens is None:
        max_new_tokens = answer_budget(model, items)
    images = images or _Images(items)
    device = getattr(model, "device", None)
    device_type = device.type if isinstance(device, torch.device) else "cpu"
    use_autocast = autocast_dtype not in (None, torch.float32)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out: list[str | dict[str, str]] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            answerable, entries, results = [], [], [None] * len(chunk)
            for j, it in enumerate(chunk):
                try:
                    pil = images.get(it["images"])
                except ImageError as e:
                    results[j] = {"skip": e.reason, "error": str(e)}
                else:
                    answerable.append(j)
                    entries.append(pil or None)
                images.done(it["images"])  # the entry above keeps this batch's images alive
            if answerable:
                with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                                     enabled=use_autocast):
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
    by_type = {t: [0, 0] for t in ANSWER_TYPES}
    by_question: dict[str, list[int]] = {}
    skipped: Counter[str] = Counter()
    skip_examples: dict[str, str] = {}
    rows, correct, n = [], 0, 0
    for it, pred in zip(items, predictions):
        row = {"id": it["id"], "question": it["question"], "reference": it["answer"],
               "images": [_image_name(s) for s in it["images"]]}
        if isinstance(pred, dict):  # an image that could not be read: not scored
            skipped[pred["skip"]] += 1
            skip_examples.setdefault(pred["skip"], f"{it['id']}: {pred['error']}")
            rows.append({**row, "prediction": None, "correct": None, "skipped": pred["skip"]})
            continue
        kind = answer_type(it["answer"])
        ok = normalize_answer(pred) == normalize_answer(it["answer"])
        n += 1
        correct += ok
        by_type[kind][0] += ok
        by_type[kind][1] += 1
        entry = by_question.setdefault(question_key(it["question"]), [0, 0])
        entry[0] += ok
        entry[1] += 1
        rows.append({**row, "prediction": pred, "correct": ok, "type": kind})
    repeated = sorted(((q, c) for q, c in by_question.items() if c[1] >= 2), key=lambda qc: (-qc[1][1], qc[0]))
    return {"accuracy": correct / n if n else None, "n": n, "correct": correct,
            "per_type": {t: _rate(*c) for t, c in by_type.items()},
            "per_question": {q: _rate(*c) for q, c in repeated},
            "skipped": dict(sorted(skipped.items())), "skip_examples": skip_examples, "items": rows}


def merge_shards(preds: list, n: int, world_size: int, gather: Callable[[Any], list] | None) -> list:
    """Each rank answered items rank::world_size; all of them back in item order, on every rank."""
    if world_size <= 1:
        return preds
    shards = gather(preds) if gather is not None else [preds]
    merged = [None] * n
    for r, shard in enumerate(shards):
        merged[r::world_size] = shard
    return merged


def evaluate(model, items: Sequence[dict[str, Any]], batch_size: int = 64, max_new_tokens: int | None = None,
             progress: bool = False, *, rank: int = 0, world_size: int = 1,
             gather: Callable[[Any], list] | None = None, autocast_dtype=None) -> dict[str, Any]:
    """Answer `items` (from `qa_items`) with `model.answer` and score them.

    The report: `accuracy` (exact match after `normalize_answer`; None when nothing was
    scored), `n` and `correct` (scored items), `per_type` (yes/no, number, other: n, correct,
    accuracy, by the reference's `answer_type`), `per_question` (`question_key` -> n, correct,
    accuracy, for questions asked at least twice, most asked first), `skipped` (items whose
    image could not be read, by reason, with `skip_examples`), `items` (each with id, question,
    prediction, reference, correct, type, images), `max_new_tokens`, `images_decoded`,
    `wall_time_s`, `questions_per_s`.

    max_new_tokens: None picks `answer_budget` (the longest reference plus a margin). With
    several processes, each answers items rank::world_size and `gather` (an all-gather of
    Python objects) brings the answers together; every rank gets the same report.
    """
    items = list(items)
    if max_new_tokens is None:
        max_new_tokens = answer_budget(model, items)  # from all items: every rank the same
    mine = items[rank::world_size]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="eval", unit="q", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    images = _Images(mine)
    try:
        preds = predict(model, mine, batch_size, max_new_tokens, autocast_dtype,
                        on_batch=bar.update if bar is not None else None, images=images)
    finally:
        if bar is not None:
            bar.close()
    preds = merge_shards(preds, len(items), world_size, gather)
    report = score(items, preds)
    wall = time.perf_counter() - t0
    report.update({"max_new_tokens": max_new_tokens, "images_decoded": images.decoded,
                   "wall_time_s": round(wall, 3),
                   "questions_per_s": round(len(items) / wall, 2) if wall > 0 else None})
    return report


# ---------------------------------------------------------------------------------- printing
def _percent(entry: dict[str, Any]) -> str:
    return f"{100 * entry['accuracy']:.2f}% ({entry['correct']}/{entry['n']})"


def format_report(report: dict[str, Any], title: str | None = None, max_questions: int = 10) -> str:
    """A few lines for the terminal: the accuracy as a percentage, then the breakdowns."""
    title = title or report.get("data") or "eval"
    if report["accuracy"] is None:
        lines = [f"{title}: no question could be scored"]
    else:
        lines = [f"{title}: accuracy {_percent(report)} exact match after VQA normalisation"]
    types = " | ".join(f"{t} {_percent(e)}" for t, e in report["per_type"].items() if e["n"])
    if types:
        lines.append(f"  by answer type: {types}")
    asked = report["per_question"]
    if asked:
        shown = list(asked.items())[:max_questions]
        more = f", the {len(shown)} most asked" if len(asked) > len(shown) else ""
        lines.append(f"  by question ({len(asked)} asked more than once{more}):")
        lines += [f"    {_percent(e):>20}  {q}" for q, e in shown]
    if report.get("skipped"):
        parts = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items())
        first = next(iter(report["skip_examples"].values()), "")
        lines.append(f"  skipped {sum(report['skipped'].values())} question(s) whose images could not be read "
                     f"({parts}); first: {first}")
    return "\n".join(lines)
