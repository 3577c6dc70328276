"""SigLIP / SigLIP2 vision weights: our ViT equals transformers' vision tower for the same
weights, whichever layout the directory holds; every bad input gets a clear error."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanovlm.config import VLMConfig
from nanovlm.models.vision_transformer import ViT
from nanovlm.sources import SourceError
from nanovlm.weights.common import WeightLoadError
from nanovlm.weights.hf_siglip import config_from_source

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
              layer_norm_eps=1e-6)


def perturb(model):
    """Random weights everywhere (LayerNorm gains and biases too), so every tensor matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def vit_cfg(path, **overrides):
    fields = dict(vit_hidden_dim=32, vit_inter_dim=96, vit_patch_size=8, vit_img_size=32, vit_n_heads=4,
                  vit_n_blocks=2, vit_ln_eps=1e-6, vit_model_type=str(path), lm_hidden_dim=64, lm_inter_dim=128,
                  lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_model_type="", max_img_size=32)
    return VLMConfig(**{**fields, **overrides})


def siglip_vision(path, image_size=32, **overrides):
    config = transformers.SiglipVisionConfig(**{**VISION, **overrides}, image_size=image_size,
                                             attn_implementation="eager")
    model = perturb(transformers.SiglipVisionModel(config))
    model.save_pretrained(path)
    return model


@pytest.fixture
def vision_dir(tmp_path):
    path = tmp_path / "siglip-vision"
    return path, siglip_vision(path)


def test_vision_model_parity(vision_dir):
    path, hf = vision_dir
    # The config can be filled in from the checkpoint itself.
    fields = config_from_source(str(path))
    assert fields == dict(vit_hidden_dim=32, vit_inter_dim=96, vit_n_heads=4, vit_n_blocks=2, vit_patch_size=8,
                          vit_ln_eps=1e-6, vit_img_size=32, vit_hidden_act="gelu_pytorch_tanh")
    cfg = vit_cfg(path)
    ours = ViT.from_pretrained(cfg)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixels).last_hidden_state)


def test_exact_gelu_parity_and_activation_errors(tmp_path):
    """A tower with the exact GELU loads into vit_hidden_act="gelu" and matches; a config with the
    other GELU, or a checkpoint with an activation this ViT lacks, is refused by name."""
    hf = siglip_vision(tmp_path / "exact", hidden_act="gelu")
    assert config_from_source(str(tmp_path / "exact"))["vit_hidden_act"] == "gelu"
    ours = ViT.from_pretrained(vit_cfg(tmp_path / "exact", vit_hidden_act="gelu"))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixels).last_hidden_state)
    with pytest.raises(WeightLoadError, match="vit_hidden_act is 'gelu_pytorch_tanh' but the checkpoint has 'gelu'"):
        ViT.from_pretrained(vit_cfg(tmp_path / "exact"))
    siglip_vision(tmp_path / "quick", hidden_act="quick_gelu")
    with pytest.raises(WeightLoadError, match="hidden_act is 'quick_gelu'; this ViT implements 'gelu_pytorch_tanh' "
                                              "and 'gelu'"):
        ViT.from_pretrained(vit_cfg(tmp_path / "quick"))


def test_transformers4_layout_with_prefix(vision_dir):
    # transformers 4 wrote SiglipVisionModel keys under `vision_model.`; such files load too.
    path, hf = vision_dir
    state = load_file(path / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in state.items()}, path / "model.safetensors")
    ours = ViT.from_pretrained(vit_cfg(path))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixels).last_hidden_state)


def test_two_tower_parity_sharded(tmp_path):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = transformers.SiglipConfig(text_config=text, vision_config={**VISION, "image_size": 32})
    hf = perturb(transformers.SiglipModel(config))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = ViT.from_pretrained(vit_cfg(tmp_path))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf.vision_model(pixels).last_hidden_state)


def test_position_interpolation(vision_dir):
    """A 48px ViT from a 32px checkpoint: positions are resized bicubically, as transformers
    does with interpolate_pos_encoding=True."""
    path, hf = vision_dir
    ours = ViT.from_pretrained(vit_cfg(path, vit_img_size=48))
    table = hf.embeddings.position_embedding.weight.detach()  # (16, D): a 4x4 grid
    manual = F.interpolate(table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(ours.patch_embedding.position_embedding.detach(), manual)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixels, interpolate_pos_encoding=True).last_hidden_state)


def naflex_patches(pixels, patch):
    """(B, C, H, W) -> (B, n_patches, patch * patch * C) in NaFlex's (row, column, channel) order."""
    B, C, H, W = pixels.shape
    x = pixels.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


@pytest.mark.parametrize("img_size", [32, 48])
def test_siglip2_naflex_parity(tmp_path, img_size):
    config = transformers.Siglip2VisionConfig(**VISION, num_patches=16, attn_implementation="eager")
    hf = perturb(transformers.Siglip2VisionModel(config))
    hf.save_pretrained(tmp_path)
    assert config_from_source(str(tmp_path))["vit_img_size"] == 32
    ours = ViT.from_pretrained(vit_cfg(tmp_path, vit_img_size=img_size))
    pixels = torch.randn(2, 3, img_size, img_size)
    grid = img_size // 8
    with torch.no_grad():
        expected = hf(pixel_values=naflex_patches(pixels, 8), pixel_attention_mask=torch.ones(2, grid * grid),
                      spatial_shapes=torch.tensor([[grid, grid]] * 2)).last_hidden_state
        torch.testing.assert_close(ours(pixels), expected)


def test_caller_config_not_mutated(vision_dir):
    path, _ = vision_dir
    cfg = vit_cfg(path, vit_img_size=48)
    before = cfg.to_dict()
    ViT.from_pretrained(cfg)
    assert cfg.to_dict() == before


# ---------------------------------------------------------------------------- errors
def test_architecture_mismatch_names_fields(vision_dir):
    path, _ = vision_dir
    with pytest.raises(WeightLoadError, match=r"vit_inter_dim is 128 but the checkpoint has 96; "
                                              r"vit_n_heads is 2 but the checkpoint has 4"):
        ViT.from_pretrained(vit_cfg(path, vit_n_heads=2, vit_inter_dim=128))


def test_cls_flag_refused(vision_dir):
    path, _ = vision_dir
    with pytest.raises(WeightLoadError, match="vit_cls_flag is True but SigLIP has no CLS token"):
        ViT.from_pretrained(vit_cfg(path, vit_cls_flag=True))


def test_missing_unexpected_misshaped_all_listed(vision_dir):
    path, _ = vision_dir
    state = load_file(path / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.weight"]
    state["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["post_layernorm.bias"] = torch.zeros(31)
    save_file(state, path / "model.safetensors")
    with pytest.raises(WeightLoadError) as err:
        ViT.from_pretrained(vit_cfg(path))
    err.match(r"missing tensors: blocks\.1\.mlp\.fc2\.weight")
    err.match(r"unexpected tensors: encoder\.layers\.0\.self_attn\.extra\.weight")
    err.match(r"mis-shaped tensors: layer_norm\.bias: file has \(31,\), model needs \(32,\)")


def test_unfusable_qkv_reported(vision_dir):
    path, _ = vision_dir
    state = load_file(path / "model.safetensors")
    state["encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 16)
    save_file(state, path / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"blocks\.0\.attn\.qkv_proj\.weight .*cannot fuse tensors of shapes"):
        ViT.from_pretrained(vit_cfg(path))


def test_not_a_safetensors_file(vision_dir):
    path, _ = vision_dir
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightLoadError, match="model.safetensors is not a safetensors file"):
        ViT.from_pretrained(vit_cfg(path))


def test_no_weights_file(vision_dir):
    path, _ = vision_dir
    os.remove(path / "model.safetensors")
    with pytest.raises(WeightLoadError, match="has neither model.safetensors nor model.safetensors.index.json"):
        ViT.from_pretrained(vit_cfg(path))


def test_not_siglip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(WeightLoadError, match="holds a 'llama' model; only SigLIP / SigLIP2 vision towers"):
        ViT.from_pretrained(vit_cfg(tmp_path))


def test_no_config(tmp_path):
    with pytest.raises(WeightLoadError, match="has no config.json"):
        ViT.from_pretrained(vit_cfg(tmp_path))


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(WeightLoadError, match="is not a directory"):
        ViT.from_pretrained(vit_cfg(path))


def test_nonexistent_path(tmp_path):
    with pytest.raises(SourceError, match=".*/nothing/here: no such file or directory; "):
        ViT.from_pretrained(vit_cfg(tmp_path / "nothing" / "here"))


def test_hub_id_offline(tmp_path):
    with pytest.raises(SourceError, match="^google/siglip-base-patch16-224 is not a local directory, and "
                                          "HF_HUB_OFFLINE=1 forbids downloading it from the hub; "):
        ViT.from_pretrained(vit_cfg("google/siglip-base-patch16-224"))
