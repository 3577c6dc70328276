"""The data pipeline's samples per second on one core, for pictures of a given size: a dataset
item (image decode, resize and tiling, the chat template, tokenization) and its share of a
collated batch, as `nanovlm train` reads a file.

    python benchmarks/data_pipeline.py [--sizes 224 512] [--presets nanovlm-222m small] [--images 256]

Draws --images JPEG pictures of each size (shapes and a line of text, one question each) into a
temporary LLaVA-style file, then reads it through `build_dataset` and the run's collator on one
thread, no workers. The first pass decodes every picture; later passes read the uint8 tiles the
dataset keeps (what every epoch after the first costs). The `small` preset takes --small-size as
its image size (a run fits it to the pictures). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovlm.data.collators import build_collator  # noqa: E402
from nanovlm.data.datasets import build_dataset  # noqa: E402
from nanovlm.data.tokenizer import tokenizer_for  # noqa: E402
from nanovlm.train import settings  # noqa: E402


def draw_file(folder: str, n: int, side: int, seed: int = 0) -> str:
    """n JPEG pictures of side x 3/4 side with a question each; the path of their .jsonl file."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        image = Image.new("RGB", (side, side * 3 // 4), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = rng.randrange(side), rng.randrange(side * 3 // 4), rng.randrange(4, side // 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        number = str(rng.randrange(1000))
        draw.text((side // 8, side // 8), number, fill=(0, 0, 0))
        name = f"{i}.jpg"
        image.save(os.path.join(folder, name), quality=90)
        conv = [{"from": "human", "value": "<image>\nWhat number is written?"}, {"from": "gpt", "value": number}]
        lines.append(json.dumps({"id": str(i), "image": name, "conversations": conv}))
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def samples_per_s(dataset, collate, batch: int) -> tuple[float, float]:
    """(items/s, collated samples/s) of one pass over the dataset, in batches of `batch`."""
    t0 = time.perf_counter()
    items = [dataset[i] for i in range(len(dataset))]
    t1 = time.perf_counter()
    for b in range(0, len(items), batch):
        collate(items[b:b + batch])
    t2 = time.perf_counter()
    return len(items) / (t1 - t0), len(items) / (t2 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--presets", nargs="+", default=["nanovlm-222m", "small"])
    ap.add_argument("--small-size", type=int, default=192, help="the small preset's max_img_size")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3, help="the first decodes, the rest read the kept tiles")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| preset | picture | tiles | first pass: items/s | with collation | later passes: items/s "
          "| with collation |\n|---|---|---|---|---|---|---|")
    for side in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            path = draw_file(folder, args.images, side)
            for preset in args.presets:
                extra = [f"max_img_size={args.small_size}"] if preset == "small" else []
                vlm_cfg, train_cfg = settings.resolve(preset, None, [
                    f"data={path}", "lm_tokenizer=packaged:smollm2-135m", "multi_turn=false", "packing=false", *extra])
                tokenizer = tokenizer_for(vlm_cfg)
                dataset = build_dataset(train_cfg, vlm_cfg, tokenizer)
                collate = build_collator(train_cfg, vlm_cfg, tokenizer)
                rates = [samples_per_s(dataset, collate, args.batch) for _ in range(args.passes)]
                later = rates[1:] or rates
                tiles = dataset[0]["images"].shape[0]
                print(f"| {preset} | {side}x{side * 3 // 4} | {tiles} | {rates[0][0]:.0f} | {rates[0][1]:.0f} | "
                      f"{max(r[0] for r in later):.0f} | {max(r[1] for r in later):.0f} |", flush=True)


if __name__ == "__main__":
    main()
