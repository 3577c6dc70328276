"""Llama weights in the transformers layout (`LlamaForCausalLM`, sharded or not) -> our `LanguageModel`:
a renaming (q/k rows are already in rotate-half order) plus the vocabulary grown to `lm_vocab_size`;
biases, other activations and scaled RoPE are refused by name.
"""

from __future__ import annotations

from typing import Any

from nanovlm.weights.common import WeightLoadError, load_llama, read_model_config, safetensors_tensors

# ours <- transformers'
KEYS = {
    "token_embedding.weight": "model.embed_tokens.weight",
    "blocks.{i}.norm1.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.out_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",  # absent from tied checkpoints
}

# LlamaConfig's defaults, for config.json files that leave them out.
_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "rms_norm_eps": 1e-6, "vocab_size": 32000, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0}


def hf_llama_config(directory: str) -> dict[str, Any]:
    config, _ = read_model_config(directory, "Llama", ("llama",),
                                  "Llama-architecture language models (model_type 'llama', e.g. SmolLM2)")
    return llama_fields(config, directory)


def llama_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The `lm_*` fields of a LlamaConfig dict (a Llama directory's, or an Idefics3 text_config)."""
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    unsupported = []
    if c["hidden_act"] != "silu":
        unsupported.append(f"hidden_act={c['hidden_act']!r} (needs 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            unsupported.append(f"{flag}=true")
    rope = c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or (c.get("rope_scaling") or {}).get("rope_type") \
        or (c.get("rope_scaling") or {}).get("type") or "default"
    if rope_type != "default":
        unsupported.append(f"rope_type={rope_type!r} (needs 'default')")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if head_dim * heads != c["hidden_size"]:
        unsupported.append(f"head_dim={head_dim} (needs hidden_size / num_attention_heads)")
    if unsupported:
        raise WeightLoadError(f"{source} uses Llama options this model does not implement: "
                              f"{', '.join(unsupported)}.")
    return {
        "lm_hidden_dim": c["hidden_size"],
        "lm_inter_dim": c["intermediate_size"],
        "lm_n_heads": heads,
        "lm_n_kv_heads": c.get("num_key_value_heads") or heads,
        "lm_n_blocks": c["num_hidden_layers"],
        "lm_rms_eps": float(c["rms_norm_eps"]),
        "lm_re_base": float(rope.get("rope_theta", c["rope_theta"])),
        "lm_base_vocab_size": c["vocab_size"],
        "lm_tie_weights": bool(c["tie_word_embeddings"]),
        "lm_max_position_embeddings": c["max_position_embeddings"],
    }


def load_hf_llama(cls: type, cfg: Any, directory: str):
    """A `cls(cfg)` with the weights of a transformers Llama directory, fp32 on the CPU."""

    def ignore(name: str) -> bool:
        # Old checkpoints stored the RoPE frequencies; a tied checkpoint may still carry lm_head.
        return name.endswith("rotary_emb.inv_freq") or (cfg.lm_tie_weights and name == "lm_head.weight")

    return load_llama(cls, cfg, hf_llama_config(directory), safetensors_tensors(directory), KEYS, directory,
                      ignore=ignore)
