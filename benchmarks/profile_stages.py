"""Where a training step's time goes in each stage of `nanovlm train` (the vision stage, the VLM
stage), beside the floor its matmuls set.

    python benchmarks/profile_stages.py [--preset small] [--vision-steps 60] [--vlm-steps 40] [key=value ...]

Runs `nanovlm train` in this process (the preset; data=easyvqa unless an override names other
data) with each stage cut to the given steps, profiles each stage's steps alone (`fit`: not the
data set-up, the readout's targets or the checkpoints around them) and splits its wall time by
the operators' own time: matmuls (and the patch convolution), attention, norms + softmax + loss,
the optimizer's and gradient clipping's passes, the other (elementwise, copy, indexing)
operators, the data loader's wait, and the rest: host-side Python, autograd's bookkeeping and
the profiler's own cost between operators. The matmul floor is the stage's FLOPs of matmuls,
convolutions and attention (its first step's, times the steps) at this machine's square-matmul
rate (measured just before the stage, in its threads and precision); "skinny rate" is what its
own matmuls reached.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovlm.train import vision, vlm  # noqa: E402
from nanovlm.train.run import run_training  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
KINDS = ("matmul", "attention", "norm, softmax, loss", "optimizer", "elementwise, other ops", "data wait",
         "host, autograd")


def square_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on this machine's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def kind(name: str) -> str | None:
    """An operator's kind (None: a span, not an operator: its time is its children's)."""
    if name.startswith("enumerate(DataLoader)"):
        return "data wait"
    if not name.startswith("aten::"):
        return None
    if name in MATMUL or "convolution" in name:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "_foreach" in name or "adam" in name:
        return "optimizer"
    if any(k in name for k in ("norm", "softmax", "cross_entropy", "nll_loss")):
        return "norm, softmax, loss"
    return "elementwise, other ops"


def split(prof) -> dict[str, float]:
    """Seconds of each kind in one stage's profile (operators' self time)."""
    out = dict.fromkeys(KINDS, 0.0)
    for avg in prof.key_averages():
        k = kind(avg.key)
        if k == "data wait":
            out[k] += avg.cpu_time_total / 1e6  # the worker's wait, or the collation in this process
        elif k is not None:
            out[k] += avg.self_cpu_time_total / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vision-steps", type=int, default=60)
    ap.add_argument("--vlm-steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    data = [] if any(o.startswith("data=") for o in args.overrides) else ["data=easyvqa"]
    overrides = [*data, f"vision_warmup_steps={args.vision_steps}", "vision_warmup_extend=false",
                 f"max_training_steps={args.vlm_steps}", "max_train_time=0", "eval_interval=1000000",
                 "eval_task=none", *args.overrides]
    rows = []

    def profiled(fit):  # `fit` is the one loop both stages run their steps in
        def run(trainer, stage, start, budget_s):
            dtype = trainer.amp["dtype"] if trainer.amp["enabled"] else torch.float32
            rate = square_rate(dtype)  # the run's threads and precision
            first, step = [], stage.step

            def counted(trainer, i):  # FLOPs of the first step only: FlopCounterMode's own cost is per op
                if first:
                    return step(trainer, i)
                with FlopCounterMode(display=False) as flops:
                    out = step(trainer, i)
                first.append(flops.get_total_flops())
                return out

            stage.step = counted
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                end = fit(trainer, stage, start, budget_s)
                wall = time.perf_counter() - t0
            rows.append((stage.name, end - start, wall, dtype, rate, split(prof), first[0] * (end - start)))
            return end
        return run

    vision.fit, vlm.fit = profiled(vision.fit), profiled(vlm.fit)
    with tempfile.TemporaryDirectory() as out:
        run_training(args.preset, None, os.path.join(out, "run"), overrides=overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads after the run; the profiler's own cost is "
          "in the host column")
    print("| stage | steps | wall s | s/step | " + " | ".join(KINDS)
          + " | square-matmul rate | matmul floor | skinny rate |")
    print("|---|---|---|---|" + "---|" * len(KINDS) + "---|---|---|")
    for name, steps, wall, dtype, rate, parts, flops in rows:
        parts["host, autograd"] = max(0.0, wall - sum(parts.values()))
        cells = " | ".join(f"{parts[k] / wall:.0%}" for k in KINDS)
        skinny = flops / max(parts["matmul"], 1e-9) / 1e9
        print(f"| {name} | {steps} | {wall:.1f} | {wall / steps:.3f} | {cells} | {rate / 1e9:.0f} GFLOP/s "
              f"({str(dtype).split('.')[-1]}) | {flops / rate:.1f} s | {skinny:.0f} GFLOP/s |", flush=True)


if __name__ == "__main__":
    main()
