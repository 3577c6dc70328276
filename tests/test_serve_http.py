"""What users of vLLM / llama-cpp-python servers expect, checked with the official `openai` client:
an API key, Prometheus metrics, clear validation errors, and a graceful drain on SIGTERM.

Nothing here waits for time to pass: requests are held in flight by an engine that decodes only
when the test lets it (a gate in this process, a signal to the subprocess); the waits only guard
against a hang.
"""

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")

from nanovlm import VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.serve.protocol import Limits  # noqa: E402
from nanovlm.serve.server import make_server  # noqa: E402
from test_serve import varied_checkpoint  # noqa: E402

NAME = "tiny-http"
KEY = "sk-test-0123"
HANG_GUARD_S = 120.0  # a subprocess importing torch on a loaded 2-core machine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory, "serve-http")


@pytest.fixture(scope="module")
def keyed(checkpoint):
    srv = make_server(VisionLanguageModel.from_pretrained(checkpoint), port=0, max_batch_size=4, model_name=NAME,
                      api_key=KEY, limits=Limits(max_tokens_cap=32)).start()
    yield srv
    srv.close()


def _client(srv, key):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=HANG_GUARD_S)


def _request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.address, timeout=HANG_GUARD_S)
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read().decode("utf-8", "replace")
    conn.close()
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return response.status, response.headers, payload


HI = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------ API key
def test_api_key_is_required_on_v1(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        _client(keyed, "sk-wrong").chat.completions.create(model=NAME, messages=HI, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and "wrong" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "sk-wrong").models.list()

    status, headers, body = _request(keyed, "POST", "/v1/chat/completions", {"messages": HI})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert body == {"error": {"message": body["error"]["message"], "type": "invalid_request_error",
                              "code": "invalid_api_key", "param": None}}
    assert "Authorization: Bearer" in body["error"]["message"]
    assert _request(keyed, "GET", "/v1/nothing")[0] == 401  # every /v1/* path, known or not

    # The page, health and metrics stay open: the page asks for the key, monitoring needs no secret.
    status, _, page = _request(keyed, "GET", "/")
    assert status == 200 and 'id="api-key"' in page and "localStorage" in page
    status, _, health = _request(keyed, "GET", "/health")
    assert status == 200 and health["api_key_required"] is True
    assert _request(keyed, "GET", "/metrics")[0] == 200


def test_the_right_key_is_served(keyed):
    client = _client(keyed, KEY)
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.chat.completions.create(model=NAME, messages=HI, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=NAME, messages=HI, max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


# ------------------------------------------------------------------------------ validation errors
def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _broken_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "PNG")
    return _png(buf.getvalue()[:60])


MALFORMED = [
    # (id, request fields, param, the sentence the message must contain)
    ("empty-messages", dict(messages=[]), "messages", "non-empty list of {\"role\", \"content\"} objects, got an "
                                                      "empty array."),
    ("temperature", dict(messages=HI, temperature=5), "temperature", "'temperature' must be a number between 0 and 2, "
                                                                     "got 5 (number)."),
    ("max-tokens-bool", dict(messages=HI, max_tokens=True), "max_tokens", "'max_tokens' must be a positive integer, "
                                                                          "got true (boolean)."),
    ("top-p-range", dict(messages=HI, top_p=1.5), "top_p", "'top_p' must be a number greater than 0"),
    ("seed-float", dict(messages=HI, seed=1.5), "seed", "'seed' must be an integer"),
    ("stop-list-of-numbers", dict(messages=HI, stop=[1, 2]), "stop", "'stop' must be a string or a list of strings"),
    ("include-usage", dict(messages=HI, stream_options={"include_usage": "yes"}), "stream_options.include_usage",
     "'stream_options.include_usage' must be true or false, got \"yes\" (string)."),
    ("tools", dict(messages=HI, tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "function calling are not supported"),
    ("json-mode", dict(messages=HI, response_format={"type": "json_object"}), "response_format",
     "only response_format {\"type\": \"text\"} is supported"),
    ("corrupt-image", dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": _broken_png()}}]}]), "messages[0].content[0].image_url.url", "cannot be decoded ("),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_one_clear_sentence(keyed, case):
    _, fields, param, words = case
    raw = {"model": NAME, "max_tokens": 2, **fields}
    status, headers, body = _request(keyed, "POST", "/v1/chat/completions", raw,
                                     headers={"Authorization": f"Bearer {KEY}"})
    assert status == 400 and headers["Content-Type"] == "application/json", body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    message = error["message"]
    assert message.endswith(".") and "\n" not in message and ".)" not in message and ".." not in message
    for leak in ("validation error", "pydantic", "Input should", "type=", "errors.pydantic.dev"):
        assert leak not in message, message  # pydantic's words never reach the client

    with pytest.raises(openai.BadRequestError) as e:  # the same through the official client
        _client(keyed, KEY).chat.completions.create(**raw)
    assert e.value.status_code == 400 and e.value.param == param and words in e.value.message


def test_nan_is_not_a_number_here(keyed):
    # Python's json reads NaN; the openai client would refuse to send it, a raw client does not.
    status, _, body = _request(keyed, "POST", "/v1/chat/completions", {"messages": HI, "temperature": float("nan")},
                               headers={"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["param"] == "temperature"
    assert "'temperature' must be a number between 0 and 2, got NaN (number)." == body["error"]["message"]


# ------------------------------------------------------------------------------ metrics
def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_and_latency(keyed):
    client = _client(keyed, KEY)
    status, _, before = _request(keyed, "GET", "/metrics")
    before = _samples(before)
    for _ in range(2):
        client.chat.completions.create(model=NAME, messages=HI, max_tokens=3, temperature=0)
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "sk-wrong").chat.completions.create(model=NAME, messages=HI, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=HI, max_tokens=3, temperature=9)

    status, headers, text = _request(keyed, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    after = _samples(text)
    for family, kind in [("nanovlm_requests_total", "counter"), ("nanovlm_request_duration_seconds", "histogram"),
                         ("nanovlm_prompt_tokens_total", "counter"), ("nanovlm_completion_tokens_total", "counter"),
                         ("nanovlm_queue_depth", "gauge"), ("nanovlm_running_requests", "gauge"),
                         ("nanovlm_requests_in_progress", "gauge")]:
        assert f"# TYPE {family} {kind}\n" in text and f"# HELP {family} " in text

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    chat = 'route="/v1/chat/completions",method="POST"'
    assert delta(f'nanovlm_requests_total{{{chat},status="200"}}') == 2
    assert delta(f'nanovlm_requests_total{{{chat},status="401"}}') == 1
    assert delta(f'nanovlm_requests_total{{{chat},status="400"}}') == 1
    stats = keyed.app.engine.stats()
    assert after["nanovlm_completion_tokens_total"] == stats["generated_tokens"]
    assert after["nanovlm_prompt_tokens_total"] == stats["prompt_tokens"] and delta("nanovlm_prompt_tokens_total") > 0
    assert after["nanovlm_queue_depth"] == 0 and after["nanovlm_running_requests"] == 0
    route = 'route="/v1/chat/completions"'
    count = after[f"nanovlm_request_duration_seconds_count{{{route}}}"]
    assert count == after[f'nanovlm_request_duration_seconds_bucket{{{route},le="+Inf"}}'] and delta(
        f"nanovlm_request_duration_seconds_count{{{route}}}") == 4
    buckets = [v for k, v in after.items() if k.startswith(f"nanovlm_request_duration_seconds_bucket{{{route}")]
    assert buckets == sorted(buckets), "histogram buckets are cumulative"
    assert after[f"nanovlm_request_duration_seconds_sum{{{route}}}"] > 0


def test_metrics_labels_stay_a_fixed_set_whatever_clients_send(keyed):
    # A long-running server must not grow a series per path, model id or method a client invents.
    def series():
        return {k for k in _samples(_request(keyed, "GET", "/metrics")[2]) if k.startswith("nanovlm_requests_total")}

    for path in ("/no/such/path", "/v1/models/no-such-model", "/metrics"):  # each label set seen once
        _request(keyed, "GET", path)
    before = series()
    for i in range(20):
        _request(keyed, "GET", f"/scan/{i}")
        _request(keyed, "GET", f"/v1/models/invented-{i}")
        _request(keyed, "BREW" if i % 2 else "PURGE", f"/x{i}")
    grown = series() - before
    assert len(grown) <= 1 and all('route="other",method="other"' in k for k in grown), grown


# ------------------------------------------------------------------------------ drain on SIGTERM
# The subprocess's engine waits before each decode step until SIGUSR1: the test decides when the
# stream it started may go on, so SIGTERM lands mid-stream on any machine.
HELD_SERVER = textwrap.dedent("""
    import signal, sys, threading
    import nanovlm.serve.engine as engine

    go = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: go.set())
    step = engine.Engine._step

    def held_step(self):
        go.wait()
        step(self)

    engine.Engine._step = held_step
    from nanovlm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(condition, what: str, proc) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert proc.poll() is None, f"the server exited while waiting for {what}"
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.01)


def _up(port) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


def _refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S).close()
        return False
    except ConnectionRefusedError:
        return True


def _held_server(checkpoint, tmp_path, drain_timeout):
    script = tmp_path / "held_server.py"
    script.write_text(HELD_SERVER)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOVLM_API_KEY": KEY,
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--model", checkpoint, "--port", str(port),
                             "--drain-timeout", str(drain_timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    return proc, port


def _open_stream(port):
    """A streamed answer whose first chunk has arrived; the held engine then waits for SIGUSR1."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=HANG_GUARD_S)
    name = client.models.list().data[0].id
    chunks = iter(client.chat.completions.create(model=name, messages=HI, max_tokens=12, temperature=0, stream=True))
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant"
    return chunks


def test_sigterm_mid_stream_drains_then_exits_0(checkpoint, tmp_path):
    proc, port = _held_server(checkpoint, tmp_path, drain_timeout=int(HANG_GUARD_S))
    try:
        _until(lambda: _up(port), "the server to come up", proc)
        with pytest.raises(openai.AuthenticationError):  # NANOVLM_API_KEY is the key
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).models.list()
        chunks = _open_stream(port)

        proc.send_signal(signal.SIGTERM)
        _until(lambda: _refused(port), "the listener to close", proc)  # no new connections while draining
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0).models.list()
        assert proc.poll() is None, "the server exited before its stream finished"

        proc.send_signal(signal.SIGUSR1)  # let the engine decode: the stream runs to its end
        rest = list(chunks)
        finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
        assert finish and finish[0] in ("stop", "length")
        out, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "SIGTERM: draining" in out and "nanovlm: stopped." in out, out


def test_drain_timeout_ends_a_stream_that_does_not_finish(checkpoint, tmp_path):
    proc, port = _held_server(checkpoint, tmp_path, drain_timeout=1)
    try:
        _until(lambda: _up(port), "the server to come up", proc)
        chunks = _open_stream(port)  # never released: only the drain timeout can end it
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError):  # the stream is cut, not completed
            list(chunks)
        out, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "up to 1.0 s to finish" in out, out
