"""nanovlm's training step against the original nanoVLM's, side by side in one run (issue 17).

    python benchmarks/train_vs_original.py [--preset nanovlm-222m] [--batch 2] [--text-tokens 64]
        [--supervised 63] [--rounds 3] [--steps 3] [--threads 2] [--compile auto|on|off]
        [--sides original-fp32,original-bf16,ours-fp32,ours-bf16] [--floor [--narrow 32]]

Both sides build the preset's shape with random weights (no download) and train on the same
batch: `--batch` samples of one image (mp_image_token_length image tokens) and `--text-tokens`
text tokens, of which the last `--supervised` positions have a target, as a collator gives it
(a 0/1 attention mask, one image tensor per sample). The original is
`benchmarks/original_nanovlm_train.py` (its model math and train.py's step, rewritten from its
code); ours is what `nanovlm train` runs (`nanovlm.train.step`: AdamW groups, fused where torch
has it, gradient clipping, the fused loss, compiled as `--compile` says). A step is forward,
backward, clipping and the AdamW update.

The sides alternate: each round runs every side for `--steps` timed steps (after one untimed
step per round and a warm-up round), then measures the bf16 matmul peak (the best of 1,024- and
2,048-square products over half a second), so load from other processes falls on all of them
alike. A row's time is the median of its timed steps over all rounds.

Columns: the step time; the speed-up over the original's best row; the work of a step in TFLOP:
the original's (the head over every position), which MFU divides by on both sides so that the
percentages compare like with like, and what the side computes (ours: the head at supervised
positions only); MFU = work / step time / the best bf16 peak measured.

`--floor` adds what ours-bf16's step would cost if every kernel other than its matmuls and its
update were free: each matmul the step dispatches (recorded by op, shapes, strides and dtypes)
timed alone at its best and multiplied by its count, plus the clip and fused AdamW update
alone. The step cannot beat that sum; the original's best row divided by it bounds the ratio
any change outside the matmul kernels can reach. It also splits ours-bf16's measured step into
its phases (forward, backward, the update), each beside the floor of its own matmuls, and times
the same step on a model whose every width is divided by `--narrow` (default 32; the same layers,
heads, tokens and op count, ~1/1000 of the FLOPs): what the step's ops cost as calls (dispatch,
autograd, attention over the same tokens), next to nothing of arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original_nanovlm_train import OriginalVLM, original_optimizer, original_train_step  # noqa: E402

from nanovlm import TrainConfig, VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.config import IGNORE_INDEX  # noqa: E402
from nanovlm.models.linear_cross_entropy import supervised_index  # noqa: E402
from nanovlm.runtime import keep_freed_memory  # noqa: E402
from nanovlm.train import step as train_step  # noqa: E402
from nanovlm.train.optim import clip_and_step  # noqa: E402
from nanovlm.train.report import FlopCounter, measure_matmul_peak  # noqa: E402

SIDES = ("original-fp32", "original-bf16", "ours-fp32", "ours-bf16")


def make_batch(cfg: VLMConfig, image_token_id: int, batch: int, text: int, supervised: int) -> dict:
    """One image then `text` tokens per sample; targets at the last `supervised` positions."""
    g = torch.Generator().manual_seed(0)
    n_img = cfg.mp_image_token_length
    ids = torch.randint(0, 1000, (batch, n_img + text), generator=g)
    ids[:, :n_img] = image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -supervised - 1:-1] = ids[:, -supervised:]  # position t predicts token t + 1
    images = [torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g) for _ in range(batch)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "images": images,
            "supervised_index": supervised_index(labels)}


def work(model: VisionLanguageModel, cfg: VLMConfig, batch: dict) -> tuple[float, float]:
    """(FLOPs of the original's step: the head at every position, FLOPs ours computes)."""
    B, T = batch["input_ids"].shape
    counter = FlopCounter(model, cfg)
    stats = (len(batch["images"]), B * T, float(B * T * T))
    return counter.train_step(*stats, B * T), counter.train_step(*stats, int(batch["supervised_index"].numel()))


class Side:
    """One row of the table: a model, its optimizer and a step function, built once."""

    def __init__(self, name: str, cfg: VLMConfig, args, ours_model=None):
        self.name, self.times = name, []
        bf16 = name.endswith("bf16")
        if name.startswith("original"):
            torch.manual_seed(0)
            self.model = OriginalVLM(cfg, image_token_id=cfg.lm_base_vocab_size).train()
            optimizer = original_optimizer(self.model)
            self.step = lambda batch: original_train_step(self.model, optimizer, batch, bf16)
            return
        self.model = ours_model
        train_cfg = TrainConfig(precision="bf16" if bf16 else "fp32", compile=args.compile)
        self.trainer = train_step.Trainer.build(self.model, train_cfg, torch.device("cpu"), say=print)
        self.step = lambda batch: self.trainer.step([batch])

    def run(self, batch: dict, steps: int, timed: bool) -> None:
        self.step(batch)  # untimed: the first step of a round pays for the switch between sides
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step(batch)
            if timed:
                self.times.append(time.perf_counter() - t0)


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _RecordMatmuls(TorchDispatchMode):
    """Counts the matmuls a step dispatches by (op, operand shapes, strides, dtypes), per phase
    (`phase` is set by whoever drives the step: "forward", then "backward")."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.calls: dict[str, dict[tuple, int]] = {"forward": {}, "backward": {}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            key = (func,) + tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor))
            calls = self.calls[self.phase]
            calls[key] = calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


class _PhaseClock:
    """Stands in for the trainer's runner: calls it, and notes when its forward returned (the
    backward starts then), so one real `Trainer.step` is split into forward | backward | update."""

    def __init__(self, runner, mode: _RecordMatmuls | None = None):
        self.runner, self.mode, self.forward_end = runner, mode, None

    def __call__(self, *args, **kwargs):
        out = self.runner(*args, **kwargs)
        self.forward_end = time.perf_counter()
        if self.mode is not None:
            self.mode.phase = "backward"
        return out


def _best_time(fn, seconds: float = 0.15) -> float:
    """Best wall time of one call of fn over a few runs of about `seconds` each."""
    fn()
    best = float("inf")
    for _ in range(3):
        calls, t0 = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - t0 < seconds:
            fn()
            calls += 1
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _operand(shape, stride, dtype) -> torch.Tensor:
    """A random tensor laid out as recorded (a transposed view stays transposed)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return torch.randn(size, dtype=torch.float32).to(dtype).as_strided(shape, stride)


def _matmul_seconds(calls: dict[tuple, int]) -> float:
    """Each recorded matmul timed alone at its best, times its count, summed."""
    total = 0.0
    for (func, *operands), count in calls.items():
        tensors = [_operand(*o) for o in operands]
        total += count * _best_time(lambda: func(*tensors))
    return total


def step_floor(side: "Side", batch: dict) -> dict[str, float]:
    """Seconds of the step's forward and backward matmuls, each timed alone at its best, x its
    count, and of one optimizer update alone: what the step costs with every other kernel free."""
    trainer, mode = side.trainer, _RecordMatmuls()
    compiled_runner = trainer.runner
    trainer.runner = _PhaseClock(trainer.eager_runner, mode)  # the same matmuls, recorded eagerly
    with mode:
        side.step(batch)
    trainer.runner = trainer.eager_runner
    floor = {phase: _matmul_seconds(calls) for phase, calls in mode.calls.items()}
    trainer.accumulate([batch], 1.0 / int(batch["supervised_index"].numel()))
    params = [p for p in trainer.params if p.requires_grad]
    # The clip and the AdamW update, as Trainer.update makes them; the gradients stay, one step a call.
    floor["update"] = _best_time(lambda: clip_and_step(trainer.optimizer, params, trainer.max_grad_norm),
                                 seconds=0.5)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.runner = compiled_runner
    return floor


def phase_times(side: "Side", batch: dict, steps: int) -> dict[str, float]:
    """Median seconds of the forward, the backward and the update over `steps` real steps of
    `side` (its runner, compiled or not, as the table's rows ran it)."""
    trainer, scale = side.trainer, 1.0 / int(batch["supervised_index"].numel())
    runner, trainer.runner = trainer.runner, _PhaseClock(trainer.runner)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "update": []}
    for i in range(steps + 1):  # the first pays for the switch from the previous side
        t0 = time.perf_counter()
        trainer.accumulate([batch], scale)
        t1 = time.perf_counter()
        trainer.update()
        t2 = time.perf_counter()
        if i:
            forward_end = trainer.runner.forward_end
            times["forward"].append(forward_end - t0)
            times["backward"].append(t1 - forward_end)
            times["update"].append(t2 - t1)
    trainer.runner = runner
    return {phase: statistics.median(t) for phase, t in times.items()}


def narrow_config(cfg: VLMConfig, divisor: int) -> VLMConfig:
    """`cfg` with every width (and the vocabulary) divided by `divisor`, kept a multiple of
    twice the head counts: the same layers, heads and tokens, so the same ops, on ~divisor^-2 of the FLOPs."""
    def narrow(width: int, multiple: int) -> int:
        return max(multiple, width // divisor // multiple * multiple)

    # Even head widths (rotary embeddings rotate halves).
    return cfg.replace(vit_hidden_dim=narrow(cfg.vit_hidden_dim, 2 * cfg.vit_n_heads), vit_inter_dim=None,
                       lm_hidden_dim=narrow(cfg.lm_hidden_dim, 2 * cfg.lm_n_heads), lm_inter_dim=narrow(cfg.lm_inter_dim, 1),
                       lm_base_vocab_size=narrow(cfg.lm_base_vocab_size, 1))


def narrow_step(cfg: VLMConfig, args) -> float:
    """Median step of ours-bf16 on `narrow_config(cfg, args.narrow)`, the same batch shape."""
    narrow = narrow_config(cfg, args.narrow)
    torch.manual_seed(0)
    model = VisionLanguageModel(narrow, load_backbone=False).train()
    batch = make_batch(narrow, model.image_token_id, args.batch, args.text_tokens, args.supervised)
    side = Side("ours-bf16", narrow, args, model)
    side.run(batch, 2, timed=False)
    side.run(batch, args.steps * args.rounds, timed=True)
    return statistics.median(side.times)


def measure(args) -> tuple[list[Side], float, tuple[float, float], dict | None]:
    cfg = VLMConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = VisionLanguageModel(cfg, load_backbone=False).train()
    batch = make_batch(cfg, ours.image_token_id, args.batch, args.text_tokens, args.supervised)
    flops = work(ours, cfg, batch)
    sides, spare = [], [ours]
    for name in args.sides:  # each of our rows its own model (its optimizer holds state for it)
        model = None
        if name.startswith("ours"):
            model = spare.pop() if spare else VisionLanguageModel(cfg, load_backbone=False).train()
        sides.append(Side(name, cfg, args, model))
    peaks = []
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for side in sides:
            side.run(batch, args.steps, timed=r > 0)
            print(f"round {r}, {side.name}: {', '.join(f'{t:.2f}' for t in side.times[-args.steps:]) if r else 'warm'}",
                  file=sys.stderr, flush=True)
        peaks.append(max(measure_matmul_peak(torch.device("cpu"), torch.bfloat16, seconds=0.25, n=n)
                         for n in (1024, 2048)))
    floor = None
    if args.floor:
        ours_bf16 = next(s for s in sides if s.name == "ours-bf16")
        floor = {"phases": phase_times(ours_bf16, batch, args.rounds * args.steps),
                 "floor": step_floor(ours_bf16, batch)}
        floor["narrow"] = narrow_step(cfg, args)
    return sides, max(peaks), flops, floor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--supervised", type=int, default=63)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--floor", action="store_true",
                   help="also time ours-bf16's matmuls and optimizer update alone (the step's floor)")
    p.add_argument("--narrow", type=int, default=32,
                   help="with --floor: the width divisor of the narrow model whose step is timed too")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated rows, of " + ", ".join(SIDES))
    args = p.parse_args()
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in args.sides if s not in SIDES]
    if args.narrow < 1:
        p.error("--narrow must be a positive integer")
    if args.floor and "ours-bf16" not in args.sides:
        p.error("--floor needs the ours-bf16 side")
    if unknown or not 0 < args.supervised < args.text_tokens:
        p.error(f"unknown sides {unknown}" if unknown else "--supervised must be between 1 and --text-tokens - 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `nanovlm train` does on CPU (the original does not; it shares the process)
    sides, peak, (flops_original, flops_ours), floor = measure(args)
    best_original = min((statistics.median(s.times) for s in sides if s.name.startswith("original")), default=None)
    print(f"\n{args.preset}, batch {args.batch} x ({cfg_tokens(args)} tokens), {args.supervised} supervised per "
          f"sample, {args.threads} threads, compile={args.compile}; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"median of {args.rounds} x {args.steps} steps\n")
    print("| side | step | vs original's best | TFLOP / step (original's work / computed) | MFU |")
    print("|---|---|---|---|---|")
    for s in sides:
        t = statistics.median(s.times)
        computed = flops_original if s.name.startswith("original") else flops_ours
        ratio = f"{best_original / t:.2f}x" if best_original else "-"
        print(f"| {s.name} | {t:.3f} s | {ratio} | {flops_original / 1e12:.3f} / {computed / 1e12:.3f} | "
              f"{100 * flops_original / t / peak:.0f}% |")
    if floor is not None:
        print_floor(floor, best_original, flops_ours, args)


def print_floor(info: dict, best_original: float | None, flops_ours: float, args) -> None:
    """The floor of ours-bf16's step, its phases beside their floors, and the narrow step."""
    floor, phases = info["floor"], info["phases"]
    matmuls, total = floor["forward"] + floor["backward"], sum(floor.values())
    bound = f", at most {best_original / total:.2f}x the original" if best_original else ""
    print(f"\nFloor of ours-bf16's step: its matmuls, each shape timed alone at its best, {matmuls:.3f} s "
          f"({flops_ours / matmuls / 1e9:.0f} GFLOP/s) + the optimizer update alone {floor['update']:.3f} s = "
          f"{total:.3f} s{bound}.\n")
    print("| phase of ours-bf16 | measured (median) | its matmuls alone (update: alone) | the rest |")
    print("|---|---|---|---|")
    for phase in ("forward", "backward", "update"):
        print(f"| {phase} | {phases[phase]:.3f} s | {floor[phase]:.3f} s | {phases[phase] - floor[phase]:.3f} s |")
    print(f"| the step | {sum(phases.values()):.3f} s | {total:.3f} s | {sum(phases.values()) - total:.3f} s |")
    print(f"\nThe same step with every width divided by {args.narrow} (the same layers, heads, tokens and "
          f"ops): {info['narrow']:.3f} s.")


def cfg_tokens(args) -> str:
    return f"{VLMConfig.from_preset(args.preset).mp_image_token_length} image + {args.text_tokens} text"


if __name__ == "__main__":
    main()
