"""The metrics log: JSONL in the run folder, mirrored to wandb when asked for (a stand-in module
here: wandb is not installed offline), and a run that goes on when wandb cannot start."""

from __future__ import annotations

import json
import sys
import types

from nanovlm.train.report import MetricsLog, plot


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_records_go_to_jsonl_and_wandb(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(str(tmp_path), tensorboard=False, wandb_config={"train": {"batch_size": 4}})
    log.log({"step": 10, "train_loss": 2.5, "lr": 1e-3})
    log.log({"step": 20, "val_loss": 2.0})
    log.close()
    (run,) = runs
    assert run.init == {"project": "nanovlm", "dir": str(tmp_path), "config": {"train": {"batch_size": 4}}}
    assert run.logged == [(10, {"train_loss": 2.5, "lr": 1e-3}), (20, {"val_loss": 2.0})]
    assert run.finished
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "train_loss": 2.5, "lr": 1e-3},
                                                     {"step": 20, "val_loss": 2.0}]


def test_a_wandb_that_cannot_start_leaves_local_logging(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("wandb")

    def refuse(**kwargs):
        raise RuntimeError("api key not configured")

    fake.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(str(tmp_path), records=[{"step": 1, "train_loss": 3.0}], tensorboard=False, wandb_config={})
    log.log({"step": 2, "train_loss": 2.9})
    log.close()
    assert "wandb unavailable (api key not configured); logging locally only." in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the kept record and the new one


def test_without_tensorboard_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    said = []
    log = MetricsLog(str(tmp_path), say=said.append)
    log.log({"step": 1, "train_loss": 2.0})
    log.close()
    assert said == ["TensorBoard events are not written (tensorboard is not installed): pip install -e '.[log]' "
                    "in a checkout, pip install 'nanovlm[log]' otherwise."]
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_the_plot_is_written_with_the_base_install(tmp_path):
    records = [{"warmup_step": 1, "warmup_loss": 3.0}, {"step": 1, "train_loss": 2.0},
               {"step": 2, "train_loss": 1.5, "val_loss": 1.7, "val_accuracy": 0.5, "val_questions": 4,
                "val_what": "held-out validation questions", "final": True}]
    assert plot(records, str(tmp_path / "loss.png")) == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
