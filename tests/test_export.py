"""`nanovlm export --format transformers`: a model of ours trained in SmolVLM's image layout,
written as an Idefics3 directory that transformers loads offline (AutoModelForImageTextToText +
AutoProcessor), whose standard processor and chat template (string content or a list of typed
parts) give our ids and pixels, whose logits and greedy tokens are ours, and which loads back
answer-identical; a model in our own layout is refused (transformers cannot lay it out); a
SmolVLM loaded here and exported again round-trips bit for bit."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nanovlm.cli import main
from nanovlm.config import VLMConfig
from nanovlm.data.tokenizer import tokenizer_for
from nanovlm.export.idefics3 import save_transformers
from nanovlm.generation import prompt_renderer
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS

transformers = pytest.importorskip("transformers")
from test_idefics3 import QUESTION, hf_inputs, make_idefics3, picture  # noqa: E402

IDEFICS3 = {"vlm_image_layout": "idefics3", "vlm_extra_tokens": dict(IDEFICS3_TOKENS), "max_img_size": 64}
LAYOUTS = {
    # As SmolVLM: centred pixels, Lanczos resizing, its own head.
    "centred": {**IDEFICS3, "vlm_image_resample": "lanczos", "vit_pixel_mean": 0.5, "vit_pixel_std": 0.5,
                "lm_tie_weights": False},
    # Raw [0, 1] pixels (the processor does not normalise), bicubic resizing, a tied head.
    "raw": IDEFICS3,
}
PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def our_model(tmp_path, **overrides):
    cfg = VLMConfig.from_preset("tiny", **overrides)
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.tokenizer = tokenizer_for(cfg)
    model.save_pretrained(tmp_path / "ours")
    return model


def exported(tmp_path, model):
    out = tmp_path / "hf"
    assert main(["export", "--model", str(tmp_path / "ours"), "--format", "transformers", "--out", str(out)]) == 0
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(hf).__name__ == "Idefics3ForConditionalGeneration"
    return str(out), hf


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformers_prompts_and_answers_as_we_do(tmp_path, layout):
    model = our_model(tmp_path, **LAYOUTS[layout])
    out, hf = exported(tmp_path, model)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Idefics3Processor"
    image = picture(80, 50)
    chat = prompt_renderer(model).render([{"role": "user", "content": QUESTION}], [image], add_generation_prompt=True)
    mean, std = (0.5, 0.5) if model.cfg.vit_pixel_mean is not None else (0.0, 1.0)
    for messages in (PARTS, [{"role": "user", "content": "<image>" + QUESTION}]):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[image], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == chat.input_ids
        assert torch.equal(inputs["pixel_values"][0], (chat.tiles - mean) / std)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        ours, _ = model(ids, [chat.tiles])
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours)
    mine = model.generate(ids, [chat.tiles], greedy=True, max_new_tokens=10)[0].tolist()
    got = hf.generate(**inputs, do_sample=False, max_new_tokens=10)[0, ids.shape[1]:].tolist()
    assert mine[:len(got)] == got


def test_export_loads_back_answer_identical(tmp_path):
    model = our_model(tmp_path, **LAYOUTS["raw"])
    out, _ = exported(tmp_path, model)
    assert json.loads(open(os.path.join(out, "preprocessor_config.json")).read())["do_normalize"] is False
    back = VisionLanguageModel.from_pretrained(out)
    same = ("vlm_image_layout", "max_img_size", "vit_img_size", "vlm_image_splitting", "vlm_image_resample",
            "vit_pixel_mean", "vit_pixel_std", "vlm_image_token_id", "lm_eos_token_id", "lm_vocab_size")
    assert [getattr(back.cfg, f) for f in same] == [getattr(model.cfg, f) for f in same]
    images = [picture(80, 50, seed=k) for k in range(4)] + [picture(30, 90), picture(64, 64)]
    questions = [QUESTION, "What colour?", "How many?", "Why?", QUESTION, "Where?"]
    assert back.answer(images, questions, max_new_tokens=8) == model.answer(images, questions, max_new_tokens=8)


def test_a_model_in_our_own_layout_is_refused(tmp_path, capsys):
    our_model(tmp_path)  # the tiny preset: the nanovlm layout, global view first
    assert main(["export", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == ("nanovlm: error: transformers would not answer as this model does; train it "
                                       "with vlm_image_layout=idefics3 (SmolVLM's layout of tiles and global view).\n")
    assert not (tmp_path / "hf").exists()


def test_an_image_token_text_taken_by_another_token_is_refused(tmp_path):
    tokens = {**IDEFICS3_TOKENS, "image_token": "<|image|>", "spare": "<image>"}
    model = our_model(tmp_path, **{**IDEFICS3, "vlm_extra_tokens": tokens})
    with pytest.raises(ValueError, match=r"^the tokenizer's <image> is not the model's image_token "
                                         r"\(vlm_extra_tokens\), so the exported prompt could not place images; "
                                         r"give <image> only that role.$"):
        save_transformers(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_smolvlm_round_trips_bit_exactly(tmp_path):
    source = tmp_path / "smolvlm"
    make_idefics3(source)
    model = VisionLanguageModel.from_pretrained(str(source))
    out = tmp_path / "again"
    save_transformers(model, out)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = VisionLanguageModel.from_pretrained(str(out))
    assert again.cfg == model.cfg.replace(lm_tokenizer=str(out))
    image = picture(80, 50)
    assert hf_inputs(str(out), image)["input_ids"].tolist() == hf_inputs(str(source), image)["input_ids"].tolist()


def test_export_errors(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    our_model(tmp_path)
    assert main(["export", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "busy")]) == 1
    assert "exists and is not a model directory" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "ours"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    assert "unknown export format 'onnx'; choose transformers or gguf." in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").exists() and not (tmp_path / "x").exists()


def test_a_lora_model_exports_with_peft_adapters_or_merged(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from nanovlm.models.lora import add_lora

    cfg = VLMConfig.from_preset("tiny", **LAYOUTS["centred"])
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    add_lora(model, 4, 8.0, 0.0, ["lm_q", "lm_v", "lm_down", "vit_qkv", "vit_fc1"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "lora_" in name else 0.05))
    model.tokenizer = tokenizer_for(cfg)
    model.save_pretrained(tmp_path / "ours")
    chat = prompt_renderer(model).render([{"role": "user", "content": QUESTION}], [picture(80, 50)],
                                         add_generation_prompt=True)
    ids, pixels = torch.tensor([chat.input_ids]), ((chat.tiles - 0.5) / 0.5).unsqueeze(0)
    with torch.no_grad():
        ours = model(ids, [chat.tiles])[0]
    for merge in (False, True):
        out = tmp_path / f"hf-{merge}"
        args = ["export", "--model", str(tmp_path / "ours"), "--out", str(out)] + (["--merge-lora"] if merge else [])
        assert main(args) == 0
        assert ("PEFT adapter files" in capsys.readouterr().out) is not merge
        # transformers attaches adapter files it finds beside the weights (its PEFT integration)
        models = [transformers.AutoModelForImageTextToText.from_pretrained(out).eval()]
        if not merge:  # and peft itself attaches them to the base weights alone
            base_dir = tmp_path / "base"
            base_dir.mkdir()
            for name in os.listdir(out):
                if not name.startswith("adapter_"):
                    os.link(out / name, base_dir / name)
            base = transformers.AutoModelForImageTextToText.from_pretrained(base_dir).eval()
            with torch.no_grad():
                assert (base(input_ids=ids, pixel_values=pixels).logits - ours).abs().max() > 1e-2
            models.append(peft.PeftModel.from_pretrained(base, str(out)).eval())
        else:
            assert not (out / "adapter_config.json").exists()
        for hf in models:
            with torch.no_grad():
                theirs = hf(input_ids=ids, pixel_values=pixels).logits
            torch.testing.assert_close(theirs, ours)
    plain = tmp_path / "plain"
    our_model(plain, **IDEFICS3)
    assert main(["export", "--model", str(plain / "ours"), "--out", str(tmp_path / "y"), "--merge-lora"]) == 1
    assert "holds no LoRA adapters to merge; export without it." in capsys.readouterr().err


def _colour_data(root, n: int = 8):
    """LLaVA records, one image each (no merging), colour questions."""
    from PIL import Image

    records = []
    for k in range(n):
        colour, rgb = (("red", (220, 20, 20)), ("blue", (20, 20, 220)))[k % 2]
        Image.new("RGB", (40, 40), rgb).save(root / f"{k}.png")
        records.append({"image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>What colour?"},
                                                               {"from": "gpt", "value": colour}]})
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root / "d.jsonl"


def test_train_starts_from_a_smolvlm_and_its_result_exports(tmp_path, capsys):
    from test_idefics3 import make_idefics3

    source = tmp_path / "smolvlm"
    make_idefics3(source)
    data = _colour_data(tmp_path)
    common = ["train", "--preset", "tiny", f"init_from={source}", f"data={data}", "batch_size=2", "val_size=0",
              "eval_task=none", "max_training_steps=2", "save_interval=0", "packing=false", "vision_warmup=auto"]
    # at rates of 1e-12 the run ends where it started (Adam moves a weight by about lr a step): the
    # SmolVLM's own weights, in its own layout
    assert main(common + ["--out", str(tmp_path / "still"), "lr_mp=1e-12", "lr_vision_backbone=1e-12",
                          "lr_language_backbone=1e-12"]) == 0
    printed = capsys.readouterr().out
    assert f"vision warm-up: skipped (the model starts from {source})." in printed
    start, still = VisionLanguageModel.from_pretrained(str(source)), VisionLanguageModel.from_pretrained(
        str(tmp_path / "still" / "final"))
    assert still.cfg.vlm_image_layout == "idefics3" and still.cfg.vit_hidden_dim == start.cfg.vit_hidden_dim
    a, b = start.state_dict_for_saving(), still.state_dict_for_saving()
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10)  # 2 steps x ~1e-12
    # trained, it changes, and goes back to transformers
    assert main(common + ["--out", str(tmp_path / "tuned")]) == 0
    tuned = VisionLanguageModel.from_pretrained(str(tmp_path / "tuned" / "final"))
    assert not torch.equal(tuned.MP.proj.weight, start.MP.proj.weight)
    out = tmp_path / "hf"
    assert main(["export", "--model", str(tmp_path / "tuned" / "final"), "--out", str(out)]) == 0
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    torch.testing.assert_close(hf.model.connector.modality_projection.proj.weight, tuned.MP.proj.weight)


def test_init_from_a_missing_checkpoint_is_one_sentence(tmp_path, capsys):
    data = _colour_data(tmp_path)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), f"init_from={tmp_path / 'nope'}",
                 f"data={data}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanovlm: error: ") and "nope" in err and "\n" not in err, err
    assert not (tmp_path / "r").exists()
