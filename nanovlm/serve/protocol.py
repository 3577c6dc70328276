"""The OpenAI chat-completions protocol: request validation, response and error shapes.

A client's mistake is an `APIError` with one sentence saying what to fix. Scalar fields are
checked by one table (`FIELDS`), messages part by part; unknown fields are ignored, fields this
server cannot honour (`n > 1`, `logprobs`, `tools`, JSON formats) refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from nanovlm.data.images import ImageError, load_image

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults suit a small model on a CPU."""

    max_body_bytes: int = 20 * 1024 * 1024  # OpenAI's own cap on an image is 20 MB
    max_images: int = 8  # per request, all messages together
    max_image_pixels: int = 4096 * 4096  # per image, checked on the header before decoding
    max_tokens_cap: int | None = None  # None: the model's context is the only cap
    max_stop: int = 4  # stop strings, as in OpenAI's API
    max_queued: int = 256  # requests waiting for a batch slot before new ones get a 503
    max_connections: int = 512  # requests in progress (streams included) before new ones get a 503
    remote_image_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # {"role": system | user | assistant, "content": [text or PIL image, ...]}
    max_tokens: int | None  # None: as many as the context allows (capped by Limits)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (whether a value is valid, what it must be); a wrong value is named in the message
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, 'a non-empty list of {"role", "content"} objects'),
    "max_tokens": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "max_completion_tokens": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number between 0 and 2"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number greater than 0 and at most 1 (1 keeps every token)"),
    "top_k": (lambda v: _int(v) and v >= 0, "an integer at least 0 (0 keeps every token)"),  # vLLM's, llama.cpp's
    "seed": (lambda v: _int(v) and -(2 ** 63) <= v < 2 ** 64, f"an integer between {-(2 ** 63)} and {2 ** 64 - 1}"),
    "stream": (lambda v: isinstance(v, bool), "true or false"),
    "stream_options": (lambda v: isinstance(v, dict), 'an object such as {"include_usage": true}'),
    "stream_options.include_usage": (lambda v: isinstance(v, bool), "true or false"),
    "stop": (lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(s, str) for s in v),
             "a string or a list of strings"),
    "n": (lambda v: _int(v) and v == 1, "1 (this server returns one choice per request; send several requests "
                                        "for several answers)"),
}
# what this server does not do: field -> (the one value it accepts, the sentence, the param named)
UNSUPPORTED: dict[str, tuple[Any, str, str]] = {
    "logprobs": (False, "'logprobs' is not supported by this server; remove it", "logprobs"),
    "top_logprobs": (0, "'logprobs' is not supported by this server; remove 'top_logprobs'", "logprobs"),
    "tools": ([], "tools / function calling are not supported by this model; remove 'tools'", "tools"),
    "functions": ([], "tools / function calling are not supported by this model; remove 'functions'", "tools"),
    "response_format": ({"type": "text"}, 'only response_format {"type": "text"} is supported; remove '
                                          "'response_format'", "response_format"),
}


def _field(data: dict[str, Any], name: str) -> Any:
    """`data[name]` checked against `FIELDS` (None when absent or null)."""
    value = data.get(name.rsplit(".", 1)[-1])
    valid, what = FIELDS[name]
    if value is not None and not valid(value):
        raise APIError(400, f"'{name}' must be {what}, got {_describe(value)}.", param=name)
    return value


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send JSON encoded as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            "send a JSON object such as {\"model\": ..., \"messages\": [...]}.") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply; send a flat chat-completions "
                            "object.") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise APIError(400, f"the request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {_json_type(data)}.")
    return data


def parse_chat_request(body: bytes, *, model_names: tuple[str, ...], limits: Limits = Limits(),
                       allow_remote_images: bool = False) -> ChatRequest:
    """Validate a chat-completions body and decode its images. Raises APIError."""
    data = parse_json_body(body)
    if data.get("messages") is None:
        raise APIError(400, "missing required field 'messages': a list of messages such as "
                            "[{\"role\": \"user\", \"content\": \"Hello\"}].", param="messages",
                       code="missing_required_parameter")
    for name, (accepted, sentence, param) in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and (value != accepted or type(value) is not type(accepted)):
            raise APIError(400, sentence + ".", param=param)
    values = {name: _field(data, name) for name in FIELDS if "." not in name}
    options = values["stream_options"] or {}
    include_usage = _field(options, "stream_options.include_usage")
    model = check_model(values["model"], model_names)
    raw = values["messages"]
    # Count images before decoding any, so an oversized request costs nothing.
    n_images = sum(1 for m in raw if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") in ("image_url", "input_image"))
    if n_images > limits.max_images:
        raise APIError(400, f"the request has {n_images} images; this server accepts at most "
                            f"{limits.max_images} per request. Send fewer images.", param="messages",
                       code="too_many_images")
    messages = [_parse_message(m, i, limits, allow_remote_images) for i, m in enumerate(raw)]
    stop = values["stop"] or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' has {len(stop)} strings; at most {limits.max_stop} are allowed.", param="stop")
    if "" in stop:
        raise APIError(400, "'stop' strings must not be empty.", param="stop")
    max_tokens = values["max_completion_tokens"] or values["max_tokens"]  # the newer name wins, as in OpenAI's API
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens,
                       temperature=1.0 if values["temperature"] is None else values["temperature"],
                       top_p=values["top_p"] or 1.0, top_k=values["top_k"] or 0, seed=values["seed"], stop=stop,
                       stream=bool(values["stream"]), include_usage=bool(include_usage))


def check_model(model: str | None, model_names: tuple[str, ...]) -> str:
    """The reported name of the model a request names (None: the served one); 404 for another."""
    if model is not None and model not in model_names:
        raise APIError(404, f"The model {model!r} does not exist on this server; it serves {model_names[0]!r} "
                            "(see GET /v1/models).", param="model", code="model_not_found")
    return model_names[0]


def _parse_message(m: Any, i: int, limits: Limits, allow_remote: bool) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content', got {_describe(m)}.", param=where)
    role = m.get("role")
    if role not in ROLES:
        hint = " (tool messages are not supported)" if role in ("tool", "function") else ""
        raise APIError(400, f"{where}.role must be one of 'system', 'user', 'assistant', got {_describe(role)}{hint}.",
                       param=f"{where}.role")
    role = "system" if role == "developer" else role
    content = m.get("content")
    if content is None:
        raise APIError(400, f"{where}.content is missing; give a string or a list of content parts.",
                       param=f"{where}.content")
    if isinstance(content, str):
        return {"role": role, "content": [content]}
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts, got {_describe(content)}.",
                       param=f"{where}.content")
    return {"role": role, "content": [_parse_part(p, f"{where}.content[{j}]", role, limits, allow_remote)
                                      for j, p in enumerate(content)]}


def _parse_part(part: Any, where: str, role: str, limits: Limits, allow_remote: bool) -> str | Image.Image:
    if not isinstance(part, dict):
        raise APIError(400, f"{where} must be an object such as {{\"type\": \"text\", \"text\": ...}}, "
                            f"got {_describe(part)}.", param=where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.text must be a string, got {_describe(part.get('text'))}.",
                           param=f"{where}.text")
        return part["text"]
    if kind not in ("image_url", "input_image"):
        raise APIError(400, f"{where}.type must be 'text' or 'image_url', got {_describe(kind)}.",
                       param=f"{where}.type")
    if role != "user":
        raise APIError(400, f"{where}: images may only appear in user messages, not in a {role} message.", param=where)
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise APIError(400, f"{where}.image_url must be {{\"url\": \"data:image/png;base64,...\"}}, got "
                            f"{_describe(ref)}.", param=f"{where}.image_url")
    return load_image_url(url, where, limits, allow_remote)


def load_image_url(url: str, where: str, limits: Limits, allow_remote: bool) -> Image.Image:
    """A `data:` URL (or, when allowed, an http(s) URL) -> a decoded RGB PIL image."""
    param = f"{where}.image_url.url"
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise APIError(400, f"{where}: an image data URL must look like data:image/png;base64,<base64 bytes>.",
                           param=param, code="invalid_image_url")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the image data is not valid base64; encode the file bytes with "
                                "standard base64.", param=param, code="invalid_image") from None
    elif lowered.startswith(("http://", "https://")):
        if not allow_remote:
            raise APIError(400, f"{where}: remote image URLs are disabled on this server; send the image inline as "
                                "a data URL (data:image/png;base64,...) or start the server with "
                                "--allow-remote-images.", param=param, code="remote_images_disabled")
        data = _fetch(url, where, limits)
    else:
        raise APIError(400, f"{where}: unsupported image URL {url[:40]!r}; send a data URL "
                            "(data:image/png;base64,...).", param=param, code="invalid_image_url")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        if e.reason == "image_too_large":
            raise APIError(400, f"{where}: {e} Downscale the image before sending it.", param=param,
                           code="image_too_large") from None
        raise APIError(400, f"{where}: the image data cannot be decoded ({str(e).rstrip('.')}); send a PNG, JPEG, "
                            "GIF or WebP file.", param=param, code="invalid_image") from None


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_image_timeout_s) as response:  # noqa: S310 (opt-in)
            data = response.read(limits.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(400, f"{where}: the image at {url[:80]} could not be fetched ({e}).",
                       param=f"{where}.image_url.url", code="invalid_image_url") from None
    if len(data) > limits.max_body_bytes:
        raise APIError(400, f"{where}: the image at {url[:80]} is larger than {limits.max_body_bytes} bytes.",
                       param=f"{where}.image_url.url", code="image_too_large")
    return data


def _json_type(v: Any) -> str:
    kinds = ((type(None), "null"), (bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"))
    return next((name for t, name in kinds if isinstance(v, t)), "object")


def _describe(v: Any) -> str:
    """A short rendering of a wrong value for an error message: `"hot" (string)`, `an array`."""
    if isinstance(v, list):
        return "an array" if v else "an empty array"
    if v is None or isinstance(v, dict):
        return "null" if v is None else "an object"
    text = json.dumps(v)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({_json_type(v)})"


class TextAssembler:
    """Token ids -> text deltas, honouring `stop` strings: the sequence is re-decoded per token (a
    trailing U+FFFD waits for the rest of a character); text that may start a stop string waits too."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""  # the text so far (after a stop: cut at it)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new text that is safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._emit(text, final=False)

    def finish(self) -> str:
        """Generation ended without a stop string: hand out what was held back."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True), True)

    def _emit(self, text: str, final: bool) -> str:
        cuts = [at for s in self.stop if (at := text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if cuts:
            self.stopped, text = True, text[:min(cuts)]
        self.text = text
        # The longest end of the text that begins some stop string waits for the next token.
        held = 0 if final or self.stopped else max(
            (k for s in self.stop for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])), default=0)
        end = len(text) - held
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(kind: str, model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None}


def completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {**_head("chat.completion", model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


class Chunks:
    """The chunks of one streamed answer (with `include_usage`: `usage` null until the last chunk)."""

    def __init__(self, model: str, include_usage: bool):
        self.head = _head("chat.completion.chunk", model)
        self.include_usage = include_usage

    def __call__(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body = {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
        return {**body, "usage": None} if self.include_usage else body

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, created: int, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanovlm", "max_model_len": context}
