"""Drawn datasets for tests and benchmarks: scenes and questions about them.

Not easy-VQA (one shape, its colour). Three families, chosen by the question kinds asked:
- shapes (`size` px squares): how many objects, where one is, how big, its fill pattern, the
  colour of one of several;
- charts (160x100 bar charts, a small letter under each bar; `reading_data.py`): the tallest bar's
  letter, how many bars, a named bar's colour, whether one bar is taller than another;
- text (numbers written at random sizes, places and colours beside a distractor shape, 128x96;
  a 3x2 table of numbers, 180x120): read the number, its colour, one cell of the table. With
  `held_out=True` every number is one that a `held_out=False` file never shows, so a model must read
  digits, not recall answers.
Written in the two layouts users bring: Cauldron parquet (`images` as PNG bytes + `texts`) and
LLaVA `.jsonl` (an image folder + `conversations`, one question per record when `one_per_record`).

`python tests/shapes_data.py OUT --layout parquet --kinds count,position --images 3000` writes one
(and a held-out test file beside it, `test.parquet` / `test.jsonl`, from other seeds).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random

from PIL import Image, ImageDraw

import reading_data

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("plain", "striped", "dotted")
NUMBER = {1: "1", 2: "2", 3: "3", 4: "4"}
KINDS = ("count", "position", "size", "pattern", "colour")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour, pattern: str) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    if pattern == "striped":
        for x in range(x0, x1, 4):
            draw.line([(x, y0), (x, y1)], fill=(255, 255, 255), width=1)
    elif pattern == "dotted":
        for x in range(x0 + 2, x1, 5):
            for y in range(y0 + 2, y1, 5):
                draw.point([(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)], fill=(255, 255, 255))


def _place(rng: random.Random, taken: list, size: int, side: int, region=None):
    """A box of `side` px that overlaps no taken box, inside `region` (x0, y0, x1, y1)."""
    x_lo, y_lo, x_hi, y_hi = region or (0, 0, size, size)
    for _ in range(200):
        x = rng.randint(x_lo + 1, max(x_lo + 1, x_hi - side - 1))
        y = rng.randint(y_lo + 1, max(y_lo + 1, y_hi - side - 1))
        box = (x, y, x + side, y + side)
        if all(box[2] + 2 < t[0] or t[2] + 2 < box[0] or box[3] + 2 < t[1] or t[3] + 2 < box[1] for t in taken):
            return box
    return None


def scene(rng: random.Random, kinds: list[str], size: int) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    """One picture and its (kind, question, answer) triples, one per kind."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    qa: list[tuple[str, str, str]] = []
    taken: list = []
    s = size / 96
    main_shape = rng.choice(SHAPES)
    main_colour = rng.choice(list(COLOURS))
    pattern = rng.choice(PATTERNS) if "pattern" in kinds else "plain"
    big = rng.random() < 0.5
    side = int((rng.randint(34, 40) if big else rng.randint(14, 18)) * s)
    region = None
    where = None
    if "position" in kinds:
        where = rng.choice(["top left", "top right", "bottom left", "bottom right"])
        half = size // 2
        region = (half if "right" in where else 0, half if "bottom" in where else 0,
                  size if "right" in where else half, size if "bottom" in where else half)
        side = min(side, half - 4)
    box = _place(rng, taken, size, side, region)
    taken.append(box)
    _draw(draw, main_shape, box, COLOURS[main_colour], pattern)
    # Other objects: shapes and colours unlike the main one, small and plain.
    n_count = rng.randint(1, 4) if "count" in kinds else 1
    others = [sh for sh in SHAPES if sh != main_shape]
    count_shape = rng.choice(others)
    extra = [(count_shape, rng.choice([c for c in COLOURS if c != main_colour])) for _ in range(n_count)] \
        if "count" in kinds else []
    if "colour" in kinds:
        extra.append((rng.choice([sh for sh in others if sh != count_shape] or others),
                      rng.choice([c for c in COLOURS if c != main_colour])))
    for shape, colour in extra:
        b = _place(rng, taken, size, int(rng.randint(12, 16) * s))
        if b is None:
            return scene(rng, kinds, size)  # crowded: draw another scene
        taken.append(b)
        _draw(draw, shape, b, COLOURS[colour], "plain")
    for kind in kinds:
        if kind == "count":
            qa.append((kind, f"How many {count_shape}s are there?", NUMBER[n_count]))
        elif kind == "position":
            qa.append((kind, f"Where is the {main_shape}?" if main_shape != count_shape else "Where is it?", where))
        elif kind == "size":
            qa.append((kind, f"Is the {main_colour} {main_shape} big or small?", "big" if big else "small"))
        elif kind == "pattern":
            qa.append((kind, f"What pattern does the {main_shape} have?", pattern))
        elif kind == "colour":
            qa.append((kind, f"What colour is the {main_shape}?", main_colour))
    return img, qa


def records(n_images: int, kinds: list[str], seed: int, size: int = 96, held_out: bool = False):
    rng = random.Random(seed)
    draw = reading_data.family(kinds)
    for i in range(n_images):
        img, qa = scene(rng, kinds, size) if draw is None else draw(rng, kinds, held_out)
        yield i, img, qa


def write_parquet(path: str, n_images: int, kinds: list[str], seed: int, size: int = 96,
                  held_out: bool = False) -> list[dict]:
    """A Cauldron-layout parquet file; returns the (image index, kind, question, answer) rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, texts, rows = [], [], []
    for i, img, qa in records(n_images, kinds, seed, size, held_out):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append([{"bytes": buf.getvalue(), "path": None}])
        texts.append([{"user": q, "assistant": a, "source": "shapes"} for _, q, a in qa])
        rows += [{"image": i, "kind": k, "question": q, "answer": a} for k, q, a in qa]
    pq.write_table(pa.table({"images": images, "texts": texts}), path)
    return rows


def write_llava(path: str, n_images: int, kinds: list[str], seed: int, size: int = 96,
                one_per_record: bool = True, held_out: bool = False) -> list[dict]:
    """A LLaVA-layout .jsonl file with its images in `<folder>/images/`."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(os.path.join(folder, f"{stem}_images"), exist_ok=True)
    lines, rows = [], []
    for i, img, qa in records(n_images, kinds, seed, size, held_out):
        rel = f"{stem}_images/{i}.png"
        img.save(os.path.join(folder, rel))
        turns = [[q, a] for _, q, a in qa]
        groups = [[t] for t in turns] if one_per_record else [turns]
        for g, group in enumerate(groups):
            conv = []
            for j, (q, a) in enumerate(group):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            lines.append(json.dumps({"id": f"{i}-{g}", "image": rel, "conversations": conv}))
        rows += [{"image": i, "kind": k, "question": q, "answer": a} for k, q, a in qa]
    with open(path, "w") as f:  # .json: one array of records (multi-turn ones too); .jsonl: a record a line
        f.write("[" + ",\n".join(lines) + "]\n" if path.endswith(".json") else "\n".join(lines) + "\n")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--layout", choices=["parquet", "llava"], default="parquet")
    p.add_argument("--kinds", default="count,position,size,pattern,colour")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS) - set(reading_data.KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS + reading_data.KINDS)}")
    os.makedirs(args.out, exist_ok=True)
    for name, n, seed in (("train", args.images, args.seed), ("test", args.test_images, args.seed + 10_000)):
        if args.layout == "parquet":
            rows = write_parquet(os.path.join(args.out, f"{name}.parquet"), n, kinds, seed, args.size,
                                 held_out=name == "test")
        else:
            rows = write_llava(os.path.join(args.out, f"{name}.jsonl"), n, kinds, seed, args.size,
                               held_out=name == "test")
        with open(os.path.join(args.out, f"{name}_rows.json"), "w") as f:
            json.dump(rows, f)
    print(f"wrote {args.layout} data to {args.out}")


if __name__ == "__main__":
    main()
