"""`nanovlm train`: resolve the settings, set up the processes, prepare the run folder, train.

A run refused before it trains (a bad setting, a missing data file, data the loop rejects once
it is built) leaves no run folder behind: what can be checked is checked before the folder is
made, and a folder made for a run that then stopped with nothing to keep is removed again."""

from __future__ import annotations

import json
import os
import shutil

from nanovlm.data.datasets import check_data


def run_training(preset: str = "small", config_file: str | None = None, out: str = "runs/latest",
                 resume: bool = False, overrides: list[str] | None = None) -> int:
    from nanovlm.train import checkpoint as ckpt
    from nanovlm.train import distributed as dist
    from nanovlm.train import evaluation, lora, settings
    from nanovlm.train.loop import train

    base = None
    if resume:
        # A resumed run continues with its saved settings; a config file and overrides still apply.
        saved = os.path.join(out, "config.json")
        if ckpt.latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}; "
                                    "run without --resume to start a new run.")
        if os.path.isfile(saved):
            with open(saved) as f:
                base = json.load(f)
    vlm_cfg, train_cfg = settings.resolve(preset, config_file, overrides, base=base)
    if train_cfg.lora_rank:
        lora.check_run(vlm_cfg, train_cfg)
    reads = [check_data(d, train_cfg.image_folder, train_cfg.strict) for d in (train_cfg.data, train_cfg.val_data) if d]
    evaluation.resolve_task(train_cfg)  # an eval_task the data does not have: refused before anything
    _check_out(out)

    info = dist.init()
    if info.is_main:
        print("data: " + " | validation: ".join(reads), flush=True)
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
            ckpt.write_run_config(out, settings.to_dict(vlm_cfg, train_cfg))
        dist.barrier(info)
        try:
            train(vlm_cfg, train_cfg, out, resume=resume, info=info)
        except Exception:
            if created:
                _remove_refused_run(out)
            raise
    finally:
        dist.shutdown()
    return 0


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a folder; give a folder for the run.")


def _remove_refused_run(out: str) -> None:
    """The run folder this call created, removed again when the run stopped before it trained
    anything worth keeping: the data or a setting was refused once the model and the data were
    built (bad data content, a warm-up the data cannot have, ...). A folder holding a checkpoint,
    a final model or a logged metric stays, and so does any folder that existed before."""
    from nanovlm.train import checkpoint as ckpt

    kept = (ckpt.list_checkpoints(out) or os.path.isdir(os.path.join(out, "checkpoints", "best"))
            or os.path.isdir(os.path.join(out, "final")))
    metrics = os.path.join(out, "metrics.jsonl")
    if kept or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        return
    shutil.rmtree(out, ignore_errors=True)
