"""The small preset's packaged vision encoder (`packaged:small-vit`): what it loads, that it reads, how it is made."""

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import reading_data
from nanovlm.config import VLMConfig
from nanovlm.data.processors import image_processor_for
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.models.vision_transformer import ViT
from nanovlm.sources import PACKAGED_SMALL_VIT, SMALL_VIT_DIR
from nanovlm.train import settings

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "pretrain_vision.py")


def small_cfg(**over) -> VLMConfig:
    return settings.resolve("small", None, [f"{k}={v}" for k, v in over.items()])[0]


def test_the_small_preset_starts_from_the_packaged_encoder():
    cfg = small_cfg()
    assert cfg.vit_model_type == PACKAGED_SMALL_VIT and cfg.vlm_load_backbone_weights and not cfg.lm_model_type
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg)
    shipped = load_file(os.path.join(SMALL_VIT_DIR, "model.safetensors"))
    ours = model.vision_encoder.state_dict()
    assert torch.equal(ours["layer_norm.weight"], shipped["post_layernorm.weight"])
    q, k, v = (shipped[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(ours["blocks.1.attn.qkv_proj.weight"], torch.cat([q, k, v]))
    # The language model still starts from scratch: the same seed without the encoder builds the same one.
    torch.manual_seed(0)
    fresh = VisionLanguageModel(small_cfg(vit_model_type=""))
    assert torch.equal(fresh.decoder.token_embedding.weight, model.decoder.token_embedding.weight)


def _first_digit_pictures(cfg, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng, proc, images, labels = random.Random(seed), image_processor_for(cfg), [], []
    for _ in range(n):
        img, qa = reading_data.text(rng, ["read"], held_out=False)
        images.append(proc(img)[0][0])
        labels.append(int(qa[0][2][0]))
    return torch.stack(images), torch.tensor(labels)


def _probe_accuracy(encoder: ViT, cfg, x: torch.Tensor, y: torch.Tensor, split: int) -> float:
    """A probe on the frozen encoder's patch tokens (one learned query attending, then a linear layer),
    trained on x[:split], scored on the rest."""
    model = VisionLanguageModel(cfg, load_backbone=False)
    with torch.no_grad():
        feats = encoder(model.normalize_pixels(x))  # (n, patches, dim)
    torch.manual_seed(0)
    query, head = torch.nn.Parameter(torch.zeros(feats.shape[-1])), torch.nn.Linear(feats.shape[-1], 10)
    opt = torch.optim.AdamW([query, *head.parameters()], 1e-2)

    def logits(f: torch.Tensor) -> torch.Tensor:
        return head(((f @ query).softmax(-1).unsqueeze(-1) * f).sum(1))

    for _ in range(300):
        loss = F.cross_entropy(logits(feats[:split]), y[:split])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (logits(feats[split:]).argmax(-1) == y[split:]).float().mean().item()


def test_the_packaged_encoder_tells_digits_apart_where_a_new_one_cannot():
    """A number drawn in a 128x96 picture, fitted to one 64 px tile: its first digit from frozen features."""
    cfg = small_cfg(max_img_size=64)
    x, y = _first_digit_pictures(cfg, 1500, seed=3)
    torch.manual_seed(0)
    shipped, fresh = ViT.from_pretrained(cfg).eval(), ViT(cfg).eval()
    read, guessed = _probe_accuracy(shipped, cfg, x, y, 1200), _probe_accuracy(fresh, cfg, x, y, 1200)
    assert read >= guessed + 0.25, (read, guessed)


def test_the_recipe_writes_an_encoder_the_preset_loads(tmp_path):
    out = tmp_path / "vit"
    proc = subprocess.run([sys.executable, RECIPE, "--pictures", "80", "--steps", "2", "--work", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = small_cfg(vit_model_type=str(out))
    run = VisionLanguageModel.from_pretrained(str(tmp_path / "w" / "run" / "final"))
    loaded = VisionLanguageModel(cfg)
    for name, tensor in run.vision_encoder.state_dict().items():
        assert torch.equal(loaded.vision_encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("seed", [0, 1])
def test_the_recipes_pictures_ask_to_spell_what_they_show(seed):
    sys.path.insert(0, os.path.dirname(RECIPE))
    import pretrain_vision

    img, qa = pretrain_vision.picture(random.Random(seed), pretrain_vision.fonts())
    answers = dict(qa)
    word = answers["What is written in the picture?"]
    assert answers["Spell what is written, character by character."] == " ".join(word)
    assert 1 <= len(word) <= 5 and answers["What colour is the text?"] in pretrain_vision.COLOURS
    assert 32 <= min(img.size) and max(img.size) <= 256
