"""`nanovlm eval --task easyvqa`: the packaged data's test split, scored like any data."""

from __future__ import annotations

import json
import os

import pytest

from nanovlm.cli import main
from nanovlm.eval.run import default_report_path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from nanovlm.config import VLMConfig
    from nanovlm.models.vision_language_model import VisionLanguageModel

    path = tmp_path_factory.mktemp("model") / "tiny"
    VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).save_pretrained(path)
    return path


def test_eval_writes_a_report_broken_down_by_the_records_answer_types(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--limit", "6", "--batch-size", "4",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("easyvqa test: accuracy ")
    report = json.loads(out.read_text())
    assert report["data"] == "easyvqa" and report["split"] == "test" and report["n"] == 6
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_type"]) <= {"shape", "color", "yes/no"}  # the records' answer_type, not yes/no/number/other
    assert sum(e["n"] for e in report["per_type"].values()) == 6 and len(report["items"]) == 6
    assert report["items"][0]["id"] == "easyvqa-test[0] q1" and report["items"][0]["images"][0].endswith(".png")
    assert report["wall_time_s"] > 0 and report["model"].endswith("tiny")


def test_eval_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--task", "easyvqa"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"nanovlm: error: {tmp_path / 'none'}: no such file or directory; a value that looks like a path is "
        "never looked up on the hub, so check the path.")
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--limit", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "nanovlm: error: --limit must be >= 0 (0: every question), got -1."
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--batch-size", "0"]) == 1
    assert capsys.readouterr().err.strip() == "nanovlm: error: --batch-size must be at least 1, got 0."


def test_reports_are_named_for_model_data_split_and_limit_and_never_overwritten(tiny_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """In the current directory, never the model's folder (it may be shared or read-only); a
    second report of the same evaluation gets a new name."""
    monkeypatch.chdir(tmp_path)
    model_files = sorted(os.listdir(tiny_model_dir))
    name = f"eval-{tiny_model_dir.parent.name}-tiny-easyvqa-test-first4.json"
    for k, expected in enumerate([name, name.replace(".json", "-2.json")]):
        assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--limit", "4",
                     "--batch-size", "4"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"report written to {expected}")
    assert json.loads((tmp_path / name).read_text())["n"] == 4
    assert sorted(os.listdir(tiny_model_dir)) == model_files
    assert default_report_path("runs/demo/final", "easyvqa", "test") == "eval-demo-final-easyvqa-test.json"
    assert default_report_path("runs/demo/final/", "easyvqa", "test", 500) == "eval-demo-final-easyvqa-test-first500.json"
    assert default_report_path("runs/a/final", "data/mine.jsonl", None, 5) == "eval-a-final-mine-first5.json"
