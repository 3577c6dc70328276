"""The batching engine decodes each request exactly as `generate` does alone.

The engine is driven step by step (`run_once`, no thread) so that requests join mid-decode,
in batches of prompts of several lengths, and leave rows for others to take: greedy tokens
must equal the one-request reference, eager and compiled.
"""

import gc
import os
import weakref

import pytest
import torch

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.generation import generate
from nanovlm.serve.engine import Engine, EngineBusy, GenerationRequest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).eval()
    with torch.no_grad():  # larger weights than the init: varied, prompt-dependent greedy tokens
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m.to(os.environ.get("NANOVLM_TEST_DEVICE", "cpu"))  # cuda: the same checks on a GPU


def _prompt(model, n: int, seed: int, image: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n,), generator=g).tolist()
    tiles = None
    if image:
        L = model.cfg.mp_image_token_length
        ids = ids[:2] + [model.image_token_id] * L + ids[2:]
        tiles = torch.rand(1, 3, model.cfg.vit_img_size, model.cfg.vit_img_size, generator=g)
    return ids, tiles


def _reference(model, ids, tiles, max_tokens):
    out = generate(model, torch.tensor([ids]), [tiles] if tiles is not None else None,
                   max_new_tokens=max_tokens, greedy=True)[0].tolist()
    eos = model.cfg.lm_eos_token_id
    return out[: out.index(eos)] if eos in out else out


def _drain(handle):
    tokens, done = [], None
    while (event := handle.get(timeout=0)) is not None:
        if event[0] == "token":
            tokens.append(event[1])
        else:
            done = event
    return tokens, done


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_continuous_batching_matches_one_at_a_time(model, compile):
    engine = Engine(model, max_batch_size=3, context=24, compile=compile)
    held = {}  # request -> the cache rows it has held (a finished request's row goes to the last one)
    # (step at which it arrives, prompt length, max_tokens, with an image)
    schedule = [(0, 4, 18, False), (2, 10, 10, True), (2, 5, 15, False), (6, 14, 6, True),
                (14, 3, 20, False), (22, 17, 6, False), (30, 5, 14, True), (31, 8, 14, False)]
    requests = [(_prompt(model, n, seed=i, image=img), m) for i, (_, n, m, img) in enumerate(schedule)]
    handles = [None] * len(schedule)
    results = [[] for _ in schedule]
    step = 0
    while step < 1000:
        for i, (at, *_) in enumerate(schedule):
            if at == step:
                (ids, tiles), m = requests[i]
                handles[i] = engine.submit(GenerationRequest(ids, tiles, m, temperature=0.0))
        if step > max(at for at, *_ in schedule) and engine.idle:
            break
        engine.run_once()
        assert len(engine._rows) <= 3
        for row, r in enumerate(engine._rows):
            held.setdefault(id(r), set()).add(row)
        for i, h in enumerate(handles):
            if h is not None:
                results[i] += _drain(h)[0]
        step += 1
    assert engine.idle and engine.counters["errors"] == 0
    assert engine.stats()["mean_batch"] > 1.5
    assert any(len(rows) > 1 for rows in held.values()), "some request should have moved into a freed row"
    for i, ((ids, tiles), m) in enumerate(requests):
        assert results[i] == _reference(model, ids, tiles, m), f"request {i} differs from its solo decode"


def test_cancel_frees_the_slot_and_spares_the_others(model):
    engine = Engine(model, max_batch_size=2, context=64)
    (a_ids, _), (b_ids, _), (c_ids, _) = (_prompt(model, 6, 100), _prompt(model, 9, 101), _prompt(model, 7, 102))
    a = engine.submit(GenerationRequest(a_ids, None, 50, temperature=0.0))
    b = engine.submit(GenerationRequest(b_ids, None, 20, temperature=0.0))
    c = engine.submit(GenerationRequest(c_ids, None, 20, temperature=0.0))  # waits: two slots
    got = {"b": [], "c": []}
    for _ in range(3):
        engine.run_once()
    a.cancel()
    for _ in range(200):
        if engine.idle:
            break
        engine.run_once()
        got["b"] += _drain(b)[0]
        got["c"] += _drain(c)[0]
    assert engine.idle
    assert engine.counters["generated_tokens"] < 50 + 40  # a stopped early
    assert got["b"] == _reference(model, b_ids, None, 20)
    assert got["c"] == _reference(model, c_ids, None, 20)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    ids, _ = _prompt(model, 8, 7)

    def sample(with_others: bool):
        engine = Engine(model, max_batch_size=4, context=64)
        h = engine.submit(GenerationRequest(ids, None, 8, temperature=1.0, top_p=0.9, seed=1234))
        if with_others:
            for s in range(2):
                engine.submit(GenerationRequest(_prompt(model, 5 + s, 50 + s)[0], None, 8, temperature=0.8))
        tokens = []
        while not engine.idle:
            engine.run_once()
            tokens += _drain(h)[0]
        return tokens

    alone = sample(False)
    assert len(alone) > 0 and alone == sample(True)


def test_the_engine_keeps_one_cache_and_lets_finished_requests_go(model):
    # What a long-running server holds stays bounded: one cache, allocated once; no finished request.
    engine = Engine(model, max_batch_size=3)
    finished = []
    for i in range(12):
        ids, tiles = _prompt(model, 3 + i % 7, 200 + i, image=i % 3 == 0)
        h = engine.submit(GenerationRequest(ids, tiles, 4 + i % 5, temperature=0.5 * (i % 2), seed=i))
        finished.append(weakref.ref(h))
        if i == 0:
            engine.run_once()
            buffers = [t.data_ptr() for t in engine._cache.k + engine._cache.v]
        del h
    while not engine.idle:
        engine.run_once()
    assert engine.counters["requests"] == 12 and engine.counters["errors"] == 0
    assert [t.data_ptr() for t in engine._cache.k + engine._cache.v] == buffers
    gc.collect()
    assert all(ref() is None for ref in finished), "the engine still holds finished requests"


def test_done_event_and_length_limit(model):
    engine = Engine(model, max_batch_size=2, context=32)
    ids, _ = _prompt(model, 5, 3)
    h = engine.submit(GenerationRequest(ids, None, 1, temperature=0.0))
    engine.run_once()
    tokens, done = _drain(h)
    assert done is not None and done[0] == "done" and done[2] == 1
    assert done[1] == ("stop" if not tokens else "length")


def test_submit_checks_the_context_and_the_queue(model):
    engine = Engine(model, max_batch_size=1, max_queued=1, context=32)
    with pytest.raises(ValueError, match="context"):
        engine.submit(GenerationRequest(list(range(10, 40)), None, 5))
    engine.submit(GenerationRequest([11, 12], None, 5))
    with pytest.raises(EngineBusy, match="waiting"):
        engine.submit(GenerationRequest([11, 12], None, 5))
    engine.stop()
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit(GenerationRequest([11, 12], None, 5))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model):
    engine = Engine(model, max_batch_size=2, context=32)
    original = model.embed

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    model.embed = broken
    try:
        h = engine.submit(GenerationRequest([11, 12, 13], None, 5, temperature=0.0))
        engine.run_once()
    finally:
        del model.embed
    assert model.embed.__func__ is original.__func__
    events = []
    while (e := h.get(timeout=0)) is not None:
        events.append(e)
    assert events[-1][0] == "error" and "boom" in events[-1][1]
    h2 = engine.submit(GenerationRequest([11, 12, 13], None, 3, temperature=0.0))
    while not engine.idle:
        engine.run_once()
    assert _drain(h2)[1][0] == "done"
