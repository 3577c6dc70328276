"""The training loop: `train`, which a single process and every torchrun rank run.

Read it top to bottom: `setup` builds the model, data, optimizer and schedule (and runs the
vision warm-up of a new run); each step draws `gradient_accumulation_steps` micro-batches per
rank and `train_step` accumulates their gradients and updates; `Window` logs the running
numbers; `evaluate` measures the validation loss and the accuracy `eval_task` names and keeps
the best checkpoint; `save` writes a resumable checkpoint; `finish` writes the final model, the
report, the plot and `summary.json`.

The loss is the sum of token losses divided by the number of supervised tokens in the whole
global batch (all micro-batches, all ranks), so the gradient is exactly that of one big batch,
not a mean of means; DDP's averaging over ranks is undone by scaling with the world size. Token
counts come from the CPU labels and losses stay on the device until a log step. A checkpoint
taken after step k restores everything (weights, optimizer, schedule, RNG, data position,
metrics, the run's state), so a resumed run repeats exactly what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from nanovlm.config import IGNORE_INDEX, TrainConfig, VLMConfig
from nanovlm.data.augment import shift_batch_images
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train import evaluation, lora
from nanovlm.train.data import Data, build_data, epoch_of, make_data, n_samples, to_device, total_steps_for
from nanovlm.train.optim import WarmupCosine, build_optimizer, fused_adamw_available
from nanovlm.train.step import Trainer
from nanovlm.train.report import FlopCounter, MetricsLog, batch_stats, measure_matmul_peak
from nanovlm.train.vision_warmup import CALIBRATION_STEPS, fit_steps

__all__ = ["Data", "RunState", "build_data", "make_data", "seed_everything", "train"]



@dataclass
class RunState:
    """Everything about a run that a checkpoint must carry besides weights and optimizer."""
    step: int = 0
    total_steps: int = 0
    best: dict | None = None  # {"step", "metric", "value"} of the kept best checkpoint
    train_time_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    warmup: dict | None = None  # the vision warm-up's summary
    resumed_at_step: int | None = None
    lora_base: dict | None = None  # a LoRA run: the base weights its adapters train on (train/lora.py)
    metrics: list = field(default_factory=list)


@dataclass
class Run:
    """The objects a run works with (built by `setup`)."""
    vlm_cfg: VLMConfig
    cfg: TrainConfig
    run_dir: str
    info: dist.DistInfo
    model: Any
    trainer: Trainer  # the step's work: the model as it calls it (DDP-wrapped / compiled), the update
    tokenizer: Any
    data: Data
    optimizer: Any
    schedule: WarmupCosine
    amp: dict
    fused: bool
    task: str
    state: RunState
    say: Callable[[str], None]
    log: MetricsLog | None = None
    bar: Any = None
    peak: float = 0.0
    flop_counter: Any = None
    threads: Any = None  # runtime.Threads on a CPU: follows what other programs leave free


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(vlm_cfg: VLMConfig, train_cfg: TrainConfig, run_dir: str, *, resume: bool = False,
          info: dist.DistInfo | None = None, data: Data | None = None, tokenizer=None, progress: bool = True,
          final_eval: bool = True) -> dict:
    """Train, checkpoint, evaluate; returns the summary (also written to run_dir/summary.json).
    `data` and `tokenizer` default to what the configs name (tests pass small stand-ins)."""
    t_session = time.perf_counter()
    run = setup(vlm_cfg, train_cfg, run_dir, resume, info or dist.DistInfo(), data, tokenizer, progress)
    state, cfg = run.state, run.cfg
    batches = run.data.train.forever() if hasattr(run.data.train, "forever") else iter(run.data.train)
    window = Window(run)
    last_saved = state.step if state.resumed_at_step is not None else -1
    t_train, time_before = time.perf_counter(), state.train_time_s
    run.model.train()
    start = state.step
    while state.step < state.total_steps:
        if cfg.max_train_time and state.step == start + CALIBRATION_STEPS:
            fit_time_budget(run, time.perf_counter() - t_train, state.step - start)
        lr_factor = run.schedule.apply(state.step)
        micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        window.add(train_step(run, micro))
        state.step += 1
        done, is_last = state.step, state.step == state.total_steps
        if run.bar is not None:
            run.bar.update(1)
        if done % max(1, cfg.log_interval) == 0 or is_last:
            window.flush(lr_factor)
        if cfg.eval_interval > 0 and done % cfg.eval_interval == 0 and not is_last:
            with window.paused():
                evaluate(run, cfg.eval_interval_limit, final=False)
        if (cfg.save_interval > 0 and done % cfg.save_interval == 0) or is_last:
            with window.paused():
                state.train_time_s = time_before + (time.perf_counter() - t_train)
                save(run)
                last_saved = done
    state.train_time_s = time_before + (time.perf_counter() - t_train)
    if last_saved != state.total_steps and state.total_steps > (state.resumed_at_step or 0):
        save(run)
    return finish(run, final_eval, t_session, window.last)


# ------------------------------------------------------------------------------------- setup
def setup(vlm_cfg: VLMConfig, cfg: TrainConfig, run_dir: str, resume: bool, info: dist.DistInfo, data: Data | None,
          tokenizer, progress: bool) -> Run:
    """The model, data, optimizer and schedule of a new or resumed run."""
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import Threads, keep_freed_memory, pick_dtype

    say = _Printer(info)
    threads = None
    if info.device.type == "cpu":
        keep_freed_memory()
        threads = Threads(cfg.threads, say)
    task = evaluation.resolve_task(cfg)
    resume_from = None
    if resume:
        resume_from = ckpt.latest_good_checkpoint(run_dir, say)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(run_dir, 'checkpoints')}; "
                                    "run without --resume to start a new run.")
    if cfg.lora_rank:
        lora.check_run(vlm_cfg, cfg)
    seed_everything(cfg.seed)
    if cfg.init_from:
        model = _initial_model(vlm_cfg, cfg.init_from).to(info.device)
        tokenizer = tokenizer or model.tokenizer
    else:
        model = VisionLanguageModel(vlm_cfg, load_backbone=vlm_cfg.vlm_load_backbone_weights).to(info.device)
    if tokenizer is None:
        from nanovlm.data.tokenizer import tokenizer_for

        tokenizer = tokenizer_for(vlm_cfg)
    model.tokenizer = tokenizer
    data = data or build_data(vlm_cfg, cfg, tokenizer, info)
    fused = fused_adamw_available(info.device)
    dtype = pick_dtype(cfg.precision, info.device)
    amp = {"device_type": info.device.type, "dtype": dtype, "enabled": dtype != torch.float32}
    state = RunState(total_steps=total_steps_for(cfg, data))
    if resume_from is None and cfg.vision_warmup != "off":  # a checkpoint holds the warmed-up encoder
        from nanovlm.train.vision_warmup import run_warmup

        state.warmup = run_warmup(model, data, cfg, amp, fused, info, say, progress, tokenizer=tokenizer,
                                  threads=threads)
    state.lora_base = lora.prepare(model, vlm_cfg, cfg) if cfg.lora_rank else None
    optimizer = build_optimizer(model, cfg, info.device, fused=fused)
    schedule = WarmupCosine(optimizer, state.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    if resume_from is not None:
        state = _restore(resume_from, model, optimizer, schedule, data, info, say, state.lora_base)
    trainer = Trainer.build(model, cfg, info.device, say, runner=dist.wrap_model(model, info), optimizer=optimizer)
    run = Run(vlm_cfg, cfg, run_dir, info, model, trainer, tokenizer, data, optimizer, schedule, amp, fused, task,
              state, say, flop_counter=FlopCounter(model, vlm_cfg), threads=threads)
    run.peak = measure_matmul_peak(info.device, dtype, seconds=0.3) if info.is_main else 0.0
    if info.is_main:
        run.log = MetricsLog(run_dir, state.metrics, wandb_config=_run_config(vlm_cfg, cfg) if cfg.wandb else None)
        if state.warmup is not None and state.resumed_at_step is None:
            for warm_step, loss in state.warmup.get("curve", []):
                run.log.log({"stage": "vision_warmup", "warmup_step": warm_step, "warmup_loss": loss})
            run.log.log({"stage": "vision_warmup", "step": 0, **{
                f"vision_warmup_{k}": v for k, v in state.warmup.items() if isinstance(v, (int, float, str))}})
        n_params = sum(p.numel() for p in model.parameters())
        if cfg.lora_rank:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            say(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n_train / 1e6:.2f}M of "
                f"{n_params / 1e6:.1f}M parameters train (the adapters and the projector)")
        say(f"training {n_params / 1e6:.1f}M parameters for {state.total_steps} steps on {info.world_size} x "
            f"{info.device.type} ({'bf16 autocast' if amp['enabled'] else 'fp32'}, fused AdamW "
            f"{'on' if fused else 'off'}, compile {'on' if trainer.compiled else 'off'}), global batch "
            f"{cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size}")
        if progress:
            from tqdm import tqdm

            run.bar = say.bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                                     desc="train")
    return run


def _initial_model(vlm_cfg: VLMConfig, source: str):
    """`init_from`: the checkpoint's model, rebuilt for `vlm_cfg` where settings on top changed it
    (every tensor must still fit: a missing or mis-shaped one is an error naming it)."""
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.weights.nanovlm import load_state

    model = VisionLanguageModel.from_pretrained(source, require_tokenizer=True).float()
    if model.cfg == vlm_cfg:
        return model
    rebuilt = VisionLanguageModel(vlm_cfg, load_backbone=False)
    load_state(rebuilt, model.state_dict_for_saving(), source=f"init_from={source}")
    rebuilt.tokenizer = model.tokenizer
    return rebuilt


def fit_time_budget(run: Run, elapsed_s: float, steps_done: int) -> None:
    """Cut the step count to what fits `max_train_time` (less the warm-up's time), once, after
    the first timed steps; the schedule is stretched over the new count (saved for a resume)."""
    warm = (run.state.warmup or {}).get("time_s", 0.0) + (run.state.warmup or {}).get("prepare_s", 0.0)
    budget = run.cfg.max_train_time - warm - run.state.train_time_s
    left = run.state.total_steps - run.state.step
    fitted = fit_steps(left + steps_done, steps_done, elapsed_s, budget) - steps_done
    if fitted < left:
        total = run.state.step + fitted
        run.say(f"{total} of {run.state.total_steps} steps fit max_train_time={run.cfg.max_train_time:g} s "
                f"({elapsed_s / steps_done:.2f} s a step)")
        run.state.total_steps = run.schedule.total_steps = total
        if run.bar is not None:
            run.bar.total = total


def _restore(path: str, model, optimizer, schedule, data: Data, info: dist.DistInfo, say,
             lora_base: dict | None = None) -> RunState:
    """Load a checkpoint into the run's objects; returns its RunState. `lora_base`: the base this
    run built for its LoRA adapters, checked against the checkpoint's before anything loads."""
    fresh = [(g["base_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    saved = ckpt.load_checkpoint(path, model, optimizer, schedule, rank=info.rank,
                                 check=lambda s: lora.check_base(s.get("lora_base"), lora_base, path))
    for g, (base_lr, wd) in zip(optimizer.param_groups, fresh):  # a resumed run may change rates
        g["base_lr"], g["weight_decay"] = base_lr, wd
    data.train.load_state_dict(saved["data"])
    if data.skips is not None and "skips" in saved:
        data.skips.load_state_dict(saved["skips"])
    known = {k: saved[k] for k in RunState.__dataclass_fields__ if k in saved}
    state = RunState(**known)
    schedule.total_steps = state.total_steps  # as the interrupted run had fixed it
    state.resumed_at_step = state.step
    say(f"resumed from {path} at step {state.step}")
    return state


# -------------------------------------------------------------------------------------- step
def train_step(run: Run, micro: list[dict]) -> dict:
    """Accumulate the gradients of one global batch and update; returns the step's counts."""
    info, model = run.info, run.model
    n_sup = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
    if info.enabled:
        n_global = dist.all_reduce_sum(torch.tensor([float(n_sup)], device=info.device), info)
        scale = info.world_size / n_global.clamp(min=1.0)
    else:
        scale = 1.0 / max(n_sup, 1)
    counts = {"loss": torch.zeros((), dtype=torch.float64, device=info.device), "tokens": n_sup, "samples": 0,
              "real_tokens": 0, "flops": 0.0}
    batches = []
    # Shifted images (`image_shift`): offsets drawn from the seed, rank and step, so a resumed run
    # draws the ones the uninterrupted run drew, and the global generator is not touched.
    shifts = torch.Generator().manual_seed((run.cfg.seed * 1_000_003 + run.state.step) * 4099 + info.rank) \
        if run.cfg.image_shift else None
    for batch in micro:
        if shifts is not None:
            batch = shift_batch_images(batch, run.cfg.image_shift, shifts)
        if run.data.skips is not None and batch.get("skips"):
            run.data.skips.update(batch["skips"])
        empty = batch["input_ids"].shape[0] == 0
        if empty and not info.enabled:
            continue
        stats = batch_stats(batch) if not empty else (0, 0, 0.0, 0)
        counts["samples"] += 0 if empty else n_samples(batch)
        counts["real_tokens"] += stats[1]
        counts["flops"] += run.flop_counter.train_step(*stats)
        batches.append(to_device(dist.stand_in_batch(run.vlm_cfg, model.image_token_id) if empty else batch,
                                 info.device))
    for loss_sum in run.trainer.accumulate(batches, scale, extra_loss=dist.vision_zero_loss):
        counts["loss"] += loss_sum.double()
    counts["grad_norm"] = run.trainer.update()
    return counts


class Window:
    """The running numbers between two log lines (summed over ranks when logged)."""

    KEYS = ("loss", "tokens", "samples", "real_tokens", "flops")

    def __init__(self, run: Run):
        self.run = run
        self.last: dict = {}
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: 0.0 for k in self.KEYS}
        self.grad_norm = None
        self.t0 = time.perf_counter()

    def add(self, counts: dict) -> None:
        for k in self.KEYS:
            self.sums[k] = self.sums[k] + counts[k]
        self.grad_norm = counts.get("grad_norm")

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, saving) is not training throughput."""
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def flush(self, lr_factor: float) -> None:
        run, state = self.run, self.run.state
        sums = torch.tensor([float(self.sums[k]) for k in self.KEYS], dtype=torch.float64, device=run.info.device)
        dist.all_reduce_sum(sums, run.info)
        loss, tokens, samples, real, flops = sums.tolist()
        dt = time.perf_counter() - self.t0
        record = {"step": state.step, "epoch": round(epoch_of(run.data, state.step * run.cfg.gradient_accumulation_steps), 4),
                  "train_loss": loss / max(tokens, 1.0), "lr": max(g["lr"] for g in run.optimizer.param_groups),
                  "lr_factor": lr_factor, "samples_per_s": samples / dt, "tokens_per_s": real / dt,
                  "mfu": flops / dt / (run.peak * run.info.world_size) if run.peak else None}
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        state.samples += int(samples)
        if state.samples == 0 and state.step > (state.resumed_at_step or 0):
            skips = run.data.skips.summary() if run.data.skips is not None else "none counted"
            raise ValueError(f"no training sample of the first {state.step} step(s) could be used ({skips}); "
                             "`nanovlm data preview data=...` shows why.")
        state.tokens += int(real)
        state.flops += flops
        self.last = record
        if run.log is not None:
            run.log.log(record)
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
        self._reset()
        if run.threads is not None:
            run.threads.adjust()


# -------------------------------------------------------------------------------- evaluation
def evaluate(run: Run, limit: int, final: bool) -> dict:
    """Validation loss and task accuracy now; logs them and keeps the best checkpoint."""
    state, info = run.state, run.info
    val = evaluation.validation_loss(run.model, run.data.val, run.data.collate, run.cfg.batch_size, info, run.amp)
    report = evaluation.accuracy(run.model, run.task, run.data, run.cfg, limit, info, run.amp,
                                 progress=final and run.bar is None and info.is_main)
    record = {"step": state.step, **({"val_loss": val} if val is not None else {}),
              **evaluation.accuracy_fields(report)}
    if final:
        record["final"] = True
    if run.log is not None:
        run.log.log(record)
        if not final:
            run.say(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in record.items()
                                                     if k != "step" and not k.endswith("_what")))
    # The best checkpoint: by held-out accuracy where the run measures it, else by validation
    # loss (never by a test split: a test split only reports).
    metric, value, higher = ("val_accuracy", record.get("val_accuracy"), True) if "val_accuracy" in record \
        else ("val_loss", val, False)
    best = state.best
    if value is not None and (best is None or best["metric"] != metric
                              or (value > best["value"] if higher else value < best["value"])):
        state.best = {"step": state.step, "metric": metric, "value": value}
        if info.is_main:
            ckpt.save_best(run.run_dir, run.model, run.tokenizer, dict(state.best))
    return {"record": record, "val": val, "report": report}


# ------------------------------------------------------------------------------- checkpoints
def save(run: Run) -> None:
    """A resumable checkpoint of the run at its current step (rank 0 writes; all wait)."""
    rngs = dist.gather_objects(ckpt.rng_state(), run.info)
    if run.info.is_main:
        state = {k: v for k, v in asdict(run.state).items() if k != "metrics"}
        state.update(data=run.data.train.state_dict(), metrics=run.log.records if run.log is not None else [])
        if run.data.skips is not None:
            state["skips"] = run.data.skips.state_dict()
        ckpt.save_checkpoint(run.run_dir, run.state.step, run.model, run.tokenizer, run.optimizer, run.schedule,
                             state, rngs, keep_last=run.cfg.keep_last)
    dist.barrier(run.info)


# ------------------------------------------------------------------------------------ finish
def finish(run: Run, final_eval: bool, t_session: float, last_record: dict) -> dict:
    """The final model, the final evaluation, the report, plot and summary."""
    from nanovlm.train.report import format_summary, plot, summarize

    info, state = run.info, run.state
    if run.bar is not None:
        run.bar.close()
        run.bar = run.say.bar = None
    if info.is_main:
        ckpt.save_final(run.run_dir, run.model, run.tokenizer)
    final = evaluate(run, run.cfg.eval_limit, final=True) if final_eval else None
    if info.is_main:  # a second measurement: one 0.3 s window can land in a burst of other load
        run.peak = max(run.peak, measure_matmul_peak(info.device, run.amp["dtype"], seconds=0.3))
    summary = summarize(run, final, last_record, time.perf_counter() - t_session)
    if info.is_main:
        from nanovlm.fileio import atomic_write_json

        if final is not None and final["report"] is not None:
            _write_report(run, final["report"])
        run.log.close()
        plot(run.log.records, os.path.join(run.run_dir, "loss.png"))
        atomic_write_json(os.path.join(run.run_dir, "summary.json"), summary)
        run.say(format_summary(summary))
        run.say(f"run folder: {run.run_dir} (final model in {os.path.join(run.run_dir, 'final')})")
    dist.barrier(info)
    return summary


def _write_report(run: Run, report: dict) -> None:
    from nanovlm.eval.tasks import format_report
    from nanovlm.fileio import atomic_write_json

    atomic_write_json(os.path.join(run.run_dir, f"eval_{report['name']}.json"), report)
    run.say(format_report(report))


class _Printer:
    """Rank-0 output that does not tear the progress bar."""

    def __init__(self, info: dist.DistInfo, bar=None):
        self.info, self.bar = info, bar

    def __call__(self, text: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


def _run_config(vlm_cfg: VLMConfig, train_cfg: TrainConfig) -> dict:
    from nanovlm.train.settings import to_dict

    return to_dict(vlm_cfg, train_cfg)
