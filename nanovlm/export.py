"""Export: a checkpoint directory -> a transformers Idefics3 directory (`nanovlm export`).

What `transformers.AutoModelForImageTextToText` and `AutoProcessor` load offline (and vLLM
serves): config.json (`Idefics3Config`), model.safetensors (our tensors under transformers'
names: the key table of `nanovlm.weights.idefics3`, read backwards), generation_config.json,
preprocessor_config.json + processor_config.json (`Idefics3ImageProcessor` / `Idefics3Processor`),
tokenizer.json + tokenizer_config.json and chat_template.jinja. Written to a temporary
directory beside OUT and renamed into place, so a failure never leaves half a directory.

A model in the idefics3 image layout (a SmolVLM loaded here, fine-tuned or not) is written as
it is: its processor settings are its own, and a loaded checkpoint round-trips bit for bit. A
model in our own layout needs three changes for transformers' processor to feed it:
- its image tokens are renamed to the ones Idefics3Processor writes (`<|image|>` -> `<image>`,
  `<|global_image|>` -> `<global-img>`, same ids) and `<fake_token_around_image>` /
  `<end_of_utterance>` are added when missing, each with an embedding row (and head row) that
  is the mean of the others (as `weights.common.grow_rows` grows vocabularies);
- a model that reads raw [0, 1] pixels gets its normalisation folded into the patch embedding:
  the processor gives q = (x - 0.5) / 0.5, so conv(W, x) + c = conv(W / 2, q) + c + sum(W) / 2;
- the processor's resizing, tile order (global view last) and prompt text are Idefics3's, not
  the ones the model was trained with (README, "Export to transformers").
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from nanovlm.fileio import written_dir
from nanovlm.weights.common import grow_rows
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS, RESAMPLE_CODES, to_transformers

FORMATS = ("transformers",)
# Our layout's token -> the text Idefics3Processor writes for it (the same id after export).
RENAMES = {"image_token": "<image>", "global_image_token": "<global-img>"}
# Tokens Idefics3Processor adds to a tokenizer that lacks them: the export adds them first, with rows.
REQUIRED = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")


def run_export(model_dir: str, fmt: str, out: str, merge_lora: bool = False) -> int:
    """`nanovlm export`: load `model_dir`, write `out` in format `fmt`; prints where it went.
    A model with LoRA adapters is written as its base weights plus the adapters in PEFT's
    layout beside them (`peft.PeftModel.from_pretrained(model, OUT)` attaches them), or, with
    `merge_lora`, with the adapters folded into the weights."""
    from nanovlm.models import lora
    from nanovlm.models.vision_language_model import VisionLanguageModel

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; the one format is transformers.")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "config.json")) and \
            not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"{out} exists and is not a model directory; give --out a new or empty directory "
                         "(a model directory there is replaced).")
    model = VisionLanguageModel.from_pretrained(model_dir, require_tokenizer=True)
    adapters = lora.adapter_files_payload(model)
    if merge_lora and adapters is None:
        raise ValueError(f"--merge-lora: {model_dir} holds no LoRA adapters to merge; export without it.")
    if merge_lora:
        lora.merge_lora(model)
        adapters = None
    save_transformers(model, out, adapters=adapters)
    what = " with PEFT adapter files beside the weights (peft.PeftModel.from_pretrained)" if adapters else ""
    print(f"wrote {out}: a transformers Idefics3 directory (AutoModelForImageTextToText, AutoProcessor){what}.")
    return 0


def check_exportable(cfg: Any) -> None:
    wrong = []
    if cfg.vit_cls_flag:
        wrong.append("vit_cls_flag is true (Idefics3's vision tower has no CLS token)")
    if cfg.lm_attn_scaling != 1.0:
        wrong.append(f"lm_attn_scaling is {cfg.lm_attn_scaling} (transformers' Llama uses plain RoPE)")
    if wrong:
        raise ValueError(f"this model cannot be written as Idefics3: {'; '.join(wrong)}.")


def save_transformers(model: Any, out: str | os.PathLike, adapters: tuple | None = None) -> None:
    """Write `model` (a VisionLanguageModel with its tokenizer) to `out` as a transformers
    Idefics3 directory (the module docstring says what changes for our own image layout);
    `adapters` (`nanovlm.models.lora.adapter_files_payload`) adds PEFT's adapter files."""
    from safetensors.torch import save_file

    cfg, tok = model.cfg, model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer to export; load it from a checkpoint directory that holds one.")
    check_exportable(cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict_for_saving().items()}
    tokenizer, state, vocab = _export_vocabulary(cfg, tok, state)
    state, (mean, std) = fold_normalisation(cfg, state)
    tensors = to_transformers(cfg, state)
    ids = {name: tokenizer.token_to_id(text) for name, text in (("bos", tok.bos_token), ("eos", tok.eos_token),
                                                                 ("pad", tok.pad_token)) if text}
    with written_dir(os.fspath(out)) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp, "config.json", idefics3_config_dict(cfg, vocab, ids))
        _write_json(tmp, "generation_config.json", {"bos_token_id": ids.get("bos"), "eos_token_id": cfg.lm_eos_token_id,
                                                    "pad_token_id": ids.get("pad")})
        _write_processor(tmp, cfg, mean, std)
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(tmp, "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "Idefics3Processor",
            "bos_token": tok.bos_token, "eos_token": _eos_text(cfg, tokenizer, tok), "pad_token": tok.pad_token,
            "model_max_length": cfg.lm_max_position_embeddings, "chat_template": cfg.lm_chat_template})
        if adapters is not None:
            from nanovlm.weights.peft import write_adapter

            write_adapter(tmp, *adapters)


def _eos_text(cfg: Any, tokenizer: Any, tok: Any) -> str | None:
    """The text of the token that ends an answer (the model's lm_eos_token_id)."""
    return tokenizer.id_to_token(cfg.lm_eos_token_id) or tok.eos_token


def _write_json(directory: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f, indent=2)


def _write_processor(directory: str, cfg: Any, mean: float, std: float) -> None:
    """preprocessor_config.json and processor_config.json, as transformers 4 writes them (5 reads them)."""
    resample = {name: code for code, name in RESAMPLE_CODES.items()}[cfg.vlm_image_resample]
    _write_json(directory, "preprocessor_config.json", {
        "image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": cfg.max_img_size}, "resample": resample,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [mean] * 3,
        "image_std": [std] * 3, "do_image_splitting": cfg.vlm_image_splitting,
        "max_image_size": {"longest_edge": cfg.vit_img_size}, "do_pad": True})
    _write_json(directory, "processor_config.json", {"processor_class": "Idefics3Processor",
                                                      "image_seq_len": cfg.mp_image_token_length})
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(cfg.lm_chat_template)


def fold_normalisation(cfg: Any, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """(state, (mean, std) the exported processor normalises with). A model with its own
    normalisation keeps it; one that reads raw [0, 1] pixels x gets (x - 0.5) / 0.5, with the
    patch embedding changed to give the same features: x = q / 2 + 1 / 2 (module docstring)."""
    if cfg.vit_pixel_mean is not None:
        return state, (cfg.vit_pixel_mean, cfg.vit_pixel_std)
    w_key, b_key = "vision_encoder.patch_embedding.conv.weight", "vision_encoder.patch_embedding.conv.bias"
    weight = state[w_key].double()  # (C, 3, patch, patch)
    state = dict(state)
    state[w_key] = (weight * 0.5).to(state[w_key].dtype)
    state[b_key] = (state[b_key].double() + 0.5 * weight.sum(dim=(1, 2, 3))).to(state[b_key].dtype)  # (C,)
    return state, (0.5, 0.5)


def _export_vocabulary(cfg: Any, tok: Any, state: dict[str, torch.Tensor]):
    """(tokenizers.Tokenizer, state, vocabulary size) with the tokens Idefics3Processor uses."""
    from tokenizers import AddedToken, Tokenizer

    data = json.loads(tok._tok.to_str())
    if cfg.vlm_image_layout != "idefics3":
        renames = {cfg.vlm_extra_tokens[name]: text for name, text in RENAMES.items()
                   if name in cfg.vlm_extra_tokens and tok.token_to_id(text) is None}
        for entry in data.get("added_tokens", []):
            entry["content"] = renames.get(entry["content"], entry["content"])
    tokenizer = Tokenizer.from_str(json.dumps(data))
    if tokenizer.token_to_id(IDEFICS3_TOKENS["image_token"]) != cfg.vlm_image_token_id:
        raise ValueError(f"the tokenizer's {IDEFICS3_TOKENS['image_token']} is not the model's image token "
                         f"(id {cfg.vlm_image_token_id}), so transformers' processor could not place images.")
    missing = [t for t in REQUIRED if tokenizer.token_to_id(t) is None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    vocab = max(cfg.lm_vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    if vocab > cfg.lm_vocab_size:
        grow = grow_rows(vocab)
        state = dict(state)
        for key in ("decoder.token_embedding.weight", "decoder.head.weight"):
            if key in state:
                state[key] = grow(state[key])
    return tokenizer, state, vocab


def idefics3_config_dict(cfg: Any, vocab: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of `Idefics3ForConditionalGeneration` for `cfg` (vocabulary `vocab`)."""
    vision = {"model_type": "idefics3_vision", "hidden_size": cfg.vit_hidden_dim, "intermediate_size": cfg.vit_inter_dim,
              "num_hidden_layers": cfg.vit_n_blocks, "num_attention_heads": cfg.vit_n_heads, "num_channels": 3,
              "image_size": cfg.vit_img_size, "patch_size": cfg.vit_patch_size, "hidden_act": cfg.vit_hidden_act,
              "layer_norm_eps": cfg.vit_ln_eps}
    text = {"model_type": "llama", "vocab_size": vocab, "hidden_size": cfg.lm_hidden_dim,
            "intermediate_size": cfg.lm_inter_dim, "num_hidden_layers": cfg.lm_n_blocks,
            "num_attention_heads": cfg.lm_n_heads, "num_key_value_heads": cfg.lm_n_kv_heads,
            "head_dim": cfg.lm_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.lm_rms_eps,
            "rope_theta": cfg.lm_re_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.lm_re_base},
            "max_position_embeddings": cfg.lm_max_position_embeddings, "tie_word_embeddings": cfg.lm_tie_weights,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": ids.get("bos"),
            "eos_token_id": cfg.lm_eos_token_id, "pad_token_id": ids.get("pad")}
    return {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
            "image_token_id": cfg.vlm_image_token_id, "scale_factor": cfg.mp_pixel_shuffle_factor,
            "tie_word_embeddings": cfg.lm_tie_weights, "torch_dtype": "float32",
            "vision_config": vision, "text_config": text}
