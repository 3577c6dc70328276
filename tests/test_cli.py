"""The command line as a user meets it: real subprocesses, exit codes, one-sentence errors."""

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.cli import build_parser, main
from nanovlm.data.tokenizer import tokenizer_for


def run(*args, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "nanovlm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny model whose greedy answer is known: " red" every time. Only dimension 0 of the
    final norm is kept, and every token's embedding is 1000 there (2000 for " red"): that entry
    dominates the residual stream, so the normed state is positive there and, the head being
    tied to the embedding, " red" (twice the logit of any other token) wins each step."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    model.tokenizer = tokenizer_for(model.cfg)
    (red,) = model.tokenizer.encode(" red")
    assert model.decoder.head.weight is model.decoder.token_embedding.weight
    with torch.no_grad():
        model.decoder.token_embedding.weight[:, 0] = 1000.0
        model.decoder.token_embedding.weight[red, 0] = 2000.0
        model.decoder.norm.weight.zero_()
        model.decoder.norm.weight[0] = 1.0
    model.save_pretrained(path)
    img = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    return path, img


def test_help_for_every_verb():
    for verb in ("train", "generate", "eval", "serve"):
        r = run(verb, "--help")
        assert r.returncode == 0 and "usage: nanovlm " + verb in r.stdout
    r = run("data", "preview", "--help")
    assert r.returncode == 0 and "--out" in r.stdout


def test_generate_with_the_real_smollm2_says_paris():
    r = run("generate", "--lm", "packaged:smollm2-135m", "--prompt", "What is the capital of France?",
            "--greedy", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_from_checkpoint_with_image_and_stream(tiny_ckpt):
    ckpt, img = tiny_ckpt
    plain = run("generate", "--model", str(ckpt), "--image", str(img), "--prompt", "what color?", "--greedy",
                "--max-new-tokens", "5", "--dtype", "fp32")
    streamed = run("generate", "--model", str(ckpt), "--image", str(img), "--prompt", "what color?", "--greedy",
                   "--max-new-tokens", "5", "--dtype", "fp32", "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout.strip() == "red red red red red"  # 5 new tokens, each " red" (see tiny_ckpt)
    assert streamed.stdout.strip() == plain.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "MISSING_DIR", "--prompt", "x"], "MISSING_DIR is not a local directory, and HF_HUB_OFFLINE=1 forbids downloading it from the hub"),
    (["generate", "--model", "CKPT", "--image", "nope.png", "--prompt", "x"], "image file nope.png does not exist"),
    (["generate", "--lm", "packaged:smollm2-135m", "--image", "IMG", "--prompt", "x"], "--image needs --model"),
    (["generate", "--model", "CKPT", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "--lm", "packaged:nothing", "--prompt", "x"], "unknown packaged model 'packaged:nothing'"),
    (["generate", "--model", "CKPT", "--image", "NOTIMG", "--prompt", "x"], "NOTIMG"),
])
def test_user_errors_are_one_sentence_and_exit_1(tiny_ckpt, tmp_path, args, message):
    ckpt, img = tiny_ckpt
    not_image = tmp_path / "NOTIMG"
    not_image.write_text("this is not a picture")
    subst = {"CKPT": str(ckpt), "IMG": str(img), "NOTIMG": str(not_image)}
    args = [subst.get(a, a) for a in args]
    message = subst.get(message, message)
    r = run(*args)
    assert r.returncode == 1
    assert r.stderr.startswith("nanovlm: error: ")
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tiny_ckpt):
    r = run("--debug", "generate", "--model", "MISSING_DIR", "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


# ------------------------------------------------------------------ mistyped command lines
TRAIN_OPTIONS = ("valid options: --preset, --config, --out, --resume/--no-resume, --list-settings, key=value settings, "
                 "--help.")
EVAL_OPTIONS = "valid options: --model, --task, --data, --image-folder, --split, --limit, --batch-size, --quantize, --out, --help."


@pytest.mark.parametrize("argv, sentence", [
    (["train", "--bogus"], f"nanovlm train: error: unknown option --bogus; {TRAIN_OPTIONS}"),
    (["train", "--bogus=3"], f"nanovlm train: error: unknown option --bogus; {TRAIN_OPTIONS}"),
    (["eval", "--model", "m", "--bogus"], f"nanovlm eval: error: unknown option --bogus; {EVAL_OPTIONS}"),
    (["eval", "--model", "m", "extra"], f"nanovlm eval: error: unexpected argument 'extra'; {EVAL_OPTIONS}"),
    (["generate", "--model", "m", "--prompt", "x", "--temprature", "1"],
     "nanovlm generate: error: unknown option --temprature (did you mean --temperature?); valid options: --model, "
     "--lm, --image, --prompt, --max-new-tokens, --greedy/--no-greedy, --temperature, --top-k, --top-p, --seed, "
     "--stream/--no-stream, --dtype, --quantize, --compile/--no-compile, --help."),
    (["eval", "--model", "m", "--task", "nope"],
     "nanovlm: error: unknown task 'nope'; choose one of: easyvqa, or give --data FILE."),
    (["eval", "--model", "m", "--task", "easyvqa", "--split", "dev"],
     "nanovlm: error: --split 'dev' is not a split of easyvqa; choose one of: train, test."),
    (["generate", "--lm", "x", "--prompt", "y", "--dtype", "fp16"],
     "nanovlm generate: error: --dtype 'fp16' is not a valid choice; choose one of: auto, fp32, bf16."),
    (["eval"], "nanovlm eval: error: missing --model (checkpoint directory); see nanovlm eval --help."),
    (["generate", "--lm", "x"],
     "nanovlm generate: error: missing --prompt (the question or instruction); see nanovlm generate --help."),
    (["generate", "--prompt", "x"],
     "nanovlm generate: error: missing --model or --lm: give one of them; see nanovlm generate --help."),
    (["generate", "--model", "a", "--lm", "b", "--prompt", "x"],
     "nanovlm generate: error: --lm cannot be combined with --model; give one of them."),
    (["eval", "--model"], "nanovlm eval: error: --model needs a value; see nanovlm eval --help."),
    (["eval", "--model", "m", "--limit", "ten"], "nanovlm eval: error: --limit expects an integer, got 'ten'."),
    (["generate", "--lm", "x", "--prompt", "y", "--top-p", "most"],
     "nanovlm generate: error: --top-p expects a number, got 'most'."),
    (["serve", "--model", "m", "--port", "http"], "nanovlm serve: error: --port expects an integer, got 'http'."),
    (["trian"], "nanovlm: error: unknown command 'trian' (did you mean train?); "
                "choose one of: train, generate, eval, serve, export, data."),
    (["data"], "nanovlm data: error: missing a command; choose one of: preview (see nanovlm data --help)."),
    (["data", "preview", "--bogus"], "nanovlm data preview: error: unknown option --bogus; valid options: --out, "
                                     "--num, --preset, key=value settings, --help."),
])
def test_a_mistyped_command_line_is_one_sentence_naming_what_the_verb_takes(capsys, argv, sentence):
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == sentence
    assert captured.out == ""


def test_unknown_option_exits_1_without_a_usage_block():
    r = run("train", "--bogus")
    assert r.returncode == 1
    assert r.stderr == f"nanovlm train: error: unknown option --bogus; {TRAIN_OPTIONS}\n"
    assert "usage:" not in r.stderr + r.stdout
    r = run("eval", "--model", "m", "--task", "nope")
    assert (r.returncode, r.stderr) == (1, "nanovlm: error: unknown task 'nope'; choose one of: easyvqa, "
                                           "or give --data FILE.\n")


def test_settings_after_an_option_are_settings_too():
    """`train --out x a=1 --resume b=2`: argparse alone would call b=2 an unrecognized argument."""
    args = build_parser().parse_args(["train", "a=1", "--resume", "b=2", "--out", "x", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.resume and args.out == "x"


def test_a_bare_nanovlm_shows_the_verbs(capsys):
    assert main([]) == 1
    assert "{train,generate,eval,serve,export,data}" in capsys.readouterr().out


# -------------------------------------------------------------------------------- --help
def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_has_help_and_no_help_shows_a_default_of_none(capsys):
    for parser in _all_parsers(build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text, parser.prog
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    out_help = text[text.rindex("--out FILE"):]
    assert out_help.count("default") == 1
    assert "eval-<model>-<data>[-<split>][-first<N>].json" in out_help and "never overwritten" in out_help


def test_help_lists_the_presets_and_booleans_have_a_no_form():
    from nanovlm.config import PRESETS

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert all(name in text for name in PRESETS)
    args = build_parser().parse_args(["generate", "--lm", "x", "--prompt", "y", "--greedy", "--no-greedy",
                                      "--stream"])
    assert args.greedy is False and args.stream is True


def test_the_readme_command_gives_a_real_test_image(tmp_path):
    """The README's one-liner that writes shape.png (the generate and answer() examples use it)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r'python -c "(.*shape\.png.*)"', readme).group(1)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    with Image.open(tmp_path / "shape.png") as img:
        assert img.size == (64, 64)


def test_the_chat_page_says_what_to_do_in_an_empty_conversation():
    from importlib.resources import files

    page = files("nanovlm.serve").joinpath("static/index.html").read_text()
    rule = re.search(r'#log:empty::before \{ content: "([^"]+)"', page)
    assert rule and "Attach an image" in rule.group(1) and "ask a question" in rule.group(1)
    assert '<main id="log" aria-live="polite"></main>' in page  # :empty needs no whitespace inside


def test_resume_with_no_readable_checkpoint_is_one_sentence(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "trainer_state.pt"):
        (step / name).write_bytes(b"\x00" * 16)
    (step / "trainer_state.json").write_text('{"step": 2')  # cut short
    r = run("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"nanovlm: error: --resume: every checkpoint in {tmp_path / 'run' / 'checkpoints'} "
                                "is unreadable (step_000002: config.json is not valid JSON (Expecting value: line 1 "
                                "column 1 (char 0))); run without --resume to start a new run.")
