"""GPU check: train the nanovlm-222m shape for a few steps in bf16 and generate with it.

Random initialisation (no downloads: the GPU machine is offline) and random data at 224 px, so
the numbers measure the training loop and the model, not the data. Runs the real loop
(`nanovlm.train.loop.train`: fused AdamW, bf16 autocast, checkpoint at the end), then reloads the
final checkpoint and checks that greedy generation produces tokens. Prints a table.

    bash benchmarks/gpu_check.sh [--steps 30] [--batch-size 32] [--text-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovlm.config import IGNORE_INDEX, VLMConfig  # noqa: E402
from nanovlm.train.settings import resolve  # noqa: E402

EOS = 2


class RandomVQA(Dataset):
    """Image tokens + random text; the last third of the text is supervised."""

    def __init__(self, cfg: VLMConfig, n: int, text_tokens: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.n, self.text_tokens = cfg, n, text_tokens
        self.lengths = torch.randint(text_tokens // 2, text_tokens + 1, (n,), generator=g)
        self.seed = seed
        self.image_token = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        n_text = int(self.lengths[i])
        text = torch.randint(100, self.cfg.lm_base_vocab_size, (n_text,), generator=g)
        ids = torch.cat([torch.full((self.cfg.mp_image_token_length,), self.image_token), text,
                         torch.tensor([EOS])])
        labels = torch.full_like(ids, IGNORE_INDEX)
        start = len(ids) - n_text // 3 - 1
        labels[start - 1:-1] = ids[start:]
        image = torch.rand(1, 3, self.cfg.vit_img_size, self.cfg.vit_img_size, generator=g)
        return {"input_ids": ids, "labels": labels, "images": image, "id": str(i)}


class _NoTokenizer:
    pad_token_id = EOS

    def save_pretrained(self, directory):  # the check saves weights only
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=128, help="longest random text per sample")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--preset", default="nanovlm-222m", help="model shape (tiny: a CPU smoke test of this script)")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device; this check needs a GPU.", file=sys.stderr)
        return 1

    from nanovlm.data.collators import VLMCollator
    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.train.distributed import DistInfo
    from nanovlm.train.loop import make_data, train

    torch.backends.cuda.matmul.allow_tf32 = True
    vlm_cfg, train_cfg = resolve(args.preset, None, [
        "vlm_load_backbone_weights=false", f"batch_size={args.batch_size}", f"max_training_steps={args.steps}",
        f"precision={'bf16' if cuda else 'fp32'}", "eval_task=", "eval_interval=0", "val_size=64", "log_interval=10", "warmup_ratio=0.1",
        "lr_vision_backbone=1e-4", "lr_language_backbone=1e-4"])
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    info = DistInfo(device=device)
    dataset = RandomVQA(vlm_cfg, n=args.batch_size * (args.steps + 2) + 640, text_tokens=args.text_tokens)
    data = make_data(dataset, VLMCollator(EOS, vlm_cfg.lm_max_length), train_cfg, info)
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(vlm_cfg, train_cfg, out, info=info, data=data, tokenizer=_NoTokenizer(), progress=False,
                    final_eval=False)
    train_wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if "train_loss" in line]
    steady = records[-1]  # the last log window: past compilation and allocator warm-up

    # Generation from the saved checkpoint.
    model = VisionLanguageModel.from_pretrained(os.path.join(out, "final"), dtype=torch.bfloat16 if cuda else None,
                                                device=device)
    samples = [dataset[i] for i in range(8)]
    n_img = vlm_cfg.mp_image_token_length
    k = min(16, min(len(s["input_ids"]) for s in samples) - n_img)
    ids = torch.stack([s["input_ids"][:n_img + k] for s in samples])  # image tokens + k text tokens
    images = [s["images"].to(device) for s in samples]
    model.generate(ids, images, max_new_tokens=4, greedy=True)  # warm-up
    sync()
    t1 = time.perf_counter()
    new = model.generate(ids, images, max_new_tokens=64, greedy=True, eos_token_id=-1)  # never stops early
    sync()
    gen_s = time.perf_counter() - t1
    ok = new.shape == (8, 64) and bool(((new >= 0) & (new < vlm_cfg.lm_vocab_size)).all())

    rows = [
        ("device", torch.cuda.get_device_name() if cuda else "cpu"),
        ("torch", torch.__version__),
        ("model", f"{args.preset} shape, {summary['parameters'] / 1e6:.1f}M parameters, random init"),
        ("steps x global batch", f"{summary['steps']} x {summary['global_batch']} ({vlm_cfg.vit_img_size} px, <= {args.text_tokens} text tokens)"),
        ("precision", summary["precision"] + (", fused AdamW" if summary["fused_adamw"] else "")),
        ("train wall time", f"{train_wall:.1f} s (incl. start-up and the final checkpoint)"),
        ("samples/s (last window)", f"{steady['samples_per_s']:.1f}"),
        ("tokens/s (last window)", f"{steady['tokens_per_s']:.0f}"),
        ("MFU (last window)", f"{100 * steady['mfu']:.1f}% of a measured bf16 matmul peak "
                              f"of {summary['matmul_peak_tflops']:.0f} TFLOP/s"),
        ("samples/s (whole run)", f"{summary['samples_per_s']:.1f}"),
        ("peak GPU memory", f"{summary.get('peak_memory_gb', 0.0):.1f} GB"),
        ("loss first -> last", f"{records[0]['train_loss']:.3f} -> {records[-1]['train_loss']:.3f}"),
        ("generation", f"{'ok' if ok else 'FAILED'}: 8 x 64 tokens in {gen_s:.2f} s "
                       f"({8 * 64 / gen_s:.0f} tokens/s, bf16 weights, KV cache)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "steady": steady, "generation_ok": ok, "generation_s": gen_s,
                       "train_wall_s": train_wall}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
