"""Checkpoints: exact resume, and atomic writes (a kill at any instant leaves a loadable one)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_train_synthetic import StubTokenizer, final_weights, losses, run_synthetic, synthetic_data, tiny_configs

from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train import checkpoint as ckpt
from nanovlm.train.optim import WarmupCosine, build_optimizer

TESTS = os.path.dirname(os.path.abspath(__file__))


class Killed(Exception):
    pass


class DiesAfter:
    """A training loader that raises after `n` micro-batches (a crash in the middle of a run)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def forever(self):
        for k, batch in enumerate(self.loader.forever()):
            if k == self.n:
                raise Killed
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, dropout):
    """With dropout the RNG stream must also continue exactly (restored states, and no hidden
    draws from the global RNG when the data loader is rebuilt)."""
    settings = dict(max_training_steps=6, save_interval=2, gradient_accumulation_steps=2, val_size=8,
                    eval_interval=3, lm_dropout=dropout, vit_dropout=dropout)
    run_synthetic(tmp_path / "whole", **settings)

    vlm_cfg, train_cfg = tiny_configs(**settings)
    data = synthetic_data(vlm_cfg, train_cfg)
    data.train = DiesAfter(data.train, 2 * 5 + 1)  # dies inside step 6, after step 5 was logged
    with pytest.raises(Killed):
        run_synthetic(tmp_path / "broken", data=data, **settings)
    assert ckpt.latest_checkpoint(str(tmp_path / "broken")).endswith("step_000004")
    summary = run_synthetic(tmp_path / "broken", resume=True, **settings)
    assert summary["resumed_at_step"] == 4

    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "broken")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole")  # step 5 logged once, not twice
    with open(tmp_path / "broken" / "checkpoints" / "best" / "trainer_state.json") as f:
        assert json.load(f)["step"] == 3


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*checkpoints; run without --resume"):
        run_synthetic(tmp_path, resume=True)


def _model_and_optimizer():
    vlm_cfg, train_cfg = tiny_configs()
    model = VisionLanguageModel(vlm_cfg, load_backbone=False)
    opt = build_optimizer(model, train_cfg, torch.device("cpu"))
    return model, opt, WarmupCosine(opt, 10)


def _save(run_dir, step, model, opt, sched, keep_last=2):
    state = {"data": {"epoch": 0, "index": step}, "metrics": [{"step": step}]}
    return ckpt.save_checkpoint(str(run_dir), step, model, StubTokenizer(), opt, sched, state, [ckpt.rng_state()],
                                keep_last=keep_last)


def test_failure_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _model_and_optimizer()
    _save(tmp_path, 1, model, opt, sched)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, opt, sched)
    monkeypatch.undo()
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_000001"]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    fresh, fresh_opt, fresh_sched = _model_and_optimizer()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), fresh, fresh_opt, fresh_sched)
    assert state["step"] == 1 and state["data"]["index"] == 1


_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_train_checkpoint import _model_and_optimizer, _save
    model, opt, sched = _model_and_optimizer()
    step = {start}
    while True:
        _save({run_dir!r}, step, model, opt, sched)
        print(step, flush=True)
        step += 1
""")


def test_sigkill_at_any_instant_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a process that writes checkpoints back to back at random instants; after each kill the
    newest complete checkpoint loads and the leftovers are tidied away."""
    rng = random.Random(0)
    start = 1
    for _ in range(2):
        code = _WRITER.format(tests=TESTS, run_dir=str(tmp_path), start=start)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        t_first = None
        saved = []
        while len(saved) < 2:
            line = proc.stdout.readline()
            assert line, "the writer died"
            saved.append(int(line))
            t_first = t_first or time.perf_counter()
        per_save = max(0.01, (time.perf_counter() - t_first))  # one save took about this long
        time.sleep(rng.uniform(0.0, per_save))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        ckpt.recover(str(tmp_path))
        root = tmp_path / "checkpoints"
        assert not [n for n in os.listdir(root) if n.startswith(".tmp") or ".old-" in n]
        latest = ckpt.latest_checkpoint(str(tmp_path))
        assert latest is not None
        model, opt, sched = _model_and_optimizer()
        state = ckpt.load_checkpoint(latest, model, opt, sched)
        assert state["step"] >= saved[-1]
        start = state["step"] + 1
