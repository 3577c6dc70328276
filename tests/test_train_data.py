"""The run's data: a validation part held out of the user's own data, the same on every rank and
every resume, never trained on; the accuracy a run measures follows its data."""

from __future__ import annotations

import json
import os

import pytest
import torch
from shapes_data import write_llava
from test_train_synthetic import EOS, SyntheticVQA, tiny_configs

from nanovlm.config import ConfigError, TrainConfig
from nanovlm.data.collators import VLMCollator
from nanovlm.eval.tasks import resolve_task
from nanovlm.train import distributed as dist
from nanovlm.train.data import make_data, total_steps_for


class Grouped(SyntheticVQA):
    """SyntheticVQA whose samples come three to an image (as LLaVA records of one image do)."""

    def group_keys(self):
        return [f"image{i // 3}" for i in range(len(self))]


def _data(rank: int, world: int, **overrides):
    vlm_cfg, train_cfg = tiny_configs(**overrides)
    info = dist.DistInfo(rank=rank, world_size=world)
    return make_data(Grouped(vlm_cfg, 90), VLMCollator(EOS, vlm_cfg.lm_max_length), train_cfg, info)


def test_the_validation_part_is_the_same_on_every_rank_and_never_trained_on():
    d0 = _data(0, 2, val_fraction=0.1, val_size=100, batch_size=4)
    d1 = _data(1, 2, val_fraction=0.1, val_size=100, batch_size=4)
    assert list(d0.val.indices) == list(d1.val.indices) == list(d0.val_records) and len(d0.val) == 9
    held = set(d0.val.indices)
    keys = d0.source.group_keys()
    assert {keys[i] for i in held}.isdisjoint({keys[i] for i in d0.train_indices})  # whole images held out
    # what the two ranks' samplers draw over an epoch, mapped back to the dataset: training samples only
    trained = set()
    for d in (d0, d1):
        sampler = d.train.sampler if hasattr(d.train, "sampler") else None
        for b in range(d.batches_per_epoch):
            trained.update(d.train.dataset.indices[i] for i in sampler.rank_batch(0, b))
    assert trained and not trained & held
    assert list(_data(0, 1, val_fraction=0.1, val_size=100).val.indices) == list(d0.val.indices)  # a resume


def test_eval_task_follows_the_data(tmp_path):
    """A source that offers a test split is scored on it; any other on its held-out questions."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        write_llava(str(folder / name), 2, ["colour"], seed=1)
    single = str(folder / "train.jsonl")
    assert resolve_task("auto", "easyvqa") == "test" and resolve_task("auto", str(folder)) == "test"
    assert resolve_task("auto", single) == "val" and resolve_task("val", str(folder)) == "val"
    assert resolve_task("none", single) == "none" and resolve_task("", single) == "none"
    with pytest.raises(ConfigError, match=r"^eval_task=test scores the data's test split, but data=.*train.jsonl has "
                                          r"splits train; use eval_task=auto"):
        resolve_task("test", single)
    with pytest.raises(ConfigError, match=r"^eval_task must be one of auto, test, val, none, got 'easyvqa'\.$"):
        resolve_task("easyvqa", "easyvqa")


def test_bad_budget_and_validation_settings_name_the_field():
    for kwargs, message in [({"val_fraction": 1.0}, "val_fraction must be in [0, 1), got 1.0."),
                            ({"max_train_time": -1.0}, "max_train_time must be >= 0 seconds (0: no limit), got -1.0."),
                            ({"vision_warmup": "maybe"},
                             "vision_warmup must be one of auto, on, off, got 'maybe'.")]:
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(kwargs)
        assert str(e.value) == message


def test_a_run_on_a_llava_file_reports_accuracy_on_its_held_out_images(tmp_path):
    """The real path end to end: a LLaVA file with one question per record (records share images),
    the default warm-up, and accuracy measured on the held-out images' questions."""
    from nanovlm.train.run import run_training

    data = tmp_path / "d" / "train.jsonl"
    os.makedirs(data.parent)
    write_llava(str(data), 24, ["colour", "size"], seed=3, size=48)
    out = tmp_path / "run"
    run_training("tiny", None, str(out), overrides=[
        f"data={data}", "max_training_steps=3", "batch_size=4", "vision_warmup=auto", "vision_warmup_steps=3",
        "val_fraction=0.25", "eval_interval=0", "precision=fp32"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_questions"] == 12  # 6 of 24 images held out, 2 questions each
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert summary["vision_warmup"]["slots"] == 2 and summary["vision_warmup"]["images"] == 18
    assert summary["best_checkpoint"]["metric"] == "val_accuracy"
    report = json.loads((out / "eval_val.json").read_text())
    assert len(report["items"]) == 12 and {"question", "prediction", "reference"} <= set(report["items"][0])
    assert "test_accuracy" not in summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and final[0]["val_what"] == "held-out validation questions"
    assert final[0]["val_questions"] == 12
    warm = [r for r in records if r.get("stage") == "vision_warmup"]
    assert [r["warmup_step"] for r in warm if "warmup_step" in r] == [1, 3]  # the curve: every 50th and the last


def test_a_captions_dataset_trains_with_the_defaults_and_says_what_the_warmup_did(tmp_path, capsys):
    """Long free-form answers (no answer repeats): the warm-up writes their first tokens in order."""
    from PIL import Image

    from nanovlm.train.run import run_training

    folder = tmp_path / "caps"
    os.makedirs(folder / "images")
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    lines = []
    for i in range(24):
        name = list(colours)[i % 3]
        Image.new("RGB", (40, 40), colours[name]).save(folder / "images" / f"{i}.png")
        caption = f"A flat {name} picture, number {i}, with nothing else in it at all."
        lines.append(json.dumps({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": caption}]}))
    (folder / "caps.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run_training("tiny", None, str(out), overrides=[f"data={folder / 'caps.jsonl'}", "max_training_steps=2",
                                                      "batch_size=4", "vision_warmup=auto", "vision_warmup_steps=2",
                                                      "eval_interval=0", "precision=fp32"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vision_warmup"]["slots"] == 13 and summary["vision_warmup"]["coverage"] == 0.0
    assert "readout of answers of up to 12 tokens from" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").exists()


def test_the_defaults_size_the_batches_to_small_data_and_say_so():
    """40 samples (38 after the validation part) under a batch of 64: the batches shrink so that an
    epoch holds 4 steps, and one line says so; `max_epochs` then sizes the steps as for any data."""
    said = []
    vlm_cfg, train_cfg = tiny_configs(batch_size=64, vision_warmup="auto", max_epochs=10, max_training_steps=1000)
    data = make_data(SyntheticVQA(vlm_cfg, 40), VLMCollator(EOS, vlm_cfg.lm_max_length), train_cfg,
                     dist.DistInfo(), say=said.append)
    assert (len(data.train_indices), data.batch_size, data.vision_batch_size, data.batches_per_epoch) == (38, 9, 9, 4)
    assert said == ["38 training samples: batch_size 9 (of 64) and vision_warmup_batch_size 9 (of 64), so that an "
                    "epoch holds 4 steps (fit_batch=false keeps them)"]
    assert total_steps_for(train_cfg, data.batches_per_epoch) == 40  # 10 epochs of 4 steps
    kept = make_data(SyntheticVQA(vlm_cfg, 400), VLMCollator(EOS, vlm_cfg.lm_max_length), train_cfg,
                     dist.DistInfo(), say=said.append)
    assert kept.batch_size == 64 and len(said) == 1  # data enough for the batch: nothing changes, nothing said
