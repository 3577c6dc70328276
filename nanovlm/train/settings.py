"""Resolving a run's settings: preset < config file (YAML/JSON) < `key=value` overrides.

Every key is checked against the VLMConfig and TrainConfig fields, and every value against the
field's type, before a config is built, so a typo fails with a sentence that names it instead of
silently training something else. `key=value` text is parsed to the field's type (int, float,
bool as true/false, str; None as none/null where the field allows it; JSON for dicts).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any

from nanovlm.config import PRESETS, ConfigError, TrainConfig, VLMConfig

_SECTIONS = {"model": VLMConfig, "train": TrainConfig}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _owner(key: str) -> str:
    """'model' or 'train' for a known key; ConfigError naming the key otherwise."""
    for section, cls in _SECTIONS.items():
        if key in _field_types(cls):
            return section
    known = [k for cls in _SECTIONS.values() for k in _field_types(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown setting {key!r}: it is neither a VLMConfig nor a TrainConfig field.{hint}")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); X -> (X, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    base = typing.get_origin(tp) or tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(base, str(tp))


def check_value(key: str, value: Any, tp: Any, source: str) -> Any:
    """A value from a preset or a config file, checked against the field type (ints become floats
    for float fields); ConfigError naming the key otherwise."""
    base, optional = _split_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(base) or base
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }.get(origin, lambda v: True)(value)
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(base)}, got {value!r} in {source}.")
    return float(value) if origin is float else value


def parse_value(key: str, text: str, tp: Any) -> Any:
    """The text of a `key=value` override parsed to the field's type."""
    base, optional = _split_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError
            return lowered == "true"
        if origin is int:
            return int(text)
        if origin is float:
            return float(text)
        if origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(f"{key} must be {_type_name(base)}, got {text!r} on the command line.") from None
    return text


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """A YAML or JSON file -> {"model": {...}, "train": {...}}. The file may hold `model` and
    `train` sections, flat keys, or both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist.")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}.")
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"section {key!r} in config file {path} must be a mapping.")
            for k, v in value.items():
                if _owner(k) != key:
                    raise ConfigError(f"{k!r} in section {key!r} of {path} belongs in section {_owner(k)!r}.")
                out[key][k] = v
        else:
            out[_owner(key)][key] = value
    return out


def parse_overrides(overrides: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. batch_size=16).")
        section = _owner(key)
        out[section][key] = parse_value(key, text, _field_types(_SECTIONS[section])[key])
    return out


def resolve(preset: str | None, config_file: str | None = None, overrides: list[str] | None = None,
            base: dict[str, dict[str, Any]] | None = None) -> tuple[VLMConfig, TrainConfig]:
    """The run's (VLMConfig, TrainConfig). `base` (a saved run's config.json) replaces the preset."""
    if base is None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        layers = [(f"preset {preset!r}", {s: dict(PRESETS[preset].get(s, {})) for s in _SECTIONS})]
    else:
        layers = [("the saved run config", {s: dict(base.get(s, {})) for s in _SECTIONS})]
    if config_file:
        layers.append((f"config file {config_file}", load_config_file(config_file)))
    layers.append(("the command line", parse_overrides(overrides)))

    merged: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for source, layer in layers:
        for section, values in layer.items():
            hints = _field_types(_SECTIONS[section])
            for key, value in values.items():
                if key not in hints:
                    raise ConfigError(f"unknown setting {key!r} in {source}.")
                merged[section][key] = check_value(key, value, hints[key], source)
    model = merged["model"]
    if base is not None:
        # Derived fields were saved resolved; recompute them when what they derive from changed.
        saved = VLMConfig.from_dict(base.get("model", {}))
        return saved.replace(**{k: v for k, v in model.items() if base["model"].get(k) != v}), \
            TrainConfig(**merged["train"])
    return VLMConfig(**model), TrainConfig(**merged["train"])


def to_dict(vlm_cfg: VLMConfig, train_cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The resolved configs as saved in the run folder's config.json."""
    return {"model": dataclasses.asdict(vlm_cfg), "train": dataclasses.asdict(train_cfg)}
