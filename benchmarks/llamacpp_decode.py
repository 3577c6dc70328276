"""Batch-1 decode after one image, side by side: llama.cpp (llama-cpp-python) on our GGUF
export against ours through the public `generate`, the same model on the same threads.

    python benchmarks/llamacpp_decode.py [--model DIR] [--preset small] [--new-tokens 64] [--rounds 3]

The model is --model (a checkpoint llama.cpp can reproduce) or random weights of --preset in
SmolVLM's image layout (speed depends on the shape, not the values). Rows: `llama.cpp-f16`,
`llama.cpp-q8_0` (MTMDChatHandler, the standard multimodal chat path) and `ours-{fp32,bf16,int8}`,
eager and `-compiled`. EOS is suppressed, so every call decodes exactly the tokens asked for,
greedily. Time to first token: a call for one token (image encoding, prefill, one step); decode
tokens/s: (N - 1) / (time for N tokens - time for one). All rows are built first, then take
turns, --rounds rounds of both calls each, so the machine's drift falls on every row alike; each
figure is the best of the rounds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time

import torch
from PIL import Image

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.cli import main as nanovlm_main
from nanovlm.data.tokenizer import tokenizer_for
from nanovlm.generation import prompt_renderer
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS

ROWS = ("llama.cpp-f16", "llama.cpp-q8_0", "ours-fp32", "ours-fp32-compiled", "ours-bf16", "ours-bf16-compiled",
        "ours-int8", "ours-int8-compiled")
QUESTION = "What is in the picture?"


def checkpoint(args, root: str) -> str:
    """--model, or random weights of --preset in SmolVLM's layout saved under `root`."""
    if args.model:
        return args.model
    cfg = VLMConfig.from_preset(args.preset, vlm_image_layout="idefics3", vlm_extra_tokens=dict(IDEFICS3_TOKENS),
                                vlm_image_resample="lanczos", vit_hidden_act="gelu_pytorch_tanh")
    cfg = cfg.replace(max_img_size=2 * cfg.vit_img_size)  # mtmd always tiles: a 2x2 grid plus the global view
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    model.tokenizer = tokenizer_for(cfg)
    model.save_pretrained(os.path.join(root, "model"))
    return os.path.join(root, "model")


def llama_cpp_row(directory: str, outtype: str, image: Image.Image, threads: int):
    """run(n) for llama.cpp on the GGUF export of `directory` in `outtype`."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    out = os.path.join(os.path.dirname(directory), f"gguf-{outtype}")
    if nanovlm_main(["export", "--model", directory, "--format", "gguf", "--out", out, "--outtype", outtype]):
        raise SystemExit(1)
    llm = llama_cpp.Llama(model_path=os.path.join(out, "model.gguf"), n_ctx=1024, n_threads=threads,
                          n_threads_batch=threads, verbose=False,
                          chat_handler=MTMDChatHandler(clip_model_path=os.path.join(out, "mmproj.gguf"), verbose=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    never_end = {llm.token_eos(): -1e9}

    def run(n: int) -> None:
        llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=n, temperature=0.0, top_k=1,
                                   repeat_penalty=1.0, logit_bias=never_end)
    return run


def ours_row(directory: str, row: str, image: Image.Image):
    """run(n) for our model in the row's precision and mode."""
    model = VisionLanguageModel.from_pretrained(directory).eval()
    if "bf16" in row:
        model = model.to(torch.bfloat16)
    if "int8" in row:
        model.quantize("int8")
    chat = prompt_renderer(model).render([{"role": "user", "content": QUESTION}], [image], add_generation_prompt=True)
    ids, tiles = torch.tensor([chat.input_ids]), chat.tiles
    compiled = row.endswith("compiled")

    def run(n: int) -> None:
        model.generate(ids, [tiles], max_new_tokens=n, greedy=True, eos_token_id=-1, compile=compiled)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, metavar="DIR", help="checkpoint (default: random --preset weights)")
    parser.add_argument("--preset", default="small", help="shape of the random model when --model is not given")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per call")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row taking its turn")
    parser.add_argument("--rows", default="all", help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides")
    args = parser.parse_args(argv)
    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown or args.new_tokens < 2:
        parser.error(f"unknown row {unknown[0]!r}" if unknown else "--new-tokens must be at least 2")
    torch.set_num_threads(args.threads)
    image = Image.effect_mandelbrot((256, 192), (-2.0, -1.2, 1.0, 1.2), 50).convert("RGB")
    with tempfile.TemporaryDirectory() as root:
        directory = checkpoint(args, root)
        runs = {row: llama_cpp_row(directory, row.split("-")[1], image, args.threads) if row.startswith("llama")
                else ours_row(directory, row, image) for row in rows}
        for run in runs.values():  # first calls (and compiles) outside the timings
            run(2)
        first = {row: float("inf") for row in rows}
        whole = dict(first)
        for _ in range(args.rounds):
            for row, run in runs.items():
                for n, best in ((1, first), (args.new_tokens, whole)):
                    start = time.perf_counter()
                    run(n)
                    best[row] = min(best[row], time.perf_counter() - start)
    print(f"batch 1, one image, {args.new_tokens} greedy tokens, {args.threads} threads, best of {args.rounds} rounds")
    print(f"{'row':<22}{'decode tok/s':>14}{'first token ms':>16}")
    results = {}
    for row in rows:
        rate = (args.new_tokens - 1) / max(whole[row] - first[row], 1e-9)
        results[row] = {"tokens_per_s": round(rate, 1), "first_token_ms": round(1000 * first[row], 1)}
        print(f"{row:<22}{rate:>14.1f}{1000 * first[row]:>16.1f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
