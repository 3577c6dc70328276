"""Collators (left padding, drops), packing (same loss as one by one), sampler sharding and resume."""

from collections import Counter

import pytest
import torch
from PIL import Image

from nanovlm.config import IGNORE_INDEX, TrainConfig, VLMConfig
from nanovlm.data.collators import VLMCollator, build_collator
from nanovlm.data.datasets import (ResumableLoader, SampleError, SampleProcessor, ShardedBatchSampler, skip_marker)
from nanovlm.data.packing import PackingCollator, plan_packs
from nanovlm.data.processors import get_tokenizer, share_prefix

CFG = VLMConfig.from_preset("tiny", max_img_size=64)  # 32 px tiles; up to 2x2 grids + global view


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(CFG.lm_tokenizer, CFG.vlm_extra_tokens, CFG.lm_chat_template)


@pytest.fixture(scope="module")
def samples(tok):
    proc = SampleProcessor(CFG, tok)
    specs = [
        ([(64, 64)], ["What is it?", "A square."]),
        ([], ["Say hi.", "Hi!"]),
        ([(20, 50)], ["Color?", "Green, mostly.", "Sure?", "Yes."]),
        ([(64, 30), (10, 10)], ["Compare the two pictures, please.", "The first is wider than the second."]),
        ([(40, 40)], ["Shape?", "Round."]),
    ]
    out = []
    for k, (sizes, turns) in enumerate(specs):
        g = torch.Generator().manual_seed(k)
        images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        out.append(proc.process(images, messages, placeholders_required=False, sample_id=f"s{k}"))
    return out


@pytest.fixture(scope="module")
def model():
    from nanovlm.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel(CFG, load_backbone=False).eval()


def skip_counts(batch):
    return dict(Counter(m["skip"] for m in batch["skips"]))


def run_loss(model, batch):
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"],
                        loss_reduction="sum")
    return loss


def one_by_one(model, samples):
    total = 0.0
    for s in samples:
        batch = {"input_ids": s["input_ids"][None], "images": [s["images"]],
                 "attention_mask": torch.ones_like(s["input_ids"])[None], "labels": s["labels"][None]}
        total = total + run_loss(model, batch)
    return total


# ---------------------------------------------------------------------------- padding collator
def test_left_padding(tok, samples):
    batch = VLMCollator(tok.pad_token_id, CFG.lm_max_length)(samples)
    B, T = batch["input_ids"].shape
    assert B == len(samples) and T == max(len(s["input_ids"]) for s in samples)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, T - n:], s["input_ids"])
        assert (batch["input_ids"][b, :T - n] == tok.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [0] * (T - n) + [1] * n
        assert (batch["labels"][b, :T - n] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][b, T - n:], s["labels"])
        assert batch["images"][b] is s["images"]
    assert batch["attention_mask"].dtype == torch.long and batch["skips"] == []


@pytest.mark.parametrize("packing", [False, True])
def test_batches_carry_the_supervised_positions(tok, samples, packing):
    """`supervised_index`: the flat positions b * T + t with a label, in order, found on the CPU
    so that the training forward on an accelerator need not look for them."""
    collate = PackingCollator(tok.pad_token_id, 256) if packing else VLMCollator(tok.pad_token_id, CFG.lm_max_length)
    batch = collate(samples)
    labels, T = batch["labels"], batch["labels"].shape[1]
    expected = [b * T + t for b in range(labels.shape[0]) for t in range(T) if labels[b, t] != IGNORE_INDEX]
    assert batch["supervised_index"].tolist() == expected and len(expected) > 0
    assert batch["supervised_index"].dtype == torch.long


def test_padded_batch_loss_equals_one_by_one(model, tok, samples):
    batch = VLMCollator(tok.pad_token_id, CFG.lm_max_length)(samples)
    torch.testing.assert_close(run_loss(model, batch), one_by_one(model, samples))


def test_too_long_and_skipped_samples_are_counted(tok, samples):
    longest = max(len(s["input_ids"]) for s in samples)
    batch = VLMCollator(tok.pad_token_id, max_length=longest - 1)(
        samples + [skip_marker("missing_image", "gone", "x")])
    assert batch["input_ids"].shape[0] == len(samples) - 1
    assert skip_counts(batch) == {"too_long": 1, "missing_image": 1}
    assert batch["skips"][-1] == skip_marker("missing_image", "gone", "x")  # the markers travel whole
    with pytest.raises(SampleError, match=r"sample s\d: \d+ tokens, more than lm_max_length"):
        VLMCollator(tok.pad_token_id, max_length=longest - 1, strict=True)(samples)


def test_empty_and_text_only_batches(tok, samples):
    empty = VLMCollator(tok.pad_token_id, 256)([skip_marker("corrupt_image", "x", "a")])
    assert empty["input_ids"].shape == (0, 0) and empty["images"] == [] and skip_counts(empty) == {"corrupt_image": 1}
    assert VLMCollator(tok.pad_token_id, 256)([])["input_ids"].shape == (0, 0)
    text_only = VLMCollator(tok.pad_token_id, 256)([samples[1]])
    assert text_only["images"][0].shape == (0, 3, 32, 32)


# ---------------------------------------------------------------------------- packing
def test_first_fit_decreasing_plan():
    assert plan_packs([5, 4, 3, 3, 1], [0] * 5, 8) == [[0, 2], [1, 3, 4]]
    assert plan_packs([2, 2, 2], [1, 1, 1], 100, max_images_per_pack=2) == [[0, 1], [2]]
    assert plan_packs([2, 2], [5, 1], 100, max_images_per_pack=2) == [[0], [1]]  # over the cap: a row alone
    with pytest.raises(ValueError, match="more than pack_length"):
        plan_packs([9], [0], 8)


def test_packed_batch_layout(tok, samples):
    pack = PackingCollator(tok.pad_token_id, pack_length=256, max_images_per_pack=8)(samples)
    R, T = pack["input_ids"].shape
    assert T == 256 and R >= 2
    seen = sorted(i for row in pack["ids"] for i in row)
    assert seen == sorted(s["id"] for s in samples)
    by_id = {s["id"]: s for s in samples}
    for r in range(R):
        seg = pack["attention_mask"][r]
        n_seg = int(seg.max())
        assert n_seg == len(pack["ids"][r])
        assert seg.tolist() == sorted(seg[seg > 0].tolist()) + [0] * int((seg == 0).sum())  # 1..k then padding
        tiles = sum(by_id[i]["images"].shape[0] for i in pack["ids"][r])
        assert pack["images"][r].shape[0] == tiles <= 8 or n_seg == 1
        assert (pack["input_ids"][r] == tok.image_token_id).sum() == tiles * CFG.mp_image_token_length
        for k, sid in enumerate(pack["ids"][r], start=1):  # documents in their images' order
            assert torch.equal(pack["input_ids"][r][seg == k], by_id[sid]["input_ids"])


def test_packed_loss_equals_one_by_one(model, tok, samples):
    pack = PackingCollator(tok.pad_token_id, pack_length=200, max_images_per_pack=8)(samples)
    assert any(len(row) > 1 for row in pack["ids"])  # something actually got packed
    torch.testing.assert_close(run_loss(model, pack), one_by_one(model, samples))


def test_shared_prefix_sample_loss_equals_its_questions_alone(model, tok):
    proc = SampleProcessor(CFG, tok)
    image = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(9)) * 255).byte().numpy())
    turns = [("What shape?", "A circle."), ("What colour is it?", "Red."), ("Is it big?", "No, small.")]
    alone = [proc.process([image], [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                          placeholders_required=False, sample_id=f"q{k}") for k, (q, a) in enumerate(turns)]
    ids, labels, positions = share_prefix([(s["input_ids"].tolist(), s["labels"].tolist()) for s in alone])
    n0 = len(alone[0]["input_ids"])
    assert ids[:n0] == alone[0]["input_ids"].tolist() and positions[:n0] == list(range(n0))
    prefix = positions[n0]  # where the second branch starts again
    assert len(ids) == n0 + sum(len(s["input_ids"]) - prefix for s in alone[1:])
    assert labels[:prefix] == [IGNORE_INDEX] * prefix  # nothing supervised is shared
    n_image_tokens = int((alone[0]["input_ids"] == tok.image_token_id).sum())
    assert n_image_tokens > 0 and int((torch.tensor(ids) == tok.image_token_id).sum()) == n_image_tokens  # once
    shared = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
              "images": alone[0]["images"], "id": "shared"}
    expected = one_by_one(model, alone)
    for collate in (PackingCollator(tok.pad_token_id, pack_length=256), VLMCollator(tok.pad_token_id)):
        batch = collate([shared, alone[1]])  # next to a sample without its own positions
        assert batch["position_ids"].shape == batch["input_ids"].shape
        with torch.no_grad():
            _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"],
                            loss_reduction="sum", position_ids=batch["position_ids"])
        torch.testing.assert_close(loss, expected + one_by_one(model, alone[1:2]))


def test_packing_drops_what_does_not_fit(tok, samples):
    shortest = min(len(s["input_ids"]) for s in samples)
    pack = PackingCollator(tok.pad_token_id, pack_length=shortest)(samples)
    assert pack["input_ids"].shape == (1, shortest) and skip_counts(pack) == {"too_long": len(samples) - 1}
    none = PackingCollator(tok.pad_token_id, pack_length=4)(samples)
    assert none["input_ids"].shape == (0, 4) and none["images"] == []


def test_build_collator(tok):
    assert isinstance(build_collator(TrainConfig(packing=True, pack_length=300), CFG, tok), PackingCollator)
    c = build_collator(TrainConfig(), CFG, tok)
    assert isinstance(c, VLMCollator) and c.max_length == CFG.lm_max_length


# ---------------------------------------------------------------------------- sampler and loader
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_matches_the_single_process_batches(drop_last):
    n, G = 23, 8
    single = ShardedBatchSampler(n, G, seed=3, drop_last=drop_last)
    for W in (2, 4):
        ranks = [ShardedBatchSampler(n, G, rank=r, world_size=W, seed=3, drop_last=drop_last) for r in range(W)]
        for epoch in (0, 1):
            for s in [single] + ranks:
                s.set_epoch(epoch)
            per_rank = [list(s) for s in ranks]
            assert all(len(p) == len(single) for p in per_rank)  # every rank takes the same number of steps
            for b, whole in enumerate(single):
                assert sum((p[b] for p in per_rank), []) == whole
    single.set_epoch(0)
    seen = sum(list(single), [])
    assert len(set(seen)) == len(seen) == (n if not drop_last else n // G * G)
    single.set_epoch(1)
    assert sum(list(single), []) != seen  # reshuffled each epoch


class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == 7:
            return skip_marker("corrupt_image", "bad", f"toy[{i}]")
        return {"input_ids": torch.arange(i + 1), "labels": torch.arange(i + 1), "images": torch.zeros(0, 3, 2, 2),
                "id": f"toy[{i}]"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch(num_workers):
    collate = VLMCollator(pad_token_id=0, max_length=100)

    def loader():
        return ResumableLoader(Toy(), ShardedBatchSampler(10, 3, seed=1), collate, num_workers=num_workers)

    full = loader()
    reference = [b["ids"] for b in full] + [b["ids"] for b in full]  # two epochs
    assert full.state_dict() == {"epoch": 2, "index": 0, "seed": 1}
    assert sum(len(ids) for ids in reference[:4]) == 9  # one skip in the epoch

    first = loader()
    it = iter(first)
    got = [next(it)["ids"], next(it)["ids"]]
    state = first.state_dict()
    assert state == {"epoch": 0, "index": 2, "seed": 1}
    resumed = loader()
    resumed.load_state_dict(state)
    got += [b["ids"] for b in resumed] + [b["ids"] for b in resumed]
    assert got == reference
    with pytest.raises(ValueError, match="resume with the same seed"):
        ShardedBatchSampler(10, 3, seed=2).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_leaves_the_global_rng_alone(num_workers):
    """Building the epoch's DataLoader (and its worker seeds) must not draw from torch's global
    RNG, or a resumed run's dropout and sampling would follow a shifted stream."""
    loader = ResumableLoader(Toy(), ShardedBatchSampler(10, 3, seed=1), VLMCollator(pad_token_id=0, max_length=100),
                             num_workers=num_workers)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = [b["ids"] for b in loader]
    assert len(batches) == 4
    assert torch.equal(torch.get_rng_state(), before)
