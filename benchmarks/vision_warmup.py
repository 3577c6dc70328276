"""How well the generic vision warm-up teaches a from-scratch encoder, on any data.

    python benchmarks/vision_warmup.py --data easyvqa [--steps 1500] [--seeds 0] [--batch 64]
    python benchmarks/vision_warmup.py --data runs/shapes/train.parquet --test-data runs/shapes/test.parquet

For each seed: a fresh model of the preset (its ViT drawn as `nanovlm train` draws it), the
warm-up (`nanovlm.train.vision`) on the training samples, then the readout's accuracy
(the warm-up's own head) on the test questions (easy-VQA's test split, or --test-data), which
training never sees. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovlm.data.datasets import build_dataset  # noqa: E402
from nanovlm.data.tokenizer import tokenizer_for  # noqa: E402
from nanovlm.runtime import autocast_args  # noqa: E402
from nanovlm.models.vision_language_model import VisionLanguageModel  # noqa: E402
from nanovlm.train import settings  # noqa: E402
from nanovlm.train.loop import seed_everything  # noqa: E402
from nanovlm.train.readout import build_targets, collect_pairs, held_out_targets, special_ids  # noqa: E402
from nanovlm.train.vision import VisionStage, readout_accuracy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="easyvqa")
    ap.add_argument("--test-data", default=None, help="held-out file (easyvqa: its test split)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="easyvqa")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shift", type=float, default=0.05, help="image_shift (0: off)")
    ap.add_argument("--extend", action="store_true", help="lengthen while the readout still learns (no time budget)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    vlm_cfg, train_cfg = settings.resolve(args.preset, None, [f"data={args.data}", *args.overrides])
    amp = autocast_args(train_cfg.precision, torch.device("cpu"))
    print("| seed | steps | time | answer tokens | slots | coverage | training-batch acc | test acc |\n"
          "|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        seed_everything(seed)
        model = VisionLanguageModel(vlm_cfg, load_backbone=False)
        tok = model.tokenizer = tokenizer_for(vlm_cfg)
        drop = special_ids(tok, vlm_cfg)
        train_set = build_dataset(train_cfg, vlm_cfg, tok, split="train")
        data = build_targets(collect_pairs(train_set, range(len(train_set)), drop))
        if args.test_data:
            test_cfg = settings.resolve(args.preset, None, [f"data={args.test_data}", *args.overrides])[1]
            test_set = build_dataset(test_cfg, vlm_cfg, tok, split="train")
        else:
            test_set = build_dataset(train_cfg, vlm_cfg, tok, split="test")
        test = held_out_targets(collect_pairs(test_set, range(len(test_set)), drop), data)
        result = VisionStage(model, data, args.steps, args.lr, args.batch, seed=seed, amp=amp, fused=True,
                             say=print, progress=False, shift=args.shift, extend=args.extend).run()
        acc = readout_accuracy(model, result["head"], test, amp)
        print(f"| {seed} | {args.steps} | {result['time_s']:.0f} s | {len(data.vocab)} | {data.n_slots} | "
              f"{data.coverage:.1%} | {result['train_accuracy']:.1%} | {acc:.1%} |", flush=True)


if __name__ == "__main__":
    main()
