"""Files a shared filesystem can read: everything nanovlm writes gets the modes the umask allows
(0666 / 0777 minus the umask), also where it goes through a private temporary name first."""

from __future__ import annotations

import os
import stat

import pytest
from test_train_synthetic import run_synthetic

from nanovlm.cli import main
from nanovlm.config import VLMConfig
from nanovlm.fileio import atomic_write_json, atomic_write_text, current_umask, make_temp_dir_beside, replace_dir
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train import checkpoint as ckpt


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_tree_modes(root, umask: int) -> int:
    """Every directory 0777 & ~umask, every file 0666 & ~umask; returns the number of files."""
    assert mode(root) == 0o777 & ~umask, root
    n = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            assert mode(os.path.join(directory, name)) == 0o777 & ~umask, os.path.join(directory, name)
        for name in files:
            assert mode(os.path.join(directory, name)) == 0o666 & ~umask, os.path.join(directory, name)
            n += 1
    return n


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still what the fixture set


def test_atomic_files_and_directories_keep_the_umask_modes(tmp_path, umask):
    atomic_write_json(tmp_path / "report.json", {"a": 1})
    atomic_write_text(tmp_path / "deeper" / "note.txt", "x")
    assert mode(tmp_path / "report.json") == 0o666 & ~umask
    assert mode(tmp_path / "deeper" / "note.txt") == 0o666 & ~umask
    assert mode(tmp_path / "deeper") == 0o777 & ~umask
    tmp = make_temp_dir_beside(tmp_path / "published")
    assert mode(tmp) == 0o777 & ~umask
    with open(os.path.join(tmp, "private.bin"), "wb") as f:  # as a library that writes 0600 would
        f.write(b"1")
    os.chmod(os.path.join(tmp, "private.bin"), 0o600)
    replace_dir(tmp, tmp_path / "published")
    assert assert_tree_modes(tmp_path / "published", umask) == 1


def test_a_model_a_run_folder_and_an_eval_report_are_readable_by_others(tmp_path, umask):
    """save_pretrained (config.json, model.safetensors: safetensors writes 0600, the tokenizer),
    a run folder with step checkpoints, best/ and final/, and an eval report."""
    model = tmp_path / "model"
    VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).save_pretrained(model)
    names = set(os.listdir(model))
    assert {"config.json", "model.safetensors"} <= names and len(names) > 2  # the tokenizer files too
    assert_tree_modes(model, umask)
    assert main(["eval", "--model", str(model), "--task", "easyvqa", "--limit", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "report.json")]) == 0
    assert mode(tmp_path / "report.json") == 0o666 & ~umask

    run = tmp_path / "run"
    os.makedirs(run)
    atomic_write_json(run / "config.json", {"model": {}, "train": {}})
    run_synthetic(run, max_training_steps=4, save_interval=2, eval_interval=2)
    assert ckpt.list_checkpoints(str(run)) and (run / "final").is_dir() and (run / "checkpoints" / "best").is_dir()
    assert_tree_modes(run, umask)
