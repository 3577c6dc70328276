"""The original nanoVLM's own code, imported as it is from a checkout (`--original DIR`).

The benchmarks compare against huggingface/nanoVLM at the commit named in docs/results.md, not
a rewrite of it. Its `models/` import `data.processors`, which imports torchvision (whose PyPI
wheel fails beside the CPU torch) and builds a hub tokenizer in `VisionLanguageModel.__init__`;
both are stood in for: the tokenizer by an object carrying only `image_token_id`, the one thing
its models read from it. Nothing in `models/` is changed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types


class OriginalError(ValueError):
    pass


def import_original(checkout: str, image_token_id: int):
    """(its VLMConfig class, its VisionLanguageModel class) from a nanoVLM checkout."""
    if not os.path.isfile(os.path.join(checkout, "models", "vision_language_model.py")):
        raise OriginalError(f"--original {checkout} holds no models/vision_language_model.py; pass a checkout of "
                            "https://github.com/huggingface/nanoVLM (git clone, then the commit docs/results.md names).")
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    processors = types.ModuleType("data.processors")
    processors.get_tokenizer = lambda *args, **kwargs: types.SimpleNamespace(image_token_id=image_token_id)
    sys.modules["data.processors"] = processors
    sys.path.insert(0, os.path.abspath(checkout))
    from models.config import VLMConfig as OriginalConfig
    from models.vision_language_model import VisionLanguageModel as OriginalVLM
    return OriginalConfig, OriginalVLM


def original_config(OriginalConfig, ours) -> object:
    """The original's config with every field both configs share set to ours (the same shape)."""
    cfg = OriginalConfig()
    for f in dataclasses.fields(cfg):
        if f.name != "vlm_extra_tokens" and hasattr(ours, f.name):
            setattr(cfg, f.name, getattr(ours, f.name))
    return cfg
