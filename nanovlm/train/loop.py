"""A training run, which a single process and every torchrun rank run: `train`.

The recipe's stages run in order (the vision stage in a new run only, then the VLM stage); the
machine's tuning is entered once, around it all (`runtime.prepare`).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from nanovlm import runtime
from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.data.tokenizer import tokenizer_for
from nanovlm.eval import vqa
from nanovlm.eval.tasks import resolve_task
from nanovlm.fileio import atomic_write_json
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train import lora, settings
from nanovlm.train.data import Data, build_data, make_data, total_steps_for
from nanovlm.train.evaluation import evaluate
from nanovlm.train.optim import fused_adamw_available
from nanovlm.train.report import format_summary, measure_matmul_peak, plot, summarize
from nanovlm.train.vision import warm_up_vision
from nanovlm.train.vlm import planned_seconds, train_vlm
from nanovlm.weights.nanovlm import load_state

__all__ = ["Data", "RunState", "build_data", "make_data", "seed_everything", "train"]  # make_data: benchmarks


@dataclass
class RunState:
    """Everything about a run that a checkpoint must carry besides weights and optimizer."""
    step: int = 0
    total_steps: int = 0
    cycle_start: int = 0  # where the VLM stage's last learning-rate cycle began (an extension's)
    best: dict | None = None  # {"step", "metric", "value"} of the kept best checkpoint
    train_time_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    warmup: dict | None = None  # the vision stage's summary
    resumed_at_step: int | None = None
    lora_base: dict | None = None  # a LoRA run: the base weights its adapters train on (train/lora.py)
    metrics: list = field(default_factory=list)


@dataclass
class Run:
    """What the stages of a run share (built by `setup`; the VLM stage adds its trainer and log)."""
    vlm_cfg: VLMConfig
    cfg: TrainConfig
    run_dir: str
    info: dist.DistInfo
    model: Any
    tokenizer: Any
    data: Data
    amp: dict
    fused: bool
    task: str
    state: RunState
    say: Callable[[str], None]
    progress: bool
    resume_from: str | None = None  # the checkpoint a resumed run continues from
    threads: Any = None  # runtime.Threads on a CPU: follows what other programs leave free
    trainer: Any = None
    log: Any = None
    bar: Any = None
    peak: float = 0.0
    flop_counter: Any = None
    last_record: dict = field(default_factory=dict)  # the last logged training numbers
    vlm_plan_s: float | None = None  # the VLM stage's planned seconds, where timed before it


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stages(run: Run) -> list[Callable[[Run], None]]:
    return ([warm_up_vision] if run.cfg.recipe.vision_warmup != "off" and run.resume_from is None else []) + [train_vlm]


def train(vlm_cfg: VLMConfig, cfg: TrainConfig, run_dir: str, *, resume: bool = False,
          info: dist.DistInfo | None = None, data: Data | None = None, tokenizer=None, progress: bool = True,
          final_eval: bool = True, fitted_size: bool = False) -> dict:
    """Train, checkpoint, evaluate; returns summary.json's summary (`data`, `tokenizer`: the configs' by default).
    `fitted_size`: vlm_cfg's max_img_size was fitted to the pictures, and may drop to one tile (`fits_machine`)."""
    t_session, info = time.perf_counter(), info or dist.DistInfo()
    say = Printer(info)
    with runtime.prepare(info.device, cfg.recipe.threads, say) as threads:
        run = setup(vlm_cfg, cfg, run_dir, resume, info, data, tokenizer, progress, say, threads)
        if fitted_size and not fits_machine(run):
            vlm_cfg = vlm_cfg.replace(max_img_size=vlm_cfg.vit_img_size)
            run = setup(vlm_cfg, cfg, run_dir, resume, info, data, tokenizer, progress, say, threads)
            if info.is_main:  # what a --resume continues with
                atomic_write_json(os.path.join(run_dir, "config.json"), settings.to_dict(vlm_cfg, cfg))
        for stage in stages(run):
            stage(run)
        return finish(run, final_eval, t_session)


def setup(vlm_cfg: VLMConfig, cfg: TrainConfig, run_dir: str, resume: bool, info: dist.DistInfo, data: Data | None,
          tokenizer, progress: bool, say, threads) -> Run:
    """The model and data of a new or resumed run, and the state its stages share."""
    task = resolve_task(cfg.eval_task, cfg.data)
    resume_from = ckpt.latest_good_checkpoint(run_dir, say) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(run_dir, 'checkpoints')}; "
                                "run without --resume to start a new run.")
    lora.check_run(vlm_cfg, cfg)
    seed_everything(cfg.seed)
    if cfg.init_from:
        model = _initial_model(vlm_cfg, cfg.init_from).to(info.device)
        tokenizer = tokenizer or model.tokenizer
    else:
        model = VisionLanguageModel(vlm_cfg, load_backbone=vlm_cfg.vlm_load_backbone_weights).to(info.device)
    model.tokenizer = tokenizer = tokenizer or tokenizer_for(vlm_cfg)
    data = data or build_data(vlm_cfg, cfg, tokenizer, info, say)
    cfg = cfg.replace(batch_size=data.batch_size or cfg.batch_size,
                      vision_warmup_batch_size=data.vision_batch_size or cfg.recipe.vision_warmup_batch_size)
    state = RunState(total_steps=total_steps_for(cfg, data.batches_per_epoch))
    return Run(vlm_cfg, cfg, run_dir, info, model, tokenizer, data, runtime.autocast_args(cfg.precision, info.device),
               fused_adamw_available(info.device), task, state, say, progress, resume_from, threads)


def fits_machine(run: Run) -> bool:
    """Whether the VLM stage's planned steps at the run's image size fit its time budget. Where they do not, more
    steps at one tile learn more than fewer at the pictures' size (docs/training.md). A multi-process run keeps
    its size: its ranks would time apart."""
    budget, size = run.cfg.recipe.max_train_time, run.vlm_cfg.max_img_size
    if not budget or run.info.world_size > 1 or size <= run.vlm_cfg.vit_img_size:
        return True
    run.vlm_plan_s = planned_seconds(run)
    verdict = "fit" if run.vlm_plan_s <= budget else "do not fit"
    run.say(f"image size: the VLM stage's {run.state.total_steps} steps at max_img_size={size} take "
            f"{run.vlm_plan_s:.1f} s here, and {verdict} the {budget:.1f} s budget"
            + ("" if run.vlm_plan_s <= budget else f"; one {run.vlm_cfg.vit_img_size} px tile instead"))
    return run.vlm_plan_s <= budget


def _initial_model(vlm_cfg: VLMConfig, source: str):
    """`init_from`'s model, rebuilt for `vlm_cfg` where settings on top changed it (every tensor must fit)."""
    model = VisionLanguageModel.from_pretrained(source, require_tokenizer=True).float()
    if model.cfg == vlm_cfg:
        return model
    rebuilt = VisionLanguageModel(vlm_cfg, load_backbone=False)
    load_state(rebuilt, model.state_dict_for_saving(), source=f"init_from={source}")
    rebuilt.tokenizer = model.tokenizer
    return rebuilt


def finish(run: Run, final_eval: bool, t_session: float) -> dict:
    """The final model, the final evaluation, the report, plot and summary."""
    info = run.info
    if run.bar is not None:
        run.bar.close()
        run.bar = run.say.bar = None
    if info.is_main:
        ckpt.write_dir(os.path.join(run.run_dir, "final"), run.model, run.tokenizer)
    final = evaluate(run, run.cfg.eval_limit, final=True) if final_eval else None
    if info.is_main:  # a second measurement: one 0.3 s window can land in a burst of other load
        run.peak = max(run.peak, measure_matmul_peak(info.device, run.amp["dtype"], seconds=0.3))
    summary = summarize(run, final, time.perf_counter() - t_session)
    if info.is_main:
        if final is not None and final["report"] is not None:
            atomic_write_json(os.path.join(run.run_dir, f"eval_{final['report']['name']}.json"), final["report"])
            run.say(vqa.format_report(final["report"], title=final["report"]["what"]))
        run.log.close()
        plot(run.log.records, os.path.join(run.run_dir, "loss.png"))
        atomic_write_json(os.path.join(run.run_dir, "summary.json"), summary)
        run.say(format_summary(summary))
        run.say(f"run folder: {run.run_dir} (final model in {os.path.join(run.run_dir, 'final')})")
    dist.barrier(info)
    return summary


class Printer:
    """Rank-0 output that does not tear the progress bar."""

    def __init__(self, info: dist.DistInfo):
        self.info, self.bar = info, None

    def __call__(self, text: str) -> None:
        if self.info.is_main and self.bar is not None:
            self.bar.write(text)
        elif self.info.is_main:
            print(text, flush=True)
