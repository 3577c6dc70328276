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
    if kind == "gguf":
        return load_gguf_llama(cls, cfg, path)
    return load_hf_llama(cls, cfg, path)


def config_from_source(name: str) -> dict[str, Any]:
    """The `lm_*` architecture fields of a language-model source (HF directory, .gguf file,
    `packaged:smollm2-135m`, or a hub id when online), ready for `VLMConfig(**fields)`."""
    kind, path = _resolve_lm(name)
    if kind == "gguf":
        return gguf_llama_config(path)
    return hf_llama_config(path)
