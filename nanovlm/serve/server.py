"""The HTTP server: OpenAI-compatible chat completions, model list, health, metrics, the chat page.

As vLLM serves the OpenAI API: a Starlette app run by uvicorn; images and tokenizing run in
worker threads, decoding in the engine thread. Every failure is an OpenAI-shaped JSON error (4xx
for the client's, 500 logged); a client that leaves cancels its request; SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import h11
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanovlm.data.processors import RenderError
from nanovlm.generation import render_chat
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.runtime import default_device, pick_dtype
from nanovlm.serve import protocol
from nanovlm.serve.engine import Engine, EngineBusy, GenerationRequest
from nanovlm.serve.metrics import Metrics
from nanovlm.serve.protocol import APIError, Limits
from nanovlm.weights.nanovlm import checkpoint_directory

logger = logging.getLogger("nanovlm.serve")

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
API_KEY_ENV = "NANOVLM_API_KEY"
_UNCAPPED = ("/health", "/metrics")  # monitoring must still see a saturated server
_ROUTES = ("/", "/index.html", "/health", "/metrics", "/v1/models", "/v1/chat/completions")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


@dataclass
class App:

    engine: Engine
    model_names: tuple[str, ...]  # the served names (the first is the one reported) and "default"
    limits: Limits = field(default_factory=Limits)
    allow_remote_images: bool = False
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False).encode("utf-8"), status_code=status,
                    media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **kw) -> Response:
    return _json(status, protocol.error_body(message, **kw), headers)


def _internal_error() -> Response:
    return _error(500, "internal server error; the details are in the server log.", type="server_error",
                  code="internal_error")


class _LoopQueue:
    """Where the engine thread puts a request's events: an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is waiting for this event any more
            pass


async def chat(app: App, request: Request) -> Response:
    try:
        body = await _read_body(request, app.limits)
        parsed, ids, generation = await run_in_threadpool(_prepare, app, body)  # images, tokens: off the loop
    except APIError as e:
        return _json(e.status, e.body(), {"Connection": "close"} if e.status in (411, 413) else None)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it
    except Exception:
        logger.exception("internal error on POST /v1/chat/completions")
        return _internal_error()
    events = _LoopQueue(asyncio.get_running_loop())
    try:
        handle = app.engine.submit(generation, events=events)
    except EngineBusy as e:
        return _error(503, f"the server is busy ({e}); retry in a moment.", type="server_error", code="server_busy")
    pieces = _pieces(app, parsed, events.queue)
    if parsed.stream:
        return StreamingResponse(_stream(parsed, pieces, len(ids)), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(handle.cancel))
    watcher = asyncio.ensure_future(_watch_disconnect(request, handle, events.queue))
    try:
        return await _complete(parsed, pieces, len(ids))
    finally:
        watcher.cancel()
        handle.cancel()  # a no-op when it finished; frees the row when the client left or we failed


def chat_prompt(model, messages: list[dict]) -> tuple[list[int], torch.Tensor | None]:
    """Parsed chat messages -> (prompt ids, image tiles or None), as `generation.render_chat` lays them out."""
    try:
        chat = render_chat(model, messages)
    except RenderError as e:
        if e.reason == "image_token_mismatch":
            e = (f"the message text contains the reserved image placeholder {model.tokenizer.image_token!r}; "
                 "remove it and send images as image_url content parts.")
        raise APIError(400, str(e), param="messages") from None
    return chat.input_ids, (chat.tiles if chat.grids else None)


def _prepare(app: App, body: bytes) -> tuple[protocol.ChatRequest, list[int], GenerationRequest]:
    request = protocol.parse_chat_request(body, model_names=app.model_names, limits=app.limits,
                                          allow_remote_images=app.allow_remote_images)
    ids, tiles = chat_prompt(app.engine.model, request.messages)
    max_tokens = _check_lengths(app, len(ids), request.max_tokens)
    return request, ids, GenerationRequest(ids, tiles, max_tokens, temperature=request.temperature,
                                           top_p=request.top_p, top_k=request.top_k, seed=request.seed)


def _check_lengths(app: App, prompt_tokens: int, max_tokens: int | None) -> int:
    context = app.engine.context
    cap, room = min(context - 1, app.limits.max_tokens_cap or context), context - prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens (images included) but this model's context "
                            f"is {context} tokens; shorten the conversation or send fewer or smaller images.",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return min(room, cap)
    if max_tokens > cap:
        raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {cap}; lower it.",
                       param="max_tokens", code="max_tokens_exceeded")
    if max_tokens > room:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this "
                            f"model's context of {context} tokens; set max_tokens to at most {room}.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


async def _read_body(request: Request, limits: Limits) -> bytes:
    limit, headers = limits.max_body_bytes, request.headers
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        if "content-length" not in headers:
            raise APIError(411, "the request has no Content-Length header; send the JSON body with one.",
                           code="length_required")
        length = int(headers["content-length"])  # h11 has refused a malformed one
        if length > limit:
            # Read and drop a body we refuse, so the client sees our answer rather than a reset; not
            # one announced with Expect: 100-continue (it is not sent), nor one far over the limit.
            if "100-continue" not in headers.get("expect", "").lower() and length <= 4 * limit + (1 << 20):
                async for _ in request.stream():
                    pass
            raise APIError(413, f"the request body is {length} bytes; this server accepts at most {limit} bytes. "
                                "Send smaller or fewer images.", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes, the most this server accepts. "
                                "Send smaller or fewer images.", code="request_too_large")
    return bytes(body)


async def _watch_disconnect(request: Request, handle, queue: asyncio.Queue) -> None:
    """Cancel the request when its client leaves (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()
    queue.put_nowait(("gone",))


async def _pieces(app: App, parsed: protocol.ChatRequest, queue: asyncio.Queue):
    """Text deltas, then ("done", finish_reason, n_tokens); or ("error", message) or ("gone",)."""
    text, n_tokens = protocol.TextAssembler(app.engine.model.tokenizer, parsed.stop), 0
    while True:
        event = await queue.get()
        if event[0] == "token":
            n_tokens += 1
            delta, finish = text.push(event[1]), "stop" if text.stopped else None
        elif event[0] == "done":
            delta, finish, n_tokens = text.finish(), event[1], event[2]
        else:
            yield event
            return
        if delta:
            yield delta
        if finish:
            yield "done", finish, n_tokens
            return


async def _complete(parsed: protocol.ChatRequest, pieces, prompt_tokens: int) -> Response:
    text = []
    async for piece in pieces:
        if isinstance(piece, str):
            text.append(piece)
        elif piece[0] == "done":
            return _json(200, protocol.completion_body(parsed.model, "".join(text), piece[1], prompt_tokens, piece[2]))
        elif piece[0] == "gone":
            return Response(status_code=499)  # never sent: the client has left
        else:
            logger.error("request failed in the engine: %s", piece[1])
            return _internal_error()


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _stream(parsed: protocol.ChatRequest, pieces, prompt_tokens: int):
    """The answer as server-sent events. Starlette cancels this generator when the client leaves."""
    chunk = protocol.Chunks(parsed.model, parsed.include_usage)
    yield _sse(chunk({"role": "assistant", "content": ""}))
    async for piece in pieces:
        if isinstance(piece, str):
            yield _sse(chunk({"content": piece}))
        elif piece[0] == "done":
            yield _sse(chunk({}, piece[1]))
            if parsed.include_usage:
                yield _sse(chunk.usage(prompt_tokens, piece[2]))
            yield b"data: [DONE]\n\n"
        else:
            logger.error("request failed in the engine: %s", piece[1])
            yield _sse(protocol.error_body("internal server error while generating; the details are in the server "
                                           "log.", type="server_error", code="internal_error"))


def build_app(app: App):
    """The ASGI application: Starlette's routes inside the `_Gate` middleware."""

    async def page(request: Request) -> Response:
        with open(PAGE, "rb") as f:
            return Response(f.read(), media_type="text/html; charset=utf-8")

    async def health(request: Request) -> Response:
        ok = app.engine.alive
        return _json(200 if ok else 503, {"status": "ok" if ok else "error", "model": app.model_names[0],
                                          "api_key_required": app.api_key is not None, **app.engine.stats()})

    async def metrics(request: Request) -> Response:
        return Response(app.metrics.render(app.engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request) -> Response:
        card = protocol.model_card(app.model_names[0], app.created, app.engine.context)
        return _json(200, {"object": "list", "data": [card]})

    async def model(request: Request) -> Response:
        try:
            name = protocol.check_model(request.path_params["name"], app.model_names)
        except APIError as e:
            return _json(e.status, e.body())
        return _json(200, protocol.model_card(name, app.created, app.engine.context))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's 404 (no route) and 405 (a route, another method) in OpenAI's error shape."""
        path = request.url.path[:200]
        if exc.status_code == 405:
            allowed = sorted((exc.headers or {}).get("Allow", "").replace(" ", "").split(","))
            return _error(405, f"method not allowed on {path}; use {' or '.join(allowed)}.",
                          {"Allow": ", ".join(allowed)}, code="method_not_allowed")
        return _error(404, f"no route {request.method} {path}; this server has POST /v1/chat/completions, GET "
                           "/v1/models, GET /health, GET /metrics and GET /.", code="not_found")

    async def crash(request: Request, exc: Exception) -> Response:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _internal_error()

    routes = [Route("/", page, methods=["GET"]), Route("/index.html", page, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/v1/chat/completions", functools.partial(chat, app), methods=["POST"])]
    return _Gate(Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash}), app)


class _Gate:
    """ASGI middleware: metrics around everything, then the API key on /v1/*, then the cap on
    requests in progress (refusals are ordinary responses, so the client reads them)."""

    def __init__(self, asgi, app: App):
        self.asgi, self.app = asgi, app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        app, path, started, status = self.app, scope["path"], time.perf_counter(), 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if app.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                await self._unauthorized(scope)(scope, receive, send_and_note)
            elif path in _UNCAPPED:
                await self.asgi(scope, receive, send_and_note)
            elif app.metrics.in_progress >= app.limits.max_connections:
                await _error(503, f"the server already has {app.limits.max_connections} open connections with a "
                                  "request in progress, its limit; retry in a moment.", {"Retry-After": "1"},
                             type="server_error", code="too_many_connections")(scope, receive, send_and_note)
            else:
                app.metrics.in_progress += 1
                try:
                    await self.asgi(scope, receive, send_and_note)
                finally:
                    app.metrics.in_progress -= 1
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"  # labels stay a small set
            route = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            app.metrics.observe(route, method, status, time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, b"Bearer " + self.app.api_key.encode("utf-8"))

    @staticmethod
    def _unauthorized(scope) -> Response:
        message = ("the API key is wrong; send the server's key as 'Authorization: Bearer KEY'."
                   if any(k == b"authorization" for k, _ in scope["headers"]) else
                   "this server needs an API key; send it as the header 'Authorization: Bearer KEY' (the openai "
                   "client's api_key).")
        return _error(401, message, {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse with a JSON 400."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(protocol.error_body(f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); send a "
                                              "well-formed request line and headers.")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, whose SIGTERM / Ctrl-C drains and exits 0 (uvicorn would re-raise the signal)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._drain) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _drain(self, sig, frame) -> None:
        if self.should_exit:  # a second signal: stop waiting
            self.force_exit = True
            return
        print(f"nanovlm: {signal.Signals(sig).name}: draining (no new connections; requests in progress get up "
              f"to {self.config.timeout_graceful_shutdown} s to finish).", flush=True)
        self.should_exit = True


class RunningServer:
    """A server on a listening socket: `start()` runs it in a thread, `run()` here until a signal drains it."""

    def __init__(self, server: _Uvicorn, sock: socket.socket, app: App):
        self.server, self.sock, self.app = server, sock, app
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.url = "http://{}:{}".format(*self.address)
        self._thread = threading.Thread(target=self.run, name="nanovlm-http", daemon=True)

    def start(self) -> "RunningServer":
        self._thread.start()
        while not self.server.started:  # startup takes milliseconds; a failed one ends the thread
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start; see the log.")
            time.sleep(0.005)
        return self

    def run(self) -> int:
        """Serve until stopped (SIGTERM / Ctrl-C drain the server first); the exit code."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.app.engine.stop(timeout=5.0)
        return 0 if self.server.started else 1

    def close(self) -> None:
        """Fail what is still running, stop accepting, end open connections, free the port."""
        self.app.engine.stop()
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(model, host: str = "127.0.0.1", port: int = 0, *, max_batch_size: int = 16,
                allow_remote_images: bool = False, limits: Limits | None = None,
                model_name: str | Sequence[str] = "nanovlm", context: int | None = None, api_key: str | None = None,
                drain_timeout: float = 5.0, compile: bool = False) -> RunningServer:
    """A server for an in-memory model on host:port (0: a free port) answering to `model_name`(s) and "default"."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or stop the "
                      "program using it.") from None
    limits = limits or Limits()
    engine = Engine(model, max_batch_size=max_batch_size, max_queued=limits.max_queued, context=context,
                    compile=compile).start()
    names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
    app = App(engine=engine, model_names=(*names, "default"), limits=limits, allow_remote_images=allow_remote_images,
              api_key=api_key or None)
    config = uvicorn.Config(build_app(app), http=_Protocol, lifespan="off", log_config=None, server_header=False,
                            headers=[("server", "nanovlm")], timeout_graceful_shutdown=drain_timeout,
                            timeout_keep_alive=60)
    return RunningServer(_Uvicorn(config), sock, app)


def model_name_for(model_dir: str) -> str:
    """The name clients send as `model` by default: the checkpoint folder (`run/final` for a run's final/)."""
    path = os.path.normpath(os.path.abspath(model_dir))
    base, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    return f"{parent}/{base}" if base in ("final", "latest") and parent else base


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, *, served_model_name: Sequence[str] = (),
          dtype: str = "auto", quantize: str = "none", api_key: str | None = None, drain_timeout: float = 30.0,
          **options) -> int:
    """`nanovlm serve`: serve a checkpoint until Ctrl-C or SIGTERM drains it; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be 0 or more seconds, got {drain_timeout:g}.")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    directory = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    device = default_device()
    model = VisionLanguageModel.from_pretrained(directory, dtype=pick_dtype(dtype, device), device=device,
                                                require_tokenizer=True, quantize=quantize)
    torch.set_grad_enabled(False)
    names = tuple(served_model_name) or (model_name_for(model_dir),)
    srv = make_server(model, host, port, model_name=names, api_key=api_key, drain_timeout=drain_timeout, **options)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can use the model%s.", host,
                       "" if api_key else " (no --api-key)")
    print(f"nanovlm: serving {names[0]!r} on {srv.url} (OpenAI API at {srv.url}/v1, chat page at {srv.url}/"
          f"{', API key required' if api_key else ''}); Ctrl-C to stop.", flush=True)
    if srv.run() != 0:
        return 1
    print("nanovlm: stopped.", flush=True)
    return 0
