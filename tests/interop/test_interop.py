"""Exports checked by the tools themselves (`make test-interop`; the `interop` marker keeps them
out of the default run): llama.cpp, through llama-cpp-python's standard multimodal chat path
(`MTMDChatHandler` on model.gguf + mmproj.gguf), and transformers, through its standard
processor and chat template, give nanovlm's greedy answers, and the transformers export loads
back answer-identical. Two models: one trained here in SmolVLM's image layout on drawn shapes,
and a tiny random SmolVLM built with transformers' Idefics3 classes and read by our loader.

A greedy answer is decided at a precision only where every step's margin (best minus second
logit, ours in fp32) exceeds what that precision's rounding moves; each comparison counts those
images (a random model has near ties) and needs at least 50 of them.
"""

import base64
import io
import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

from nanovlm.cli import main
from nanovlm.generation import prompt_renderer
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
from llama_cpp.llama_chat_format import MTMDChatHandler  # noqa: E402
from test_idefics3 import make_idefics3  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("What colour is the shape?", "What shape is it?")
N_IMAGES, NEW_TOKENS = 160, 4
# Margins in standard deviations of a step's logits: fp32 keeps 24 significant bits, F16 11 and
# Q8_0 8 (llama.cpp rounds activations to 8 bits too); a logit passes through a few dozen
# roundings, so 16 units of the last bit bound what each can move.
TOLERANCE = {"fp32": 16 * 2.0 ** -24, "f16": 16 * 2.0 ** -11, "q8_0": 16 * 2.0 ** -8}


def drawing(seed: int) -> tuple[Image.Image, str, str]:
    """A 64x64 picture of one filled shape in one colour on a light background."""
    rng = random.Random(seed)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (64, 64), tuple(rng.randint(200, 255) for _ in range(3)))
    x, y, r = rng.randint(18, 46), rng.randint(18, 46), rng.randint(10, 16)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    return image, colour, shape


def trained_model(root) -> str:
    """A tiny model trained here, briefly, in SmolVLM's image layout; its checkpoint directory."""
    records = []
    for k in range(400):
        image, colour, shape = drawing(k)
        image.save(root / f"{k}.png")
        records.append({"image": f"{k}.png", "conversations": [{"from": "human", "value": f"<image>{QUESTIONS[k % 2]}"},
                                                               {"from": "gpt", "value": (colour, shape)[k % 2]}]})
    (root / "shapes.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    settings = {"vlm_image_layout": "idefics3", "vlm_extra_tokens": json.dumps(IDEFICS3_TOKENS),
                "vlm_image_resample": "lanczos", "max_img_size": 64, "vit_pixel_mean": 0.5, "vit_pixel_std": 0.5,
                "data": root / "shapes.jsonl", "max_training_steps": 300, "batch_size": 16, "eval_interval": 100}
    args = ["train", "--preset", "tiny", "--out", str(root / "run")] + [f"{k}={v}" for k, v in settings.items()]
    assert main(args) == 0
    return str(root / "run" / "final")


@pytest.fixture(scope="module", params=["trained", "smolvlm"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "trained":
        return trained_model(root)
    make_idefics3(root / "smolvlm")
    return str(root / "smolvlm")


def ours(model, images, questions):
    """(our greedy answers, each one's smallest margin over its steps, in standard deviations)."""
    answers = model.answer(images, questions, max_new_tokens=NEW_TOKENS)
    margins = []
    render = prompt_renderer(model)
    for image, question in zip(images, questions):
        chat = render.render([{"role": "user", "content": question}], [image], add_generation_prompt=True)
        ids = torch.tensor([chat.input_ids])
        new = model.generate(ids, [chat.tiles], greedy=True, max_new_tokens=NEW_TOKENS)
        with torch.no_grad():
            logits = model(torch.cat([ids, new[:, :-1]], dim=1), [chat.tiles])[0][0, ids.shape[1] - 1:]
        ended = (new[0] == model.cfg.lm_eos_token_id).nonzero()
        logits = logits[: int(ended[0]) + 1] if len(ended) else logits  # (steps, V)
        top = logits.topk(2, dim=-1).values
        margins.append(float(((top[:, 0] - top[:, 1]) / logits.std(dim=-1)).min()))
    return answers, margins


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def amx_cpu() -> bool:
    try:
        return "amx_int8" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def no_amx_repack(monkeypatch):
    """llama.cpp's AMX Q8_0 kernels (llama-cpp-python 0.3.36) crash on AMX CPUs, the published
    SmolLM2 GGUF too; there we load as `llama-cli --no-repack` does, elsewhere llama.cpp's default."""
    if amx_cpu():
        default = llama_cpp.llama_cpp.llama_model_default_params

        def no_repack():
            params = default()
            params.use_extra_bufts = False
            return params
        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repack)


def llama_cpp_answers(directory, images, questions):
    llm = llama_cpp.Llama(model_path=f"{directory}/model.gguf", n_ctx=512, n_threads=2, verbose=False,
                          chat_handler=MTMDChatHandler(clip_model_path=f"{directory}/mmproj.gguf", verbose=False))
    out = []
    for image, question in zip(images, questions):
        content = [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": question}]
        reply = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=NEW_TOKENS,
                                           temperature=0.0, top_k=1, repeat_penalty=1.0)
        out.append(reply["choices"][0]["message"]["content"])
    return llm, out


def agreement(theirs, answers, margins, tolerance):
    """(images whose answers `tolerance` decides, how many of them the other runtime answers as we do)."""
    pairs = [(t.strip(), a) for t, a, m in zip(theirs, answers, margins) if m > tolerance]
    return len(pairs), sum(t == a for t, a in pairs)


def test_llama_cpp_and_transformers_answer_as_we_do(checkpoint, tmp_path):
    model = VisionLanguageModel.from_pretrained(checkpoint)
    drawings = [drawing(10_000 + k) for k in range(N_IMAGES)]
    images, questions = [d[0] for d in drawings], [QUESTIONS[k % 2] for k in range(N_IMAGES)]
    answers, margins = ours(model, images, questions)
    assert len(set(answers)) >= 4  # answers that depend on the picture
    render = prompt_renderer(model)
    for outtype, needed in (("f16", 1.0), ("q8_0", 0.95)):
        out = tmp_path / outtype
        assert main(["export", "--model", checkpoint, "--format", "gguf", "--out", str(out), "--outtype", outtype]) == 0
        llm, theirs = llama_cpp_answers(out, images, questions)
        n, same = agreement(theirs, answers, margins, TOLERANCE[outtype])
        assert n >= 50 and same >= needed * n, (outtype, n, same, list(zip(theirs, answers)))
        # the tokenizer inside model.gguf splits our prompts into our very ids
        for question in QUESTIONS:
            chat = render.render([{"role": "user", "content": question}], [images[0]], add_generation_prompt=True)
            text = model.tokenizer.decode(chat.input_ids, skip_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == chat.input_ids
        llm.close()

    hf_dir = tmp_path / "hf"
    assert main(["export", "--model", checkpoint, "--format", "transformers", "--out", str(hf_dir)]) == 0
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    theirs = []
    for image, question in zip(images, questions):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                           return_tensors="pt")
        new = hf.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)[0, inputs["input_ids"].shape[1]:]
        theirs.append(processor.decode(new, skip_special_tokens=True))
    n, same = agreement(theirs, answers, margins, TOLERANCE["fp32"])
    assert n >= 50 and same == n, (n, same, list(zip(theirs, answers)))
    back = VisionLanguageModel.from_pretrained(str(hf_dir))
    assert back.answer(images, questions, max_new_tokens=NEW_TOKENS) == answers
