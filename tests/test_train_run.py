"""`nanovlm train` refused: one sentence, exit 1, and no run folder left behind."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nanovlm.cli import main


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    """Three valid LLaVA-layout samples: fewer than one batch of the tiny preset."""
    root = tmp_path_factory.mktemp("data")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "red.png")
    records = [{"image": "red.png", "conversations": [{"from": "human", "value": f"<image>\nquestion {k}?"},
                                                      {"from": "gpt", "value": "red"}]} for k in range(3)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root / "d.jsonl"


def _refused(capsys, argv) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("nanovlm: error: ") and "\n" not in err, err
    return err


def test_a_run_refused_by_its_settings_or_data_path_makes_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert "unknown setting 'epochs'" in _refused(capsys, ["train", "--preset", "tiny", "--out", str(out), "epochs=3"])
    assert not out.exists()
    missing = tmp_path / "nothing.jsonl"
    assert _refused(capsys, ["train", "--preset", "tiny", "--out", str(out), f"data={missing}"]) == (
        f"nanovlm: error: data file {missing} does not exist.")
    assert not out.exists()


def test_a_run_refused_once_its_data_is_built_leaves_no_folder(tmp_path, capsys, small_jsonl):
    out = tmp_path / "run"
    err = _refused(capsys, ["train", "--preset", "tiny", "--out", str(out), f"data={small_jsonl}", "batch_size=8",
                            "val_size=0"])
    assert err == ("nanovlm: error: the training data has 1 sample (made of 3 records: those that share an image "
                   "are one sample), too few to train on (at least 4 are needed); bring more data.")
    assert not out.exists()
    err = _refused(capsys, ["train", "--preset", "tiny", "--out", str(out), f"data={small_jsonl}", "batch_size=8",
                            "val_size=0", "fit_batch=false"])
    assert err == ("nanovlm: error: the training data has 1 sample (made of 3 records: those that share an image "
                   "are one sample), fewer than one global batch (batch_size 8 x 1 process(es)); lower batch_size "
                   "or bring more data.")
    assert not out.exists()


def test_a_refused_run_in_an_existing_folder_leaves_the_folder_and_what_it_held(tmp_path, capsys, small_jsonl):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    err = _refused(capsys, ["train", "--preset", "tiny", "--out", str(out), f"data={small_jsonl}",
                            "batch_size=8", "val_size=0"])
    assert err.startswith("nanovlm: error: the training data has 1 sample (made of 3 records")
    assert (out / "notes.txt").read_text() == "mine\n"


def test_out_that_is_a_file_is_refused_before_anything(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert _refused(capsys, ["train", "--preset", "tiny", "--out", str(target)]) == (
        f"nanovlm: error: --out {target} is a file, not a folder; give a folder for the run.")
    assert target.read_text() == "x"


def test_a_run_whose_every_sample_is_skipped_stops_with_the_reasons(tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    records = [{"image": "red.png", "conversations": [{"from": "human", "value": f"question {k}?"},  # no <image>
                                                      {"from": "gpt", "value": "red"}]} for k in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), f"data={tmp_path / 'd.jsonl'}",
                 "batch_size=2", "val_size=0", "multi_turn=false", "log_interval=2", "eval_task=none"]) == 1
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "nanovlm: error" in line]
    assert err[0][err[0].index("nanovlm: error"):] == ("nanovlm: error: no training sample of the first 2 step(s) could be used (skipped 4 sample(s): "
                   "image_placeholder_mismatch 4); `nanovlm data preview data=...` shows why.")
