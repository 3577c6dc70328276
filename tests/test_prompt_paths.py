"""One conversation, one prompt: training, `build_prompts` / `answer`, the server and evaluation
all lay a question out through `ChatRenderer`, so they must give the same ids and tiles.

The reference is the training sample: its ids up to the answer are the prompt (the first
supervised label sits on the prompt's last token), and its tiles are what the model learnt from.
"""

import json

import pytest
import torch
from PIL import Image

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm import generation
from nanovlm.data.tokenizer import tokenizer_for
from nanovlm.config import TrainConfig
from nanovlm.data.datasets import SampleProcessor, build_dataset
from nanovlm.data.processors import IGNORE_INDEX, ChatRenderer, RenderError
from nanovlm.eval import vqa
from nanovlm.serve.protocol import APIError
from nanovlm.serve.server import chat_prompt

QUESTION, ANSWER = "What shape is in the image?", "circle"


def make_model(**overrides):
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny", **overrides), load_backbone=False).eval()
    model.tokenizer = tokenizer_for(model.cfg)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def picture(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def training_prompt(sample):
    """(prompt ids, tiles) of a training sample: the ids before its first answer token."""
    labels = sample["labels"].tolist()
    first_target = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    return sample["input_ids"][:first_target + 1].tolist(), sample["images"]


def decoded_inputs(monkeypatch, call):
    """What `call` hands the decode loop: [(prompt ids without padding, tiles)] per question."""
    seen = []

    def fake_generate(model, input_ids, images=None, attention_mask=None, **kwargs):
        seen.extend((row[mask.bool()].tolist(), tiles) for row, mask, tiles in zip(input_ids, attention_mask, images))
        return torch.full((input_ids.shape[0], 1), model.cfg.lm_eos_token_id)

    monkeypatch.setattr(generation, "generate", fake_generate)
    call()
    return seen


def every_inference_path(model, monkeypatch, tmp_path, image, question):
    """{path name: (prompt ids, tiles)} for one question about one image."""
    path = tmp_path / "picture.png"
    image.save(path)
    image = Image.open(path).convert("RGB")  # every path reads the same decoded pixels
    ids, mask, tiles = generation.build_prompts(model, [image], [question])
    out = {"build_prompts": (ids[0][mask[0].bool()].tolist(), tiles[0])}
    out["answer"], = decoded_inputs(monkeypatch, lambda: model.answer([image], [question], max_new_tokens=1))
    out["answer (path)"], = decoded_inputs(monkeypatch, lambda: model.answer([str(path)], [question], max_new_tokens=1))
    out["eval"], = decoded_inputs(monkeypatch, lambda: vqa.predict(
        model, [{"question": question, "images": [str(path)], "answer": "x"}], max_new_tokens=1))
    for name, parts in (("serve", [image, question]), ("serve, text first", [question, image])):
        out[name] = chat_prompt(model, [{"role": "user", "content": parts}])  # as the server parses it
    return out


def check_same(reference, paths):
    ref_ids, ref_tiles = reference
    for name, (ids, tiles) in paths.items():
        assert ids == ref_ids, f"{name} lays the prompt out differently from training"
        assert torch.equal(tiles, ref_tiles), f"{name} tiles the image differently from training"


# ---------------------------------------------------------------------------- one conversation, every path
def test_one_conversation_renders_the_same_everywhere(model, monkeypatch, tmp_path):
    image = picture(20, 20)
    tok = model.tokenizer
    sample = SampleProcessor(model.cfg, tok).process(
        [image], [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
        placeholders_required=False)
    reference = training_prompt(sample)
    assert tok.decode(reference[0], skip_special_tokens=False) == (
        "<|im_start|>user\n<|global_image|>" + "<|image|>" * model.cfg.mp_image_token_length + QUESTION
        + "<|im_end|>\n<|im_start|>assistant\n")
    # The training sample is the prompt, then the answer and the end of the turn.
    assert tok.decode(sample["input_ids"][len(reference[0]):], skip_special_tokens=False) == ANSWER + "<|im_end|>\n"

    # The LLaVA layout (an <image> placeholder in front of the question) through the dataset path.
    image.save(tmp_path / "picture.png")
    record = {"id": "q", "image": "picture.png", "conversations": [
        {"from": "human", "value": "<image>" + QUESTION}, {"from": "gpt", "value": ANSWER}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    llava = build_dataset(TrainConfig(data=str(tmp_path / "data.json")), model.cfg, tok)[0]
    assert training_prompt(llava)[0] == reference[0] and torch.equal(llava["images"], reference[1])

    check_same(reference, every_inference_path(model, monkeypatch, tmp_path, image, QUESTION))


def test_an_easyvqa_test_question_renders_as_the_evaluation_asks_it(model, monkeypatch):
    """The packaged data is records like any other: its training sample and its evaluation item agree."""
    ds = build_dataset(TrainConfig(data="easyvqa"), model.cfg, model.tokenizer, split="test")
    item, = vqa.qa_items("easyvqa", split="test", limit=1)
    assert ds[0]["id"] + " q1" == item["id"] and item["type"] in ("shape", "color", "yes/no")
    reference = training_prompt(ds[0])
    (ids, tiles), = decoded_inputs(monkeypatch, lambda: vqa.predict(model, [item], max_new_tokens=1))
    assert ids == reference[0] and torch.equal(tiles, reference[1])


# ---------------------------------------------------------------------------- large images
GRID_2X2 = {"image_token": "<|image|>", "global_image_token": "<|global_image|>",
            **{f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)}}


@pytest.mark.parametrize("overrides, size, grid", [
    # vit_img_size 32 x the default 8x8 row/col tokens = 256 px: a 1000 px picture is shrunk to 8 tiles
    (dict(max_img_size=512), (1000, 700), (6, 8)),
    # only <row_1_col_1> .. <row_2_col_2>: at most 2x2 tiles, although max_img_size allows 8x8
    (dict(max_img_size=256, vlm_extra_tokens=GRID_2X2), (300, 200), (2, 2)),
])
def test_a_large_image_gets_the_training_tiles_at_inference(monkeypatch, tmp_path, overrides, size, grid):
    model = make_model(**overrides)
    image = picture(*size, seed=3)
    sample = SampleProcessor(model.cfg, model.tokenizer).process(
        [image], [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
        placeholders_required=False)
    reference = training_prompt(sample)
    assert reference[1].shape == (grid[0] * grid[1] + 1, 3, 32, 32)
    check_same(reference, every_inference_path(model, monkeypatch, tmp_path, image, QUESTION))


# ---------------------------------------------------------------------------- the renderer's own rules
@pytest.fixture(scope="module")
def renderer(model):
    return ChatRenderer(model.tokenizer, model.cfg)


def test_placeholders_part_lists_and_leading_images_agree(renderer):
    images = [picture(20, 20, 1), picture(20, 20, 2)]
    leading = renderer.render([{"role": "user", "content": "Compare."}], images, add_generation_prompt=True)
    placed = renderer.render([{"role": "user", "content": "<image><image>Compare."}], images,
                             add_generation_prompt=True)
    parts = renderer.render([{"role": "user", "content": [images[0], images[1], "Compare."]}],
                            add_generation_prompt=True)
    assert leading.input_ids == placed.input_ids == parts.input_ids
    assert torch.equal(leading.tiles, placed.tiles) and torch.equal(leading.tiles, parts.tiles)
    text = renderer.tokenizer.decode(leading.input_ids, skip_special_tokens=False)
    assert text.count("<image: 0>") == text.count("<image: 1>") == 1
    assert all(label == IGNORE_INDEX for label in leading.labels) and leading.position_ids is None
    # Text first, as in OpenAI's own example: the images still go where training put them.
    text_first = renderer.render([{"role": "user", "content": ["Compare.", images[0], images[1]]}],
                                 add_generation_prompt=True)
    assert text_first.input_ids == leading.input_ids and torch.equal(text_first.tiles, leading.tiles)
    # In a part list, text is text: a literal "<image>" there is not a placeholder.
    literal = renderer.render([{"role": "user", "content": [images[0], "what is <image>?"]}])
    assert "what is <image>?" in renderer.tokenizer.decode(literal.input_ids, skip_special_tokens=False)


def test_independent_turns_render_as_share_prefix_branches(renderer):
    image = picture(20, 20, 4)
    turns = [("What shape?", "A circle."), ("What colour?", "Red.")]
    messages = [{"role": role, "content": text} for qa in turns for role, text in zip(("user", "assistant"), qa)]
    chat = renderer.render(messages, [image], independent_turns=True)
    alone = [renderer.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], [image])
             for q, a in turns]
    n0 = len(alone[0].input_ids)
    assert chat.input_ids[:n0] == alone[0].input_ids and chat.position_ids[:n0] == list(range(n0))
    second = chat.position_ids[n0]  # where the second branch goes back to: the end of the shared prompt
    assert chat.input_ids[n0:] == alone[1].input_ids[second:] and chat.labels[n0:] == alone[1].labels[second:]


@pytest.mark.parametrize("messages, n_images, required, message", [
    ([{"role": "user", "content": "<image><image>q"}], 1, False, "1 image(s) but 2 <image> placeholder(s); give one"),
    ([{"role": "user", "content": "q"}], 1, True, "1 image(s) but 0 <image> placeholder(s); mark each image"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>a"}], 1, False,
     "an answer holds an image or an <image> placeholder; images belong in user turns."),
    ([{"role": "system", "content": "s"}], 1, False, "the sample has images but no user turn to hold them."),
])
def test_layout_errors_say_what_to_fix(renderer, messages, n_images, required, message):
    with pytest.raises(RenderError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        renderer.render(messages, [picture(8, 8)] * n_images, placeholders_required=required)
    assert info.value.reason == "image_placeholder_mismatch"


def test_inference_errors_name_the_question_and_the_fix(model):
    with pytest.raises(ValueError, match=r"question 1: 1 image\(s\) but 2 <image> placeholder\(s\)"):
        generation.build_prompts(model, [None, picture(8, 8)], ["fine", "<image> and <image>?"])
    with pytest.raises(APIError, match="reserved image placeholder '<\\|image\\|>'; remove it") as e:
        chat_prompt(model, [{"role": "user", "content": ["look <|image|> here"]}])
    assert (e.value.status, e.value.param) == (400, "messages")


def test_images_after_the_text_go_first_unless_the_model_saw_them_interleaved(renderer, monkeypatch):
    """Images that only follow the text go before it, where training puts images no placeholder
    marks; images among the text stay, as placeholders do; a model whose tokenizer came with its
    image tokens (a SmolVLM, trained on interleaved text and images) keeps every part where it stands."""
    monkeypatch.setattr(renderer, "image_strings", lambda grids: ["[A]", "[B]"])
    trailing = [{"role": "user", "content": ["one ", "two ", picture(8, 8), picture(8, 8)]}]
    among = [{"role": "user", "content": ["one ", picture(8, 8), "two ", picture(8, 8)]}]
    assert renderer.place_images(trailing, [(1, 1), (1, 1)])[0]["content"] == "[A][B]one two "
    assert renderer.place_images(among, [(1, 1), (1, 1)])[0]["content"] == "one [A]two [B]"
    monkeypatch.setattr(renderer, "interleaved", True)
    assert renderer.place_images(trailing, [(1, 1), (1, 1)])[0]["content"] == "one two [A][B]"
