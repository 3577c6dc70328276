"""Optimizer groups, freezing, the learning-rate schedule, and loss averaging over micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_same_adam_training
from test_train_synthetic import final_weights, losses, run_synthetic, synthetic_data, tiny_configs

from nanovlm.config import TrainConfig, VLMConfig
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train.optim import WarmupCosine, build_optimizer, fused_adamw_available, param_groups


def _optimizer(base_lr: float = 1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": base_lr, "base_lr": base_lr}])
    return opt


def test_schedule_values():
    opt = _optimizer(2.0)
    s = WarmupCosine(opt, total_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1)
    assert s.warmup_steps == 2
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert [s.factor(i) for i in range(10)] == pytest.approx(expected)
    assert s.factor(2) == 1.0 and s.factor(9) > 0.1  # the peak right after warm-up; never below min
    s.apply(6)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * expected[6])
    assert WarmupCosine(opt, 4, 0.0, 0.0).factor(0) == 1.0  # no warm-up: start at the peak


def test_schedule_state_round_trip():
    s = WarmupCosine(_optimizer(), 10, 0.1)
    s.apply(7)
    t = WarmupCosine(_optimizer(), 10, 0.1)
    t.load_state_dict(s.state_dict())
    assert t.step_count == 7


def test_weight_decay_only_on_matrices_and_every_part_grouped():
    cfg = VLMConfig.from_preset("tiny")
    model = VisionLanguageModel(cfg, load_backbone=False)
    groups = param_groups(model, TrainConfig(weight_decay=0.1, lr_mp=1e-3, lr_vision_backbone=2e-3,
                                             lr_language_backbone=3e-3))
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
    opt = build_optimizer(model, train_cfg, torch.device("cpu"))
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
        param_groups(model, TrainConfig(lr_mp=0.0, lr_vision_backbone=0.0, lr_language_backbone=0.0))


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
