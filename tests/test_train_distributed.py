"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch,
shifted images included (each sample's offsets come from the seed, epoch and its index alone).

Runs the real command lines, `python -m nanovlm train` and `torchrun --nproc-per-node 2 -m nanovlm
train`, on a small LLaVA-layout .jsonl data file, and compares the logged losses and the final
weights (fp32; the order of floating-point sums differs, so within the tolerance that
tests/tolerances.py derives for Adam).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tolerances import assert_same_adam_training

from nanovlm.config import PRESETS

LR = 1e-2
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _write_llava_data(folder, text_only_every: int = 0) -> str:
    """40 one-word colour questions; with `text_only_every=k`, every k-th record has no image."""
    os.makedirs(folder / "images", exist_ok=True)
    records = []
    names = list(COLOURS)
    for i in range(40):
        name = names[i % len(names)]
        if text_only_every and i % text_only_every == 0:
            records.append({"id": str(i), "conversations": [{"from": "human", "value": f"Say the word {name}."},
                                                            {"from": "gpt", "value": name}]})
            continue
        Image.new("RGB", (24 + i % 3 * 8, 32), COLOURS[name]).save(folder / "images" / f"{i}.png")
        question = "What colour is the picture?" if i % 2 else "Name the colour of this image, in one word."
        records.append({"id": str(i), "image": f"images/{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": name if i % 3 else f"It is {name}."}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _train(args: list[str], nproc: int, out, data: str, lr: float = LR) -> None:
    common = ["train", "--preset", "tiny", "--out", str(out), f"data={data}", "precision=fp32",
              "max_training_steps=3", "eval_task=", "eval_interval=0", "val_size=4", "log_interval=1",
              "warmup_ratio=0", f"lr_mp={lr}", f"lr_vision_backbone={lr}", f"lr_language_backbone={lr}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "nanovlm"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nanovlm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd + common + args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_weights(a, b, steps: int) -> None:
    w1, w2 = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert_same_adam_training(w2, w1, lr=LR, steps=steps)


def _losses(out) -> list[float]:
    with open(out / "metrics.jsonl") as f:
        return [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = _write_llava_data(tmp_path / "data")
    _train(["batch_size=8", "image_shift=0.2"], 1, tmp_path / "one", data)
    _train(["batch_size=4", "image_shift=0.2"], 2, tmp_path / "two", data)

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one))
    assert one[-1] < one[0]  # it trained
    _assert_same_weights(tmp_path / "one", tmp_path / "two", steps=3)
    with open(tmp_path / "two" / "summary.json") as f:
        summary = json.load(f)
    assert summary["processes"] == 2 and summary["global_batch"] == 8
    assert not os.path.exists(tmp_path / "two" / "checkpoints" / "step_000003" / "rank1")  # rank 0 writes


@pytest.mark.slow  # a long run: the default tier stays under 10 minutes
def test_text_only_micro_batches_under_two_processes(tmp_path):
    """Records without an image: a rank whose micro-batch holds none still joins the gradient
    all-reduce for the vision tower (before, gloo aborted on a collective mismatch), and two
    processes still train exactly like one."""
    data = _write_llava_data(tmp_path / "data", text_only_every=2)
    _train(["batch_size=2", "max_training_steps=4"], 1, tmp_path / "one", data)
    _train(["batch_size=1", "max_training_steps=4"], 2, tmp_path / "two", data)

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one))
    _assert_same_weights(tmp_path / "one", tmp_path / "two", steps=4)


@pytest.mark.slow  # 2 x 120 steps, one of them under torchrun
def test_two_processes_match_one_after_120_steps_with_the_default_image_shift(tmp_path):
    """fp32, the small preset's image shift: the weights of 2 processes and of 1 stay within 1e-4
    after 120 steps (offsets drawn per rank, as before, left them 2e-2 apart)."""
    data = _write_llava_data(tmp_path / "data")
    shift = PRESETS["small"]["train"]["image_shift"]
    for nproc, batch in ((1, 8), (2, 4)):
        _train([f"batch_size={batch}", f"image_shift={shift}", "max_training_steps=120", "log_interval=10"], nproc,
               tmp_path / str(nproc), data, lr=1e-3)
    one, two = (load_file(tmp_path / str(n) / "final" / "model.safetensors") for n in (1, 2))
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-4, worst
