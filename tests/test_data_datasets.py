"""Dataset formats (LLaVA json/jsonl, parquet, arrow, save_to_disk, streaming), easy-VQA, skips."""

import io
import json

import pytest
import torch
from PIL import Image

from nanovlm.config import IGNORE_INDEX, ConfigError, TrainConfig, VLMConfig
from nanovlm.data.collators import VLMCollator
from nanovlm.data.datasets import (ConversationDataset, DataError, ResumableLoader, SampleError,
                                   ShardedBatchSampler, SkipCounter, build_dataset, is_skip)
from nanovlm.data.processors import get_tokenizer

CFG = VLMConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(CFG.lm_tokenizer, CFG.vlm_extra_tokens, CFG.lm_chat_template)


def png(color=(200, 30, 30), size=(24, 24)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make(tok, data, **train):
    return build_dataset(TrainConfig(data=str(data), **train), CFG, tok)


def reasons(ds):
    return [ds[i]["skip"] if is_skip(ds[i]) else "ok" for i in range(len(ds))]


# ---------------------------------------------------------------------------- LLaVA
def llava_records(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    (img_dir / "a.png").write_bytes(png())
    (img_dir / "broken.png").write_bytes(png()[:60])
    return [
        {"id": "good", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "imgs/nope.png", "conversations": [
            {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
        {"id": "truncated", "image": "imgs/broken.png", "conversations": [
            {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
        {"id": "no-placeholder", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "two-placeholders", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]},
        {"id": "empty-answer", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        {"id": "number-answer", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 7}]},
        {"id": "alien", "conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "two-images", "image": ["imgs/a.png", "imgs/a.png"], "conversations": [
            {"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same."}]},
    ]


EXPECTED_LLAVA = ["ok", "ok", "missing_image", "corrupt_image", "image_placeholder_mismatch",
                  "image_placeholder_mismatch", "empty_text", "non_string_text", "bad_record", "ok"]


def test_llava_json_with_skips(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(llava_records(tmp_path)))
    ds = make(tok, path)
    assert isinstance(ds, ConversationDataset) and len(ds) == 10
    assert reasons(ds) == EXPECTED_LLAVA
    good = ds[0]
    assert good["images"].shape == (1, 3, 32, 32) and "good" in good["id"]
    text = tok.decode(good["input_ids"], skip_special_tokens=False)
    assert "<|global_image|>" + "<|image|>" * 4 + "What color?" in text  # "<image>\n": the newline is layout
    supervised = good["labels"][good["labels"] != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special_tokens=False) == "Red.<|im_end|>Yes.<|im_end|>"
    assert ds[1]["images"].shape == (0, 3, 32, 32)
    two = ds[9]
    assert two["images"].shape == (2, 3, 32, 32)
    assert "<image: 0><|global_image|>" in tok.decode(two["input_ids"], skip_special_tokens=False)

    batch = VLMCollator(tok.pad_token_id, CFG.lm_max_length)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 3
    counter = SkipCounter()
    counter.update(batch["skips"])
    assert counter.as_dict() == {"bad_record": 1, "corrupt_image": 1, "empty_text": 1, "image_placeholder_mismatch": 2,
                                 "missing_image": 1, "non_string_text": 1}
    assert counter.total == 7 and "image_placeholder_mismatch 2" in counter.summary()
    assert counter.examples["missing_image"].startswith("data.json[2] (id missing): image file ")
    counter.update(batch["skips"])  # the same samples met again (a second epoch): counted once
    assert counter.total == 7


def test_llava_jsonl_and_image_folder(tmp_path, tok):
    records = llava_records(tmp_path)
    sub = tmp_path / "annotations"
    sub.mkdir()
    path = sub / "data.jsonl"
    lines = [json.dumps(r) for r in records] + ["{not json", ""]
    path.write_text("\n".join(lines) + "\n")
    ds = make(tok, path, image_folder=str(tmp_path))  # images are not next to the jsonl file
    assert reasons(ds) == EXPECTED_LLAVA + ["bad_record"]
    ds_default_folder = make(tok, path)
    assert ds_default_folder[0]["skip"] == "missing_image"

    # Worker processes (each opens its own file handle); skips travel in the batches.
    loader = ResumableLoader(ds, ShardedBatchSampler(len(ds), 4), VLMCollator(tok.pad_token_id, CFG.lm_max_length),
                             num_workers=2)
    batches = list(loader) + list(loader)  # two epochs
    assert sum(b["input_ids"].shape[0] for b in batches) == 6
    counter = SkipCounter()
    for b in batches:
        counter.update(b["skips"])
    assert counter.total == 8 and counter.counts["bad_record"] == 2  # each sample once, however often met
    # Records are named where an editor shows them: the alien speaker on line 9, broken JSON on line 11.
    assert {"data.jsonl line 9 (id alien)", "data.jsonl line 11"} <= counter.seen
    assert ds[10]["id"] == "data.jsonl line 11" and "not valid JSON" in ds[10]["error"]
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    restored.update(batches[0]["skips"])
    assert restored.as_dict() == counter.as_dict()  # a resumed run still counts each sample once


def test_unexpected_errors_are_counted_not_raised(tmp_path, tok, monkeypatch):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(llava_records(tmp_path)[:2]))
    ds = make(tok, path)

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(ds.processor, "process", boom)
    assert ds[0] == {"skip": "unexpected_error", "id": "data.json[0] (id good)", "error": "RuntimeError: kaboom"}
    ds.strict = True
    with pytest.raises(SampleError, match=r"sample data.json\[1\] \(id text-only\): RuntimeError: kaboom"):
        ds[1]


def test_strict_names_the_sample(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(llava_records(tmp_path)))
    ds = make(tok, path, strict=True)
    assert ds[0]["input_ids"].numel() > 0
    with pytest.raises(SampleError, match=r"sample data.json\[2\] \(id missing\): image file .*nope.png does not"):
        ds[2]


# ---------------------------------------------------------------------------- Cauldron: parquet, arrow, save_to_disk
def cauldron_rows():
    return {
        "images": [[{"bytes": png(), "path": None}], [{"bytes": png((0, 0, 255), (80, 40)), "path": None},
                                                      {"bytes": png(), "path": None}],
                   [], [{"bytes": b"junk", "path": None}]],
        "texts": [[{"user": "Color?", "assistant": "Red.", "source": "x"}],
                  [{"user": "Colors?", "assistant": "Blue and red.", "source": "x"},
                   {"user": "Count?", "assistant": "Two.", "source": "x"}],
                  [{"user": "Hi", "assistant": "Hello", "source": "x"}],
                  [{"user": "Color?", "assistant": "Red.", "source": "x"}]],
    }


def check_cauldron(ds, tok):
    assert len(ds) == 4
    assert reasons(ds) == ["ok", "ok", "ok", "corrupt_image"]
    s = ds[1]
    assert s["images"].shape == (2, 3, 32, 32)
    text = tok.decode(s["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<image: 0><|global_image|>")
    supervised = s["labels"][s["labels"] != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special_tokens=False) == "Blue and red.<|im_end|>Two.<|im_end|>"


def test_cauldron_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table(cauldron_rows()), path)
    check_cauldron(make(tok, path), tok)
    folder = tmp_path / "shards"
    folder.mkdir()
    table = pa.table(cauldron_rows())
    pq.write_table(table.slice(0, 2), folder / "a.parquet")
    pq.write_table(table.slice(2, 2), folder / "b.parquet")
    check_cauldron(make(tok, folder), tok)


@pytest.mark.parametrize("writer", ["file", "stream"])
def test_cauldron_arrow(tmp_path, tok, writer):
    import pyarrow as pa

    table = pa.table(cauldron_rows())
    path = tmp_path / "train.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        w = pa.ipc.new_file(sink, table.schema) if writer == "file" else pa.ipc.new_stream(sink, table.schema)
        w.write_table(table)
        w.close()
    check_cauldron(make(tok, path), tok)


def test_save_to_disk(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = cauldron_rows()
    rows["images"] = [[Image.open(io.BytesIO(i["bytes"])) for i in imgs] for imgs in rows["images"][:3]] + [[]]
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string"),
                                                          "source": datasets.Value("string")})})
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    got = make(tok, tmp_path / "single")
    assert reasons(got) == ["ok"] * 4 and got[1]["images"].shape == (2, 3, 32, 32)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(make(tok, tmp_path / "dict")) == 4
    assert len(build_dataset(TrainConfig(data=str(tmp_path / "dict")), CFG, tok, split="test")) == 1
    with pytest.raises(DataError, match="has splits"):
        build_dataset(TrainConfig(data=str(tmp_path / "dict")), CFG, tok, split="validation")


def test_unknown_layout_and_missing_path(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(DataError, match=r"records have keys \['foo'\]; expected Cauldron"):
        make(tok, path)
    with pytest.raises(DataError, match="does not exist"):
        make(tok, tmp_path / "missing.jsonl")
    path.write_text(json.dumps([{"texts": [{"user": "q", "assistant": "a"}]}]))
    with pytest.raises(DataError, match="has no 'test' split"):
        build_dataset(TrainConfig(data=str(path)), CFG, tok, split="test")
    with pytest.raises(DataError, match="offline mode forbids"):
        make(tok, "someone/some-dataset")  # tests run with HF_HUB_OFFLINE=1


# ---------------------------------------------------------------------------- easy-VQA: records like any other
def test_easyvqa_is_records(tok):
    from nanovlm.data import easyvqa

    test_q = easyvqa.records("test")
    assert len(test_q) == 9673 and set(test_q[0]) == {"image", "question", "answer", "answer_type"}
    answers_of = {"shape": {"circle", "rectangle", "triangle"}, "yes/no": {"yes", "no"}}
    for r in test_q:
        assert r["answer"] in answers_of.get(r["answer_type"], {"red", "green", "blue", "black", "gray", "teal",
                                                                  "brown", "yellow"}), r
    single = build_dataset(TrainConfig(data="easyvqa", multi_turn=True), CFG, tok, split="test")
    assert isinstance(single, ConversationDataset) and len(single) == 9673  # the test split: a question a sample
    x = single[3]
    assert tok.decode(x["labels"][x["labels"] != IGNORE_INDEX]) == test_q[3]["answer"]
    assert x["id"] == "easyvqa-test[3]" and x["images"].shape == (1, 3, 32, 32)  # tiny preset: one 32 px tile
    with pytest.raises(DataError, match=r"^easyvqa has no 'val' split; it has splits train, test\.$"):
        build_dataset(TrainConfig(data="easyvqa"), CFG, tok, split="val")


def test_easyvqa_questions_of_an_image_become_conversations(tok):
    from nanovlm.data import easyvqa

    train_q = easyvqa.records("train")
    ds = make(tok, "easyvqa", multi_turn=True, max_turns=3)
    merged = [ds.records_of(i) for i in range(len(ds))]
    assert sorted(r for m in merged for r in m) == list(range(38575))  # every question once
    assert max(map(len, merged)) == 3 and len({train_q[m[0]]["image"] for m in merged}) == 4000
    for m in merged[:50]:  # a sample's questions are about one image, in file order
        assert len({train_q[r]["image"] for r in m}) == 1 and m == sorted(m)
    s = ds[0]
    assert s["images"].shape == (1, 3, 32, 32) and (s["labels"] == tok.eos_token_id).sum() == len(merged[0])
    assert len(set(ds.group_keys())) == 4000  # a validation split keeps an image's questions together
    with pytest.raises(ConfigError, match="max_turns"):
        TrainConfig(max_turns=-2)


def test_easyvqa_independent_turns(tok):
    one = make(tok, "easyvqa", multi_turn=False)
    ind = make(tok, "easyvqa", multi_turn=True, independent_turns=True, packing=True, pack_length=128)
    k = CFG.mp_image_token_length
    for i in (0, 1, len(ind) - 1):
        s, n = ind[i], len(ind.records_of(i))
        assert len(s["input_ids"]) <= 128 and (s["input_ids"] == tok.image_token_id).sum() == k  # the image once
        restarts = (s["position_ids"][1:] <= s["position_ids"][:-1]).nonzero().flatten() + 1
        assert len(restarts) == n - 1 and (s["labels"] == tok.eos_token_id).sum() == n  # a branch per question
    # the first sample's first two questions: each branch is that question's own encoding
    s, first = ind[0], [one[j] for j in ind.records_of(0)[:2]]
    n0 = len(first[0]["input_ids"])
    assert torch.equal(s["input_ids"][:n0], first[0]["input_ids"])
    start = int(s["position_ids"][n0])
    assert torch.equal(s["input_ids"][n0:n0 + len(first[1]["input_ids"]) - start], first[1]["input_ids"][start:])
    assert "position_ids" not in one[0]


def test_independent_turns_on_conversation_data(tmp_path, tok):
    (tmp_path / "a.png").write_bytes(png())
    qa = [("<image>\nWhat color?", "Red."), ("What shape?", "A square."), ("Is it big?", "No.")]
    records = [
        {"id": "three", "image": "a.png", "conversations": [
            {"from": f, "value": v} for q, a in qa for f, v in (("human", q), ("gpt", a))]},
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                           {"from": "gpt", "value": "a"}]},
        {"id": "image-later", "image": "a.png", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A square."}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ind, conv = make(tok, path, independent_turns=True, multi_turn=False), make(tok, path, multi_turn=False)
    s = ind[0]
    assert (s["input_ids"] == tok.image_token_id).sum() == CFG.mp_image_token_length  # the image once
    restarts = ((s["position_ids"][1:] <= s["position_ids"][:-1]).nonzero().flatten() + 1).tolist()
    assert len(restarts) == 2  # three questions: two branches go back to the end of the image prompt
    # each branch is the question asked alone: "What shape?" right after the image
    start = int(s["position_ids"][restarts[0]])
    branch = s["input_ids"][restarts[0]:restarts[1]]
    assert torch.equal(s["input_ids"][:start], conv[0]["input_ids"][:start])  # the shared image prompt
    assert "What shape?" in tok.decode(branch) and "Red." not in tok.decode(branch)
    assert (s["labels"] == tok.eos_token_id).sum() == 3
    # one question, or images after the first question: kept as conversations
    for i in (1, 2):
        assert "position_ids" not in ind[i] and torch.equal(ind[i]["input_ids"], conv[i]["input_ids"])


# ---------------------------------------------------------------------------- merging records that share an image
def one_question_records(tmp_path):
    """LLaVA records of one question each: three about a.png, two about b.png, one about c.png
    (a faulty one about a.png, and a long answer about b.png)."""
    for name, color in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        (tmp_path / f"{name}.png").write_bytes(png(color))

    def rec(image, q, a):
        return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                   {"from": "gpt", "value": a}]}
    return [rec("a.png", "What color?", "red"), rec("b.png", "What color?", "green"),
            rec("a.png", "How many?", "1"), rec("c.png", "What color?", "blue"),
            {"image": "a.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                 {"from": "gpt", "value": "x"}]},
            rec("a.png", "Is it big?", "yes"), rec("b.png", "Describe it.", "a green square " * 40)]


def test_records_that_share_an_image_become_one_sample(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in one_question_records(tmp_path)))
    ds = make(tok, path, independent_turns=True, max_turns=2, packing=True, pack_length=128)
    # a.png: records 0, 2 (two questions, the cap), then 5; the faulty record 4 and the long
    # answer 6 (it would not fit a 128-token row beside record 1) stay alone.
    assert [ds.records_of(i) for i in range(len(ds))] == [[0, 2], [1], [3], [4], [5], [6]]
    merged = ds[0]
    assert (merged["input_ids"] == tok.image_token_id).sum() == CFG.mp_image_token_length  # one image
    text = tok.decode(merged["input_ids"], skip_special_tokens=False)
    assert "What color?" in text and "How many?" in text and "<image>" not in text
    supervised = tok.decode(merged["labels"][merged["labels"] != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "red<|im_end|>1<|im_end|>"
    assert merged["id"] == "data.jsonl lines 1+3" and ds[3]["skip"] == "image_placeholder_mismatch"
    assert ds.group_keys()[0] == ds.group_keys()[4]  # one image, one group: never split by validation
    # each merged question is the one asked alone: the same tokens as record 2 on its own
    alone = make(tok, path, independent_turns=True, multi_turn=False)
    start = int(merged["position_ids"][1:].lt(merged["position_ids"][:-1]).nonzero()[0]) + 1
    assert merged["input_ids"][start:].tolist() == alone[2]["input_ids"][merged["position_ids"][start]:].tolist()

    unlimited = make(tok, path, max_turns=0)
    assert unlimited.records_of(0) == [0, 2, 5]
    assert len(make(tok, path, multi_turn=False)) == 7


def test_the_held_out_part_names_every_record_of_a_merged_sample(tmp_path, tok):
    from nanovlm.train import distributed as dist
    from nanovlm.train.data import make_data

    records = []
    for k in range(12):
        (tmp_path / f"{k}.png").write_bytes(png((20 * k, 0, 0)))
        records += [{"image": f"{k}.png", "conversations": [{"from": "human", "value": f"<image>{q}"},
                                                            {"from": "gpt", "value": a}]}
                    for q, a in (("What color?", "red"), ("How many?", "1"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    cfg = TrainConfig(data=str(path), val_fraction=0.25, batch_size=2)
    ds = build_dataset(cfg, CFG, tok)
    assert len(ds) == 12
    data = make_data(ds, lambda s: s, cfg, dist.DistInfo(rank=0, world_size=1, local_rank=0,
                                                         device=torch.device("cpu")))
    held = [ds.records_of(i) for i in range(len(ds)) if ds.records_of(i)[0] in data.val_records]
    assert len(held) == 3 and sorted(r for h in held for r in h) == list(data.val_records)
    trained = {r for i in data.train_indices for r in ds.records_of(i)}
    assert not trained & set(data.val_records) and len(trained) + len(data.val_records) == 24
