"""The work of one training step: forward and backward of each micro-batch, then the update.

`nanovlm train` (`nanovlm.train.loop.train_step`, which adds the token counts, DDP and the data
bookkeeping around it) and `benchmarks/train_vs_original.py` run this same code:

- bf16 autocast where the hardware has fast bf16 matmuls (`TrainConfig.precision`);
- AdamW fused into one kernel where torch has it (`nanovlm.train.optim`), the gradient clip
  folded into that kernel (`clip_and_step`); the loss and the norm stay tensors (no host sync in the step);
- `TrainConfig.compile`: `torch.compile` of the model's forward (and, through AOTAutograd, its
  backward). `auto` compiles on CUDA only: on the 2-core CPU the first step of the
  nanovlm-222m shape took ~6 minutes to compile cold, and the steps after it were 5-10% faster
  in alternating runs (docs/benchmarks.md, round six). A compile that fails (no C++ compiler, an operator
  inductor cannot lower) costs one notice and the step is redone eagerly, never the run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from nanovlm.config import IGNORE_INDEX
from nanovlm.train.optim import build_optimizer, clip_and_step, fused_adamw_available


def compile_wanted(setting: str, device: torch.device) -> bool:
    """Whether `TrainConfig.compile` (auto | on | off) compiles on this device."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failing torch.compile raises (dynamo's and inductor's own)."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
        from torch._inductor import exc as inductor_exc

        errors += [inductor_exc.CppCompileError, inductor_exc.InvalidCxxCompiler, inductor_exc.OperatorIssue]
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


class Trainer:
    """A model, the module the step calls (DDP-wrapped, compiled or the model itself), the
    optimizer and the autocast settings; `accumulate` + `update` make one step."""

    def __init__(self, model, runner, optimizer, amp: dict, max_grad_norm: float,
                 say: Callable[[str], None] = print, compiled: bool = False, eager_runner=None):
        self.model, self.runner, self.optimizer, self.amp = model, runner, optimizer, amp
        self.max_grad_norm, self.say = max_grad_norm, say
        self.compiled, self.eager_runner = compiled, eager_runner if eager_runner is not None else runner
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @classmethod
    def build(cls, model, cfg, device: torch.device, say: Callable[[str], None] = print, runner=None,
              optimizer=None) -> "Trainer":
        """The pieces as `nanovlm train` builds them from a TrainConfig (runner: the model, or its
        DDP wrapper; compiled here when `cfg.compile` says so)."""
        from nanovlm.runtime import pick_dtype

        dtype = pick_dtype(cfg.precision, device)
        amp = {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}
        if optimizer is None:
            optimizer = build_optimizer(model, cfg, device, fused=fused_adamw_available(device))
        eager = model if runner is None else runner
        wanted = compile_wanted(cfg.compile, device)
        return cls(model, torch.compile(eager) if wanted else eager, optimizer, amp, cfg.max_grad_norm, say,
                   compiled=wanted, eager_runner=eager)

    def forward_backward(self, batch: dict, scale, extra_loss: Callable[[Any, dict], torch.Tensor] | None = None,
                         no_sync: bool = False) -> torch.Tensor:
        """The summed token loss of one micro-batch (detached); its gradient times `scale` is added."""
        sync = self.runner.no_sync() if no_sync and hasattr(self.runner, "no_sync") else contextlib.nullcontext()
        with sync:
            with torch.autocast(**self.amp):
                _, loss_sum = self.runner(batch["input_ids"], batch["images"], batch["attention_mask"],
                                          batch["labels"], loss_reduction="sum",
                                          position_ids=batch.get("position_ids"), return_logits=False,
                                          supervised_index=batch.get("supervised_index"))
                if extra_loss is not None:
                    loss_sum = loss_sum + extra_loss(self.model, batch)
            (loss_sum * scale).backward()
        return loss_sum.detach()

    def accumulate(self, batches: list[dict], scale, **kwargs) -> list[torch.Tensor]:
        """forward_backward over the micro-batches (the last one synchronises DDP). When the
        compiled module fails to compile, the gradients are cleared, a notice says so, and the
        micro-batches run again eagerly, as they do from then on."""
        def run() -> list[torch.Tensor]:
            return [self.forward_backward(b, scale, no_sync=i < len(batches) - 1, **kwargs)
                    for i, b in enumerate(batches)]

        if not self.compiled:
            return run()
        try:
            return run()
        except _compile_errors() as e:
            cause = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed wraps the real error
            first = (str(cause).strip().splitlines() or [""])[0][:160]
            self.say(f"torch.compile failed ({type(cause).__name__}: {first}); training continues without it "
                     "(set compile=off to skip the attempt).")
            self.compiled, self.runner = False, self.eager_runner
            self.optimizer.zero_grad(set_to_none=True)
            return run()

    def update(self) -> torch.Tensor | None:
        """Clip, step, clear the gradients; returns the gradient norm (a tensor, or None)."""
        norm = clip_and_step(self.optimizer, [p for p in self.params if p.requires_grad], self.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step(self, batches: list[dict]) -> torch.Tensor:
        """One step on one process, the loss averaged over the supervised tokens (benchmarks, tests)."""
        n = sum(int(b["supervised_index"].numel()) if "supervised_index" in b else
                int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        losses = self.accumulate(batches, 1.0 / max(n, 1))
        self.update()
        return sum(losses) / max(n, 1)
