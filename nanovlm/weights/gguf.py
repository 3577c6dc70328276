"""Llama weights from a GGUF file (llama.cpp's format) -> our `LanguageModel`: tensors dequantized
to fp32, q/k rows put back from llama.cpp's interleaved RoPE order into rotate-half order.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from nanovlm.weights.common import Tensors, Transform, WeightLoadError, f32_value, load_llama

# ours <- GGUF's
KEYS = {
    "token_embedding.weight": "token_embd.weight",
    "blocks.{i}.norm1.weight": "blk.{i}.attn_norm.weight",
    "blocks.{i}.attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "blocks.{i}.attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "blocks.{i}.attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "blocks.{i}.attn.out_proj.weight": "blk.{i}.attn_output.weight",
    "blocks.{i}.norm2.weight": "blk.{i}.ffn_norm.weight",
    "blocks.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "blocks.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "blocks.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "head.weight": "output.weight",  # absent when tied
}


def unpermute_rope_rows(n_heads: int) -> Transform:
    """llama.cpp's interleaved q/k rows -> the rotate-half order, head by head."""

    def transform(weight: torch.Tensor) -> torch.Tensor:
        rows, C = weight.shape
        if rows % (2 * n_heads):
            raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
        head_dim = rows // n_heads
        w = weight.reshape(n_heads, head_dim // 2, 2, C)  # (n_heads, head_dim/2, pair, C)
        return w.transpose(1, 2).reshape(rows, C)  # (n_heads * head_dim, C), halves per head

    return transform


def open_gguf(path: str):
    """A GGUFReader for `path`; the last two are kept: parsing the tokenizer strings takes seconds."""
    st = os.stat(path)
    return _open_gguf(os.path.realpath(path), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int, inode: int):
    from gguf import GGUFReader  # a quarter second to import: only where a GGUF file is read

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a foreign file
        raise WeightLoadError(f"{path} is not a GGUF file ({type(e).__name__}: {e}).") from None


def _dequantized(name: str, t) -> torch.Tensor:
    """One tensor of a GGUF file (a ReaderTensor), dequantized to fp32."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
    try:
        values = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    except NotImplementedError:
        raise WeightLoadError(f"tensor {name} is stored as {t.tensor_type.name}, which the gguf package "
                              "cannot dequantize; use a file quantized differently (e.g. Q8_0, F16).") from None
    return torch.from_numpy(values)


def gguf_value(reader, key: str, default: Any = None) -> Any:
    """One metadata value of a GGUF file (decoded), or `default` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_llama_config(path: str) -> dict[str, Any]:
    reader = open_gguf(path)
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise WeightLoadError(f"{path} holds a {arch!r} model; only GGUF files of the 'llama' architecture "
                              "(e.g. SmolLM2) can be loaded.")
    meta = {key[len("llama."):]: gguf_value(reader, key) for key in reader.fields if key.startswith("llama.")}
    required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count",
                "attention.layer_norm_rms_epsilon")
    missing = [f"llama.{k}" for k in required if k not in meta]
    if missing:
        raise WeightLoadError(f"{path} lacks the metadata {', '.join(missing)}.")
    names = {t.name for t in reader.tensors}
    heads = meta["attention.head_count"]
    kv_heads = meta.get("attention.head_count_kv", heads)
    hidden = meta["embedding_length"]
    unsupported = []
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(meta.get(key), list):
            unsupported.append(f"per-layer llama.{key}")
    if meta.get("expert_count"):
        unsupported.append("mixture of experts (llama.expert_count)")
    scaling = meta.get("rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in names:
        unsupported.append(f"scaled RoPE ({scaling or 'rope_freqs'})")
    if not unsupported:
        head_dim = hidden // heads
        for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            if key in meta and meta[key] != head_dim:
                unsupported.append(f"llama.{key}={meta[key]} (needs embedding_length / head_count = {head_dim})")
    if unsupported:
        raise WeightLoadError(f"{path} uses Llama options this model does not implement: {', '.join(unsupported)}.")
    if "token_embd.weight" not in names:
        raise WeightLoadError(f"{path} has no token_embd.weight tensor.")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {
        "lm_hidden_dim": hidden,
        "lm_inter_dim": meta["feed_forward_length"],
        "lm_n_heads": heads,
        "lm_n_kv_heads": kv_heads,
        "lm_n_blocks": meta["block_count"],
        "lm_rms_eps": f32_value(meta["attention.layer_norm_rms_epsilon"]),
        "lm_re_base": f32_value(meta.get("rope.freq_base", 10000.0)),
        "lm_base_vocab_size": int(embd.shape[-1]),  # rows of the embedding (GGUF order: (C, vocab))
        "lm_tie_weights": "output.weight" not in names,
        "lm_max_position_embeddings": meta.get("context_length", 2048),
    }


def load_gguf_llama(cls: type, cfg: Any, path: str):
    """A `cls(cfg)` with the (dequantized, fp32) weights of a llama GGUF file."""
    found, reader = gguf_llama_config(path), open_gguf(path)  # the reader is cached
    transforms = {"blocks.{i}.attn.q_proj.weight": unpermute_rope_rows(cfg.lm_n_heads),
                  "blocks.{i}.attn.k_proj.weight": unpermute_rope_rows(cfg.lm_n_kv_heads)}
    tensors = Tensors({t.name: t for t in reader.tensors}, _dequantized)
    return load_llama(cls, cfg, found, tensors, KEYS, path, transforms)
