"""The training loop: one function, `train`, that a single process and every torchrun rank run.

A step draws `gradient_accumulation_steps` micro-batches per rank. The loss is the sum of token
losses divided by the number of supervised tokens in the whole global batch (all micro-batches,
all ranks), so the gradient is exactly that of one big batch, not a mean of means; DDP's
averaging over ranks is undone by scaling with the world size. The hot path makes no host sync:
token counts come from the CPU labels, and losses stay on the device until a log step.

Order of events at a step: set the learning rate, accumulate gradients, clip, update; then log,
evaluate (validation loss, task accuracy, best checkpoint) and save, each on its own interval.
Before step 0 of a new run, `vision_warmup_steps` > 0 first trains the vision encoder alone
(`nanovlm.train.vision_warmup`). A checkpoint taken after step k restores everything (weights,
optimizer, schedule, RNG, data position, metrics), so a resumed run repeats exactly what the
uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from nanovlm.config import IGNORE_INDEX, TrainConfig, VLMConfig
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train.optim import WarmupCosine, build_optimizer, clip_grad_norm, fused_adamw_available
from nanovlm.train.report import FlopCounter, MetricsLog, batch_stats, format_summary, measure_matmul_peak, plot


@dataclass
class Data:
    """What the loop needs from the data layer."""
    train: Any  # a resumable loader: iteration yields collated batches; state_dict / load_state_dict
    val: Any | None  # map-style dataset of held-out samples (or None)
    collate: Callable[[list], dict]
    skips: Any | None = None  # a SkipCounter
    batches_per_epoch: int | None = None  # micro-batches per rank in one epoch, when known
    source: Any | None = None  # the dataset itself (a vision warm-up asks it for `image_targets()`)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(vlm_cfg: VLMConfig, train_cfg: TrainConfig, tokenizer, info: dist.DistInfo) -> Data:
    """The data `train_cfg.data` names, through `make_data`."""
    from torch.utils.data import IterableDataset

    from nanovlm.data.collators import build_collator
    from nanovlm.data.datasets import build_dataset

    dataset = build_dataset(train_cfg, vlm_cfg, tokenizer, split="train", rank=info.rank, world_size=info.world_size)
    if isinstance(dataset, IterableDataset):
        raise ValueError("streaming data is not supported by the training loop yet; set streaming=false.")
    return make_data(dataset, build_collator(train_cfg, vlm_cfg, tokenizer), train_cfg, info)


def make_data(dataset, collate: Callable[[list], dict], train_cfg: TrainConfig, info: dist.DistInfo) -> Data:
    """A map-style dataset -> the resumable, rank-sharded training loader and the held-out
    validation samples (`val_size`, at most a tenth of the data)."""
    from torch.utils.data import Subset

    from nanovlm.data.datasets import ResumableLoader, ShardedBatchSampler, SkipCounter, train_val_indices

    train_idx, val_idx = train_val_indices(len(dataset), train_cfg.val_size, train_cfg.seed)
    train_set = Subset(dataset, train_idx)
    val_set = Subset(dataset, val_idx) if val_idx else None
    global_micro = train_cfg.batch_size * info.world_size
    if len(train_set) < global_micro:
        raise ValueError(f"the training data has {len(train_set)} samples, fewer than one global batch "
                         f"(batch_size {train_cfg.batch_size} x {info.world_size} process(es)).")
    # Every rank gets a full micro-batch at every step: the short last batch of an epoch is dropped.
    sampler = ShardedBatchSampler(len(train_set), global_micro, rank=info.rank, world_size=info.world_size,
                                  seed=train_cfg.seed, shuffle=True, drop_last=True)
    loader = ResumableLoader(train_set, sampler, collate, num_workers=train_cfg.num_workers,
                             pin_memory=info.device.type == "cuda")
    return Data(train=loader, val=val_set, collate=collate, skips=SkipCounter(strict=train_cfg.strict),
                batches_per_epoch=len(sampler), source=dataset)


def total_steps_for(train_cfg: TrainConfig, data: Data) -> int:
    steps = train_cfg.max_training_steps
    if train_cfg.max_epochs and data.batches_per_epoch:
        steps = min(steps, max(1, train_cfg.max_epochs * data.batches_per_epoch // train_cfg.gradient_accumulation_steps))
    return steps


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "position_ids", "supervised_index"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    images = batch.get("images")
    if isinstance(images, (list, tuple)):
        out["images"] = [x.to(device, non_blocking=True) for x in images]
    elif isinstance(images, torch.Tensor):
        out["images"] = images.to(device, non_blocking=True)
    return out


def _dummy_batch(cfg: VLMConfig, image_token_id: int) -> dict:
    """One image and no supervised token: under DDP, a rank whose micro-batch lost every sample
    to skips runs this so that all parameters still join the gradient all-reduce (with zeros)."""
    n = cfg.mp_image_token_length
    ids = torch.full((1, n + 1), image_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "images": [torch.zeros(1, 3, cfg.vit_img_size, cfg.vit_img_size)]}


def _has_images(batch: dict) -> bool:
    images = batch.get("images")
    if isinstance(images, torch.Tensor):
        return images.numel() > 0
    return any(img is not None and img.numel() > 0 for img in images or ())


def _vision_ghost(model: VisionLanguageModel) -> torch.Tensor:
    """0 x the projector's output for one blank image. Added to the loss of a micro-batch that
    holds no image (text-only samples), so the vision tower and projector still get (zero)
    gradients: under DDP every rank then all-reduces the same parameters (a rank without them
    would break the collective), and one process takes the same optimizer steps as many."""
    size = model.cfg.vit_img_size
    blank = torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype)
    return model.MP(model.vision_encoder(blank)).sum() * 0.0


def _n_samples(batch: dict) -> int:
    """Samples in a batch: one per row, or the packed samples of each row."""
    if "n_samples" in batch:
        return int(batch["n_samples"])
    ids = batch.get("ids")
    if ids and isinstance(ids[0], (list, tuple)):
        return sum(len(row) for row in ids)
    return int(batch["input_ids"].shape[0])


@torch.no_grad()
def validation_loss(model, val_set, collate, batch_size: int, info: dist.DistInfo, amp: dict) -> float | None:
    """Mean loss per supervised token over the held-out samples (shared out over the ranks)."""
    if val_set is None or len(val_set) == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    indices = list(range(len(val_set)))[info.rank::info.world_size]
    for start in range(0, len(indices), batch_size):
        batch = collate([val_set[i] for i in indices[start:start + batch_size]])
        if batch["input_ids"].shape[0] == 0:
            continue
        batch = _to_device(batch, info.device)
        with torch.autocast(**amp):
            _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"],
                            loss_reduction="sum", position_ids=batch.get("position_ids"), return_logits=False,
                            supervised_index=batch.get("supervised_index"))
        total[0] += loss.double()
        total[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
    dist.all_reduce_sum(total, info)
    return float(total[0] / total[1]) if total[1] > 0 else None


def task_accuracy(model, train_cfg: TrainConfig, limit: int, info: dist.DistInfo, amp: dict,
                  progress: bool = False) -> dict | None:
    """Exact-match accuracy on the task's test questions through greedy generation."""
    if train_cfg.eval_task != "easyvqa":
        return None
    from nanovlm.eval import easyvqa

    return easyvqa.evaluate(model, "test", limit, train_cfg.eval_batch_size, rank=info.rank,
                            world_size=info.world_size, gather=lambda x: dist.gather_objects(x, info),
                            autocast_dtype=amp["dtype"] if amp["enabled"] else None, progress=progress)


def _accuracy_fields(report: dict | None) -> dict:
    if report is None:
        return {}
    out = {"accuracy": report["accuracy"]}
    for t, e in report["per_type"].items():
        if e["n"]:
            out[f"accuracy_{t.replace('/', '_')}"] = e["accuracy"]
    return out


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


def train(vlm_cfg: VLMConfig, train_cfg: TrainConfig, run_dir: str, *, resume: bool = False,
          info: dist.DistInfo | None = None, data: Data | None = None, tokenizer=None, progress: bool = True,
          final_eval: bool = True) -> dict:
    """Train, checkpoint, evaluate; returns the summary (also written to run_dir/summary.json).

    `data` and `tokenizer` default to what the configs name (tests pass small stand-ins)."""
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import keep_freed_memory, pick_dtype

    t_session = time.perf_counter()
    info = info or dist.DistInfo()
    device = info.device
    if device.type == "cpu":
        keep_freed_memory()
    say = _Printer(info)
    A = train_cfg.gradient_accumulation_steps

    resume_from = None
    if resume:
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(run_dir, 'checkpoints')}; "
                                    "run without --resume to start a new run.")

    seed_everything(train_cfg.seed)
    model = VisionLanguageModel(vlm_cfg, load_backbone=vlm_cfg.vlm_load_backbone_weights).to(device)
    if tokenizer is None:
        tokenizer = model.tokenizer
    else:
        model.tokenizer = tokenizer
    if data is None:
        data = build_data(vlm_cfg, train_cfg, tokenizer, info)
    fused = fused_adamw_available(device)
    dtype = pick_dtype(train_cfg.precision, device)
    amp = {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}
    warmup_s = 0.0
    if train_cfg.vision_warmup_steps and resume_from is None:  # a checkpoint holds the warmed-up encoder
        warmup_s = _vision_warmup(model, data, train_cfg, amp, fused, info, say, progress)
    optimizer = build_optimizer(model, train_cfg, device, fused=fused)
    total_steps = total_steps_for(train_cfg, data)
    schedule = WarmupCosine(optimizer, total_steps, train_cfg.warmup_ratio, train_cfg.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]

    state: dict[str, Any] = {"step": 0, "best_val_loss": None, "metrics": [], "train_time_s": 0.0,
                             "samples": 0, "tokens": 0, "flops": 0.0, "vision_warmup_s": warmup_s}
    if resume_from is not None:
        fresh = [(g["base_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        saved = ckpt.load_checkpoint(resume_from, model, optimizer, schedule, rank=info.rank)
        for g, (base_lr, wd) in zip(optimizer.param_groups, fresh):  # a resumed run may change rates
            g["base_lr"], g["weight_decay"] = base_lr, wd
        data.train.load_state_dict(saved["data"])
        if data.skips is not None and "skips" in saved:
            data.skips.load_state_dict(saved["skips"])
        state.update({k: saved[k] for k in state if k in saved})
        say(f"resumed from {resume_from} at step {state['step']}")
    start_step = state["step"]
    flops = FlopCounter(model, vlm_cfg)
    peak = measure_matmul_peak(device, dtype, seconds=0.3) if info.is_main else 0.0

    runner = dist.wrap_model(model, info)
    if train_cfg.compile:
        runner = torch.compile(runner)

    log = MetricsLog(run_dir, state["metrics"], wandb_config=ckpt_config(vlm_cfg, train_cfg) if train_cfg.wandb
                     else None) if info.is_main else None
    bar = None
    if info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
    say.bar = bar
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        say(f"training {n_params / 1e6:.1f}M parameters for {total_steps} steps on {info.world_size} x {device.type} "
            f"({'bf16 autocast' if amp['enabled'] else 'fp32'}, fused AdamW {'on' if fused else 'off'}), "
            f"global batch {train_cfg.batch_size * A * info.world_size}")

    def evaluate_now(step: int, limit: int, final: bool) -> dict:
        val = validation_loss(model, data.val, data.collate, train_cfg.batch_size, info, amp)
        report = task_accuracy(model, train_cfg, limit, info, amp, progress=final and progress and info.is_main)
        record = {"step": step, **({"val_loss": val} if val is not None else {}), **_accuracy_fields(report)}
        return {"record": record, "val": val, "report": report}

    batches = data.train.forever() if hasattr(data.train, "forever") else iter(data.train)
    model.train()
    image_token_id = model.image_token_id
    window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "tokens": 0, "samples": 0,
              "real_tokens": 0, "flops": 0.0, "steps": 0, "t0": time.perf_counter()}
    grad_norm = None
    last_saved = start_step if resume_from is not None else -1
    last_record: dict = {}
    t_train = time.perf_counter()
    train_time_before = state["train_time_s"]

    for step in range(start_step, total_steps):
        lr_factor = schedule.apply(step)
        micro = [next(batches) for _ in range(A)]
        n_sup = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        if info.enabled:
            n_global = dist.all_reduce_sum(torch.tensor([float(n_sup)], device=device), info)
            scale = info.world_size / n_global.clamp(min=1.0)
        else:
            scale = 1.0 / max(n_sup, 1)
        for i, batch in enumerate(micro):
            if data.skips is not None and batch.get("skips"):
                data.skips.update(batch["skips"])
            empty = batch["input_ids"].shape[0] == 0
            if empty and not info.enabled:
                continue
            stats = batch_stats(batch) if not empty else (0, 0, 0.0, 0)
            window["samples"] += 0 if empty else _n_samples(batch)
            window["real_tokens"] += stats[1]
            window["flops"] += flops.train_step(*stats)
            batch = _to_device(_dummy_batch(vlm_cfg, image_token_id) if empty else batch, device)
            sync = runner.no_sync() if info.enabled and i < A - 1 and hasattr(runner, "no_sync") \
                else contextlib.nullcontext()
            with sync:
                with torch.autocast(**amp):
                    _, loss_sum = runner(batch["input_ids"], batch["images"], batch["attention_mask"],
                                         batch["labels"], loss_reduction="sum",
                                         position_ids=batch.get("position_ids"), return_logits=False,
                                         supervised_index=batch.get("supervised_index"))
                    if not _has_images(batch):
                        loss_sum = loss_sum + _vision_ghost(model)
                (loss_sum * scale).backward()
            window["loss"] += loss_sum.detach().double()
        window["tokens"] += n_sup
        grad_norm = clip_grad_norm(params, train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window["steps"] += 1
        done = step + 1
        if bar is not None:
            bar.update(1)

        is_last = done == total_steps
        if done % max(1, train_cfg.log_interval) == 0 or is_last:
            sums = torch.tensor([float(window["loss"]), window["tokens"], window["samples"], window["real_tokens"],
                                 window["flops"]], dtype=torch.float64, device=device)
            dist.all_reduce_sum(sums, info)
            dt = time.perf_counter() - window["t0"]
            loss_v, tok_v, samples_v, real_v, flops_v = sums.tolist()
            record = {"step": done, "epoch": round(_epoch(data, done * A), 4),
                      "train_loss": loss_v / max(tok_v, 1.0), "lr": max(g["lr"] for g in optimizer.param_groups),
                      "lr_factor": lr_factor, "samples_per_s": samples_v / dt, "tokens_per_s": real_v / dt,
                      "mfu": flops_v / dt / (peak * info.world_size) if peak else None}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            state["samples"] += int(samples_v)
            state["tokens"] += int(real_v)
            state["flops"] += flops_v
            last_record = record
            if log is not None:
                log.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
            window.update(loss=torch.zeros_like(window["loss"]), tokens=0, samples=0, real_tokens=0, flops=0.0,
                          steps=0, t0=time.perf_counter())

        if train_cfg.eval_interval > 0 and done % train_cfg.eval_interval == 0 and not is_last:
            t_eval = time.perf_counter()
            result = evaluate_now(done, train_cfg.eval_interval_limit, final=False)
            if log is not None:
                log.log(result["record"])
                say(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["record"].items() if k != "step"))
            if result["val"] is not None and (state["best_val_loss"] is None or result["val"] < state["best_val_loss"]):
                state["best_val_loss"] = result["val"]
                if info.is_main:
                    ckpt.save_best(run_dir, model, tokenizer, {"step": done, "val_loss": result["val"]})
            window["t0"] += time.perf_counter() - t_eval  # evaluation time is not training throughput

        if (train_cfg.save_interval > 0 and done % train_cfg.save_interval == 0) or is_last:
            t_save = time.perf_counter()
            state["step"] = done
            state["train_time_s"] = train_time_before + (time.perf_counter() - t_train)
            _save(run_dir, model, tokenizer, optimizer, schedule, data, state, log, info, train_cfg.keep_last)
            last_saved = done
            window["t0"] += time.perf_counter() - t_save

    if bar is not None:
        bar.close()
        say.bar = None
    state["step"] = total_steps
    state["train_time_s"] = train_time_before + (time.perf_counter() - t_train)
    if last_saved != total_steps and total_steps > start_step:
        _save(run_dir, model, tokenizer, optimizer, schedule, data, state, log, info, train_cfg.keep_last)

    # ---- the end: final model, full evaluation, summary
    if info.is_main:
        ckpt.save_final(run_dir, model, tokenizer)
    final = evaluate_now(total_steps, train_cfg.eval_limit, final=True) if final_eval else None
    if final is not None and final["val"] is not None and (state["best_val_loss"] is None
                                                           or final["val"] < state["best_val_loss"]):
        state["best_val_loss"] = final["val"]
        if info.is_main:
            ckpt.save_best(run_dir, model, tokenizer, {"step": total_steps, "val_loss": final["val"]})
    if info.is_main:  # a second measurement: one 0.3 s window can land in a burst of other load
        peak = max(peak, measure_matmul_peak(device, dtype, seconds=0.3))
    summary = _summary(train_cfg, info, model, amp, fused, peak, state, last_record, final, data, t_session,
                       total_steps, start_step)
    if info.is_main:
        from nanovlm.fileio import atomic_write_json

        if final is not None:
            log.log(final["record"])
            if final["report"] is not None:
                from nanovlm.eval import easyvqa

                atomic_write_json(os.path.join(run_dir, "eval_easyvqa_test.json"), final["report"])
                say(easyvqa.format_report(final["report"]))
                say("a few answered test questions:\n" + easyvqa.format_examples(final["report"]))
        log.close()
        plot(log.records, os.path.join(run_dir, "loss.png"))
        atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
        say(format_summary(summary))
        say(f"run folder: {run_dir} (final model in {os.path.join(run_dir, 'final')})")
    dist.barrier(info)
    return summary


def _vision_warmup(model, data: Data, train_cfg: TrainConfig, amp: dict, fused: bool, info: dist.DistInfo,
                   say: Callable[[str], None], progress: bool) -> float:
    """Run the vision warm-up (`nanovlm.train.vision_warmup`) on the dataset's per-image labels;
    returns its seconds."""
    from nanovlm.train.vision_warmup import vision_warmup

    targets = getattr(data.source, "image_targets", None)
    if targets is None:
        raise ValueError(f"vision_warmup_steps={train_cfg.vision_warmup_steps} needs images with labels of their "
                         f"own, which data=easyvqa has and data={train_cfg.data} does not; set vision_warmup_steps=0.")
    result = vision_warmup(model, targets(), train_cfg.vision_warmup_steps, train_cfg.vision_warmup_lr,
                           train_cfg.vision_warmup_batch_size, seed=train_cfg.seed, amp=amp, fused=fused, say=say,
                           progress=progress and info.is_main)
    return result["time_s"]


def ckpt_config(vlm_cfg: VLMConfig, train_cfg: TrainConfig) -> dict:
    from nanovlm.train.settings import to_dict

    return to_dict(vlm_cfg, train_cfg)


def _epoch(data: Data, micro_batches: int) -> float:
    return micro_batches / data.batches_per_epoch if data.batches_per_epoch else 0.0


def _save(run_dir, model, tokenizer, optimizer, schedule, data, state, log, info, keep_last) -> None:
    rngs = dist.gather_objects(ckpt.rng_state(), info)
    if info.is_main:
        saved_state = {
            "step": state["step"], "best_val_loss": state["best_val_loss"], "train_time_s": state["train_time_s"],
            "samples": state["samples"], "tokens": state["tokens"], "flops": state["flops"],
            "vision_warmup_s": state["vision_warmup_s"], "data": data.train.state_dict(),
            "metrics": log.records if log is not None else [],
        }
        if data.skips is not None:
            saved_state["skips"] = data.skips.state_dict()
        ckpt.save_checkpoint(run_dir, state["step"], model, tokenizer, optimizer, schedule, saved_state, rngs,
                             keep_last=keep_last)
    dist.barrier(info)


def _summary(train_cfg, info, model, amp, fused, peak, state, last_record, final, data, t_session,
             total_steps, start_step) -> dict:
    train_time = state["train_time_s"]
    summary = {
        "steps": total_steps,
        "resumed_at_step": start_step if start_step else None,
        "epochs": round(_epoch(data, total_steps * train_cfg.gradient_accumulation_steps), 3),
        "global_batch": train_cfg.batch_size * train_cfg.gradient_accumulation_steps * info.world_size,
        "processes": info.world_size,
        "device": info.device.type,
        "precision": "bf16 autocast" if amp["enabled"] else "fp32",
        "fused_adamw": fused,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(time.perf_counter() - t_session, 2),
        "train_time_s": round(train_time, 2),
        "vision_warmup_s": round(state["vision_warmup_s"], 2) if train_cfg.vision_warmup_steps else None,
        "samples": state["samples"],
        "samples_per_s": state["samples"] / train_time if train_time > 0 else None,
        "tokens_per_s": state["tokens"] / train_time if train_time > 0 else None,
        "model_tflops": state["flops"] / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": state["flops"] / train_time / (peak * info.world_size) if train_time > 0 and peak else None,
        "final_train_loss": last_record.get("train_loss"),
        "best_val_loss": state["best_val_loss"],
    }
    if final is not None:
        if final["val"] is not None:
            summary["val_loss"] = final["val"]
        if final["report"] is not None:
            rep = final["report"]
            summary["test_accuracy"] = rep["accuracy"]
            summary["test_questions"] = rep["n"]
            summary["test_accuracy_per_type"] = {t: e["accuracy"] for t, e in rep["per_type"].items() if e["n"]}
            summary["eval_time_s"] = rep["wall_time_s"]
    if data.skips is not None and getattr(data.skips, "total", 0):
        summary["skipped_samples"] = data.skips.as_dict()
    if info.device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 1e9
    return summary
