"""Settings: preset < config file < key=value, and one clear sentence for every bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from nanovlm.cli import main
from nanovlm.config import DEFAULT_PRESET, PRESETS, ConfigError
from nanovlm.train.settings import resolve, to_dict


def test_precedence_preset_then_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  lm_n_blocks: 3\ntrain:\n  batch_size: 7\n  lr_mp: 1\nseed: 5\n")
    vlm, train = resolve("tiny", str(path), ["batch_size=9", "precision=fp32", "compile=false"])
    assert train.batch_size == 9  # the command line wins over the file
    assert train.lr_mp == 1.0 and isinstance(train.lr_mp, float)  # an int in a float field is fine
    assert train.seed == 5  # flat keys find their section
    assert vlm.lm_n_blocks == 3
    assert train.max_training_steps == PRESETS["tiny"]["train"]["max_training_steps"]  # from the preset
    assert vlm.vit_hidden_dim == PRESETS["tiny"]["model"]["vit_hidden_dim"]
    assert train.compile == "off" and train.precision == "fp32"


def test_json_file_and_optional_values(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"image_folder": "imgs"}}))
    _, train = resolve("tiny", str(path), [])
    assert train.image_folder == "imgs"
    _, train = resolve("tiny", str(path), ["image_folder=none"])
    assert train.image_folder is None


def test_override_values_are_parsed_to_the_field_type():
    vlm, train = resolve("tiny", None, ["lr_mp=3e-4", "strict=TRUE", "data=some/file.jsonl", "vit_n_blocks=1"])
    assert train.lr_mp == 3e-4 and train.strict is True and train.data == "some/file.jsonl"
    assert vlm.vit_n_blocks == 1


def test_saved_config_replaces_the_preset_and_rederives_fields():
    vlm, train = resolve("tiny", None, ["batch_size=3"])
    base = to_dict(vlm, train)
    vlm2, train2 = resolve("does-not-matter", None, ["vit_img_size=64", "max_img_size=64"], base=base)
    assert train2.batch_size == 3
    assert vlm2.mp_image_token_length == 16  # recomputed for the larger image


@pytest.mark.parametrize("overrides, message", [
    (["batch_sise=4"], "unknown setting 'batch_sise': it is neither a VLMConfig nor a TrainConfig field. "
                       "Did you mean 'batch_size'?"),
    (["batch_size=four"], "batch_size must be an integer, got 'four' on the command line."),
    (["lr_mp=fast"], "lr_mp must be a number, got 'fast' on the command line."),
    (["compile=maybe"], "compile must be one of auto, on, off (or true/false), got 'maybe'."),
    (["batch_size"], "override 'batch_size' must look like key=value (e.g. batch_size=16)."),
    (["precision=fp16"], "precision must be one of auto, fp32, bf16, got 'fp16'."),
    (["batch_size=0"], "batch_size must be a positive integer, got 0."),
    (["vit_n_heads=5"], "vit_n_heads (5) must divide vit_hidden_dim (32)."),
    (["keep_last=-1"], "keep_last must be an integer >= 0, got -1."),
    (["vision_warmup_steps=-3"], "vision_warmup_steps must be an integer >= 0 (0: from vision_warmup_epochs), got -3."),
    (["vision_warmup_lr=0"], "vision_warmup_lr must be > 0, got 0.0."),
    (["vision_warmup_batch_size=0"], "vision_warmup_batch_size must be a positive integer, got 0."),
])
def test_bad_overrides_name_the_setting(overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve("tiny", None, overrides)
    assert str(e.value) == message


def test_bad_config_files(tmp_path):
    wrong_type = tmp_path / "a.yaml"
    wrong_type.write_text("train:\n  batch_size: '8'\n")
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer, got '8' in config file .*a\.yaml\.$"):
        resolve("tiny", str(wrong_type), [])
    unknown = tmp_path / "b.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        resolve("tiny", str(unknown), [])
    misplaced = tmp_path / "c.yaml"
    misplaced.write_text("model:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match="'batch_size' in section 'model' of .* belongs in section 'train'."):
        resolve("tiny", str(misplaced), [])
    not_yaml = tmp_path / "d.yaml"
    not_yaml.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve("tiny", str(not_yaml), [])
    with pytest.raises(FileNotFoundError, match=r"^config file .*missing\.yaml does not exist\.$"):
        resolve("tiny", str(tmp_path / "missing.yaml"), [])


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    return err


def test_cli_errors_are_one_sentence(capsys, tmp_path):
    out = str(tmp_path / "run")
    assert _cli_error(capsys, ["train", "--preset", "nope", "--out", out]).startswith(
        "nanovlm: error: unknown preset 'nope'; choose one of: easyvqa, ")
    assert _cli_error(capsys, ["train", "--out", out, "epochs=3"]).startswith(
        "nanovlm: error: unknown setting 'epochs'")
    assert _cli_error(capsys, ["train", "--out", out, "batch_size=1.5"]) == (
        "nanovlm: error: batch_size must be an integer, got '1.5' on the command line.")
    missing = str(tmp_path / "nothing.jsonl")
    assert _cli_error(capsys, ["train", "--out", out, f"data={missing}"]) == (
        f"nanovlm: error: data file {missing} does not exist.")
    assert _cli_error(capsys, ["train", "--out", out, "--resume"]) == (
        f"nanovlm: error: --resume: no checkpoint in {out}/checkpoints; run without --resume to start a new run.")


# ------------------------------------------------------------ one parser: booleans, presets, listing
BOOL_TEXT = [("true", True), ("TRUE", True), ("yes", True), ("On", True), ("1", True),
             ("false", False), ("No", False), ("OFF", False), ("0", False)]


@pytest.mark.parametrize("text, value", BOOL_TEXT)
def test_booleans_read_the_same_in_train_and_in_data_preview(monkeypatch, text, value):
    _, train = resolve("tiny", None, [f"strict={text}", f"packing={text}"])
    assert train.strict is value and train.packing is value

    import nanovlm.data.preview as preview_module

    seen = {}
    monkeypatch.setattr(preview_module, "preview", lambda data, out, n, **kw: seen.update(kw))
    assert preview_module.run_preview(preset="tiny", overrides=["data=easyvqa", f"strict={text}",
                                                                f"vit_cls_flag={text}"]) == 0
    assert seen["train_cfg"].strict is value and seen["vlm_cfg"].vit_cls_flag is value


def test_a_bad_boolean_gets_the_same_sentence_in_train_and_in_data_preview():
    from nanovlm.data.preview import run_preview

    message = "strict must be true or false (or yes/no, on/off, 1/0), got 'maybe' on the command line."
    with pytest.raises(ConfigError) as train_error:
        resolve("tiny", None, ["strict=maybe"])
    with pytest.raises(ConfigError) as preview_error:
        run_preview(preset="tiny", overrides=["data=easyvqa", "strict=maybe"])
    assert str(train_error.value) == str(preview_error.value) == message


def test_data_preview_parses_numbers_and_none_like_train(monkeypatch):
    import nanovlm.data.preview as preview_module

    seen = {}
    monkeypatch.setattr(preview_module, "preview", lambda data, out, n, **kw: seen.update(kw))
    preview_module.run_preview(preset="tiny", overrides=["data=easyvqa", "max_img_size=64", "lr_mp=3e-4",
                                                         "image_folder=none", "seed=3", "max_count=7"])
    assert seen["vlm_cfg"].max_img_size == 64 and seen["train_cfg"].lr_mp == 3e-4
    assert seen["train_cfg"].image_folder is None and seen["seed"] == 3 and seen["max_count"] == 7
    with pytest.raises(ConfigError, match=r"^max_img_size must be an integer, got 'big' on the command line\.$"):
        preview_module.run_preview(preset="tiny", overrides=["data=easyvqa", "max_img_size=big"])


def test_unknown_preset_is_one_sentence_everywhere(capsys, tmp_path):
    from nanovlm.config import VLMConfig
    from nanovlm.data.preview import run_preview

    expected = f"unknown preset 'nope'; choose one of: {', '.join(sorted(PRESETS))}."
    messages = []
    for call in (lambda: VLMConfig.from_preset("nope"), lambda: resolve("nope", None, []),
                 lambda: run_preview(preset="nope", overrides=["data=easyvqa"])):
        with pytest.raises(ConfigError) as e:
            call()
        messages.append(str(e.value))
    messages.append(_cli_error(capsys, ["train", "--preset", "nope", "--out", str(tmp_path / "r")])
                    .removeprefix("nanovlm: error: "))
    assert messages == [expected] * 4


def _listing(capsys, *argv) -> str:
    assert main(["train", *argv, "--list-settings"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _rows(text: str, title: str) -> dict[str, list[str]]:
    """name -> [type, value, meaning] of the section whose title starts with `title`."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(title))
    rows = {}
    for line in lines[start + 2:]:  # past the section title and the column header
        if not line.strip():
            break
        name, kind, value, meaning = re.split(r"\s{2,}", line.strip())
        rows[name] = [kind, value, meaning]
    return rows


def _as_written(value) -> str:
    """How a value reads on the command line: an expectation written apart from the listing code."""
    if value is None:
        return "none"
    if value is True or value is False:
        return str(value).lower()
    if value == "":
        return "''"
    return (json.dumps(value) if isinstance(value, dict) else str(value)).replace("\n", "\\n")


def _listed(rows, name) -> tuple[str, str]:
    """(value as listed, its mark)."""
    value = rows[name][1]
    return (value[:-2], value[-1]) if value.endswith((" *", " +")) else (value, "")


SECTIONS = [("model settings (VLMConfig)", "VLMConfig", None), ("train settings (TrainConfig)", "TrainConfig", None),
            ("the from-scratch CPU recipe's settings (TrainConfig.recipe)", "RecipeConfig", "recipe"),
            ("LoRA's settings (TrainConfig.lora)", "LoraConfig", "lora")]


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_list_settings_shows_the_presets_values_and_marks_what_it_set(capsys, preset):
    """Every setting once, in its section, with the value the run under the preset starts from
    (the resolved configs a run folder's config.json holds), marked where the preset set it."""
    import nanovlm.config as config

    name = preset or DEFAULT_PRESET
    text = _listing(capsys, *(["--preset", preset] if preset else []))
    assert f"--preset {name} starts from" in text.splitlines()[0]
    vlm, train = resolve(name, None, [])
    saved = to_dict(vlm, train)  # what the run saves
    listed = []
    for title, cls, group in SECTIONS:
        rows = _rows(text, title)
        fields = dataclasses.fields(getattr(config, cls))
        expected = [f.name for f in fields if "group" not in f.metadata]
        assert list(rows) == expected  # in the dataclass's order, a group's settings in its section
        listed += expected
        for f in fields:
            if "group" in f.metadata:
                continue
            section = "model" if cls == "VLMConfig" else "train"
            value, mark = _listed(rows, f.name)
            written = _as_written(saved[section][f.name])
            if value.endswith("..."):  # a long value (the chat template, the extra tokens) is cut
                assert len(written) > len(value) and written.startswith(value[:-3]), f.name
            else:
                assert value == written, f.name
            assert mark == ("*" if f.name in PRESETS[name][section] else ""), f.name
            assert rows[f.name][0] == f.type and len(rows[f.name][2]) > 10, f.name
    assert len(listed) == len(set(listed)) == len(saved["model"]) + len(saved["train"])


def test_list_settings_marks_the_command_line_and_the_config_file(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seed: 7\n")
    text = _listing(capsys, "--preset", "tiny", "--config", str(path), "batch_size=3", "image_shift=0.1")
    train, recipe = _rows(text, "train settings ("), _rows(text, "the from-scratch CPU recipe's settings")
    assert _listed(train, "batch_size") == ("3", "+") and _listed(train, "seed") == ("7", "+")
    assert _listed(recipe, "image_shift") == ("0.1", "+") and _listed(recipe, "vision_warmup") == ("off", "*")


def test_list_settings_names_every_preset_with_its_description(capsys):
    from nanovlm.config import PRESET_DESCRIPTIONS

    text = _listing(capsys)
    presets = text[text.index("presets (--preset NAME):"):].splitlines()[1:]
    assert [line.split()[0] for line in presets] == list(PRESETS)
    for line in presets:
        name = line.split()[0]
        assert PRESET_DESCRIPTIONS[name] in line
    assert [line for line in presets if line.endswith("(the default)")] == [
        next(line for line in presets if line.split()[0] == DEFAULT_PRESET)]


def test_train_help_names_the_presets_and_list_settings(capsys):
    try:
        code = main(["train", "--help"])
    except SystemExit as e:  # argparse's own exit after printing the help
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert "--list-settings" in out
    for name in PRESETS:
        assert f"\n  {name} " in out, name


# ------------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize("key, meant", [
    ("lr", "'lr_mp', 'lr_vision_backbone', 'lr_language_backbone' or 'min_lr_ratio'"),
    ("epochs", "'vision_warmup_epochs' or 'max_epochs'"),
    ("warmup", "'warmup_ratio', 'vision_warmup', 'vision_warmup_steps' or 'vision_warmup_epochs'"),
])
def test_an_unknown_setting_suggests_the_names_it_may_mean(key, meant):
    with pytest.raises(ConfigError) as e:
        resolve("tiny", None, [f"{key}=abc"])
    assert str(e.value) == f"unknown setting {key!r}: it is neither a VLMConfig nor a TrainConfig field. " \
                           f"Did you mean {meant}?"


@pytest.mark.parametrize("argv, written", [
    (["--max_training_steps", "20"], "--max_training_steps is a setting, not an option: write max_training_steps=20"),
    (["--max-training-steps=20"], "--max-training-steps is a setting, not an option: write max_training_steps=20"),
    (["--lr_mp"], "--lr_mp is a setting, not an option: write lr_mp=VALUE"),
])
def test_a_setting_typed_as_an_option_says_how_to_write_it(capsys, argv, written):
    assert main(["train", "--preset", "tiny", *argv]) == 1
    assert capsys.readouterr().err.strip() == f"nanovlm train: error: {written} (without the dashes)."


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nanovlm {version('nanovlm')}"
