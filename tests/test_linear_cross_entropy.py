"""The fused chunked loss gives the plain path's loss and gradients, alone and inside the VLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.config import IGNORE_INDEX
from nanovlm.models.linear_cross_entropy import linear_cross_entropy


def _plain_and_fused(h, w, t, precision, chunk_size):
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    grads = []
    for fused in (False, True):
        h.grad = w.grad = None
        with torch.autocast(**amp):
            loss = linear_cross_entropy(h, w, t, chunk_size) if fused else \
                F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        (0.5 * loss).backward()  # a non-unit incoming gradient
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    return grads


@pytest.mark.parametrize("chunk_size, w_rows", [(7, 1024), (7, 20), (64, 64), (1000, 1024)])
def test_matches_cross_entropy_of_the_logits_fp32(chunk_size, w_rows, monkeypatch):
    monkeypatch.setattr("nanovlm.models.linear_cross_entropy.W_ROWS", w_rows)  # the head's gradient in parts
    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 32, generator=g).requires_grad_()
    w = (0.3 * torch.randn(500, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 500, (150,), generator=g)
    (l1, gh1, gw1), (l2, gh2, gw2) = _plain_and_fused(h, w, t, "fp32", chunk_size)
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(gh2, gh1)
    torch.testing.assert_close(gw2, gw1)


def test_bf16_autocast_stays_close():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(200, 64, generator=g).requires_grad_()
    w = (0.1 * torch.randn(3000, 64, generator=g)).requires_grad_()
    t = torch.randint(0, 3000, (200,), generator=g)
    (l1, gh1, gw1), (l2, gh2, gw2) = _plain_and_fused(h, w, t, "bf16", 64)
    torch.testing.assert_close(l2, l1, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh2, gh1, rtol=2e-2, atol=2e-3)
    # the plain path rounds d loss / d weight to bf16; the fused one sums the chunks in fp32
    assert (gw2 - gw1).norm() < 1e-2 * gw1.norm()


def test_no_grad_and_frozen_head():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 16, generator=g)
    w = torch.randn(100, 16, generator=g)
    t = torch.randint(0, 100, (40,), generator=g)
    plain = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 16), plain)
    h.requires_grad_()
    linear_cross_entropy(h, w, t, 16).backward()  # only the hidden states need a gradient
    expected = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t, reduction="sum"), h)[0]
    torch.testing.assert_close(h.grad, expected)
    assert w.grad is None


def test_vlm_training_loss_without_logits_matches_the_plain_one():
    """`return_logits=False` (what training uses) with the tied head: the loss and the gradient
    of every parameter, the token embedding included (it gets both uses' share), of the plain
    cross-entropy of the full logits; `return_logits=True` gives the full logits too."""
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    n_img = model.cfg.mp_image_token_length
    ids = torch.randint(0, 500, (2, n_img + 12))
    ids[:, :n_img] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, n_img + 3:-1] = ids[:, n_img + 4:]
    images = torch.rand(2, 3, model.cfg.vit_img_size, model.cfg.vit_img_size)
    results = []
    for return_logits in (None, False, True):  # None: the plain reference
        model.zero_grad(set_to_none=True)
        if return_logits is None:
            logits, _ = model(ids, images, torch.ones_like(ids))  # (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            logits = logits[labels != IGNORE_INDEX]
        else:
            logits, loss = model(ids, images, torch.ones_like(ids), labels, return_logits=return_logits)
        loss.backward()
        results.append((logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, l1, g1), (none, l2, g2), (logits, l3, g3) = results
    assert logits.shape == (*ids.shape, model.cfg.lm_vocab_size) and none is None  # (B, T, vocab), as without targets
    torch.testing.assert_close(logits[labels != IGNORE_INDEX].detach(), plain.detach())
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(l3, l1)
    assert g1.keys() == g2.keys() == g3.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g3[name], g1[name], msg=lambda m: f"{name}: {m}")


def test_bf16_confident_targets_keep_their_small_gradients():
    """Where the target's probability is near 1, d loss / d logit = p - 1 is small: it comes from the other
    tokens' share, not from p rounded to bf16 (off by up to 2^-8 near 1, which puts the gradient 0.5% off)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(100, 64, generator=g)
    w = torch.randn(2000, 64, generator=g)
    t = (h @ w.t()).argmax(-1)
    h = (3 * h).requires_grad_()  # targets at p ~ 0.99
    w.requires_grad_()
    with torch.no_grad():
        p = torch.softmax(F.linear(h, w), -1)[torch.arange(100), t]
    assert 0.98 < p.median() < 0.9999
    (l1, gh1, gw1), (l2, gh2, gw2) = _plain_and_fused(h, w, t, "bf16", 64)  # the same bf16 logits
    torch.testing.assert_close(l2, l1, rtol=0, atol=1e-4 * len(t))
    assert (gh2 - gh1).norm() < 3e-3 * gh1.norm()
    assert (gw2 - gw1).norm() < 3e-3 * gw1.norm()


def test_no_positions_gives_zero_gradients():
    h = torch.zeros(0, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.equal(w.grad, torch.zeros_like(w))
