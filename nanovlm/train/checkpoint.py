"""Checkpoints a run can resume from exactly, written so that a kill at any instant is harmless.

A checkpoint is a directory `checkpoints/step_XXXXXX/`:
  config.json, model.safetensors, tokenizer files   (model.save_pretrained: also a model dir)
  trainer_state.json   step, data position, python/numpy RNG, metrics so far, validation loss
  trainer_state.pt     optimizer + schedule state and torch RNG states (tensors; loaded with
                       torch.load(weights_only=True), never unpickling code)
A LoRA run's step checkpoint holds `trainable.safetensors` (adapters + projector: what trains,
see `nanovlm.train.lora`) and config.json instead of the model directory; its trainer_state.json
names the base weights (`lora_base`).
It is assembled in a hidden temporary directory beside its final place, flushed to disk, and
renamed into place: a directory named step_XXXXXX is always complete. `best/` (lowest validation
loss) holds the model and trainer_state.json only; `final/` is a plain model directory (a LoRA
run's `best/` and `final/` also hold its adapters in PEFT's layout, `nanovlm.weights.peft`).

What happens to a checkpoint after it is written (a full disk that another program filled, a
copy cut short, a file removed by hand) is outside our control, so a resume checks the files
before it trusts them (`latest_good_checkpoint`) and falls back to the newest sound checkpoint.
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

from nanovlm.fileio import atomic_write_json, make_temp_dir_beside, replace_dir

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
# The files a step checkpoint must hold: the model directory's two and the trainer state's two.
REQUIRED_FILES = ("config.json", "model.safetensors", STATE_JSON, STATE_PT)
# A LoRA run's step checkpoints hold this instead of model.safetensors: the tensors that train.
TRAINABLE_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


# ------------------------------------------------------------------------------------------ RNG
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


# ------------------------------------------------------------------------------------ writing
def _fsync_tree(directory: str) -> None:
    """Flush every file (and the directory) so the rename that follows publishes complete data."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors the optimizer updates, by state-dict name."""
    return {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def _write_dir(final: str, model, tokenizer, state: dict | None, tensors: dict | None,
               trainable_only: bool = False) -> None:
    """Assemble a checkpoint in a temporary directory beside `final`, then rename it into place."""
    from safetensors.torch import save_file

    tmp = make_temp_dir_beside(final)
    try:
        if trainable_only:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(model.cfg.to_dict(), f, indent=2)
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
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    rng_states: list[dict], keep_last: int = 2) -> str:
    """Write `checkpoints/step_XXXXXX/` (rank 0 only) and drop all but the newest `keep_last`.

    `state` is JSON-able (data position, metrics, ...); `rng_states` holds one entry per rank."""
    path = step_dir(run_dir, step)
    tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states}
    lora = bool(getattr(model, "lora_settings", None))
    _write_dir(path, model, tokenizer, {**state, "step": step}, tensors, trainable_only=lora)
    if keep_last > 0:
        # Only checkpoints up to this step count: a newer one is a damaged checkpoint that this
        # run's resume passed over (left for inspection; a save at its step replaces it).
        upto = [p for p in list_checkpoints(run_dir) if _step_of(p) <= step]
        for old in upto[:-keep_last]:
            _remove(old)
    return path


def _remove(path: str) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its name:
    rename it to a hidden temporary name first (atomic), then delete."""
    trash = make_temp_dir_beside(path)
    os.rmdir(trash)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_best(run_dir: str, model, tokenizer, state: dict) -> str:
    """`checkpoints/best/`: the model with the lowest validation loss so far (no optimizer)."""
    path = os.path.join(run_dir, "checkpoints", "best")
    _write_dir(path, model, tokenizer, state, None)
    return path


def save_final(run_dir: str, model, tokenizer) -> str:
    """`final/`: a model directory for from_pretrained and every --model flag."""
    path = os.path.join(run_dir, "final")
    _write_dir(path, model, tokenizer, None, None)
    return path


# ------------------------------------------------------------------------------------ reading
def list_checkpoints(run_dir: str) -> list[str]:
    """Step checkpoint directories, oldest first (not checked: see `latest_good_checkpoint`)."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        m = _STEP_DIR.match(os.path.basename(path))
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest step checkpoint directory, unchecked; a resume uses `latest_good_checkpoint`."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_good_checkpoint(run_dir: str, say: Callable[[str], None] = print) -> str | None:
    """The newest step checkpoint whose files are sound, saying in one line of each newer one what
    is wrong with it; None when the run has no step checkpoint at all. Raises ValueError (one
    sentence naming every checkpoint and its fault) when it has some and none is sound."""
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
    """What makes the step checkpoint `path` unusable, in a few words, or None when it is sound.

    Checks what can be checked without reading the tensors: every required file is there, the
    JSON files parse, model.safetensors' header parses and the file is as long as the header says,
    and trainer_state.pt (a torch.save zip archive) still has its index, which sits at its end."""
    weights = TRAINABLE_FILE if os.path.isfile(os.path.join(path, TRAINABLE_FILE)) else "model.safetensors"
    for name in REQUIRED_FILES:
        name = weights if name == "model.safetensors" else name
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        for name in ("config.json", STATE_JSON):
            problem = _json_problem(os.path.join(path, name))
            if problem:
                return f"{name} {problem}"
        problem = _safetensors_problem(os.path.join(path, weights))
        if problem:
            return f"{weights} {problem}"
        problem = _torch_archive_problem(os.path.join(path, STATE_PT))
        if problem:
            return f"{STATE_PT} {problem}"
    except OSError as e:
        return f"{os.path.basename(e.filename or '') or 'a file'} cannot be read ({e.strerror})"
    return None


def _json_problem(path: str) -> str | None:
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except ValueError as e:  # also bad UTF-8
        return f"is not valid JSON ({e})"
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not an object"
    if os.path.basename(path) == STATE_JSON and not isinstance(obj.get("step"), int):
        return "has no step"
    return None


def _safetensors_problem(path: str) -> str | None:
    """The layout: 8 bytes (little-endian header length n), n bytes of JSON (name -> dtype, shape,
    data_offsets into the data that follows), then the data, ending at the largest offset."""
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
    """Tidy after a kill: drop half-written temporary directories, and put back a checkpoint that
    a kill caught between the two renames of a replacement."""
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


def load_checkpoint(path: str, model, optimizer=None, scheduler=None, rank: int = 0,
                    check: Callable[[dict], None] | None = None) -> dict:
    """Restore the model (and optimizer, schedule and this rank's RNG when given) from a step
    checkpoint; returns its JSON state. `check(state)` runs on that state before anything loads.
    A LoRA checkpoint's trainable tensors load into the model's trainable parameters (its base
    was built beforehand and `check` compared it with the checkpoint's reference)."""
    from safetensors.torch import load_file

    from nanovlm.weights.common import check_state_dict
    from nanovlm.weights.nanovlm import load_state

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
    if optimizer is not None or scheduler is not None:
        tensors = torch.load(os.path.join(path, STATE_PT), map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(tensors["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(tensors["scheduler"])
        rngs = tensors["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state


def write_run_config(run_dir: str, config: dict) -> None:
    atomic_write_json(os.path.join(run_dir, "config.json"), config)
