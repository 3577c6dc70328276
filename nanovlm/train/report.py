"""Watching a run: metrics (JSONL, TensorBoard, wandb), the loss plot, FLOPs and MFU.

Model FLOPs utilisation compares the FLOPs the model needs (counted from its shapes and the real,
unpadded token counts; a training step costs 3x a forward pass) with a matmul peak measured on the
spot on this device and precision, not a datasheet number: on a shared CPU the datasheet says
little.
"""

from __future__ import annotations

import json
import os
import time

import torch

from nanovlm.config import IGNORE_INDEX, VLMConfig


class MetricsLog:
    """Append-only metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard
    (when installed) and wandb (when installed and asked for). Rank 0 only."""

    def __init__(self, run_dir: str, records: list[dict] | None = None, tensorboard: bool = True,
                 wandb_config: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records: list[dict] = list(records or [])
        os.makedirs(run_dir, exist_ok=True)
        # Rewrite from the records we keep: a resumed run drops what a killed run logged after
        # its last checkpoint.
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = None
        self._wandb = None
        if wandb_config is not None:
            try:
                import wandb

                self._wandb = wandb.init(project="nanovlm", dir=run_dir, config=wandb_config)
            except Exception as e:  # wandb missing or not logged in: the run goes on without it
                print(f"nanovlm: wandb unavailable ({e}); logging locally only.")

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if self._tb is not None:
                    self._tb.add_scalar(key.replace(".", "/"), value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot(records: list[dict], path: str) -> str | None:
    """Loss (train and validation) and task accuracy over steps as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, marker="o" if key == "val_loss" else None, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (per supervised token)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    xs, ys = series("accuracy")
    if xs:
        ax_acc.plot(xs, [100 * y for y in ys], marker="o")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("task accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ FLOPs
def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


class FlopCounter:
    """Forward FLOPs of the VLM from batch statistics: 2 x (matrix parameters) per token, plus
    attention (QK^T and AV: 4 x T x dim per token, half of it masked by causality in the decoder),
    plus the vocabulary head on supervised positions only (as the model computes it)."""

    def __init__(self, model, cfg: VLMConfig):
        self.cfg = cfg
        vit, lm = model.vision_encoder, model.decoder
        self.vit_block = sum(_linear_params(b) for b in vit.blocks)
        self.vit_patch = sum(m.weight.numel() for m in vit.modules() if isinstance(m, torch.nn.Conv2d))
        self.mp = _linear_params(model.MP)
        self.lm_block = sum(_linear_params(b) for b in lm.blocks)
        self.head = cfg.lm_vocab_size * cfg.lm_hidden_dim
        self.n_patches = cfg.vit_grid ** 2

    def forward(self, n_images: int, n_tokens: int, sum_sq_len: float, n_supervised: int) -> float:
        c = self.cfg
        N = self.n_patches
        vit = n_images * (2 * N * (self.vit_block + self.vit_patch) + c.vit_n_blocks * 4 * N * N * c.vit_hidden_dim)
        mp = n_images * 2 * c.mp_image_token_length * self.mp
        lm = 2 * n_tokens * self.lm_block + c.lm_n_blocks * 2 * sum_sq_len * c.lm_hidden_dim
        return float(vit + mp + lm + 2 * n_supervised * self.head)

    def train_step(self, *args) -> float:
        return 3.0 * self.forward(*args)


def batch_stats(batch: dict) -> tuple[int, int, float, int]:
    """(images, real tokens, sum of squared sequence lengths, supervised tokens) of a collated batch
    (CPU tensors: no device sync)."""
    mask = batch["attention_mask"]
    images = batch.get("images")
    n_images = sum(int(x.shape[0]) for x in images) if isinstance(images, (list, tuple)) else (
        int(images.shape[0]) if isinstance(images, torch.Tensor) else 0)
    if int(mask.max()) > 1:  # packed: attention stays within each segment
        sum_sq = 0.0
        for seg in range(1, int(mask.max()) + 1):
            sum_sq += float(((mask == seg).sum(dim=1).double() ** 2).sum())
    else:
        sum_sq = float(((mask > 0).sum(dim=1).double() ** 2).sum())
    return n_images, int((mask > 0).sum()), sum_sq, int((batch["labels"] != IGNORE_INDEX).sum())


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on this device and dtype, measured now (best of a few runs)."""
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (and resume) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        iters = 10 if device.type == "cuda" else 2
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 * iters / dt)
    return best


def format_summary(summary: dict) -> str:
    lines = ["", "summary"]
    for key, value in summary.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, dict):
            text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        else:
            text = str(value)
        lines.append(f"  {key:<22} {text}")
    return "\n".join(lines)
