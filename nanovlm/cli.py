"""The `nanovlm` command line: train, generate, eval, serve, data.

Each verb imports its own module lazily, so `nanovlm --help` is instant. A user error prints
one sentence on stderr and exits 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------------------------------- train
def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="train a model (default: the easyvqa preset on the packaged easy-VQA data)",
        description="Train a VLM. Settings come from, in increasing precedence: the preset, a YAML/JSON "
                    "config file, and key=value overrides (VLMConfig or TrainConfig field names, e.g. "
                    "batch_size=16 lm_n_blocks=6 data=path/to/data.jsonl). Several processes: "
                    "torchrun --nproc-per-node N -m nanovlm train ...")
    p.add_argument("--preset", default="easyvqa", help="preset name (see nanovlm.config.PRESETS)")
    p.add_argument("--config", default=None, help="YAML or JSON file with 'model' and/or 'train' sections, or flat keys")
    p.add_argument("--out", default="runs/latest", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="field overrides")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from nanovlm.train.run import run_training

    return run_training(preset=args.preset, config_file=args.config, out=args.out, resume=args.resume,
                        overrides=args.overrides)


# ------------------------------------------------------------------------------------- generate
def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", formatter_class=_Formatter, help="answer a prompt about images",
                       description="Generate text from a trained model (--model DIR) about zero or more "
                                   "images, or from a language model alone (--lm SOURCE).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (or hub id when online)")
    src.add_argument("--lm", help="text only: a Llama .gguf file, a transformers Llama directory, "
                                  "or packaged:smollm2-135m")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights dtype (auto: bf16 where the hardware has fast bf16 matmuls)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import torch

    from nanovlm import generation
    from nanovlm.runtime import pick_dtype

    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path} does not exist.")
    dtype = pick_dtype(args.dtype)
    if args.model:
        from nanovlm.models.vision_language_model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(args.model, dtype=dtype, require_tokenizer=True)
        ids, mask, tiles = generation.build_prompts(model, [args.image or None], [args.prompt])
    else:
        if args.image:
            raise ValueError("--image needs --model (a vision-language checkpoint); --lm is text only.")
        model = _load_text_model(args.lm, dtype)
        ids, mask, tiles = model.encode_prompt(args.prompt), None, None
    tok = model.tokenizer
    kwargs = dict(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p)
    eos = model.cfg.lm_eos_token_id
    produced: list[int] = []
    printed = ""
    for tokens, _ in generation.stream(model, ids, tiles, mask, **kwargs):
        token = int(tokens[0])
        if token == eos:
            break
        produced.append(token)
        if args.stream:
            text = tok.decode(produced)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    text = tok.decode(produced).strip()
    if args.stream:
        sys.stdout.write(tok.decode(produced)[len(printed):] + "\n")
    else:
        print(text)
    return 0


def _load_text_model(source: str, dtype):
    """`--lm SOURCE`: the language model and tokenizer of one source, wrapped for the decode loop."""
    from nanovlm.config import VLMConfig
    from nanovlm.data.tokenizer import get_tokenizer
    from nanovlm.generation import TextModel
    from nanovlm.models.language_model import LanguageModel
    from nanovlm.weights.loading import config_from_source

    tokenizer = get_tokenizer(source)
    cfg = VLMConfig(**config_from_source(source), lm_model_type=source, lm_tokenizer=source,
                    vlm_extra_tokens={"image_token": "<|image|>"}, lm_eos_token_id=tokenizer.eos_token_id)
    return TextModel(LanguageModel.from_pretrained(cfg).to(dtype), tokenizer).eval()


# ----------------------------------------------------------------------------------------- eval
def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", formatter_class=_Formatter, help="measure a model on a task",
                       description="Evaluate a checkpoint; prints the accuracy and writes a JSON report.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--task", default="easyvqa", choices=["easyvqa"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON report path (default: <model>/eval_<task>_<split>.json)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from nanovlm.eval.run import run_eval

    return run_eval(model_dir=args.model, task=args.task, split=args.split, limit=args.limit,
                    batch_size=args.batch_size, out=args.out)


# ---------------------------------------------------------------------------------------- serve
def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", formatter_class=_Formatter, help="OpenAI-compatible HTTP server",
                       description="Serve a checkpoint over an OpenAI-compatible chat-completions API, "
                                   "with a chat page at /.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--allow-remote-images", action=argparse.BooleanOptionalAction, default=False,
                   help="fetch http(s) image URLs on the server")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from nanovlm.serve.server import serve

    return serve(model_dir=args.model, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                 allow_remote_images=args.allow_remote_images)


# ----------------------------------------------------------------------------------------- data
def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", formatter_class=_Formatter, help="look at training data")
    dsub = p.add_subparsers(dest="data_verb", required=True)
    pv = dsub.add_parser("preview", formatter_class=_Formatter,
                         help="a picture of a few samples and counts of samples, tokens and skips")
    pv.add_argument("--out", default="preview.png", help="PNG to write")
    pv.add_argument("-n", "--num", type=int, default=8, help="samples to draw")
    pv.add_argument("--preset", default="easyvqa", help="preset whose model config sizes images and tokens")
    pv.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=path/to/data.jsonl")
    pv.set_defaults(func=_cmd_data_preview)


def _cmd_data_preview(args) -> int:
    from nanovlm.data.preview import run_preview

    return run_preview(preset=args.preset, overrides=args.overrides, out=args.out, n=args.num)


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovlm", formatter_class=_Formatter,
                                     description="nanovlm: train, ask, measure and serve small vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{train,generate,eval,serve,data}")
    for add in (_add_train_parser, _add_generate_parser, _add_eval_parser, _add_serve_parser, _add_data_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nanovlm: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # one sentence for the user; the traceback with --debug
        if debug:
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, (OSError,)) and getattr(e, "filename", None) and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        print(f"nanovlm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
