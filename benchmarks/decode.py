"""Decode speed at batch 1 for a model shape: prefill time and steady decode tokens/s.

    python benchmarks/decode.py [--preset nanovlm-222m] [--new-tokens 64] [--dtypes fp32,bf16]

Random weights of the preset's shape (no download): speed depends on the shape, not the values.
EOS is disabled so every run decodes exactly --new-tokens tokens. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.generation import generate


def measure(preset: str, dtype: torch.dtype, new_tokens: int, prompt_tokens: int, repeats: int,
            device: str = "cpu") -> dict:
    torch.manual_seed(0)
    cfg = VLMConfig.from_preset(preset)
    model = VisionLanguageModel(cfg, load_backbone=False).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 1000, (1, prompt_tokens + cfg.mp_image_token_length))
    ids[0, :cfg.mp_image_token_length] = model.image_token_id
    image = torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size)
    kwargs = dict(greedy=True, eos_token_id=-1)
    generate(model, ids, image, max_new_tokens=4, **kwargs)  # warm-up
    prefill, total = [], []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        generate(model, ids, image, max_new_tokens=1, **kwargs)
        sync()
        t1 = time.perf_counter()
        out = generate(model, ids, image, max_new_tokens=new_tokens, **kwargs)
        sync()
        t2 = time.perf_counter()
        assert out.shape[1] == new_tokens
        prefill.append(t1 - t0)
        total.append(t2 - t1)
    p, t = min(prefill), min(total)
    return {"prefill_s": p, "decode_tok_s": (new_tokens - 1) / (t - p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nanovlm-222m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image tokens")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print("| preset | device | weights | threads | prefill (s) | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        r = measure(args.preset, names[name], args.new_tokens, args.prompt_tokens, args.repeats, args.device)
        print(f"| {args.preset} | {args.device} | {name} | {torch.get_num_threads()} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
