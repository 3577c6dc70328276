"""nanovlm's training step against the original nanoVLM's own code, alternating in one process.

    python benchmarks/train_vs_original.py --original DIR [--preset nanovlm-222m] [--batch 2]
        [--text-tokens 64] [--rounds 4] [--steps 3] [--threads 2]
        [--sides original-fp32,original-bf16,ours-fp32,ours-bf16]

DIR is a checkout of https://github.com/huggingface/nanoVLM (the commit docs/results.md names);
its `models/` are imported as they are (`benchmarks/original.py`). Both sides build the preset's
shape with random weights and train on the same batch: `--batch` samples of one image and
`--text-tokens` text tokens, the last 63 of them with a target. The original steps as its
train.py does (AdamW over its three parameter groups, autocast, clip_grad_norm_, step); ours is
what `nanovlm train` runs (`nanovlm.train.step.Trainer`). A bf16 side on a CPU without bf16
matrix units is refused (it would take minutes a step and compare nothing).

Rounds alternate the sides (one untimed step each, then `--steps` timed ones), so the machine's
drift falls on every side alike; a side's time is the median of its timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original import OriginalError, import_original, original_config  # noqa: E402

from nanovlm import TrainConfig, VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.config import IGNORE_INDEX  # noqa: E402
from nanovlm.models.linear_cross_entropy import supervised_index  # noqa: E402
from nanovlm.runtime import bf16_supported, prepare  # noqa: E402
from nanovlm.train.optim import fused_adamw_available, vlm_optimizer  # noqa: E402
from nanovlm.train.step import Trainer  # noqa: E402

SIDES = ("original-fp32", "original-bf16", "ours-fp32", "ours-bf16")


def make_batch(cfg: VLMConfig, batch: int, text: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n_img = cfg.mp_image_token_length
    ids = torch.randint(0, 1000, (batch, n_img + text), generator=g)
    ids[:, :n_img] = cfg.vlm_image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -64:-1] = ids[:, -63:]  # position t predicts token t + 1
    images = [torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g) for _ in range(batch)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "images": images,
            "supervised_index": supervised_index(labels)}


def original_side(OriginalVLM, ocfg, batch: dict, bf16: bool):
    torch.manual_seed(0)
    model = OriginalVLM(ocfg, load_backbone=False).train()
    groups = [{"params": list(model.MP.parameters()), "lr": 2e-3},
              {"params": list(model.vision_encoder.parameters()), "lr": 5e-5},
              {"params": list(model.decoder.parameters()), "lr": 5e-5}]
    optimizer = torch.optim.AdamW(groups)
    params = [p for g in groups for p in g["params"]]

    def step():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return step


def ours_side(cfg: VLMConfig, batch: dict, bf16: bool):
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, load_backbone=False).train()
    optimizer = vlm_optimizer(model, TrainConfig(), fused=fused_adamw_available(torch.device("cpu")))
    trainer = Trainer.build(model, optimizer, None, torch.device("cpu"), precision="bf16" if bf16 else "fp32")
    return lambda: trainer.step([batch])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", required=True, help="a checkout of huggingface/nanoVLM")
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="original-fp32,original-bf16,ours-fp32,ours-bf16")
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in args.sides if s not in SIDES]
    if bad:
        p.error(f"unknown side {bad[0]!r}; choose from {', '.join(SIDES)}.")
    if args.text_tokens < 64:
        p.error("--text-tokens must be at least 64 (63 of them carry a target).")
    if any(s.endswith("bf16") for s in args.sides) and not bf16_supported("cpu"):
        p.error("this CPU has no bf16 matrix units (bf16 matmuls run at a fraction of fp32's speed); "
                "pass --sides original-fp32,ours-fp32.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # What `nanovlm train` does on a CPU (allocator, threads, attention path); process-wide: both sides get it.
    with prepare(torch.device("cpu"), args.threads, say=print):
        cfg = VLMConfig.from_preset(args.preset, vit_model_type="", lm_model_type="", vlm_load_backbone_weights=False)
        batch = make_batch(cfg, args.batch, args.text_tokens)
        try:
            OriginalConfig, OriginalVLM = import_original(args.original, cfg.vlm_image_token_id)
        except OriginalError as e:
            sys.exit(f"train_vs_original.py: {e}")
        ocfg = original_config(OriginalConfig, cfg)
        steps = {s: (original_side(OriginalVLM, ocfg, batch, s.endswith("bf16")) if s.startswith("original")
                     else ours_side(cfg, batch, s.endswith("bf16"))) for s in args.sides}
        times: dict[str, list[float]] = {s: [] for s in args.sides}
        for r in range(args.rounds + 1):  # round 0 warms up
            for side, step in steps.items():
                step()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    if r:
                        times[side].append(time.perf_counter() - t0)
        median = {s: statistics.median(v) for s, v in times.items()}
        originals = [v for s, v in median.items() if s.startswith("original")]
        best = min(originals) if originals else None
        print(f"{args.preset}, batch {args.batch}, {cfg.mp_image_token_length} image + {args.text_tokens} text tokens, "
              f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")
        print(f"| side | step (s, median) | x the original's best |\n|---|---|---|")
        for s in args.sides:
            ratio = f"{best / median[s]:.2f}x" if best else "-"
            print(f"| {s} | {median[s]:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
