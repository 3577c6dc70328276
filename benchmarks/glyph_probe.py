"""Can a from-scratch encoder tell digits apart? The first digit of a drawn number, learned alone.

    python benchmarks/glyph_probe.py [--images 8000] [--steps 600] [--models vit cnn] [key=value ...]

Pictures from `tests/reading_data.text` (a 1-3 digit number, 18-34 px high, in a 128x96 picture),
shrunk to the preset's tile (64 px by default); the target is the number's first digit (chance
about 11%). Each model trains alone on 7/8 of the pictures with AdamW (lr 1e-3, batch 64) and is
scored on the rest: `vit` is the preset's vision encoder (key=value settings apply, e.g.
`vit_patch_size=4`) with a linear head on its patch tokens; `cnn` is three 3x3 convolutions with
max pooling, a reference with a locality prior. Prints a markdown table. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import reading_data  # noqa: E402

from nanovlm.models.vision_language_model import VisionLanguageModel  # noqa: E402
from nanovlm.train import settings  # noqa: E402


def pictures(n: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng, images, labels = random.Random(seed), [], []
    for _ in range(n):
        img, qa = reading_data.text(rng, ["read"], held_out=False)
        images.append(torch.from_numpy(np.asarray(img.resize((side, side)), dtype=np.float32) / 255).permute(2, 0, 1))
        labels.append(int(qa[0][2][0]))
    return torch.stack(images), torch.tensor(labels)


def build(name: str, cfg) -> tuple[nn.Module, callable]:
    if name == "vit":
        model = VisionLanguageModel(cfg, load_backbone=False)
        n = (cfg.vit_img_size // cfg.vit_patch_size) ** 2
        head = nn.Linear(cfg.vit_hidden_dim * n, 10)
        return nn.ModuleList([model.vision_encoder, head]), \
            lambda x: head(model.vision_encoder(model.normalize_pixels(x)).flatten(1))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    return net, lambda x: net(x - 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--models", nargs="+", default=["vit", "cnn"], choices=["vit", "cnn"])
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    cfg, _ = settings.resolve(args.preset, None, args.overrides)
    x, y = pictures(args.images, cfg.vit_img_size, seed=0)
    split = args.images * 7 // 8
    print("| model | parameters | steps of 64 | s/step | held-out first digit |\n|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        module, forward = build(name, cfg)
        opt = torch.optim.AdamW(module.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(0, split, (64,), generator=g)
            loss = F.cross_entropy(forward(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_step = (time.perf_counter() - t0) / args.steps
        with torch.no_grad():
            acc = (forward(x[split:]).argmax(-1) == y[split:]).float().mean().item()
        label = name + (f" ({', '.join(args.overrides)})" if name == "vit" and args.overrides else "")
        params = sum(p.numel() for p in module.parameters())
        print(f"| {label} | {params / 1e6:.2f}M | {args.steps} | {per_step:.3f} | {acc:.1%} |", flush=True)


if __name__ == "__main__":
    main()
