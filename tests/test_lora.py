"""LoRA: adapters on frozen towers, exactly PEFT's adapters on transformers' Idefics3 model.

- Only the adapters and the projector train; fresh adapters leave the model's output unchanged;
  training steps change only those tensors; merged == unmerged; a fused-qkv adapter is three
  separate adapters over its output slices.
- The adapter files are PEFT's: their key set and shapes are exactly those `peft` itself saves for
  a tiny random `Idefics3ForConditionalGeneration` under the same adapter_config.json, and
  `PeftModel.from_pretrained` on that model (our base weights copied in with a test-local table)
  gives our logits.
- A LoRA run's step checkpoints hold only the trainable tensors; killed + resumed equals the
  uninterrupted run bit for bit, and a resume onto a different base is one clear error.

Tolerances: the comparisons of two computations of the same function in fp32 (merged vs unmerged,
ours vs transformers) use assert_close's fp32 defaults (rtol 1.3e-6, atol 1e-5): a few blocks of
sums of at most 128 products each, ~1e-7 relative apiece.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_train_checkpoint import DiesAfter, Killed
from test_train_synthetic import final_weights, losses, run_synthetic, synthetic_data, tiny_configs

from nanovlm.config import LORA_TARGETS, ConfigError, TrainConfig, VLMConfig, lora_target_names
from nanovlm.models.lora import TARGET_MODULES, LoRALinear, add_lora, adapter_state, is_adapter_parameter, merge_lora
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.train import checkpoint as ckpt
from nanovlm.train.optim import vlm_optimizer
from nanovlm.weights.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TINY = dict(vit_hidden_dim=32, vit_patch_size=8, vit_img_size=32, vit_n_heads=2, vit_n_blocks=2, vit_model_type="",
            lm_hidden_dim=64, lm_inter_dim=128, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_model_type="",
            lm_base_vocab_size=400, lm_tie_weights=False, mp_pixel_shuffle_factor=2, max_img_size=32,
            lm_max_length=64, lm_max_position_embeddings=256, vlm_load_backbone_weights=False)


def tiny_model(**lora) -> VisionLanguageModel:
    model = VisionLanguageModel(VLMConfig(**TINY), load_backbone=False).eval()
    if lora:
        add_lora(model, **lora)
    return model


def randomize_adapters(model, std: float = 0.2) -> None:
    """Fresh adapters change nothing (B = 0); give B values so the update is visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, std)


def inputs(model, batch: int = 2, length: int = 12, seed: int = 1):
    """Token ids with one image per row (its image tokens first), and the images."""
    g = torch.Generator().manual_seed(seed)
    n = model.cfg.mp_image_token_length
    ids = torch.randint(0, model.cfg.lm_base_vocab_size, (batch, length), generator=g)
    ids[:, 1:1 + n] = model.image_token_id
    images = torch.rand(batch, 3, model.cfg.vit_img_size, model.cfg.vit_img_size, generator=g)
    return ids, images


def logits_of(model, ids, images) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, images)[0]


# --------------------------------------------------------------------------------- the module
def test_the_target_table_covers_the_config_names():
    assert tuple(TARGET_MODULES) == LORA_TARGETS
    assert lora_target_names("lm") == LORA_TARGETS[:7]
    assert lora_target_names("vit_fc1, lm_q,lm_attn") == ("lm_q", "lm_k", "lm_v", "lm_o", "vit_fc1")


def test_only_adapters_and_the_projector_train():
    model = tiny_model(rank=4, alpha=8, targets=["lm_q", "lm_down", "vit_qkv"])
    vlm_optimizer(model, TrainConfig.from_dict(dict(lora_rank=4, lora_targets="lm_q,lm_down,vit_qkv")), fused=False)
    trains = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted([f"decoder.blocks.{i}.{m}.{ab}" for i in range(2) for m in ("attn.q_proj", "mlp.down_proj")
                       for ab in ("lora_A", "lora_B")]
                      + [f"vision_encoder.blocks.{i}.attn.qkv_proj.{ab}" for i in range(2)
                         for ab in ("lora_A", "lora_B")]
                      + ["MP.proj.weight"])
    assert trains == expected


def test_fresh_adapters_leave_the_output_unchanged():
    model = tiny_model()
    ids, images = inputs(model)
    before = logits_of(model, ids, images)
    add_lora(model, 4, 8.0, 0.0, LORA_TARGETS)
    assert torch.equal(logits_of(model, ids, images), before)  # B = 0: the update is exactly 0


def test_a_fused_qkv_adapter_is_three_adapters_over_its_output_slices():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12)
    layer = LoRALinear(base, rank=2, alpha=3.0, n_slices=3)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    parts = [x @ layer.lora_A[s].T @ layer.lora_B[s].T * (3.0 / 2) for s in range(3)]  # PEFT's q, k, v adapters
    torch.testing.assert_close(layer(x), base(x) + torch.cat(parts, dim=-1))
    stacked = torch.cat([layer.lora_B[s] @ layer.lora_A[s] for s in range(3)])
    torch.testing.assert_close(layer.delta_weight(), stacked * 1.5)


def test_merged_equals_unmerged():
    model = tiny_model(rank=4, alpha=6.0, targets=LORA_TARGETS)
    randomize_adapters(model)
    ids, images = inputs(model)
    with_adapters = logits_of(model, ids, images)
    base = {k: v.clone() for k, v in model.state_dict_for_saving().items()}
    layer = model.decoder.blocks[0].attn.q_proj
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base["decoder.blocks.0.attn.q_proj.weight"])
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any(is_adapter_parameter(k) for k in model.state_dict())
    torch.testing.assert_close(logits_of(model, ids, images), with_adapters)
    assert not torch.equal(model.state_dict()["decoder.blocks.0.attn.q_proj.weight"],
                           base["decoder.blocks.0.attn.q_proj.weight"])


def test_training_steps_change_only_the_trainable_tensors():
    model = tiny_model(rank=4, alpha=8.0, targets=LORA_TARGETS).train()
    optimizer = vlm_optimizer(model, TrainConfig.from_dict(dict(
        lora_rank=4, lora_targets="all", lr_mp=1e-2, lr_vision_backbone=1e-2, lr_language_backbone=1e-2,
        weight_decay=0.1)), fused=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, images = inputs(model)
    for _ in range(3):
        model(ids, images, targets=ids.roll(-1, dims=1))[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(optimizer.state) == len(trainable)  # optimizer state: trainable tensors only
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != (k in trainable), k


def test_save_and_load_keep_the_adapters_unmerged(tmp_path):
    model = tiny_model(rank=2, alpha=4.0, dropout=0.1, targets=["lm_v", "vit_qkv", "vit_fc2"])
    randomize_adapters(model)
    ids, images = inputs(model)
    model.save_pretrained(tmp_path)
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    assert not any(is_adapter_parameter(k) for k in load_file(tmp_path / "model.safetensors"))
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert loaded.lora_settings == model.lora_settings
    assert all(torch.equal(v, adapter_state(model)[k]) for k, v in adapter_state(loaded).items())
    assert torch.equal(logits_of(loaded, ids, images), logits_of(model, ids, images))


# ------------------------------------------------------------------------------ PEFT, Idefics3
def idefics3_config(cfg: VLMConfig):
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=cfg.vit_hidden_dim, intermediate_size=cfg.vit_inter_dim,
                           num_hidden_layers=cfg.vit_n_blocks, num_attention_heads=cfg.vit_n_heads,
                           image_size=cfg.vit_img_size, patch_size=cfg.vit_patch_size, layer_norm_eps=cfg.vit_ln_eps,
                           hidden_act=cfg.vit_hidden_act),
        text_config=dict(model_type="llama", hidden_size=cfg.lm_hidden_dim, intermediate_size=cfg.lm_inter_dim,
                         num_hidden_layers=cfg.lm_n_blocks, num_attention_heads=cfg.lm_n_heads,
                         num_key_value_heads=cfg.lm_n_kv_heads, vocab_size=cfg.lm_vocab_size,
                         rms_norm_eps=cfg.lm_rms_eps, max_position_embeddings=cfg.lm_max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.lm_re_base},
                         tie_word_embeddings=False),
        scale_factor=cfg.mp_pixel_shuffle_factor, image_token_id=cfg.lm_base_vocab_size, tie_word_embeddings=False)


def idefics3_state(ours: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Our base weights by transformers Idefics3 name (a test-local table: the production one is
    the Idefics3 loader's)."""
    v, t = "model.vision_model.", "model.text_model."
    out = {v + "embeddings.patch_embedding.weight": ours["vision_encoder.patch_embedding.conv.weight"],
           v + "embeddings.patch_embedding.bias": ours["vision_encoder.patch_embedding.conv.bias"],
           v + "embeddings.position_embedding.weight": ours["vision_encoder.patch_embedding.position_embedding"][0],
           "model.connector.modality_projection.proj.weight": ours["MP.proj.weight"],
           t + "embed_tokens.weight": ours["decoder.token_embedding.weight"],
           t + "norm.weight": ours["decoder.norm.weight"],
           "lm_head.weight": ours["decoder.head.weight"]}
    for p in ("weight", "bias"):
        out[f"{v}post_layernorm.{p}"] = ours[f"vision_encoder.layer_norm.{p}"]
        for i in range(cfg.vit_n_blocks):
            a, b = f"vision_encoder.blocks.{i}.", f"{v}encoder.layers.{i}."
            for x, y in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{b}{y}.{p}"] = ours[f"{a}{x}.{p}"]
            for x, part in zip("qkv", ours[f"{a}attn.qkv_proj.{p}"].chunk(3)):
                out[f"{b}self_attn.{x}_proj.{p}"] = part
    for i in range(cfg.lm_n_blocks):
        a, b = f"decoder.blocks.{i}.", f"{t}layers.{i}."
        for x, y in (("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                     ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                     ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                     ("mlp.down_proj", "mlp.down_proj"), ("norm1", "input_layernorm"),
                     ("norm2", "post_attention_layernorm")):
            out[f"{b}{y}.weight"] = ours[f"{a}{x}.weight"]
    return out


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("lm_k", "lm_up", "vit_qkv", "vit_out")])
def test_peft_loads_our_adapters_onto_idefics3_and_gives_our_logits(tmp_path, targets):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    from transformers import Idefics3ForConditionalGeneration

    model = tiny_model(rank=4, alpha=12.0, targets=targets)
    randomize_adapters(model)
    with torch.no_grad():
        model.MP.proj.weight.mul_(1.5)  # a projector changed by training: saved with the adapters
    model.save_pretrained(tmp_path)
    hf_cfg = idefics3_config(model.cfg)

    # The keys and shapes PEFT itself saves for this adapter_config.json on this model.
    fresh = peft.get_peft_model(Idefics3ForConditionalGeneration(hf_cfg), peft.LoraConfig.from_pretrained(tmp_path))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    ours = {k: tuple(v.shape) for k, v in load_file(tmp_path / ADAPTER_WEIGHTS).items()}
    assert ours == expected
    assert any(".vision_model.encoder.layers.1.self_attn.v_proj.lora_B.weight" in k for k in ours)

    # Our base (with the untrained projector) in transformers, our adapters through PEFT: our logits.
    hf = Idefics3ForConditionalGeneration(hf_cfg).eval()
    base = model.state_dict_for_saving()
    base["MP.proj.weight"] = base["MP.proj.weight"] / 1.5
    hf.load_state_dict(idefics3_state(base, model.cfg), strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message).lower()]  # PEFT's missing/unexpected
    ids, images = inputs(model)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, pixel_values=images[:, None], attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(theirs, logits_of(model, ids, images))
    with open(tmp_path / ADAPTER_CONFIG) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 12.0 and config["peft_type"] == "LORA"


# ------------------------------------------------------------------------------------ training
LORA_RUN = dict(lora_rank=4, lora_alpha=6, lora_dropout=0.1, lora_targets="lm_attn,lm_up,vit_qkv,vit_fc2",
                max_training_steps=4, save_interval=2, gradient_accumulation_steps=2, eval_interval=0)


def test_a_lora_run_checkpoints_only_what_trains_and_resumes_exactly(tmp_path):
    run_synthetic(tmp_path / "whole", **LORA_RUN)

    vlm_cfg, train_cfg = tiny_configs(**LORA_RUN)
    data = synthetic_data(vlm_cfg, train_cfg)
    data.train = DiesAfter(data.train, 2 * 3 + 1)  # dies inside step 4, after step 3 was logged
    with pytest.raises(Killed):
        run_synthetic(tmp_path / "broken", data=data, **LORA_RUN)
    step2 = ckpt.latest_checkpoint(str(tmp_path / "broken"))
    assert step2.endswith("step_000002") and ckpt.checkpoint_problem(step2) is None
    saved = load_file(os.path.join(step2, ckpt.TRAINABLE_FILE))
    assert saved and all(is_adapter_parameter(k) or k == "MP.proj.weight" for k in saved)
    assert not os.path.exists(os.path.join(step2, "model.safetensors"))
    optimizer_state = torch.load(os.path.join(step2, ckpt.STATE_PT), weights_only=True)["optimizer"]["state"]
    assert len(optimizer_state) == len(saved)
    with open(os.path.join(step2, ckpt.STATE_JSON)) as f:
        assert len(json.load(f)["lora_base"]["sha256"]) == 64

    summary = run_synthetic(tmp_path / "broken", resume=True, **LORA_RUN)
    assert summary["resumed_at_step"] == 2
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "broken")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    adapters = [load_file(tmp_path / run / "final" / ADAPTER_WEIGHTS) for run in ("whole", "broken")]
    assert adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k])
                                                             for k in adapters[0])
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole")

    final = VisionLanguageModel.from_pretrained(tmp_path / "broken" / "final")
    assert final.lora_settings["targets"] == ["lm_q", "lm_k", "lm_v", "lm_o", "lm_up", "vit_qkv", "vit_fc2"]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter_state(final).items() if k.endswith("B"))

    with pytest.raises(ValueError, match=r"^--resume: the base weights differ from those the LoRA adapters in "
                                         r".*step_000004 were trained on \(the settings seed differ\); resume "
                                         r"with the same base\.$"):
        run_synthetic(tmp_path / "broken", resume=True, **{**LORA_RUN, "seed": 1})
    with pytest.raises(ValueError, match=r"^--resume: .*step_000004 was written with LoRA adapters but this run "
                                         r"has lora_rank=0; resume with the run's own lora settings\.$"):
        run_synthetic(tmp_path / "broken", resume=True, **{**LORA_RUN, "lora_rank": 0})

    # A damaged LoRA checkpoint is named like any other (its weights file is trainable.safetensors).
    step4 = ckpt.step_dir(str(tmp_path / "broken"), 4)
    with open(os.path.join(step4, ckpt.TRAINABLE_FILE), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 5)
    assert ckpt.checkpoint_problem(step4).startswith("trainable.safetensors is truncated")


# -------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("overrides, message", [
    (["lora_targets=lm_q,lm_query"], "lora_targets: unknown target 'lm_query'; choose from lm_q, lm_k, lm_v, lm_o, "
     "lm_gate, lm_up, lm_down, vit_qkv, vit_out, vit_fc1, vit_fc2 or the groups lm_attn, lm_mlp, lm, vit, all."),
    (["lora_rank=-1"], "lora_rank must be an integer >= 0 (0: no LoRA), got -1."),
    (["lora_rank=four"], "lora_rank must be an integer, got 'four' on the command line."),
    (["lora_alpha=0"], "lora_alpha must be > 0 (or none: 2 * lora_rank), got 0.0."),
    (["lora_dropout=1"], "lora_dropout must be in [0, 1), got 1.0."),
    (["lora_rank=8", "lora_targets=lm_mlp,vit_out", "lr_vision_backbone=0"],
     "lora_targets adapts vit_out but lr_vision_backbone (the adapters' learning rate) is 0; "
     "set lr_vision_backbone > 0 or leave those targets out."),
])
def test_bad_lora_settings_are_one_sentence(overrides, message):
    from nanovlm.train.settings import resolve

    with pytest.raises(ConfigError) as e:
        resolve("tiny", None, overrides)
    assert str(e.value) == message


def test_lora_with_the_vision_stage_on_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^lora_rank=2 keeps the vision encoder as built, but vision_warmup=on "
                                         r"would first train it; set vision_warmup=off\.$"):
        run_synthetic(tmp_path, lora_rank=2, vision_warmup="on")
