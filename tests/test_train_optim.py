"""Optimizer groups, freezing, the learning-rate schedule, and loss averaging over micro-batches."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_same_adam_training
from test_train_synthetic import final_weights, losses, run_synthetic, synthetic_data, tiny_configs

from nanovlm.config import VLMConfig
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train.optim import Schedule, clip_and_step, fused_adamw_available, param_groups, vlm_optimizer


def _optimizer(base_lr: float = 1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": base_lr, "base_lr": base_lr}])
    return opt


def test_schedule_values():
    """Values known without the formula: the warm-up climbs linearly to the base rate, the cosine
    is at the base rate where the decay starts, halfway between base and min at its middle, at min
    where it ends (after the last update, as in transformers' get_cosine_schedule_with_warmup),
    point-symmetric about its middle, and monotone on each side."""
    base, lo = 2.0, 0.2  # min_lr_ratio 0.1
    s = Schedule(_optimizer(base), 10, warmup_share=0.2, min_lr_ratio=0.1)
    assert s.warmup_steps == 2
    lr = [base * s.factor(i) for i in range(12)]
    assert lr[:2] == pytest.approx([base / 2, base])  # linear: the last warm-up step reaches base
    assert s.factor(2) == 1.0  # the decay (steps 2..10) starts at the peak
    assert lr[6] == pytest.approx((base + lo) / 2)  # its middle: step 2 + 8 / 2
    assert lr[4] == pytest.approx(lo + (base - lo) * (1 + 2 ** -0.5) / 2)  # a quarter in: cos(pi/4) = 1/sqrt(2)
    assert lr[10] == pytest.approx(lo) and lr[11] == pytest.approx(lo)  # the end, and it stays there
    for d in (1, 2, 3, 4):
        assert lr[6 - d] - lr[6] == pytest.approx(lr[6] - lr[6 + d])  # cos(pi/2 - x) = -cos(pi/2 + x)
    assert lr[0] < lr[1] <= lr[2] and all(a > b for a, b in zip(lr[2:10], lr[3:11]))
    assert min(lr) == pytest.approx(lo) and max(lr) == pytest.approx(base)

    # apply writes base_lr x factor into every group, each from its own base rate.
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0, "base_lr": 1.0},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3.0, "base_lr": 3.0}])
    Schedule(opt, 10, 0.2, min_lr_ratio=0.1).apply(6)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 1.65])  # (1 + 0.1) / 2 x base
    no_warmup = Schedule(opt, 4, 0.0)
    assert no_warmup.factor(0) == 1.0 and no_warmup.factor(2) == pytest.approx(0.5)  # peak first, half midway


def test_weight_decay_only_on_matrices_and_every_part_grouped():
    cfg = VLMConfig.from_preset("tiny")
    model = VisionLanguageModel(cfg, load_backbone=False)
    groups = param_groups(model, {"MP": 1e-3, "vision_encoder": 2e-3, "decoder": 3e-3}, weight_decay=0.1)
    names = {g["name"]: g for g in groups}
    assert set(names) == {"MP.decay", "vision_encoder.decay", "vision_encoder.no_decay", "decoder.decay",
                          "decoder.no_decay"}
    for g in groups:
        dims = {p.dim() for p in g["params"]}
        if g["name"].endswith(".no_decay"):
            assert g["weight_decay"] == 0.0 and dims == {1}
        else:
            assert g["weight_decay"] == 0.1 and min(dims) >= 2
    assert names["MP.decay"]["lr"] == 1e-3 and names["decoder.decay"]["lr"] == 3e-3
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())  # the tied head counted once


def test_zero_learning_rate_freezes_a_part():
    torch.manual_seed(0)
    vlm_cfg, train_cfg = tiny_configs(lr_vision_backbone=0.0, lr_mp=1e-2, lr_language_backbone=1e-2)
    model = VisionLanguageModel(vlm_cfg, load_backbone=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = vlm_optimizer(model, train_cfg, fused=True)
    batch = next(iter(synthetic_data(vlm_cfg, train_cfg).train))
    for _ in range(2):
        _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
        loss.backward()
        for p in model.vision_encoder.parameters():
            assert not p.requires_grad and p.grad is None
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    vision = [k for k in after if k.startswith("vision_encoder.")]
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["MP.proj.weight"], after["MP.proj.weight"])
    frozen = {id(p) for p in model.vision_encoder.parameters()}
    assert not any(id(p) in frozen for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in frozen for p in opt.state)  # no Adam moments for frozen weights


def test_all_rates_zero_is_an_error():
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    with pytest.raises(ValueError, match="are all 0: nothing would train"):
        param_groups(model, {"MP": 0.0, "vision_encoder": 0.0, "decoder": 0.0}, weight_decay=0.0)


def test_fused_adamw_on_cpu_when_torch_has_it():
    assert fused_adamw_available(torch.device("cpu")) is True  # torch >= 2.4 has a CPU kernel


def test_micro_batches_average_over_tokens_like_one_big_batch(tmp_path):
    """8 samples as one batch, or as 2 micro-batches of 4: the same losses and the same weights.
    Supervised-token counts differ between micro-batches, so a mean of means would not match."""
    run_synthetic(tmp_path / "big", max_training_steps=3, batch_size=8, gradient_accumulation_steps=1)
    run_synthetic(tmp_path / "micro", max_training_steps=3, batch_size=4, gradient_accumulation_steps=2)
    big, micro = losses(tmp_path / "big"), losses(tmp_path / "micro")
    assert [s for s, _ in big] == [s for s, _ in micro] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([l for _, l in micro]), torch.tensor([l for _, l in big]))
    cfg = tiny_configs()[1]
    lr = max(cfg.lr_mp, cfg.lr_vision_backbone, cfg.lr_language_backbone)
    assert_same_adam_training(final_weights(tmp_path / "micro"), final_weights(tmp_path / "big"), lr, steps=3)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.5, 100.0, 0.0])  # clipped, under the limit, no clipping
def test_clip_and_step_matches_clip_grad_norm_then_step(fused, max_norm):
    if fused and not fused_adamw_available(torch.device("cpu")):
        pytest.skip("this torch has no fused AdamW on the CPU")
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = torch.optim.AdamW(ours, lr=0.1, fused=fused or None)
    opt_ref = torch.optim.AdamW(ref, lr=0.1, fused=fused or None)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, grad in zip(ours, ref, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        norm = clip_and_step(opt_ours, ours, max_norm)
        if max_norm > 0:
            ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            torch.testing.assert_close(norm, ref_norm)
        else:
            assert norm is None
        opt_ref.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad)  # the clipped gradients, as clip_grad_norm_ leaves them
            torch.testing.assert_close(p, q)
    assert not hasattr(opt_ours, "grad_scale")  # nothing left on the optimizer for a later step
