"""The lmms-eval plugin: `lmms-eval --model nanovlm --model_args pretrained=DIR --tasks ...`,
found through the `lmms_eval.models` entry point; prompts as `model.answer` lays them out, and
Cauldron-layout YAML tasks scored as `nanovlm eval` scores them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.images import load_image
from nanovlm.data.records import from_list
from nanovlm.eval.vqa import normalize_answer, qa_items
from nanovlm.generation import decode_until_eos, generate, left_pad, load_images, render_chat, render_prompts
from nanovlm.models.vision_language_model import VisionLanguageModel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MODEL_ARGS = ("pretrained", "device", "dtype", "batch_size", "max_new_tokens")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp")


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{name}={value!r} must be a positive whole number (nanovlm has no 'auto' batch size).")
    return number


class NanoVLM(lmms):
    """A checkpoint under lmms-eval; model_args: pretrained=DIR (what `from_pretrained` reads),
    device, dtype (auto: bf16 on a GPU that has it), max_new_tokens (when a task gives none)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = 32, max_batch_size: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {', '.join(sorted(unknown))}; nanovlm takes "
                             f"{', '.join(MODEL_ARGS)} (and --batch_size / --device on the command line).")
        if pretrained in (None, ""):
            raise ValueError("model_args needs pretrained=DIR: a nanovlm checkpoint directory or hub id.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the nanovlm lmms-eval model runs in one process; launch lmms-eval without "
                             "accelerate / torchrun (--device picks the GPU).")
        try:
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu") \
                if device in (None, "", "auto") else torch.device(str(device))
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a torch device; give cpu, cuda or cuda:N.") from e
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        if dtype in (None, "", "auto"):  # bf16 on a GPU that has it
            dtype = "bf16" if self._device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}.")
        self.model = VisionLanguageModel.from_pretrained(str(pretrained), require_tokenizer=True,
                                                         dtype=DTYPES[str(dtype)], device=self._device)
        self.tokenizer = self.model.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.model.cfg.lm_eos_token_id

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _chat(self, request: Instance) -> tuple[list[dict], list, dict, str]:
        """(messages, PIL images, gen_kwargs, context) of a generate_until request, as `answer()` asks it."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        return [{"role": "user", "content": context}], load_images(_only_images(visuals), doc_id), gen_kwargs, context

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Answers batched among requests with the same generation settings, cut at the first `until` string."""
        chats = [self._chat(r) for r in requests]
        settings = [generation_settings(g, self.max_new_tokens) for _, _, g, _ in chats]
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(tuple(sorted(s.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="nanovlm answering")
        eos = self.model.cfg.lm_eos_token_id
        for indices in groups.values():
            s = dict(settings[indices[0]])
            until = s.pop("until")
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                ids, mask, tiles = render_prompts(self.model, [chats[i][:2] for i in batch])
                tokens = generate(self.model, ids, tiles, mask, **s)
                for i, row in zip(batch, tokens.tolist()):
                    out[i] = cut_at(decode_until_eos(self.tokenizer, row, eos), until)
                    self.cache_hook.add_partial("generate_until", (chats[i][3], chats[i][2]), out[i])
                bar.update(len(batch))
        bar.close()
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the nanovlm lmms-eval model does not run multi-round tasks yet; "
                                  "choose tasks whose output_type is generate_until or loglikelihood.")

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), whether greedy decoding gives it) per request, scored in fp32."""
        rows, tiles, n_cont = [], [], []
        for r in requests:
            context, continuation, doc_to_visual, doc_id, task, split = r.args
            doc = self._doc(task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            visuals = _only_images(doc_to_visual(doc) if doc_to_visual is not None else None)
            chat = render_chat(self.model, [{"role": "user", "content": context}], load_images(visuals, doc_id))
            cont = self.tokenizer.encode(str(continuation))
            rows.append(chat.input_ids + cont)
            tiles.append(chat.tiles)
            n_cont.append(len(cont))
        results: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size):
            end = start + self.batch_size
            ids, mask = left_pad(rows[start:end], self.model)
            targets = torch.full_like(ids, IGNORE_INDEX)  # targets[t]: the token after position t
            for b, n in enumerate(n_cont[start:end]):
                if n:
                    targets[b, -n - 1:-1] = ids[b, -n:]
            with torch.inference_mode():
                logits, _ = self.model(ids.to(self.device), tiles[start:end], mask.to(self.device))  # (B, T, vocab)
            supervised = (targets != IGNORE_INDEX).to(self.device)
            logprobs = logits[supervised].float().log_softmax(-1)  # (n_supervised, vocab), row by row
            labels = targets.to(self.device)[supervised]
            picked = logprobs.gather(1, labels[:, None]).squeeze(1)
            greedy = logprobs.argmax(-1) == labels
            for part, hit in zip(picked.split(n_cont[start:end]), greedy.split(n_cont[start:end])):
                results.append((float(part.sum()), bool(hit.all())))
        return results


class NanoVLMChat(NanoVLM):
    """The same model for lmms-eval's chat requests (`doc_to_messages`): images go where they stand."""

    is_simple = False

    def _chat(self, request: Instance) -> tuple[list[dict], list, dict, str]:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        messages = doc_to_messages(self._doc(task, split, doc_id)) if callable(doc_to_messages) else doc_to_messages
        return [_message(m) for m in messages], [], gen_kwargs, context

    def loglikelihood(self, requests):
        raise NotImplementedError("lmms-eval sends chat models generation requests only; run loglikelihood "
                                  "tasks with --force_simple.")


def _only_images(visuals: Any) -> list:
    """`doc_to_visual`'s result as a list of images (PIL or paths); a clear error for video or audio."""
    if visuals is None:
        return []
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    for v in items:
        if isinstance(v, dict) or (isinstance(v, str) and not v.lower().endswith(IMAGE_SUFFIXES)):
            raise ValueError(f"the task gives a {type(v).__name__} visual ({str(v)[:60]!r}); the nanovlm model "
                             "reads images (PIL or image files) and text only.")
    return items


def _message(message: Any) -> dict:
    """An lmms-eval chat message (a dict or its pydantic model) -> `{"role", "content"}` (text and PIL parts)."""
    if not isinstance(message, dict):
        message = message.model_dump()
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(part["text"])
        elif kind == "image":
            parts.append(load_image(part.get("url", part.get("image"))))
        else:
            raise ValueError(f"the task gives a {kind} part; the nanovlm model reads images and text only.")
    return {"role": message["role"], "content": parts}


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> dict:
    """A task's generation_kwargs -> `generate`'s keyword arguments plus `until` (stop strings);
    greedy unless `do_sample` (or else a temperature > 0) asks for sampling."""
    g = dict(gen_kwargs or {})
    until = g.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    if int(g.get("num_beams") or 1) != 1:
        raise ValueError(f"num_beams={g['num_beams']} asks for beam search; the nanovlm model decodes greedily "
                         "or by sampling (set num_beams: 1).")
    temperature = float(g.get("temperature") or 0.0)
    sample = bool(g["do_sample"]) if g.get("do_sample") is not None else temperature > 0
    return {"max_new_tokens": int(g.get("max_new_tokens") or default_max_new_tokens), "greedy": not sample,
            "temperature": temperature if sample and temperature > 0 else 1.0,
            "top_k": int(g.get("top_k") or 0), "top_p": float(g.get("top_p") or 1.0), "until": until}


def cut_at(text: str, until: Sequence[str]) -> str:
    """The text up to the first stop string (the decode ran past it; the tokens before are the same)."""
    cuts = [at for s in until if s and (at := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


# ---------------------------------------------------------------------- task helpers (YAML !function)
def _item(doc: dict) -> dict:
    """A Cauldron record's first (question, answer) turn, read as `nanovlm eval --data` reads it."""
    items = qa_items(from_list([doc]))
    if not items:
        raise ValueError("the record has no question with an answer that can be read.")
    return items[0]


def cauldron_doc_to_visual(doc: dict) -> list:
    return [load_image(s) for s in _item(doc)["images"]]


def cauldron_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _item(doc)["question"]


def cauldron_doc_to_target(doc: dict) -> str:
    return _item(doc)["answer"]


def vqa_process_results(doc: dict, results: Sequence[str]) -> dict:
    """exact_match: 1.0 when the prediction equals the reference after `normalize_answer`."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(cauldron_doc_to_target(doc)))}
