"""Peak memory and step time of LoRA against full fine-tuning, on a preset's shape (random weights).

    python benchmarks/lora.py [--preset nanovlm-222m] [--rank 8] [--targets 'lm;all'] [--rows 4]
        [--length 256] [--steps 5] [--precision fp32|bf16] [--device cpu|cuda]

Each configuration runs in a fresh process (peak RSS only grows within a process): full
fine-tuning (every part at its preset rate), then LoRA of rank `--rank` on each `--targets`
value (adapters + the projector train, `nanovlm.models.lora`). A step is the training loop's:
forward with the summed fused loss, backward, AdamW update, zero_grad; the first step (which
allocates the optimizer state) is not timed. Memory: on the CPU the process's peak RSS and how
far it rose above the RSS once the model was built (activations, gradients, optimizer state);
on CUDA the peak allocated memory. Prints a markdown table; the lead writes the numbers in
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from nanovlm import TrainConfig, VisionLanguageModel, VLMConfig
from nanovlm.config import IGNORE_INDEX, PRESETS
from nanovlm.models.lora import add_lora
from nanovlm.models.linear_cross_entropy import supervised_index
from nanovlm.train.optim import fused_adamw_available, vlm_optimizer


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def make_batch(model: VisionLanguageModel, rows: int, length: int, device: torch.device):
    """One image per row (its tokens first), the last quarter of each row supervised."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (rows, length), generator=g)
    ids[:, 1:1 + cfg.mp_image_token_length] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -length // 4:-1] = ids[:, -length // 4 + 1:]
    images = torch.rand(rows, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
    return ids.to(device), images.to(device), labels.to(device), supervised_index(labels).to(device)


def measure(args, mode: str) -> dict:
    """One configuration ('full' or a lora_targets value), in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    vlm_cfg = VLMConfig.from_preset(args.preset, vlm_load_backbone_weights=False)
    train = dict(PRESETS[args.preset]["train"])
    lora = {} if mode == "full" else {"lora_rank": args.rank, "lora_targets": mode}
    cfg = TrainConfig.from_dict({**{k: v for k, v in train.items() if k in ("lr_mp", "lr_vision_backbone",
                                                                             "lr_language_backbone")}, **lora})
    model = VisionLanguageModel(vlm_cfg, load_backbone=False).to(device).train()
    if lora:
        from nanovlm.config import lora_target_names

        add_lora(model, cfg.lora.lora_rank, cfg.lora.lora_scale_alpha, 0.0, lora_target_names(mode))
    optimizer = vlm_optimizer(model, cfg, fused_adamw_available(device))
    ids, images, labels, sup = make_batch(model, args.rows, args.length, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    built = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(ids, images, targets=labels, loss_reduction="sum", return_logits=False,
                            supervised_index=sup)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    out = {"mode": mode, "trainable_m": trainable / 1e6, "total_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "optimizer_state_mb": state / 2**20, "step_s": statistics.median(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "built_rss_mb": built}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def table(rows: list[dict], args) -> str:
    cuda = "peak_cuda_mb" in rows[0]
    head = ["configuration", "trainable (M)", "AdamW state (MB)", "step (s)"]
    head += ["peak CUDA alloc (MB)"] if cuda else ["peak RSS (MB)", "RSS rise in training (MB)"]
    lines = [f"{args.preset}, random weights, {args.rows} rows x {args.length} tokens (1 image each), "
             f"{args.precision}, {args.device}, median of {args.steps} steps",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = "full fine-tuning" if r["mode"] == "full" else f"LoRA r={args.rank} on {r['mode']} (+ projector)"
        cells = [name, f"{r['trainable_m']:.2f} of {r['total_m']:.1f}", f"{r['optimizer_state_mb']:.1f}",
                 f"{r['step_s']:.3f}"]
        cells += ([f"{r['peak_cuda_mb']:.0f}"] if cuda else
                  [f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['built_rss_mb']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nanovlm-222m", choices=sorted(PRESETS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="lm;all", help="lora_targets values to measure, separated by ';' "
                   "(e.g. 'lm;lm_q,lm_v;all')")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    modes = ["full"] + [t.strip() for t in args.targets.split(";") if t.strip()]
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode] + [a for a in sys.argv[1:]]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(rows, args))


if __name__ == "__main__":
    main()
