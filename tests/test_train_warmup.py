"""The vision warm-up: the encoder alone learns per-image labels before the VLM stage."""

from __future__ import annotations

import pytest
import torch
from test_train_checkpoint import DiesAfter, Killed
from test_train_synthetic import SyntheticVQA, final_weights, losses, run_synthetic, synthetic_data, tiny_configs

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.easyvqa import image_labels
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train import checkpoint as ckpt
from nanovlm.train.vision_warmup import vision_warmup, warmup_loss

FP32 = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}


def _warm(model, targets, steps: int, seed: int = 0) -> dict:
    return vision_warmup(model, targets, steps, 3e-3, 16, seed=seed, amp=FP32, fused=False, say=lambda _: None,
                         progress=False)


def _tiny_model():
    vlm_cfg, _ = tiny_configs()
    torch.manual_seed(0)
    return VisionLanguageModel(vlm_cfg, load_backbone=False)


def test_warmup_teaches_the_encoder_the_labels_and_touches_nothing_else():
    model = _tiny_model()
    targets = SyntheticVQA(model.cfg, n=64).image_targets()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = _warm(model, targets, 60)
    assert result["accuracy"]["class"] == 1.0  # 4 classes: chance is 0.25
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: later draws are unchanged
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision_encoder.") for k in changed)
    assert all(p.grad is None for p in model.parameters())


def test_warmup_is_deterministic_for_a_seed():
    a, b = _tiny_model(), _tiny_model()
    targets = SyntheticVQA(a.cfg, n=32).image_targets()
    _warm(a, targets, 5)
    _warm(b, targets, 5)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_unknown_labels_are_ignored():
    logits = torch.randn(4, 5)  # two kinds: 2 classes, then 3
    targets = torch.tensor([[0, 2], [1, IGNORE_INDEX], [IGNORE_INDEX, 0], [1, IGNORE_INDEX]])
    known_first = torch.nn.functional.cross_entropy(logits[[0, 1, 3], :2], targets[[0, 1, 3], 0])
    known_second = torch.nn.functional.cross_entropy(logits[[0, 2], 2:], targets[[0, 2], 1])
    assert torch.allclose(warmup_loss(logits, targets, [2, 3]), known_first + known_second)
    none_known = torch.full((4, 2), IGNORE_INDEX)
    assert warmup_loss(logits, none_known, [2, 3]).item() == 0.0


def test_a_run_with_warmup_resumes_exactly(tmp_path):
    """The warm-up runs once, before step 0; a resumed run takes the warmed-up encoder from its
    checkpoint instead of warming up again, and ends with the uninterrupted run's weights."""
    settings = dict(max_training_steps=4, save_interval=2, vision_warmup_steps=5)
    whole = run_synthetic(tmp_path / "whole", **settings)
    assert whole["vision_warmup_s"] is not None
    plain = run_synthetic(tmp_path / "plain", max_training_steps=4)
    assert plain["vision_warmup_s"] is None
    assert not torch.equal(final_weights(tmp_path / "whole")["vision_encoder.patch_embedding.conv.weight"],
                           final_weights(tmp_path / "plain")["vision_encoder.patch_embedding.conv.weight"])

    vlm_cfg, train_cfg = tiny_configs(**settings)
    data = synthetic_data(vlm_cfg, train_cfg)
    data.train = DiesAfter(data.train, 3)  # dies inside step 4
    with pytest.raises(Killed):
        run_synthetic(tmp_path / "broken", data=data, **settings)
    assert ckpt.latest_checkpoint(str(tmp_path / "broken")).endswith("step_000002")
    run_synthetic(tmp_path / "broken", resume=True, **settings)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "broken")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole")


def test_warmup_needs_labelled_images(tmp_path):
    vlm_cfg, train_cfg = tiny_configs(vision_warmup_steps=5)
    data = synthetic_data(vlm_cfg, train_cfg)
    data.source = object()  # a dataset without image_targets()
    with pytest.raises(ValueError, match=r"vision_warmup_steps=5 needs images with labels of their own, which "
                                         r"data=easyvqa has and data=.* does not; set vision_warmup_steps=0\."):
        run_synthetic(tmp_path / "run", data=data, vision_warmup_steps=5)


def test_easyvqa_labels_from_questions():
    q = [("a.png", "what shape is in the image?", "circle", "shape"),
         ("a.png", "is there not a red shape?", "no", "yes/no"),  # red is there
         ("b.png", "what is the blue shape?", "triangle", "shape"),  # blue is presupposed
         ("c.png", "is there a circle?", "no", "yes/no"),
         ("c.png", "does the image not contain a rectangle?", "yes", "yes/no"),  # neither: a triangle
         ("c.png", "what color is the shape?", "teal", "color"),
         ("d.png", "is no green shape present?", "yes", "yes/no"),  # tells nothing certain
         ("e.png", "what shape is in the image?", "circle", "shape"),
         ("e.png", "is there a circle?", "no", "yes/no")]  # contradicts: unknown
    labels = image_labels(q)
    assert labels["a.png"] == {"shape": "circle", "color": "red"}
    assert labels["b.png"] == {"shape": "triangle", "color": "blue"}
    assert labels["c.png"] == {"shape": "triangle", "color": "teal"}
    assert labels["d.png"] == {"shape": None, "color": None}
    assert labels["e.png"]["shape"] is None
