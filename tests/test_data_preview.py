"""`nanovlm data preview`: the picture and the counts."""

import json

import pytest

from PIL import Image

from nanovlm.config import VLMConfig
from nanovlm.data.easyvqa import EasyVQADataset
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
    assert grid.size[0] == 4 * 320 and grid.size[1] > 0
    printed = capsys.readouterr().out
    assert "samples: 6\n" in printed and "skipped 1 sample(s): corrupt_image 1" in printed
    assert "tokens per sample: mean " in printed


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
    ds = EasyVQADataset(cfg, tok, split="test")
    stats = preview(ds, str(tmp_path / "e.png"), n=4, vlm_cfg=cfg, max_count=50, verbose=False)
    assert stats["samples"] == 9673 and stats["counted"] == 50 and stats["skips"] == {}
    assert stats["tokens_max"] >= stats["tokens_mean"] > 0
    assert Image.open(tmp_path / "e.png").size == (4 * 320, Image.open(tmp_path / "e.png").size[1])
