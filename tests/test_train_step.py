"""The training step's work (`nanovlm.train.step`): compiled or eager, the same training.

Compiling is slow to warm up (minutes for the tiny preset on a busy 2-core machine), so one
`slow` test compiles for real, through the training loop; the fallback and the setting are
checked in the fast tier with a stand-in compile.
"""

from __future__ import annotations

import pytest
import torch

from nanovlm.config import TrainConfig
from nanovlm.train import step as train_step
from test_train_synthetic import final_weights, losses, run_synthetic, tiny_configs
from tolerances import assert_same_adam_training


def test_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [train_step.compile_wanted(s, cpu) for s in ("auto", "on", "off")] == [False, True, False]
    assert [train_step.compile_wanted(s, cuda) for s in ("auto", "on", "off")] == [True, True, False]


@pytest.mark.slow  # two compiles (the first shapes, then dynamic ones): minutes on a busy 2-core machine
def test_the_loop_trains_the_same_compiled(tmp_path):
    """3 steps of the tiny preset through `nanovlm train`'s loop, compile=on against compile=off.
    The batches differ in length, so the compiled run also recompiles (dynamic shapes).
    Tolerance: inductor fuses and reorders the fp32 reductions, which changes the last bits
    (2**-24 relative per rounding) of a loss that sums a few hundred terms through ~20
    operations each: 1e-5 relative. The weights: as for any two runs whose fp32 sums differ in
    order, `tolerances.assert_same_adam_training`."""
    run_synthetic(tmp_path / "eager", max_training_steps=3, compile="off")
    run_synthetic(tmp_path / "compiled", max_training_steps=3, compile="on")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [s for s, _ in eager] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([l for _, l in compiled]), torch.tensor([l for _, l in eager]),
                               rtol=1e-5, atol=0.0)
    cfg = tiny_configs()[1]
    lr = max(cfg.lr_mp, cfg.lr_vision_backbone, cfg.lr_language_backbone)
    assert_same_adam_training(final_weights(tmp_path / "compiled"), final_weights(tmp_path / "eager"), lr, steps=3)


class _BrokenCompile(torch.nn.Module):
    """What torch.compile returns on a machine without a C++ compiler: fails when first called."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        from torch._dynamo.exc import BackendCompilerFailed

        cause = RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        raise BackendCompilerFailed(lambda: None, cause, None)


def test_a_failing_compile_falls_back_with_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: _BrokenCompile(module))
    run_synthetic(tmp_path / "fallback", max_training_steps=2, compile="on")
    failed = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert len(failed) == 1, failed
    assert failed[0].endswith("training continues without it (set compile=off to skip the attempt).")
    run_synthetic(tmp_path / "eager", max_training_steps=2, compile="off")
    # the step redone eagerly is the eager step: the same numbers, bit for bit
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")
    a, b = final_weights(tmp_path / "fallback"), final_weights(tmp_path / "eager")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["sometimes", 2])
def test_bad_compile_values_say_what_to_write(value):
    from nanovlm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        TrainConfig(compile=value)
    assert str(e.value) == f"compile must be one of auto, on, off (or true/false), got {value!r}."
