"""GGUF llama weights: a tiny GGUF written here from a random LlamaForCausalLM loads back to
its logits (q/k rows un-permuted, GQA, tied and untied heads), and the packaged SmolLM2-135M
GGUF gives the logits and greedy tokens of transformers' own GGUF loading."""

import os
import re

import numpy as np
import pytest
import torch

from nanovlm.config import VLMConfig
from nanovlm.models.language_model import LanguageModel
from nanovlm.sources import PACKAGED_SMOLLM2, SourceError, packaged_smollm2_path
from nanovlm.weights.common import WeightLoadError
from nanovlm.weights.loading import config_from_source

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

VOCAB, HEADS, KV_HEADS = 100, 4, 2


# ---------------------------------------------------------------------------- a tiny GGUF
def llama_cpp_row_order(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: per head, row i of the first half and row i
    of the second half become neighbours (2i, 2i + 1)."""
    rows, C = weight.shape
    w = weight.reshape(n_heads, 2, rows // n_heads // 2, C)  # (n_heads, half, head_dim/2, C)
    return w.transpose(1, 2).reshape(rows, C)


def hf_llama(tie: bool):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=1000.0,
                                      rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tie,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_gguf(path, hf, arch="llama", edit=None):
    """Write `hf` as llama.cpp would (F32 tensors); `edit(tensors)` may corrupt the dict first."""
    c = hf.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    tensors = {}
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            theirs = f"blk.{i}.{per_layer[rest.rsplit('.', 1)[0]]}.weight"
        else:
            theirs = names[name]
        if theirs.endswith("attn_q.weight"):
            value = llama_cpp_row_order(value, HEADS)
        elif theirs.endswith("attn_k.weight"):
            value = llama_cpp_row_order(value, KV_HEADS)
        tensors[theirs] = value.detach().float().numpy()
    if edit:
        edit(tensors)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for name, value in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_cfg(path, **overrides):
    fields = {**config_from_source(str(path)), "lm_model_type": str(path), "lm_use_tokens": True,
              "lm_base_vocab_size": VOCAB - 1, "vlm_extra_tokens": {"image_token": "<|image|>"},
              "lm_max_length": 128, "vit_model_type": ""}
    return VLMConfig(**{**fields, **overrides})


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_parity(tmp_path, tie):
    hf = hf_llama(tie)
    path = write_gguf(tmp_path / "tiny.gguf", hf)
    assert config_from_source(str(path)) == dict(
        lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=HEADS, lm_n_kv_heads=KV_HEADS, lm_n_blocks=2,
        lm_rms_eps=1e-6, lm_re_base=1000.0, lm_base_vocab_size=VOCAB, lm_tie_weights=tie,
        lm_max_position_embeddings=128)
    ours = LanguageModel.from_pretrained(tiny_cfg(path))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits)


def test_missing_unexpected_misshaped_all_listed(tmp_path):
    def corrupt(t):
        del t["blk.1.ffn_up.weight"]
        t["blk.0.attn_q.bias"] = np.zeros(32, dtype=np.float32)
        t["output_norm.weight"] = np.ones(31, dtype=np.float32)

    path = write_gguf(tmp_path / "bad.gguf", hf_llama(True), edit=corrupt)
    with pytest.raises(WeightLoadError) as err:
        LanguageModel.from_pretrained(tiny_cfg(path))
    err.match(r"missing tensors: blocks\.1\.mlp\.up_proj\.weight")
    err.match(r"unexpected tensors: blk\.0\.attn_q\.bias")
    err.match(r"mis-shaped tensors: norm\.weight: file has \(31,\), model needs \(32,\)")


def test_non_llama_gguf(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", hf_llama(True), arch="gpt2")
    with pytest.raises(WeightLoadError, match="holds a 'gpt2' model; only GGUF files of the 'llama' architecture"):
        config_from_source(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("not a gguf file, just text")
    with pytest.raises(WeightLoadError, match="fake.gguf is not a GGUF file"):
        config_from_source(str(path))


def test_nonexistent_gguf(tmp_path):
    path = str(tmp_path / "missing.gguf")
    with pytest.raises(SourceError, match=f"^{re.escape(path)}: no such file or directory; a value that looks "
                                          "like a path is never looked up on the hub"):
        config_from_source(path)


def test_architecture_mismatch_names_fields():
    cfg = VLMConfig(**config_from_source(PACKAGED_SMOLLM2), lm_model_type=PACKAGED_SMOLLM2, vit_model_type="")
    with pytest.raises(WeightLoadError, match=r"lm_inter_dim is 1024 but the checkpoint has 1536; "
                                              r"lm_n_blocks is 29 but the checkpoint has 30"):
        LanguageModel.from_pretrained(cfg.replace(lm_n_blocks=29, lm_inter_dim=1024))


# ---------------------------------------------------------------------------- packaged SmolLM2
def test_packaged_config():
    assert config_from_source(PACKAGED_SMOLLM2) == dict(
        lm_hidden_dim=576, lm_inter_dim=1536, lm_n_heads=9, lm_n_kv_heads=3, lm_n_blocks=30, lm_rms_eps=1e-5,
        lm_re_base=100000.0, lm_base_vocab_size=49152, lm_tie_weights=True, lm_max_position_embeddings=8192)


# The chat prompt "Write a short story about a brave robot." with the GGUF's template (and its
# default system message), tokenized by the packaged tokenizer; written out to save its load time.
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 19161, 253, 1890, 1977, 563, 253, 12833, 8085, 30, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') SmolLM2-135M, each loaded once: our loader with the VLM's 66 extra
    tokens appended, and transformers' GGUF loading (dequantized to fp32)."""
    torch.manual_seed(0)
    cfg = VLMConfig(**config_from_source(PACKAGED_SMOLLM2), lm_model_type=PACKAGED_SMOLLM2, lm_use_tokens=True,
                    vit_model_type="")
    ours = LanguageModel.from_pretrained(cfg)
    path = packaged_smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    return ours, hf


def test_packaged_logits_match_transformers(smollm2):
    ours, hf = smollm2
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        logits, _ = ours(ids)
        expected = hf(ids).logits
    assert logits.shape[-1] == 49152 + 66
    torch.testing.assert_close(logits[..., :49152], expected, atol=1e-4, rtol=0)


def greedy(model: LanguageModel, ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """n greedy tokens with the static KV cache: the prompt once, then one token at a time."""
    kv = model.new_kv_cache(1, ids.shape[1] + n)
    logits, kv = model(ids, kv_cache=kv)
    out = []
    for _ in range(n):
        token = logits[:, -1, :vocab].argmax(-1, keepdim=True)  # (1, 1); extra tokens are never asked for
        out.append(token)
        logits, kv = model(token, kv_cache=kv)
    return torch.cat(out, dim=1)


def hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    # min_new_tokens keeps generate from stopping at EOS; were EOS the argmax, the test would fail.
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_greedy_with_kv_cache(tmp_path, tie):
    hf = hf_llama(tie)
    ours = LanguageModel.from_pretrained(tiny_cfg(write_gguf(tmp_path / "tiny.gguf", hf)))
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert greedy(ours, ids, 16, VOCAB).tolist() == hf_greedy(hf, ids, 16).tolist()


@pytest.mark.slow  # two 135M models decoding 32 tokens: about 10 s on a free 2-core CPU, far more on a busy one
def test_packaged_greedy_tokens_match_transformers(smollm2):
    ours, hf = smollm2
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        tokens = greedy(ours, ids, 32, 49152)
        expected = hf_greedy(hf, ids, 32)
    assert expected.shape[1] == 32
    assert tokens.tolist() == expected.tolist()
