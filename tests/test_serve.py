"""The real HTTP server on a free loopback port, talked to with the official `openai` client
(and with raw HTTP for what a client library would never send)."""

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")

from nanovlm import VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.serve.protocol import Limits  # noqa: E402
from nanovlm.serve.server import make_server, model_name_for  # noqa: E402

LIMITS = Limits(max_body_bytes=256 * 1024, max_images=2, max_image_pixels=128 * 128, max_tokens_cap=64)
NAME = "tiny-test"


def varied_checkpoint(tmp_path_factory, name: str) -> str:
    """A tiny random checkpoint with larger weights than the init: varied, prompt-dependent
    greedy tokens (the serve tests share it)."""
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(name) / "tiny"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory, "serve")


@pytest.fixture(scope="module")
def server(checkpoint):
    model = VisionLanguageModel.from_pretrained(checkpoint)
    srv = make_server(model, port=0, max_batch_size=8, limits=LIMITS, model_name=NAME).start()
    yield srv
    srv.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_url(color=(200, 30, 30), size=(40, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    mime = "png" if fmt == "PNG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text, url=None):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or png_url()}},
                                        {"type": "text", "text": text}]}


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, headers (case-insensitive names), parsed JSON or text) over a fresh connection."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    try:
        payload = json.loads(payload)
    except ValueError:
        payload = payload.decode("utf-8", "replace")
    return response.status, response.headers, payload


# ------------------------------------------------------------------------------ happy paths
def test_models_health_and_page(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and "/v1/chat/completions" in page
    status, _, card = request(server, "GET", f"/v1/models/{NAME}")
    assert status == 200 and card["id"] == NAME


def test_chat_with_an_image_matches_answer(server, client):
    url = png_url()
    r = client.chat.completions.create(model=NAME, messages=[image_message("What color is the shape?", url)],
                                       max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    assert isinstance(r.created, int) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    model = server.app.engine.model
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|global_image|>" + "<|image|>" * model.cfg.mp_image_token_length
          + "What color is the shape?"}], add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(ids)
    # The server decodes exactly what the library's one-call path answers.
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    expected = model.answer([image], ["What color is the shape?"], max_new_tokens=12)[0]
    assert choice.message.content.strip() == expected
    # The text part first (OpenAI's own example's order): the same prompt, the same answer.
    text_first = {"role": "user", "content": image_message("What color is the shape?", url)["content"][::-1]}
    r2 = client.chat.completions.create(model=NAME, messages=[text_first], max_tokens=12, temperature=0)
    assert (r2.choices[0].message.content, r2.usage.prompt_tokens) == (choice.message.content, r.usage.prompt_tokens)


def test_streaming_matches_non_streaming(server, client):
    messages = [image_message("How many shapes?")]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "the answer should arrive in several chunks"
    assert "".join(content) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    # On the wire: server-sent events ending with [DONE].
    status, headers, text = request(server, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": messages, "max_tokens": 3, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_multi_turn_and_max_completion_tokens(server, client):
    messages = [{"role": "system", "content": "You answer questions about shapes."},
                image_message("What shape is it?"),
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": [{"type": "text", "text": "And its color?"}]}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5
    tok = server.app.engine.model.tokenizer
    text = tok.apply_chat_template([
        {"role": "system", "content": "You answer questions about shapes."},
        {"role": "user", "content": "<|global_image|>" + "<|image|>" * 4 + "What shape is it?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its color?"}], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(text))


def test_concurrent_requests_batch_and_match_sequential(server, client, monkeypatch):
    questions = [f"Question {i}: what is shown?" for i in range(10)]
    colors = [(30 * i, 255 - 20 * i, 100) for i in range(10)]

    def ask(i, stream=False):
        messages = [image_message(questions[i], png_url(colors[i]))] if i % 2 else \
            [{"role": "user", "content": questions[i]}]
        if not stream:
            r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
            return r.choices[0].message.content
        parts = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                               stream=True)
        return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    sequential = [ask(i) for i in range(10)]
    assert len(set(sequential)) > 5, "answers should differ between prompts"
    engine = server.app.engine
    before = engine.stats()
    gate = Gate(monkeypatch, engine)  # decoding waits until all ten are in: batching does not hang on timing
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(ask, i, i % 3 == 0) for i in range(10)]
        _until(lambda: engine.stats()["requests"] - before["requests"] + engine.stats()["waiting"] == 10,
               "all ten requests to reach the engine")
        gate.release()
        concurrent = [f.result() for f in futures]
    after = engine.stats()
    assert concurrent == sequential
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows / steps > 2, f"requests were not batched (mean batch {rows / steps:.2f})"


def test_seed_and_sampling(server, client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me something."}], max_tokens=12,
              temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b and a != c


def test_stop_strings(server, client):
    messages = [{"role": "user", "content": "Say something long."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    expected = text[: text.index(stop)]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                       stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                            stop=stop, stream=True)
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------ bad requests
def _chat(**fields):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def _truncated_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[:60]).decode()


BAD_REQUESTS = [
    # (id, body or raw bytes, status, param, words the message must contain)
    ("malformed-json", b'{"model": "x", "messages": [', 400, None, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, None, "must be a JSON object"),
    ("not-utf8", b"\xff\xfe{}", 400, None, "not UTF-8"),
    ("deep-json", b"[" * 100_000, 400, None, "nested too deeply"),
    ("huge-integer", b'{"max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
    ("missing-messages", _chat(messages=...), 400, "messages", "missing required field 'messages'"),
    ("empty-messages", _chat(messages=[]), 400, "messages", "non-empty list"),
    ("message-not-object", _chat(messages=["hi"]), 400, "messages[0]", "must be an object"),
    ("bad-role", _chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", "must be one of"),
    ("tool-role", _chat(messages=[{"role": "tool", "content": "hi"}]), 400, "messages[0].role", "tool messages"),
    ("missing-content", _chat(messages=[{"role": "user"}]), 400, "messages[0].content", "missing"),
    ("content-number", _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "must be a string or a list"),
    ("part-type", _chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400,
     "messages[0].content[0].type", "'text' or 'image_url'"),
    ("text-not-string", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), 400,
     "messages[0].content[0].text", "must be a string"),
    ("image-url-shape", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}]),
     400, "messages[0].content[0].image_url", "data:image/png;base64"),
    ("image-in-assistant", _chat(messages=[{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     400, "messages[0].content[0]", "only appear in user messages"),
    ("max-tokens-string", _chat(max_tokens="ten"), 400, "max_tokens", "must be a positive integer"),
    ("max-tokens-zero", _chat(max_tokens=0), 400, "max_tokens", "must be a positive integer"),
    ("max-tokens-float", _chat(max_tokens=4.5), 400, "max_tokens", "must be a positive integer"),
    ("max-tokens-cap", _chat(max_tokens=65), 400, "max_tokens", "at most 64"),
    ("temperature-range", _chat(temperature=3), 400, "temperature", "between 0 and 2"),
    ("temperature-type", _chat(temperature="hot"), 400, "temperature", "must be a number"),
    ("top-p-zero", _chat(top_p=0), 400, "top_p", "greater than 0"),
    ("seed-type", _chat(seed="abc"), 400, "seed", "must be an integer"),
    ("stream-type", _chat(stream="yes"), 400, "stream", "true or false"),
    ("stop-type", _chat(stop=5), 400, "stop", "string or a list of strings"),
    ("stop-count", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("n", _chat(n=2), 400, "n", "must be 1"),
    ("logprobs", _chat(logprobs=True), 400, "logprobs", "not supported"),
    ("model-type", _chat(model=5), 400, "model", "must be a string"),
    ("too-many-images", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}]),
     400, "messages", "at most 2 per request"),
    ("bad-base64", _chat(messages=[image_message("q", "data:image/png;base64,!!not base64!!")]),
     400, "messages[0].content[0].image_url.url", "not valid base64"),
    ("not-an-image", _chat(messages=[image_message("q", "data:image/png;base64,"
                                                   + base64.b64encode(b"hello world").decode())]),
     400, "messages[0].content[0].image_url.url", "cannot be decoded"),
    ("truncated-image", _chat(messages=[image_message("q", _truncated_png())]),
     400, "messages[0].content[0].image_url.url", "cannot be decoded"),
    ("not-a-data-url", _chat(messages=[image_message("q", "data:image/png,rawbytes")]),
     400, "messages[0].content[0].image_url.url", "data:image/png;base64"),
    ("file-url", _chat(messages=[image_message("q", "file:///etc/passwd")]),
     400, "messages[0].content[0].image_url.url", "unsupported image URL"),
    ("remote-url", _chat(messages=[image_message("q", "https://example.com/cat.png")]),
     400, "messages[0].content[0].image_url.url", "--allow-remote-images"),
    ("too-many-pixels", _chat(messages=[image_message("q", png_url(size=(200, 100)))]),
     400, "messages[0].content[0].image_url.url", "Downscale"),
    ("image-token-in-text", _chat(messages=[{"role": "user", "content": "look <|image|> here"}]),
     400, "messages", "image placeholder"),
    ("prompt-too-long", _chat(messages=[{"role": "user", "content": "word " * 400}]),
     400, "messages", "context is 256 tokens"),
    ("prompt-plus-max-tokens", _chat(messages=[{"role": "user", "content": "word " * 220}], max_tokens=60),
     400, "max_tokens", "set max_tokens to at most"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_clear_4xx_errors(server, case):
    _, body, status, param, words = case
    raw = body if isinstance(body, bytes) else None
    got, headers, payload = request(server, "POST", "/v1/chat/completions", body if raw is None else None, raw=raw)
    assert got == status, payload
    assert headers["Content-Type"] == "application/json"
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_served_model_names_are_accepted_and_the_first_is_reported(checkpoint):
    model = VisionLanguageModel.from_pretrained(checkpoint)
    with make_server(model, port=0, model_name=("my-vlm", "alias"), limits=LIMITS).start() as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["my-vlm"]
        for name in ("my-vlm", "alias", "default"):
            r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert r.model == "my-vlm"
        assert request(srv, "GET", "/v1/models/alias")[2]["id"] == "my-vlm"
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert "The model 'tiny' does not exist on this server; it serves 'my-vlm'" in e.value.message
    assert model_name_for("runs/demo/final") == "demo/final" and model_name_for("ckpt/tiny") == "tiny"


def test_unknown_model_is_404_model_not_found(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and NAME in e.value.message
    ok = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.model == NAME
    status, _, body = request(server, "GET", "/v1/models/gpt-4o")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_body_too_large_is_413(server, client):
    big = "x" * (300 * 1024)
    status, _, body = request(server, "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": big}]))
    assert status == 413 and "at most 262144 bytes" in body["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": big}], max_tokens=2)
    assert e.value.status_code == 413


def test_routes_and_methods(server):
    status, _, body = request(server, "GET", "/v1/nothing")
    assert status == 404 and "no route GET /v1/nothing" in body["error"]["message"]
    status, headers, body = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST" and "use POST" in body["error"]["message"]
    status, headers, body = request(server, "DELETE", "/v1/models")
    assert status == 405 and "GET" in headers["Allow"]
    status, _, body = request(server, "POST", "/health", {"x": 1})
    assert status == 405
    status, headers, body = request(server, "TRACE", "/v1/models")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, _, body = request(server, "BREW", "/coffee")
    assert status == 404


def _raw_exchange(server, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (each request here ends the connection: an
    error that closes it or `Connection: close`; no half-close, which a server reads as a client
    that has gone)."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_raw_http_errors_are_json(server):
    reply = _raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0] and b'"error"' in reply
    reply = _raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 411 " in reply.split(b"\r\n")[0] and b"Content-Length" in reply
    body = json.dumps(_chat()).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = _raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                  b"Connection: close\r\n\r\n" + chunked)
    assert b" 200 " in reply.split(b"\r\n")[0] and b"chat.completion" in reply


# ------------------------------------------------------------------------------ robustness
# No sleeps and no deadlines that a slow machine could miss: the engine's decode step is held at a
# gate the test opens, so requests stay in flight exactly as long as the test needs; the waits
# below only guard against a hang (60 s) and return as soon as the state is reached.
HANG_GUARD_S = 60.0


class Gate:
    """Holds the engine thread before each decode step until the test lets steps through."""

    def __init__(self, monkeypatch, engine):
        self.permits = threading.Semaphore(0)
        original = engine._step

        def held_step():
            self.permits.acquire(timeout=HANG_GUARD_S)
            original()

        monkeypatch.setattr(engine, "_step", held_step)

    def allow(self, steps: int) -> None:
        self.permits.release(steps)

    def release(self) -> None:
        self.permits.release(1_000_000)  # every step from now on


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.005)


def _wait_running(engine, n):
    _until(lambda: engine.stats()["running"] == n, f"{n} running request(s)")
    return True


def _running_handle(engine):
    _wait_running(engine, 1)
    return engine._rows[0]


def test_disconnect_mid_stream_frees_the_slot(server, client, monkeypatch):
    engine = server.app.engine
    gate = Gate(monkeypatch, engine)
    host, port = server.address
    body = json.dumps(_chat(max_tokens=60, stream=True)).encode()
    before = engine.stats()["generated_tokens"]
    sock = socket.create_connection((host, port), timeout=HANG_GUARD_S)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 3:
        gate.allow(1)  # one token more until three events came (some tokens decode to no text yet)
        received += sock.recv(4096)
    handle = _running_handle(engine)
    sock.close()
    _until(lambda: handle.cancelled, "the server to cancel the request of a gone client")
    gate.release()
    assert _wait_running(engine, 0), "the engine kept decoding for a gone client"
    assert engine.stats()["generated_tokens"] - before < 60

    # A non-streaming client that leaves is noticed too.
    monkeypatch.undo()
    gate = Gate(monkeypatch, engine)
    sock = socket.create_connection((host, port), timeout=HANG_GUARD_S)
    body = json.dumps(_chat(max_tokens=60)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    handle = _running_handle(engine)
    sock.close()
    _until(lambda: handle.cancelled, "the server to cancel the request of a gone client")
    gate.release()
    assert _wait_running(engine, 0)

    monkeypatch.undo()
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "still there?"}], max_tokens=4)
    assert r.choices[0].message.content is not None


def test_internal_errors_are_500_and_the_server_survives(server, client, monkeypatch):
    import nanovlm.serve.server as server_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server_module, "chat_prompt", broken)
    status, _, body = request(server, "POST", "/v1/chat/completions", _chat())
    assert status == 500 and body["error"]["type"] == "server_error" and "a bug" not in body["error"]["message"]
    monkeypatch.undo()

    model = server.app.engine.model
    monkeypatch.setattr(model, "embed", broken)  # fails inside the engine thread
    status, _, body = request(server, "POST", "/v1/chat/completions", _chat())
    assert status == 500 and body["error"]["type"] == "server_error"
    status, _, text = request(server, "POST", "/v1/chat/completions", _chat(stream=True))
    assert status == 200 and '"server_error"' in text
    monkeypatch.undo()
    assert server.app.engine.alive
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "ok?"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1
    _until(lambda: server.app.engine.idle, "the engine to be idle")


def test_busy_server_answers_503(server, monkeypatch):
    engine = server.app.engine
    gate = Gate(monkeypatch, engine)
    monkeypatch.setattr(engine, "max_queued", 1)
    monkeypatch.setattr(engine, "max_batch_size", 1)
    results = []

    def ask(max_tokens):
        results.append(request(server, "POST", "/v1/chat/completions", _chat(max_tokens=max_tokens))[0])

    running = threading.Thread(target=ask, args=(20,))
    running.start()
    assert _wait_running(engine, 1)  # held at the gate: it cannot finish before the others are sent
    waiting = threading.Thread(target=ask, args=(2,))
    waiting.start()
    _until(lambda: engine.stats()["waiting"] == 1, "the second request to queue")
    status, _, body = request(server, "POST", "/v1/chat/completions", _chat())
    gate.release()
    running.join()
    waiting.join()
    assert status == 503 and body["error"]["code"] == "server_busy" and "retry" in body["error"]["message"]
    assert results == [200, 200]


def test_connections_over_the_limit_get_503(checkpoint, monkeypatch):
    """The cap counts requests in progress; the one over it is answered after its request was
    read (item 1 of issue 18: the old server could reset it), by raw HTTP and the openai client."""
    model = VisionLanguageModel.from_pretrained(checkpoint)
    srv = make_server(model, port=0, max_batch_size=2, limits=Limits(max_connections=2), model_name=NAME).start()
    gate = Gate(monkeypatch, srv.app.engine)
    results = []
    try:
        held = [threading.Thread(target=lambda: results.append(
            request(srv, "POST", "/v1/chat/completions", _chat(max_tokens=3))[0])) for _ in range(2)]
        for t in held:
            t.start()
        _until(lambda: srv.app.metrics.in_progress == 2, "two requests in progress")
        reply = _raw_exchange(srv, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status_line, _, rest = reply.partition(b"\r\n")
        assert b" 503 " in status_line
        error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_connections" and "2 open connections" in error["message"]
        assert request(srv, "GET", "/health")[0] == 200  # monitoring is not capped
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)
        for _ in range(3):  # the client reads the answer every time, never a reset
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert e.value.status_code == 503 and e.value.code == "too_many_connections"
        gate.release()
        for t in held:
            t.join()
        assert results == [200, 200]
        assert request(srv, "GET", "/v1/models")[0] == 200  # a freed slot serves again
        metrics = request(srv, "GET", "/metrics")[2]
        assert 'nanovlm_requests_total{route="/v1/chat/completions",method="POST",status="503"} 3' in metrics
    finally:
        gate.release()
        srv.close()


# ------------------------------------------------------------------------------ the CLI verb
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nanovlm_serve_command(checkpoint):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanovlm", "serve", "--model", checkpoint, "--port", str(port),
                             "--served-model-name", "my-vlm", "other"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["my-vlm"]
        r = c.chat.completions.create(model="other", messages=[image_message("hi")], max_tokens=3)
        assert r.usage.completion_tokens >= 1 and r.model == "my-vlm"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out
