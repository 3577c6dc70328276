"""Watching a run: metrics (JSONL, TensorBoard, wandb), the loss plot, the summary, FLOPs and MFU.

MFU compares the FLOPs the model needs (shapes x real token counts; a step is 3x a forward) with a matmul
peak measured on the spot: on a shared CPU a datasheet says little.
"""

from __future__ import annotations

import json
import os
import time

import torch

from nanovlm.config import IGNORE_INDEX, VLMConfig


class MetricsLog:
    """`metrics.jsonl` (a JSON object a line), mirrored to TensorBoard (where installed) and wandb (when asked)."""

    def __init__(self, run_dir: str, records: list[dict] | None = None, tensorboard: bool = True,
                 wandb_config: dict | None = None, say=print):
        self.path, self.records = os.path.join(run_dir, "metrics.jsonl"), list(records or [])
        os.makedirs(run_dir, exist_ok=True)
        # Rewritten from the records kept: a resumed run drops what a killed run logged after its last checkpoint.
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(self.path, "a")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                say("TensorBoard events are not written (tensorboard is not installed): pip install -e '.[log]' "
                    "in a checkout, pip install 'nanovlm[log]' otherwise.")
        if wandb_config is not None:
            try:
                import wandb

                self._wandb = wandb.init(project="nanovlm", dir=run_dir, config=wandb_config)
            except Exception as e:  # wandb missing or not logged in: the run goes on without it
                say(f"nanovlm: wandb unavailable ({e}); logging locally only.")

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            if self._tb is not None and key != "step":
                self._tb.add_scalar(key.replace(".", "/"), value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._file.close()
        for sink, end in ((self._tb, "close"), (self._wandb, "finish")):
            if sink is not None:
                getattr(sink, end)()


def plot(records: list[dict], path: str) -> str:
    """The run at a glance as a PNG: the stages' losses and each accuracy measured (the final one a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(key: str, x: str = "step", final: bool | None = None) -> list:
        return [(r[x], r[key]) for r in records if r.get(key) is not None and x in r
                and (final is None or bool(r.get("final")) == final)]

    names = sorted({k[:-len("_accuracy")] for r in records for k in r
                    if k.endswith("_accuracy") and not k.startswith("vision_warmup_")})
    panels = [("vision stage: readout loss", [("warm-up", points("warmup_loss", "warmup_step"))], True)]
    panels += [("VLM training loss", [("train", points("train_loss")), ("validation", points("val_loss"))], True)]
    what = {n: next((r[f"{n}_what"] for r in records if f"{n}_what" in r), n) for n in names}
    sources = sorted({k for r in records for k in r if "_accuracy_source_" in k})  # a mixture's sources
    panels += [("exact-match accuracy", [(f"{what[n]}{', final' if end else ''}", points(f"{n}_accuracy", final=end))
                                         for n in names for end in (False, True)]
                + [(k.replace("_accuracy_source_", ": "), points(k)) for k in sources], False)] if names else []
    panels = [(title, [c for c in curves if c[1]], log) for title, curves, log in panels]
    panels = [panel for panel in panels if panel[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, curves, log) in zip(axes[0], panels):
        ax.set(title=title, xlabel="step", yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
        for label, xy in curves:
            ax.plot(*zip(*xy), marker="*" if label.endswith("final") else ".", label=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def summarize(run, final: dict | None, wall_s: float) -> dict:
    """summary.json: what ran, how fast, and what it measured, with units in the names."""
    cfg, info, state, t = run.cfg, run.info, run.state, run.state.train_time_s
    per_epoch = run.data.batches_per_epoch
    summary = {
        "steps": state.total_steps,
        "epochs": round(state.total_steps * cfg.gradient_accumulation_steps / per_epoch, 3) if per_epoch else None,
        "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size,
        "processes": info.world_size, "device": info.device.type,
        "precision": "bf16 autocast" if run.amp["enabled"] else "fp32", "fused_adamw": run.fused,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "wall_time_s": round(wall_s, 2), "train_time_s": round(t, 2), "samples": state.samples,
        "samples_per_s": state.samples / t if t > 0 else None, "tokens_per_s": state.tokens / t if t > 0 else None,
        "train_tflop_total": state.flops / 1e12, "matmul_peak_tflop_per_s": run.peak / 1e12,
        "mfu": state.flops / t / (run.peak * info.world_size) if t > 0 and run.peak else None,
        "final_train_loss": run.last_record.get("train_loss"),
    }
    if state.resumed_at_step is not None:
        summary["resumed_at_step"] = state.resumed_at_step
    if state.warmup is not None:
        summary["vision_warmup"] = {k: v for k, v in state.warmup.items() if k != "curve"}
    if final is not None and final["val"] is not None:
        summary["val_loss"] = final["val"]
    report = final["report"] if final is not None else None
    if report is not None:
        name, per_type = report["name"], report.get("per_type") or {}
        summary.update({f"{name}_accuracy": report["accuracy"], f"{name}_questions": report["n"]})
        for part, entries in (("type", per_type), ("source", report.get("per_source") or {})):
            if entries:
                summary[f"{name}_accuracy_per_{part}"] = {k: e["accuracy"] for k, e in entries.items() if e.get("n")}
        if report.get("wall_time_s") is not None:
            summary["eval_time_s"] = report["wall_time_s"]
    if state.best is not None:
        summary["best_checkpoint"] = dict(state.best)
    if run.data.skips is not None and run.data.skips.total:
        summary["skipped_samples"] = run.data.skips.as_dict()
        summary["skip_examples"] = dict(run.data.skips.examples)
    if info.device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 1e9
    return summary


def format_summary(summary: dict) -> str:
    def shown(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {shown(v)}" for k, v in value.items())
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return "\n".join(["", "summary"] + [f"  {key:<22} {shown(value)}" for key, value in summary.items()])


def _linear_params(module: torch.nn.Module, kind: type = torch.nn.Linear) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kind))


class FlopCounter:
    """Forward FLOPs from batch statistics: 2 x matrix parameters per token, attention (4 x T x dim per token,
    half masked in the decoder), and the head on supervised positions only (as the model computes it)."""

    def __init__(self, model, cfg: VLMConfig):
        self.cfg, vit = cfg, model.vision_encoder
        self.vit = sum(_linear_params(b) for b in vit.blocks) + _linear_params(vit, torch.nn.Conv2d)
        self.mp, self.lm_block = _linear_params(model.MP), sum(_linear_params(b) for b in model.decoder.blocks)

    def train_step(self, n_images: int, n_tokens: int, sum_sq_len: float, n_supervised: int) -> float:
        c, N = self.cfg, self.cfg.vit_grid ** 2
        vit = n_images * (2 * N * self.vit + c.vit_n_blocks * 4 * N * N * c.vit_hidden_dim)
        lm = 2 * n_tokens * self.lm_block + c.lm_n_blocks * 2 * sum_sq_len * c.lm_hidden_dim
        head = 2 * n_supervised * c.lm_vocab_size * c.lm_hidden_dim
        return 3.0 * float(vit + n_images * 2 * c.mp_image_token_length * self.mp + lm + head)


def batch_stats(batch: dict) -> tuple[int, int, float, int]:
    """(images, real tokens, sum of squared sequence (segment) lengths, supervised tokens) of a CPU batch."""
    mask, images = batch["attention_mask"], batch.get("images")
    n_images = sum(int(x.shape[0]) for x in images) if isinstance(images, (list, tuple)) else (
        int(images.shape[0]) if isinstance(images, torch.Tensor) else 0)
    segments = range(1, int(mask.max()) + 1) if int(mask.max()) > 1 else [None]
    sum_sq = sum(float((((mask > 0) if seg is None else (mask == seg)).sum(dim=1).double() ** 2).sum())
                 for seg in segments)
    return n_images, int((mask > 0).sum()), sum_sq, int((batch["labels"] != IGNORE_INDEX).sum())


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul (4,096 on CUDA, 1,024 elsewhere) on this device and dtype, the best of a few."""
    n, iters = (4096, 10) if device.type == "cuda" else (1024, 2)
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (and resume) untouched
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best
