"""The batching engine: one thread owns the model and decodes every running request together.

Continuous batching on a static KV cache (the scheme of Orca / vLLM's scheduler, without paging):
- The cache is one preallocated buffer pair `(layers, max_batch_size, n_kv_heads, capacity,
  head_dim)`. Running requests occupy slots `0..n-1`, so a decode step runs on the first `n` rows
  only (a view, no copy); a request that ends or whose client left gives its slot to the last row.
- All rows share one time axis (one column per decode step). A row's tokens sit right-aligned
  at the current end of that axis and an attention mask hides the columns before its `start`;
  each row carries its own positions, so a row computes exactly what it would alone
  (the left-padding invariant of `nanovlm.generation`).
- Between two decode steps the engine takes waiting requests into free slots: their prompts are
  prefilled together (left-padded, images encoded) into a scratch cache and copied in. A
  prompt longer than the shared axis shifts the running rows right; when the axis is full, or
  mostly masked, it is compacted by dropping the columns no row uses.
- Sampling is `nanovlm.generation.sample_next`, the code `generate` and `stream` use; greedy
  rows share one argmax, sampled rows draw from their own seeded generator, so a request's
  tokens do not depend on what it was batched with.

Requests come in through `submit`, tokens go out through each request's `Handle` queue; text,
stop strings and HTTP live in the server.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from nanovlm.generation import sample_next
from nanovlm.models.language_model import KVCache

logger = logging.getLogger("nanovlm.serve")


class EngineBusy(Exception):
    """The waiting queue is full."""


class PromptError(ValueError):
    """A chat cannot be turned into a prompt for this model; the message says why."""


@dataclass
class GenerationRequest:
    input_ids: list[int]
    tiles: torch.Tensor | None  # (n_tiles, 3, S, S), in the order the prompt's image tokens appear
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class Handle:
    """A submitted request: read its events, or cancel it (the engine then frees its slot).

    Events: ("token", id), ("done", finish_reason, n_generated) with finish_reason "stop" (EOS)
    or "length", and ("error", message). `events` is where the engine puts them: anything with a
    thread-safe `put` (the HTTP server passes one that wakes its event loop); by default a queue
    that `get` reads.
    """

    def __init__(self, request: GenerationRequest, events: Any = None):
        self.request = request
        self.events = queue.SimpleQueue() if events is None else events
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def get(self, timeout: float | None = None):
        """The next event, or None after `timeout` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class _Row:
    """A running request: its slot's bookkeeping."""

    __slots__ = ("handle", "start", "pos", "token", "generated", "max_tokens", "greedy", "temperature",
                 "top_k", "top_p", "generator", "done")

    def __init__(self, handle: Handle, device: torch.device):
        r = handle.request
        self.handle = handle
        self.start = 0  # first cache column that belongs to this row
        self.pos = len(r.input_ids)  # position of `token`, the next token to feed
        self.token = -1
        self.generated = 0
        self.max_tokens = r.max_tokens
        self.greedy = r.temperature <= 0
        self.temperature, self.top_k, self.top_p = r.temperature, r.top_k, r.top_p
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
        self.done = False


class _SlotCache(KVCache):
    """The first `n` slots of the engine's buffers, seen by the decoder as a KVCache.

    Views, not copies: the decoder's in-place `update` writes straight into the engine's buffers.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int, length: int):  # noqa: super().__init__ allocates
        # per layer: (n, n_kv_heads, capacity, head_dim), views of (layers, B, ...) buffers
        self.k, self.v = list(k[:, :n].unbind(0)), list(v[:, :n].unbind(0))
        self.max_len = k.shape[3]
        self.length = length


class Engine:
    def __init__(self, model, max_batch_size: int = 16, max_queued: int = 256, context: int | None = None,
                 prefill_token_budget: int = 8192):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        cfg = model.cfg
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        limit = min(cfg.lm_max_length, cfg.lm_max_position_embeddings)
        self.context = limit if context is None else min(int(context), cfg.lm_max_position_embeddings)
        self.capacity = 2 * self.context  # shared time axis; compacted when full
        self.prefill_token_budget = prefill_token_budget
        self.eos = cfg.lm_eos_token_id
        self.pad = self.eos  # left padding is masked out; any id will do
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0  # filled columns of the shared time axis
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "decode_steps": 0,
                         "decode_rows": 0, "prefills": 0, "errors": 0}

    # ------------------------------------------------------------------------------ public
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="nanovlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: GenerationRequest, events: Any = None) -> Handle:
        n = len(request.input_ids)
        if n < 1 or request.max_tokens < 1 or n + request.max_tokens > self.context:
            raise ValueError(f"a request needs 1 <= prompt ({n}) and prompt + max_tokens ({request.max_tokens}) "
                             f"<= the context ({self.context}).")
        handle = Handle(request, events)
        with self._cond:
            if self._stopping:
                raise EngineBusy("the engine is shutting down.")
            if len(self._waiting) >= self.max_queued:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting.")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        c["running"] = len(self._rows)
        c["waiting"] = len(self._waiting)
        c["mean_batch"] = round(c["decode_rows"] / c["decode_steps"], 2) if c["decode_steps"] else 0.0
        return c

    # ------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
            self.run_once()
        for handle in [r.handle for r in self._rows] + list(self._waiting):
            handle.events.put(("error", "the server is shutting down."))
        self._rows.clear()
        self._waiting.clear()

    def run_once(self) -> None:
        """One scheduler iteration: admit waiting requests into free slots, then one decode step.
        The engine thread's body; tests call it directly to drive the engine step by step."""
        with self._cond:
            new = self._take_waiting()
        try:
            with torch.inference_mode():
                if new:
                    self._prefill(new)
                self._drop_finished()
                if self._rows:
                    self._step()
        except Exception as e:  # never let one bad step kill the engine: fail the batch, go on
            logger.exception("decode step failed; failing %d running request(s)", len(self._rows))
            self.counters["errors"] += 1
            for row in self._rows:
                row.handle.events.put(("error", f"internal error while decoding: {type(e).__name__}: {e}"))
            self._rows.clear()
            self._length = 0

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    def _take_waiting(self) -> list[Handle]:
        """Waiting requests for the free slots, within the prefill budget (at least one)."""
        new: list[Handle] = []
        longest = 0
        while self._waiting and len(self._rows) + len(new) < self.max_batch_size:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                continue
            n = len(handle.request.input_ids)
            if new and max(longest, n) * (len(new) + 1) > self.prefill_token_budget:
                break
            longest = max(longest, n)
            new.append(self._waiting.popleft())
        return new

    def _prefill(self, handles: list[Handle]) -> None:
        model, decoder = self.model, self.model.decoder
        device = model.device
        lengths = [len(h.request.input_ids) for h in handles]
        B, T = len(handles), max(lengths)
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, h in enumerate(handles):  # left padding
            ids[i, T - lengths[i]:] = torch.tensor(h.request.input_ids)
            mask[i, T - lengths[i]:] = 1
        images = [h.request.tiles for h in handles]
        try:
            embeds = model.embed(ids.to(device), images if any(t is not None for t in images) else None)  # (B, T, C)
            scratch = decoder.new_kv_cache(B, T)
            padded = min(lengths) != T
            hidden, _ = decoder(embeds, attention_mask=mask.to(device) if padded else None, kv_cache=scratch)
            logits = decoder.head(hidden[:, -1])  # (B, vocab)
            rows = [_Row(h, device) for h in handles]
            first = self._sample(logits, rows)
        except Exception as e:
            logger.exception("prefill of %d request(s) failed", B)
            self.counters["errors"] += 1
            for h in handles:
                h.events.put(("error", f"internal error while reading the prompt: {type(e).__name__}: {e}"))
            return
        self.counters["prefills"] += 1
        self.counters["requests"] += B
        self.counters["prompt_tokens"] += sum(lengths)
        keep = []
        for j, (row, token) in enumerate(zip(rows, first)):
            row.token = token
            self._emit(row, token)
            if not row.done and not row.handle.cancelled:
                keep.append((j, row))
        if keep:
            self._insert(keep, scratch, lengths, T)

    def _insert(self, keep: list[tuple[int, _Row]], scratch: KVCache, lengths: list[int], T: int) -> None:
        """Copy prefilled rows into free slots, right-aligned at the end of the shared time axis."""
        self._ensure_buffers()
        k, v = self._k, self._v
        n = len(self._rows)
        if n == 0:
            self._length = 0
        L = self._length
        need = max(lengths[j] for j, _ in keep)
        if need > L:  # the new prompt is longer than the axis: move the running rows right
            shift = need - L
            if n and L:
                k[:, :n, :, shift:need] = k[:, :n, :, :L].clone()
                v[:, :n, :, shift:need] = v[:, :n, :, :L].clone()
            for row in self._rows:
                row.start += shift
            L = need
        scratch_k, scratch_v = torch.stack(scratch.k), torch.stack(scratch.v)  # (layers, B, n_kv_heads, T, head_dim)
        for j, row in keep:
            slot, P = len(self._rows), lengths[j]
            k[:, slot, :, L - P:L] = scratch_k[:, j, :, T - P:T]
            v[:, slot, :, L - P:L] = scratch_v[:, j, :, T - P:T]
            row.start = L - P
            self._rows.append(row)
        self._length = L

    def _step(self) -> None:
        """One decode step for every running row."""
        rows, decoder, device = self._rows, self.model.decoder, self.model.device
        first_used = min(r.start for r in rows)
        if self._length + 1 > self.capacity or (first_used >= 32 and first_used * 2 > self._length):
            self._compact(first_used)
        n, L = len(rows), self._length
        tokens = torch.tensor([r.token for r in rows], device=device)  # (n,)
        positions = torch.tensor([[r.pos] for r in rows], device=device)  # (n, 1)
        starts = torch.tensor([r.start for r in rows], device=device)
        mask = None
        if bool((starts > 0).any()):
            mask = (torch.arange(L + 1, device=device)[None, :] >= starts[:, None]).long()  # (n, L + 1)
        x = decoder.token_embedding(tokens[:, None])  # (n, 1, C)
        hidden, _ = decoder(x, attention_mask=mask, kv_cache=_SlotCache(self._k, self._v, n, L),
                            position_ids=positions)
        self._length = L + 1
        logits = decoder.head(hidden[:, -1])  # (n, vocab)
        next_tokens = self._sample(logits, rows)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += n
        for row, token in zip(rows, next_tokens):
            row.pos += 1
            row.token = token
            self._emit(row, token)
        self._drop_finished()

    def _emit(self, row: _Row, token: int) -> None:
        row.generated += 1
        self.counters["generated_tokens"] += 1
        if token == self.eos:
            row.done = True
            row.handle.events.put(("done", "stop", row.generated))
            return
        row.handle.events.put(("token", token))
        if row.generated >= row.max_tokens:
            row.done = True
            row.handle.events.put(("done", "length", row.generated))

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        out = sample_next(logits, True, 0.0, 0, 1.0).tolist()  # greedy rows: one argmax for all
        for i, row in enumerate(rows):
            if not row.greedy:
                out[i] = int(sample_next(logits[i:i + 1], False, row.temperature, row.top_k, row.top_p,
                                         row.generator)[0])
        return out

    def _drop_finished(self) -> None:
        """Free the slots of finished or cancelled rows: the last row moves into each hole."""
        rows, L = self._rows, self._length
        for i in reversed(range(len(rows))):
            if not (rows[i].done or rows[i].handle.cancelled):
                continue
            last = len(rows) - 1
            if i != last:
                self._k[:, i, :, :L] = self._k[:, last, :, :L]
                self._v[:, i, :, :L] = self._v[:, last, :, :L]
                rows[i] = rows[last]
            rows.pop()
        if not rows:
            self._length = 0

    def _compact(self, first_used: int) -> None:
        """Drop the columns before the first one any row uses."""
        if first_used == 0:
            raise RuntimeError("the KV cache is full although every column is in use.")  # limits prevent this
        n, L = len(self._rows), self._length
        self._k[:, :n, :, :L - first_used] = self._k[:, :n, :, first_used:L].clone()
        self._v[:, :n, :, :L - first_used] = self._v[:, :n, :, first_used:L].clone()
        for row in self._rows:
            row.start -= first_used
        self._length = L - first_used

    def _ensure_buffers(self) -> None:
        if self._k is None:
            decoder = self.model.decoder
            p = decoder.token_embedding.weight
            shape = decoder.kv_cache_shape(self.max_batch_size, self.capacity)  # (layers, B, n_kv_heads, capacity, head_dim)
            self._k, self._v = (torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2))


# ---------------------------------------------------------------------------------- prompts
def build_prompt(model, processor, messages: Sequence[Any]) -> tuple[list[int], torch.Tensor | None]:
    """Chat messages (`.role`, `.parts`: text or PIL images) -> (input ids, image tiles or None).

    Rendered by the model's `ChatRenderer` (`nanovlm.generation.prompt_renderer`), the layout
    training and `answer` use: each image's string where its part stands, `<image: k>` tags when
    the prompt holds several images, the chat template, then the assistant prompt. `processor`:
    the image processor to tile with (None: `image_processor_for(model.cfg)`).
    """
    from nanovlm.data.processors import RenderError
    from nanovlm.generation import prompt_renderer

    renderer = prompt_renderer(model, processor)
    chat = [{"role": m.role, "content": list(m.parts)} for m in messages]
    try:
        rendered = renderer.render(chat, add_generation_prompt=True)
    except RenderError as e:
        if e.reason == "image_token_mismatch":
            raise PromptError("the message text contains the reserved image placeholder "
                              f"{model.tokenizer.image_token!r}; remove it and send images as image_url content "
                              "parts.") from e
        raise PromptError(str(e)) from e
    return rendered.input_ids, (rendered.tiles if rendered.grids else None)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing runs or waits (tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.idle:
            return True
        time.sleep(0.01)
    return False
