"""Weights: one file per format, each a key table plus named transforms. `weights/` never
imports `models/`: the models' `from_pretrained` calls in, handing over the class to fill.

- `common.py`: what every reader shares (key tables, transforms, the strict state-dict check).
- `hf_siglip.py`, `hf_llama.py`, `gguf.py`: transformers SigLIP / Llama directories, llama.cpp GGUF.
- `loading.py`: the language model from any of its sources.
- `idefics3.py`: transformers Idefics3 / SmolVLM directories (one key table, read both ways;
  `nanovlm/export.py` writes them).
- `nanovlm.py`: checkpoint directories of nanovlm and of the original nanoVLM (read, write, upload).
"""
