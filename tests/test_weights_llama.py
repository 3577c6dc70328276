"""Llama weights in the transformers layout: our LanguageModel gives LlamaForCausalLM's logits
for the same weights (GQA, tied and untied heads, sharded files); the vocabulary grows for the
extra tokens; every bad input gets a clear error."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm.config import VLMConfig, default_extra_tokens
from nanovlm.models.language_model import LanguageModel
from nanovlm.sources import SourceError
from nanovlm.weights.common import WeightLoadError
from nanovlm.weights.loading import config_from_source

transformers = pytest.importorskip("transformers")

VOCAB = 100


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_llama(path, tie=True, shard=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                                      rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tie,
                                      attn_implementation="eager")
    model = perturb(transformers.LlamaForCausalLM(config))
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return model


def lm_cfg(path, **overrides):
    """The checkpoint's own fields; one extra token, with lm_base_vocab_size one short of the file's
    vocabulary, so lm_vocab_size equals it and every logit can be compared."""
    fields = {**config_from_source(str(path)), "lm_model_type": str(path), "lm_use_tokens": True,
              "lm_base_vocab_size": VOCAB - 1, "vlm_extra_tokens": {"image_token": "<|image|>"},
              "lm_max_length": 128, "vit_model_type": ""}
    return VLMConfig(**{**fields, **overrides})


@pytest.fixture(params=["tied", "untied", "tied-sharded", "untied-sharded"])
def llama_dir(request, tmp_path):
    tie = request.param.startswith("tied")
    shard = request.param.endswith("sharded")
    hf = make_llama(tmp_path, tie=tie, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    return tmp_path, hf


def test_config_from_source(tmp_path):
    make_llama(tmp_path, tie=False)
    assert config_from_source(str(tmp_path)) == dict(
        lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_rms_eps=1e-6,
        lm_re_base=1000.0, lm_base_vocab_size=VOCAB, lm_tie_weights=False, lm_max_position_embeddings=128)


def test_logits_parity(llama_dir):
    path, hf = llama_dir
    ours = LanguageModel.from_pretrained(lm_cfg(path))
    assert (ours.head.weight is ours.token_embedding.weight) == hf.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        logits, _ = ours(ids)
        torch.testing.assert_close(logits, hf(ids).logits)


def test_left_padding_parity(tmp_path):
    hf = make_llama(tmp_path)
    ours = LanguageModel.from_pretrained(lm_cfg(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, _ = ours(ids, attention_mask=mask)
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid])


@pytest.mark.parametrize("tie", [True, False])
def test_vocabulary_grows_with_mean_rows(tmp_path, tie):
    hf = make_llama(tmp_path, tie=tie)
    cfg = lm_cfg(tmp_path, lm_base_vocab_size=VOCAB, vlm_extra_tokens=default_extra_tokens())
    assert cfg.lm_vocab_size == VOCAB + 66
    ours = LanguageModel.from_pretrained(cfg)
    emb = hf.model.embed_tokens.weight.detach()
    torch.testing.assert_close(ours.token_embedding.weight[:VOCAB].detach(), emb)
    torch.testing.assert_close(ours.token_embedding.weight[VOCAB:].detach(), emb.mean(0).expand(66, -1))
    if not tie:
        head = hf.lm_head.weight.detach()
        torch.testing.assert_close(ours.head.weight[VOCAB:].detach(), head.mean(0).expand(66, -1))
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0][..., :VOCAB], hf(ids).logits)


def test_caller_config_not_mutated(tmp_path):
    make_llama(tmp_path)
    cfg = lm_cfg(tmp_path)
    before = cfg.to_dict()
    LanguageModel.from_pretrained(cfg)
    assert cfg.to_dict() == before


# ---------------------------------------------------------------------------- errors
def test_architecture_mismatch_names_fields(tmp_path):
    make_llama(tmp_path, tie=False)
    with pytest.raises(WeightLoadError, match=r"lm_n_kv_heads is 4 but the checkpoint has 2; "
                                              r"lm_n_blocks is 3 but the checkpoint has 2; "
                                              r"lm_re_base is 10000.0 but the checkpoint has 1000.0; "
                                              r"lm_tie_weights is True but the checkpoint has False"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path, lm_n_kv_heads=4, lm_n_blocks=3, lm_re_base=10000.0,
                                             lm_tie_weights=True))


def test_vocabulary_smaller_than_checkpoint(tmp_path):
    make_llama(tmp_path)
    with pytest.raises(WeightLoadError, match=rf"lm_vocab_size is 51 but must be at least {VOCAB}"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path, lm_base_vocab_size=50))


def test_missing_unexpected_misshaped_all_listed(tmp_path):
    make_llama(tmp_path, tie=False)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    del state["lm_head.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError) as err:
        LanguageModel.from_pretrained(lm_cfg(tmp_path))
    err.match(r"missing tensors: blocks\.1\.mlp\.up_proj\.weight, head\.weight")
    err.match(r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias")
    err.match(r"mis-shaped tensors: norm\.weight: file has \(31,\), model needs \(32,\)")


def test_unsupported_llama_options(tmp_path):
    make_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(attention_bias=True, hidden_act="gelu", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"does not implement: hidden_act='gelu' \(needs 'silu'\), "
                                              r"attention_bias=true, rope_type='llama3'"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path))


def test_not_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(WeightLoadError, match="holds a 'qwen2' model; only Llama-architecture language models"):
        config_from_source(str(tmp_path))


def test_not_a_safetensors_file(tmp_path):
    make_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightLoadError, match="model.safetensors is not a safetensors file"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path))


def test_missing_shard(tmp_path):
    make_llama(tmp_path, shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(WeightLoadError, match=f"shard .*{shard} named by the index does not exist"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path))


def test_neither_directory_nor_gguf(tmp_path):
    make_llama(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"pickle")
    with pytest.raises(WeightLoadError, match="is neither a transformers Llama directory .* nor a .gguf file"):
        LanguageModel.from_pretrained(lm_cfg(tmp_path).replace(lm_model_type=str(path)))


def test_nonexistent_path(tmp_path):
    make_llama(tmp_path)
    cfg = lm_cfg(tmp_path)
    with pytest.raises(SourceError, match="^/does/not/exist: no such file or directory; "):
        LanguageModel.from_pretrained(cfg.replace(lm_model_type="/does/not/exist"))


def test_hub_id_offline(tmp_path):
    make_llama(tmp_path)
    cfg = lm_cfg(tmp_path)
    with pytest.raises(SourceError, match="^HuggingFaceTB/SmolLM2-135M is not a local directory, and "
                                          "HF_HUB_OFFLINE=1 forbids downloading it from the hub; "):
        LanguageModel.from_pretrained(cfg.replace(lm_model_type="HuggingFaceTB/SmolLM2-135M"))
