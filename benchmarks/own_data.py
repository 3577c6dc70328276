"""The default `nanovlm train data=FILE` on drawn datasets it has never seen, as a user runs it.

    python benchmarks/own_data.py [--only NAME ...] [--images 3000] [--out runs/own_data]

For each dataset (tests/shapes_data.py and tests/reading_data.py: counting, positions, sizes,
fill patterns, the colour of one of several objects; bar charts with small letters; numbers
written in pictures, the test set's numbers never seen in training; a table of numbers; Cauldron
parquet, LLaVA .jsonl or .json with multi-turn records; never easy-VQA): write it, run
`nanovlm train --out DIR data=FILE` with nothing else (a subprocess, timed), then load
`DIR/final` with `VisionLanguageModel.from_pretrained` and answer the held-out test images'
questions with `model.answer`. Prints a markdown table: exact match per question kind and
overall, and the wall time of `nanovlm train`. With `--mix`, one run trains on all the named
datasets as a mixture (`data=A,B,...`) and each is scored on its own test images. Run it alone on
the machine (it trains).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import shapes_data  # noqa: E402

DATASETS = {
    # name: (layout, kinds, one question per record)
    "count-parquet": ("parquet", ["count"], False),
    "multi-parquet": ("parquet", ["count", "position", "size", "pattern", "colour"], False),
    "position-colour-llava": ("llava", ["position", "colour"], True),
    "multi-llava": ("llava", ["count", "position", "size", "pattern", "colour"], True),
    "chart-parquet": ("parquet", ["tallest", "bars", "bar_colour", "compare"], False),
    "read-llava-json": ("llava-json", ["read", "text_colour"], False),
    "table-llava": ("llava", ["cell"], True),
}


def write(name: str, root: str, n_images: int, n_test: int) -> tuple[str, list[dict]]:
    layout, kinds, one = DATASETS[name]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    ext = {"parquet": "parquet", "llava": "jsonl", "llava-json": "json"}[layout]
    # The test files sit apart from the training file: data=FILE must not find them.
    train, test = os.path.join(folder, f"train.{ext}"), os.path.join(folder, "held_out", f"test.{ext}")
    os.makedirs(os.path.dirname(test), exist_ok=True)
    if layout == "parquet":
        shapes_data.write_parquet(train, n_images, kinds, seed=1)
        rows = shapes_data.write_parquet(test, n_test, kinds, seed=99_999, held_out=True)
    else:
        shapes_data.write_llava(train, n_images, kinds, seed=1, one_per_record=one)
        rows = shapes_data.write_llava(test, n_test, kinds, seed=99_999, one_per_record=one, held_out=True)
    images = {}
    for i, img, _ in shapes_data.records(n_test, kinds, seed=99_999, held_out=True):
        images[i] = img
    for r in rows:
        r["pil"] = images[r["image"]]
    return train, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=list(DATASETS))
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--test-images", type=int, default=300)
    ap.add_argument("--out", default="runs/own_data")
    ap.add_argument("--mix", action="store_true", help="train once on all of --only as one mixture, score each")
    ap.add_argument("settings", nargs="*", metavar="key=value", help="extra train settings (default: none)")
    args = ap.parse_args()
    results = []
    written = {name: write(name, os.path.join(args.out, "data"), args.images, args.test_images) for name in args.only}
    runs = [("+".join(args.only), args.only)] if args.mix else [(name, [name]) for name in args.only]
    for run_name, names in runs:
        run_dir = os.path.join(args.out, run_name)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "nanovlm", "train", "--out", run_dir,
               "data=" + ",".join(written[n][0] for n in names), *args.settings]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"{run_name}: training failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        from nanovlm import VisionLanguageModel
        from nanovlm.eval.vqa import normalize_answer

        model = VisionLanguageModel.from_pretrained(os.path.join(run_dir, "final"))
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        for name in names:
            rows = written[name][1]
            preds = model.answer([r["pil"] for r in rows], [r["question"] for r in rows])
            per = defaultdict(lambda: [0, 0])
            for r, p in zip(rows, preds):
                ok = normalize_answer(p) == normalize_answer(r["answer"])
                for key in (r["kind"], "all"):
                    per[key][0] += ok
                    per[key][1] += 1
            results.append((name, per, wall, summary))
            print(f"{name}: " + ", ".join(f"{k} {c / n:.1%}" for k, (c, n) in per.items()) + f", {wall:.0f} s",
                  flush=True)
    print("\n| data | layout | questions per image | test accuracy (per kind) | overall | val accuracy | warm-up | "
          "`nanovlm train` wall |\n|---|---|---|---|---|---|---|---|")
    for name, per, wall, summary in results:
        layout, kinds, one = DATASETS[name]
        kinds_text = ", ".join(f"{k} {per[k][0] / per[k][1]:.1%}" for k in kinds)
        warm = summary.get("vision_warmup", {})
        warm_text = (f"{warm['answer_tokens']} answer tokens, {warm['steps']} steps, {warm['time_s']} s, held-out "
                     f"{warm.get('held_out_accuracy') or 0:.1%}" if "slots" in warm else warm.get("skipped", "-"))
        val = summary.get("val_accuracy")
        print(f"| {name} | {layout}{' (one question per record)' if one else ''} | {len(kinds)} | {kinds_text} | "
              f"**{per['all'][0] / per['all'][1]:.1%}** | {'-' if val is None else f'{val:.1%}'} | {warm_text} | "
              f"{wall:.0f} s |")


if __name__ == "__main__":
    main()
