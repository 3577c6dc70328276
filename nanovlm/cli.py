"""The `nanovlm` command line: train, generate, eval, serve, export, data.

Each verb imports its own module lazily, so `nanovlm --help` is instant. A user error (a mistyped command
line too) prints one sentence on stderr and exits 1; `--debug` shows the traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import sys

from nanovlm.config import DEFAULT_PRESET, PRESETS, TrainConfig, VLMConfig, field_types, preset_lines


class UsageError(Exception):
    """A command line argparse cannot parse: one sentence, printed after the verb's name."""

    def __init__(self, prog: str, sentence: str):
        super().__init__(sentence)
        self.prog = prog


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one (not None, [], a flag's off state) and the help does not name it."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or "default:" in help or default is None or default is argparse.SUPPRESS
                or default == [] or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return help
        return super()._get_help_string(action)


_TYPE_NAMES = {int: "an integer", float: "a number"}


class _Parser(argparse.ArgumentParser):
    """argparse, every mistake one sentence (a `UsageError`) naming what the verb accepts, not a usage block;
    every `key=value` lands in the verb's settings, after options too (`train --out x a=1 --resume b=2`)."""

    _bad_choice = None  # the value _check_value last refused

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        namespace, extras = super().parse_known_args(args, namespace)
        settings = self._settings_action()
        if settings is not None:
            later = [a for a in extras if not a.startswith("-") and "=" in a]
            setattr(namespace, settings.dest, list(getattr(namespace, settings.dest, None) or []) + later)
            extras = [a for a in extras if a not in later]
        if extras:
            self._unknown(extras[0], args)
        return namespace, extras

    def _settings_action(self):
        return next((a for a in self._actions if not a.option_strings and a.nargs == "*"), None)

    def _unknown(self, arg: str, args: list[str]):
        if arg.startswith("--") and self._settings_action() is not None:
            self._setting_as_flag(arg, args)
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(self.prog, f"unknown option {name}{hint}; valid options: {self.valid_options()}.")
        raise UsageError(self.prog, f"unexpected argument {arg!r}; valid options: {self.valid_options()}.")

    def _setting_as_flag(self, arg: str, args: list[str]) -> None:
        """`--max_training_steps 20` (or `--max-training-steps=20`): a setting typed as an option."""
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key not in field_types(VLMConfig) and key not in field_types(TrainConfig):
            return
        if not eq:
            later = args[args.index(arg) + 1:] if arg in args else []
            value = later[0] if later and not later[0].startswith("-") else "VALUE"
        raise UsageError(self.prog, f"{arg.split('=', 1)[0]} is a setting, not an option: write {key}={value} "
                                    "(without the dashes).")

    def valid_options(self) -> str:
        """The verb's options, as `--x`, `--x/--no-x`, and `key=value settings` or its commands."""
        names = []
        for action in self._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                names.append("a command (" + ", ".join(action.choices) + ")")
            elif not action.option_strings:
                names.append(f"{action.metavar or action.dest} settings")
            elif action.help is not argparse.SUPPRESS:
                longs = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
                names.append("/".join(longs))
        return ", ".join(names + ["--help"])

    def error(self, message: str):
        # argparse calls error() inside its `except ArgumentError`: the error names the action.
        err = sys.exc_info()[1]
        action = None
        if isinstance(err, argparse.ArgumentError) and err.argument_name:
            action = self._action_named(err.argument_name)
            message = err.message
        raise UsageError(self.prog, self._sentence(message, action))

    def _action_named(self, name: str):
        """The action argparse calls `name` in its messages (its option strings, metavar or dest)."""
        return next((a for a in self._actions if name in ("/".join(a.option_strings), a.metavar, a.dest)), None)

    def _sentence(self, message: str, action) -> str:
        name = "/".join(o for o in action.option_strings if o.startswith("--")) if action is not None else None
        if isinstance(action, argparse._SubParsersAction):
            close = difflib.get_close_matches(str(self._bad_choice), list(action.choices), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"unknown command {self._bad_choice!r}{hint}; choose one of: {', '.join(action.choices)}."
        if action is not None and self._bad_choice is not None and action.choices is not None:
            return (f"{name} {self._bad_choice!r} is not a valid choice; "
                    f"choose one of: {', '.join(map(str, action.choices))}.")
        if action is not None and message.startswith("invalid ") and action.type in _TYPE_NAMES:
            value = message.rsplit(": ", 1)[-1]
            return f"{name} expects {_TYPE_NAMES[action.type]}, got {value}."
        if action is not None and message.startswith("expected "):
            return f"{name} needs a value; see {self.prog} --help."
        if action is not None and message.startswith("not allowed with argument "):
            other = message[len("not allowed with argument "):]
            return f"{name} cannot be combined with {other}; give one of them."
        if message.startswith("the following arguments are required: "):
            missing = message.split(": ", 1)[1].split(", ")
            actions = [self._action_named(m) for m in missing]
            for act in actions:
                if isinstance(act, argparse._SubParsersAction):
                    return f"missing a command; choose one of: {', '.join(act.choices)} (see {self.prog} --help)."
            described = [m + (f" ({act.help})" if act is not None and act.help else "")
                         for m, act in zip(missing, actions)]
            return f"missing {' and '.join(described)}; see {self.prog} --help."
        if message.startswith("one of the arguments ") and message.endswith(" is required"):
            names = message[len("one of the arguments "):-len(" is required")].split()
            return f"missing {' or '.join(names)}: give one of them; see {self.prog} --help."
        return f"{message}; see {self.prog} --help."

    def _check_value(self, action, value):
        # Remember the rejected value: the sentence names it (argparse's message is not structured).
        self._bad_choice = value if action.choices is not None and value not in action.choices else None
        super()._check_value(action, value)


def _lazy(target: str):
    """A verb's `func`: `module:function`, imported when the verb runs, called with the verb's options."""
    def run(args) -> int:
        module, name = target.split(":")
        options = {k: v for k, v in vars(args).items() if k not in ("func", "debug", "verb", "data_verb")}
        return getattr(importlib.import_module(module), name)(**options)
    return run


def _add_train_parser(sub) -> None:
    presets = "\n".join(preset_lines())
    p = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="train a model (default: the easyvqa preset; data=FILE trains on your own data)",
        description="Train a VLM. Settings come from, in increasing precedence: the preset, a YAML/JSON\n"
                    "config file, and key=value overrides (VLMConfig or TrainConfig field names, e.g.\n"
                    "batch_size=16 lm_n_blocks=6 data=path/to/data.jsonl). Several processes:\n"
                    "torchrun --nproc-per-node N -m nanovlm train ...\n\n"
                    f"presets (--preset NAME):\n{presets}")
    p.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                   help=f"the starting settings, one of: {', '.join(PRESETS)}")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file with 'model' and/or 'train' sections, or flat keys (default: none)")
    p.add_argument("--out", default="runs/latest", metavar="DIR", help="run folder")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the newest checkpoint in --out")
    p.add_argument("--list-settings", action="store_true",
                   help="print every key=value setting (type, value under the preset, meaning), the presets; exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings that replace the preset's and the config file's (VLMConfig or TrainConfig fields)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    if args.list_settings:
        from nanovlm.train.settings import describe_settings

        print(describe_settings(args.preset, args.config, args.overrides))
        return 0
    from nanovlm.train.run import run_training

    return run_training(preset=args.preset, config_file=args.config, out=args.out, resume=args.resume,
                        overrides=args.overrides)


QUANTIZE_HELP = ("none, or int8: the language model's linear layers on int8 weights with one scale per output "
                 "channel (about half the bytes of bf16 read per token: faster batch-1 decoding on CPU)")


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", formatter_class=_Formatter, help="answer a prompt about images",
                       description="Generate text from a trained model (--model DIR) about zero or more "
                                   "images, or from a language model alone (--lm SOURCE).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="checkpoint directory (or hub id when online)")
    src.add_argument("--lm", metavar="SOURCE", help="text only: a Llama .gguf file, a transformers Llama directory, "
                                  "or packaged:smollm2-135m")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file (repeat for several; default: none, a text-only question)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="most tokens to generate")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=False,
                   help="always take the most likely token (then --temperature, --top-k and --top-p do nothing)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature: lower is more predictable (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample only among the K most likely tokens (0: no limit)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="sample only among the most likely tokens whose probabilities add up to P (1: no limit)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed for sampling, for a repeatable answer (default: a fresh one each time)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                   help="print tokens as they are produced")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights dtype (auto: bf16 where the hardware has fast bf16 matmuls)")
    p.add_argument("--quantize", default="none", metavar="MODE", help=QUANTIZE_HELP)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the one-token decode step (the first answer waits for the compile)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import torch

    from nanovlm import generation
    from nanovlm.models.quantization import check_quantize
    from nanovlm.runtime import pick_dtype

    quantize = check_quantize(args.quantize)
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

        model = VisionLanguageModel.from_pretrained(args.model, dtype=dtype, require_tokenizer=True,
                                                    quantize=quantize)
        ids, mask, tiles = generation.build_prompts(model, [args.image or None], [args.prompt])
    else:
        if args.image:
            raise ValueError("--image needs --model (a vision-language checkpoint); --lm is text only.")
        model = _load_text_model(args.lm, dtype)
        model.decoder.prepare_for_inference(quantize)
        ids, mask, tiles = model.encode_prompt(args.prompt), None, None
    tok, produced, printed = model.tokenizer, [], ""
    for tokens, _ in generation.stream(model, ids, tiles, mask, max_new_tokens=args.max_new_tokens,
                                       greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, compile=args.compile):
        if int(tokens[0]) == model.cfg.lm_eos_token_id:
            break
        produced.append(int(tokens[0]))
        # A trailing U+FFFD waits for the rest of a multi-byte character.
        if args.stream and not (text := tok.decode(produced)).endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    text = tok.decode(produced)
    print(text[len(printed):] if args.stream else text.strip())
    return 0


def _load_text_model(source: str, dtype):
    """`--lm SOURCE`: the language model and tokenizer of one source, wrapped for the decode loop."""
    from nanovlm.data.tokenizer import get_tokenizer
    from nanovlm.generation import TextModel
    from nanovlm.models.language_model import LanguageModel
    from nanovlm.weights.loading import config_from_source

    tokenizer = get_tokenizer(source)
    cfg = VLMConfig(**config_from_source(source), lm_model_type=source, lm_tokenizer=source,
                    vlm_extra_tokens={"image_token": "<|image|>"}, lm_eos_token_id=tokenizer.eos_token_id)
    return TextModel(LanguageModel.from_pretrained(cfg).to(dtype).eval(), tokenizer)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", formatter_class=_Formatter, help="measure a model on a task or on your own data",
                       description="Evaluate a checkpoint on a benchmark (--task) or on your own questions "
                                   "(--data: exact match after VQA normalisation); prints the accuracy and "
                                   "writes a JSON report with every question, answer and reference.")
    p.add_argument("--model", required=True, dest="model_dir", metavar="DIR", help="checkpoint directory")
    # Neither is an argparse choice or group: eval/run.py checks them, so that each mistake is one sentence.
    p.add_argument("--task", default=None, metavar="NAME", help="packaged data: easyvqa (the easy-VQA questions)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="your own questions in a layout training reads (Cauldron parquet / arrow, LLaVA .json(l), "
                        "or a folder of them, files named by split: train*, test*)")
    p.add_argument("--image-folder", default=None, metavar="DIR",
                   help="where a LLaVA file's image paths start (default: the data file's folder)")
    p.add_argument("--split", default=None,
                   help="which split (default: test where the data has one, else train: a single file is that)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="evaluate only the first N questions (0: all)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="questions answered together")
    p.add_argument("--quantize", default="none", metavar="MODE", help=QUANTIZE_HELP)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="JSON report path (default, in the current directory: eval-<model>-<data>[-<split>]"
                        "[-first<N>].json, the split named where the data has several; never overwritten: -2, -3, ...)")
    p.set_defaults(func=_lazy("nanovlm.eval.run:run_eval"))


SERVE_EXAMPLE = """example requests (an image as a data URL; text and image parts in either order):
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "model": "default", "max_tokens": 16, "messages": [{"role": "user", "content": [
      {"type": "text", "text": "What color is the shape?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,'"$(base64 -w0 shape.png)"'"}}]}]}'

  import base64, openai
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  url = "data:image/png;base64," + base64.b64encode(open("shape.png", "rb").read()).decode()
  reply = client.chat.completions.create(model="default", max_tokens=16, messages=[{"role": "user", "content": [
      {"type": "text", "text": "What color is the shape?"}, {"type": "image_url", "image_url": {"url": url}}]}])
  print(reply.choices[0].message.content)"""


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", formatter_class=_Formatter, help="OpenAI-compatible HTTP server",
                       description="Serve a checkpoint over an OpenAI-compatible chat-completions API, "
                                   "with a chat page at /.", epilog=SERVE_EXAMPLE)
    p.add_argument("--model", required=True, dest="model_dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                   help="the name(s) clients send as 'model' (the first is the one reported; 'default' works too; "
                        "others get 404); default: the checkpoint folder's name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (loopback: only this machine; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N", help="requests decoded together")
    p.add_argument("--quantize", default="none", metavar="MODE", help=QUANTIZE_HELP)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (one shape for all; the first request waits for it)")
    p.add_argument("--allow-remote-images", action=argparse.BooleanOptionalAction, default=False,
                   help="fetch http(s) image URLs on the server")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1/* request (401 without it); "
                        "default: the NANOVLM_API_KEY environment variable, else no key")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long requests in progress may take to finish before exiting")
    p.set_defaults(func=_lazy("nanovlm.serve.server:serve"))


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", formatter_class=_Formatter, help="write a checkpoint for transformers or llama.cpp",
                       description="Write a checkpoint as a transformers Idefics3 directory (Auto classes load "
                                   "it, vLLM serves it) or as llama.cpp's model.gguf + mmproj.gguf; a layout the "
                                   "target cannot reproduce is refused, naming the settings to train with.")
    p.add_argument("--model", required=True, dest="model_dir", metavar="DIR",
                   help="checkpoint directory (ours, nanoVLM's or Idefics3)")
    p.add_argument("--format", default="transformers", dest="fmt", metavar="NAME",
                   help="transformers (an Idefics3ForConditionalGeneration directory) or gguf (llama.cpp)")
    p.add_argument("--out", required=True, metavar="OUT", help="directory to write (replaced if it exists)")
    p.add_argument("--outtype", default=None, metavar="TYPE", help="gguf weights: f16 (default) or q8_0")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="fold a LoRA model's adapters into the weights (transformers otherwise writes them beside "
                        "the weights in PEFT's layout; gguf always folds them in)")
    p.set_defaults(func=_lazy("nanovlm.export.run:run_export"))


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", formatter_class=_Formatter, help="look at training data")
    dsub = p.add_subparsers(dest="data_verb", required=True, help="what to do with the data")
    pv = dsub.add_parser("preview", formatter_class=_Formatter,
                         help="a picture of a few samples and counts of samples, tokens and skips")
    pv.add_argument("--out", default="preview.png", metavar="FILE", help="PNG to write")
    pv.add_argument("-n", "--num", type=int, default=8, dest="n", metavar="N", help="samples to draw")
    pv.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                    help="preset whose model config sizes images and tokens")
    pv.add_argument("overrides", nargs="*", metavar="key=value",
                    help="data=... (required: easyvqa, a data file or folder), split, seed, max_count (samples "
                         "counted, default 2000) and any training or model setting")
    pv.set_defaults(func=_lazy("nanovlm.data.preview:run_preview"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanovlm", formatter_class=_Formatter,
                     description="nanovlm: train, ask, measure and serve small vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"nanovlm {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{train,generate,eval,serve,export,data}",
                                help="what to do (nanovlm COMMAND --help shows its options)")
    for add in (_add_train_parser, _add_generate_parser, _add_eval_parser, _add_serve_parser, _add_export_parser,
                _add_data_parser):
        add(sub)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("nanovlm")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    if not argv:  # a bare `nanovlm`: show what there is to do
        parser.print_help()
        return 1
    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nanovlm: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # one sentence for the user; the traceback with --debug
        if debug:
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        loaded = sys.modules.get("tqdm")  # a progress bar exists only where tqdm was imported
        for bar in list(loaded.tqdm._instances) if loaded else []:  # the sentence on a line of its own
            bar.close()
        print(f"nanovlm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
