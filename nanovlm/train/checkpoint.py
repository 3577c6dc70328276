"""Checkpoints a run resumes from exactly, written so that a kill at any instant is harmless.

A step checkpoint is a model directory plus `trainer_state.json` (step, data position, metrics, RNG)
and `trainer_state.pt` (optimizer, torch RNG; loaded weights_only), assembled in a hidden directory,
flushed and renamed into place; `--resume` takes the newest sound one (`latest_good_checkpoint`).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import zipfile
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanovlm.fileio import atomic_write_json, make_temp_dir_beside, written_dir
from nanovlm.weights.common import check_state_dict
from nanovlm.weights.nanovlm import load_state

STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"  # a LoRA run's instead of model.safetensors: the tensors that train
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def rng_state() -> dict:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: str) -> None:
    """Flush every file and the directory, so the rename that follows publishes complete data."""
    for path in [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names] + [directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def write_dir(final: str, model, tokenizer, state: dict | None = None, tensors: dict | None = None,
              trainable_only: bool = False) -> None:
    """Assemble a checkpoint in a temporary directory beside `final`, then rename it into place."""
    with written_dir(final) as tmp:
        if trainable_only:
            atomic_write_json(os.path.join(tmp, "config.json"), model.cfg.to_dict())
            save_file(trainable_tensors(model), os.path.join(tmp, TRAINABLE_FILE))
        else:
            os.rmdir(tmp)  # save_pretrained creates it (itself atomically)
            model.save_pretrained(tmp, tokenizer)
        if tensors is not None:
            torch.save(tensors, os.path.join(tmp, STATE_PT))
        if state is not None:
            with open(os.path.join(tmp, STATE_JSON), "w") as f:
                json.dump(state, f)
        _fsync_tree(tmp)


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict, rng_states: list[dict],
                    keep_last: int = 2) -> str:
    """Write `checkpoints/step_XXXXXX/` (rank 0; `rng_states`: one per rank) and keep the newest `keep_last`."""
    path = step_dir(run_dir, step)
    tensors = {"optimizer": optimizer.state_dict(), "rng": rng_states}
    lora = bool(getattr(model, "lora_settings", None))
    write_dir(path, model, tokenizer, {**state, "step": step}, tensors, trainable_only=lora)
    if keep_last > 0:
        # Only checkpoints up to this step count: a newer one is a damaged checkpoint that this
        # run's resume passed over (left for inspection; a save at its step replaces it).
        upto = [p for p in list_checkpoints(run_dir) if _step_of(p) <= step]
        for old in upto[:-keep_last]:
            _remove(old)
    return path


def _remove(path: str) -> None:
    """Delete a directory (renamed away first, so that a kill never leaves a half-deleted one in place)."""
    trash = make_temp_dir_beside(path)
    os.rmdir(trash)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(run_dir: str) -> list[str]:
    """Step checkpoint directories, oldest first (not checked: see `latest_good_checkpoint`)."""
    found = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*"))
             if _STEP_DIR.match(os.path.basename(p)) and os.path.isdir(p)]
    return sorted(found, key=_step_of)


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest step checkpoint directory, unchecked; a resume uses `latest_good_checkpoint`."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_good_checkpoint(run_dir: str, say: Callable[[str], None] = print) -> str | None:
    """The newest sound step checkpoint (a line says what is wrong with each newer one); None without any;
    a ValueError naming every checkpoint and its fault when none is sound."""
    found = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                say(f"--resume: checkpoint {bad} is unreadable ({why}); trying the one before it.")
            return path
        damaged.append((path, problem))
    if not found:
        return None
    faults = "; ".join(f"{os.path.basename(path)}: {why}" for path, why in damaged)
    raise ValueError(f"--resume: every checkpoint in {os.path.join(run_dir, 'checkpoints')} is unreadable "
                     f"({faults}); run without --resume to start a new run.")


def checkpoint_problem(path: str) -> str | None:
    """What makes the step checkpoint `path` unusable, in a few words (None: sound), checked without reading
    the tensors: every file there, the JSON parses, the safetensors size, the torch.save archive's index."""
    weights = TRAINABLE_FILE if os.path.isfile(os.path.join(path, TRAINABLE_FILE)) else "model.safetensors"
    checks = (("config.json", _json_problem), (STATE_JSON, _json_problem), (weights, _safetensors_problem),
              (STATE_PT, _torch_archive_problem))
    missing = [name for name, _ in checks if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"{missing[0]} is missing"
    try:
        problems = ((name, check(os.path.join(path, name))) for name, check in checks)
        return next((f"{name} {problem}" for name, problem in problems if problem), None)
    except OSError as e:
        return f"{os.path.basename(e.filename or '') or 'a file'} cannot be read ({e.strerror})"


def _json_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except ValueError as e:  # also bad UTF-8
        return f"is not valid JSON ({e})"
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not an object"
    if os.path.basename(path) == STATE_JSON and not isinstance(obj.get("step"), int):
        return "has no step"
    return None


def _safetensors_problem(path: str) -> str | None:
    """8 bytes (header length n), n bytes of JSON (name -> dtype, shape, data_offsets), data up to the last offset."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes, not even a header)"
        n = int.from_bytes(prefix, "little")
        if 8 + n > size:
            return f"is truncated ({size} bytes; its header alone needs {8 + n})"
        try:
            header = json.loads(f.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return f"has a header that does not parse ({e})"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"has {size - expected} bytes after its last tensor"
    return None


def _torch_archive_problem(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            size = os.path.getsize(path)
            for entry in archive.infolist():
                if entry.header_offset + entry.compress_size > size:
                    return f"is truncated (its entry {entry.filename} runs past the end)"
    except zipfile.BadZipFile as e:
        return f"is truncated or not a torch.save archive ({e})"
    return None


def recover(run_dir: str) -> None:
    """Tidy after a kill: drop temporary directories, put back one a kill caught between two renames."""
    root = os.path.join(run_dir, "checkpoints")
    for path in glob.glob(os.path.join(root, "*.old-*")) + glob.glob(os.path.join(run_dir, "final.old-*")):
        original = path.rsplit(".old-", 1)[0]
        if os.path.exists(original):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, original)
    for path in glob.glob(os.path.join(root, ".tmp-*")) + glob.glob(os.path.join(run_dir, ".tmp-*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def clear(run_dir: str) -> None:
    """Remove a previous run's checkpoints, final model and TensorBoard logs from `run_dir`."""
    for name in ("checkpoints", "final", "tensorboard"):
        if os.path.isdir(os.path.join(run_dir, name)):
            _remove(os.path.join(run_dir, name))


def load_checkpoint(path: str, model, optimizer=None, rank: int = 0,
                    check: Callable[[dict], None] | None = None) -> dict:
    """Restore the model (the optimizer and this rank's RNG when given; a LoRA checkpoint's tensors into the
    base built beforehand); returns the JSON state, which `check(state)` sees before anything loads."""
    with open(os.path.join(path, STATE_JSON)) as f:
        state = json.load(f)
    if check is not None:
        check(state)
    trainable = os.path.join(path, TRAINABLE_FILE)
    if os.path.isfile(trainable):
        tensors = load_file(trainable)
        check_state_dict(tensors, {k: tuple(v.shape) for k, v in trainable_tensors(model).items()}, trainable)
        model.load_state_dict(tensors, strict=False)
    else:
        load_state(model, load_file(os.path.join(path, "model.safetensors")), source=path)
    if optimizer is not None:
        tensors = torch.load(os.path.join(path, STATE_PT), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(tensors["optimizer"])
        rngs = tensors["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state
