"""`nanovlm eval --task easyvqa`: scoring, the JSON report, and its errors."""

from __future__ import annotations

import json

import pytest

from nanovlm.cli import main
from nanovlm.eval import easyvqa


def test_question_types_and_scoring():
    items = [{"question": "what shape is this?", "answer": "circle", "type": "shape", "image": "a.png"},
             {"question": "what color is the shape?", "answer": "red", "type": "color", "image": "a.png"},
             {"question": "is there a red shape?", "answer": "yes", "type": "yes/no", "image": "a.png"},
             {"question": "is there a triangle?", "answer": "no", "type": "yes/no", "image": "b.png"}]
    assert [easyvqa.question_type(it["answer"]) for it in items] == ["shape", "color", "yes/no", "yes/no"]
    report = easyvqa.score(items, [" Circle.", "blue", "yes", "no"], n_examples=2)
    assert report["n"] == 4 and report["correct"] == 3 and report["accuracy"] == 0.75
    assert report["per_type"] == {"shape": {"n": 1, "correct": 1, "accuracy": 1.0},
                                  "color": {"n": 1, "correct": 0, "accuracy": 0.0},
                                  "yes/no": {"n": 2, "correct": 2, "accuracy": 1.0}}
    assert [ex["correct"] for ex in report["examples"]] == [True, False]


def test_questions_of_the_packaged_data():
    test = easyvqa.load_questions("test")
    assert len(test) == 9673
    assert {it["type"] for it in test} == set(easyvqa.TYPES)
    assert len(easyvqa.load_questions("train", limit=5)) == 5
    with pytest.raises(ValueError, match="easy-VQA has splits train, test, not 'val'."):
        easyvqa.load_questions("val")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from nanovlm.config import VLMConfig
    from nanovlm.models.vision_language_model import VisionLanguageModel

    path = tmp_path_factory.mktemp("model") / "tiny"
    VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).save_pretrained(path)
    return path


def test_eval_writes_a_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--limit", "6", "--batch-size", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("easyvqa test: accuracy ")
    report = json.loads(out.read_text())
    assert report["task"] == "easyvqa" and report["split"] == "test" and report["n"] == 6
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_type"]) == {"shape", "color", "yes/no"}
    assert sum(e["n"] for e in report["per_type"].values()) == 6
    assert len(report["examples"]) == 6
    assert {"question", "answer", "prediction", "correct", "type", "image"} <= set(report["examples"][0])
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


def test_the_default_report_goes_to_the_current_directory_and_names_the_limit(tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """Never into the model's folder (it may be shared or read-only); a --limit run never
    replaces a full report."""
    import os

    monkeypatch.chdir(tmp_path)
    model_files = sorted(os.listdir(tiny_model_dir))
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "easyvqa", "--limit", "4", "--batch-size", "4"]) == 0
    name = f"eval-{tiny_model_dir.parent.name}-tiny-easyvqa-test-first4.json"
    assert capsys.readouterr().out.rstrip().endswith(f"report written to {name}")
    assert json.loads((tmp_path / name).read_text())["n"] == 4
    assert sorted(os.listdir(tiny_model_dir)) == model_files
    assert easyvqa_default("runs/demo/final", 0) == "eval-demo-final-easyvqa-test.json"
    assert easyvqa_default("runs/demo/final/", 500) == "eval-demo-final-easyvqa-test-first500.json"


def easyvqa_default(model: str, limit: int) -> str:
    from nanovlm.eval.run import default_report_path

    return default_report_path(model, "easyvqa", "test", limit)
