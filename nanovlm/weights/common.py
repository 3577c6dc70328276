"""What every foreign-format reader shares: a key table (ours <- theirs) of `Rule`s, each naming
the file's tensor(s) and a named transform; `convert` lists every missing, unexpected and
mis-shaped tensor in one `WeightLoadError`. Rows added for extra tokens start as the mean of the
checkpoint's (Hewitt, "Initializing new word embeddings", 2021).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

# What a download of a transformers checkpoint fetches: its config and safetensors weights only.
HF_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
Transform = Callable[..., torch.Tensor]


class WeightLoadError(ValueError):
    """Weights do not fit the model; the message lists every problem."""


def check_state_dict(state: Mapping[str, Any], expected_shapes: Mapping[str, tuple[int, ...]], source: str,
                     also: tuple[str, ...] = ()) -> None:
    """Raise WeightLoadError listing every missing, unexpected and mis-shaped key (and the `also` problems)."""
    missing = sorted(k for k in expected_shapes if k not in state)
    unexpected = sorted(k for k in state if k not in expected_shapes)
    misshaped = sorted(f"{k}: file has {tuple(state[k].shape)}, model needs {tuple(expected_shapes[k])}"
                       for k in expected_shapes if k in state and tuple(state[k].shape) != tuple(expected_shapes[k]))
    def shown(names: list[str]) -> list[str]:
        return names if len(names) <= 20 else names[:20] + [f"... and {len(names) - 20} more"]

    problems = [f"{what} tensors: {sep.join(shown(names))}"
                for what, names, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                                         ("mis-shaped", misshaped, "; ")) if names]
    if problems or also:
        raise WeightLoadError(f"cannot load {source}: " + " | ".join([*problems, *also])
                              + ". Check that the config matches the checkpoint.")


@dataclass(frozen=True)
class Rule:
    """One of our tensors: made from `sources` (names in the file) by `transform` (identity if None)."""

    sources: tuple[str, ...]
    transform: Transform | None = None


def expand_blocks(table: Mapping[str, Rule], n_blocks: int) -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    for ours, r in table.items():
        for i in range(n_blocks) if "{i}" in ours else [None]:
            out[ours.format(i=i)] = Rule(tuple(s.format(i=i) for s in r.sources), r.transform)
    return out


def fuse(*parts: torch.Tensor) -> torch.Tensor:
    """Stack q, k, v projections along the output axis (our fused `qkv_proj`)."""
    shapes = [tuple(p.shape) for p in parts]
    if len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"cannot fuse tensors of shapes {', '.join(map(str, shapes))}")
    return torch.cat(parts, dim=0)


def grow_rows(n_rows: int) -> Transform:
    """Append rows up to `n_rows`, each the mean of the existing rows (more pass, for the shape check)."""

    def transform(weight: torch.Tensor) -> torch.Tensor:
        extra = n_rows - weight.shape[0]
        if extra <= 0:
            return weight
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
        return torch.cat([weight, mean.expand(extra, -1)], dim=0)  # (n_rows, C)

    return transform


def convert(tensors: Mapping[str, torch.Tensor], table: Mapping[str, Rule], expected: Mapping[str, tuple[int, ...]],
            source: str, ignore: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
    """The file's tensors -> our state dict (fp32), checked against `expected` (our name -> shape).
    File tensors no rule uses and `ignore` does not skip are reported as unexpected, by their names."""
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    expected = dict(expected)
    used = {s for r in table.values() for s in r.sources}
    for ours, r in table.items():
        if not all(s in tensors for s in r.sources):
            continue  # check_state_dict reports `ours` as missing
        parts = [tensors[s] for s in r.sources]
        try:
            state[ours] = (r.transform(*parts) if r.transform is not None else parts[0]).to(torch.float32)
        except (RuntimeError, ValueError) as e:
            problems.append(f"{ours} (from {', '.join(r.sources)}): {e}")
            expected.pop(ours, None)
    state.update({name: torch.empty(0) for name in tensors if name not in used and not ignore(name)})
    check_state_dict(state, expected, source, also=("; ".join(problems),) if problems else ())
    return state


def load_checked(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], table: Mapping[str, Rule], source: str,
                 ignore: Callable[[str], bool] = lambda name: False, expected: Mapping | None = None):
    """`model` (fp32) with the file's tensors `convert`ed in; `expected`: its state dict but a tied head."""
    if expected is None:
        tied = getattr(model, "lm_tie_weights", False)
        expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "head.weight")}
    state = convert(tensors, table, {k: tuple(v.shape) for k, v in expected.items()}, source, ignore)
    model.load_state_dict(state, strict=False)  # `convert` has checked every name and shape
    return model.float()  # train/eval mode as constructed, like the VLM that holds it


def load_llama(cls: type, cfg: Any, found: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
               keys: Mapping[str, str], source: str, transforms: Mapping[str, Transform] | None = None,
               ignore: Callable[[str], bool] = lambda name: False):
    """A `cls(cfg)` from a Llama key table (ours <- theirs): `found` checked (cfg may extend the
    vocabulary, not cut it), the vocabulary grown."""
    arch = {k: v for k, v in found.items() if k not in ("lm_base_vocab_size", "lm_max_position_embeddings")}
    check_architecture({**arch, "lm_vocab_size": found["lm_base_vocab_size"]}, cfg, source, at_least=("lm_vocab_size",))
    grow = grow_rows(cfg.lm_vocab_size)
    transforms = {"token_embedding.weight": grow, "head.weight": grow, **(transforms or {})}
    table = {ours: Rule((theirs,), transforms.get(ours)) for ours, theirs in keys.items()
             if not (cfg.lm_tie_weights and ours == "head.weight")}
    return load_checked(cls(cfg), tensors, expand_blocks(table, cfg.lm_n_blocks), source, ignore)


def check_architecture(found: Mapping[str, Any], cfg: Any, source: str, at_least: tuple[str, ...] = ()) -> None:
    """The checkpoint's fields against `cfg`, every difference in one error (`at_least`: cfg >= checkpoint)."""
    wrong = []
    for name, value in found.items():
        ours = getattr(cfg, name)
        if name in at_least:
            if ours < value:
                wrong.append(f"{name} is {ours} but must be at least {value}")
        elif isinstance(value, float) or isinstance(ours, float):
            if not math.isclose(float(ours), float(value), rel_tol=1e-6):
                wrong.append(f"{name} is {ours} but the checkpoint has {value}")
        elif ours != value:
            wrong.append(f"{name} is {ours!r} but the checkpoint has {value!r}")
    if wrong:
        raise WeightLoadError(f"the config does not match {source}: {'; '.join(wrong)}. "
                              "Set these fields to the checkpoint's values.")


def f32_value(x: float) -> float:
    """A float stored as float32 (GGUF) back to the decimal it was written from: 1e-05, not 9.9999997e-06."""
    return float(f"{float(x):.7g}")


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path} is not valid JSON ({e}).") from None


def read_model_config(directory: str, family: str, kinds: tuple[str, ...], accepted: str) -> tuple[dict[str, Any], str]:
    """A transformers directory's config.json and its model_type, which must be one of `kinds`."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise WeightLoadError(f"{directory} has no config.json; a transformers {family} directory needs "
                              "config.json and model.safetensors.")
    config = read_json(path)
    if config.get("model_type") not in kinds:
        raise WeightLoadError(f"{directory} holds a {config.get('model_type')!r} model; only {accepted} can be loaded.")
    return config, config["model_type"]


class Tensors(Mapping):
    """A checkpoint's tensors by name, each read on access as `read(name, where)` (`names`: name -> where)."""

    def __init__(self, names: dict[str, Any], read: Callable[[str, Any], torch.Tensor]):
        self._names, self._read = names, read

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._read(name, self._names[name])

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def safetensors_tensors(directory: str) -> Tensors:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightLoadError(f"{index} has no weight_map; it is not a safetensors index.")
        files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(single):
        files = None
    else:
        raise WeightLoadError(f"{directory} has neither model.safetensors nor model.safetensors.index.json; "
                              "only safetensors checkpoints are read (no pickle .bin files).")
    handles: dict[str, Any] = {}
    for path in sorted(set(files.values())) if files else [single]:
        if not os.path.isfile(path):
            raise WeightLoadError(f"shard {path} named by the index does not exist.")
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightLoadError(f"{path} is not a safetensors file ({e}).") from None
        handles.update({name: (path, handle) for name in handle.keys()})
    lost = sorted(n for n, p in (files or {}).items() if handles.get(n, ("",))[0] != p)
    if lost:
        raise WeightLoadError(f"the index of {directory} names tensors its shards lack: {', '.join(lost[:10])}.")
    return Tensors(handles, lambda name, where: where[1].get_tensor(name))
