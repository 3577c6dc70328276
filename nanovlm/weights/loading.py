"""Language-model weights from any source, and the machinery every foreign-format reader shares.

`load_language_model(cls, cfg)` reads `cfg.lm_model_type`: `packaged:smollm2-135m`, a `.gguf`
file, a transformers Llama directory, or a hub id (downloaded only when online), and returns a
`LanguageModel` in fp32 on the CPU. `config_from_source(name)` reads the `lm_*` fields of such a
source, so presets and users can fill in a config from a checkpoint instead of typing numbers.

Every format reader is a declarative key table, ours <- theirs, plus a few named transforms:
- a `Rule` names the tensor(s) of the file that make one of our tensors, and the transform that
  turns them into it (fuse q/k/v, undo llama.cpp's q/k row order, grow the vocabulary);
- `convert` applies a table to the file's tensors, then `check_state_dict` lists every missing,
  unexpected and mis-shaped tensor in one `WeightLoadError`. Nothing is skipped silently.

Vocabulary growth: the rows added for the VLM's extra tokens (`<|image|>`, ...) start as the
mean of the checkpoint's rows. A new token then begins as an "average" token, which leaves the
pretrained model's outputs nearly unchanged (Hewitt, "Initializing new word embeddings", 2021),
and the result does not depend on the random seed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from nanovlm.weights.common import WeightLoadError, check_state_dict

Transform = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One of our tensors: made from `sources` (names in the file) by `transform` (identity if None)."""

    sources: tuple[str, ...]
    transform: Transform | None = None


def rule(*sources: str, transform: Transform | None = None) -> Rule:
    return Rule(tuple(sources), transform)


def expand_blocks(table: Mapping[str, Rule], n_blocks: int) -> dict[str, Rule]:
    """Write out a table whose names hold `{i}` once per block."""
    out: dict[str, Rule] = {}
    for ours, r in table.items():
        if "{i}" not in ours:
            out[ours] = r
            continue
        for i in range(n_blocks):
            out[ours.format(i=i)] = Rule(tuple(s.format(i=i) for s in r.sources), r.transform)
    return out


# --------------------------------------------------------------------------- named transforms
def fuse(*parts: torch.Tensor) -> torch.Tensor:
    """Stack q, k, v projections along the output axis (our fused `qkv_proj`)."""
    shapes = [tuple(p.shape) for p in parts]
    if len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"cannot fuse tensors of shapes {', '.join(map(str, shapes))}")
    return torch.cat(parts, dim=0)


def grow_rows(n_rows: int) -> Transform:
    """Append rows up to `n_rows`, each the mean of the existing rows (see the module docstring).
    A tensor with more rows than asked is returned unchanged, for the shape check to report."""

    def transform(weight: torch.Tensor) -> torch.Tensor:
        extra = n_rows - weight.shape[0]
        if extra <= 0:
            return weight
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
        return torch.cat([weight, mean.expand(extra, -1)], dim=0)  # (n_rows, C)

    return transform


# --------------------------------------------------------------------------- applying a table
def convert(tensors: Mapping[str, torch.Tensor], table: Mapping[str, Rule], expected: Mapping[str, tuple[int, ...]],
            source: str, ignore: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
    """The file's tensors (`tensors`, their names) -> our state dict (fp32), checked against
    `expected` (our name -> shape). File tensors no rule uses and `ignore` does not skip are
    reported as unexpected, under their own names."""
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    expected = dict(expected)
    used: set[str] = set()
    for ours, r in table.items():
        used.update(r.sources)
        if not all(s in tensors for s in r.sources):
            continue  # check_state_dict reports `ours` as missing
        parts = [tensors[s] for s in r.sources]
        try:
            value = r.transform(*parts) if r.transform is not None else parts[0]
        except (RuntimeError, ValueError) as e:
            problems.append(f"{ours} (from {', '.join(r.sources)}): {e}")
            expected.pop(ours, None)
            continue
        state[ours] = value.to(torch.float32)
    for name in tensors:
        if name not in used and not ignore(name):
            state[name] = torch.empty(0)  # only its name matters: it is reported as unexpected
    try:
        check_state_dict(state, expected, source)
    except WeightLoadError as e:
        if problems:
            raise WeightLoadError(f"{e} Also: {'; '.join(problems)}.") from None
        raise
    if problems:
        raise WeightLoadError(f"cannot load {source}: {'; '.join(problems)}. "
                              "Check that the config matches the checkpoint.")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a converted, checked state dict into `model` (strict; a tied head shares the embedding)."""
    if getattr(model, "lm_tie_weights", False):
        state = {**state, "head.weight": state["token_embedding.weight"]}
    model.load_state_dict(state, strict=True)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes; a tied head is the embedding, so it is not expected."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model, "lm_tie_weights", False):
        shapes.pop("head.weight", None)
    return shapes


# --------------------------------------------------------------------------- architecture checks
def check_architecture(found: Mapping[str, Any], cfg: Any, source: str,
                       at_least: tuple[str, ...] = ()) -> None:
    """Compare the checkpoint's architecture (`found`: config field -> value) with `cfg`; one error
    names every field that differs. Fields in `at_least` only need cfg >= checkpoint."""
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


def check_lm_architecture(found: Mapping[str, Any], cfg: Any, source: str) -> None:
    """The `config_from_source` fields of a checkpoint against cfg: all equal, except the
    vocabulary, which cfg may extend (the extra tokens) but not cut."""
    arch = {k: v for k, v in found.items() if k not in ("lm_base_vocab_size", "lm_max_position_embeddings")}
    arch["lm_vocab_size"] = found["lm_base_vocab_size"]
    check_architecture(arch, cfg, source, at_least=("lm_vocab_size",))


def f32_value(x: float) -> float:
    """A float stored as float32 (GGUF) back to the decimal it was written from: 1e-05, not 9.9999997e-06."""
    return float(f"{float(x):.7g}")


# --------------------------------------------------------------------------- files and sources
def read_model_config(directory: str, family: str, kinds: tuple[str, ...], accepted: str) -> tuple[dict[str, Any], str]:
    """A transformers directory's config.json and its model_type, which must be one of `kinds`.
    `family` names the directory kind in errors; `accepted` says what can be loaded."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise WeightLoadError(f"{directory} has no config.json; a transformers {family} directory needs "
                              "config.json and model.safetensors.")
    config = read_json(path)
    kind = config.get("model_type")
    if kind not in kinds:
        raise WeightLoadError(f"{directory} holds a {kind!r} model; only {accepted} can be loaded.")
    return config, kind


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path} is not valid JSON ({e}).") from None


class SafetensorsTensors(Mapping):
    """The tensors of a safetensors checkpoint (one file or a sharded index), read on access."""

    def __init__(self, directory: str):
        from safetensors import SafetensorError, safe_open

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
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for path in sorted(set(files.values())) if files else [single]:
            if not os.path.isfile(path):
                raise WeightLoadError(f"shard {path} named by the index does not exist.")
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise WeightLoadError(f"{path} is not a safetensors file ({e}).") from None
            self._handles[path] = handle
            for name in handle.keys():
                self._where[name] = path
        if files is not None:
            lost = sorted(n for n, p in files.items() if self._where.get(n) != p)
            if lost:
                raise WeightLoadError(f"the index of {directory} names tensors its shards lack: "
                                      f"{', '.join(lost[:10])}.")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def local_or_download(name: str, what: str, patterns: list[str]) -> str:
    """`name` if it exists locally, else the hub snapshot of repo `name` (only when online)."""
    if not name:
        raise WeightLoadError(f"no {what} checkpoint given.")
    if os.path.exists(name):
        return name
    if not _HUB_ID.fullmatch(name) or name.endswith((".gguf", ".safetensors", ".json")):
        raise WeightLoadError(f"{what} checkpoint {name} does not exist.")
    if hub_offline():
        raise WeightLoadError(f"{what} checkpoint {name!r} is not a local path, and HF_HUB_OFFLINE=1 forbids "
                              "downloading it; give a local directory or file instead.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=patterns)
    except ImportError:
        raise WeightLoadError(f"{name!r} is not a local path; install huggingface_hub to download it.") from None
    except Exception as e:  # network, authentication, unknown repo: all one message for the user
        raise WeightLoadError(f"cannot download {what} checkpoint {name!r} from the hub ({e}).") from None


# What a download of a transformers checkpoint fetches: its config and safetensors weights only.
HF_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def _resolve_lm(name: str) -> tuple[str, str]:
    """-> ("gguf" | "hf", local path)."""
    from nanovlm.data.tokenizer import TokenizerError, resolve_model_source

    try:
        path = resolve_model_source(name)
    except TokenizerError as e:
        raise WeightLoadError(str(e)) from None
    path = local_or_download(path, "language-model", HF_PATTERNS)
    if os.path.isdir(path):
        return "hf", path
    if path.endswith(".gguf"):
        return "gguf", path
    raise WeightLoadError(f"{path} is neither a transformers Llama directory (config.json + model.safetensors) "
                          "nor a .gguf file.")


# --------------------------------------------------------------------------- entry points
def load_language_model(cls: type, cfg: Any):
    """A `cls` (LanguageModel) with the weights `cfg.lm_model_type` names, fp32 on the CPU."""
    kind, path = _resolve_lm(cfg.lm_model_type)
    if kind == "gguf":
        from nanovlm.weights.gguf import load_gguf_llama

        return load_gguf_llama(cls, cfg, path)
    from nanovlm.weights.hf_llama import load_hf_llama

    return load_hf_llama(cls, cfg, path)


def config_from_source(name: str) -> dict[str, Any]:
    """The `lm_*` architecture fields of a language-model source (HF directory, .gguf file,
    `packaged:smollm2-135m`, or a hub id when online), ready for `VLMConfig(**fields)`."""
    kind, path = _resolve_lm(name)
    if kind == "gguf":
        from nanovlm.weights.gguf import gguf_llama_config

        return gguf_llama_config(path)
    from nanovlm.weights.hf_llama import hf_llama_config

    return hf_llama_config(path)
