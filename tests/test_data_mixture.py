"""Mixtures: `data=A,B` reads several sources of any layout, `data_weights` samples them by weight,
and evaluation reports each source apart."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from nanovlm.cli import main
from nanovlm.config import ConfigError, TrainConfig
from nanovlm.data.datasets import ShardedBatchSampler
from nanovlm.data.records import DataError, open_records, record_to_chat
from nanovlm.eval import vqa
from shapes_data import write_llava, write_parquet


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A LLaVA file whose image paths are relative to its own folder, and a Cauldron parquet elsewhere."""
    root = tmp_path_factory.mktemp("mix")
    (root / "a").mkdir()
    (root / "b").mkdir()
    write_llava(str(root / "a" / "train.jsonl"), 6, ["position", "colour"], seed=1, size=32)
    write_parquet(str(root / "b" / "train.parquet"), 4, ["count"], seed=2, size=32)
    return str(root / "a" / "train.jsonl"), str(root / "b" / "train.parquet")


def test_a_mixture_reads_every_source_with_its_own_image_folder(two_sources, tmp_path, monkeypatch):
    a, b = two_sources
    monkeypatch.chdir(tmp_path)  # relative paths must not be read from the working directory
    records = open_records(f"{a},{b}")
    alone = [open_records(a), open_records(b)]
    assert len(records) == len(alone[0]) + len(alone[1]) == 12 + 4
    assert [records.source_of(i) for i in (0, 11, 12, 15)] == [a, a, b, b]
    images, _, _ = record_to_chat(records[0])
    with Image.open(images[0]) as img:  # joined to a's folder: readable from anywhere
        assert img.size == (32, 32)
    assert record_to_chat(records[12])[0] == record_to_chat(alone[1][0])[0]  # bytes stay bytes
    assert sum(1 for _ in records.items()) == 16


def test_a_mixture_names_a_missing_or_repeated_source(two_sources, tmp_path):
    a, _ = two_sources
    missing = tmp_path / "nothing.jsonl"
    with pytest.raises(DataError, match=f"^data file {missing} does not exist.$"):
        open_records(f"{a},{missing}")
    with pytest.raises(DataError, match="names .* more than once; weight a source with data_weights instead."):
        open_records(f"{a},{a}")


@pytest.mark.parametrize("weights, message", [
    ("2", "data_weights gives 1 weight(s) for 2 source(s) in data; give one weight per source, in the order of data."),
    ("1,0", "data_weights must all be above 0, got '1,0'; leave a source out of data instead of weighting it 0."),
    ("1,-2", "data_weights must all be above 0, got '1,-2'"),
    ("1,x", "data_weights must be numbers separated by commas (e.g. 2,1), got '1,x'."),
])
def test_bad_data_weights_are_one_sentence(weights, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(data="a.jsonl,b.parquet", data_weights=weights)
    assert str(e.value).startswith(message)


def test_the_weighted_sampler_draws_each_source_by_weight_the_same_on_any_rank_count():
    groups, counts = [list(range(0, 30)), list(range(30, 40))], [20, 20]  # source b (10 samples) drawn twice over
    one = ShardedBatchSampler(0, 8, seed=3, groups=groups, counts=counts, drop_last=True)
    assert len(one) == 5
    for epoch in range(3):
        order = one.order(epoch)
        drawn = Counter(0 if i < 30 else 1 for i in order)
        assert drawn == {0: 20, 1: 20}
        assert Counter(i for i in order if i >= 30) == {i: 2 for i in range(30, 40)}  # every one before any repeat
        assert len(set(i for i in order if i < 30)) == 20
    assert one.order(0) != one.order(1) and one.order(1) == one.order(1)
    two = [ShardedBatchSampler(0, 8, rank=r, world_size=2, seed=3, groups=groups, counts=counts, drop_last=True)
           for r in range(2)]
    assert [sorted(x + y) for x, y in zip(*(s.batches() for s in two))] == [sorted(b) for b in one.batches()]


def test_a_report_breaks_accuracy_down_by_source():
    items = [{"id": str(k), "images": [], "question": "q", "answer": ans, "source": src}
             for k, (ans, src) in enumerate([("1", "a"), ("2", "a"), ("3", "b")])]
    report = vqa.score(items, ["1", "x", "3"])
    assert report["per_source"] == {"a": {"n": 2, "correct": 1, "accuracy": 0.5},
                                    "b": {"n": 1, "correct": 1, "accuracy": 1.0}}
    assert "by source: a 50.00% (1/2) | b 100.00% (1/1)" in vqa.format_report(report)
    assert vqa.score(items[:2], ["1", "2"])["per_source"] == {}  # one source: no breakdown


def test_train_and_eval_on_a_weighted_mixture(two_sources, tmp_path, capsys):
    a, b = two_sources
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), f"data={a},{b}", "data_weights=1,3",
                 "max_training_steps=2", "eval_interval=0", "val_fraction=0.5", "batch_size=2"]) == 0
    said = capsys.readouterr().out
    assert f"mixture: {a} " in said and "(weight 3)" in said
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val_accuracy_per_source"]) == {a, b}, summary
    assert (out / "loss.png").stat().st_size > 0
    assert main(["eval", "--model", str(out / "final"), "--data", f"{a},{b}", "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert set(report["per_source"]) == {a, b} and report["n"] == sum(e["n"] for e in report["per_source"].values())


def test_the_original_222m_recipe_is_a_config_file_of_cauldron_subsets():
    from pathlib import Path

    from nanovlm.data.records import mixture_sources
    from nanovlm.train import settings

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "nanovlm-222m-cauldron.yaml"
    vlm, train = settings.resolve("nanovlm-222m", str(recipe), ["batch_size=8"])
    sources = mixture_sources(train.data)
    assert len(sources) == len(set(sources)) == 45 and all(s.startswith("HuggingFaceM4/the_cauldron:") for s in sources)
    assert (train.lr_mp, train.lr_vision_backbone, train.gradient_accumulation_steps) == (0.003, 5e-5, 4)
    assert train.recipe.max_epochs == 5 and train.recipe.vision_warmup == "off" and train.batch_size == 8
    assert vlm.vit_model_type == "google/siglip-base-patch16-224"
