"""Checkpoints: exact resume, atomic writes (a kill at any instant leaves a loadable one), and a
resume that passes over a damaged checkpoint (truncated or missing files) to the newest sound one."""

from __future__ import annotations

import json
import os
import random
import re
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
from nanovlm.train.optim import vlm_optimizer

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


def assert_resumes_like(whole_dir, run_dir, settings: dict, dies_after: int, resumed_at: str) -> None:
    """A run of `settings` killed after `dies_after` micro-batches, then resumed from its last
    checkpoint (named `resumed_at`), ends with the weights and logged losses of `whole_dir`."""
    vlm_cfg, train_cfg = tiny_configs(**settings)
    data = synthetic_data(vlm_cfg, train_cfg)
    data.train = DiesAfter(data.train, dies_after)
    with pytest.raises(Killed):
        run_synthetic(run_dir, data=data, **settings)
    assert ckpt.latest_checkpoint(str(run_dir)).endswith(resumed_at)
    run_synthetic(run_dir, resume=True, **settings)
    whole, resumed = final_weights(whole_dir), final_weights(run_dir)
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert losses(run_dir) == losses(whole_dir)


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
    return model, vlm_optimizer(model, train_cfg, fused=True), None


def _save(run_dir, step, model, opt, sched, keep_last=2):
    state = {"data": {"epoch": 0, "index": step}, "metrics": [{"step": step}]}
    return ckpt.save_checkpoint(str(run_dir), step, model, StubTokenizer(), opt, state, [ckpt.rng_state()],
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
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), fresh, fresh_opt)
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
        state = ckpt.load_checkpoint(latest, model, opt)
        assert state["step"] >= saved[-1]
        start = state["step"] + 1


# ------------------------------------------------------------------ a damaged newest checkpoint
def _truncate(path, keep):
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.truncate(keep(size))


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


DAMAGE = {
    "safetensors cut in half": (lambda d: _truncate(d / "model.safetensors", lambda n: n // 2),
                                r"model\.safetensors is truncated \(\d+ of \d+ bytes\)"),
    "safetensors cut inside its header": (lambda d: _truncate(d / "model.safetensors", lambda n: 40),
                                          r"model\.safetensors is truncated \(40 bytes; its header alone needs \d+\)"),
    "safetensors of 3 bytes": (lambda d: _truncate(d / "model.safetensors", lambda n: 3),
                               r"model\.safetensors is truncated \(3 bytes, not even a header\)"),
    "safetensors with bytes after the data": (lambda d: _append(d / "model.safetensors", b"xyz"),
                                              r"model\.safetensors has 3 bytes after its last tensor"),
    "safetensors missing": (lambda d: os.remove(d / "model.safetensors"), r"model\.safetensors is missing"),
    "trainer_state.pt cut short": (lambda d: _truncate(d / "trainer_state.pt", lambda n: n - 10),
                                   r"trainer_state\.pt is truncated or not a torch\.save archive"),
    "trainer_state.pt missing": (lambda d: os.remove(d / "trainer_state.pt"), r"trainer_state\.pt is missing"),
    "trainer_state.json cut in half": (lambda d: _truncate(d / "trainer_state.json", lambda n: n // 2),
                                       r"trainer_state\.json is not valid JSON"),
    "trainer_state.json missing": (lambda d: os.remove(d / "trainer_state.json"), r"trainer_state\.json is missing"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{'vit_hidden_dim': 32"),
                             r"config\.json is not valid JSON"),
    "config.json missing": (lambda d: os.remove(d / "config.json"), r"config\.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_it_chosen(tmp_path, damage):
    model, opt, sched = _model_and_optimizer()
    _save(tmp_path, 1, model, opt, sched)
    newest = _save(tmp_path, 2, model, opt, sched)
    assert ckpt.checkpoint_problem(newest) is None
    harm, message = DAMAGE[damage]
    harm(tmp_path / "checkpoints" / "step_000002")
    said = []
    chosen = ckpt.latest_good_checkpoint(str(tmp_path), said.append)
    assert chosen == ckpt.step_dir(str(tmp_path), 1)
    assert len(said) == 1, said
    assert re.fullmatch(rf"--resume: checkpoint {re.escape(newest)} is unreadable \({message}.*\); "
                        r"trying the one before it\.", said[0]), said[0]
    fresh, fresh_opt, fresh_sched = _model_and_optimizer()
    assert ckpt.load_checkpoint(chosen, fresh, fresh_opt)["step"] == 1


def test_no_sound_checkpoint_is_one_clear_error(tmp_path):
    assert ckpt.latest_good_checkpoint(str(tmp_path), print) is None  # none at all: the caller says so
    model, opt, sched = _model_and_optimizer()
    _save(tmp_path, 1, model, opt, sched)
    _save(tmp_path, 2, model, opt, sched)
    os.remove(tmp_path / "checkpoints" / "step_000001" / "trainer_state.pt")
    _truncate(tmp_path / "checkpoints" / "step_000002" / "model.safetensors", lambda n: n - 1)
    said = []
    with pytest.raises(ValueError) as err:
        ckpt.latest_good_checkpoint(str(tmp_path), said.append)
    assert str(err.value) == (
        f"--resume: every checkpoint in {tmp_path / 'checkpoints'} is unreadable (step_000002: model.safetensors "
        f"is truncated ({os.path.getsize(tmp_path / 'checkpoints' / 'step_000002' / 'model.safetensors')} of "
        f"{os.path.getsize(tmp_path / 'checkpoints' / 'step_000002' / 'model.safetensors') + 1} bytes); "
        "step_000001: trainer_state.pt is missing); run without --resume to start a new run.")
    assert said == []  # the error names them all; no lines before it


def test_saving_after_a_fallback_keeps_the_new_checkpoint(tmp_path):
    """Resumed from step 2 past a damaged step 3: with keep_last=1 the new step 2 stays (the
    damaged step 3 is newer, not a reason to drop it) and step 1 goes."""
    model, opt, sched = _model_and_optimizer()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, sched, keep_last=0)
    _truncate(tmp_path / "checkpoints" / "step_000003" / "model.safetensors", lambda n: n // 2)
    assert ckpt.latest_good_checkpoint(str(tmp_path), lambda _: None).endswith("step_000002")
    _save(tmp_path, 2, model, opt, sched, keep_last=1)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_000002", "step_000003"]
    assert ckpt.latest_good_checkpoint(str(tmp_path), lambda _: None).endswith("step_000002")


def test_resume_past_a_truncated_checkpoint_ends_with_the_same_weights(tmp_path, capsys):
    """A finished run whose newest checkpoint (step 4) is then cut short: --resume says so in one
    line, continues from step 2, and ends with the weights and losses of the run it repeats."""
    settings = dict(max_training_steps=4, save_interval=2)
    run_synthetic(tmp_path, **settings)
    whole, whole_losses = final_weights(tmp_path), losses(tmp_path)
    weights = tmp_path / "checkpoints" / "step_000004" / "model.safetensors"
    size = os.path.getsize(weights)
    _truncate(weights, lambda n: n - 100)
    capsys.readouterr()
    summary = run_synthetic(tmp_path, resume=True, **settings)
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "unreadable" in line] == [
        f"--resume: checkpoint {ckpt.step_dir(str(tmp_path), 4)} is unreadable (model.safetensors is truncated "
        f"({size - 100} of {size} bytes)); trying the one before it."], out
    assert f"resumed from {ckpt.step_dir(str(tmp_path), 2)} at step 2" in out
    assert summary["resumed_at_step"] == 2
    resumed = final_weights(tmp_path)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert losses(tmp_path) == whole_losses
    assert ckpt.checkpoint_problem(ckpt.step_dir(str(tmp_path), 4)) is None  # written again, whole


def test_a_run_still_learning_at_its_plan_end_extends_and_resumes_exactly(tmp_path):
    """With a time budget, a held-out loss still falling at the plan's end buys another cycle (within the
    budget and `max_epochs`); a run killed inside it resumes into the same cycle."""
    settings = dict(max_training_steps=8, val_size=8, eval_interval=4, save_interval=2, max_train_time=10 ** 6,
                    max_epochs=1, lr_mp=1e-2, lr_language_backbone=1e-2, lr_vision_backbone=1e-2)
    assert run_synthetic(tmp_path / "off", vlm_extend="false", **settings)["steps"] == 8
    assert run_synthetic(tmp_path / "whole", **settings)["steps"] > 8
    assert_resumes_like(tmp_path / "whole", tmp_path / "broken", settings, dies_after=11, resumed_at="step_000010")
