"""`nanovlm train`: resolve the settings, set up the processes, prepare the run folder, train.

A run refused before it trains leaves no run folder behind: what can be checked is checked
first, and a folder made for a run that stopped with nothing to keep is removed again.
"""

from __future__ import annotations

import json
import os
import shutil

from nanovlm.config import DEFAULT_PRESET
from nanovlm.data.datasets import check_data
from nanovlm.data.records import validation_file
from nanovlm.data.resolution import fit_to_data
from nanovlm.eval.tasks import resolve_task
from nanovlm.fileio import atomic_write_json
from nanovlm.train import checkpoint as ckpt
from nanovlm.train import distributed as dist
from nanovlm.train import lora, settings
from nanovlm.train.loop import train


def run_training(preset: str = DEFAULT_PRESET, config_file: str | None = None, out: str = "runs/latest",
                 resume: bool = False, overrides: list[str] | None = None) -> int:
    base = None
    if resume:  # a resumed run continues with its saved settings; a config file and overrides still apply
        if ckpt.latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}; "
                                    "run without --resume to start a new run.")
        if os.path.isfile(os.path.join(out, "config.json")):
            with open(os.path.join(out, "config.json")) as f:
                base = json.load(f)
    vlm_cfg, train_cfg = settings.resolve(preset, config_file, overrides, base=base)
    lora.check_run(vlm_cfg, train_cfg)
    own_validation = None if train_cfg.val_data else validation_file(train_cfg.data)
    if own_validation:  # the folder's own validation split
        train_cfg = train_cfg.replace(val_data=own_validation)
    reads = [check_data(d, train_cfg.image_folder, train_cfg.strict) for d in (train_cfg.data, train_cfg.val_data) if d]
    resolve_task(train_cfg.eval_task, train_cfg.data)  # an eval_task the data does not have: refused now
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a folder; give a folder for the run.")

    info = dist.init()
    if info.is_main:
        print("data: " + " | validation: ".join(reads), flush=True)
    fitted = not vlm_cfg.max_img_size  # the preset leaves the image size to the pictures (a resumed run saved it)
    if fitted:
        size, line = fit_to_data(train_cfg.data, train_cfg.image_folder, vlm_cfg.vit_img_size)
        vlm_cfg = vlm_cfg.replace(max_img_size=size)
        if info.is_main:
            print(f"image size: {line} (max_img_size=N sets it)", flush=True)
    created = False
    try:
        if info.is_main:
            created = not os.path.exists(out)
            os.makedirs(out, exist_ok=True)
            if not resume and os.path.isdir(os.path.join(out, "checkpoints")):
                # A new run in an old folder: its checkpoints would mix with ours on a later --resume.
                print(f"nanovlm: starting a new run in {out}; removing the previous run's checkpoints "
                      "(use --resume to continue it instead).", flush=True)
                ckpt.clear(out)
            ckpt.recover(out)
            atomic_write_json(os.path.join(out, "config.json"), settings.to_dict(vlm_cfg, train_cfg))
        dist.barrier(info)
        try:
            train(vlm_cfg, train_cfg, out, resume=resume, info=info, fitted_size=fitted)
        except Exception:
            if created:
                _remove_refused_run(out)
            raise
    finally:
        dist.shutdown()
    return 0


def _remove_refused_run(out: str) -> None:
    """The run folder this call created, removed when the run stopped with no checkpoint, final model or metric."""
    kept = (ckpt.list_checkpoints(out) or os.path.isdir(os.path.join(out, "checkpoints", "best"))
            or os.path.isdir(os.path.join(out, "final")))
    metrics = os.path.join(out, "metrics.jsonl")
    if not kept and not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        shutil.rmtree(out, ignore_errors=True)
