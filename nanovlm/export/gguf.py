"""`nanovlm export --format gguf`: the two files llama.cpp runs a vision model from, as its
convert_hf_to_gguf.py writes SmolVLM: `model.gguf` (arch `llama`, tokenizer and chat template
inside, q/k rows in llama.cpp's interleaved RoPE order) and `mmproj.gguf` (arch `clip`, projector
type `idefics3`). Tensor names are gguf's map of transformers' Idefics3 names; norms, biases and
the vision embeddings stay F32, other weights are F16 or Q8_0 (where a row holds whole blocks).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models

from nanovlm.data.tokenizer import TEXT_PART, _gguf_pre_tokenizer, template_shows
from nanovlm.export.common import check_exportable, export_tokenizer, pixel_mean_std, template_with_parts
from nanovlm.fileio import written_dir
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS, TEXT, to_transformers

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
FILES = ("model.gguf", "mmproj.gguf")
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(): where llama.cpp puts an image's tokens
PRE_TOKENIZERS = ("smollm", "gpt2", "llama-bpe")  # llama.cpp's names that our GGUF reader splits alike
F32_NAMES = ("v.patch_embd.weight", "v.position_embd.weight")
# llama.cpp hands a template images as text holding MEDIA_MARKER; a template of typed parts
# (SmolVLM's) gets them as image parts again, and the image token it writes becomes the marker.
MARKER_AS_IMAGE = (
    "{%- set as_parts = namespace(messages=[]) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set content = namespace(parts=[]) -%}\n"
    "{%- set given = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] -%}\n"
    "{%- for part in given -%}\n"
    "{%- if part['type'] == 'text' -%}\n"
    "{%- for piece in part['text'].split('MARKER') -%}\n"
    "{%- if not loop.first -%}{%- set content.parts = content.parts + [{'type': 'image'}] -%}{%- endif -%}\n"
    "{%- if piece -%}{%- set content.parts = content.parts + [{'type': 'text', 'text': piece}] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- else -%}{%- set content.parts = content.parts + [part] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set as_parts.messages = as_parts.messages + [{'role': message['role'], 'content': content.parts}] -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = as_parts.messages -%}\n"
    "{%- set rendered %}TEMPLATE{% endset -%}\n"
    "{{- rendered | replace('IMAGE', 'MARKER') -}}")


def save_gguf(model: Any, out: str | os.PathLike, outtype: str = "f16") -> None:
    """Write `model` (adapters merged) to the directory `out` as model.gguf + mmproj.gguf in `outtype`."""
    cfg = model.cfg
    check_exportable(cfg, "gguf")
    tokenizer = export_tokenizer(cfg, model.tokenizer)
    pre = pre_tokenizer_name(tokenizer)
    qtype, ftype = OUTTYPES[outtype]
    state = {k: v.detach().float().cpu() for k, v in model.state_dict_for_saving().items()}
    lm, mmproj = {}, {}
    for name, tensor in to_transformers(cfg, state).items():
        if name.startswith(TEXT) or name == "lm_head.weight":
            lm[name.replace(TEXT, "model.", 1)] = tensor
        else:
            mmproj[name] = tensor
    with written_dir(os.fspath(out)) as tmp:
        _write_file(os.path.join(tmp, FILES[0]), "llama", gguf.GGUFType.MODEL, ftype, qtype,
                    _gguf_names(lm, gguf.MODEL_ARCH.LLAMA, cfg.lm_n_blocks, cfg),
                    lambda writer: _lm_metadata(writer, cfg, model.tokenizer, tokenizer, pre))
        _write_file(os.path.join(tmp, FILES[1]), "clip", gguf.GGUFType.MMPROJ, ftype, qtype,
                    _gguf_names(mmproj, gguf.MODEL_ARCH.MMPROJ, cfg.vit_n_blocks, cfg),
                    lambda writer: _mmproj_metadata(writer, cfg))


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half q/k rows -> llama.cpp's interleaved pairs, head by head."""
    rows, C = weight.shape
    w = weight.reshape(n_heads, 2, rows // n_heads // 2, C)  # (n_heads, half, head_dim/2, C)
    return w.transpose(1, 2).reshape(rows, C)  # (n_heads * head_dim, C), pairs side by side


def _gguf_names(tensors: dict[str, torch.Tensor], arch: gguf.MODEL_ARCH, n_blocks: int,
                cfg: Any) -> dict[str, torch.Tensor]:
    names = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    for name, tensor in tensors.items():
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rope_rows(tensor, cfg.lm_n_heads if "q_proj" in name else cfg.lm_n_kv_heads)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor
    return out


def _write_file(path: str, arch: str, kind: str, ftype: gguf.LlamaFileType, qtype: Q, tensors: dict[str, torch.Tensor],
                add_metadata: Callable[[gguf.GGUFWriter], None]) -> None:
    """One GGUF file: its header, `add_metadata`'s keys and `tensors` (see the module docstring for the types)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(kind)
    writer.add_name("nanovlm")
    writer.add_file_type(ftype)
    add_metadata(writer)
    for name, tensor in tensors.items():
        data = tensor.numpy()
        if data.ndim == 1 or name in F32_NAMES:
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype == Q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for how `tokenizer` splits text before BPE."""
    ours = json.loads(tokenizer.to_str())["pre_tokenizer"]
    for name in PRE_TOKENIZERS:
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = _gguf_pre_tokenizer(name)
        if json.loads(probe.to_str())["pre_tokenizer"] == ours:
            return name
    raise ValueError(f"llama.cpp has no name for this tokenizer's pre-tokenizer; use a tokenizer that splits "
                     f"text as one of {', '.join(PRE_TOKENIZERS)} does (SmolLM2's is smollm).")


def vocabulary(tokenizer: Tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to `n_rows` as the converter pads."""
    data = json.loads(tokenizer.to_str())
    added = {t["id"]: t["special"] for t in data["added_tokens"]}
    tokens, types = [], []
    for i in range(n_rows):
        text = tokenizer.id_to_token(i)
        tokens.append(f"[PAD{i}]" if text is None else text)
        kind = gguf.TokenType.CONTROL if added.get(i) else gguf.TokenType.USER_DEFINED if i in added else \
            gguf.TokenType.NORMAL
        types.append(gguf.TokenType.UNUSED if text is None else kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def _lm_metadata(writer: gguf.GGUFWriter, cfg: Any, tok: Any, tokenizer: Tokenizer, pre: str) -> None:
    """The `llama.*` hyperparameters and the tokenizer (`tok`: ours, `tokenizer`: its export)."""
    writer.add_context_length(cfg.lm_max_position_embeddings)
    writer.add_embedding_length(cfg.lm_hidden_dim)
    writer.add_feed_forward_length(cfg.lm_inter_dim)
    writer.add_block_count(cfg.lm_n_blocks)
    writer.add_head_count(cfg.lm_n_heads)
    writer.add_head_count_kv(cfg.lm_n_kv_heads)
    writer.add_rope_freq_base(cfg.lm_re_base)
    writer.add_layer_norm_rms_eps(cfg.lm_rms_eps)
    writer.add_vocab_size(cfg.lm_vocab_size)
    writer.add_rope_dimension_count(cfg.lm_head_dim)
    tokens, types, merges = vocabulary(tokenizer, cfg.lm_vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(cfg.lm_eos_token_id)
    for add, text in ((writer.add_bos_token_id, tok.bos_token), (writer.add_pad_token_id, tok.pad_token)):
        if text is not None and tokenizer.token_to_id(text) is not None:
            add(tokenizer.token_to_id(text))
    writer.add_add_bos_token(False)  # our prompts start with the chat template's first token
    writer.add_chat_template(gguf_chat_template(cfg.lm_chat_template))


def gguf_chat_template(template: str) -> str:
    """The model's template as llama.cpp must render it: images are MEDIA_MARKER in text."""
    if not template_shows(template, TEXT_PART):
        return template_with_parts(template, MEDIA_MARKER)
    wrapped = MARKER_AS_IMAGE.replace("IMAGE", IDEFICS3_TOKENS["image_token"]).replace("MARKER", MEDIA_MARKER)
    return wrapped.replace("TEMPLATE", template)


def _mmproj_metadata(writer: gguf.GGUFWriter, cfg: Any) -> None:
    mean, std = pixel_mean_std(cfg)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_projection_dim(cfg.lm_hidden_dim)
    writer.add_vision_image_size(cfg.vit_img_size)
    writer.add_vision_patch_size(cfg.vit_patch_size)
    writer.add_vision_embedding_length(cfg.vit_hidden_dim)
    writer.add_vision_feed_forward_length(cfg.vit_inter_dim)
    writer.add_vision_block_count(cfg.vit_n_blocks)
    writer.add_vision_head_count(cfg.vit_n_heads)
    writer.add_vision_image_mean([mean] * 3)
    writer.add_vision_image_std([std] * 3)
    writer.add_vision_attention_layernorm_eps(cfg.vit_ln_eps)
    writer.add_vision_projector_scale_factor(cfg.mp_pixel_shuffle_factor)
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(cfg.max_img_size)
