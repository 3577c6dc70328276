"""Generation: sampling, the one decode loop, streaming, and `answer`.

As gpt-fast: the prompt is prefilled into a static KV cache, then each token is one
`LanguageModel.decode_step`, positions as tensors. A row's tokens start at slot 0 (padding
last), so it decodes exactly as it would alone. `compile=True` runs the one-token step
`torch.compile`d over the whole (bucketed) cache; the server's batching runs the same step.
"""

from __future__ import annotations

import functools
import itertools
import os
import types
import warnings
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from PIL import Image

from nanovlm.data.images import load_image
from nanovlm.data.processors import ChatRenderer, RenderedChat, RenderError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> (B, V): all but the `top_k` largest and the smallest set reaching `top_p` set to -inf."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the token that crosses top_p stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def prefill(decoder, embeds: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
    """Prompts (B, T, C), `lengths` (B,) real tokens first, into slots 0..T-1 -> the last real token's logits."""
    B, T, _ = embeds.shape
    hidden = decoder.decode_step(embeds, torch.arange(T, device=embeds.device).expand(B, T), cache, T)
    return decoder.head(hidden[torch.arange(B, device=embeds.device), lengths - 1])


def decode_one_token(decoder, tokens: torch.Tensor, input_pos: torch.Tensor, cache,
                     kv_len: int | None = None) -> torch.Tensor:
    """tokens (B,) at each row's slot input_pos (B,) -> next-token logits (B, vocab)."""
    x = decoder.token_embedding(tokens[:, None])  # (B, 1, C)
    return decoder.head(decoder.decode_step(x, input_pos[:, None], cache, kv_len)[:, -1])


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Inductor's default mode, with its inlining turned off on the CPU: batch 1 computes each linear
# as a multiply-and-sum loop over the weight rows (`quantization.row_matmul`), and inlined
# producers (residual adds, the embedding, the norm) would be redone for every weight row.
COMPILE_OPTIONS = {"cpu": {"realize_reads_threshold": 0, "realize_opcount_threshold": 0}}


def step_function(decoder, compile: bool):
    """`decode_one_token` for `decoder`: eager, or compiled once per `_layout` (ignoring kv_len: one shape)."""
    eager = functools.partial(decode_one_token, decoder)
    if not compile:
        return eager
    layout = _layout(decoder)
    known = _STEPS.get(decoder)
    if known is not None and known[0] == layout:
        return known[1]
    # torch.compile keeps graphs per code object and runs eagerly past `recompile_limit` (8)
    # of them: each decoder's step gets its own copy of the function.
    own = types.FunctionType(decode_one_token.__code__.replace(), decode_one_token.__globals__, "decode_one_token",
                             decode_one_token.__defaults__)
    options = dict(COMPILE_OPTIONS.get(decoder.token_embedding.weight.device.type, {}))
    # Dynamo's guards on the modules cost about a millisecond a token; `_layout` stands in for them.
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(own, dynamic=False, options=options)
    state = {"fn": lambda tokens, input_pos, cache, kv_len=None: compiled(decoder, tokens, input_pos, cache)}

    def step(*args):
        try:
            return state["fn"](*args)
        except Exception as e:  # a backend that cannot build here (no C++ compiler, ...): run eagerly
            if state["fn"] is eager:
                raise
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {first}); "
                          "decoding eagerly instead.")
            state["fn"] = eager
            return eager(*args)
    _STEPS[decoder] = (layout, step)
    return step


def _layout(decoder) -> tuple:
    """What the skipped module guards would check: module types, tensor storages, dtypes and shapes
    (a `.to(...)` or swapped layer compiles a new step; weights loaded in place keep it)."""
    tensors = itertools.chain(decoder.named_parameters(), decoder.named_buffers())
    return (tuple((name, type(m)) for name, m in decoder.named_modules()),
            tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.device) for name, t in tensors))


CACHE_BUCKET = 128  # cache lengths round up to this, so prompts of similar length share a compiled step


@torch.inference_mode()
def stream(model, input_ids: torch.Tensor, images=None, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int = 32, top_k: int = 50, top_p: float = 0.9, temperature: float = 0.5,
           greedy: bool = False, eos_token_id: int | None = None, generator: torch.Generator | None = None,
           compile: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step for input_ids (B, T) left-padded where
    `attention_mask` is 0; a finished row yields EOS, the loop ends once every row has."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    eos = model.cfg.lm_eos_token_id if eos_token_id is None else eos_token_id
    device, limit = model.device, model.cfg.lm_max_position_embeddings
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device, torch.long)
    if max_new_tokens == 0:
        return
    if T + max_new_tokens > limit:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} positions.")
    decoder = model.decoder.prepare_for_inference()
    step = step_function(decoder, compile)
    embeds = model.embed(input_ids, images)  # (B, T, C)
    order = (mask == 0).long().argsort(dim=1, stable=True)  # (B, T): real tokens first, in order
    lengths = mask.sum(dim=1)  # (B,): a row's prompt fills slots 0..length-1, its new tokens the next ones
    cache = decoder.new_kv_cache(B, min(-(-(T + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET, limit))
    logits = prefill(decoder, embeds.gather(1, order[..., None].expand_as(embeds)), lengths, cache)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tokens = sample_next(logits, greedy, temperature, top_k, top_p, generator)
        tokens = torch.where(finished, torch.full_like(tokens, eos), tokens)
        finished = finished | (tokens == eos)
        yield tokens, finished
        # One host sync per token, the price of stopping once every row has ended.
        if bool(finished.all()) or i == max_new_tokens - 1:
            return
        logits = step(tokens, lengths + i, cache, T + i + 1)


def generate(model, input_ids, images=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """`stream`'s tokens as one LongTensor (B, n <= max_new_tokens); ended rows padded with EOS."""
    steps = [tokens for tokens, _ in stream(model, input_ids, images, attention_mask, **kwargs)]
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=model.device)
    return torch.stack(steps, dim=1)


def load_images(entry, index: int) -> list[Image.Image]:
    """One question's images: None, a PIL image, a path, or a list of those -> list of PIL."""
    items = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
    for item in items:
        if not isinstance(item, (str, os.PathLike, Image.Image)):
            raise TypeError(f"question {index}: an image must be a PIL image or a file path, got "
                            f"{type(item).__name__}.")
    return [item.convert("RGB") if isinstance(item, Image.Image) else load_image(item) for item in items]


_RENDERERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_renderer(model) -> ChatRenderer:
    """The model's `ChatRenderer` (training's prompt layout), built once per model and tokenizer."""
    renderer = _RENDERERS.get(model)
    if renderer is None or renderer.tokenizer is not model.tokenizer:
        renderer = _RENDERERS[model] = ChatRenderer(model.tokenizer, model.cfg)
    return renderer


def render_chat(model, messages: list[dict], images: Sequence = ()) -> RenderedChat:
    """One chat with the assistant prompt, as training lays it out (`ChatRenderer.render`)."""
    return prompt_renderer(model).render(messages, images, add_generation_prompt=True)


def build_prompts(model, images: Sequence, questions: Sequence[str]):
    """(input_ids (B, T), attention_mask (B, T), tiles: list of (n_i, 3, S, S)): each question a
    user turn with its images, left-padded, laid out as training lays out the same question."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image entries for {len(questions)} questions; give one entry "
                         "(an image, a list of images, or None) per question.")
    chats = []
    for i, (entry, question) in enumerate(zip(images, questions)):
        if not isinstance(question, str):
            raise TypeError(f"question {i} must be a string, got {type(question).__name__}.")
        chats.append(([{"role": "user", "content": question}], load_images(entry, i)))
    return render_prompts(model, chats)


def render_prompts(model, chats: Sequence[tuple[list[dict], list]]):
    """`build_prompts` for whole chats: (messages, PIL images) pairs (the lmms-eval plugin's)."""
    rows, tiles = [], []
    for i, (messages, pil_images) in enumerate(chats):
        try:
            chat = render_chat(model, messages, pil_images)
        except RenderError as e:
            raise ValueError(f"question {i}: {e}") from e
        rows.append(chat.input_ids)
        tiles.append(chat.tiles)
    return (*left_pad(rows, model), tiles)


def left_pad(rows: Sequence[Sequence[int]], model) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids (B, T), attention_mask (B, T)), left-padded with the pad token (else EOS)."""
    pad = model.tokenizer.pad_token_id
    rows = [torch.tensor(r, dtype=torch.long) for r in rows]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=model.cfg.lm_eos_token_id if pad is None else pad,
                             padding_side="left")
    return input_ids, pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")


def answer(model, images, questions, max_new_tokens: int = 32, greedy: bool = True, batch_size: int = 32,
           **kwargs) -> list[str]:
    """Answer each question about its image entry; decoded text without special tokens."""
    if isinstance(questions, str):
        questions, images = [questions], [images]
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        ids, mask, tiles = build_prompts(model, images[start:start + batch_size], questions[start:start + batch_size])
        out = generate(model, ids, tiles, mask, max_new_tokens=max_new_tokens, greedy=greedy, **kwargs)
        answers.extend(decode_until_eos(model.tokenizer, row, model.cfg.lm_eos_token_id) for row in out.tolist())
    return answers


def decode_until_eos(tok, ids: list[int], eos: int) -> str:
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True).strip()


class TextModel:
    """A bare language model with what `stream` needs (`nanovlm generate --lm`)."""

    def __init__(self, decoder, tokenizer):
        self.decoder, self.cfg, self.tokenizer = decoder, decoder.cfg, tokenizer
        self.device = decoder.token_embedding.weight.device

    def embed(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        if images is not None:
            raise ValueError("a text-only language model takes no images.")
        return self.decoder.token_embedding(input_ids)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return torch.tensor([self.tokenizer.encode(text)])
