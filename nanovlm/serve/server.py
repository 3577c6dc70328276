"""The HTTP server: OpenAI-compatible chat completions, model list, health, metrics, the chat page.

The stack vLLM and llama-cpp-python serve the OpenAI API with: an ASGI app (Starlette) run by
uvicorn, with the request body checked by a typed pydantic model (`protocol.py`). One event loop
answers every connection; image decoding and tokenization run in worker threads, decoding in the
engine thread (`engine.py`), whose events come back to the loop through `_LoopQueue`. Streamed
answers are server-sent events. Every failure is an OpenAI-shaped JSON error (malformed HTTP
included): 4xx for what the client can fix, 500 (logged, the server keeps running) for the rest.
A client that goes away, while waiting or mid-stream, cancels its request so the engine frees
the slot.

Around the routes, one ASGI middleware (`_Gate`): the API key (`--api-key`: every `/v1/*` request
needs `Authorization: Bearer KEY`, else 401), the cap on requests in progress
(`Limits.max_connections`: one over it gets a JSON 503 `too_many_connections`, answered after
its request was read, so the client always sees it), and the Prometheus counters (`metrics.py`).
On SIGTERM or Ctrl-C the server drains: it stops accepting, lets the requests in progress
(streams included) finish for up to `--drain-timeout` seconds, then exits 0.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /metrics`, `GET /` (the chat page).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanovlm.serve import protocol
from nanovlm.serve.engine import Engine, EngineBusy, GenerationRequest, PromptError, build_prompt
from nanovlm.serve.metrics import Metrics
from nanovlm.serve.protocol import APIError, Limits

logger = logging.getLogger("nanovlm.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
API_KEY_ENV = "NANOVLM_API_KEY"
_UNCAPPED = ("/health", "/metrics")  # monitoring must still see a saturated server


@dataclass
class App:
    """Everything the routes need; shared by all requests."""

    engine: Engine
    processor: Any
    model_name: str
    limits: Limits = field(default_factory=Limits)
    allow_remote_images: bool = False
    api_key: str | None = None
    aliases: tuple[str, ...] = ("default",)
    created: int = field(default_factory=protocol.now)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)

    @property
    def max_tokens_cap(self) -> int:
        cap = self.engine.context - 1
        return cap if self.limits.max_tokens_cap is None else min(cap, self.limits.max_tokens_cap)


# ------------------------------------------------------------------------------------ responses
def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False).encode("utf-8"), status_code=status,
                    media_type="application/json", headers=headers)


def _error(e: APIError, headers: dict[str, str] | None = None) -> Response:
    return _json(e.status, e.body(), headers)


def _internal_error() -> Response:
    return _json(500, protocol.error_body("internal server error; the details are in the server log.",
                                          type="server_error", code="internal_error"))


# ------------------------------------------------------------------------------------ simple routes
def _app(request: Request) -> App:
    return request.app.state.nanovlm


async def page(request: Request) -> Response:
    with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
        return Response(f.read(), media_type="text/html; charset=utf-8")


async def health(request: Request) -> Response:
    app = _app(request)
    ok = app.engine.alive
    body = {"status": "ok" if ok else "error", "model": app.model_name, "api_key_required": app.api_key is not None,
            **app.engine.stats()}
    return _json(200 if ok else 503, body)


async def metrics(request: Request) -> Response:
    app = _app(request)
    return Response(app.metrics.render(app.engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request) -> Response:
    app = _app(request)
    return _json(200, protocol.models_body(app.model_name, app.created, app.engine.context))


async def model(request: Request) -> Response:
    app = _app(request)
    name = request.path_params["name"]
    if name not in app.model_names:
        return _error(APIError(404, f"The model {name!r} does not exist on this server; it serves "
                                    f"{app.model_name!r}.", param="model", code="model_not_found"))
    return _json(200, protocol.model_card(app.model_name, app.created, app.engine.context))


# ------------------------------------------------------------------------------------ chat completions
class _LoopQueue:
    """Where the engine thread puts a request's events: an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is waiting for this event any more
            pass


async def chat(request: Request) -> Response:
    app = _app(request)
    try:
        body = await _read_body(request, app.limits)
        prepared = await run_in_threadpool(_prepare, app, body)  # images and tokenizing: off the event loop
    except APIError as e:
        return _error(e, {"Connection": "close"} if e.status in (411, 413) else None)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it
    except Exception:
        logger.exception("internal error on POST /v1/chat/completions")
        return _internal_error()
    parsed, ids, generation = prepared
    events = _LoopQueue(asyncio.get_running_loop())
    try:
        handle = app.engine.submit(generation, events=events)
    except EngineBusy as e:
        return _error(APIError(503, f"the server is busy ({e}); retry in a moment.", type="server_error",
                               code="server_busy"))
    if parsed.stream:
        return StreamingResponse(_stream(app, parsed, handle, events.queue, len(ids)),
                                 media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(handle.cancel))
    try:
        return await _complete(request, app, parsed, handle, events.queue, len(ids))
    finally:
        handle.cancel()  # a no-op when it finished; frees the slot when the client left or we failed


def _prepare(app: App, body: bytes):
    """Validate, decode images, build the prompt: (request, prompt ids, engine request). Raises APIError."""
    request = protocol.parse_chat_request(body, model_names=app.model_names, limits=app.limits,
                                          allow_remote_images=app.allow_remote_images)
    try:
        ids, tiles = build_prompt(app.engine.model, app.processor, request.messages)
    except PromptError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = _check_lengths(app, len(ids), request.max_tokens)
    generation = GenerationRequest(ids, tiles, max_tokens, temperature=request.temperature, top_p=request.top_p,
                                   top_k=request.top_k, seed=request.seed)
    return request, ids, generation


def _check_lengths(app: App, prompt_tokens: int, max_tokens: int | None) -> int:
    context, cap = app.engine.context, app.max_tokens_cap
    room = context - prompt_tokens
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
    limit = limits.max_body_bytes
    headers = request.headers
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if not chunked:
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


async def _complete(request: Request, app: App, parsed: protocol.ChatRequest, handle, queue: asyncio.Queue,
                    prompt_tokens: int) -> Response:
    watcher = asyncio.ensure_future(_watch_disconnect(request, handle, queue))
    text = protocol.TextAssembler(app.engine.model.tokenizer, parsed.stop)
    pieces, finish, n_tokens = [], "length", 0
    try:
        while True:
            event = await queue.get()
            kind = event[0]
            if kind == "token":
                n_tokens += 1
                pieces.append(text.push(event[1]))
                if text.stopped:
                    finish = "stop"
                    break
            elif kind == "done":
                finish, n_tokens = event[1], event[2]
                pieces.append(text.finish())
                break
            elif kind == "gone":
                return Response(status_code=499)  # never sent: the client has left
            else:
                logger.error("request failed in the engine: %s", event[1])
                return _internal_error()
    finally:
        watcher.cancel()
    body = protocol.completion_body(protocol.completion_id(), protocol.now(), parsed.model, "".join(pieces),
                                    finish, prompt_tokens, n_tokens)
    return _json(200, body)


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _stream(app: App, parsed: protocol.ChatRequest, handle, queue: asyncio.Queue, prompt_tokens: int):
    """The answer as server-sent events. Starlette cancels this generator when the client leaves."""
    cid, created, name = protocol.completion_id(), protocol.now(), parsed.model
    usage_on = parsed.include_usage
    try:
        yield _sse(protocol.chunk_body(cid, created, name, {"role": "assistant", "content": ""},
                                       include_usage=usage_on))
        text = protocol.TextAssembler(app.engine.model.tokenizer, parsed.stop)
        finish, n_tokens = "length", 0
        while True:
            event = await queue.get()
            kind = event[0]
            if kind == "token":
                n_tokens += 1
                delta = text.push(event[1])
            elif kind == "done":
                finish, n_tokens = event[1], event[2]
                delta = text.finish()
            else:
                logger.error("request failed in the engine: %s", event[1])
                yield _sse(protocol.error_body("internal server error while generating; the details are in the "
                                               "server log.", type="server_error", code="internal_error"))
                return
            if delta:
                yield _sse(protocol.chunk_body(cid, created, name, {"content": delta}, include_usage=usage_on))
            if text.stopped:
                finish = "stop"
            if kind == "done" or text.stopped:
                break
        yield _sse(protocol.chunk_body(cid, created, name, {}, finish, include_usage=usage_on))
        if usage_on:
            yield _sse(protocol.usage_chunk(cid, created, name, prompt_tokens, n_tokens))
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()


# ------------------------------------------------------------------------------------ errors, routing
_METHOD_ORDER = ("GET", "HEAD", "POST")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's 404 (no route) and 405 (a route, another method) in OpenAI's error shape."""
    path = request.url.path[:200]
    if exc.status_code == 405:
        allowed = sorted((exc.headers or {}).get("Allow", "").replace(" ", "").split(","),
                         key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else 9, m))
        return _json(405, protocol.error_body(f"method not allowed on {path}; use {' or '.join(allowed)}.",
                                              code="method_not_allowed"), headers={"Allow": ", ".join(allowed)})
    if exc.status_code == 404:
        return _json(404, protocol.error_body(
            f"no route {request.method} {path}; this server has POST /v1/chat/completions, GET /v1/models, "
            "GET /health, GET /metrics and GET /.", code="not_found"))
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _json(exc.status_code, protocol.error_body(f"{exc.detail}.", type=kind))


async def _crash(request: Request, exc: Exception) -> Response:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _internal_error()


def _route_label(path: str) -> str:
    """The route a path belongs to, for metrics labels (never the raw path: unbounded cardinality)."""
    if path in ("/", "/index.html", "/health", "/metrics", "/v1/models", "/v1/chat/completions"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class _Gate:
    """ASGI middleware: metrics around everything, then the API key on /v1/*, then the cap on
    requests in progress. Refusals are ordinary responses: uvicorn reads the rest of the request,
    so the client reads the answer instead of a reset."""

    def __init__(self, asgi, app: App):
        self.asgi = asgi
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return
        app, path, started = self.app, scope["path"], time.perf_counter()
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if app.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                await _unauthorized(scope)(scope, receive, send_and_note)
            elif path in _UNCAPPED:
                await self.asgi(scope, receive, send_and_note)
            elif app.metrics.in_progress >= app.limits.max_connections:
                await _too_many(app.limits.max_connections)(scope, receive, send_and_note)
            else:
                app.metrics.in_progress += 1
                try:
                    await self.asgi(scope, receive, send_and_note)
                finally:
                    app.metrics.in_progress -= 1
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"  # labels stay a small set
            app.metrics.observe(_route_label(path), method, status, time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        expected = b"Bearer " + self.app.api_key.encode("utf-8")
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, expected)


def _unauthorized(scope) -> Response:
    given = any(k == b"authorization" for k, _ in scope["headers"])
    message = ("the API key is wrong; send the server's key as 'Authorization: Bearer KEY'." if given else
               "this server needs an API key; send it as the header 'Authorization: Bearer KEY' (the openai "
               "client's api_key).")
    return _json(401, protocol.error_body(message, code="invalid_api_key"), headers={"WWW-Authenticate": "Bearer"})


def _too_many(limit: int) -> Response:
    return _json(503, protocol.error_body(
        f"the server already has {limit} open connections with a request in progress, its limit; retry in a "
        "moment.", type="server_error", code="too_many_connections"), headers={"Retry-After": "1"})


def build_app(app: App):
    """The ASGI application: Starlette's routes inside the `_Gate` middleware."""
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _crash})
    starlette.state.nanovlm = app
    return _Gate(starlette, app)


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
    """uvicorn's server, whose SIGTERM / Ctrl-C starts the drain and ends with exit code 0.

    uvicorn re-raises a caught signal once it has shut down, which would end the process as
    killed by SIGTERM; here the drain is the whole answer to the signal."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._drain) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _drain(self, sig, frame) -> None:
        if self.should_exit:  # a second signal: stop waiting
            self.force_exit = True
            return
        timeout = self.config.timeout_graceful_shutdown
        print(f"nanovlm: {signal.Signals(sig).name}: draining (no new connections; requests in progress get up "
              f"to {timeout} s to finish).", flush=True)
        self.should_exit = True


# ------------------------------------------------------------------------------------ running
class RunningServer:
    """A server running in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, server: _Uvicorn, sock: socket.socket, app: App):
        self.server = server
        self.app = app
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nanovlm-http",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "RunningServer":
        self._thread.start()
        while not self.server.started:  # startup takes milliseconds; a failed one ends the thread
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start; see the log.")
            time.sleep(0.005)
        return self

    def close(self) -> None:
        """Fail what is still running, stop accepting, end open connections, free the port."""
        self.app.engine.stop()
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _uvicorn(app: App, drain_timeout: float) -> _Uvicorn:
    config = uvicorn.Config(build_app(app), http=_Protocol, lifespan="off", log_config=None,
                            server_header=False, headers=[("server", "nanovlm")],
                            timeout_graceful_shutdown=drain_timeout, timeout_keep_alive=60)
    return _Uvicorn(config)


def model_name_for(model_dir: str) -> str:
    """The name clients send as `model`: the checkpoint folder (`run/final` for a run's final/)."""
    path = os.path.normpath(os.path.abspath(model_dir))
    base = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{base}" if base in ("final", "latest") and parent else base


def _make_app(model, *, max_batch_size: int, allow_remote_images: bool, limits: Limits | None, model_name: str,
              context: int | None, api_key: str | None) -> App:
    from nanovlm.data.processors import image_processor_for

    limits = limits or Limits()
    engine = Engine(model, max_batch_size=max_batch_size, max_queued=limits.max_queued, context=context).start()
    return App(engine=engine, processor=image_processor_for(model.cfg), model_name=model_name, limits=limits,
               allow_remote_images=allow_remote_images, api_key=api_key or None)


def start_server(model, host: str = "127.0.0.1", port: int = 0, *, max_batch_size: int = 16,
                 allow_remote_images: bool = False, limits: Limits | None = None, model_name: str = "nanovlm",
                 context: int | None = None, api_key: str | None = None,
                 drain_timeout: float = 5.0) -> RunningServer:
    """Serve an in-memory model on host:port (0: a free port) from a background thread."""
    app = _make_app(model, max_batch_size=max_batch_size, allow_remote_images=allow_remote_images, limits=limits,
                    model_name=model_name, context=context, api_key=api_key)
    try:
        sock = _listen(host, port)
    except OSError:
        app.engine.stop()
        raise
    return RunningServer(_uvicorn(app, drain_timeout), sock, app).start()


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          allow_remote_images: bool = False, *, dtype: str = "auto", limits: Limits | None = None,
          api_key: str | None = None, drain_timeout: float = 30.0, quantize: str = "none") -> int:
    """`nanovlm serve`: load a checkpoint and serve it until Ctrl-C or SIGTERM, then drain. Returns the exit code."""
    import torch

    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import default_device, pick_dtype
    from nanovlm.weights.nanovlm import checkpoint_directory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be 0 or more seconds, got {drain_timeout:g}.")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    directory = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    device = default_device()
    model = VisionLanguageModel.from_pretrained(directory, dtype=pick_dtype(dtype, device), device=device,
                                                require_tokenizer=True, quantize=quantize)
    torch.set_grad_enabled(False)
    name = model_name_for(model_dir)
    try:
        sock = _listen(host, port)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or stop the "
                      "program using it.") from None
    app = _make_app(model, max_batch_size=max_batch_size, allow_remote_images=allow_remote_images, limits=limits,
                    model_name=name, context=None, api_key=api_key)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can use the model%s.", host,
                       "" if api_key else " (no --api-key)")
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"nanovlm: serving {name!r} on {url} (OpenAI API at {url}/v1, chat page at {url}/"
          f"{', API key required' if api_key else ''}); Ctrl-C to stop.", flush=True)
    server = _uvicorn(app, drain_timeout)
    engine_died = threading.Event()

    def watch_engine() -> None:  # the engine thread never should end; if it does, stop serving
        while not server.should_exit:
            if not app.engine.alive:
                logger.error("the engine thread stopped; shutting down.")
                engine_died.set()
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch_engine, name="nanovlm-engine-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        app.engine.stop(timeout=5.0)
    if not server.started or engine_died.is_set():
        return 1
    print("nanovlm: stopped.", flush=True)
    return 0
