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
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).save_pretrained(path)
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
    assert plain.stdout.strip() == streamed.stdout.strip()  # a random model: the text itself means nothing


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
