"""Configuration: VLMConfig (the model blueprint), TrainConfig (the run), and PRESETS.

Plain data, no torch import; field names follow the nanoVLM tutorial, so its `config.json` loads unchanged.
`setting(default, help, **rule)` writes each setting once, for `--help`, `--list-settings` and the checks.
TrainConfig holds the recipe's and LoRA's knobs as groups; users still type their flat names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

# The label of a position that gets no loss (PyTorch's `cross_entropy` default).
IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_extra_tokens() -> dict[str, str]:
    """The 66 tokens the original nanoVLM adds: image, global image, and an 8x8 grid of tile tags."""
    tiles = {f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)}
    return {"image_token": "<|image|>", "global_image_token": "<|global_image|>", **tiles}


# Idefics3's (SmolVLM's) image tokens, and a model from scratch laid out as transformers, vLLM and
# llama.cpp lay it out: tiles between fake tokens with row/column tags, the global view last.
IDEFICS3_LAYOUT = dict(vlm_image_layout="idefics3", vlm_image_resample="lanczos", vlm_extra_tokens={
    "image_token": "<image>", "global_image_token": "<global-img>", "fake_image_token": "<fake_token_around_image>",
    **{f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)}})

# vit_hidden_act -> the `approximate` argument of torch's GELU (the names are transformers').
VIT_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
# The linear layers LoRA can adapt, and group names for several at once (`nanovlm.models.lora`).
LORA_TARGETS = ("lm_q", "lm_k", "lm_v", "lm_o", "lm_gate", "lm_up", "lm_down",
                "vit_qkv", "vit_out", "vit_fc1", "vit_fc2")
LORA_TARGET_GROUPS = {"lm_attn": LORA_TARGETS[:4], "lm_mlp": LORA_TARGETS[4:7], "lm": LORA_TARGETS[:7],
                      "vit": LORA_TARGETS[7:], "all": LORA_TARGETS}
COMPILE_SETTINGS = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def setting(default: Any, help: str, **rule: Any) -> Any:
    """A field with its help and its rule (choices, min, below, gt, note) in the metadata."""
    kind = "default_factory" if callable(default) else "default"
    return field(**{kind: default}, metadata={"help": help, **rule})


def group(cls: type, help: str) -> Any:
    """A field holding a group of settings (their flat names are TrainConfig's settings)."""
    return field(default_factory=cls, metadata={"help": help, "group": cls})


# Booleans written as text (command line, `data preview`), any case; None as none/null.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
NONE_WORDS = ("none", "null")


@functools.cache
def _own_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


@functools.cache
def setting_fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """name -> (type, field) of every setting of a config class, a group's settings in its place."""
    out = {}
    for f in fields(cls):
        if "group" in f.metadata:
            out.update(setting_fields(f.metadata["group"]))
        else:
            out[f.name] = (_own_types(cls)[f.name], f)
    return out


def field_types(cls: type) -> dict[str, Any]:
    return {name: tp for name, (tp, _) in setting_fields(cls).items()}


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
    """`value` as field `name` of type `tp` stores it (numpy ints as int); a ConfigError naming it otherwise."""
    base, optional = _split_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(base) or base
    if origin is int and _is_int(value):
        return int(value)
    if origin is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if origin in (bool, str) and isinstance(value, origin):
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
            value: Any = BOOL_WORDS[text.strip().lower()]
        elif origin in (int, float):
            value = origin(text)
        else:
            value = json.loads(text) if origin is dict else text
        return check_value(name, value, tp, where)
    except (ValueError, KeyError):  # ConfigError included: name the text as the user wrote it
        expected = _expected(base) + (" (or yes/no, on/off, 1/0)" if origin is bool else "")
        raise ConfigError(f"{name} must be {expected}, got {text!r}{where}.") from None


def _rule(base: Any, meta: Any) -> str | None:
    """A field's rule in words ("a positive integer", "in [0, 1)", ...), or None without one."""
    note = f" {meta['note']}" if "note" in meta else ""
    if "choices" in meta:
        return f"one of {', '.join(meta['choices'])}" + note
    if "min" in meta and "below" in meta:
        return f"in [{meta['min']}, {meta['below']})" + note
    if "min" in meta:
        kind = "a positive integer" if meta["min"] == 1 else f"an integer >= {meta['min']}"
        return (kind if base is int else f">= {meta['min']}") + note
    return f"> {meta['gt']}" + note if "gt" in meta else None


def _within(value: Any, meta: Any) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    return (value >= meta.get("min", value) and ("below" not in meta or value < meta["below"])
            and ("gt" not in meta or value > meta["gt"]))


def check_fields(cfg: Any) -> None:
    """Every field of a config dataclass against its type and its rule, stored as checked."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if "group" in f.metadata:
            _check(isinstance(value, f.metadata["group"]), f"{f.name} must be a {f.metadata['group'].__name__}.")
            continue
        base, optional = _split_optional(_own_types(type(cfg))[f.name])
        rule = _rule(base, f.metadata)
        if value is None and optional:
            continue
        if base is int and rule:  # one sentence for a wrong type and a wrong value
            _check(_is_int(value) and _within(value, f.metadata), f"{f.name} must be {rule}, got {value!r}.")
        value = check_value(f.name, value, base)
        _check(rule is None or _within(value, f.metadata), f"{f.name} must be {rule}, got {value!r}.")
        object.__setattr__(cfg, f.name, value)


def lora_target_names(text: str) -> tuple[str, ...]:
    """`lora_targets` text (comma-separated LORA_TARGETS and group names) -> the targets it covers."""
    chosen: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name not in LORA_TARGET_GROUPS and name not in LORA_TARGETS:
            raise ConfigError(f"lora_targets: unknown target {name!r}; choose from "
                              f"{', '.join(LORA_TARGETS)} or the groups {', '.join(LORA_TARGET_GROUPS)}.")
        chosen.update(LORA_TARGET_GROUPS.get(name, (name,)))
    return tuple(t for t in LORA_TARGETS if t in chosen)


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = setting_fields(cls)
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        warnings.warn(f"{what}: ignoring unknown keys {', '.join(unknown)}.", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}


DERIVED = ("vit_inter_dim", "extra_token_amount", "lm_vocab_size", "mp_image_token_length", "vlm_image_token_id")


@dataclass
class VLMConfig:
    # --- vision transformer ---
    vit_hidden_dim: int = setting(768, "width of the vision transformer's token vectors", min=1)
    vit_inter_dim: int | None = setting(None, "width of the ViT MLP's hidden layer (none: 4 * vit_hidden_dim)")
    vit_patch_size: int = setting(16, "side in pixels of the square patches a tile is cut into", min=1)
    vit_img_size: int = setting(224, "side in pixels of the square tile the ViT reads", min=1)
    vit_n_heads: int = setting(12, "attention heads per ViT block (must divide vit_hidden_dim)", min=1)
    vit_dropout: float = setting(0.0, "dropout probability inside the ViT", min=0, below=1)
    vit_n_blocks: int = setting(12, "number of ViT blocks", min=1)
    vit_ln_eps: float = setting(1e-6, "epsilon of the ViT's layer norms")
    vit_cls_flag: bool = setting(False, "the ViT returns one CLS vector per image instead of every patch")
    vit_hidden_act: str = setting("gelu_pytorch_tanh", "the MLP's GELU: gelu_pytorch_tanh (SigLIP's) or gelu (exact, "
                                  "faster on CPUs)", choices=tuple(VIT_ACTIVATIONS))
    vit_model_type: str = setting("google/siglip-base-patch16-224", "pretrained ViT: SigLIP dir or hub id ('': none)")
    vit_pixel_mean: float | None = setting(None, "the ViT reads (pixels - mean) / std (none: raw [0, 1] pixels)")
    vit_pixel_std: float | None = setting(None, "see vit_pixel_mean; set both or neither", gt=0)
    # --- language model ---
    lm_hidden_dim: int = setting(576, "width of the language model's token vectors", min=1)
    lm_inter_dim: int = setting(1536, "width of the LM MLP's hidden layer", min=1)
    lm_rms_eps: float = setting(1e-5, "epsilon of the LM's RMS norms")
    lm_re_base: float = setting(100000.0, "base (theta) of the LM's rotary position embedding")
    lm_max_position_embeddings: int = setting(8192, "positions the LM's rotary tables cover", min=1)
    lm_base_vocab_size: int = setting(49152, "tokens in the tokenizer before the extra tokens", min=1)
    extra_token_amount: int | None = setting(None, "number of extra tokens (none: len(vlm_extra_tokens))")
    lm_vocab_size: int | None = setting(None, "rows of the LM's embedding (none: base vocabulary + extra tokens)")
    lm_n_heads: int = setting(9, "query heads per LM block (must divide lm_hidden_dim)", min=1)
    lm_n_kv_heads: int = setting(3, "key/value heads per LM block, grouped-query attention", min=1)
    lm_dropout: float = setting(0.0, "dropout probability inside the LM", min=0, below=1)
    lm_init_std: float = setting(0.02, "init std of the LM blocks' projections (~ lm_hidden_dim ** -0.5)", gt=0)
    lm_n_blocks: int = setting(30, "number of LM blocks", min=1)
    lm_attn_scaling: float = setting(1.0, "factor on the rotary cos/sin tables (1.0: plain RoPE)")
    lm_max_length: int = setting(1024, "longest token sequence in training and generation", min=1)
    lm_use_tokens: bool = setting(False, "the LM alone reads token ids and returns logits (false inside the VLM)")
    lm_tie_weights: bool = setting(True, "the LM head shares the token-embedding matrix")
    lm_model_type: str = setting("HuggingFaceTB/SmolLM2-135M-Instruct", "pretrained LM: a Llama directory, .gguf, "
                                 "packaged:smollm2-135m or hub id")
    lm_tokenizer: str = setting("HuggingFaceTB/SmolLM2-135M-Instruct", "tokenizer: a directory, .gguf, "
                                "packaged:smollm2-135m or hub id")
    lm_chat_template: str = setting(CHATML_TEMPLATE, "Jinja chat template that lays out a conversation (ChatML)")
    lm_eos_token_id: int = setting(2, "token id that ends an answer (<|im_end|> in the SmolLM2 tokenizers)")
    # --- modality projector ---
    mp_pixel_shuffle_factor: int = setting(2, "the projector merges factor x factor neighbouring patches", min=1)
    mp_image_token_length: int | None = setting(None, "tokens per tile (none: from the patch grid and shuffle)")
    # --- image processing ---
    max_img_size: int = setting(224, "longest image side; larger images become tiles plus a global view", min=0,
                                note="(0: fitted to the training pictures when a run starts)")
    resize_to_max_side_len: bool = setting(False, "always resize the long side to max_img_size")
    # --- vision-language model ---
    vlm_extra_tokens: dict[str, str] = setting(default_extra_tokens, "tokens added to the tokenizer, name -> text")
    vlm_image_layout: str = setting("nanovlm", "prompt and tile layout: nanovlm | idefics3 (SmolVLM's)",
                                    choices=("nanovlm", "idefics3"))
    vlm_extra_tokens_in_vocab: bool = setting(False, "the tokenizer already holds the extra tokens (SmolVLM)")
    vlm_image_token_id: int | None = setting(None, "id of the image token (none: after the base vocabulary)", min=0)
    vlm_image_splitting: bool = setting(True, "cut images larger than a tile into tiles plus a global view")
    vlm_image_resample: str = setting("bicubic", "PIL filter the image processor resizes with",
                                      choices=("bicubic", "lanczos"))
    vlm_load_backbone_weights: bool = setting(True, "load the vit_model_type / lm_model_type weights on build")
    vlm_checkpoint_path: str = setting("checkpoints", "kept from nanoVLM's config (nanovlm train writes to --out)")
    hf_repo_name: str = setting("nanoVLM", "kept from nanoVLM's config (push_to_hub takes the repository id)")

    def __post_init__(self) -> None:
        check_fields(self)
        _check("image_token" in self.vlm_extra_tokens, "vlm_extra_tokens must be a dict that contains at least "
               f"'image_token', got {self.vlm_extra_tokens!r}.")
        _check((self.vit_pixel_mean is None) == (self.vit_pixel_std is None),
               "vit_pixel_mean and vit_pixel_std must be set together (or both left unset).")
        for part, whole in (("vit_n_heads", "vit_hidden_dim"), ("vit_patch_size", "vit_img_size"),
                            ("lm_n_heads", "lm_hidden_dim"), ("lm_n_kv_heads", "lm_n_heads")):
            _check(getattr(self, whole) % getattr(self, part) == 0,
                   f"{part} ({getattr(self, part)}) must divide {whole} ({getattr(self, whole)}).")
        grid = self.vit_grid
        _check(grid % self.mp_pixel_shuffle_factor == 0, f"mp_pixel_shuffle_factor ({self.mp_pixel_shuffle_factor}) "
               f"must divide the patch grid side vit_img_size / vit_patch_size = {grid}.")
        _check(self.lm_head_dim % 2 == 0, f"the head dimension lm_hidden_dim / lm_n_heads = {self.lm_head_dim} "
               "must be even for rotary embeddings.")
        _check(self.vlm_image_token_id is not None or not self.vlm_extra_tokens_in_vocab,
               "vlm_extra_tokens_in_vocab needs vlm_image_token_id: the id of the image token in the tokenizer.")
        derived = self._derived()
        for name, value in derived.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        tokens, needed, n_extra = derived["mp_image_token_length"], derived["lm_vocab_size"], len(self.vlm_extra_tokens)
        _check(self.mp_image_token_length == tokens, f"mp_image_token_length is {self.mp_image_token_length} but "
               f"the image gives ({grid} / {self.mp_pixel_shuffle_factor})^2 = {tokens} tokens; leave it unset to "
               "derive it.")
        _check(self.extra_token_amount == n_extra,
               f"extra_token_amount is {self.extra_token_amount} but vlm_extra_tokens has {n_extra} entries.")
        _check(self.lm_vocab_size >= needed, f"lm_vocab_size ({self.lm_vocab_size}) is smaller than "
               f"lm_base_vocab_size + extra tokens ({self.lm_base_vocab_size} + {n_extra} = {needed}).")
        _check(self.lm_max_length <= self.lm_max_position_embeddings, f"lm_max_length ({self.lm_max_length}) "
               f"exceeds lm_max_position_embeddings ({self.lm_max_position_embeddings}).")
        _check(self.vlm_image_token_id < self.lm_vocab_size, f"vlm_image_token_id ({self.vlm_image_token_id}) is "
               f"outside the vocabulary of {self.lm_vocab_size} tokens.")

    def _derived(self) -> dict[str, Any]:
        """What __post_init__ derives each of DERIVED as, from the rest."""
        extra = len(self.vlm_extra_tokens)
        return {"vit_inter_dim": 4 * self.vit_hidden_dim, "extra_token_amount": extra,
                "lm_vocab_size": self.lm_base_vocab_size + (0 if self.vlm_extra_tokens_in_vocab else extra),
                "mp_image_token_length": (self.vit_grid // self.mp_pixel_shuffle_factor) ** 2,
                "vlm_image_token_id": None if self.vlm_extra_tokens_in_vocab else
                self.lm_base_vocab_size + list(self.vlm_extra_tokens).index("image_token")}

    @property
    def vit_grid(self) -> int:
        return self.vit_img_size // self.vit_patch_size

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

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
        return cls.from_dict({**get_preset(name)["model"], **overrides})

    def replace(self, **changes: Any) -> "VLMConfig":
        """A new config with `changes` applied and derived fields recomputed."""
        data, derived = self.to_dict(), self._derived()
        for name in DERIVED:
            if name not in changes and getattr(self, name) == derived[name]:
                data[name] = None
        return VLMConfig.from_dict({**data, **changes})


@dataclass
class RecipeConfig:
    """The from-scratch CPU recipe's knobs: its vision stage, image shifts, time budget, data sizing, threads."""
    vision_warmup: str = setting("auto", "the vision stage: auto (unless both towers start pretrained), on, off",
                                 choices=("auto", "on", "off"))
    vision_warmup_steps: int = setting(0, "steps of the vision stage", min=0, note="(0: from vision_warmup_epochs)")
    vision_warmup_epochs: float = setting(25.0, "passes over the training images of the vision stage", gt=0)
    vision_warmup_lr: float = setting(1e-3, "learning rate of the vision stage", gt=0)
    vision_warmup_batch_size: int = setting(64, "images per vision-stage step", min=1)
    vision_warmup_extend: bool = setting(True, "more cycles of the vision stage while its readout is below target")
    vlm_extend: bool = setting(True, "more VLM steps while the held-out loss still falls and the time budget has room")
    image_shift: float = setting(0.0, "training tiles move by up to this share of their side", min=0, below=0.5,
                                 note="(a share of the tile's side)")
    max_train_time: float = setting(0.0, "seconds for all stages; step counts are cut to fit", min=0,
                                    note="seconds (0: no limit)")
    max_epochs: float = setting(0.0, "at most this many passes over the samples", min=0, note="(0: no epoch budget)")
    fit_batch: bool = setting(True, "on small data, lower the batch sizes so that an epoch holds 4 steps")
    threads: int = setting(0, "CPU threads (0: the cores others leave free; N: bit-exact repeats)", min=0,
                           note="(0: the cores other programs leave free)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LoraConfig:
    """LoRA (`nanovlm.models.lora`): rank > 0 trains adapters (and the projector) on frozen towers."""
    lora_rank: int = setting(0, "rank of the LoRA adapters (0: no LoRA)", min=0, note="(0: no LoRA)")
    lora_alpha: float | None = setting(None, "adapters' scale: lora_alpha / lora_rank (none: 2 * lora_rank)", gt=0,
                                       note="(or none: 2 * lora_rank)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapters' input", min=0, below=1)
    lora_targets: str = setting("lm", "layers LoRA adapts, comma-separated: " + ",".join(LORA_TARGETS)
                                + " or groups " + ", ".join(LORA_TARGET_GROUPS))

    def __post_init__(self) -> None:
        check_fields(self)
        lora_target_names(self.lora_targets)

    @property
    def lora_scale_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass
class TrainConfig:
    # --- names kept from nanoVLM ---
    lr_mp: float = setting(2e-3, "peak learning rate of the modality projector", min=0)
    lr_vision_backbone: float = setting(5e-5, "peak learning rate of the vision transformer (0: frozen)", min=0)
    lr_language_backbone: float = setting(5e-5, "peak learning rate of the language model (0: frozen)", min=0)
    batch_size: int = setting(8, "samples (or packed rows) per micro-batch and process", min=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", min=1)
    max_training_steps: int = setting(1000, "optimizer steps of the run", min=1)
    eval_interval: int = setting(200, "steps between validation checks (0: none during training)", min=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", min=0)
    compile: str = setting("auto", "torch.compile the training step: auto (CUDA) | on | off", choices=COMPILE_SETTINGS)
    # --- added ---
    data: str = setting("", "training data: a packaged name, Cauldron parquet/arrow/dir/hub name, LLaVA .json(l)")
    image_folder: str | None = setting(None, "folder LLaVA image paths are relative to (none: the data file's)")
    seed: int = setting(0, "seed of the initialisation, the data order and the validation split")
    save_interval: int = setting(0, "steps between checkpoints (0: only at the end)", min=0)
    keep_last: int = setting(2, "step checkpoints kept besides the best one", min=0)
    precision: str = setting("auto", "auto (bf16 where matmuls are fast in it), fp32 or bf16", choices=PRECISIONS)
    strict: bool = setting(False, "a broken sample is an error instead of a counted skip")
    weight_decay: float = setting(0.0, "AdamW weight decay (matrices only)", min=0)
    warmup_ratio: float = setting(0.05, "share of the steps with a linear learning-rate warm-up", min=0, below=1)
    min_lr_ratio: float = setting(0.0, "the cosine schedule ends at this share of each peak learning rate")
    num_workers: int = setting(0, "DataLoader worker processes (0: load in the training process)", min=0)
    init_from: str = setting("", "start from this checkpoint (ours, nanoVLM's, Idefics3 / SmolVLM)")
    packing: bool = setting(False, "pack several samples into each row (attention stays within each sample)")
    pack_length: int = setting(0, "tokens per packed row (0: lm_max_length)", min=0)
    max_images_per_pack: int = setting(8, "most image tiles in one packed row (0: no cap)", min=0)
    multi_turn: bool = setting(True, "the questions of one image as one sample (records sharing an image merged)")
    max_turns: int = setting(0, "most questions per merged sample (0: all of an image's)", min=0,
                             note="(0: all questions of an image)")
    independent_turns: bool = setting(False, "each question of a sample sees its image and itself only")
    val_fraction: float = setting(0.05, "share of the samples held out (by image) for validation", min=0, below=1)
    val_size: int = setting(500, "at most this many held-out validation samples", min=0)
    val_data: str = setting("", "a separate validation file instead of a held-out part")
    eval_task: str = setting("auto", "accuracy measured: auto (the data's test split, else val) | test | val | none")
    eval_limit: int = setting(0, "questions of the final accuracy check (0: all of them)", min=0)
    eval_interval_limit: int = setting(500, "questions of each periodic accuracy check", min=0)
    eval_batch_size: int = setting(64, "questions answered together during accuracy checks", min=1)
    log_interval: int = setting(10, "steps between log lines and metrics.jsonl records", min=1)
    wandb: bool = setting(False, "mirror the metrics to Weights & Biases")
    data_weights: str = setting("", "with data=A,B,...: each source's share, comma-separated (none: by size)")
    max_image_pixels: int = setting(64 * 1024 * 1024, "images with more pixels are skipped (bombs)", min=1)
    recipe: RecipeConfig = group(RecipeConfig, "the from-scratch CPU recipe's settings")
    lora: LoraConfig = group(LoraConfig, "LoRA's settings")

    def __post_init__(self) -> None:
        self.compile = _compile_setting(self.compile)
        check_fields(self)
        self.source_weights()
        if self.lora.lora_rank:
            targets = lora_target_names(self.lora.lora_targets)
            for prefix, rate in (("lm_", "lr_language_backbone"), ("vit_", "lr_vision_backbone")):
                named = [t for t in targets if t.startswith(prefix)]
                _check(not named or getattr(self, rate) > 0, f"lora_targets adapts {', '.join(named)} but {rate} "
                       f"(the adapters' learning rate) is 0; set {rate} > 0 or leave those targets out.")

    def source_weights(self) -> list[float]:
        """data_weights as numbers, one per source of `data` (empty: none given)."""
        if not str(self.data_weights or "").strip():
            return []
        try:
            weights = [float(w) for w in str(self.data_weights).split(",")]
        except ValueError:
            raise ConfigError(f"data_weights must be numbers separated by commas (e.g. 2,1), got "
                              f"{self.data_weights!r}.") from None
        sources = [d for d in str(self.data or "").split(",") if d.strip()]
        _check(len(weights) == len(sources), f"data_weights gives {len(weights)} weight(s) for {len(sources)} "
               "source(s) in data; give one weight per source, in the order of data.")
        _check(all(w > 0 and math.isfinite(w) for w in weights), f"data_weights must all be above 0, got "
               f"{self.data_weights!r}; leave a source out of data instead of weighting it 0.")
        return weights

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat name (the layout of a run folder's config.json)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(dataclasses.asdict(value) if "group" in f.metadata else {f.name: value})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """From flat names (unknown keys: a warning); a group's settings go into the group."""
        data = _known_fields(cls, data, "TrainConfig")
        for f in fields(cls):
            if "group" in f.metadata:
                kind = f.metadata["group"]
                data[f.name] = kind(**{k: data.pop(k) for k in setting_fields(kind) if k in data})
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _compile_setting(value: Any) -> str:
    """TrainConfig.compile: auto | on | off; the original nanoVLM's booleans (and their words) as on / off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    word = value.strip().lower() if isinstance(value, str) else None
    if word in COMPILE_SETTINGS:
        return word
    if word in BOOL_WORDS:
        return "on" if BOOL_WORDS[word] else "off"
    raise ConfigError(f"compile must be one of auto, on, off (or true/false), got {value!r}.")


# Presets are data: name -> {"model": VLMConfig overrides, "train": TrainConfig overrides (flat names)}.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The original nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M, pixel shuffle 2 -> 7x7 = 49 tokens.
    "nanovlm-222m": {
        "model": dict(vit_hidden_dim=768, vit_patch_size=16, vit_img_size=224, vit_n_heads=12, vit_n_blocks=12,
                      vit_model_type="google/siglip-base-patch16-224", lm_hidden_dim=576, lm_inter_dim=1536,
                      lm_n_heads=9, lm_n_kv_heads=3, lm_n_blocks=30, lm_re_base=100000.0,
                      lm_model_type="HuggingFaceTB/SmolLM2-135M-Instruct",
                      lm_tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct", mp_pixel_shuffle_factor=2,
                      max_img_size=224, lm_max_length=1024),
        "train": dict(lr_mp=2e-3, lr_vision_backbone=5e-5, lr_language_backbone=5e-5),
    },
    # nanoVLM-460M (the original repository's config.py): SigLIP2-B/16-512 + SmolLM2-360M, shuffle 4 -> 64 tokens.
    "nanovlm-460m": {
        "model": dict(vit_hidden_dim=768, vit_patch_size=16, vit_img_size=512, vit_n_heads=12, vit_n_blocks=12,
                      vit_model_type="google/siglip2-base-patch16-512", lm_hidden_dim=960, lm_inter_dim=2560,
                      lm_n_heads=15, lm_n_kv_heads=5, lm_n_blocks=32, lm_re_base=100000.0,
                      lm_model_type="HuggingFaceTB/SmolLM2-360M-Instruct",
                      lm_tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct", mp_pixel_shuffle_factor=4,
                      max_img_size=1536, lm_max_length=4096),
        "train": dict(lr_mp=5e-3, lr_vision_backbone=5e-5, lr_language_backbone=5e-5),
    },
    # The default, tuned on easy-VQA and drawn scenes for a 2-core CPU and 15 minutes: 64 px tiles, 16 image
    # tokens, 7.2M parameters: the packaged encoder that reads (recipes/pretrain_vision.py), a language model
    # from scratch, the vision stage, then VLM steps on 256-token rows.
    # Questions as independent branches: `answer()` asks them one at a time.
    "small": {
        "model": dict(vit_hidden_dim=128, vit_patch_size=8, vit_img_size=64, vit_n_heads=4, vit_n_blocks=2,
                      vit_model_type="packaged:small-vit", vit_pixel_mean=0.5, vit_pixel_std=0.5, lm_hidden_dim=128,
                      lm_inter_dim=384, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_model_type="",
                      lm_init_std=0.08, lm_tokenizer="packaged:smollm2-135m", mp_pixel_shuffle_factor=2, max_img_size=0,
                      lm_max_length=512, vlm_load_backbone_weights=True, **IDEFICS3_LAYOUT),
        "train": dict(lr_mp=1e-3, lr_vision_backbone=3e-4, lr_language_backbone=1e-3, batch_size=64,
                      max_training_steps=1000, max_epochs=40, max_train_time=900, eval_interval=400,
                      eval_interval_limit=200, weight_decay=0.01, packing=True, pack_length=256, warmup_ratio=0.03,
                      multi_turn=True, max_turns=3, independent_turns=True, vision_warmup="auto",
                      vision_warmup_epochs=28, vision_warmup_lr=1e-3, image_shift=0.05),
    },
    # The packaged SmolLM2-135M-Instruct frozen, the small preset's ViT from scratch; the projector learns to feed it.
    "easyvqa-smollm2": {
        "model": dict(vit_hidden_dim=128, vit_patch_size=8, vit_img_size=64, vit_n_heads=4, vit_n_blocks=2,
                      vit_model_type="", vit_pixel_mean=0.5, vit_pixel_std=0.5, vit_hidden_act="gelu",
                      lm_hidden_dim=576, lm_inter_dim=1536, lm_n_heads=9, lm_n_kv_heads=3, lm_n_blocks=30,
                      lm_model_type="packaged:smollm2-135m", lm_tokenizer="packaged:smollm2-135m",
                      mp_pixel_shuffle_factor=2, max_img_size=64, lm_max_length=512, vlm_load_backbone_weights=True),
        "train": dict(data="easyvqa", lr_mp=1e-3, lr_vision_backbone=3e-4, lr_language_backbone=0.0, batch_size=16,
                      max_training_steps=300, eval_interval=150, eval_interval_limit=200,
                      multi_turn=True, max_turns=3, packing=True, pack_length=256, warmup_ratio=0.03,
                      vision_warmup="on", vision_warmup_lr=1e-3),
    },
    # A few-thousand-parameter model for tests: 32x32 images, 8px patches, shuffle 2 -> 4 tokens.
    "tiny": {
        "model": dict(vit_hidden_dim=32, vit_patch_size=8, vit_img_size=32, vit_n_heads=2, vit_n_blocks=2,
                      vit_model_type="", lm_hidden_dim=64, lm_inter_dim=128, lm_n_heads=4, lm_n_kv_heads=2,
                      lm_n_blocks=2, lm_model_type="", lm_tokenizer="packaged:smollm2-135m",
                      mp_pixel_shuffle_factor=2, max_img_size=32, lm_max_length=256, vlm_load_backbone_weights=False),
        "train": dict(batch_size=4, max_training_steps=10, eval_interval=5, lr_mp=1e-3,
                      lr_vision_backbone=1e-3, lr_language_backbone=1e-3, vision_warmup="off"),
    },
}
# The small preset on the packaged easy-VQA data (what `nanovlm train` alone runs, named).
PRESETS["easyvqa"] = {"model": dict(PRESETS["small"]["model"]),
                      "train": {**PRESETS["small"]["train"], "data": "easyvqa"}}
DEFAULT_PRESET = "easyvqa"

PRESET_DESCRIPTIONS: dict[str, str] = {
    "nanovlm-222m": "the original nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M (downloads both)",
    "nanovlm-460m": "nanoVLM-460M: SigLIP2-B/16-512 + SmolLM2-360M-Instruct (downloads both)",
    "small": "7.2M parameters, a packaged encoder that reads and a language model from scratch, sized for "
             "a 2-core CPU and any data of a few thousand images",
    "easyvqa": "the small preset on the packaged easy-VQA data (what make demo trains)",
    "easyvqa-smollm2": "easy-VQA with the packaged SmolLM2-135M frozen and a ViT from scratch",
    "tiny": "the smallest model (32x32 images, 4 image tokens, 2 + 2 blocks) for tests",
}


def preset_lines() -> list[str]:
    width = max(len(name) for name in PRESETS)
    return [f"  {name.ljust(width)}  {PRESET_DESCRIPTIONS[name]}" + (" (the default)" if name == DEFAULT_PRESET else "")
            for name in PRESETS]
