"""A checkpoint directory as the original nanoVLM wrote it loads unchanged and gives the logits
of the model that wrote it.

The original wrote `config.json` as `asdict(VLMConfig)` (flat, with derived fields such as
`lm_vocab_size`, `extra_token_amount`, `mp_image_token_length` spelled out, and keys this
project no longer knows) and `model.safetensors` from the full state dict: `vision_encoder.*`,
`MP.*`, `decoder.*`, including the `decoder.rotary_embd.inv_freq` buffer and, with tied weights,
`decoder.head.weight` (safetensors' `save_model` may keep only one name of a tied pair).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from nanovlm.config import VLMConfig
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.weights.common import WeightLoadError

LEGACY_CONFIG = {
    "vit_hidden_dim": 32, "vit_inter_dim": 128, "vit_patch_size": 8, "vit_img_size": 32, "vit_n_heads": 2,
    "vit_dropout": 0.0, "vit_n_blocks": 2, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
    "vit_model_type": "google/siglip-base-patch16-224",
    "lm_hidden_dim": 64, "lm_inter_dim": 128, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
    "lm_max_position_embeddings": 8192, "lm_base_vocab_size": 100, "extra_token_amount": 1, "lm_vocab_size": 101,
    "lm_n_heads": 4, "lm_n_kv_heads": 2, "lm_dropout": 0.0, "lm_n_blocks": 2, "lm_attn_scaling": 1.0,
    "lm_max_length": 128, "lm_use_tokens": False, "lm_tie_weights": True,
    "lm_model_type": "HuggingFaceTB/SmolLM2-135M-Instruct", "lm_tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "lm_chat_template": "{% for message in messages %}{{ message['content'] }}{% endfor %}",
    "mp_pixel_shuffle_factor": 2, "mp_image_token_length": 4,
    "vlm_extra_tokens": {"image_token": "<|image|>"}, "vlm_load_backbone_weights": True,
    "vlm_checkpoint_path": "checkpoints", "hf_repo_name": "nanoVLM",
    # Keys of other nanoVLM versions this project does not know: a warning, not a crash.
    "IMAGE_TOKEN_LENGTH": 4, "TOTAL_SEQUENCE_LENGTH": 128,
}


def write_legacy(directory, model, head_only=False):
    """What the original nanoVLM's save_pretrained left on disk."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LEGACY_CONFIG, indent=4))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    head_dim = model.cfg.lm_head_dim
    exponents = torch.arange(0, head_dim, 2).float() / head_dim
    state["decoder.rotary_embd.inv_freq"] = 1.0 / (model.cfg.lm_re_base ** exponents)
    assert "decoder.head.weight" in state  # the tied head is its own key in a state dict
    if head_only:
        del state["decoder.token_embedding.weight"]
    save_file(state, directory / "model.safetensors")


@pytest.fixture
def writer():
    with pytest.warns(UserWarning, match="IMAGE_TOKEN_LENGTH, TOTAL_SEQUENCE_LENGTH"):
        cfg = VLMConfig.from_dict(LEGACY_CONFIG)
    model = VisionLanguageModel(cfg, load_backbone=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(model):
    n = model.cfg.mp_image_token_length
    image = model.image_token_id
    ids = torch.tensor([[5, 6, *[image] * n, 7, 8, 9], [10, *[image] * n, 11, 12, 13, 14]])
    images = torch.rand(2, 3, 32, 32)
    return ids, images


@pytest.mark.parametrize("head_only", [False, True], ids=["embedding+head", "head-only"])
def test_legacy_checkpoint_gives_same_logits(tmp_path, writer, head_only):
    write_legacy(tmp_path / "ckpt", writer, head_only=head_only)
    with pytest.warns(UserWarning, match="ignoring unknown keys IMAGE_TOKEN_LENGTH, TOTAL_SEQUENCE_LENGTH"):
        loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.lm_vocab_size == 101 and loaded.cfg.mp_image_token_length == 4
    assert loaded.decoder.head.weight is loaded.decoder.token_embedding.weight
    ids, images = inputs(writer)
    with torch.no_grad():
        expected, _ = writer(ids, images)
        logits, _ = loaded(ids, images)
    torch.testing.assert_close(logits, expected)


def test_legacy_checkpoint_missing_tensor(tmp_path, writer):
    write_legacy(tmp_path / "ckpt", writer)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    del state["MP.proj.weight"]
    state["decoder.blocks.0.attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    with pytest.warns(UserWarning), pytest.raises(WeightLoadError) as err:
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    err.match(r"missing tensors: MP\.proj\.weight")
    err.match(r"unexpected tensors: decoder\.blocks\.0\.attn\.q_proj\.bias")
