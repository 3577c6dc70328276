"""A small synthetic VQA task for the training tests, and a smoke test of one run's folder.

The task: the image is a flat colour (one of 4 classes, with noise); the answer token names the
class. A tiny model learns it within a few dozen steps. No tokenizer is loaded (a stub stands in
for saving), so a run costs only the model's own time. Other test modules import from here.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.utils.data import Dataset

from nanovlm.config import IGNORE_INDEX, TrainConfig, VLMConfig
from nanovlm.data.collators import VLMCollator
from nanovlm.train import distributed as dist
from nanovlm.train.loop import make_data, train

EOS = 2
ANSWERS = (300, 301, 302, 303)


class StubTokenizer:
    """What training needs of a tokenizer when no evaluation runs: saving (nothing)."""

    pad_token_id = EOS
    eos_token_id = EOS

    def save_pretrained(self, directory):
        with open(os.path.join(directory, "stub_tokenizer.txt"), "w") as f:
            f.write("synthetic\n")


class SyntheticVQA(Dataset):
    """`n` samples: image tokens, a variable-length question, the class token, EOS."""

    def __init__(self, cfg: VLMConfig, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.classes = torch.randint(0, len(ANSWERS), (n,), generator=g)
        self.extra = torch.randint(0, 4, (n,), generator=g)
        self.noise = torch.rand(n, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g) * 0.2
        self.image_token = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> dict:
        c = int(self.classes[i])
        question = [100 + k for k in range(int(self.extra[i]))] + [10, 11, 12]
        # Classes 2 and 3 answer in two tokens: supervised counts differ between samples, so a
        # mean of per-batch means would differ from the mean over tokens.
        answer = [ANSWERS[c]] + ([400] if c >= 2 else []) + [EOS]
        ids = [self.image_token] * self.cfg.mp_image_token_length + question + answer
        input_ids = torch.tensor(ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-len(answer) - 1:-1] = torch.tensor(answer)  # labels[t] is the token after t
        return {"input_ids": input_ids, "labels": labels, "images": self._image(i, c), "id": f"synthetic[{i}]"}

    def _image(self, i: int, c: int) -> torch.Tensor:
        colour = torch.zeros(3, 1, 1)
        colour[c % 3] = 0.8 if c < 3 else 0.0
        return (self.noise[i] + colour).clamp(0, 1).unsqueeze(0)  # (1, 3, S, S)


def tiny_configs(**train_overrides) -> tuple[VLMConfig, TrainConfig]:
    from nanovlm.train.settings import resolve

    overrides = {"max_training_steps": 6, "batch_size": 4, "eval_interval": 0, "eval_task": "", "val_size": 8,
                 "log_interval": 1, "save_interval": 0, "precision": "fp32", "warmup_ratio": 0.2,
                 "weight_decay": 0.01, **train_overrides}
    return resolve("tiny", None, [f"{k}={v}" for k, v in overrides.items()])


def synthetic_data(vlm_cfg: VLMConfig, train_cfg: TrainConfig, info: dist.DistInfo | None = None, n: int = 64):
    return make_data(SyntheticVQA(vlm_cfg, n), VLMCollator(EOS, vlm_cfg.lm_max_length), train_cfg,
                     info or dist.DistInfo())


def run_synthetic(run_dir: str, resume: bool = False, data=None, **train_overrides) -> dict:
    vlm_cfg, train_cfg = tiny_configs(**train_overrides)
    data = data or synthetic_data(vlm_cfg, train_cfg)
    return train(vlm_cfg, train_cfg, str(run_dir), resume=resume, data=data, tokenizer=StubTokenizer(),
                 progress=False, final_eval=False)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def losses(run_dir) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["train_loss"]) for r in map(json.loads, f) if "train_loss" in r]


# ------------------------------------------------------------------------------------------ tests
def test_a_run_leaves_a_complete_run_folder(tmp_path):
    summary = run_synthetic(tmp_path, max_training_steps=4, save_interval=2, eval_interval=2, keep_last=1)
    names = set(os.listdir(tmp_path))
    assert {"metrics.jsonl", "summary.json", "loss.png", "final", "checkpoints"} <= names
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ckpts == ["best", "step_000004"]  # keep_last=1 removed step_000002
    assert {"config.json", "model.safetensors", "trainer_state.json", "trainer_state.pt"} <= set(
        os.listdir(tmp_path / "checkpoints" / "step_000004"))
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and summary["global_batch"] == 4
    assert summary["samples"] == 4 * 4  # steps x batch_size x gradient_accumulation_steps (1)
    assert summary["epochs"] == pytest.approx(16 / 60, abs=1e-3)  # 64 samples, 4 (5%) held out for validation
    # The rates are counts over the same time: samples / rate gives back train_time_s (rounded to
    # 0.01 s), and tokens per sample is what a sample holds (4 image + 3..6 question + 2..3 answer).
    assert summary["samples"] / summary["samples_per_s"] == pytest.approx(summary["train_time_s"], abs=0.006)
    assert 9 <= summary["tokens_per_s"] / summary["samples_per_s"] <= 13
    assert 0 < summary["mfu"] < 1
    with open(tmp_path / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "train_loss" in r]
    # warmup_ratio 0.2 of 4 steps rounds to 1 warm-up step, then the cosine over 3: 1, cos(pi/3), ...
    assert [r["lr_factor"] for r in records] == pytest.approx([1.0, 1.0, 0.75, 0.25])
    # A fresh model predicts nearly uniformly: its first loss is about ln(vocab) (init std 0.02 gives
    # logits of std ~0.16, adding ~0.16**2 / 2 = 0.013), and the next steps' losses are lower.
    first, *later = [r["train_loss"] for r in records]
    assert first == pytest.approx(math.log(tiny_configs()[0].lm_vocab_size), abs=0.1)
    assert max(later) < first
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["steps"] == 4

    from nanovlm.models.vision_language_model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(str(tmp_path / "final"))
    assert model.cfg.vit_hidden_dim == 32


@pytest.mark.slow  # a long run: the default tier stays under 10 minutes
def test_the_synthetic_task_is_learnable(tmp_path):
    run_synthetic(tmp_path, max_training_steps=30, lr_mp=1e-2, lr_vision_backbone=1e-2, lr_language_backbone=1e-2)
    steps = losses(tmp_path)
    first = sum(l for _, l in steps[:3]) / 3
    last = sum(l for _, l in steps[-3:]) / 3
    assert last < 0.5 * first, steps


if __name__ == "__main__":  # pragma: no cover - a child process of the checkpoint tests
    pytest.main([__file__])
