"""Configuration: VLMConfig (the model blueprint), TrainConfig (the run), and PRESETS.

Plain data, no torch import. Field names follow the nanoVLM tutorial and its checkpoints
(`vit_*`, `lm_*`, `mp_*`, `vlm_*`) so that a `config.json` written by the original project
loads here unchanged. Derived fields (`vit_inter_dim`, `lm_vocab_size`,
`mp_image_token_length`, ...) are filled in by `__post_init__` when left as None, and checked
against the rest when given.

Every setting is checked here against its field's annotated type, wherever it comes from:
Python (`VLMConfig(...)`), a preset, a YAML/JSON file (`check_value`: typed values, ints
accepted for floats) or `key=value` text (`parse_value`: the text parsed to the field's type;
a boolean is one of BOOL_WORDS, None is none/null where the field allows it, a dict is JSON).
`nanovlm.train.settings` layers preset < file < command line on top of these two functions.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import types
import typing
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


# vlm_image_layout values (nanovlm.data.processors lays each out) and vlm_image_resample's PIL filters.
IMAGE_LAYOUTS = ("nanovlm", "idefics3")
IMAGE_RESAMPLING = ("bicubic", "lanczos")

# vit_hidden_act -> the `approximate` argument of torch's GELU (the names are transformers').
VIT_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}

# The linear layers LoRA can adapt (`lora_targets`): the language model's attention (q, k, v, o)
# and MLP (gate, up, down) projections and the vision encoder's fused q/k/v, output and MLP
# layers, plus group names for several at once. `nanovlm.models.lora` maps each to its modules.
LORA_TARGETS = ("lm_q", "lm_k", "lm_v", "lm_o", "lm_gate", "lm_up", "lm_down",
                "vit_qkv", "vit_out", "vit_fc1", "vit_fc2")
LORA_TARGET_GROUPS = {
    "lm_attn": ("lm_q", "lm_k", "lm_v", "lm_o"),
    "lm_mlp": ("lm_gate", "lm_up", "lm_down"),
    "lm": LORA_TARGETS[:7],
    "vit": LORA_TARGETS[7:],
    "all": LORA_TARGETS,
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ------------------------------------------------------------------------ the one settings parser
# Booleans written as text (command line, `data preview`, environment-style switches), any case.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
NONE_WORDS = ("none", "null")
_HINTS: dict[type, dict[str, Any]] = {}


def parse_bool(text: str) -> bool:
    """One of BOOL_WORDS (true/false, yes/no, on/off, 1/0; any case) -> bool; ValueError otherwise."""
    try:
        return BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"expected true or false (or yes/no, on/off, 1/0), got {text!r}.") from None


def field_types(cls: type) -> dict[str, Any]:
    """name -> annotated type of every field of a config dataclass, in field order."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in fields(cls)}
    return _HINTS[cls]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); X -> (X, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp) or tp
    if origin is dict and typing.get_args(tp) == (str, str):
        return "a mapping of strings to strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(origin, str(tp))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_value(name: str, value: Any, tp: Any, where: str = "") -> Any:
    """A typed value (Python, a preset, YAML or JSON) for field `name` of type `tp`, as stored:
    ints (numpy's too) become int, numbers in float fields float. ConfigError naming the field,
    the expected type and the value otherwise; `where` (e.g. " in config file a.yaml") ends it."""
    base, optional = _split_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(base) or base
    if origin is bool and isinstance(value, bool):
        return value
    if origin is int and _is_int(value):
        return int(value)
    if origin is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if origin is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, dict):
        key_t, value_t = typing.get_args(base) or (Any, Any)
        if all((key_t is Any or isinstance(k, key_t)) and (value_t is Any or isinstance(v, value_t))
               for k, v in value.items()):
            return value
    raise ConfigError(f"{name} must be {_expected(base)}, got {value!r}{where}.")


def parse_value(name: str, text: str, tp: Any, where: str = " on the command line") -> Any:
    """The text of a `key=value` setting parsed to field `name`'s type `tp` and checked."""
    base, optional = _split_optional(tp)
    if optional and text.strip().lower() in NONE_WORDS:
        return None
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            value: Any = parse_bool(text)
        elif origin is int:
            value = int(text)
        elif origin is float:
            value = float(text)
        elif origin is dict:
            value = json.loads(text)
        else:
            value = text
        return check_value(name, value, tp, where)
    except ValueError:  # ConfigError included: name the text as the user wrote it
        expected = _expected(base) + (" (or yes/no, on/off, 1/0)" if origin is bool else "")
        raise ConfigError(f"{name} must be {expected}, got {text!r}{where}.") from None


def _check_types(cfg: Any) -> None:
    """Every field of a config dataclass against its annotation, converted as check_value stores it."""
    for name, tp in field_types(type(cfg)).items():
        object.__setattr__(cfg, name, check_value(name, getattr(cfg, name), tp))


def lora_target_names(text: str) -> tuple[str, ...]:
    """`lora_targets` text (comma-separated names of LORA_TARGETS and LORA_TARGET_GROUPS) -> the
    target names it covers, in LORA_TARGETS order; ConfigError naming an unknown one."""
    chosen: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name in LORA_TARGET_GROUPS:
            chosen.update(LORA_TARGET_GROUPS[name])
        elif name in LORA_TARGETS:
            chosen.add(name)
        else:
            raise ConfigError(f"lora_targets: unknown target {name!r}; choose from "
                              f"{', '.join(LORA_TARGETS)} or the groups {', '.join(LORA_TARGET_GROUPS)}.")
    return tuple(t for t in LORA_TARGETS if t in chosen)


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    """PRESETS[name]; the one message for a name that is not there."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


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
    # How an image's tiles and tokens are laid out: "nanovlm" (global view first, bicubic
    # resizing) or "idefics3" (SmolVLM's processor: tiles between <fake_token_around_image>, a
    # newline per row, the global view last, Lanczos resizing; `nanovlm.weights.idefics3`).
    vlm_image_layout: str = "nanovlm"
    # Idefics3 / SmolVLM tokenizers already hold their image tokens: no rows are appended, and
    # the image token's id is the tokenizer's (vlm_image_token_id) instead of base + position.
    vlm_extra_tokens_in_vocab: bool = False
    vlm_image_token_id: int | None = None  # derived: lm_base_vocab_size + position of image_token
    vlm_image_splitting: bool = True  # false: every image becomes one tile (Idefics3's do_image_splitting)
    vlm_image_resample: str = "bicubic"  # PIL filter of the image processor: bicubic | lanczos
    vlm_load_backbone_weights: bool = True
    vlm_checkpoint_path: str = "checkpoints"
    hf_repo_name: str = "nanoVLM"

    def __post_init__(self) -> None:
        _check(isinstance(self.vlm_extra_tokens, dict) and "image_token" in self.vlm_extra_tokens,
               f"vlm_extra_tokens must be a dict that contains at least 'image_token', got {self.vlm_extra_tokens!r}.")
        for name in ("vit_hidden_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
                     "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
                     "lm_base_vocab_size", "lm_max_length", "lm_max_position_embeddings",
                     "mp_pixel_shuffle_factor", "max_img_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        _check_types(self)

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
        self._check_image_layout()
        needed = self.lm_base_vocab_size + (0 if self.vlm_extra_tokens_in_vocab else n_extra)
        if self.lm_vocab_size is None:
            self.lm_vocab_size = needed
        _check(self.lm_vocab_size >= needed,
               f"lm_vocab_size ({self.lm_vocab_size}) is smaller than lm_base_vocab_size + extra tokens "
               f"({self.lm_base_vocab_size} + {n_extra} = {needed}).")
        _check(self.lm_max_length <= self.lm_max_position_embeddings,
               f"lm_max_length ({self.lm_max_length}) exceeds lm_max_position_embeddings "
               f"({self.lm_max_position_embeddings}).")
        _check(self.vlm_image_token_id < self.lm_vocab_size,
               f"vlm_image_token_id ({self.vlm_image_token_id}) is outside the vocabulary of {self.lm_vocab_size} tokens.")

    def _check_image_layout(self) -> None:
        _check(self.vlm_image_layout in IMAGE_LAYOUTS,
               f"vlm_image_layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {self.vlm_image_layout!r}.")
        _check(self.vlm_image_resample in IMAGE_RESAMPLING,
               f"vlm_image_resample must be one of {', '.join(IMAGE_RESAMPLING)}, got {self.vlm_image_resample!r}.")
        if self.vlm_image_token_id is None:
            _check(not self.vlm_extra_tokens_in_vocab,
                   "vlm_extra_tokens_in_vocab needs vlm_image_token_id: the id of the image token in the tokenizer.")
            self.vlm_image_token_id = self.lm_base_vocab_size + list(self.vlm_extra_tokens).index("image_token")
        _check(self.vlm_image_token_id >= 0, f"vlm_image_token_id must be >= 0, got {self.vlm_image_token_id}.")

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
        merged = {**get_preset(name)["model"], **overrides}
        return cls.from_dict(merged)

    def replace(self, **changes: Any) -> "VLMConfig":
        """A new config with `changes` applied and derived fields recomputed."""
        data = self.to_dict()
        for derived in ("vit_inter_dim", "extra_token_amount", "lm_vocab_size", "mp_image_token_length",
                        "vlm_image_token_id"):
            if derived not in changes and _derived_default(self, derived):
                data[derived] = None
        data.update(changes)
        return VLMConfig.from_dict(data)


# One line of meaning per VLMConfig field (`nanovlm train --list-settings` prints them).
VLM_HELP: dict[str, str] = {
    "vit_hidden_dim": "width of the vision transformer's token vectors",
    "vit_inter_dim": "width of the ViT MLP's hidden layer (none: 4 * vit_hidden_dim)",
    "vit_patch_size": "side in pixels of the square patches a tile is cut into",
    "vit_img_size": "side in pixels of the square tile the ViT reads",
    "vit_n_heads": "attention heads per ViT block (must divide vit_hidden_dim)",
    "vit_dropout": "dropout probability inside the ViT, in [0, 1)",
    "vit_n_blocks": "number of ViT blocks",
    "vit_ln_eps": "epsilon of the ViT's layer norms",
    "vit_cls_flag": "the ViT returns one CLS vector per image, (B, vit_hidden_dim), instead of every patch",
    "vit_hidden_act": "the ViT MLP's GELU: gelu_pytorch_tanh (SigLIP's) or gelu (exact, ~3x faster on CPUs)",
    "vit_model_type": "pretrained ViT weights: a SigLIP/SigLIP2 directory or hub id ('': train from scratch)",
    "vit_pixel_mean": "the ViT reads (pixels - mean) / std; none: raw [0, 1] pixels, as nanoVLM",
    "vit_pixel_std": "see vit_pixel_mean; set both or neither",
    "lm_hidden_dim": "width of the language model's token vectors",
    "lm_inter_dim": "width of the LM MLP's hidden layer",
    "lm_rms_eps": "epsilon of the LM's RMS norms",
    "lm_re_base": "base (theta) of the LM's rotary position embedding",
    "lm_max_position_embeddings": "positions the LM's rotary tables cover (its longest context)",
    "lm_base_vocab_size": "tokens in the tokenizer before the extra tokens",
    "extra_token_amount": "number of extra tokens (none: len(vlm_extra_tokens))",
    "lm_vocab_size": "rows of the LM's embedding (none: lm_base_vocab_size + extra_token_amount)",
    "lm_n_heads": "query heads per LM block (must divide lm_hidden_dim)",
    "lm_n_kv_heads": "key/value heads per LM block, grouped-query attention (must divide lm_n_heads)",
    "lm_dropout": "dropout probability inside the LM, in [0, 1)",
    "lm_init_std": "std of the init of the LM blocks' projections when trained from scratch",
    "lm_n_blocks": "number of LM blocks",
    "lm_attn_scaling": "factor on the rotary cos/sin tables (1.0: plain RoPE)",
    "lm_max_length": "longest token sequence in training and generation (<= lm_max_position_embeddings)",
    "lm_use_tokens": "the LM alone reads token ids and returns logits (false inside the VLM: embeddings)",
    "lm_tie_weights": "the LM head shares the token-embedding matrix",
    "lm_model_type": "pretrained LM weights: a Llama directory, .gguf file, packaged:smollm2-135m or hub id ('': none)",
    "lm_tokenizer": "tokenizer: a transformers tokenizer directory, .gguf file, packaged:smollm2-135m or hub id",
    "lm_chat_template": "Jinja chat template that lays out a conversation (ChatML)",
    "lm_eos_token_id": "token id that ends an answer",
    "mp_pixel_shuffle_factor": "the projector merges factor x factor neighbouring patches into one token",
    "mp_image_token_length": "tokens per tile (none: (vit_img_size / vit_patch_size / mp_pixel_shuffle_factor)^2)",
    "max_img_size": "longest image side after resizing; larger images become several tiles plus a global view",
    "resize_to_max_side_len": "always resize the long side to max_img_size (false: only to the next tile multiple)",
    "vlm_extra_tokens": "tokens added to the tokenizer, name -> text (image, global image, 8x8 tile tags)",
    "vlm_image_layout": "prompt and tile layout of an image: nanovlm (global view first) | idefics3 (SmolVLM's)",
    "vlm_extra_tokens_in_vocab": "the tokenizer's vocabulary already holds the extra tokens (Idefics3 / SmolVLM); none are appended",
    "vlm_image_token_id": "id of the image token (none: lm_base_vocab_size + its position in vlm_extra_tokens)",
    "vlm_image_splitting": "cut images larger than a tile into tiles plus a global view (false: one tile per image)",
    "vlm_image_resample": "PIL filter the image processor resizes with: bicubic | lanczos (Idefics3's)",
    "vlm_load_backbone_weights": "load the vit_model_type / lm_model_type weights when building the model",
    "vlm_checkpoint_path": "kept from nanoVLM's config (nanovlm train writes to --out)",
    "hf_repo_name": "kept from nanoVLM's config (push_to_hub takes the repository id)",
}


def _derived_default(cfg: VLMConfig, name: str) -> bool:
    """True when the derived field holds the value __post_init__ would compute from scratch."""
    fresh = {
        "vit_inter_dim": 4 * cfg.vit_hidden_dim,
        "extra_token_amount": len(cfg.vlm_extra_tokens),
        "lm_vocab_size": cfg.lm_base_vocab_size + (0 if cfg.vlm_extra_tokens_in_vocab else len(cfg.vlm_extra_tokens)),
        "mp_image_token_length": (cfg.vit_grid // cfg.mp_pixel_shuffle_factor) ** 2,
        "vlm_image_token_id": None if cfg.vlm_extra_tokens_in_vocab else
        cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token"),
    }
    return getattr(cfg, name) == fresh[name]


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        warnings.warn(f"{what}: ignoring unknown keys {', '.join(unknown)}.", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}


COMPILE_SETTINGS = ("auto", "on", "off")


def _compile_setting(value: Any) -> str:
    """TrainConfig.compile: auto | on | off; the original nanoVLM's booleans (and their words) as on / off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in COMPILE_SETTINGS:
            return word
        if word in BOOL_WORDS:
            return "on" if BOOL_WORDS[word] else "off"
    raise ConfigError(f"compile must be one of auto, on, off (or true/false), got {value!r}.")


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
    # torch.compile of the training forward and backward: auto (on CUDA; off on CPU, where the
    # compile takes minutes for 5-10% off a 222M step: docs/benchmarks.md) | on | off.
    # The original's booleans are read as on / off.
    compile: str = "auto"
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
    threads: int = 0  # CPU threads; 0: the cores other programs leave free (runtime.Threads)
    init_from: str = ""  # start from this checkpoint (ours, nanoVLM's, or transformers Idefics3 / SmolVLM)
    packing: bool = False
    pack_length: int = 0  # 0: lm_max_length
    max_images_per_pack: int = 8
    multi_turn: bool = True  # the questions of an image as one sample (easy-VQA; file records sharing an image) ...
    max_turns: int = 0  # ... of at most this many questions (0: all of them)
    independent_turns: bool = False  # questions of one sample each see its image and themselves only
    # A from-scratch vision encoder first learns the data's answers through a readout of its own
    # (nanovlm.train.vision_warmup): auto (answer classes, or a bag of answer words for long
    # answers; skipped for a pretrained encoder) | answers | words | off.
    vision_warmup: str = "auto"
    vision_warmup_steps: int = 0  # 0: vision_warmup_epochs passes over the training images
    vision_warmup_epochs: float = 25.0
    vision_warmup_lr: float = 1e-3
    vision_warmup_batch_size: int = 64  # images per warm-up step (its own: not tied to batch_size)
    vision_warmup_extend: bool = True  # more cycles (up to 5x the steps) while the readout ends below 97%, within the time budget
    val_fraction: float = 0.05  # of the training samples held out (grouped by image) for validation
    val_size: int = 500  # at most this many held-out samples
    val_data: str = ""  # a separate validation file instead (nothing is held out then)
    eval_task: str = "auto"  # accuracy during and after training: auto (follows data) | val | easyvqa | none
    eval_limit: int = 0  # 0: the full test split at the end
    eval_interval_limit: int = 500  # questions per periodic accuracy check
    eval_batch_size: int = 64
    log_interval: int = 10
    wandb: bool = False
    max_epochs: float = 0.0  # passes over the training samples (0: max_training_steps decides)
    max_train_time: float = 0.0  # seconds for the warm-up and training together (0: no limit)
    streaming: bool = False  # read data files / hub data incrementally (an IterableDataset) instead of random access
    max_image_pixels: int = 64 * 1024 * 1024  # images with more pixels are skipped (decompression-bomb guard)
    image_shift: float = 0.0  # training tiles (warm-up and VLM stage) move by up to this share of their side
    # LoRA (nanovlm.models.lora): rank 0 trains the parts as their rates say; rank > 0 freezes the
    # vision encoder and the language model, trains low-rank adapters on `lora_targets` (at the rate
    # of the part they sit in) and the projector fully.
    lora_rank: int = 0
    lora_alpha: float | None = None  # the adapters' output is scaled by alpha / rank; none: 2 * lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "lm"  # comma-separated LORA_TARGETS / LORA_TARGET_GROUPS names

    def __post_init__(self) -> None:
        self.compile = _compile_setting(self.compile)
        _check(self.precision in ("auto", "fp32", "bf16"),
               f"precision must be one of auto, fp32, bf16, got {self.precision!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_training_steps", "vision_warmup_batch_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        _check(_is_int(self.max_turns) and self.max_turns >= 0,
               f"max_turns must be an integer >= 0 (0: all questions of an image), got {self.max_turns!r}.")
        _check(_is_int(self.threads) and self.threads >= 0,
               f"threads must be an integer >= 0 (0: the cores other programs leave free), got {self.threads!r}.")
        _check(_is_int(self.vision_warmup_steps) and self.vision_warmup_steps >= 0,
               f"vision_warmup_steps must be an integer >= 0 (0: from vision_warmup_epochs), "
               f"got {self.vision_warmup_steps!r}.")
        _check_types(self)
        for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone", "weight_decay"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}.")
        _check(self.vision_warmup in ("auto", "answers", "words", "off"),
               f"vision_warmup must be one of auto, answers, words, off, got {self.vision_warmup!r}.")
        _check(self.vision_warmup_epochs > 0, f"vision_warmup_epochs must be > 0, got {self.vision_warmup_epochs}.")
        _check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        _check(self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}.")
        _check(self.max_epochs >= 0, f"max_epochs must be >= 0 (0: no epoch budget), got {self.max_epochs}.")
        _check(self.max_train_time >= 0, f"max_train_time must be >= 0 seconds (0: no limit), "
                                         f"got {self.max_train_time}.")
        _check(self.vision_warmup_lr > 0, f"vision_warmup_lr must be > 0, got {self.vision_warmup_lr}.")
        _check(0.0 <= self.image_shift < 0.5,
               f"image_shift must be in [0, 0.5) (a share of the tile's side), got {self.image_shift}.")
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        self._check_lora()

    def _check_lora(self) -> None:
        _check(self.lora_rank >= 0, f"lora_rank must be an integer >= 0 (0: no LoRA), got {self.lora_rank}.")
        _check(self.lora_alpha is None or self.lora_alpha > 0,
               f"lora_alpha must be > 0 (or none: 2 * lora_rank), got {self.lora_alpha}.")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        targets = lora_target_names(self.lora_targets)
        if self.lora_rank == 0:
            return
        for prefix, rate in (("lm_", "lr_language_backbone"), ("vit_", "lr_vision_backbone")):
            named = [t for t in targets if t.startswith(prefix)]
            _check(not named or getattr(self, rate) > 0,
                   f"lora_targets adapts {', '.join(named)} but {rate} (the adapters' learning rate) is 0; "
                   f"set {rate} > 0 or leave those targets out.")

    @property
    def lora_scale_alpha(self) -> float:
        """lora_alpha, or its default 2 * lora_rank."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**_known_fields(cls, data, "TrainConfig"))


# One line of meaning per TrainConfig field (`nanovlm train --list-settings` prints them).
TRAIN_HELP: dict[str, str] = {
    "lr_mp": "peak learning rate of the modality projector",
    "lr_vision_backbone": "peak learning rate of the vision transformer (0: frozen)",
    "lr_language_backbone": "peak learning rate of the language model (0: frozen)",
    "batch_size": "samples (or packed rows) per micro-batch and process",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_training_steps": "optimizer steps of the run",
    "eval_interval": "steps between validation-loss and accuracy checks (0: none during training)",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "compile": "torch.compile the training forward and backward: auto (on CUDA, off on CPU), on or off",
    "data": "training data: easyvqa, a Cauldron parquet/arrow/save_to_disk dir/hub name, or LLaVA .json/.jsonl",
    "image_folder": "folder LLaVA image paths are relative to (none: the data file's folder)",
    "seed": "seed of the initialisation, the data order and the validation split",
    "save_interval": "steps between checkpoints (0: only at the end)",
    "keep_last": "step checkpoints kept besides the best one",
    "precision": "auto (bf16 where the hardware has fast bf16 matmuls), fp32 or bf16",
    "strict": "a broken sample is an error instead of a counted skip",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps with a linear learning-rate warm-up, in [0, 1)",
    "min_lr_ratio": "the cosine schedule ends at this fraction of each peak learning rate",
    "num_workers": "DataLoader worker processes (0: load in the training process)",
    "threads": "CPU threads of the training process (0: OMP_NUM_THREADS if set, else the cores that other "
               "programs leave free, followed during the run; set N for bit-exact repeats)",
    "init_from": "start from this checkpoint's model and weights: a directory of ours, of the original nanoVLM, "
                 "or a transformers Idefics3 / SmolVLM one (or a hub id when online); the preset's model settings "
                 "are then unused, the config file's and command line's still apply",
    "packing": "pack several samples into each row (attention stays within each sample)",
    "pack_length": "tokens per packed row (0: lm_max_length)",
    "max_images_per_pack": "most image tiles in one packed row (0: no cap)",
    "multi_turn": "the questions of one image as one sample: easy-VQA's, and file records that share an image "
                  "(merged while they fit in a row)",
    "max_turns": "most questions per merged sample (0: all of an image's questions; a record is never split)",
    "independent_turns": "each question of a sample sees its image and itself only, not earlier turns",
    "vision_warmup": "first teach a from-scratch vision encoder the data's answers: auto | answers | words | off",
    "vision_warmup_steps": "steps of the vision warm-up (0: vision_warmup_epochs passes over the images)",
    "vision_warmup_epochs": "passes over the training images of the vision warm-up",
    "vision_warmup_lr": "learning rate of the vision warm-up",
    "vision_warmup_batch_size": "images per vision warm-up step",
    "vision_warmup_extend": "run the warm-up's schedule again (up to 5x its steps in all, within 60% of max_train_time) while its readout's "
                            "accuracy on its training batches ends below 97%",
    "val_fraction": "share of the training samples held out (grouped by image) for validation",
    "val_size": "at most this many held-out validation samples",
    "val_data": "a separate validation file instead of a held-out part",
    "eval_task": "accuracy during and after training: auto (easyvqa's test split for easyvqa, else val) | val | easyvqa | none",
    "eval_limit": "questions of the final accuracy check (0: all of them)",
    "eval_interval_limit": "questions of each periodic accuracy check",
    "eval_batch_size": "questions answered together during accuracy checks",
    "log_interval": "steps between log lines and metrics.jsonl records",
    "wandb": "mirror the metrics to Weights & Biases",
    "max_epochs": "at most this many passes over the training samples (0: max_training_steps decides)",
    "max_train_time": "seconds for the vision warm-up and training together; the step count is cut to fit (0: no limit)",
    "streaming": "read data files / hub data incrementally instead of with random access",
    "max_image_pixels": "images with more pixels are skipped (a decompression-bomb guard)",
    "image_shift": "each training tile (vision warm-up and VLM stage) moves by a random offset of up to this share "
                   "of its side along each axis, its border filled with edge pixels; validation never (0: off)",
    "lora_rank": "rank of LoRA adapters: > 0 trains only adapters (+ the projector) on frozen towers (0: off)",
    "lora_alpha": "LoRA adapters' outputs are scaled by lora_alpha / lora_rank (none: 2 * lora_rank, a scale of 2)",
    "lora_dropout": "dropout on the LoRA adapters' input, in [0, 1)",
    "lora_targets": "layers LoRA adapts, comma-separated: lm_q,lm_k,lm_v,lm_o,lm_gate,lm_up,lm_down,vit_qkv,"
                    "vit_out,vit_fc1,vit_fc2 or groups lm_attn, lm_mlp, lm, vit, all",
}


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
    # The default: sized for a 2-core CPU and any data of a few thousand images. 64 px images,
    # 8 px patches -> 8x8 grid, shuffle 2 -> 16 tokens; both towers from scratch (7.2M parameters,
    # 6.3M of them the SmolLM2-vocabulary embedding), the real SmolLM2 tokenizer. The vision
    # warm-up first teaches the encoder the data's answers (28 passes over the images, more while it has not learned them); then the
    # VLM trains for at most 1,000 steps of 64 samples packed into 256-token rows (fewer: 40
    # passes over the data), and warm-up + training stop within 15 minutes whatever the data's
    # size (measurements in docs/benchmarks.md, "Learning from any data").
    "small": {
        "model": dict(
            vit_hidden_dim=128, vit_patch_size=8, vit_img_size=64, vit_n_heads=4, vit_n_blocks=2,
            vit_model_type="", vit_pixel_mean=0.5, vit_pixel_std=0.5, vit_hidden_act="gelu",
            lm_hidden_dim=128, lm_inter_dim=384, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_model_type="",
            lm_init_std=0.08,  # ~ 128 ** -0.5; with 0.02 the image reached the answers far later
            lm_tokenizer="packaged:smollm2-135m", mp_pixel_shuffle_factor=2, max_img_size=64, lm_max_length=512,
            vlm_load_backbone_weights=False,
        ),
        # The ViT at 3e-4 in the VLM stage (1e-3 undid the warm-up's work on easy-VQA). The questions
        # of a sample as independent branches: `answer()` asks them one at a time, and a model
        # trained on conversations of questions in a fixed order answered a question asked alone
        # at 19% (docs/benchmarks.md, "Learning from any data").
        "train": dict(lr_mp=1e-3, lr_vision_backbone=3e-4, lr_language_backbone=1e-3, batch_size=64,
                      max_training_steps=1000, max_epochs=40, max_train_time=900, eval_interval=400,
                      eval_interval_limit=200, weight_decay=0.01, packing=True, pack_length=256, warmup_ratio=0.03,
                      multi_turn=True, max_turns=3, independent_turns=True, vision_warmup="auto",
                      vision_warmup_epochs=28, vision_warmup_lr=1e-3,
                      # Drawn scenes: 67% -> 90% held-out counting in the warm-up (docs/benchmarks.md).
                      image_shift=0.05),
    },
    # The default on the packaged easy-VQA data: an image's questions as conversations of up to 3
    # turns (one ViT pass per 3 questions; the easy-VQA loader groups them); accuracy on its own
    # test split; only 2% of the training images held out for the validation loss.
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
                      max_training_steps=300, eval_interval=150, eval_interval_limit=200,
                      multi_turn=True, max_turns=3, packing=True, pack_length=256, warmup_ratio=0.03,
                      vision_warmup="answers", vision_warmup_lr=1e-3),
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
                      lr_vision_backbone=1e-3, lr_language_backbone=1e-3, vision_warmup="off"),
    },
}

# The small preset on the packaged easy-VQA data (what `nanovlm train` alone runs, named).
PRESETS["easyvqa"] = {"model": dict(PRESETS["small"]["model"]), "train": {**PRESETS["small"]["train"], "data": "easyvqa"}}
DEFAULT_PRESET = "small"

# One line per preset for `nanovlm train --list-settings` and `--help` (the comments above say
# where the numbers come from).
PRESET_DESCRIPTIONS: dict[str, str] = {
    "nanovlm-222m": "the original nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M (downloads both)",
    "nanovlm-460m": "nanoVLM-460M: SigLIP2-B/16-512 + SmolLM2-360M-Instruct (downloads both)",
    "small": "7.2M parameters from scratch, sized for a 2-core CPU and any data of a few thousand images",
    "easyvqa": "the small preset on the packaged easy-VQA data (what make demo trains)",
    "easyvqa-smollm2": "easy-VQA with the packaged SmolLM2-135M frozen and a ViT from scratch",
    "tiny": "the smallest model (32x32 images, 4 image tokens, 2 + 2 blocks) for tests",
}
