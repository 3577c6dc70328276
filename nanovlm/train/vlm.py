"""The VLM stage: the whole model trained on the data's conversations, resumable step by step.

The loss sums over the supervised tokens of the whole global batch (all micro-batches and ranks): one big
batch's gradient, not a mean of means. A resumed run (`save`) repeats what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from nanovlm.config import IGNORE_INDEX
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train import lora
from nanovlm.train.data import n_samples, to_device, total_steps_for
from nanovlm.train.evaluation import evaluate
from nanovlm.train.optim import Schedule, vlm_optimizer
from nanovlm.train.report import FlopCounter, MetricsLog, batch_stats, measure_matmul_peak
from nanovlm.train.step import Trainer, fit, stage_budget, summed_loss


EXTEND_DROP = 0.05  # the held-out loss still falling this much between evaluations: more steps buy accuracy
EXTEND_FLOOR = 0.01  # below this loss a token (~99% sure of each answer token) there is little left to learn


def planned_seconds(run) -> float:
    """The stage's planned steps in seconds, from two timed forward-backward passes of its first batch
    (the second counts; no weight, gradient or random state is left changed)."""
    loader, model = run.data.train, run.model
    batch = to_device(loader.collate_fn([loader.dataset[i] for i in loader.sampler.rank_batch(0, 0)]), run.info.device)
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.autocast(**run.amp):
                loss = summed_loss(model, batch)
            if loss.requires_grad:
                loss.backward()
            seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds * run.cfg.gradient_accumulation_steps * run.state.total_steps


class VLMStage:
    """What the VLM stage adds to `fit`: micro-batches and their counts, logs, evaluations, checkpoints."""

    name = "VLM stage"

    def __init__(self, run):
        self.run, cfg, state, model = run, run.cfg, run.state, run.model
        state.lora_base = lora.prepare(model, run.vlm_cfg, cfg.lora, cfg.seed) if cfg.lora.lora_rank else None
        optimizer = vlm_optimizer(model, cfg, run.fused)
        schedule = Schedule(optimizer, state.total_steps, cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)
        if run.resume_from is not None:
            run.state = state = _restore(run, optimizer)
            if state.cycle_start:  # inside an extension
                schedule.cycle(state.cycle_start, state.total_steps - state.cycle_start)
            schedule.total_steps = state.total_steps  # as the interrupted run had fixed it
        run.trainer = Trainer.build(model, optimizer, schedule, run.info.device, precision=cfg.precision,
                                    compile=cfg.compile, max_grad_norm=cfg.max_grad_norm,
                                    runner=dist.wrap_model(model, run.info), say=run.say)
        run.flop_counter = FlopCounter(model, run.vlm_cfg)
        run.peak = measure_matmul_peak(run.info.device, run.amp["dtype"], seconds=0.3) if run.info.is_main else 0.0
        if run.info.is_main:
            _open_log(run)
        self.batches = run.data.train.forever()
        self.window = Window(run)
        self.last_saved = state.step if state.resumed_at_step is not None else -1

    def run_stage(self) -> None:
        run, state = self.run, self.run.state
        self.t0, self.time_before = time.perf_counter(), state.train_time_s
        spent = state.train_time_s + sum((state.warmup or {}).get(k, 0.0) for k in ("time_s", "prepare_s"))
        self.start, self.budget_s = state.step, stage_budget(run.cfg.recipe.max_train_time, spent)
        run.model.train()
        fit(run.trainer, self, state.step, self.budget_s)
        state.train_time_s = self.time_before + (time.perf_counter() - self.t0)
        if self.last_saved != state.total_steps and state.total_steps > (state.resumed_at_step or 0):
            save(run)

    def step(self, trainer: Trainer, step: int) -> dict:
        return train_step(self.run, [next(self.batches) for _ in range(self.run.cfg.gradient_accumulation_steps)])

    def after(self, done: int, counts: dict, lr_factor: float) -> None:
        run, cfg, state = self.run, self.run.cfg, self.run.state
        schedule, state.step = run.trainer.schedule, done
        if done == schedule.total_steps and (more := self.extension(done)):  # decided before the plan-end save
            schedule.cycle(done, more)
        state.total_steps, state.cycle_start = schedule.total_steps, schedule.start
        self.window.add(counts)
        is_last = done == state.total_steps
        if run.bar is not None:
            run.bar.total = state.total_steps
            run.bar.update(1)
        if done % cfg.log_interval == 0 or is_last:
            self.window.flush(lr_factor)
        if cfg.eval_interval > 0 and done % cfg.eval_interval == 0 and not is_last:
            with self.window.paused():
                evaluate(run, cfg.eval_interval_limit, final=False)
        if (cfg.save_interval > 0 and done % cfg.save_interval == 0) or is_last:
            with self.window.paused():
                state.train_time_s = self.time_before + (time.perf_counter() - self.t0)
                save(run)
                self.last_saved = done

    def more(self, step: int, elapsed_s: float) -> int:
        return 0  # `extension` decides inside `after`, so the checkpoint at the plan's end already holds it

    def extension(self, step: int) -> int:
        """Another cycle of up to the plan's steps where the held-out loss fell by EXTEND_DROP or more since the
        evaluation before and the budget has room for a quarter of the plan (0: none). One process only."""
        run, cfg, elapsed_s = self.run, self.run.cfg, time.perf_counter() - self.t0
        if not (cfg.recipe.vlm_extend and self.budget_s and run.log is not None and run.info.world_size == 1):
            return 0
        plan = total_steps_for(cfg, run.data.batches_per_epoch)
        cap = total_steps_for(cfg.replace(max_training_steps=10 ** 9), run.data.batches_per_epoch)  # max_epochs
        room = int((self.budget_s - elapsed_s) / (elapsed_s / max(1, step - self.start)))
        more = min(plan, room, cap - step)
        before = [r["val_loss"] for r in run.log.records if "val_loss" in r and r["step"] < step]
        if more < max(1, plan // 4) or not before:
            return 0
        with self.window.paused():
            now = evaluate(run, cfg.eval_interval_limit, final=False)["val"]
        if now is None or now < EXTEND_FLOOR or now > (1 - EXTEND_DROP) * before[-1]:
            return 0
        run.say(f"VLM stage: the held-out loss still fell {1 - now / before[-1]:.0%} since the last evaluation: "
                f"another {more} steps, the rate up again ({step + more} in all)")
        return more


def train_vlm(run) -> None:
    VLMStage(run).run_stage()


def _restore(run, optimizer):
    """Load the checkpoint `run.resume_from` into the model, optimizer and data; returns its RunState."""
    path, fresh = run.resume_from, [(g["base_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    saved = ckpt.load_checkpoint(path, run.model, optimizer, rank=run.info.rank,
                                 check=lambda s: lora.check_base(s.get("lora_base"), run.state.lora_base, path))
    for g, (base_lr, wd) in zip(optimizer.param_groups, fresh):  # a resumed run may change rates
        g["base_lr"], g["weight_decay"] = base_lr, wd
    run.data.train.load_state_dict(saved["data"])
    if run.data.skips is not None and "skips" in saved:
        run.data.skips.load_state_dict(saved["skips"])
    state = type(run.state)(**{k: saved[k] for k in run.state.__dataclass_fields__ if k in saved})
    state.resumed_at_step = state.step
    run.say(f"resumed from {path} at step {state.step}")
    return state


def _open_log(run) -> None:
    """The metrics log (the vision stage's curve first, in a new run), the header line, the bar."""
    cfg, state, info = run.cfg, run.state, run.info
    config = {"model": run.vlm_cfg.to_dict(), "train": cfg.to_dict()} if cfg.wandb else None
    run.log = MetricsLog(run.run_dir, state.metrics, wandb_config=config, say=run.say)
    if state.warmup is not None and state.resumed_at_step is None:
        for warm_step, loss in state.warmup.get("curve", []):
            run.log.log({"stage": "vision_warmup", "warmup_step": warm_step, "warmup_loss": loss})
        run.log.log({"stage": "vision_warmup", "step": 0, **{
            f"vision_warmup_{k}": v for k, v in state.warmup.items() if isinstance(v, (int, float, str))}})
    n_params = sum(p.numel() for p in run.model.parameters())
    if cfg.lora.lora_rank:
        n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        run.say(f"LoRA rank {cfg.lora.lora_rank} on {cfg.lora.lora_targets}: {n_train / 1e6:.2f}M of "
                f"{n_params / 1e6:.1f}M parameters train (the adapters and the projector)")
    run.say(f"training {n_params / 1e6:.1f}M parameters for {state.total_steps} steps on {info.world_size} x "
            f"{info.device.type} ({'bf16 autocast' if run.amp['enabled'] else 'fp32'}, fused AdamW "
            f"{'on' if run.fused else 'off'}, compile {'on' if run.trainer.compiled else 'off'}), global batch "
            f"{cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size}")
    if run.progress:
        run.bar = run.say.bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                                     desc="train")


def train_step(run, micro: list[dict]) -> dict:
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
    for batch in micro:
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
    for loss_sum in run.trainer.accumulate(batches, scale):
        counts["loss"] += loss_sum.double()
    counts["grad_norm"] = run.trainer.update()
    return counts


class Window:
    """The running numbers between two log lines (summed over ranks when logged)."""

    KEYS = ("loss", "tokens", "samples", "real_tokens", "flops")

    def __init__(self, run):
        self.run = run
        self._reset()

    def _reset(self) -> None:
        self.sums, self.grad_norm, self.t0 = {k: 0.0 for k in self.KEYS}, None, time.perf_counter()

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
        loss, tokens, samples, real, flops = dist.all_reduce_sum(sums, run.info).tolist()
        dt = time.perf_counter() - self.t0
        micro = state.step * run.cfg.gradient_accumulation_steps
        record = {"step": state.step, "epoch": round(micro / run.data.batches_per_epoch, 4)
                  if run.data.batches_per_epoch else 0.0,
                  "train_loss": loss / max(tokens, 1.0), "lr": max(g["lr"] for g in run.trainer.optimizer.param_groups),
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
        run.last_record = record
        if run.log is not None:
            run.log.log(record)
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
        self._reset()
        if run.threads is not None:
            run.threads.adjust()


def save(run) -> None:
    """A resumable checkpoint of the run at its current step (rank 0 writes; all wait)."""
    rngs = dist.gather_objects(ckpt.rng_state(), run.info)
    if run.info.is_main:
        state = {k: v for k, v in asdict(run.state).items() if k != "metrics"}
        state.update(data=run.data.train.state_dict(), metrics=run.log.records if run.log is not None else [])
        if run.data.skips is not None:
            state["skips"] = run.data.skips.state_dict()
        ckpt.save_checkpoint(run.run_dir, run.state.step, run.model, run.tokenizer, run.trainer.optimizer, state,
                             rngs, keep_last=run.cfg.keep_last)
    dist.barrier(run.info)

