"""Generation: sampling, the KV-cache decode loop, streaming, and `answer`.

One decode loop serves everything (`generate`, `stream`, the server, evaluation): prefill the
prompt into a static KV cache, then feed one token per step. Batches are left-padded; positions
come from the attention mask, so a padded row decodes exactly as it would alone. Each row stops
at EOS (later tokens are EOS padding) and the loop ends early once every row has stopped.
Eager steps attend to the filled part of the cache; with `compile=True` the step is one
fixed-shape function over the whole (bucketed) cache, positions and slots as tensors
(`LanguageModel.decode_step`, as in gpt-fast), compiled once per decoder and cache shape.
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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`;
    the rest become -inf. (B, V) -> (B, V)."""
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
    """(B, V) logits -> (B,) token ids."""
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


@torch.inference_mode()
def stream(model, input_ids: torch.Tensor, images=None, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int = 32, top_k: int = 50, top_p: float = 0.9, temperature: float = 0.5,
           greedy: bool = False, eos_token_id: int | None = None, use_kv_cache: bool = True,
           generator: torch.Generator | None = None, compile: bool = False,
           static_decode: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) once per decoded step.

    A finished row keeps yielding EOS. Stops after `max_new_tokens` steps or when all rows ended.
    `compile`: decode with `torch.compile` of the one-token step over a static cache (the first
    call per shape compiles; falls back to eager with a warning where compiling fails).
    `static_decode` (default: `compile`): that fixed-shape step, compiled or not; else each step
    attends to the filled part of the cache only (fewer keys: what batched eager decoding wants).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    eos = model.cfg.lm_eos_token_id if eos_token_id is None else eos_token_id
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if max_new_tokens == 0:
        return
    if T + max_new_tokens > model.cfg.lm_max_position_embeddings:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.lm_max_position_embeddings} positions.")
    decoder = model.decoder
    embeds = model.embed(input_ids, images)  # (B, T, C)
    full_mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
    full_mask[:, :T] = attention_mask
    # One host sync per call (the mask is read back) buys SDPA's causal kernel for unpadded batches.
    padded = not bool((attention_mask == 1).all())
    static = (compile if static_decode is None else static_decode) and use_kv_cache
    cache_len = T + max_new_tokens
    if static:  # one cache shape for prompts of similar length: one compiled step
        cache_len = _cache_length(cache_len, model.cfg.lm_max_position_embeddings)

    cache = decoder.new_kv_cache(B, cache_len) if use_kv_cache else None
    hidden, _ = decoder(embeds, attention_mask=attention_mask if padded else None, kv_cache=cache)
    if static:
        step_fn = _static_step(model, compile)
        key_mask = torch.ones(B, cache_len, dtype=torch.bool, device=device)
        key_mask[:, :T] = attention_mask.bool()
        input_pos = torch.tensor([T], device=device)
    # Each row's next position: its count of real tokens (left padding does not count).
    next_pos = attention_mask.sum(dim=1, keepdim=True)  # (B, 1)
    logits = decoder.head(hidden[:, -1])  # (B, vocab)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, greedy, temperature, top_k, top_p, generator)
        tokens = torch.where(finished, torch.full_like(tokens, eos), tokens)
        finished = finished | (tokens == eos)
        yield tokens, finished
        # One host sync per decoded token, the price of stopping once every row has ended: the
        # host waits for this step's kernels before it queues the next step's, so an accelerator
        # idles for one launch latency. (The position check in the next forward reads back right
        # after it, with the queue empty: no further wait.)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if static:
            logits = step_fn(tokens[:, None], next_pos + step, input_pos + step, key_mask, cache)
            continue
        x = decoder.token_embedding(tokens[:, None])  # (B, 1, C)
        if cache is not None:
            mask = full_mask[:, : T + step + 1] if padded else None
            hidden, _ = decoder(x, attention_mask=mask, kv_cache=cache, position_ids=next_pos + step)
        else:
            embeds = torch.cat([embeds, x], dim=1)  # no cache: recompute everything (tests, reference)
            hidden, _ = decoder(embeds, attention_mask=full_mask[:, : T + step + 1] if padded else None)
        logits = decoder.head(hidden[:, -1])


CACHE_BUCKET = 128  # static caches round up to this many positions, so prompts of similar length share a compiled step


def _cache_length(needed: int, limit: int) -> int:
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, max(limit, needed))


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _eager_step(decoder, tokens, position_ids, input_pos, key_mask, cache) -> torch.Tensor:
    """One decode step over the static cache: tokens (B, 1) -> next-token logits (B, vocab)."""
    x = decoder.token_embedding(tokens)  # (B, 1, C)
    hidden = decoder.decode_step(x, position_ids, input_pos, key_mask, cache)  # (B, 1, C)
    return decoder.head(hidden[:, -1])


def _static_step(model, compile: bool):
    """The model's static decode step, compiled once per decoder when asked (and reused)."""
    decoder = model.decoder
    eager = functools.partial(_eager_step, decoder)
    if not compile:
        return eager
    layout = _layout(decoder)
    known = _STEPS.get(decoder)
    step = known[1] if known is not None and known[0] == layout else None
    if step is None:
        # torch.compile keeps compiled graphs per code object and, past `recompile_limit` (8)
        # decoders or cache shapes, silently runs eagerly: each decoder's step gets its own copy
        # (a compiled partial would share functools' wrapper code with every other decoder).
        own = types.FunctionType(_eager_step.__code__.replace(), _eager_step.__globals__, "_eager_step")
        options = dict(COMPILE_OPTIONS.get(model.device.type, {}))
        # Dynamo's guards on the decoder's modules cost ~1 ms a token (~9% of int8 decoding);
        # they are skipped, and `_layout` (checked once per `stream`) stands in for them.
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        compiled = torch.compile(own, dynamic=False, options=options)
        state = {"fn": functools.partial(compiled, decoder)}

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
    """What the skipped module guards would check: every module's type and every parameter's and
    buffer's storage, dtype and shape. A change (`prepare_for_inference`, `.to(...)`, a swapped
    layer) compiles a new step; weights loaded in place keep it."""
    tensors = itertools.chain(decoder.named_parameters(), decoder.named_buffers())
    return (tuple((name, type(m)) for name, m in decoder.named_modules()),
            tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.device) for name, t in tensors))


# Inductor's default mode ("max-autotune-no-cudagraphs" compiled far longer and was no faster in a
# helper's loaded microbenchmark), with its inlining turned off: batch 1 computes each linear as a
# multiply-and-sum loop over the weight rows (`quantization.row_matmul`), and inductor would
# otherwise inline the ops that make the activation (the residual adds, the embedding lookup, the
# norm and its bf16 rounding) into that loop, redoing them for every weight row. Every elementwise
# result is stored instead (`realize_reads_threshold=0` for results used more than once,
# `realize_opcount_threshold=0` for the rest): the activations are a few KB a token, the loops then
# read only the weight and a float vector. Int8 decoding of the 222M shape: 34 -> 49 tokens/s with
# the first, 54 -> 77 with both (docs/benchmarks.md).
# Other devices keep inductor's defaults (the loops above are the CPU's batch-1 path only).
COMPILE_OPTIONS = {"cpu": {"realize_reads_threshold": 0, "realize_opcount_threshold": 0}}


def generate(model, input_ids, images=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """New tokens only: LongTensor (B, n) with n <= max_new_tokens; ended rows padded with EOS."""
    steps = [tokens for tokens, _ in stream(model, input_ids, images, attention_mask, **kwargs)]
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=model.device)
    return torch.stack(steps, dim=1)


# ---------------------------------------------------------------------- answer(): the one-call path
def _load_images(entry, index: int):
    """One question's images: None, a PIL image, a path, or a list of those -> list of PIL."""
    from PIL import Image

    if entry is None:
        return []
    items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            from nanovlm.data.images import open_image

            out.append(open_image(item))
        elif isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        else:
            raise TypeError(f"question {index}: an image must be a PIL image or a file path, got {type(item).__name__}.")
    return out


_RENDERERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_renderer(model, image_processor=None):
    """The model's `ChatRenderer` (the one prompt layout of training and inference), built once
    per model and tokenizer: `answer` calls it for every batch."""
    from nanovlm.data.processors import ChatRenderer

    tok = model.tokenizer
    try:
        renderer = _RENDERERS.get(model)
    except TypeError:  # a model that cannot be weakly referenced: no reuse
        renderer = None
    if renderer is None or renderer.tokenizer is not tok or (
            image_processor is not None and renderer.image_processor is not image_processor):
        renderer = ChatRenderer(tok, model.cfg, image_processor)
        try:
            _RENDERERS[model] = renderer
        except TypeError:
            pass
    return renderer


def build_prompts(model, images: Sequence, questions: Sequence[str]):
    """Tokenised, left-padded prompts and their image tiles for `answer`-style calls: each
    question rendered as a user turn with its images (`ChatRenderer`), plus the assistant prompt,
    exactly as training lays out the same question. The images go before the question, or at
    its `<image>` placeholders when it has one per image (as LLaVA data marks them).

    Returns (input_ids (B, T), attention_mask (B, T), images: list of (n_i, 3, S, S))."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image entries for {len(questions)} questions; give one entry "
                         "(an image, a list of images, or None) per question.")
    chats = []
    for i, (entry, question) in enumerate(zip(images, questions)):
        if not isinstance(question, str):
            raise TypeError(f"question {i} must be a string, got {type(question).__name__}.")
        chats.append(([{"role": "user", "content": question}], _load_images(entry, i)))
    return render_prompts(model, chats)


def render_prompts(model, chats: Sequence[tuple[list[dict], list]]):
    """`build_prompts` for whole chats: (messages, PIL images) pairs, each rendered by the
    model's `ChatRenderer` with the assistant prompt, then left-padded (the lmms-eval plugin's
    chat requests come this way). Returns what `build_prompts` returns."""
    from nanovlm.data.processors import RenderError

    renderer = prompt_renderer(model)
    rows, tiles = [], []
    for i, (messages, pil_images) in enumerate(chats):
        try:
            chat = renderer.render(messages, pil_images, add_generation_prompt=True)
        except RenderError as e:
            raise ValueError(f"question {i}: {e}") from e
        rows.append(chat.input_ids)
        tiles.append(chat.tiles)
    input_ids, attention_mask = left_pad(rows, model)
    return input_ids, attention_mask, tiles


def left_pad(rows: Sequence[Sequence[int]], model) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids (B, T), attention_mask (B, T)), left-padded with the tokenizer's
    pad token (else EOS); the mask is 1 on real tokens."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.cfg.lm_eos_token_id
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, longest - len(r):] = 1
    return input_ids, attention_mask


def answer(model, images, questions, max_new_tokens: int = 32, greedy: bool = True, batch_size: int = 32,
           **kwargs) -> list[str]:
    """Answer each question about its image entry; decoded text without special tokens."""
    if isinstance(questions, str):
        questions, images = [questions], [images]
    answers: list[str] = []
    tok = model.tokenizer
    for start in range(0, len(questions), batch_size):
        ids, mask, tiles = build_prompts(model, images[start:start + batch_size], questions[start:start + batch_size])
        out = generate(model, ids, tiles, mask, max_new_tokens=max_new_tokens, greedy=greedy, **kwargs)
        answers.extend(decode_until_eos(tok, row, model.cfg.lm_eos_token_id) for row in out.tolist())
    return answers


def decode_until_eos(tok, ids: list[int], eos: int) -> str:
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- text-only language models
class TextModel(torch.nn.Module):
    """A bare language model with the interface `stream` needs (`--lm` in `nanovlm generate`,
    which loads the decoder; this module takes models duck-typed and imports none)."""

    def __init__(self, decoder, tokenizer):
        super().__init__()
        self.decoder = decoder
        self.cfg = decoder.cfg
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    def embed(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        if images is not None:
            raise ValueError("a text-only language model takes no images.")
        return self.decoder.token_embedding(input_ids)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return torch.tensor([self.tokenizer.encode(text)])
