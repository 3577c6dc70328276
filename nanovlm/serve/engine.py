"""The batching engine: one thread owns the model and decodes every running request together.

Continuous batching (Orca's scheme, vLLM's without paging) on `generate`'s decode step: one
static KV cache of `max_batch_size` rows x `context` slots; running requests hold rows 0..n-1,
each from slot 0, so a row computes what it would alone (a finished row hands its place to the
last). Waiting requests are prefilled together between two steps; each sampled request draws
from its own seeded generator.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from nanovlm.generation import prefill, sample_next, step_function

logger = logging.getLogger("nanovlm.serve")


class EngineBusy(Exception):
    """No room for a request: the waiting queue is full, or the engine is stopping."""


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
    """A submitted request and its decode state. Events ("token", id), ("done", "stop" | "length", n),
    ("error", message) go to `events` (anything with a thread-safe `put`; by default read by `get`)."""

    def __init__(self, request: GenerationRequest, events: Any = None):
        self.request = request
        self.events = queue.SimpleQueue() if events is None else events
        self.cancelled = False
        self.pos, self.token, self.generated, self.done = len(request.input_ids), -1, 0, False
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:  # from any thread: the engine frees the row between two steps
        self.cancelled = True

    def get(self, timeout: float | None = None):
        """The next event, or None after `timeout` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class Engine:
    def __init__(self, model, max_batch_size: int = 16, max_queued: int = 256, context: int | None = None,
                 prefill_token_budget: int = 8192, compile: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        cfg = model.cfg
        self.model, self.max_batch_size, self.max_queued, self.compile = model, max_batch_size, max_queued, compile
        self.context = min(cfg.lm_max_length if context is None else int(context), cfg.lm_max_position_embeddings)
        self.prefill_token_budget, self.eos = prefill_token_budget, cfg.lm_eos_token_id
        self._step_fn = step_function(model.decoder.prepare_for_inference(), compile)
        self._cache = None  # max_batch_size x context slots, allocated with the first request
        self._rows: list[Handle] = []
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "decode_steps": 0,
                         "decode_rows": 0, "prefills": 0, "errors": 0}

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

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

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
        c = dict(self.counters, running=len(self._rows), waiting=len(self._waiting))
        c["mean_batch"] = round(c["decode_rows"] / c["decode_steps"], 2) if c["decode_steps"] else 0.0
        return c

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
            self.run_once()
        for handle in self._rows + list(self._waiting):
            handle.events.put(("error", "the server is shutting down."))
        self._rows.clear()
        self._waiting.clear()

    def run_once(self) -> None:
        """One scheduler iteration: admit waiting requests into free rows, then one decode step."""
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
            self._fail(self._rows, "decoding", e)
            self._rows.clear()

    def _fail(self, handles: list[Handle], during: str, error: Exception) -> None:
        logger.exception("%s failed; failing %d request(s)", during, len(handles))
        self.counters["errors"] += 1
        for h in handles:
            h.events.put(("error", f"internal error while {during}: {type(error).__name__}: {error}"))

    def _take_waiting(self) -> list[Handle]:
        """Waiting requests for the free rows, within the prefill budget (at least one)."""
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
        """The new prompts, right-padded, into rows n..n+m-1; their first tokens."""
        model, device = self.model, self.model.device
        lengths = [len(h.request.input_ids) for h in handles]
        ids = pad_sequence([torch.tensor(h.request.input_ids, dtype=torch.long) for h in handles], batch_first=True,
                           padding_value=self.eos)  # (m, T), right-padded
        images = [h.request.tiles for h in handles]
        try:
            if self._cache is None:
                self._cache = model.decoder.new_kv_cache(self.max_batch_size, self.context)
            embeds = model.embed(ids.to(device), images if any(t is not None for t in images) else None)
            n = len(self._rows)
            logits = prefill(model.decoder, embeds, torch.tensor(lengths, device=device),
                             self._cache.rows(n, n + len(handles)))
            for h in handles:
                if h.request.temperature > 0:
                    seed = h.request.seed if h.request.seed is not None else secrets.randbits(63)
                    h.generator = torch.Generator(device).manual_seed(seed)
            first = self._sample(logits, handles)
        except Exception as e:
            self._fail(handles, "reading the prompt", e)
            return
        self.counters["prefills"] += 1
        self.counters["requests"] += len(handles)
        self.counters["prompt_tokens"] += sum(lengths)
        for row, token in zip(handles, first):
            self._rows.append(row)
            self._emit(row, token)

    def _step(self) -> None:
        rows, n = self._rows, len(self._rows)
        width = self.max_batch_size if self.compile else n
        tokens, positions = torch.zeros(2, width, dtype=torch.long)
        tokens[:n] = torch.tensor([r.token for r in rows])
        positions[:n] = torch.tensor([r.pos for r in rows])
        device = self.model.device
        cache = self._cache if self.compile else self._cache.rows(0, n)
        logits = self._step_fn(tokens.to(device), positions.to(device), cache, int(positions.max()) + 1)
        next_tokens = self._sample(logits[:n], rows)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += n
        for row, token in zip(rows, next_tokens):
            row.pos += 1
            self._emit(row, token)
        self._drop_finished()

    def _emit(self, row: Handle, token: int) -> None:
        row.token = token
        row.generated += 1
        self.counters["generated_tokens"] += 1
        row.done = token == self.eos or row.generated >= row.request.max_tokens
        if token != self.eos:
            row.events.put(("token", token))
        if row.done:
            row.events.put(("done", "stop" if token == self.eos else "length", row.generated))

    def _sample(self, logits: torch.Tensor, rows: Sequence[Handle]) -> list[int]:
        out = logits.argmax(dim=-1).tolist()  # greedy rows: one argmax for all
        for i, row in enumerate(rows):
            if row.generator is not None:
                r = row.request
                out[i] = int(sample_next(logits[i:i + 1], False, r.temperature, r.top_k, r.top_p, row.generator)[0])
        return out

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled requests: the last row moves into each hole."""
        rows = self._rows
        for i in reversed(range(len(rows))):
            if rows[i].done or rows[i].cancelled:
                last = rows.pop()
                if i < len(rows):
                    for buffer in self._cache.k + self._cache.v:  # its filled slots, 0..pos-1
                        buffer[i, :, :last.pos] = buffer[len(rows), :, :last.pos]
                    rows[i] = last

