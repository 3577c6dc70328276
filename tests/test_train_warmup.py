"""The vision stage: a readout built from the training samples alone teaches the encoder, on the
trainer, schedule and time budget every stage runs on."""

from __future__ import annotations

import re

import torch
from test_train_checkpoint import assert_resumes_like
from test_train_synthetic import ANSWERS, EOS, SyntheticVQA, final_weights, run_synthetic, synthetic_data, \
    tiny_configs

from nanovlm.config import IGNORE_INDEX
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train.data import validation_split
from nanovlm.train.optim import Schedule
from nanovlm.train.readout import END, Pairs, ReadoutHead, build_targets, collect_pairs, held_out_targets, sample_pairs
from nanovlm.train.step import VISION_SHARE, fit_steps, vision_budget
from nanovlm.train.vision import MAX_EXTENSION, VisionStage, _extension, readout_accuracy

FP32 = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}


def vision_warmup(model, data, steps, lr, batch_size, held_out=None, **kwargs):
    return VisionStage(model, data, steps, lr, batch_size, **kwargs).run(held_out)


def _tiny_model():
    vlm_cfg, _ = tiny_configs()
    torch.manual_seed(0)
    return VisionLanguageModel(vlm_cfg, load_backbone=False)


def _drop(cfg) -> set[int]:
    return {EOS} | {cfg.lm_base_vocab_size + k for k in range(len(cfg.vlm_extra_tokens))}


def _targets(cfg, n=64, seed=0, indices=None):
    ds = SyntheticVQA(cfg, n=n, seed=seed)
    return ds, build_targets(collect_pairs(ds, indices if indices is not None else range(n), _drop(cfg)))


def test_question_and_answer_tokens_come_from_the_supervised_spans():
    image = 900
    ids = torch.tensor([image, image, 5, 6, 7, 50, 51, EOS, 8, 9, 60, EOS])
    labels = torch.full_like(ids, -100)
    labels[4:7] = ids[5:8]  # answer 50 51 <eos>, predicted from positions 4..6
    labels[9:11] = ids[10:12]  # answer 60 <eos>
    pairs = sample_pairs({"input_ids": ids, "labels": labels}, {image, EOS})
    assert pairs == [([5, 6, 7], (50, 51)), ([8, 9], (60,))]


def test_targets_from_a_tiny_dataset():
    cfg = tiny_configs()[0]
    ds, data = _targets(cfg)
    assert data.coverage == 1.0 and data.n_questions == 64 and data.n_slots == 3  # two tokens and the end
    assert sorted(data.vocab) == sorted([*ANSWERS, 400])
    assert data.images.shape[0] == 64 and data.images.dtype == torch.uint8  # every image is distinct
    for p in (0, 5, 63):
        c = int(ds.classes[p])
        answer = [ANSWERS[c]] + ([400] if c >= 2 else [])
        row = data.targets[p].tolist()
        assert [data.vocab[k - 1] for k in row[:len(answer)]] == answer and row[len(answer)] == END
        assert all(k == IGNORE_INDEX for k in row[len(answer) + 1:])
        # the stored image is the sample's (to uint8 precision)
        assert (data.images[p, 0].float() / 255 - ds[p]["images"][0]).abs().max() <= 0.5 / 255 + 1e-6
    assert (data.questions[:, 0] > 0).all()  # every question has tokens


def test_images_shared_by_samples_are_stored_once():
    cfg = tiny_configs()[0]
    ds = SyntheticVQA(cfg, n=8)
    pairs = collect_pairs(ds, [0, 1, 0, 1, 2], _drop(cfg))  # samples 0 and 1 twice each
    assert len(pairs.images) == 3 and len(pairs.answers) == 5 and pairs.pair_image == [0, 1, 0, 1, 2]


def test_answers_are_written_token_by_token_and_rare_tokens_left_out():
    image = [torch.zeros(1, 3, 8, 8, dtype=torch.uint8)] * 4
    pairs = Pairs(images=image, pair_image=[0, 1, 2, 3], questions=[[5]] * 4,
                  answers=[(10, 11, 12), (10, 13, 14), (11, 15), (16,)])
    data = build_targets(pairs)
    assert data.vocab == [10, 11] and data.n_slots == 4 and data.coverage == 0.0  # no whole answer repeats
    X = IGNORE_INDEX  # a token seen once is not learned; the tokens around it still are
    assert data.targets.tolist() == [[1, 2, X, END], [1, X, X, END], [2, X, END, X]]  # (16,): nothing to learn
    held = held_out_targets(Pairs(images=image, pair_image=[0, 1], questions=[[5], [5]],
                                  answers=[(11, 10), (10, 12)]), data)
    assert held.targets.tolist() == [[2, 1, END, X]] and held.coverage == 0.5  # (10, 12) cannot be written
    unique = Pairs(images=image, pair_image=[0, 1], questions=[[5], [5]], answers=[(10,), (11,)])
    assert build_targets(unique) == "the answers repeat fewer than two tokens"
    assert build_targets(Pairs()) == "the training samples hold no image with a supervised answer"


def _two_colour_pairs(combos: list[tuple[int, int]], repeats: int, seed: int) -> Pairs:
    """32 px images, the left half one colour and the right half another; the answer names both in order."""
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1], [0.1, 0.9, 0.9],
                            [0.9, 0.1, 0.9]])
    g, pairs = torch.Generator().manual_seed(seed), Pairs()
    for left, right in combos * repeats:
        image = torch.rand(3, 32, 32, generator=g) * 0.2
        image[:, :, :16] += colours[left].view(3, 1, 1)
        image[:, :, 16:] += colours[right].view(3, 1, 1)
        pairs.pair_image.append(len(pairs.images))
        pairs.images.append((image.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(0))
        pairs.questions.append([10, 11])
        pairs.answers.append((300 + left, 300 + right))
    return pairs


def test_readout_writes_answers_it_never_saw_whole():
    # Every colour is seen on both sides, but six pairs of colours never: a readout of whole answers
    # (classes) cannot answer them at all; one that writes tokens in order must place each colour.
    unseen = [(c, (c + 1) % 6) for c in range(6)]
    seen = [(a, b) for a in range(6) for b in range(6) if (a, b) not in unseen]
    data = build_targets(_two_colour_pairs(seen, 8, seed=0))
    held = held_out_targets(_two_colour_pairs(unseen, 4, seed=1), data)
    assert held.coverage == 1.0 and len(held.pair_image) == 24
    model = _tiny_model()
    result = vision_warmup(model, data, 150, 3e-3, 16, seed=0, amp=FP32, fused=False, say=lambda _: None,
                           progress=False, held_out=held)
    assert result["held_out_accuracy"] >= 0.9


def test_warmup_teaches_the_encoder_and_touches_nothing_else():
    model = _tiny_model()
    _, data = _targets(model.cfg)
    held = held_out_targets(collect_pairs(SyntheticVQA(model.cfg, n=32, seed=1), range(32), _drop(model.cfg)), data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = vision_warmup(model, data, 80, 3e-3, 16, seed=0, amp=FP32, fused=False, say=lambda _: None,
                           progress=False, held_out=held)
    assert result["train_accuracy"] == 1.0  # 4 classes: chance is 0.25
    assert result["held_out_accuracy"] >= 0.9  # images it never saw
    assert readout_accuracy(model, result["head"], held, FP32) == result["held_out_accuracy"]
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: later draws are unchanged
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision_encoder.") for k in changed)
    assert all(p.grad is None for p in model.parameters())


def test_warmup_is_deterministic_for_a_seed():
    a, b = _tiny_model(), _tiny_model()
    _, data = _targets(a.cfg, n=32)
    for m in (a, b):
        vision_warmup(m, data, 5, 3e-3, 8, seed=0, amp=FP32, fused=False, say=lambda _: None, progress=False)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_a_time_budget_cuts_the_step_count():
    assert fit_steps(1000, 20, 10.0, 100.0) == 200  # 0.5 s a step: 180 more fit in the 90 s left
    assert fit_steps(100, 20, 10.0, 1000.0) == 100  # never more than asked
    assert fit_steps(100, 20, 50.0, 10.0) == 20  # over budget already: stop now
    assert fit_steps(100, 0, 0.0, 10.0) == 100


def test_a_slow_machine_cuts_both_stages_alike():
    assert vision_budget(900, 200, 300) == VISION_SHARE * 900  # both fit: the vision stage may extend to its cap
    assert vision_budget(900, 200, 800) == 900 * 200 / 1000  # they do not: each keeps 90% of its plan
    assert vision_budget(900, 800, 200) == VISION_SHARE * 900  # never above the cap
    assert vision_budget(900, 100, 850) == 900 * 100 / 950  # the VLM stage's plan alone overruns


def test_the_warmup_schedule_warms_holds_and_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.param_groups[0]["base_lr"] = 1.0
    s = Schedule(opt, steps=10, warmup_share=0.2, decay_share=0.4)
    assert [round(s.factor(t), 4) for t in range(10)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8536, 0.5, 0.1464]
    s.cycle(10, 10)  # the next cycle
    assert s.total_steps == 20 and [s.factor(t) for t in (10, 11, 15)] == [0.5, 1.0, 1.0]
    assert round(s.factor(17), 4) == 0.8536
    s.total_steps = 15  # cut by a time budget: the warm-up stays, the decay stretches over the new count
    assert [round(s.factor(t), 4) for t in (10, 11, 12, 13, 14)] == [0.5, 1.0, 1.0, 1.0, 0.5]


def test_another_cycle_follows_only_while_the_readout_has_not_learned_its_batches():
    flat = [(80, 100)] * 100  # 80% on the last tenth: go on, even on a plateau
    assert _extension(flat, 100, 100, 0.0, 0.0) == 100  # another cycle of the planned steps
    learned = [(80, 100)] * 90 + [(98, 100)] * 10
    assert _extension(learned, 100, 100, 0.0, 0.0) == 0  # the last tenth above EXTEND_BELOW
    assert _extension(flat * 3, 100, 450, 0.0, 0.0) == 50  # MAX_EXTENSION x the planned steps in all
    assert _extension(flat * 3, 100, 490, 0.0, 0.0) == 0  # too short a cycle: not worth its warm-up
    # 0.5 s a step so far: 40 s left of a 90 s budget hold 80 steps
    assert _extension(flat, 100, 100, 50.0, 90.0) == 80
    assert _extension(flat, 100, 100, 50.0, 60.0) == 0
    assert _extension(flat[:5], 100, 5, 0.0, 0.0) == 0  # too few steps to tell
    assert MAX_EXTENSION == 5


def test_a_readout_that_has_not_learned_runs_another_cycle():
    model = _tiny_model()
    _, data = _targets(model.cfg, n=32)
    said = []
    result = vision_warmup(model, data, 4, 1e-6, 8, seed=0, amp=FP32, fused=False, say=said.append,
                           progress=False, extend=True, shift=0.1)
    # at a rate of 1e-6 nothing is learned: five cycles of 4 steps (the cap), each announced
    assert result["steps"] == 20 and result["cycles"] == 5 and result["shift_px"] == 3
    assert sum("another 4 steps, the rate up again" in line for line in said) == 4
    assert "tiles moved by up to 3 px" in said[0]
    # the last line says what ran and flags the readout's shortfall against its target
    assert re.fullmatch(r"vision warm-up done in \d+ s: 20 steps in 5 cycle\(s\), loss [\d.]+, readout accuracy "
                        r"[\d.]+% on training batches \(below its 97% target\)", said[-1]), said[-1]
    assert f"{result['train_accuracy']:.1%} on training batches" in said[-1]


def test_a_run_with_warmup_resumes_exactly(tmp_path):
    """The warm-up runs once, before step 0; a resumed run takes the warmed-up encoder from its
    checkpoint instead of warming up again, and ends with the uninterrupted run's weights."""
    settings = dict(max_training_steps=4, save_interval=2, vision_warmup="on", vision_warmup_steps=5)
    whole = run_synthetic(tmp_path / "whole", **settings)
    assert whole["vision_warmup"]["steps"] == 5 and whole["vision_warmup"]["slots"] == 3
    plain = run_synthetic(tmp_path / "plain", max_training_steps=4)
    assert "vision_warmup" not in plain
    key = "vision_encoder.patch_embedding.conv.weight"
    assert not torch.equal(final_weights(tmp_path / "whole")[key], final_weights(tmp_path / "plain")[key])

    assert_resumes_like(tmp_path / "whole", tmp_path / "broken", settings, dies_after=3, resumed_at="step_000002")


def test_timing_the_vlm_step_for_the_budget_leaves_the_run_unchanged(tmp_path):
    """With max_train_time, a VLM forward-backward is timed before the vision stage to split the budget;
    where nothing is cut, the run ends with the weights of a run without a budget."""
    settings = dict(max_training_steps=2, vision_warmup="on", vision_warmup_steps=22)
    timed = run_synthetic(tmp_path / "timed", max_train_time=3600, **settings)
    run_synthetic(tmp_path / "free", **settings)
    assert timed["vision_warmup"]["steps"] == 22
    for (k, x), y in zip(final_weights(tmp_path / "timed").items(), final_weights(tmp_path / "free").values()):
        assert torch.equal(x, y), k


def test_the_warmup_trains_only_on_training_samples(tmp_path):
    vlm_cfg, train_cfg = tiny_configs(vision_warmup="on", vision_warmup_steps=2, val_fraction=0.25, val_size=16)
    data = synthetic_data(vlm_cfg, train_cfg)
    assert len(data.val) == 16 and not set(data.train_indices) & set(data.val.indices)
    seen = []
    source = data.source
    real = source.__getitem__

    class Spy(type(source)):
        def __getitem__(self, i):
            seen.append(i)
            return real(i)

    source.__class__ = Spy
    run_synthetic(tmp_path / "run", data=data, vision_warmup="on", vision_warmup_steps=2, val_fraction=0.25,
                  val_size=16, max_training_steps=1)
    warm_reads = seen[:len(data.train_indices)]  # the warm-up reads the training samples first
    assert sorted(warm_reads) == sorted(data.train_indices)


def test_a_skipped_warmup_says_why(tmp_path, capsys):
    vlm_cfg, train_cfg = tiny_configs()
    data = synthetic_data(vlm_cfg, train_cfg)
    data.source = None
    summary = run_synthetic(tmp_path / "run", data=data, vision_warmup="auto", max_training_steps=1)
    assert summary["vision_warmup"] == {"skipped": "the training data cannot be read sample by sample"}
    assert "vision warm-up: skipped (the training data cannot be read sample by sample)." in capsys.readouterr().out


def test_validation_split_is_deterministic_grouped_and_disjoint():
    keys = [f"img{i // 3}" for i in range(300)]  # 100 images, 3 samples each
    train, val = validation_split(keys, 0.1, 500, seed=0)
    assert len(val) == 30 and sorted(train + val) == list(range(300))
    assert {keys[i] for i in val}.isdisjoint({keys[i] for i in train})  # an image is on one side only
    assert validation_split(keys, 0.1, 500, seed=0) == (train, val)  # every rank, every resume
    assert validation_split(list(reversed(keys)), 0.1, 500, seed=0)[1] == sorted(299 - i for i in val)
    assert validation_split(keys, 0.1, 500, seed=1)[1] != val
    assert len(validation_split(keys, 0.5, 9, seed=0)[1]) == 9  # the cap
    assert validation_split(keys, 0.0, 500, seed=0)[1] == []
    assert validation_split(["a", "a"], 0.5, 500, seed=0)[1] == []  # never everything


def test_the_header_comes_before_the_progress_bar_in_one_log(monkeypatch):
    """stdout and stderr into one file (`nanovlm train > log 2>&1`): the header line first."""
    import io

    log = io.StringIO()
    monkeypatch.setattr("sys.stdout", log)
    monkeypatch.setattr("sys.stderr", log)
    model = _tiny_model()
    _, data = _targets(model.cfg, n=16)
    vision_warmup(model, data, 2, 3e-3, 4, seed=0, amp=FP32, fused=False, say=lambda text: print(text, flush=True),
                  progress=True)
    text = log.getvalue()
    assert text.startswith("vision warm-up: 2 steps of the vision encoder with a question-keyed readout"), text[:200]
    assert "%|" in text  # the bar was drawn, after the header


def test_the_readout_adds_repeated_questions_gradients_in_order():
    """The head computes each distinct question once and spreads it to its repeats. The backward of
    `tensor[inverse]` is an accumulating index_put, which on a multi-threaded CPU adds fp32 rows
    with parallel atomic adds, in an order that changed from run to run (separate runs of the
    warm-up drifted apart). The head's backward must not use it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Accumulating(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                        torch.ops.aten._index_put_impl_.default):
                accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
                self.seen += bool(accumulate)
            return func(*args, **kwargs)

    torch.manual_seed(0)
    head = ReadoutHead(16, 20, 5, 3)
    questions = torch.randint(1, 20, (4, 3, 6))
    questions[1:] = questions[0]  # the same questions about every image
    patches = torch.randn(4, 8, 16, requires_grad=True)
    mode = Accumulating()
    with mode:
        head(patches, torch.ones(4, 8, dtype=torch.bool), questions).square().sum().backward()
    assert head.token.weight.grad is not None and mode.seen == 0
