"""Idefics3 / SmolVLM directories: a tiny, randomly initialised transformers
`Idefics3ForConditionalGeneration` with its own processor and tokenizer files, converted by
`VisionLanguageModel.from_pretrained`, gives transformers' input ids, pixels, logits and greedy
tokens for the same image and prompt, each side through its own processor; every bad
checkpoint gets a message that names what is wrong."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nanovlm.data.processors import Idefics3ImageProcessor, image_processor_for
from nanovlm.generation import prompt_renderer
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.common import WeightLoadError
from nanovlm.weights.idefics3 import module_names, tile_position_ids

transformers = pytest.importorskip("transformers")
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil  # noqa: E402

QUESTION = "What is in the picture?"
# The shape of SmolVLM-Instruct's template (typed content parts; "User:" before an image,
# "User: " before text), written for this test.
TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
            "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
            "{% else %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIALS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
            + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def hf_tokenizer():
    """The project's test tokenizer (packaged SmolLM2) with the Idefics3 tokens, as transformers'."""
    from tokenizers import AddedToken

    from nanovlm.data.tokenizer import get_tokenizer

    tok = get_tokenizer("packaged:smollm2-135m")._tok
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<end_of_utterance>",
                                                bos_token="<|im_start|>", pad_token="<|im_end|>")


def make_idefics3(path, tie=False, longest_edge=64, splitting=True, scale=2):
    """A tiny Idefics3 directory in the layout transformers writes: 32 px tiles of 8 px patches
    (a 4x4 grid, 4 tokens per tile with shuffle 2), a 2 + 2 block model, perturbed weights."""
    tok = hf_tokenizer()
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=512),
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<end_of_utterance>")
    model.save_pretrained(path)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 32},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3, do_image_splitting=splitting)
    seq = (32 // 8 // scale) ** 2
    transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq,
                                   chat_template=TEMPLATE).save_pretrained(path)
    return model


def picture(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("smolvlm")
    return str(path), make_idefics3(path)


def hf_inputs(path, image, question=QUESTION):
    processor = transformers.AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=[image], return_tensors="pt")


def our_inputs(model, image, question=QUESTION):
    chat = prompt_renderer(model).render([{"role": "user", "content": question}], [image], add_generation_prompt=True)
    return torch.tensor([chat.input_ids]), chat.tiles


@pytest.mark.parametrize("size", [(80, 50), (50, 80), (33, 33), (200, 31), (7, 300), (64, 64)])
@pytest.mark.parametrize("splitting", [True, False])
def test_image_processor_matches(size, splitting):
    """Tiles, grid and [0, 1] pixels as Idefics3ImageProcessorPil makes them (normalised the same)."""
    theirs = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3, do_image_splitting=splitting)
    image = picture(*size)
    out = theirs(images=[[image]], return_tensors="pt", return_row_col_info=True)
    ours = Idefics3ImageProcessor(64, 32, splitting=splitting, resample="lanczos")
    tiles, grid = ours(image)
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    assert grid == ((rows, cols) if rows else (1, 1)) == ours.grid(*size)
    assert torch.equal((tiles - 0.5) / 0.5, out["pixel_values"][0])


def test_config_from_the_checkpoint_files(smolvlm):
    path, hf = smolvlm
    cfg = VisionLanguageModel.from_pretrained(path).cfg
    assert (cfg.vlm_image_layout, cfg.vit_pixel_mean, cfg.vit_pixel_std, cfg.vlm_image_resample) == ("idefics3", 0.5, 0.5, "lanczos")
    assert (cfg.max_img_size, cfg.vit_img_size, cfg.mp_image_token_length, cfg.lm_tie_weights) == (64, 32, 4, False)
    assert cfg.vlm_image_token_id == hf.config.image_token_id and cfg.lm_vocab_size == hf.config.text_config.vocab_size
    assert cfg.lm_eos_token_id == hf.generation_config.eos_token_id and cfg.lm_chat_template == TEMPLATE
    assert isinstance(image_processor_for(cfg), Idefics3ImageProcessor)


@pytest.mark.parametrize("size", [(80, 50), (24, 40)])
def test_ids_and_logits_parity(smolvlm, size):
    path, hf = smolvlm
    ours = VisionLanguageModel.from_pretrained(path)
    image = picture(*size)
    inputs = hf_inputs(path, image)
    ids, tiles = our_inputs(ours, image)
    assert ids.tolist() == inputs["input_ids"].tolist()
    assert tiles.shape[0] == 5  # a 2x2 grid and the global view, last
    with torch.no_grad():
        logits, _ = ours(ids, [tiles])
        expected = hf(**inputs).logits
    torch.testing.assert_close(logits, expected)


def test_greedy_tokens_and_answer(smolvlm):
    path, hf = smolvlm
    ours = VisionLanguageModel.from_pretrained(path)
    image = picture(90, 40, seed=1)
    inputs = hf_inputs(path, image)
    ids, tiles = our_inputs(ours, image)
    theirs = hf.generate(**inputs, do_sample=False, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    mine = ours.generate(ids, [tiles], greedy=True, max_new_tokens=12)[0].tolist()
    eos = ours.cfg.lm_eos_token_id
    assert mine[:len(theirs)] == theirs and all(t == eos for t in mine[len(theirs):])
    processor = transformers.AutoProcessor.from_pretrained(path)
    text = processor.decode(theirs, skip_special_tokens=True).strip()
    assert ours.answer([image], [QUESTION], max_new_tokens=12) == [text]


def test_tied_head_and_other_shuffle(tmp_path):
    hf = make_idefics3(tmp_path, tie=True, scale=4, splitting=False)
    ours = VisionLanguageModel.from_pretrained(str(tmp_path))
    assert ours.decoder.head.weight is ours.decoder.token_embedding.weight
    image = picture(40, 70)
    inputs = hf_inputs(str(tmp_path), image)
    ids, tiles = our_inputs(ours, image)
    assert ids.tolist() == inputs["input_ids"].tolist() and tiles.shape[0] == 1
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, [tiles])[0], hf(**inputs).logits)


def test_training_prompt_starts_with_the_inference_prompt(smolvlm):
    path, _ = smolvlm
    ours = VisionLanguageModel.from_pretrained(path)
    image = picture(80, 50)
    chat = prompt_renderer(ours).render([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "A cat."}],
                                        [image])
    ids, _ = our_inputs(ours, image)
    assert chat.input_ids[:ids.shape[1] - 2] == ids[0, :-2].tolist()  # all but "Assistant:" (a space follows it)
    supervised = [t for t in chat.labels if t != -100]
    assert ours.tokenizer.decode(supervised, skip_special_tokens=False).endswith("<end_of_utterance>")


def test_position_rows_follow_transformers():
    assert torch.equal(tile_position_ids(32), torch.arange(32 * 32))
    ids = tile_position_ids(19)  # a grid side whose float bucketing repeats a row
    assert not torch.equal(ids, torch.arange(19 * 19)) and ids.max() < 19 * 19


def test_module_names():
    assert module_names("decoder.blocks.3.attn.q_proj") == ["model.text_model.layers.3.self_attn.q_proj"]
    assert module_names("vision_encoder.blocks.0.attn.qkv_proj") == [
        f"model.vision_model.encoder.layers.0.self_attn.{x}_proj" for x in "qkv"]
    assert module_names("MP.proj") == ["model.connector.modality_projection.proj"]
    assert module_names("decoder.head") == ["lm_head"]
    with pytest.raises(KeyError, match="decoder.blocks.0.attn.nope is not a module"):
        module_names("decoder.blocks.0.attn.nope")


# ------------------------------------------------------------------ bad checkpoints
def _edit_weights(path, edit):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    make_idefics3(tmp_path)
    _edit_weights(tmp_path, lambda s: s.pop("model.text_model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"missing tensors: decoder\.blocks\.1\.attn\.k_proj\.weight"):
        VisionLanguageModel.from_pretrained(str(tmp_path))


def test_misshaped_and_unexpected_tensors(tmp_path):
    make_idefics3(tmp_path)

    def edit(state):
        state["model.connector.modality_projection.proj.weight"] = torch.zeros(64, 100)
        state["model.connector.extra.weight"] = torch.zeros(2)

    _edit_weights(tmp_path, edit)
    with pytest.raises(WeightLoadError) as e:
        VisionLanguageModel.from_pretrained(str(tmp_path))
    assert "unexpected tensors: model.connector.extra.weight" in str(e.value)
    assert "mis-shaped tensors: MP.proj.weight: file has (64, 100), model needs (64, 128)" in str(e.value)


def test_per_channel_normalisation_is_refused(tmp_path):
    make_idefics3(tmp_path)
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["image_mean"] = [0.4, 0.5, 0.6]
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match="per-channel normalisation"):
        VisionLanguageModel.from_pretrained(str(tmp_path))


def test_wrong_image_seq_len(tmp_path):
    make_idefics3(tmp_path)
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_seq_len"] = 9
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match="image_seq_len is 9 but the model gives 4 tokens per tile"):
        VisionLanguageModel.from_pretrained(str(tmp_path))


def test_sharded_directory_and_the_commands(tmp_path, capsys):
    """A sharded SmolVLM loads (same logits), and `nanovlm eval --model` runs on it through answer()."""
    import shapes_data

    from nanovlm.cli import main

    hf = make_idefics3(tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    os.remove(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = VisionLanguageModel.from_pretrained(str(tmp_path))
    image = picture(80, 50)
    ids, tiles = our_inputs(ours, image)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, [tiles])[0], hf(**hf_inputs(str(tmp_path), image)).logits)
    shapes_data.write_llava(str(tmp_path / "data.jsonl"), 2, ["count"], seed=0)
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "data.jsonl"), "--out", str(report)]) == 0
    assert json.loads(report.read_text())["n"] == 2  # both questions answered (a random model: any accuracy)


def test_saved_in_our_format_it_answers_the_same(smolvlm, tmp_path):
    """A SmolVLM saved as our checkpoint (what `nanovlm train` writes) keeps its layout, tokenizer and answers."""
    path, _ = smolvlm
    model = VisionLanguageModel.from_pretrained(path)
    model.save_pretrained(tmp_path / "ours")
    again = VisionLanguageModel.from_pretrained(str(tmp_path / "ours"))
    assert again.cfg == model.cfg and again.tokenizer.eos_token == "<end_of_utterance>"
    image = picture(80, 50)
    assert our_inputs(again, image)[0].tolist() == our_inputs(model, image)[0].tolist()
    assert again.answer([image], [QUESTION], max_new_tokens=6) == model.answer([image], [QUESTION], max_new_tokens=6)
