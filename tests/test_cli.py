"""The command line as a user meets it: real subprocesses, exit codes, one-sentence errors."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nanovlm import VLMConfig, VisionLanguageModel


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
    (["generate", "--model", "MISSING_DIR", "--prompt", "x"], "HF_HUB_OFFLINE=1 forbids a hub download"),
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
