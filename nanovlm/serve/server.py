"""The HTTP server: OpenAI-compatible chat completions, model list, health, and the chat page.

Standard library only (`http.server.ThreadingHTTPServer`): a thread per connection parses,
validates and tokenizes (images included) while the single engine thread decodes (see
`engine.py`). HTTP/1.1 with keep-alive; streamed answers are server-sent events over chunked
transfer encoding. Every failure is an OpenAI-shaped JSON error: 4xx for what the client can
fix, 500 (logged, the server keeps running) for the rest. A client that goes away, while waiting
or mid-stream, cancels its request so the engine frees the slot.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /` (the chat page).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nanovlm.serve import protocol
from nanovlm.serve.engine import Engine, EngineBusy, GenerationRequest, PromptError, build_prompt
from nanovlm.serve.protocol import APIError, Limits

logger = logging.getLogger("nanovlm.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_POLL_S = 0.2  # how often a waiting handler checks that its client is still connected


@dataclass
class App:
    """Everything a request handler needs; shared by all handler threads."""

    engine: Engine
    processor: Any
    model_name: str
    limits: Limits = field(default_factory=Limits)
    allow_remote_images: bool = False
    aliases: tuple[str, ...] = ("default",)
    created: int = field(default_factory=protocol.now)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)

    @property
    def max_tokens_cap(self) -> int:
        cap = self.engine.context - 1
        return cap if self.limits.max_tokens_cap is None else min(cap, self.limits.max_tokens_cap)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app: App):
        self.app = app
        self._live: dict[threading.Thread, socket.socket] = {}  # connection threads, so close() can end them
        self._live_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address), daemon=True,
                                  name="nanovlm-http-conn")
        with self._live_lock:
            full = len(self._live) >= self.app.limits.max_connections
            if not full:
                self._live[thread] = request
        if full:
            self._refuse(request)
            return
        thread.start()

    def _refuse(self, request: socket.socket) -> None:
        """A connection over `Limits.max_connections`: a 503 written from the accepting thread
        (short, with a timeout, so a client that does not read cannot stall accepting), then closed."""
        limit = self.app.limits.max_connections
        body = json.dumps(protocol.error_body(
            f"the server already has {limit} open connections, its limit; close idle ones or retry in a moment.",
            type="server_error", code="too_many_connections")).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
            request.setblocking(False)
            while request.recv(65536):  # what the client already sent: closing on unread data resets
                pass
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def _serve_connection(self, request, client_address) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(threading.current_thread(), None)

    def close_connections(self, timeout: float = 5.0) -> None:
        """End every open connection (idle keep-alive ones included) and wait for their threads."""
        with self._live_lock:
            live = list(self._live.items())
        for _, sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread, _ in live:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request, client_address) -> None:  # a handler crashed outside our try blocks
        logger.exception("unhandled error while serving %s", client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nanovlm"
    timeout = 60  # seconds a connection may sit idle or stall while sending a request

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    # -------------------------------------------------------------------- routing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def __getattr__(self, name: str):
        # Every other method (PUT, DELETE, OPTIONS, FOO, ...) is routed too: a 405 or 404, not a 501.
        if name.startswith("do_") and name[3:]:
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def _route(self, path: str):
        """(allowed methods, handler) for a path, or None."""
        if path in ("/", "/index.html"):
            return ("GET", "HEAD"), self._page
        if path == "/health":
            return ("GET", "HEAD"), self._health
        if path == "/v1/models":
            return ("GET", "HEAD"), self._models
        if path.startswith("/v1/models/"):
            return ("GET", "HEAD"), self._model
        if path == "/v1/chat/completions":
            return ("POST",), self._chat
        return None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0][:200]
        try:
            route = self._route(path)
            if route is None:
                self._drain_body()
                raise APIError(404, f"no route {method} {path}; this server has POST /v1/chat/completions, "
                                    "GET /v1/models, GET /health and GET /.", code="not_found")
            allowed, handler = route
            if method not in allowed:
                self._drain_body()
                raise _MethodNotAllowed(path, allowed)
            handler(method, path)
        except _MethodNotAllowed as e:
            self._send_json(405, e.body(), headers={"Allow": ", ".join(e.allowed)})
        except APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception:
            logger.exception("internal error on %s %s", method, path)
            self._send_json(500, protocol.error_body("internal server error; the details are in the server log.",
                                                     type="server_error", code="internal_error"))

    # -------------------------------------------------------------------- simple routes
    def _page(self, method: str, path: str) -> None:
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
            page = f.read()
        self._send_bytes(200, page, "text/html; charset=utf-8", head=method == "HEAD")

    def _health(self, method: str, path: str) -> None:
        engine = self.app.engine
        ok = engine.alive
        body = {"status": "ok" if ok else "error", "model": self.app.model_name, **engine.stats()}
        self._send_json(200 if ok else 503, body, head=method == "HEAD")

    def _models(self, method: str, path: str) -> None:
        app = self.app
        self._send_json(200, protocol.models_body(app.model_name, app.created, app.engine.context),
                        head=method == "HEAD")

    def _model(self, method: str, path: str) -> None:
        app = self.app
        name = path[len("/v1/models/"):]
        if name not in app.model_names:
            raise APIError(404, f"The model {name!r} does not exist on this server; it serves {app.model_name!r}.",
                           param="model", code="model_not_found")
        self._send_json(200, protocol.model_card(app.model_name, app.created, app.engine.context),
                        head=method == "HEAD")

    # -------------------------------------------------------------------- chat completions
    def _chat(self, method: str, path: str) -> None:
        app = self.app
        body = self._read_body()
        request = protocol.parse_chat_request(body, model_names=app.model_names, limits=app.limits,
                                              allow_remote_images=app.allow_remote_images)
        model = app.engine.model
        try:
            ids, tiles = build_prompt(model, app.processor, request.messages)
        except PromptError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = self._check_lengths(len(ids), request.max_tokens)
        generation = GenerationRequest(ids, tiles, max_tokens, temperature=request.temperature,
                                       top_p=request.top_p, top_k=request.top_k, seed=request.seed)
        try:
            handle = app.engine.submit(generation)
        except EngineBusy as e:
            raise APIError(503, f"the server is busy ({e}); retry in a moment.", type="server_error",
                           code="server_busy") from None
        try:
            if request.stream:
                self._stream(request, handle, len(ids))
            else:
                self._complete(request, handle, len(ids))
        finally:
            handle.cancel()  # a no-op when it finished; frees the slot when the client left or we failed

    def _check_lengths(self, prompt_tokens: int, max_tokens: int | None) -> int:
        app = self.app
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

    def _events(self, handle):
        """The engine's events for this request; cancels it when the client disconnects."""
        last_check = time.monotonic()
        while True:
            event = handle.get(timeout=_POLL_S)
            if event is None or time.monotonic() - last_check >= _POLL_S:
                last_check = time.monotonic()
                if self._client_gone():
                    handle.cancel()
                    raise ConnectionResetError("the client disconnected")
            if event is None:
                if not self.app.engine.alive:
                    raise RuntimeError("the engine thread is not running")
                continue
            yield event
            if event[0] in ("done", "error"):
                return

    def _complete(self, request: protocol.ChatRequest, handle, prompt_tokens: int) -> None:
        text = protocol.TextAssembler(self.app.engine.model.tokenizer, request.stop)
        pieces, finish, n_tokens = [], "length", 0
        for event in self._events(handle):
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
            else:
                raise RuntimeError(event[1])
        body = protocol.completion_body(protocol.completion_id(), protocol.now(), request.model, "".join(pieces),
                                        finish, prompt_tokens, n_tokens)
        self._send_json(200, body)

    def _stream(self, request: protocol.ChatRequest, handle, prompt_tokens: int) -> None:
        cid, created, model = protocol.completion_id(), protocol.now(), request.model
        usage_on = request.include_usage
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._sse(protocol.chunk_body(cid, created, model, {"role": "assistant", "content": ""},
                                      include_usage=usage_on))
        text = protocol.TextAssembler(self.app.engine.model.tokenizer, request.stop)
        finish, n_tokens = "length", 0
        try:
            for event in self._events(handle):
                kind = event[0]
                if kind == "token":
                    n_tokens += 1
                    delta = text.push(event[1])
                elif kind == "done":
                    finish, n_tokens = event[1], event[2]
                    delta = text.finish()
                else:
                    logger.error("request failed in the engine: %s", event[1])
                    self._sse(protocol.error_body("internal server error while generating; the details are in "
                                                  "the server log.", type="server_error", code="internal_error"))
                    self._end_chunks()
                    return
                if delta:
                    self._sse(protocol.chunk_body(cid, created, model, {"content": delta}, include_usage=usage_on))
                if text.stopped:
                    finish = "stop"
                    break
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            handle.cancel()
            self.close_connection = True
            return
        self._sse(protocol.chunk_body(cid, created, model, {}, finish, include_usage=usage_on))
        if usage_on:
            self._sse(protocol.usage_chunk(cid, created, model, prompt_tokens, n_tokens))
        self._write_chunk(b"data: [DONE]\n\n")
        self._end_chunks()

    # -------------------------------------------------------------------- I/O helpers
    def _sse(self, payload: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _client_gone(self) -> bool:
        """True when the peer closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self) -> bytes:
        limit = self.app.limits.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self._content_length()
        if length is None:
            self.close_connection = True
            raise APIError(411, "the request has no Content-Length header; send the JSON body with one.",
                           code="length_required")
        if length > limit:
            self._drain(length)
            raise APIError(413, f"the request body is {length} bytes; this server accepts at most {limit} bytes. "
                                "Send smaller or fewer images.", code="request_too_large")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise APIError(400, f"the request body ended after {len(body)} of the {length} bytes announced in "
                                "Content-Length.")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                self.close_connection = True
                raise APIError(400, "the chunked request body is malformed.") from None
            if size == 0:
                while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            if len(body) + size > limit:
                self.close_connection = True
                raise APIError(413, f"the request body is larger than {limit} bytes, the most this server accepts. "
                                    "Send smaller or fewer images.", code="request_too_large")
            body += self.rfile.read(size)
            self.rfile.readline(3)

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise APIError(400, f"invalid Content-Length header {raw[:20]!r}.")
        return length

    def _drain(self, length: int) -> None:
        """Read and drop a body we refuse, so the client sees our answer rather than a reset;
        a body far over the limit is not worth reading: answer and close."""
        if length > 4 * self.app.limits.max_body_bytes + (1 << 20):
            self.close_connection = True
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _drain_body(self) -> None:
        try:
            length = self._content_length() or 0
        except APIError:
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
        elif length:
            self._drain(length)

    def handle_expect_100(self) -> bool:
        # Refuse an oversized body before the client sends it.
        length = self.headers.get("Content-Length")
        limit = self.app.limits.max_body_bytes
        if length and length.isdigit() and int(length) > limit:
            self.close_connection = True
            self._send_json(413, protocol.error_body(
                f"the request body is {int(length)} bytes; this server accepts at most {limit} bytes. "
                "Send smaller or fewer images.", code="request_too_large"))
            return False
        return super().handle_expect_100()

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self._send_bytes(status, data, "application/json", headers=headers, head=head)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None,
                    head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (malformed request line, oversized headers, ...) as JSON."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers, not HTTP/0.9's bare body
        try:
            status = HTTPStatus(code)
            text = message or status.phrase
        except ValueError:
            text = message or "error"
        type_ = "invalid_request_error" if 400 <= code < 500 else "server_error"
        try:
            self._send_json(code, protocol.error_body(f"{text}.", type=type_, code=None),
                            head=getattr(self, "command", None) == "HEAD")
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


class _MethodNotAllowed(Exception):
    def __init__(self, path: str, allowed: tuple[str, ...]):
        super().__init__(path)
        self.allowed = allowed
        self.path = path

    def body(self) -> dict:
        return protocol.error_body(f"method not allowed on {self.path}; use {' or '.join(self.allowed)}.",
                                   code="method_not_allowed")


# ------------------------------------------------------------------------------------ running
class RunningServer:
    """A server running in background threads (tests, benchmarks, notebooks)."""

    def __init__(self, httpd: _Server, app: App):
        self.httpd = httpd
        self.app = app
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="nanovlm-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RunningServer":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, fail what is still running, end open connections, free the port."""
        self.httpd.shutdown()
        self.app.engine.stop()
        self.httpd.close_connections()
        self.httpd.server_close()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_name_for(model_dir: str) -> str:
    """The name clients send as `model`: the checkpoint folder (`run/final` for a run's final/)."""
    path = os.path.normpath(os.path.abspath(model_dir))
    base = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{base}" if base in ("final", "latest") and parent else base


def start_server(model, host: str = "127.0.0.1", port: int = 0, *, max_batch_size: int = 16,
                 allow_remote_images: bool = False, limits: Limits | None = None, model_name: str = "nanovlm",
                 context: int | None = None) -> RunningServer:
    """Serve an in-memory model on host:port (0: a free port) from background threads."""
    from nanovlm.data.processors import image_processor_for

    limits = limits or Limits()
    engine = Engine(model, max_batch_size=max_batch_size, max_queued=limits.max_queued, context=context).start()
    app = App(engine=engine, processor=image_processor_for(model.cfg), model_name=model_name, limits=limits,
              allow_remote_images=allow_remote_images)
    try:
        httpd = _Server((host, port), app)
    except OSError:
        engine.stop()
        raise
    return RunningServer(httpd, app).start()


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          allow_remote_images: bool = False, *, dtype: str = "auto", limits: Limits | None = None) -> int:
    """`nanovlm serve`: load a checkpoint and serve it until Ctrl-C or SIGTERM. Returns the exit code."""
    import torch

    from nanovlm.models.vision_language_model import VisionLanguageModel
    from nanovlm.runtime import default_device, pick_dtype
    from nanovlm.weights.nanovlm import checkpoint_directory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = checkpoint_directory(model_dir)  # the message every --model gives for a bad value
    device = default_device()
    model = VisionLanguageModel.from_pretrained(directory, dtype=pick_dtype(dtype, device), device=device,
                                                require_tokenizer=True)
    torch.set_grad_enabled(False)
    name = model_name_for(model_dir)
    try:
        server = start_server(model, host, port, max_batch_size=max_batch_size,
                              allow_remote_images=allow_remote_images, limits=limits, model_name=name)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or stop the "
                      "program using it.") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can use the model.", host)
    print(f"nanovlm: serving {name!r} on {server.url} (OpenAI API at {server.url}/v1, chat page at {server.url}/); "
          "Ctrl-C to stop.", flush=True)

    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    try:
        while not stop.wait(0.5):
            if not server.app.engine.alive:
                logger.error("the engine thread stopped; shutting down.")
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        server.close()
    return 0
