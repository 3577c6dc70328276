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


def _series(records: list[dict], key: str, where=lambda r: True) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r and where(r)]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records: list[dict], path: str) -> str | None:
    """The run at a glance as a PNG (None without matplotlib): the vision warm-up's loss, the VLM
    stage's train and validation loss, and each accuracy the run measured, labelled with what it
    measured and on how many questions (periodic samples and the final full evaluation apart)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    warm = [(r["warmup_step"], r["warmup_loss"]) for r in records if "warmup_loss" in r]
    accuracies = sorted({k[:-len("_accuracy")] for r in records for k in r
                         if k.endswith("_accuracy") and not k.startswith("vision_warmup_")})
    panels = (["warmup"] if warm else []) + ["loss"] + (["accuracy"] if accuracies else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    if warm:
        ax["warmup"].plot([w[0] for w in warm], [w[1] for w in warm], color="tab:purple")
        ax["warmup"].set_title("stage 1: vision warm-up (readout loss)")
        ax["warmup"].set_xlabel("warm-up step")
        ax["warmup"].set_yscale("log")
        ax["warmup"].grid(alpha=0.3)
    for key, label, style in (("train_loss", "train", {}), ("val_loss", "validation (held out)", {"marker": "o"})):
        xs, ys = _series(records, key)
        if xs:
            ax["loss"].plot(xs, ys, label=label, **style)
    ax["loss"].set_title(("stage 2: " if warm else "") + "VLM training loss")
    ax["loss"].set_xlabel("step")
    ax["loss"].set_ylabel("loss per supervised token")
    ax["loss"].set_yscale("log")
    ax["loss"].legend()
    ax["loss"].grid(alpha=0.3)
    for name in accuracies:
        key, n_key = f"{name}_accuracy", f"{name}_questions"
        periodic = [r for r in records if key in r and not r.get("final")]
        final = [r for r in records if key in r and r.get("final")]
        what = next((r[f"{name}_what"] for r in periodic + final if f"{name}_what" in r), name)
        if periodic:
            n = periodic[-1].get(n_key, "?")
            ax["accuracy"].plot([r["step"] for r in periodic], [100 * r[key] for r in periodic], marker="o",
                                label=f"{what} (first {n}, during training)")
        for r in final:
            ax["accuracy"].scatter([r["step"]], [100 * r[key]], marker="*", s=160, zorder=3,
                                   label=f"{what}, final ({r.get(n_key, '?')}): {100 * r[key]:.2f}%")
    if accuracies:
        ax["accuracy"].set_title("exact-match accuracy")
        ax["accuracy"].set_xlabel("step")
        ax["accuracy"].set_ylabel("%")
        ax["accuracy"].legend(fontsize=8)
        ax["accuracy"].grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def summarize(run, final: dict | None, last_record: dict, wall_s: float) -> dict:
    """summary.json: what ran, how fast, and what it measured, with units in the names."""
    cfg, info, state = run.cfg, run.info, run.state
    train_time = state.train_time_s
    summary = {
        "steps": state.total_steps,
        "epochs": round(state.total_steps * cfg.gradient_accumulation_steps / run.data.batches_per_epoch, 3)
        if run.data.batches_per_epoch else None,
        "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size,
        "processes": info.world_size,
        "device": info.device.type,
        "precision": "bf16 autocast" if run.amp["enabled"] else "fp32",
        "fused_adamw": run.fused,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "wall_time_s": round(wall_s, 2),
        "train_time_s": round(train_time, 2),
        "samples": state.samples,
        "samples_per_s": state.samples / train_time if train_time > 0 else None,
        "tokens_per_s": state.tokens / train_time if train_time > 0 else None,
        "train_tflop_total": state.flops / 1e12,
        "matmul_peak_tflop_per_s": run.peak / 1e12,
        "mfu": state.flops / train_time / (run.peak * info.world_size) if train_time > 0 and run.peak else None,
        "final_train_loss": last_record.get("train_loss"),
    }
    if state.resumed_at_step is not None:
        summary["resumed_at_step"] = state.resumed_at_step
    if state.warmup is not None:
        summary["vision_warmup"] = {k: v for k, v in state.warmup.items() if k != "curve"}
    if final is not None:
        if final["val"] is not None:
            summary["val_loss"] = final["val"]
        report = final["report"]
        if report is not None:
            summary[f"{report['name']}_accuracy"] = report["accuracy"]
            summary[f"{report['name']}_questions"] = report["n"]
            per_type = report.get("per_type") or {}
            if per_type:
                summary[f"{report['name']}_accuracy_per_type"] = {t: e["accuracy"] for t, e in per_type.items()
                                                                  if e.get("n")}
            if report.get("wall_time_s") is not None:
                summary["eval_time_s"] = report["wall_time_s"]
    if state.best is not None:
        summary["best_checkpoint"] = dict(state.best)
    if run.data.skips is not None and getattr(run.data.skips, "total", 0):
        summary["skipped_samples"] = run.data.skips.as_dict()
        summary["skip_examples"] = dict(run.data.skips.examples)
    if info.device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 1e9
    return summary


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


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, n: int | None = None) -> float:
    """FLOP/s of an n x n matmul (default 4,096 on CUDA, 1,024 elsewhere) on this device and
    dtype, measured now (best of a few runs)."""
    n = n or (4096 if device.type == "cuda" else 1024)
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
