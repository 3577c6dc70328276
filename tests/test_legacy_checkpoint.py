"""A checkpoint directory written by the original nanoVLM loads unchanged and gives the logits of
the model that wrote it.

`fixtures/nanovlm_original/` was written by the original's own code (its save_pretrained; see the
README there): `config.json` is `asdict(VLMConfig)` (flat, derived fields such as `lm_vocab_size`
and `extra_token_amount` spelled out), `model.safetensors` its state dict through safetensors'
`save_model`, which keeps one name of the tied embedding/head pair (`decoder.head.weight`) and the
`decoder.rotary_embd.inv_freq` buffer. `expected.safetensors` holds a fixed input and the logits
the original's forward gave for it. The other tests edit a copy of that directory.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.common import WeightLoadError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nanovlm_original")
ORIGINAL = os.path.join(FIXTURE, "checkpoint")

# fp32 round-off (eps 1.2e-7): the deepest path is ~27 chained reductions (ViT, projector, LM,
# head) of length <= 192 (the patch embedding), so a random-walk estimate is
# eps * sqrt(192) * sqrt(27) * max|logit| (3.9) ~ 3.4e-5; we allow 1e-4 (seen: 2e-6). A wrong
# layer, RoPE or image splice moves logits by ~1.
TOL = dict(atol=1e-4, rtol=1e-4)


def expected():
    return load_file(os.path.join(FIXTURE, "expected.safetensors"))


def logits_of(model):
    e = expected()
    with torch.no_grad():
        logits, _ = model.eval()(e["input_ids"], e["images"])
    return logits


def copy_of_original(tmp_path):
    return shutil.copytree(ORIGINAL, tmp_path / "ckpt")


def test_the_originals_checkpoint_gives_the_originals_logits():
    with open(os.path.join(ORIGINAL, "config.json")) as f:
        assert "lm_vocab_size" in json.load(f)  # a config as the original wrote it
    assert "decoder.token_embedding.weight" not in load_file(os.path.join(ORIGINAL, "model.safetensors"))
    loaded = VisionLanguageModel.from_pretrained(ORIGINAL)
    assert loaded.cfg.lm_vocab_size == 166 and loaded.cfg.mp_image_token_length == 4
    assert loaded.image_token_id == 100  # the original's tokenizer put its extra tokens after 100 words
    assert loaded.decoder.head.weight is loaded.decoder.token_embedding.weight
    torch.testing.assert_close(logits_of(loaded), expected()["logits"], **TOL)


def test_both_names_of_the_tied_pair_and_unknown_config_keys(tmp_path):
    """A state dict saved with both names of the tied pair (safetensors' `save_file` of the full
    state dict), and a config.json with keys of other nanoVLM versions: a warning, not a crash."""
    ckpt = copy_of_original(tmp_path)
    state = load_file(ckpt / "model.safetensors")
    state["decoder.token_embedding.weight"] = state["decoder.head.weight"].clone()
    save_file(state, ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(IMAGE_TOKEN_LENGTH=4, TOTAL_SEQUENCE_LENGTH=128)
    (ckpt / "config.json").write_text(json.dumps(config, indent=4))
    with pytest.warns(UserWarning, match="ignoring unknown keys IMAGE_TOKEN_LENGTH, TOTAL_SEQUENCE_LENGTH"):
        loaded = VisionLanguageModel.from_pretrained(ckpt)
    torch.testing.assert_close(logits_of(loaded), expected()["logits"], **TOL)


def test_legacy_checkpoint_missing_tensor(tmp_path):
    ckpt = copy_of_original(tmp_path)
    state = load_file(ckpt / "model.safetensors")
    del state["MP.proj.weight"]
    state["decoder.blocks.0.attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(WeightLoadError) as err:
        VisionLanguageModel.from_pretrained(ckpt)
    err.match(r"missing tensors: MP\.proj\.weight")
    err.match(r"unexpected tensors: decoder\.blocks\.0\.attn\.q_proj\.bias")
