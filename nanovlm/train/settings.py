"""A run's settings: preset < config file (YAML/JSON) < `key=value`, and `--list-settings`.

Every key and value is checked against the config fields first: a typo fails naming it and its likely meaning.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import yaml

from nanovlm.config import (DEFAULT_PRESET, ConfigError, TrainConfig, VLMConfig, check_value, field_types, get_preset,
                            parse_value, preset_lines, setting_fields)
from nanovlm.weights.nanovlm import checkpoint_config

_SECTIONS = {"model": VLMConfig, "train": TrainConfig}


def _owner(key: str) -> str:
    """'model' or 'train' for a known key; ConfigError naming the key and what it may have meant otherwise."""
    for section, cls in _SECTIONS.items():
        if key in field_types(cls):
            return section
    known = [k for cls in _SECTIONS.values() for k in field_types(cls)]
    # Names it begins, names holding it as a word, a close spelling.
    found = [k for k in known if k.startswith(key + "_")] + [k for k in known if key in k.split("_")]
    close = [f"'{k}'" for k in dict.fromkeys(found + difflib.get_close_matches(key, known, n=1))][:4]
    hint = f" Did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?" if close else ""
    raise ConfigError(f"unknown setting {key!r}: it is neither a VLMConfig nor a TrainConfig field.{hint}")


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """A YAML or JSON file -> {"model": {...}, "train": {...}}; `model` / `train` sections, flat keys, or both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist.")
    with open(path) as f:
        text = f.read()
    try:
        data = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}.")
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in data.items():
        if key not in _SECTIONS:
            out[_owner(key)][key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"section {key!r} in config file {path} must be a mapping.")
        for k, v in value.items():
            if _owner(k) != key:
                raise ConfigError(f"{k!r} in section {key!r} of {path} belongs in section {_owner(k)!r}.")
            out[key][k] = v
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


def _layers(preset: str | None, config_file: str | None, overrides: list[str] | None,
            base: dict | None) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(source, {"model": ..., "train": ...}) of each layer, lowest precedence first."""
    first = ("the saved run config", base) if base is not None else (f"preset {preset!r}", get_preset(preset))
    return [(first[0], {s: dict(first[1].get(s, {})) for s in _SECTIONS})] + \
        ([(f"config file {config_file}", load_config_file(config_file))] if config_file else []) + \
        [("the command line", parse_overrides(overrides))]


def resolve(preset: str | None, config_file: str | None = None, overrides: list[str] | None = None,
            base: dict[str, dict[str, Any]] | None = None) -> tuple[VLMConfig, TrainConfig]:
    """The run's (VLMConfig, TrainConfig). `base` (a saved run's config.json) replaces the preset."""
    layers = _layers(preset, config_file, overrides, base)
    merged: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for source, layer in layers:
        for section, values in layer.items():
            hints = field_types(_SECTIONS[section])
            for key, value in values.items():
                if key not in hints:
                    raise ConfigError(f"unknown setting {key!r} in {source}.")
                merged[section][key] = check_value(key, value, hints[key], f" in {source}")
    model, train = merged["model"], TrainConfig.from_dict(merged["train"])
    explicit = {k for _, layer in layers[1:] for k in layer["model"]}  # model settings from a file or the command line
    if base is not None:  # derived fields were saved resolved: recomputed where what they derive from changed
        saved = VLMConfig.from_dict(base.get("model", {}))
        return saved.replace(**{k: v for k, v in model.items() if base["model"].get(k) != v}), train
    if train.init_from:  # the checkpoint's model, with what the user set on top of it
        return checkpoint_config(train.init_from).replace(**{k: model[k] for k in explicit}), train
    return VLMConfig(**model), train


def to_dict(vlm_cfg: VLMConfig, train_cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    return {"model": vlm_cfg.to_dict(), "train": train_cfg.to_dict()}


def _shown(value: Any, width: int = 36) -> str:
    """A value as one writes it on the command line, cut to `width` characters."""
    text = ("none" if value is None else str(value).lower() if isinstance(value, bool) else
            json.dumps(value) if isinstance(value, dict) else "''" if value == "" else str(value).replace("\n", "\\n"))
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_settings(preset: str = DEFAULT_PRESET, config_file: str | None = None,
                      overrides: list[str] | None = None) -> str:
    """`nanovlm train --list-settings`: each setting's type, starting value and meaning; then the presets."""
    vlm, train = resolve(preset, config_file, overrides)
    values = to_dict(vlm, train)
    layers = _layers(preset, config_file, overrides, None)
    by_preset = {k for s in _SECTIONS for k in layers[0][1][s]}
    by_user = {k for _, layer in layers[1:] for s in _SECTIONS for k in layer[s]}
    lines = [f"Settings of `nanovlm train`, with the values a run under --preset {preset} starts from "
             "(* set by the preset, + by --config or key=value; the rest are defaults).",
             "Batch sizes and step counts are then fitted to the data (fit_batch, max_epochs, max_train_time).",
             "Precedence: preset < --config FILE (YAML/JSON, flat keys or model/train sections) < key=value.",
             "On the command line a boolean is true/false, yes/no, on/off or 1/0 (any case), and none/null "
             "sets a field whose type allows None."]
    groups = [("model settings (VLMConfig)", VLMConfig, "model"),
              ("train settings (TrainConfig)", TrainConfig, "train")]
    groups += [(f"{f.metadata['help']} (TrainConfig.{f.name})", f.metadata["group"], "train")
               for f in TrainConfig.__dataclass_fields__.values() if "group" in f.metadata]
    for title, cls, section in groups:
        rows = [("name", "type", "value", "meaning")]
        for name, (_, f) in setting_fields(cls).items():
            if cls is TrainConfig and name not in TrainConfig.__dataclass_fields__:
                continue  # a group's settings: listed under the group
            mark = " *" if name in by_preset and name not in by_user else " +" if name in by_user else ""
            rows.append((name, f.type, _shown(values[section][name]) + mark, f.metadata["help"]))
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        lines += ["", f"{title}:"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    lines += ["", "presets (--preset NAME):", *preset_lines()]
    return "\n".join(lines)
