"""nanovlm: a small, fast, readable vision-language-model toolkit in pure PyTorch.

The public API is re-exported lazily, so `import nanovlm` is cheap (no torch import until a
model class is touched) and has no side effects.
"""

from nanovlm.config import PRESETS, TrainConfig, VLMConfig

__all__ = ["VLMConfig", "TrainConfig", "PRESETS", "VisionLanguageModel"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "VisionLanguageModel":
        from nanovlm.models.vision_language_model import VisionLanguageModel

        return VisionLanguageModel
    raise AttributeError(f"module 'nanovlm' has no attribute {name!r}")
