"""`nanovlm export`: load a checkpoint, fold LoRA adapters in where asked or needed, write it."""

from __future__ import annotations

import os

from nanovlm.export.gguf import OUTTYPES, save_gguf
from nanovlm.export.idefics3 import save_transformers
from nanovlm.models import lora
from nanovlm.models.vision_language_model import VisionLanguageModel

FORMATS = ("transformers", "gguf")
# A directory an earlier export wrote, which OUT may replace.
EXPORT_MARKERS = ("config.json", "model.gguf")


def run_export(model_dir: str, fmt: str, out: str, merge_lora: bool = False, outtype: str | None = None) -> int:
    """`nanovlm export`: `model_dir` to `out` in format `fmt`, LoRA adapters in PEFT's files or merged."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose transformers or gguf.")
    if outtype is not None and fmt != "gguf":
        raise ValueError(f"--outtype is for --format gguf; leave it out for --format {fmt}.")
    if outtype is not None and outtype not in OUTTYPES:
        raise ValueError(f"unknown --outtype {outtype!r}; choose {' or '.join(OUTTYPES)}.")
    if os.path.exists(out) and not any(os.path.isfile(os.path.join(out, m)) for m in EXPORT_MARKERS) and \
            not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"{out} exists and is not a model directory; give --out a new or empty directory "
                         "(a model directory there is replaced).")
    model = VisionLanguageModel.from_pretrained(model_dir, require_tokenizer=True)
    adapters = lora.adapter_files_payload(model)
    if merge_lora and adapters is None:
        raise ValueError(f"--merge-lora: {model_dir} holds no LoRA adapters to merge; export without it.")
    if adapters is not None and (merge_lora or fmt == "gguf"):
        lora.merge_lora(model)
    merged = " (its LoRA adapters merged into the weights)" if adapters is not None and fmt == "gguf" else ""
    if fmt == "gguf":
        save_gguf(model, out, outtype or "f16")
        print(f"wrote {out}: model.gguf and mmproj.gguf for llama.cpp{merged} "
              f"(llama-mtmd-cli -m {out}/model.gguf --mmproj {out}/mmproj.gguf).")
        return 0
    adapters = None if merge_lora else adapters
    save_transformers(model, out, adapters=adapters)
    what = " with PEFT adapter files beside the weights (peft.PeftModel.from_pretrained)" if adapters else ""
    print(f"wrote {out}: a transformers Idefics3 directory (AutoModelForImageTextToText, AutoProcessor){what}.")
    return 0
