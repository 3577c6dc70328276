"""Language-model weights from any source: `cfg.lm_model_type` names `packaged:smollm2-135m`, a
`.gguf` file, a transformers Llama directory, or a hub id (downloaded only when online).
`config_from_source(name)` reads a source's `lm_*` fields, so a config need not type numbers.
"""

from __future__ import annotations

import os
from typing import Any

from nanovlm.sources import PACKAGED_SMOLLM2, resolve
from nanovlm.weights.common import HF_PATTERNS, WeightLoadError
from nanovlm.weights.gguf import gguf_llama_config, load_gguf_llama
from nanovlm.weights.hf_llama import hf_llama_config, load_hf_llama


# kind -> (its `lm_*` fields, its loader)
READERS = {"gguf": (gguf_llama_config, load_gguf_llama), "hf": (hf_llama_config, load_hf_llama)}


def _resolve_lm(name: str) -> tuple[str, str]:
    """-> ("gguf" | "hf", local path)."""
    if not name:
        raise WeightLoadError("no language-model checkpoint given; set lm_model_type to a directory, a .gguf "
                              f"file or {PACKAGED_SMOLLM2}.")
    path = resolve(name, allow_patterns=HF_PATTERNS)
    if os.path.isdir(path):
        return "hf", path
    if path.endswith(".gguf"):
        return "gguf", path
    raise WeightLoadError(f"{path} is neither a transformers Llama directory (config.json + model.safetensors) "
                          "nor a .gguf file.")


def load_language_model(cls: type, cfg: Any):
    """A `cls` (LanguageModel) with the weights `cfg.lm_model_type` names, fp32 on the CPU."""
    kind, path = _resolve_lm(cfg.lm_model_type)
    return READERS[kind][1](cls, cfg, path)


def config_from_source(name: str) -> dict[str, Any]:
    """The `lm_*` architecture fields of a language-model source, ready for `VLMConfig(**fields)`."""
    kind, path = _resolve_lm(name)
    return READERS[kind][0](path)
