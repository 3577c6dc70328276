"""The trainer every stage runs on, `fit` (the one training loop), and the time budget stages share.

A stage brings its batches and its loss; `Trainer` does the step alike for all (as nanochat's stages
share one engine). With `max_train_time`, steps are cut to fit once CALIBRATION_STEPS are timed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.runtime import autocast_args
from nanovlm.train.distributed import vision_zero_loss
from nanovlm.train.optim import Schedule, clip_and_step

CALIBRATION_STEPS = 20  # steps timed before a budget fixes the step count
VISION_SHARE = 0.6  # of max_train_time, at most, for the vision stage


def fit_steps(total: int, done: int, elapsed_s: float, budget_s: float) -> int:
    """The steps that fit the budget after `done` took `elapsed_s` (within [done, total])."""
    if done <= 0:
        return total
    return max(done, min(total, done + int((budget_s - elapsed_s) / (elapsed_s / done))))


def stage_budget(max_train_time: float, spent_s: float) -> float | None:
    """Seconds the last stage may take: the budget less what earlier stages spent (None: no budget)."""
    return max_train_time - spent_s if max_train_time else None


def vision_budget(max_train_time: float, vision_plan_s: float, vlm_plan_s: float) -> float:
    """The vision stage's seconds: at most VISION_SHARE of the budget, and where the two stages' planned
    seconds do not both fit, its proportional share (a slow machine cuts both stages alike)."""
    fair = max_train_time * vision_plan_s / max(1e-9, vision_plan_s + vlm_plan_s)
    return min(VISION_SHARE * max_train_time, max(fair, max_train_time - vlm_plan_s))


def auto_skip(vcfg, init_from: str | None) -> str | None:
    """Why `vision_warmup=auto` skips the stage (None: it runs). A pretrained encoder beside a new language
    model still runs it: the encoder learns the data's questions before the language model must read it."""
    if init_from:
        return f"the model starts from {init_from}"
    if vcfg.vlm_load_backbone_weights and vcfg.vit_model_type and vcfg.lm_model_type:
        return f"both towers start from pretrained weights ({vcfg.vit_model_type}, {vcfg.lm_model_type})"
    return None


def summed_loss(model, batch: dict) -> torch.Tensor:
    """The VLM's loss on a collated batch, summed over its supervised tokens."""
    return model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"], loss_reduction="sum",
                 position_ids=batch.get("position_ids"), return_logits=False,
                 supervised_index=batch.get("supervised_index"))[1]


def compile_wanted(setting: str, device: torch.device) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failing torch.compile raises (dynamo's and inductor's own)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor import exc

        return TorchDynamoException, exc.CppCompileError, exc.InvalidCxxCompiler, exc.OperatorIssue
    except (ImportError, AttributeError):
        return ()


class Trainer:
    """Model, `runner` (it, its DDP wrapper or compiled form), optimizer, schedule and `loss(runner, batch)`."""

    def __init__(self, model, runner, optimizer, schedule: Schedule | None, amp: dict, max_grad_norm: float,
                 say: Callable[[str], None] = print, loss: Callable[[Any, dict], torch.Tensor] | None = None,
                 compiled: bool = False, eager_runner=None):
        self.model, self.runner, self.optimizer, self.schedule, self.amp = model, runner, optimizer, schedule, amp
        self.max_grad_norm, self.say, self.loss = max_grad_norm, say, loss or self.vlm_loss
        self.compiled, self.eager_runner = compiled, eager_runner if eager_runner is not None else runner
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @classmethod
    def build(cls, model, optimizer, schedule: Schedule | None, device: torch.device, *, precision: str = "auto",
              compile: str = "off", max_grad_norm: float = 1.0, runner=None,
              say: Callable[[str], None] = print) -> "Trainer":
        """The VLM's trainer (`runner`: the model or its DDP wrapper, compiled here when asked)."""
        eager = model if runner is None else runner
        wanted = compile_wanted(compile, device)
        return cls(model, torch.compile(eager) if wanted else eager, optimizer, schedule,
                   autocast_args(precision, device), max_grad_norm, say, compiled=wanted, eager_runner=eager)

    def vlm_loss(self, runner, batch: dict) -> torch.Tensor:
        return summed_loss(runner, batch) + vision_zero_loss(self.model, batch)

    def forward_backward(self, batch: dict, scale, no_sync: bool = False) -> torch.Tensor:
        """The summed loss of one micro-batch (detached); its gradient times `scale` is added."""
        sync = self.runner.no_sync() if no_sync and hasattr(self.runner, "no_sync") else contextlib.nullcontext()
        with sync:
            with torch.autocast(**self.amp):
                loss_sum = self.loss(self.runner, batch)
            (loss_sum * scale).backward()
        return loss_sum.detach()

    def accumulate(self, batches: list[dict], scale) -> list[torch.Tensor]:
        """forward_backward over the micro-batches; a failed compile says so and reruns them eagerly."""
        def run() -> list[torch.Tensor]:
            return [self.forward_backward(b, scale, no_sync=i < len(batches) - 1) for i, b in enumerate(batches)]

        try:
            return run()
        except _compile_errors() as e:
            if not self.compiled:
                raise
            cause = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed wraps the real error
            first = (str(cause).strip().splitlines() or [""])[0][:160]
            self.say(f"torch.compile failed ({type(cause).__name__}: {first}); training continues without it "
                     "(set compile=off to skip the attempt).")
            self.compiled, self.runner = False, self.eager_runner
            self.optimizer.zero_grad(set_to_none=True)
            return run()

    def update(self) -> torch.Tensor | None:
        norm = clip_and_step(self.optimizer, [p for p in self.params if p.requires_grad], self.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step(self, batches: list[dict]) -> torch.Tensor:
        """One step on one process, the loss averaged over the supervised tokens (benchmarks, tests)."""
        n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        losses = self.accumulate(batches, 1.0 / max(n, 1))
        self.update()
        return sum(losses) / max(n, 1)


def fit(trainer: Trainer, stage, start: int, budget_s: float | Callable[[float], float] | None) -> int:
    """Run `stage` (`step`, `after`, `more`: another cycle) from step `start` to the schedule's end; the last step.
    `budget_s` may be a function of the planned steps' seconds, asked once CALIBRATION_STEPS are timed."""
    schedule, t0, step = trainer.schedule, time.perf_counter(), start
    while step < schedule.total_steps:
        if budget_s is not None and step == start + CALIBRATION_STEPS:
            elapsed, planned = time.perf_counter() - t0, schedule.total_steps
            if callable(budget_s):
                budget_s = budget_s(elapsed / (step - start) * (planned - start))
            schedule.total_steps = start + fit_steps(planned - start, step - start, elapsed, budget_s)
            if schedule.total_steps < planned:
                trainer.say(f"{stage.name}: {schedule.total_steps} of {planned} steps fit its {budget_s:.0f} s of "
                            f"max_train_time ({elapsed / (step - start):.2f} s a step)")
        factor = schedule.apply(step)
        result = stage.step(trainer, step)
        step += 1
        stage.after(step, result, factor)
        if step == schedule.total_steps and (more := stage.more(step, time.perf_counter() - t0)):
            schedule.cycle(step, more)
    return step
