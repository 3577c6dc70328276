import dataclasses
import json
import re
import warnings

import pytest

from nanovlm.config import PRESETS, ConfigError, TrainConfig, VLMConfig, setting_fields


def test_defaults_derive_fields():
    cfg = VLMConfig()
    assert cfg.vit_inter_dim == 4 * cfg.vit_hidden_dim
    assert cfg.extra_token_amount == 66
    assert cfg.lm_vocab_size == 49152 + 66
    assert cfg.mp_image_token_length == (224 // 16 // 2) ** 2 == 49


@pytest.mark.parametrize("name, tokens", [("nanovlm-222m", 49), ("nanovlm-460m", 64), ("easyvqa", 16), ("tiny", 4)])
def test_presets_build(name, tokens):
    cfg = VLMConfig.from_preset(name)
    assert cfg.mp_image_token_length == tokens
    TrainConfig.from_dict(PRESETS[name]["train"])


def test_json_round_trip(tmp_path):
    cfg = VLMConfig.from_preset("easyvqa", lm_n_blocks=3)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert VLMConfig.from_json(path) == cfg


def test_unknown_keys_warn_and_are_ignored(tmp_path):
    data = VLMConfig.from_preset("tiny").to_dict() | {"IMAGE_TOKEN_LENGTH": 49, "made_up": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring unknown keys IMAGE_TOKEN_LENGTH, made_up"):
        cfg = VLMConfig.from_json(path)
    assert cfg == VLMConfig.from_preset("tiny")


@pytest.mark.parametrize("overrides, message", [
    (dict(vit_patch_size=7), r"vit_patch_size \(7\) must divide vit_img_size \(32\)"),
    (dict(mp_pixel_shuffle_factor=3), r"mp_pixel_shuffle_factor \(3\) must divide the patch grid side"),
    (dict(vit_n_heads=3), r"vit_n_heads \(3\) must divide vit_hidden_dim \(32\)"),
    (dict(lm_n_heads=3), r"lm_n_heads \(3\) must divide lm_hidden_dim \(64\)"),
    (dict(lm_n_kv_heads=3), r"lm_n_kv_heads \(3\) must divide lm_n_heads \(4\)"),
    (dict(mp_image_token_length=5), r"mp_image_token_length is 5 but the image gives"),
    (dict(lm_vocab_size=100), r"lm_vocab_size \(100\) is smaller than"),
    (dict(extra_token_amount=3), r"extra_token_amount is 3 but vlm_extra_tokens has 66 entries"),
    (dict(lm_n_blocks=0), r"lm_n_blocks must be a positive integer, got 0"),
    (dict(vit_hidden_dim="big"), r"vit_hidden_dim must be a positive integer, got 'big'"),
    (dict(lm_max_length=10_000), r"lm_max_length \(10000\) exceeds lm_max_position_embeddings"),
    (dict(vlm_extra_tokens={"x": "<x>"}), r"vlm_extra_tokens must be a dict that contains at least 'image_token'"),
    (dict(vit_pixel_mean=0.5), r"vit_pixel_mean and vit_pixel_std must be set together"),
    (dict(vit_pixel_mean=0.5, vit_pixel_std=0.0), r"vit_pixel_std must be > 0, got 0.0"),
    (dict(lm_init_std=0.0), r"lm_init_std must be > 0, got 0.0"),
    (dict(lm_init_std="big"), r"lm_init_std must be a number, got 'big'"),
    (dict(lm_dropout=None), r"lm_dropout must be a number, got None"),
    (dict(vit_pixel_mean="0.5", vit_pixel_std=0.5), r"vit_pixel_mean must be a number, got '0.5'"),
    (dict(vit_hidden_act="relu"), r"vit_hidden_act must be one of gelu_pytorch_tanh, gelu, got 'relu'"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        VLMConfig.from_preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of"):
        VLMConfig.from_preset("nope")


def test_replace_returns_new_config_and_rederives():
    cfg = VLMConfig.from_preset("tiny")
    bigger = cfg.replace(vit_img_size=64)
    assert cfg.vit_img_size == 32 and cfg.mp_image_token_length == 4
    assert bigger.mp_image_token_length == 16


def test_train_config_errors():
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)


# A wrong type for any field, given in Python: a ConfigError that names the field, what it must
# be and the value. The bad values and the expected words are chosen from the annotation text
# alone, independently of config.py's checker.
_BAD = {"int": ["a", 2.5, True], "float": ["x", True], "bool": [1, "yes"], "str": [3, True],
        "dict[str, str]": ["x", {"image_token": 3}]}
_SAYS = {"int": "integer", "float": "a number", "bool": "true or false", "str": "(a string|one of)",
         "dict[str, str]": "(mapping|dict)"}


def _wrong_types():
    for cls in (VLMConfig, TrainConfig):
        for name, (_, f) in setting_fields(cls).items():  # a group's settings by their flat names too
            base = f.type.removesuffix(" | None")
            for bad in _BAD[base]:
                if f.name == "compile" and isinstance(bad, bool):
                    continue  # compile also takes the original nanoVLM's booleans (test_compile_setting)
                yield pytest.param(cls, f.name, base, bad, id=f"{f.name}={bad!r}")


@pytest.mark.parametrize("cls, name, base, bad", list(_wrong_types()))
def test_a_wrong_type_for_any_field_names_field_type_and_value(cls, name, base, bad):
    with pytest.raises(ConfigError) as e:
        cls.from_dict({name: bad})
    message = str(e.value)
    assert message.startswith(f"{name} must be "), message
    assert re.search(_SAYS[base], message) and message.endswith(f"got {bad!r}."), message


def test_the_issue_examples():
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr_mp="x")
    assert str(e.value) == "lr_mp must be a number, got 'x'."
    with pytest.raises(ConfigError) as e:
        VLMConfig(vit_hidden_dim="a")
    assert str(e.value) == "vit_hidden_dim must be a positive integer, got 'a'."
    with pytest.raises(ConfigError) as e:
        VLMConfig(lm_eos_token_id=True)  # a bool where an int is meant
    assert str(e.value) == "lm_eos_token_id must be an integer, got True."
    with pytest.raises(ConfigError) as e:
        TrainConfig(compile=1)  # an int where a setting is meant
    assert str(e.value) == "compile must be one of auto, on, off (or true/false), got 1."


def test_compile_setting():
    assert TrainConfig().compile == "auto"
    assert [TrainConfig(compile=v).compile for v in (True, False, "ON", "off", "yes", "0")] == \
        ["on", "off", "on", "off", "on", "off"]
    with pytest.raises(ConfigError) as e:
        TrainConfig(compile="sometimes")
    assert str(e.value) == "compile must be one of auto, on, off (or true/false), got 'sometimes'."


def test_ints_are_stored_as_floats_in_float_fields_and_numpy_ints_as_ints():
    import numpy as np

    cfg = VLMConfig(lm_re_base=10000, lm_n_blocks=np.int64(3))
    assert type(cfg.lm_re_base) is float and cfg.lm_re_base == 10000.0
    assert type(cfg.lm_n_blocks) is int and cfg.lm_n_blocks == 3
    assert VLMConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_train_config_json_round_trip():
    cfg = TrainConfig.from_dict(PRESETS["easyvqa"]["train"])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_setting_and_preset_has_one_line_of_meaning_in_one_place():
    from nanovlm import config
    from nanovlm.config import PRESET_DESCRIPTIONS

    assert not hasattr(config, "TRAIN_HELP") and not hasattr(config, "VLM_HELP")  # the field is the one place
    for cls in (VLMConfig, TrainConfig):
        for name, (_, f) in setting_fields(cls).items():
            assert len(f.metadata["help"]) > 10 and "\n" not in f.metadata["help"], name
    assert sorted(PRESET_DESCRIPTIONS) == sorted(PRESETS)


def test_train_config_holds_the_recipe_and_lora_groups_under_flat_names():
    assert len(dataclasses.fields(TrainConfig)) <= 40
    cfg = TrainConfig.from_dict({"batch_size": 3, "vision_warmup": "off", "max_train_time": 600, "threads": 2,
                                 "lora_rank": 4})
    assert cfg.batch_size == 3 and cfg.recipe.vision_warmup == "off" and cfg.recipe.max_train_time == 600.0
    assert cfg.recipe.threads == 2 and cfg.lora.lora_rank == 4 and cfg.lora.lora_scale_alpha == 8.0
    flat = cfg.to_dict()
    assert flat["vision_warmup"] == "off" and "recipe" not in flat and "lora" not in flat
    assert TrainConfig.from_dict(flat) == cfg
    bigger = cfg.replace(image_shift=0.1, batch_size=5)
    assert (bigger.recipe.image_shift, bigger.batch_size, cfg.recipe.image_shift) == (0.1, 5, 0.0)


def test_a_saved_run_config_of_before_the_groups_still_loads(tmp_path):
    """A config.json's train section holds flat names, as it always did."""
    from nanovlm.train.settings import resolve

    saved = {"model": VLMConfig.from_preset("tiny").to_dict(),
             "train": {"batch_size": 4, "vision_warmup": "off", "vision_warmup_epochs": 25.0, "image_shift": 0.05,
                       "max_train_time": 900.0, "threads": 0, "lora_rank": 0, "lora_targets": "lm"}}
    _, train = resolve(None, None, ["threads=1"], base=saved)
    assert train.recipe.image_shift == 0.05 and train.recipe.threads == 1 and train.batch_size == 4


def test_range_and_choice_rules_come_from_the_field_metadata():
    from nanovlm.config import RecipeConfig

    f = RecipeConfig.__dataclass_fields__["image_shift"]
    assert (f.metadata["min"], f.metadata["below"]) == (0, 0.5)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"keep_last": -1})  # a rule in the table, with no hand-written check
    assert str(e.value) == "keep_last must be an integer >= 0, got -1."
