"""`nanovlm export --format transformers`: the Idefics3 directory `AutoModelForImageTextToText`
and `AutoProcessor` load offline: our tensors under transformers' names (`weights.idefics3`'s key
table read backwards), its config, processor, tokenizer and template files. transformers'
processor then gives our very ids and pixels; a loaded SmolVLM round-trips bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors.torch import save_file

from nanovlm.export.common import check_exportable, export_tokenizer, pixel_mean_std, template_with_parts
from nanovlm.fileio import written_dir
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS, RESAMPLE_CODES, to_transformers
from nanovlm.weights.peft import write_adapter


def save_transformers(model: Any, out: str | os.PathLike, adapters: tuple | None = None) -> None:
    """Write `model` to `out` as an Idefics3 directory; `adapters` (`lora.adapter_files_payload`) adds PEFT's."""
    cfg, tok = model.cfg, model.tokenizer
    check_exportable(cfg, "transformers")
    tokenizer = export_tokenizer(cfg, tok)
    tensors = to_transformers(cfg, {k: v.detach().cpu() for k, v in model.state_dict_for_saving().items()})
    ids = {name: tokenizer.token_to_id(text) for name, text in (("bos", tok.bos_token), ("eos", tok.eos_token),
                                                                 ("pad", tok.pad_token)) if text}
    template = template_with_parts(cfg.lm_chat_template, IDEFICS3_TOKENS["image_token"])
    with written_dir(os.fspath(out)) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp, "config.json", idefics3_config_dict(cfg, ids))
        _write_json(tmp, "generation_config.json", {"bos_token_id": ids.get("bos"), "eos_token_id": cfg.lm_eos_token_id,
                                                    "pad_token_id": ids.get("pad")})
        _write_processor(tmp, cfg, template)
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(tmp, "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "Idefics3Processor",
            "bos_token": tok.bos_token, "eos_token": tokenizer.id_to_token(cfg.lm_eos_token_id) or tok.eos_token,
            "pad_token": tok.pad_token, "model_max_length": cfg.lm_max_position_embeddings, "chat_template": template})
        if adapters is not None:
            write_adapter(tmp, *adapters)


def _write_json(directory: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f, indent=2)


def _write_processor(directory: str, cfg: Any, template: str) -> None:
    """preprocessor_config.json, processor_config.json (as transformers 4 writes them) and the template."""
    resample = {name: code for code, name in RESAMPLE_CODES.items()}[cfg.vlm_image_resample]
    mean, std = pixel_mean_std(cfg)
    _write_json(directory, "preprocessor_config.json", {
        "image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": cfg.max_img_size}, "resample": resample,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": cfg.vit_pixel_mean is not None,
        "image_mean": [mean] * 3, "image_std": [std] * 3, "do_image_splitting": cfg.vlm_image_splitting,
        "max_image_size": {"longest_edge": cfg.vit_img_size}, "do_pad": True})
    _write_json(directory, "processor_config.json", {"processor_class": "Idefics3Processor",
                                                      "image_seq_len": cfg.mp_image_token_length})
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(template)


def idefics3_config_dict(cfg: Any, ids: dict[str, int | None]) -> dict[str, Any]:
    vision = {"model_type": "idefics3_vision", "hidden_size": cfg.vit_hidden_dim,
              "intermediate_size": cfg.vit_inter_dim, "num_hidden_layers": cfg.vit_n_blocks,
              "num_attention_heads": cfg.vit_n_heads, "num_channels": 3,
              "image_size": cfg.vit_img_size, "patch_size": cfg.vit_patch_size, "hidden_act": cfg.vit_hidden_act,
              "layer_norm_eps": cfg.vit_ln_eps}
    text = {"model_type": "llama", "vocab_size": cfg.lm_vocab_size, "hidden_size": cfg.lm_hidden_dim,
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
