"""`nanovlm export --format gguf`: model.gguf + mmproj.gguf read back with the gguf package
(names, shapes, tensor types and the metadata llama.cpp's converter writes for SmolVLM), the
language model and its tokenizer read back by our own GGUF readers (so q/k row order, vocabulary
and merges are checked against a reader we trust), the chat template as llama-cpp-python renders
it, every model llama.cpp cannot reproduce refused in one sentence with nothing written, and the
decode benchmark's bad arguments named.
(tests/interop runs the files in llama.cpp itself.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import pre_tokenizers

from nanovlm.cli import main
from nanovlm.config import VLMConfig
from nanovlm.data.processors import idefics3_image_tokens
from nanovlm.data.tokenizer import get_tokenizer, tokenizer_for
from nanovlm.export.gguf import save_gguf
from nanovlm.generation import prompt_renderer
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.lora import add_lora, merge_lora
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS

# A tiny model llama.cpp can run: SmolVLM's layout, 64-px images cut into 32-px tiles.
GGUF_READY = {"vlm_image_layout": "idefics3", "vlm_extra_tokens": dict(IDEFICS3_TOKENS),
              "vlm_image_resample": "lanczos", "vit_pixel_mean": 0.5, "vit_pixel_std": 0.5, "max_img_size": 64,
              "lm_tie_weights": False}


def our_model(root, lora=False, **overrides):
    cfg = VLMConfig.from_preset("tiny", **{**GGUF_READY, **overrides})
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    if lora:
        add_lora(model, 4, 8.0, 0.0, ["lm_v", "vit_qkv"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "lora_" in name else 0.05))
    model.tokenizer = tokenizer_for(cfg)
    model.save_pretrained(root / "ours")
    return model


def picture(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def tensors(path):
    """name -> (type name, torch shape, dequantized fp32 values)."""
    out = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        out[t.name] = (t.tensor_type.name, shape, values)
    return out


def fields(path):
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = our_model(root)
    for outtype in ("f16", "q8_0"):
        assert main(["export", "--model", str(root / "ours"), "--format", "gguf", "--out", str(root / outtype),
                     "--outtype", outtype]) == 0
    return root, model


def test_mmproj_holds_the_vision_tower_as_mtmd_reads_it(exported):
    root, model = exported
    cfg, vit = model.cfg, model.vision_encoder
    meta = fields(root / "f16" / "mmproj.gguf")
    kind = (meta["general.architecture"], meta["general.type"], meta["clip.projector_type"])
    assert kind == ("clip", "mmproj", "idefics3")
    assert meta["clip.has_vision_encoder"] and meta["clip.use_gelu"]
    expected = {"image_size": 32, "patch_size": 8, "embedding_length": 32, "feed_forward_length": 128, "block_count": 2,
                "attention.head_count": 2, "projection_dim": 64, "projector.scale_factor": 2, "preproc_image_size": 64}
    assert {k: meta[f"clip.vision.{k}"] for k in expected} == expected
    assert meta["clip.vision.image_mean"] == meta["clip.vision.image_std"] == [0.5] * 3
    assert meta["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(cfg.vit_ln_eps)
    blocks = [f"v.blk.{i}.{n}.{p}" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2",
                                                                 "ffn_up", "ffn_down") for p in ("weight", "bias")]
    ours = {"v.patch_embd.weight": vit.patch_embedding.conv.weight, "v.patch_embd.bias": vit.patch_embedding.conv.bias,
            "v.position_embd.weight": vit.patch_embedding.position_embedding[0],
            "v.blk.1.attn_k.weight": vit.blocks[1].attn.qkv_proj.weight[32:64],
            "v.blk.0.ffn_down.weight": vit.blocks[0].mlp.fc2.weight, "v.post_ln.bias": vit.layer_norm.bias,
            "mm.model.fc.weight": model.MP.proj.weight}
    for outtype in ("f16", "q8_0"):
        got = tensors(root / outtype / "mmproj.gguf")
        assert set(got) == set(blocks) | set(ours) | {"v.post_ln.weight"} and len(got) == len(blocks) + 6
        for name, theirs in ours.items():
            kind, shape, values = got[name]
            assert shape == tuple(theirs.shape), name
            if kind == "F16":
                assert torch.equal(values, theirs.detach().half().float()), name
            else:  # F32 (norms, biases, embeddings) exactly; Q8_0 within half a step of its block's scale
                torch.testing.assert_close(values, theirs.detach(), rtol=0, atol=0 if kind == "F32" else 2e-3)
        kinds = {name: kind for name, (kind, _, _) in got.items()}
        assert kinds["v.patch_embd.weight"] == kinds["v.position_embd.weight"] == kinds["v.blk.0.ln1.bias"] == "F32"
        assert kinds["v.blk.0.attn_q.weight"] == kinds["mm.model.fc.weight"] == outtype.upper()


@pytest.mark.slow  # ~35 s (both outtypes read back); `make test-interop` checks the same file in llama.cpp
def test_language_model_reads_back_through_our_gguf_reader(exported):
    root, model = exported
    cfg = model.cfg
    for outtype in ("f16", "q8_0"):
        path = root / outtype / "model.gguf"
        meta = fields(path)
        assert (meta["general.architecture"], meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == \
            ("llama", "gpt2", "smollm")
        assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
        assert meta["llama.rope.dimension_count"] == cfg.lm_head_dim and meta["llama.vocab_size"] == cfg.lm_vocab_size
        assert meta["tokenizer.ggml.eos_token_id"] == cfg.lm_eos_token_id and not meta["tokenizer.ggml.add_bos_token"]
        assert len(meta["tokenizer.ggml.tokens"]) == cfg.lm_vocab_size
        q = [t.tensor_type.name for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight"]
        assert q == [outtype.upper()]
        back = LanguageModel.from_pretrained(cfg.replace(lm_model_type=str(path)))
        theirs = dict(back.named_parameters())
        for name, ours in model.decoder.named_parameters():  # q and k rows back in rotate-half order
            if outtype == "f16" and ours.ndim == 2:
                assert torch.equal(theirs[name], ours.detach().half().float()), name
            else:
                torch.testing.assert_close(theirs[name], ours.detach(), rtol=0, atol=0 if ours.ndim == 1 else 2e-3)


def test_tokenizer_and_chat_template_inside_give_our_prompt(exported):
    root, model = exported
    path = str(root / "f16" / "model.gguf")
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "<__media__>How many?"}],
                                               add_generation_prompt=True)
    image = idefics3_image_tokens(model.tokenizer, (2, 2), model.cfg.mp_image_token_length)
    ours = prompt_renderer(model).render([{"role": "user", "content": "How many?"}], [picture(64, 64)],
                                         add_generation_prompt=True).input_ids
    assert get_tokenizer(path).encode(text.replace("<__media__>", image)) == ours
    # As llama-cpp-python's MTMDChatHandler renders it: images become text parts holding mtmd's marker.
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        fields(path)["tokenizer.chat_template"])
    parts = [{"type": "text", "text": "<__media__>"}, {"type": "text", "text": "How many?"}]
    for content in (parts, [{"type": "image"}, parts[1]], "<__media__>How many?"):
        assert template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True) == text


def test_lora_adapters_are_merged_on_the_way(tmp_path, capsys):
    model = our_model(tmp_path, lora=True)
    assert main(["export", "--model", str(tmp_path / "ours"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 0
    assert "its LoRA adapters merged into the weights" in capsys.readouterr().out
    merged = merge_lora(model).decoder.blocks[1].attn.v_proj.weight
    kind, _, values = tensors(tmp_path / "g" / "model.gguf")["blk.1.attn_v.weight"]
    assert kind == "F16" and torch.equal(values, merged.detach().half().float())


@pytest.mark.parametrize("overrides, needs", [
    ({"vlm_image_layout": "nanovlm", "vlm_extra_tokens": None}, "vlm_image_layout=idefics3 (SmolVLM's layout"),
    ({"vit_hidden_act": "gelu"}, "vit_hidden_act=gelu_pytorch_tanh (mtmd's only GELU for idefics3)"),
    ({"vlm_image_resample": "bicubic"}, "vlm_image_resample=lanczos (mtmd's resampling for idefics3)"),
    ({"max_img_size": 32}, "vlm_image_splitting=true with max_img_size above vit_img_size"),
])
def test_a_model_llama_cpp_cannot_reproduce_is_refused(tmp_path, capsys, overrides, needs):
    if overrides.get("vlm_extra_tokens", 1) is None:  # the nanovlm layout with its own tokens
        overrides = {"vlm_image_layout": "nanovlm", "vlm_extra_tokens": VLMConfig().vlm_extra_tokens}
    our_model(tmp_path, **overrides)
    assert main(["export", "--model", str(tmp_path / "ours"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanovlm: error: llama.cpp would not answer as this model does; train it with ")
    assert needs in err
    assert err.count("\n") == 1 and not (tmp_path / "g").exists()


def test_unknown_outtype_and_pre_tokenizer_are_one_sentence(tmp_path, capsys):
    model = our_model(tmp_path)
    for fmt, outtype, message in (("gguf", "q4_0", "unknown --outtype 'q4_0'; choose f16 or q8_0."),
                                  ("transformers", "f16", "--outtype is for --format gguf; leave it out for "
                                                          "--format transformers.")):
        assert main(["export", "--model", str(tmp_path / "ours"), "--format", fmt, "--out", str(tmp_path / "g"),
                     "--outtype", outtype]) == 1
        assert capsys.readouterr().err == f"nanovlm: error: {message}\n"
    model.tokenizer._tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="^llama.cpp has no name for this tokenizer's pre-tokenizer; use a tokenizer"):
        save_gguf(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("argv, message", [(["--rows", "ours-fp32,nope"], "unknown row 'nope'"),
                                           (["--new-tokens", "1"], "--new-tokens must be at least 2")])
def test_the_decode_benchmark_names_a_bad_argument(argv, message):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "llamacpp_decode.py")
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"error: {message}"), proc.stderr
