"""The one attention entry point against torch's SDPA on repeated heads, and the training
forward without host syncs (on the meta device) or graph breaks (traced by torch.compile).

Tolerances. fp32: both sides compute the same sums in a different order (a head_dim = 8 dot
product, then a softmax and a weighted sum over T_kv <= 12 keys, terms below ~4 in size), so
they differ by about (8 + 12) x 2^-24 x 4 ~ 5e-6 at most: `assert_close`'s fp32 defaults
(atol 1e-5, rtol 1.3e-6) hold it. bf16 (the plain path under autocast): q, k, v and the scores
are rounded to 8 significant bits (2^-9 relative): scores of size ~4 move by ~1e-2, the
probabilities by ~1e-2 relative, and the output, a weighted mean of |v| <~ 3, by ~3e-2.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from nanovlm import VLMConfig, VisionLanguageModel, runtime
from nanovlm.config import IGNORE_INDEX
from nanovlm.models.attention import attention
from nanovlm.models.language_model import build_attention_mask
from nanovlm.runtime import PLAIN_MAX_TOKENS

uses_plain_path = runtime.cpu_training_attention


@pytest.fixture
def cpu_training():
    """Inside a CPU training run: what `runtime.prepare` switches on."""
    with runtime.cpu_training_path():
        yield

B, HEAD_DIM = 3, 8


def reference(q, k, v, mask=None, is_causal=False):
    """torch's SDPA with every kv head repeated for its query heads (transformers' repeat_kv)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def qkv(n_heads, n_kv_heads, T_q, T_kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_heads, T_q, HEAD_DIM, generator=g)
    k, v = (torch.randn(B, n_kv_heads, T_kv, HEAD_DIM, generator=g) for _ in range(2))
    return q, k, v


def random_mask(T_q, T_kv, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, T_q, T_kv, generator=g) < 0.5
    mask[..., -1] = True  # every query may attend to something
    return mask


CASES = {  # name: (T_q, T_kv, mask builder or None, is_causal)
    "none": (10, 10, None, False),
    "causal": (10, 10, None, True),
    "mask": (10, 10, random_mask, False),
    "decode": (1, 12, None, False),  # one new token against a cache
    "decode masked": (1, 12, random_mask, False),  # ... of left-padded rows
    "chunk after cache": (3, 12, random_mask, False),
}


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["MHA", "GQA"])
@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_match_sdpa_on_repeated_heads(case, heads, cpu_training):
    T_q, T_kv, make_mask, is_causal = CASES[case]
    q, k, v = qkv(*heads, T_q, T_kv)
    mask = make_mask(T_q, T_kv) if make_mask else None
    expected = reference(q, k, v, mask, is_causal)
    with torch.no_grad():  # SDPA path
        assert not uses_plain_path(q, k)
        torch.testing.assert_close(attention(q, k, v, mask, is_causal), expected)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert uses_plain_path(q, k)
    plain = attention(q, k, v, mask, is_causal)
    torch.testing.assert_close(plain, expected)
    grads = torch.autograd.grad(plain.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(reference(q, k, v, mask, is_causal).square().sum(), (q, k, v))
    torch.testing.assert_close(grads, expected_grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 scores (module docstring: tolerance)
        torch.testing.assert_close(attention(q, k, v, mask, is_causal).float(), expected, atol=3e-2, rtol=3e-2)


def test_decode_step_equals_the_last_row_of_the_full_causal_pass():
    q, k, v = qkv(6, 2, 12, 12)
    full = attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q[:, :, -1:], k, v), full[:, :, -1:])


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["MHA", "GQA"])
def test_one_query_under_compile_takes_the_loop_path_and_matches_sdpa(heads, monkeypatch):
    """The compiled decode step's attention (one query on the CPU) is `_one_query`, not SDPA."""
    from nanovlm.models import attention as attention_module

    q, k, v = qkv(*heads, 1, 12)
    mask = random_mask(1, 12)
    calls = []
    real = attention_module._one_query
    monkeypatch.setattr(attention_module, "_one_query", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, m), backend="eager", fullgraph=True)
    for m in (mask, None):
        torch.testing.assert_close(compiled(q, k, v, m), reference(q, k, v, m))
        torch.testing.assert_close(compiled(q.bfloat16(), k.bfloat16(), v.bfloat16(), m).float(),
                                   reference(q, k, v, m), atol=2e-2, rtol=2e-2)
    traced = len(calls)
    assert traced  # traced through the loop path
    attention(q, k, v, mask)
    assert len(calls) == traced  # eager: SDPA


def test_the_rule_picks_the_plain_path_only_for_short_rows_in_cpu_training(cpu_training):
    q, k, _ = qkv(4, 2, 4, PLAIN_MAX_TOKENS)
    q.requires_grad_()
    assert not uses_plain_path(q.detach(), k)  # nothing to train
    assert uses_plain_path(q, k)
    assert not uses_plain_path(q, torch.cat([k, k[:, :, :1]], dim=2))  # one key too many
    with torch.no_grad():
        assert not uses_plain_path(q, k)
    assert not uses_plain_path(q.to("meta"), k.to("meta"))  # any other device: SDPA


def test_bad_calls_are_refused_with_a_sentence():
    q, k, v = qkv(4, 4, 5, 5)
    with pytest.raises(ValueError, match="a mask or is_causal, not both"):
        attention(q, k, v, torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="5 query heads cannot share 2 key/value heads evenly"):
        attention(torch.randn(1, 5, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


def test_attention_mask_from_segments_is_boolean_and_block_causal():
    segments = torch.tensor([[0, 1, 1, 2, 2]])
    mask = build_attention_mask(segments, 5)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],  # padding: itself only
                                         [0, 1, 0, 0, 0],
                                         [0, 1, 1, 0, 0],
                                         [0, 0, 0, 1, 0],
                                         [0, 0, 0, 1, 1]]


def test_ignore_index_is_cross_entropys_default():
    assert IGNORE_INDEX == inspect.signature(F.cross_entropy).parameters["ignore_index"].default == -100


def _training_batch(model, packed: bool):
    k = model.cfg.mp_image_token_length
    ids = torch.randint(10, 500, (2, 2 * k + 10))
    ids[:, 1:1 + k] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -4:-1] = ids[:, -3:]
    segments = torch.ones_like(ids)
    positions = None
    if packed:  # row 0: two documents and padding; explicit positions with a branch
        segments[0, k + 4:] = 2
        segments[0, -2:] = 0
        positions = torch.cat([torch.arange(k + 4), torch.arange(k + 2), torch.arange(2, 4),
                               torch.zeros(2, dtype=torch.long)]).expand(2, -1).clone()
    images = torch.rand(2, 3, model.cfg.vit_img_size, model.cfg.vit_img_size)
    index = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    return ids, images, segments, labels, positions, index


@pytest.mark.parametrize("packed", [False, True])
def test_training_forward_and_backward_never_read_a_value_back(packed):
    """On the meta device a tensor has a shape and no values: `int(t)`, `.item()`, boolean
    indexing or `nonzero` raise there. The training step running through means that on an
    accelerator it never waits for the device (a host sync)."""
    cfg = VLMConfig.from_preset("tiny").replace(vit_pixel_mean=0.5, vit_pixel_std=0.5)
    with torch.device("meta"):
        model = VisionLanguageModel(cfg, load_backbone=False).train()
    ids, images, segments, labels, positions, index = (
        t if t is None else t.to("meta") for t in _training_batch(model, packed))
    _, loss = model(ids, images, segments, labels, loss_reduction="sum", position_ids=positions,
                    return_logits=False, supervised_index=index)
    loss.backward()
    assert loss.device.type == "meta" and model.MP.proj.weight.grad is not None
    with pytest.raises((NotImplementedError, RuntimeError)):  # without the collator's index: a sync
        model(ids, images, segments, labels, return_logits=False)


@pytest.mark.parametrize("packed", [False, True])
def test_the_collators_index_gives_the_same_loss_and_logits(packed):
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).eval()
    ids, images, segments, labels, positions, index = _training_batch(model, packed)
    with torch.no_grad():
        full, _ = model(ids, images, segments, position_ids=positions)  # (B, T, vocab)
        logits, loss = model(ids, images, segments, labels, position_ids=positions, supervised_index=index)
        _, found = model(ids, images, segments, labels, position_ids=positions)
    supervised = labels != IGNORE_INDEX
    torch.testing.assert_close(logits, full)  # (B, T, vocab) with targets too
    torch.testing.assert_close(loss, F.cross_entropy(full[supervised], labels[supervised]))
    assert torch.equal(found, loss)


def test_training_forward_is_one_torch_compile_graph():
    """Dynamo traces the training forward (packed rows, branch positions) without a graph break:
    no value read back, no data-dependent shape (tracing only, no compilation)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).train()
    ids, images, segments, labels, positions, index = _training_batch(model, packed=True)

    def loss(*batch):
        return model(*batch[:4], loss_reduction="sum", position_ids=batch[4], return_logits=False,
                     supervised_index=batch[5])[1]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(ids, images, segments, labels, positions, index)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
