"""Records: sources read by split (the `datasets` convention), records named where a person finds
them, and a file's records checked up front (`strict`) before anything is built."""

from __future__ import annotations

import json
import os

import pytest
from shapes_data import write_llava, write_parquet

from nanovlm.cli import main
from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.data.datasets import build_dataset, check_data, check_records
from nanovlm.data.processors import get_tokenizer
from nanovlm.data.records import DataError, describe, open_records, splits

CFG = VLMConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(CFG.lm_tokenizer, CFG.vlm_extra_tokens, CFG.lm_chat_template)


def test_a_folder_with_train_and_test_files_trains_on_the_train_file_only(tmp_path, tok):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_parquet(str(folder / "train.parquet"), 4, ["colour"], seed=1)
    write_parquet(str(folder / "test.parquet"), 2, ["colour"], seed=2)
    (folder / "notes.json").write_text("[]")  # named by no split, beside files that are: not data
    assert splits(str(folder)) == ["train", "test"]
    assert describe(str(folder)) == f"{folder}: train split from train.parquet; test split from test.parquet"
    train = build_dataset(TrainConfig(data=str(folder), multi_turn=False), CFG, tok)
    assert len(train) == 4 and {train[i]["id"].split(" row")[0] for i in range(4)} == {"train.parquet"}
    assert len(build_dataset(TrainConfig(data=str(folder)), CFG, tok, split="test")) == 2
    with pytest.raises(DataError, match=r"has no 'validation' split; it has splits train, test\.$"):
        open_records(str(folder), "validation")


def test_split_folders_shards_and_folders_named_by_no_split(tmp_path):
    for split, n in (("train", 3), ("validation", 1)):
        (tmp_path / "a" / split).mkdir(parents=True)
        write_llava(str(tmp_path / "a" / split / "part-0.jsonl"), n, ["colour"], seed=n)
    assert splits(str(tmp_path / "a")) == ["train", "validation"]
    assert len(open_records(str(tmp_path / "a"), "validation")) == 1
    (tmp_path / "b").mkdir()
    for k in range(2):  # shards named by no split: all of them the train split
        write_parquet(str(tmp_path / "b" / f"shard-{k}.parquet"), 1, ["colour", "count"], seed=k)
    records = open_records(str(tmp_path / "b"))
    assert splits(str(tmp_path / "b")) == ["train"] and len(records) == 2
    assert [records.where(i) for i in range(2)] == ["shard-0.parquet row 0", "shard-1.parquet row 0"]


def test_records_are_named_as_an_editor_or_a_table_shows_them(tmp_path):
    good = {"question": "q", "answer": "a"}
    (tmp_path / "d.jsonl").write_text("\n".join([json.dumps(good), "", json.dumps(good), "{broken"]) + "\n")
    records = open_records(str(tmp_path / "d.jsonl"))
    assert len(records) == 3 and [records.where(i) for i in range(3)] == ["d.jsonl line 1", "d.jsonl line 3",
                                                                          "d.jsonl line 4"]
    assert records.where(0, 1) == "d.jsonl lines 1+3"
    (tmp_path / "d.json").write_text(json.dumps([good, good]))
    assert open_records(str(tmp_path / "d.json")).where(1) == "d.json[1]"


def write_broken(path) -> None:
    """21 good lines of one question each, then line 22 broken JSON and line 23 a missing image."""
    write_llava(str(path), 21, ["colour"], seed=1, one_per_record=True)
    lines = path.read_text().splitlines()
    bad_image = {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                       {"from": "gpt", "value": "a"}]}
    path.write_text("\n".join(lines + ['{"image": "x.png", "conversations": [', json.dumps(bad_image)]) + "\n")


def test_records_are_checked_up_front_without_decoding_an_image(tmp_path):
    write_broken(tmp_path / "broken.jsonl")
    skips = check_records(open_records(str(tmp_path / "broken.jsonl")))
    assert skips.as_dict() == {"bad_record": 1, "missing_image": 1}
    assert skips.seen == {"broken.jsonl line 22", "broken.jsonl line 23"}
    assert check_data(str(tmp_path / "broken.jsonl")) == f"{tmp_path / 'broken.jsonl'}: train split from broken.jsonl"
    with pytest.raises(DataError) as e:
        check_data(str(tmp_path / "broken.jsonl"), strict=True)
    assert str(e.value).startswith(f"2 record(s) of {tmp_path / 'broken.jsonl'} cannot be used (bad_record 1, "
                                   "missing_image 1); the first: broken.jsonl line 22: the line is not valid JSON")
    assert str(e.value).endswith("Fix them, or set strict=false to train without them.")


def test_strict_training_refuses_a_broken_file_before_building_anything(tmp_path, capsys):
    write_broken(tmp_path / "broken.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), f"data={tmp_path / 'broken.jsonl'}", "strict=true"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanovlm: error: 2 record(s) of ") and "line 22" in err[0]
    assert "training" not in captured.out and not out.exists()  # refused before a model or a folder was made


def test_a_run_on_a_folder_scores_its_test_split_and_says_which_files_it_read(tmp_path, capsys):
    from nanovlm.train.run import run_training

    folder = tmp_path / "mine"
    os.makedirs(folder)
    write_llava(str(folder / "train.jsonl"), 8, ["colour"], seed=3, one_per_record=True)
    write_llava(str(folder / "test.jsonl"), 2, ["colour"], seed=4, one_per_record=True)
    out = tmp_path / "run"
    run_training("tiny", None, str(out), overrides=[f"data={folder}", "max_training_steps=2", "batch_size=4",
                                                     "val_fraction=0.25", "eval_interval=0", "precision=fp32"])
    printed = capsys.readouterr().out
    assert f"data: {folder}: train split from train.jsonl; test split from test.jsonl" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_questions"] == 2 and 0.0 <= summary["test_accuracy"] <= 1.0
    report = json.loads((out / "eval_test.json").read_text())
    assert {it["id"].split(" line")[0] for it in report["items"]} == {"test.jsonl"}


def test_a_folder_with_a_validation_file_validates_on_it(tmp_path, capsys):
    from nanovlm.train.run import run_training

    folder = tmp_path / "mine"
    os.makedirs(folder)
    write_llava(str(folder / "train.jsonl"), 8, ["colour"], seed=3, one_per_record=True)
    write_llava(str(folder / "validation.jsonl"), 3, ["colour"], seed=5, one_per_record=True)
    out = tmp_path / "run"
    run_training("tiny", None, str(out), overrides=[f"data={folder}", "max_training_steps=2", "batch_size=4",
                                                     "eval_interval=0", "precision=fp32", "eval_task=val"])
    assert f"validation: {folder / 'validation.jsonl'}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["val_data"] == str(folder / "validation.jsonl")
    report = json.loads((out / "eval_val.json").read_text())
    assert {it["id"].split(" line")[0] for it in report["items"]} == {"validation.jsonl"}
