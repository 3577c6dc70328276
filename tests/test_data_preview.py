"""`nanovlm data preview`: the picture and the counts."""

import json

import pytest

from PIL import Image

from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.data.datasets import build_dataset
from nanovlm.data.preview import preview, run_preview
from nanovlm.data.processors import get_tokenizer


def test_preview_of_a_llava_file_with_a_broken_sample(tmp_path, capsys):
    Image.new("RGB", (50, 30), (0, 120, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    records = [{"image": "ok.png", "conversations": [{"from": "human", "value": f"<image>\nQuestion {k}?"},
                                                     {"from": "gpt", "value": f"Answer {k}."}]} for k in range(5)]
    records.append({"image": "bad.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                          {"from": "gpt", "value": "a"}]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "grid.png"
    code = run_preview(preset="tiny", overrides=[f"data={tmp_path / 'd.jsonl'}", "max_img_size=64", "strict=false"],
                       out=str(out), n=6)
    assert code == 0
    grid = Image.open(out)
    assert grid.size[0] == 2 * 320 and grid.size[1] > 0
    printed = capsys.readouterr().out
    # the five questions about ok.png are one sample (multi_turn), as training sees them
    assert "samples: 2\n  made of 6 records: those that share an image are one sample" in printed
    assert "skipped 1 sample(s): corrupt_image 1" in printed and "tokens per sample: mean " in printed
    code = run_preview(preset="tiny", overrides=[f"data={tmp_path / 'd.jsonl'}", "max_img_size=64", "strict=false",
                                                 "multi_turn=false"], out=str(out), n=6)
    assert code == 0 and Image.open(out).size[0] == 4 * 320
    assert "samples: 6\n" in capsys.readouterr().out


def test_preview_option_errors():
    with pytest.raises(ValueError, match="needs data="):
        run_preview(overrides=["split=train"])
    with pytest.raises(ValueError, match="expected key=value"):
        run_preview(overrides=["data"])
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        run_preview(overrides=["data=easyvqa", "colour=red"])


def test_preview_of_easyvqa(tmp_path):
    cfg = VLMConfig.from_preset("tiny")
    tok = get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    ds = build_dataset(TrainConfig(data="easyvqa"), cfg, tok, split="test")
    stats = preview(ds, str(tmp_path / "e.png"), n=4, vlm_cfg=cfg, max_count=50, verbose=False)
    assert stats["samples"] == 9673 and stats["counted"] == 50 and stats["skips"] == {}
    assert stats["tokens_max"] >= stats["tokens_mean"] > 0
    assert Image.open(tmp_path / "e.png").size == (4 * 320, Image.open(tmp_path / "e.png").size[1])


def test_preview_says_how_many_samples_it_measured(tmp_path, capsys):
    """Counted on a random part of the data: the total stays the total, and the lines that
    come from the part say so (issue: `samples: 14178 (counted 2000)`)."""
    for k in range(6):  # one image each: records sharing an image would be merged into one sample
        Image.new("RGB", (40, 40), (0, 0, 200 - k)).save(tmp_path / f"blue{k}.png")
    records = [{"image": f"blue{k}.png", "conversations": [{"from": "human", "value": f"<image>\nQuestion {k}?"},
                                                       {"from": "gpt", "value": "blue"}]} for k in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert run_preview(preset="tiny", overrides=[f"data={tmp_path / 'd.jsonl'}", "max_count=4"],
                       out=str(tmp_path / "grid.png"), n=2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"data: {tmp_path / 'd.jsonl'}: train split from d.jsonl"  # which files were read
    assert lines[1] == "samples: 6"
    assert lines[2].startswith("tokens per sample (in 4 of them drawn at random; max_count=6 measures all): mean ")
    assert lines[3] == "skips (in 4 of them drawn at random; max_count=6 measures all): no samples skipped"


def test_the_readme_own_data_examples_load_without_skips(tmp_path):
    """The README's LLaVA line and Cauldron parquet, with an easy-VQA test image."""
    import shutil

    import easy_vqa
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "mydata" / "images").mkdir(parents=True)
    shutil.copy(easy_vqa.get_test_image_paths()[0], tmp_path / "mydata" / "images" / "0001.png")
    line = ('{"image": "images/0001.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is in the '
            'picture?"}, {"from": "gpt", "value": "a red triangle"}]}')
    (tmp_path / "mydata" / "train.jsonl").write_text(line + "\n")
    png = open(tmp_path / "mydata" / "images" / "0001.png", "rb").read()
    pq.write_table(pa.table({"images": [[{"bytes": png, "path": None}]],
                             "texts": [[{"user": "What is in the picture?", "assistant": "a red triangle"}]]}),
                   tmp_path / "mydata" / "train.parquet")
    cfg = VLMConfig.from_preset("easyvqa")
    for name in ("train.jsonl", "train.parquet"):
        stats = preview(str(tmp_path / "mydata" / name), str(tmp_path / f"{name}.png"), n=1, vlm_cfg=cfg,
                        verbose=False)
        assert stats["samples"] == 1 and stats["skips"] == {}, (name, stats)
