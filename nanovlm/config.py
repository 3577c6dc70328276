"""Configuration: VLMConfig (the model blueprint), TrainConfig (the run), and PRESETS.

Plain data, no torch import. Field names follow the nanoVLM tutorial and its checkpoints
(`vit_*`, `lm_*`, `mp_*`, `vlm_*`) so that a `config.json` written by the original project
loads here unchanged. Derived fields (`vit_inter_dim`, `lm_vocab_size`,
`mp_image_token_length`, ...) are filled in by `__post_init__` when left as None, and checked
against the rest when given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

# The label of a position that gets no loss (PyTorch's `cross_entropy` default): prompts,
# padding, and the last position of every sample.
IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_extra_tokens() -> dict[str, str]:
    """The 66 tokens the original nanoVLM adds: image, global image, and an 8x8 grid of tile tags."""
    tokens = {"image_token": "<|image|>", "global_image_token": "<|global_image|>"}
    for r in range(1, 9):
        for c in range(1, 9):
            tokens[f"r{r}c{c}"] = f"<row_{r}_col_{c}>"
    return tokens


# vit_hidden_act -> the `approximate` argument of torch's GELU (the names are transformers').
VIT_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class VLMConfig:
    # --- vision transformer ---
    vit_hidden_dim: int = 768
    vit_inter_dim: int | None = None  # derived: 4 * vit_hidden_dim
    vit_patch_size: int = 16
    vit_img_size: int = 224
    vit_n_heads: int = 12
    vit_dropout: float = 0.0
    vit_n_blocks: int = 12
    vit_ln_eps: float = 1e-6
    vit_cls_flag: bool = False
    # The MLP's GELU: SigLIP's tanh approximation, or the exact (erf) one, ~3x faster on CPUs
    # (measured in docs/benchmarks.md), for encoders trained from scratch.
    vit_hidden_act: str = "gelu_pytorch_tanh"
    vit_model_type: str = "google/siglip-base-patch16-224"
    # Pixels reach the model in [0, 1]; when set, the VLM feeds the ViT (pixels - mean) / std.
    # None keeps the original nanoVLM behaviour (raw [0, 1] pixels). Centred pixels (0.5 / 0.5,
    # SigLIP's own normalisation) let a ViT trained from scratch find small shapes far sooner.
    vit_pixel_mean: float | None = None
    vit_pixel_std: float | None = None

    # --- language model ---
    lm_hidden_dim: int = 576
    lm_inter_dim: int = 1536
    lm_rms_eps: float = 1e-5
    lm_re_base: float = 100000.0
    lm_max_position_embeddings: int = 8192
    lm_base_vocab_size: int = 49152
    extra_token_amount: int | None = None  # derived: len(vlm_extra_tokens)
    lm_vocab_size: int | None = None  # derived: lm_base_vocab_size + extra_token_amount
    lm_n_heads: int = 9
    lm_n_kv_heads: int = 3
    lm_dropout: float = 0.0
    # Std of the normal init of the blocks' projections when the LM is trained from scratch
    # (embedding and head keep 0.02). 0.02 is nanoVLM's and GPT-2's, sized for wide models; a
    # narrow LM reads the image far sooner with about lm_hidden_dim ** -0.5 (docs/benchmarks.md).
    lm_init_std: float = 0.02
    lm_n_blocks: int = 30
    lm_attn_scaling: float = 1.0
    lm_max_length: int = 1024
    lm_use_tokens: bool = False
    lm_tie_weights: bool = True
    lm_model_type: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lm_tokenizer: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lm_chat_template: str = CHATML_TEMPLATE
    lm_eos_token_id: int = 2  # <|im_end|> in the SmolLM2 tokenizers: ChatML turns end with it

    # --- modality projector ---
    mp_pixel_shuffle_factor: int = 2
    mp_image_token_length: int | None = None  # derived: (patch grid / shuffle factor) ** 2

    # --- image processing ---
    max_img_size: int = 224
    resize_to_max_side_len: bool = False

    # --- vision-language model ---
    vlm_extra_tokens: dict[str, str] = field(default_factory=default_extra_tokens)
    vlm_load_backbone_weights: bool = True
    vlm_checkpoint_path: str = "checkpoints"
    hf_repo_name: str = "nanoVLM"

    def __post_init__(self) -> None:
        _check(isinstance(self.vlm_extra_tokens, dict) and "image_token" in self.vlm_extra_tokens,
               "vlm_extra_tokens must be a dict that contains at least 'image_token'.")
        for name in ("vit_hidden_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
                     "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
                     "lm_base_vocab_size", "lm_max_length", "lm_max_position_embeddings",
                     "mp_pixel_shuffle_factor", "max_img_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"{name} must be a positive integer, got {value!r}.")
        for name in ("vit_dropout", "vit_ln_eps", "lm_rms_eps", "lm_re_base", "lm_dropout", "lm_init_std",
                     "lm_attn_scaling", "vit_pixel_mean", "vit_pixel_std"):
            value = getattr(self, name)
            _check((value is None and name.startswith("vit_pixel")) or _is_number(value),
                   f"{name} must be a number, got {value!r}.")

        _check((self.vit_pixel_mean is None) == (self.vit_pixel_std is None),
               "vit_pixel_mean and vit_pixel_std must be set together (or both left unset).")
        _check(self.vit_pixel_std is None or self.vit_pixel_std > 0,
               f"vit_pixel_std must be > 0, got {self.vit_pixel_std}.")
        _check(self.vit_hidden_act in VIT_ACTIVATIONS,
               f"vit_hidden_act must be one of {', '.join(VIT_ACTIVATIONS)}, got {self.vit_hidden_act!r}.")
        if self.vit_inter_dim is None:
            self.vit_inter_dim = 4 * self.vit_hidden_dim
        _check(self.vit_hidden_dim % self.vit_n_heads == 0,
               f"vit_n_heads ({self.vit_n_heads}) must divide vit_hidden_dim ({self.vit_hidden_dim}).")
        _check(self.vit_img_size % self.vit_patch_size == 0,
               f"vit_patch_size ({self.vit_patch_size}) must divide vit_img_size ({self.vit_img_size}).")
        grid = self.vit_img_size // self.vit_patch_size
        _check(grid % self.mp_pixel_shuffle_factor == 0,
               f"mp_pixel_shuffle_factor ({self.mp_pixel_shuffle_factor}) must divide the patch grid "
               f"side vit_img_size / vit_patch_size = {grid}.")
        tokens = (grid // self.mp_pixel_shuffle_factor) ** 2
        if self.mp_image_token_length is None:
            self.mp_image_token_length = tokens
        _check(self.mp_image_token_length == tokens,
               f"mp_image_token_length is {self.mp_image_token_length} but the image gives "
               f"({grid} / {self.mp_pixel_shuffle_factor})^2 = {tokens} tokens; leave it unset to derive it.")

        _check(self.lm_hidden_dim % self.lm_n_heads == 0,
               f"lm_n_heads ({self.lm_n_heads}) must divide lm_hidden_dim ({self.lm_hidden_dim}).")
        _check(self.lm_n_heads % self.lm_n_kv_heads == 0,
               f"lm_n_kv_heads ({self.lm_n_kv_heads}) must divide lm_n_heads ({self.lm_n_heads}).")
        _check((self.lm_hidden_dim // self.lm_n_heads) % 2 == 0,
               f"the head dimension lm_hidden_dim / lm_n_heads = {self.lm_hidden_dim // self.lm_n_heads} "
               "must be even for rotary embeddings.")
        _check(0.0 <= self.vit_dropout < 1.0, f"vit_dropout must be in [0, 1), got {self.vit_dropout}.")
        _check(0.0 <= self.lm_dropout < 1.0, f"lm_dropout must be in [0, 1), got {self.lm_dropout}.")
        _check(self.lm_init_std > 0, f"lm_init_std must be > 0, got {self.lm_init_std}.")

        n_extra = len(self.vlm_extra_tokens)
        if self.extra_token_amount is None:
            self.extra_token_amount = n_extra
        _check(self.extra_token_amount == n_extra,
               f"extra_token_amount is {self.extra_token_amount} but vlm_extra_tokens has {n_extra} entries.")
        needed = self.lm_base_vocab_size + n_extra
        if self.lm_vocab_size is None:
            self.lm_vocab_size = needed
        _check(self.lm_vocab_size >= needed,
               f"lm_vocab_size ({self.lm_vocab_size}) is smaller than lm_base_vocab_size + extra tokens "
               f"({self.lm_base_vocab_size} + {n_extra} = {needed}).")
        _check(self.lm_max_length <= self.lm_max_position_embeddings,
               f"lm_max_length ({self.lm_max_length}) exceeds lm_max_position_embeddings "
               f"({self.lm_max_position_embeddings}).")

    # --- derived, read-only ---
    @property
    def vit_grid(self) -> int:
        return self.vit_img_size // self.vit_patch_size

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        return cls(**_known_fields(cls, data, "VLMConfig"))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VLMConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VLMConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        merged = {**PRESETS[name]["model"], **overrides}
        return cls.from_dict(merged)

    def replace(self, **changes: Any) -> "VLMConfig":
        """A new config with `changes` applied and derived fields recomputed."""
        data = self.to_dict()
        for derived in ("vit_inter_dim", "extra_token_amount", "lm_vocab_size", "mp_image_token_length"):
            if derived not in changes and _derived_default(self, derived):
                data[derived] = None
        data.update(changes)
        return VLMConfig.from_dict(data)


def _derived_default(cfg: VLMConfig, name: str) -> bool:
    """True when the derived field holds the value __post_init__ would compute from scratch."""
    fresh = {
        "vit_inter_dim": 4 * cfg.vit_hidden_dim,
        "extra_token_amount": len(cfg.vlm_extra_tokens),
        "lm_vocab_size": cfg.lm_base_vocab_size + len(cfg.vlm_extra_tokens),
        "mp_image_token_length": (cfg.vit_grid // cfg.mp_pixel_shuffle_factor) ** 2,
    }
    return getattr(cfg, name) == fresh[name]


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        warnings.warn(f"{what}: ignoring unknown keys {', '.join(unknown)}.", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}


@dataclass
class TrainConfig:
    # --- names kept from nanoVLM ---
    lr_mp: float = 2e-3
    lr_vision_backbone: float = 5e-5
    lr_language_backbone: float = 5e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_training_steps: int = 1000
    eval_interval: int = 200
    max_grad_norm: float = 1.0
    compile: bool = False
    # --- added ---
    data: str = "easyvqa"  # easyvqa | parquet/arrow/save_to_disk dir/hub name | LLaVA .json/.jsonl
    image_folder: str | None = None  # LLaVA image paths are relative to this (default: data file's folder)
    seed: int = 0
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2  # step checkpoints kept besides the best one
    precision: str = "auto"  # auto | fp32 | bf16
    strict: bool = False  # a broken sample is an error instead of a counted skip
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    num_workers: int = 0
    packing: bool = False
    pack_length: int = 0  # 0: lm_max_length
    max_images_per_pack: int = 8
    multi_turn: bool = True  # easyvqa: the questions of an image as one conversation ...
    max_turns: int = 0  # ... of at most this many questions (0: all of them)
    independent_turns: bool = False  # questions of one sample each see its image and themselves only
    vision_warmup_steps: int = 0  # first train the vision encoder alone on per-image labels (easyvqa)
    vision_warmup_lr: float = 1e-3
    vision_warmup_batch_size: int = 64  # images per warm-up step (its own: not tied to batch_size)
    val_size: int = 256  # held-out training samples for the validation loss
    eval_task: str = "easyvqa"  # task accuracy during and after training ("" to skip)
    eval_limit: int = 0  # 0: the full test split at the end
    eval_interval_limit: int = 500  # questions per periodic accuracy check
    eval_batch_size: int = 64
    log_interval: int = 10
    wandb: bool = False
    max_epochs: int = 0  # 0: no epoch cap, max_training_steps decides
    streaming: bool = False  # read data files / hub data incrementally (an IterableDataset) instead of random access
    max_image_pixels: int = 64 * 1024 * 1024  # images with more pixels are skipped (decompression-bomb guard)

    def __post_init__(self) -> None:
        _check(self.precision in ("auto", "fp32", "bf16"),
               f"precision must be one of auto, fp32, bf16, got {self.precision!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_training_steps", "vision_warmup_batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"{name} must be a positive integer, got {value!r}.")
        for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone", "weight_decay"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}.")
        _check(isinstance(self.max_turns, int) and self.max_turns >= 0,
               f"max_turns must be an integer >= 0 (0: all questions of an image), got {self.max_turns!r}.")
        _check(isinstance(self.vision_warmup_steps, int) and not isinstance(self.vision_warmup_steps, bool)
               and self.vision_warmup_steps >= 0,
               f"vision_warmup_steps must be an integer >= 0 (0: no warm-up), got {self.vision_warmup_steps!r}.")
        _check(self.vision_warmup_lr > 0, f"vision_warmup_lr must be > 0, got {self.vision_warmup_lr}.")
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**_known_fields(cls, data, "TrainConfig"))


# Presets are data: name -> {"model": VLMConfig overrides, "train": TrainConfig overrides}.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The original nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M, pixel shuffle 2 -> 7x7 = 49 tokens.
    "nanovlm-222m": {
        "model": dict(
            vit_hidden_dim=768, vit_patch_size=16, vit_img_size=224, vit_n_heads=12, vit_n_blocks=12,
            vit_model_type="google/siglip-base-patch16-224",
            lm_hidden_dim=576, lm_inter_dim=1536, lm_n_heads=9, lm_n_kv_heads=3, lm_n_blocks=30,
            lm_re_base=100000.0, lm_model_type="HuggingFaceTB/SmolLM2-135M-Instruct",
            lm_tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct", mp_pixel_shuffle_factor=2,
            max_img_size=224, lm_max_length=1024,
        ),
        "train": dict(lr_mp=2e-3, lr_vision_backbone=5e-5, lr_language_backbone=5e-5),
    },
    # nanoVLM-460M: SigLIP2-B/16-512 + SmolLM2-360M-Instruct, shuffle 4 -> 8x8 = 64 tokens
    # (numbers from the original repository's config.py).
    "nanovlm-460m": {
        "model": dict(
            vit_hidden_dim=768, vit_patch_size=16, vit_img_size=512, vit_n_heads=12, vit_n_blocks=12,
            vit_model_type="google/siglip2-base-patch16-512",
            lm_hidden_dim=960, lm_inter_dim=2560, lm_n_heads=15, lm_n_kv_heads=5, lm_n_blocks=32,
            lm_re_base=100000.0, lm_model_type="HuggingFaceTB/SmolLM2-360M-Instruct",
            lm_tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct", mp_pixel_shuffle_factor=4,
            max_img_size=1536, lm_max_length=4096,
        ),
        "train": dict(lr_mp=5e-3, lr_vision_backbone=5e-5, lr_language_backbone=5e-5),
    },
    # Sized for a 2-core CPU: 64x64 easy-VQA images, 8px patches -> 8x8 grid, shuffle 2 -> 16
    # tokens; both towers trained from scratch (7.2M parameters, 6.3M of them the SmolLM2-vocabulary
    # embedding); the real SmolLM2 tokenizer (measured in docs/benchmarks.md).
    "easyvqa": {
        "model": dict(
            vit_hidden_dim=128, vit_patch_size=8, vit_img_size=64, vit_n_heads=4, vit_n_blocks=2,
            vit_model_type="", vit_pixel_mean=0.5, vit_pixel_std=0.5, vit_hidden_act="gelu",
            lm_hidden_dim=128, lm_inter_dim=384, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_model_type="",
            lm_init_std=0.08,  # ~ 128 ** -0.5; with 0.02 the image reached the answers far later
            lm_tokenizer="packaged:smollm2-135m", mp_pixel_shuffle_factor=2, max_img_size=64, lm_max_length=512,
            vlm_load_backbone_weights=False,
        ),
        # First 3,000 steps of the ViT alone on each image's shape and colour (a vision warm-up,
        # ~140 s: through the language model it did not learn shape in 900 steps), then the VLM
        # with the ViT at 3e-4 (1e-3 undid the warm-up). An image's questions as conversations of up to 3 turns
        # (one ViT pass per 3 questions), packed into 256-token rows; 1,200 steps; the whole run
        # takes ~460 s on 2 cores (measurements in docs/benchmarks.md).
        "train": dict(lr_mp=1e-3, lr_vision_backbone=3e-4, lr_language_backbone=1e-3, batch_size=64,
                      max_training_steps=1200, eval_interval=400, eval_interval_limit=200, val_size=32,
                      weight_decay=0.01, multi_turn=True, max_turns=3, packing=True, pack_length=256,
                      warmup_ratio=0.03, vision_warmup_steps=3000, vision_warmup_lr=1e-3),
    },
    # The real SmolLM2-135M-Instruct (packaged GGUF) as the language model, frozen; the easyvqa
    # preset's ViT from scratch with its vision warm-up; the projector learns to feed SmolLM2.
    "easyvqa-smollm2": {
        "model": dict(
            vit_hidden_dim=128, vit_patch_size=8, vit_img_size=64, vit_n_heads=4, vit_n_blocks=2,
            vit_model_type="", vit_pixel_mean=0.5, vit_pixel_std=0.5, vit_hidden_act="gelu",
            lm_hidden_dim=576, lm_inter_dim=1536, lm_n_heads=9, lm_n_kv_heads=3,
            lm_n_blocks=30, lm_model_type="packaged:smollm2-135m", lm_tokenizer="packaged:smollm2-135m",
            mp_pixel_shuffle_factor=2, max_img_size=64, lm_max_length=512,
            vlm_load_backbone_weights=True,
        ),
        "train": dict(lr_mp=1e-3, lr_vision_backbone=3e-4, lr_language_backbone=0.0, batch_size=16,
                      max_training_steps=300, eval_interval=150, eval_interval_limit=200, val_size=32,
                      multi_turn=True, max_turns=3, packing=True, pack_length=256, warmup_ratio=0.03,
                      vision_warmup_steps=3000, vision_warmup_lr=1e-3),
    },
    # A few-thousand-parameter model for tests: 32x32 images, 8px patches, shuffle 2 -> 4 tokens.
    "tiny": {
        "model": dict(
            vit_hidden_dim=32, vit_patch_size=8, vit_img_size=32, vit_n_heads=2, vit_n_blocks=2,
            vit_model_type="", lm_hidden_dim=64, lm_inter_dim=128, lm_n_heads=4, lm_n_kv_heads=2,
            lm_n_blocks=2, lm_model_type="", lm_tokenizer="packaged:smollm2-135m",
            mp_pixel_shuffle_factor=2, max_img_size=32, lm_max_length=256,
            vlm_load_backbone_weights=False,
        ),
        "train": dict(batch_size=4, max_training_steps=10, eval_interval=5, lr_mp=1e-3,
                      lr_vision_backbone=1e-3, lr_language_backbone=1e-3),
    },
}
