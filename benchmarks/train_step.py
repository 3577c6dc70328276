"""Training-step time of a preset: the plain loss (the head's logits at the supervised positions +
cross-entropy, the model's second loss path until it kept one) against the fused chunked one
(`return_logits=False`, the model's one loss path and what `nanovlm train` uses), and
(`--compare vit-attention`) attention through PyTorch's fused kernel against the plain
matmul-softmax path that CPU training uses (`nanovlm.models.attention`; the vision encoder's
and the language model's), inside the runtime's CPU-training path as `nanovlm train` runs them.

    python benchmarks/train_step.py [--compare loss|vit-attention] [--preset easyvqa] [--rows 24]
        [--length 256] [--images-per-row 3] [--supervised-per-row 20] [--precision bf16] [--repeats 10]

Random weights and tokens of the preset's shape; the default batch is close to one step of the
`easyvqa` demo (64 three-question conversations packed into ~24 rows of 256 tokens, ~480
supervised positions). A step is forward, backward and the AdamW update. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanovlm import VLMConfig, VisionLanguageModel, runtime
from nanovlm.config import IGNORE_INDEX
from nanovlm.models.linear_cross_entropy import supervised_index


DEFAULT_PLAIN_MAX_TOKENS = runtime.PLAIN_MAX_TOKENS


def make_batch(model: VisionLanguageModel, rows: int, length: int, images_per_row: int, supervised: int):
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (rows, length), generator=g)
    n_img = cfg.mp_image_token_length
    for k in range(images_per_row):
        start = k * (length // images_per_row)
        ids[:, start:start + n_img] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r in range(rows):
        pos = torch.randperm(length - 1, generator=g)[:supervised]
        pos = pos[ids[r, pos] != model.image_token_id]
        labels[r, pos] = ids[r, pos + 1]
    images = torch.rand(rows * images_per_row, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
    return ids, images, torch.ones_like(ids), labels


def plain_loss(model: VisionLanguageModel, ids, images, mask, labels) -> torch.Tensor:
    """The summed loss through the (n_supervised, vocab) logits: the reference the fused path replaced."""
    hidden, _ = model.decoder(model.embed(ids, images), attention_mask=mask)
    supervised = labels != IGNORE_INDEX
    return F.cross_entropy(model.decoder.head(hidden[supervised]).float(), labels[supervised], reduction="sum")


def measure(preset: str, fused: bool, args, plain_vit_attention: bool = True) -> dict:
    runtime.PLAIN_MAX_TOKENS = DEFAULT_PLAIN_MAX_TOKENS if plain_vit_attention else -1
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset(preset), load_backbone=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids, images, mask, labels = make_batch(model, args.rows, args.length, args.images_per_row,
                                           args.supervised_per_row)
    index = supervised_index(labels)  # as the collators give it
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    with runtime.cpu_training_path():  # as `nanovlm train` runs its steps
        for i in range(args.repeats + 2):  # two warm-up steps
            t0 = time.perf_counter()
            with torch.autocast(**amp):
                if fused:
                    _, loss = model(ids, images, mask, labels, loss_reduction="sum", return_logits=False,
                                    supervised_index=index)
                else:
                    loss = plain_loss(model, ids, images, mask, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "supervised": int((labels != IGNORE_INDEX).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="easyvqa")
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--images-per-row", type=int, default=3)
    p.add_argument("--supervised-per-row", type=int, default=20)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compare", choices=("loss", "vit-attention"), default="loss")
    args = p.parse_args()
    what = "loss" if args.compare == "loss" else "attention (ViT and LM)"
    print(f"| preset | batch | supervised positions | precision | {what} | step (median of {args.repeats}) |")
    print("|---|---|---|---|---|---|")
    for variant in (False, True):
        if args.compare == "loss":
            r = measure(args.preset, variant, args)
            name = "fused chunked (return_logits=False)" if variant else "plain (logits + cross_entropy)"
        else:
            r = measure(args.preset, True, args, plain_vit_attention=variant)
            name = "plain matmul-softmax" if variant else "F.scaled_dot_product_attention"
        print(f"| {args.preset} | {args.rows} x {args.length} | {r['supervised']} | {args.precision} | {name} | "
              f"{r['ms']:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
