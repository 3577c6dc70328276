"""How well the vision warm-up teaches the easy-VQA images' shape and colour, per seed.

    python benchmarks/vision_warmup.py [--steps 3000] [--seeds 0 1 2] [--preset easyvqa] [--lr 1e-3]

For each seed: a fresh model of the preset (its ViT drawn as `nanovlm train` draws it), the
warm-up of `nanovlm.train.vision_warmup` on the training images, then the accuracy of the
warm-up's own heads on the 1,000 test images (labels recovered from the test questions; the
training run never looks at them). Prints a markdown table. One seed of 3,000 steps takes
~3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import torch

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.data.easyvqa import EasyVQADataset
from nanovlm.data.tokenizer import tokenizer_for
from nanovlm.train.loop import seed_everything
from nanovlm.train.vision_warmup import kind_accuracy, pooled_features, vision_warmup


@torch.no_grad()
def head_accuracy(model, heads, data) -> list[float]:
    """Each label kind's accuracy of `heads` on `data` (an ImageTargets), known labels only."""
    model.eval()
    logits = torch.cat([heads(pooled_features(model.vision_encoder, data.normalize(data.images[i:i + 250])))
                        for i in range(0, len(data.images), 250)])
    return [right / known for right, known in kind_accuracy(logits, data.targets, list(data.classes.values()))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="easyvqa")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    amp = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": True}
    print("| seed | steps | time | training-batch shape | test shape | test colour |\n|---|---|---|---|---|---|")
    for seed in args.seeds:
        seed_everything(seed)
        model = VisionLanguageModel(VLMConfig.from_preset(args.preset), load_backbone=False)
        tokenizer = tokenizer_for(model.cfg)
        train = EasyVQADataset(model.cfg, tokenizer, split="train").image_targets()
        test = EasyVQADataset(model.cfg, tokenizer, split="test").image_targets()
        result = vision_warmup(model, train, args.steps, args.lr, args.batch, seed=seed, amp=amp, fused=True,
                               say=lambda _: None, progress=False)
        shape, colour = head_accuracy(model, result["heads"], test)
        print(f"| {seed} | {args.steps} | {result['time_s']:.0f} s | {result['accuracy']['shape']:.1%} "
              f"| {shape:.1%} | {colour:.1%} |", flush=True)


if __name__ == "__main__":
    main()
