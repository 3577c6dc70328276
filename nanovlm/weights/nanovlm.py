"""Checkpoint directories of nanovlm and of the original nanoVLM: config.json + model.safetensors
(+ tokenizer and PEFT adapter files), both in the original's tensor names; its saved RoPE
frequencies are dropped, and a tied head may be stored under either name.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from nanovlm.config import VLMConfig
from nanovlm.fileio import atomic_write_json, written_dir
from nanovlm.sources import resolve
from nanovlm.weights.common import check_state_dict
from nanovlm.weights.idefics3 import idefics3_config, is_idefics3, load_idefics3
from nanovlm.weights.peft import ADAPTER_WEIGHTS, has_adapter, read_adapter, write_adapter

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_directory(repo_id_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """The local checkpoint directory a `--model` / `from_pretrained` value names, its files checked."""
    directory = resolve(repo_id_or_path, revision=revision)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is a file; --model / from_pretrained expects a checkpoint directory "
                         f"with {CONFIG_FILE} and {WEIGHTS_FILE}.")
    if is_idefics3(directory):  # its own reader checks its files (its weights may be sharded)
        return directory
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; a checkpoint directory needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (write one with save_pretrained or nanovlm train).")
    return directory


def checkpoint_config(repo_id_or_path: str | os.PathLike) -> VLMConfig:
    """The VLMConfig of a checkpoint (ours, the original's, or Idefics3), without its weights."""
    path = resolve(repo_id_or_path)
    return idefics3_config(path) if is_idefics3(path) else \
        VLMConfig.from_json(os.path.join(checkpoint_directory(path), CONFIG_FILE))


def load_state(model: Any, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load a nanoVLM-layout state dict into `model`; every problem is listed, none is skipped."""
    state = {k: v for k, v in state.items() if k != "decoder.rotary_embd.inv_freq"}
    tied = model.cfg.lm_tie_weights
    if tied and "decoder.token_embedding.weight" not in state and "decoder.head.weight" in state:
        state["decoder.token_embedding.weight"] = state["decoder.head.weight"]
    if tied:
        state.pop("decoder.head.weight", None)
    check_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict_for_saving().items()}, source)
    model.load_state_dict(state, strict=False)  # checked above; a tied head is the embedding


def write_checkpoint(directory: str | os.PathLike, cfg: VLMConfig, state: dict[str, torch.Tensor],
                     tokenizer=None, adapter: tuple | None = None) -> None:
    """Write config.json, model.safetensors, the tokenizer files (when given) and `adapter` (`peft.write_adapter`'s
    arguments) atomically: a temporary directory renamed into place."""
    with written_dir(os.fspath(directory)) as tmp:
        atomic_write_json(os.path.join(tmp, CONFIG_FILE), cfg.to_dict())
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt", "library": "nanovlm"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter is not None:
            write_adapter(tmp, *adapter)


def push_checkpoint(repo_id: str, save: Callable[[str], None], private: bool = False,
                    commit_message: str = "Upload nanovlm model"):
    """Upload the checkpoint directory `save(path)` writes to hub repo `repo_id` (created if needed)."""
    from huggingface_hub import create_repo, upload_folder  # optional: the [hf] extra

    repo_id = create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        save(folder)
        return upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


def read_model(cls: type, repo_id_or_path: str | os.PathLike, revision: str | None = None
               ) -> tuple[Any, str, tuple | None]:
    """(a `cls` with the weights, its directory, (adapter settings, tensors, file) or None) of any checkpoint."""
    path = resolve(repo_id_or_path, revision=revision)
    if is_idefics3(path):
        return load_idefics3(cls, path), path, None
    directory = checkpoint_directory(path, revision)
    model = cls(VLMConfig.from_json(os.path.join(directory, CONFIG_FILE)), load_backbone=False)
    load_state(model, load_file(os.path.join(directory, WEIGHTS_FILE)), source=os.path.join(directory, WEIGHTS_FILE))
    adapter = (*read_adapter(directory), os.path.join(directory, ADAPTER_WEIGHTS)) if has_adapter(directory) else None
    return model, directory, adapter
