"""What both exports share: the settings a target must reproduce, the tokenizer under Idefics3's
token names, the pixel normalisation and a chat template that reads typed parts. transformers
and llama.cpp lay images out only as SmolVLM does, so other settings are refused, named,
before anything is written.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer

from nanovlm.data.tokenizer import TEXT_PART, template_shows
from nanovlm.weights.idefics3 import IDEFICS3_TOKENS

# The image tokens whose text Idefics3Processor and mtmd write: ours are renamed to it (same ids).
IMAGE_TOKEN_ROLES = ("image_token", "global_image_token", "fake_image_token")

# Typed content parts as the text a template for strings reads: any part but text becomes MARKER.
PARTS_AS_TEXT = (
    "{%- set parts_as_text = namespace(messages=[]) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set text = namespace(value=message['content']) -%}\n"
    "{%- if message['content'] is not string -%}\n"
    "{%- set text.value = '' -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- set text.value = text.value + (part['text'] if part['type'] == 'text' else 'MARKER') -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- set parts_as_text.messages = parts_as_text.messages + [{'role': message['role'], "
    "'content': text.value}] -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = parts_as_text.messages %}")


def check_exportable(cfg: Any, fmt: str) -> None:
    """A ValueError naming every setting that keeps `fmt`'s runtime from answering as we do."""
    needs = []
    if cfg.vlm_image_layout != "idefics3":
        needs.append("vlm_image_layout=idefics3 (SmolVLM's layout of tiles and global view)")
    if cfg.vit_cls_flag:
        needs.append("vit_cls_flag=false (Idefics3's vision tower has no CLS token)")
    if cfg.lm_attn_scaling != 1.0:
        needs.append("lm_attn_scaling=1.0 (plain RoPE)")
    if fmt == "gguf":
        if cfg.vit_hidden_act != "gelu_pytorch_tanh":
            needs.append("vit_hidden_act=gelu_pytorch_tanh (mtmd's only GELU for idefics3)")
        if cfg.vlm_image_resample != "lanczos":
            needs.append("vlm_image_resample=lanczos (mtmd's resampling for idefics3)")
        if not cfg.vlm_image_splitting or cfg.max_img_size <= cfg.vit_img_size:
            needs.append("vlm_image_splitting=true with max_img_size above vit_img_size (mtmd always cuts "
                         "an image into tiles plus a global view)")
    if needs:
        target = "llama.cpp" if fmt == "gguf" else "transformers"
        raise ValueError(f"{target} would not answer as this model does; train it with {'; '.join(needs)}.")


def export_tokenizer(cfg: Any, tok: Any) -> Tokenizer:
    """The model's tokenizer with its image tokens renamed to Idefics3's texts, each at the model's id."""
    data = json.loads(tok._tok.to_str())
    extra = cfg.vlm_extra_tokens
    renames = {extra[role]: IDEFICS3_TOKENS[role] for role in IMAGE_TOKEN_ROLES
               if role in extra and tok.token_to_id(IDEFICS3_TOKENS[role]) is None}
    for entry in data["added_tokens"]:
        entry["content"] = renames.get(entry["content"], entry["content"])
    tokenizer = Tokenizer.from_str(json.dumps(data))
    for role in IMAGE_TOKEN_ROLES:
        text = IDEFICS3_TOKENS[role]
        if role not in extra or tokenizer.token_to_id(text) != tok.token_to_id(extra[role]):
            raise ValueError(f"the tokenizer's {text} is not the model's {role} (vlm_extra_tokens), so the "
                             f"exported prompt could not place images; give {text} only that role.")
    return tokenizer


def pixel_mean_std(cfg: Any) -> tuple[float, float]:
    """The normalisation the model applies; raw [0, 1] pixels are (x - 0) / 1."""
    return (0.0, 1.0) if cfg.vit_pixel_mean is None else (cfg.vit_pixel_mean, cfg.vit_pixel_std)


def template_with_parts(template: str, marker: str) -> str:
    """`template` when it reads typed content parts, else `template` behind PARTS_AS_TEXT."""
    return template if template_shows(template, TEXT_PART) else PARTS_AS_TEXT.replace("MARKER", marker) + template
