"""Resolving a run's settings: preset < config file (YAML/JSON) < `key=value` overrides.

Every key is checked against the VLMConfig and TrainConfig fields, and every value against the
field's type, before a config is built, so a typo fails with a sentence that names it instead of
silently training something else. The values themselves go through config.py's one parser:
`parse_value` for `key=value` text (int, float, str; a boolean as true/false, yes/no, on/off or
1/0; None as none/null where the field allows it; JSON for dicts), `check_value` for the typed
values of presets and files. `describe_settings` is `nanovlm train --list-settings`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any

from nanovlm.config import (PRESET_DESCRIPTIONS, PRESETS, TRAIN_HELP, VLM_HELP, ConfigError, TrainConfig,
                            VLMConfig, check_value, field_types, get_preset, parse_value)

_SECTIONS = {"model": VLMConfig, "train": TrainConfig}


def _owner(key: str) -> str:
    """'model' or 'train' for a known key; ConfigError naming the key otherwise."""
    for section, cls in _SECTIONS.items():
        if key in field_types(cls):
            return section
    known = [k for cls in _SECTIONS.values() for k in field_types(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown setting {key!r}: it is neither a VLMConfig nor a TrainConfig field.{hint}")


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
        out[section][key] = parse_value(key, text, field_types(_SECTIONS[section])[key])
    return out


def resolve(preset: str | None, config_file: str | None = None, overrides: list[str] | None = None,
            base: dict[str, dict[str, Any]] | None = None) -> tuple[VLMConfig, TrainConfig]:
    """The run's (VLMConfig, TrainConfig). `base` (a saved run's config.json) replaces the preset."""
    if base is None:
        layers = [(f"preset {preset!r}", {s: dict(get_preset(preset).get(s, {})) for s in _SECTIONS})]
    else:
        layers = [("the saved run config", {s: dict(base.get(s, {})) for s in _SECTIONS})]
    if config_file:
        layers.append((f"config file {config_file}", load_config_file(config_file)))
    layers.append(("the command line", parse_overrides(overrides)))

    merged: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    explicit: set[str] = set()  # model settings from a config file or the command line
    for k, (source, layer) in enumerate(layers):
        if k > 0:
            explicit |= set(layer.get("model", {}))
        for section, values in layer.items():
            hints = field_types(_SECTIONS[section])
            for key, value in values.items():
                if key not in hints:
                    raise ConfigError(f"unknown setting {key!r} in {source}.")
                merged[section][key] = check_value(key, value, hints[key], f" in {source}")
    model = merged["model"]
    if base is not None:
        # Derived fields were saved resolved; recompute them when what they derive from changed.
        saved = VLMConfig.from_dict(base.get("model", {}))
        return saved.replace(**{k: v for k, v in model.items() if base["model"].get(k) != v}), \
            TrainConfig(**merged["train"])
    train = TrainConfig(**merged["train"])
    if train.init_from:  # the checkpoint's model, with what the user set on top of it
        from nanovlm.weights.nanovlm import checkpoint_config

        return checkpoint_config(train.init_from).replace(**{k: model[k] for k in explicit}), train
    return VLMConfig(**model), train


def to_dict(vlm_cfg: VLMConfig, train_cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The resolved configs as saved in the run folder's config.json."""
    return {"model": dataclasses.asdict(vlm_cfg), "train": dataclasses.asdict(train_cfg)}


def _shown(value: Any, width: int = 36) -> str:
    """A default as one writes it on the command line, cut to `width` characters."""
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = json.dumps(value)
    elif value == "":
        text = "''"
    else:
        text = str(value).replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_settings(default_preset: str | None = None) -> str:
    """Every setting, grouped model / train, with its type, default and meaning, then the presets
    with their descriptions: the text `nanovlm train --list-settings` prints."""
    lines = [
        "Settings of `nanovlm train [--preset NAME] [--config FILE] [key=value ...]` (and `nanovlm data preview`).",
        "Precedence: preset < --config FILE (YAML/JSON, flat keys or model/train sections) < key=value.",
        "On the command line a boolean is true/false, yes/no, on/off or 1/0 (any case), and none/null "
        "sets a field whose type allows None.",
        "Defaults are the dataclasses'; the preset overrides some of them.",
    ]
    for section, cls, helps in (("model", VLMConfig, VLM_HELP), ("train", TrainConfig, TRAIN_HELP)):
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f.name, kind, _shown(default), helps[f.name]))
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        lines += ["", f"{section} settings ({cls.__name__}):",
                  "  " + "  ".join(h.ljust(w) for h, w in zip(("name", "type", "default"), widths)) + "  meaning"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    width = max(len(name) for name in PRESETS)
    lines += ["", "presets (--preset NAME):"]
    for name in PRESETS:
        mark = " (the default)" if name == default_preset else ""
        lines.append(f"  {name.ljust(width)}  {PRESET_DESCRIPTIONS[name]}{mark}")
    return "\n".join(lines)
