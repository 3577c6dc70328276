"""The OpenAI chat-completions protocol: request validation, response and error shapes.

Everything a client can get wrong is caught here and raised as an `APIError` carrying the
HTTP status and OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`), with a
message that says what to fix. The request's scalar fields are a typed pydantic model
(`ChatCompletionRequest`, strict types, ranges as constraints) whose validation errors become
one sentence per field; messages and their images are checked by hand, part by part, because
their errors name the exact part (`messages[1].content[0].image_url.url`) and images are decoded
under `Limits`. Parsing needs no model: the server turns the validated `ChatRequest` into tokens
(see `engine.build_prompt`).

Unknown request fields are ignored (clients send many optional ones); fields this server cannot
honour in a way the client would notice (`n > 1`, `logprobs`, `tools`, JSON response formats)
are refused rather than silently dropped. Images arrive as `data:` URLs; `http(s)` URLs are
refused unless the server was started with `--allow-remote-images`, so by default the server
never fetches an address a client chose.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

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
class Message:
    role: str  # system | user | assistant ("developer" is read as system)
    parts: list  # str (text) or PIL.Image.Image, in order


@dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None  # None: as many as the context allows (capped by Limits)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    @property
    def n_images(self) -> int:
        return sum(isinstance(p, Image.Image) for m in self.messages for p in m.parts)


# ------------------------------------------------------------------------------------ parsing
def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send JSON encoded as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            "send a JSON object such as {\"model\": ..., \"messages\": [...]}.") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply; send a flat chat-completions object.") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise APIError(400, f"the request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {_json_type(data)}.")
    return data


# The request body as a typed model. Field types are strict (JSON `true` is not a number, "5" is
# not an integer); what pydantic reports is turned into one sentence by `_validation_error`, with
# the wording of `_RULES` for the field that was wrong.
_Int = Annotated[int, Field(strict=True)]
_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Annotated[bool, Field(strict=True)] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completions request this server reads; others are ignored.
    `messages` stays untyped here: `_parse_message` checks each one and decodes its images."""

    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, Field(strict=True)] | None = None
    messages: Annotated[list[Any], Field(min_length=1)]
    max_tokens: Annotated[_Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[_Int, Field(ge=1)] | None = None
    temperature: Annotated[_Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[_Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[_Int, Field(ge=0)] | None = None  # not OpenAI's, but vLLM and llama.cpp accept it
    seed: Annotated[_Int, Field(ge=-(2 ** 63), le=2 ** 64 - 1)] | None = None
    stream: Annotated[bool, Field(strict=True)] | None = None
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True)]] | None = None
    n: Annotated[_Int, Field(ge=1, le=1)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None
    response_format: ResponseFormat | None = None


# field -> (what it must be, whether to add "got <value>", param reported)
_RULES: dict[str, tuple[str, bool, str]] = {
    "model": ("'model' must be a string", True, "model"),
    "messages": ("'messages' must be a non-empty list of {\"role\", \"content\"} objects", True, "messages"),
    "max_tokens": ("'max_tokens' must be a positive integer", True, "max_tokens"),
    "max_completion_tokens": ("'max_completion_tokens' must be a positive integer", True, "max_completion_tokens"),
    "temperature": ("'temperature' must be a number between 0 and 2", True, "temperature"),
    "top_p": ("'top_p' must be a number greater than 0 and at most 1 (1 keeps every token)", True, "top_p"),
    "top_k": ("'top_k' must be an integer at least 0 (0 keeps every token)", True, "top_k"),
    "seed": (f"'seed' must be an integer between {-(2 ** 63)} and {2 ** 64 - 1}", True, "seed"),
    "stream": ("'stream' must be true or false", True, "stream"),
    "stream_options": ("'stream_options' must be an object such as {\"include_usage\": true}", True,
                       "stream_options"),
    "stream_options.include_usage": ("'stream_options.include_usage' must be true or false", True,
                                     "stream_options.include_usage"),
    "stop": ("'stop' must be a string or a list of strings", True, "stop"),
    "n": ("'n' must be 1 (this server returns one choice per request; send several requests for several "
          "answers)", True, "n"),
    "logprobs": ("'logprobs' is not supported by this server; remove it", False, "logprobs"),
    "top_logprobs": ("'logprobs' is not supported by this server; remove 'top_logprobs'", False, "logprobs"),
    "tools": ("tools / function calling are not supported by this model; remove 'tools'", False, "tools"),
    "functions": ("tools / function calling are not supported by this model; remove 'functions'", False, "tools"),
    "response_format": ("only response_format {\"type\": \"text\"} is supported; remove 'response_format'", False,
                        "response_format"),
}


def _validation_error(error: ValidationError) -> APIError:
    """pydantic's first complaint -> one sentence naming the field, what it must be, and what came."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc[:2]) if loc[:2] == ["stream_options", "include_usage"] else loc[0]
    if first["type"] == "missing" and key == "messages":
        return APIError(400, "missing required field 'messages': a list of messages such as "
                             "[{\"role\": \"user\", \"content\": \"Hello\"}].", param="messages",
                        code="missing_required_parameter")
    rule, show_value, param = _RULES.get(key, (f"'{key}' is invalid", True, key))
    got = f", got {_describe(first['input'])}" if show_value else ""
    return APIError(400, f"{rule}{got}.", param=param)


def parse_chat_request(body: bytes, *, model_names: tuple[str, ...], limits: Limits = Limits(),
                       allow_remote_images: bool = False) -> ChatRequest:
    """Validate a chat-completions body and decode its images. Raises APIError."""
    data = parse_json_body(body)
    try:
        fields = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    model = _parse_model(fields.model, model_names)

    raw_messages = fields.messages
    # Count images before decoding any, so an oversized request costs nothing.
    n_images = sum(1 for m in raw_messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") in ("image_url", "input_image"))
    if n_images > limits.max_images:
        raise APIError(400, f"the request has {n_images} images; this server accepts at most "
                            f"{limits.max_images} per request. Send fewer images.", param="messages",
                       code="too_many_images")
    messages = [_parse_message(m, i, limits, allow_remote_images) for i, m in enumerate(raw_messages)]

    # max_completion_tokens wins over max_tokens, as in OpenAI's API
    max_tokens = fields.max_completion_tokens if fields.max_completion_tokens is not None else fields.max_tokens
    options = fields.stream_options
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens,
                       temperature=1.0 if fields.temperature is None else fields.temperature,
                       top_p=1.0 if fields.top_p is None else fields.top_p,
                       top_k=fields.top_k or 0, seed=fields.seed, stop=_parse_stop(fields.stop, limits),
                       stream=bool(fields.stream), include_usage=bool(options and options.include_usage))


def _parse_model(model: Any, model_names: tuple[str, ...]) -> str:
    if model is None:
        return model_names[0]
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {_describe(model)}; this server serves "
                            f"{model_names[0]!r}.", param="model")
    if model not in model_names:
        raise APIError(404, f"The model {model!r} does not exist on this server; it serves {model_names[0]!r} "
                            "(see GET /v1/models).", param="model", code="model_not_found")
    return model_names[0]


def _parse_message(m: Any, i: int, limits: Limits, allow_remote: bool) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content', got {_describe(m)}.", param=where)
    role = m.get("role")
    if role not in ROLES:
        hint = " (tool messages are not supported)" if role in ("tool", "function") else ""
        raise APIError(400, f"{where}.role must be one of 'system', 'user', 'assistant', got {_describe(role)}{hint}.",
                       param=f"{where}.role")
    if role == "developer":
        role = "system"
    if "content" not in m or m["content"] is None:
        raise APIError(400, f"{where}.content is missing; give a string or a list of content parts.",
                       param=f"{where}.content")
    content = m["content"]
    if isinstance(content, str):
        return Message(role, [content])
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts, got {_describe(content)}.",
                       param=f"{where}.content")
    parts: list = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{pwhere} must be an object such as {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {_describe(part)}.", param=pwhere)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{pwhere}.text must be a string, got {_describe(text)}.", param=f"{pwhere}.text")
            parts.append(text)
        elif kind in ("image_url", "input_image"):
            if role != "user":
                raise APIError(400, f"{pwhere}: images may only appear in user messages, not in a {role} message.",
                               param=pwhere)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise APIError(400, f"{pwhere}.image_url must be {{\"url\": \"data:image/png;base64,...\"}}, got "
                                    f"{_describe(ref)}.", param=f"{pwhere}.image_url")
            parts.append(load_image_url(url, pwhere, limits, allow_remote))
        else:
            raise APIError(400, f"{pwhere}.type must be 'text' or 'image_url', got {_describe(kind)}.",
                           param=f"{pwhere}.type")
    return Message(role, parts)


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
    from nanovlm.data.images import ImageError, load_image

    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        if e.reason == "image_too_large":
            raise APIError(400, f"{where}: {e} Downscale the image before sending it.", param=param,
                           code="image_too_large") from None
        reason = str(e).rstrip(".")  # ImageError's sentence, inside our parentheses
        raise APIError(400, f"{where}: the image data cannot be decoded ({reason}); send a PNG, JPEG, GIF or WebP "
                            "file.",
                       param=param, code="invalid_image") from None


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    import urllib.error
    import urllib.request

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


def _parse_stop(stop: str | list[str] | None, limits: Limits) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > limits.max_stop:
        raise APIError(400, f"'stop' has {len(items)} strings; at most {limits.max_stop} are allowed.", param="stop")
    if any(s == "" for s in items):
        raise APIError(400, "'stop' strings must not be empty.", param="stop")
    return list(items)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _describe(v: Any) -> str:
    """A short rendering of a wrong value for an error message: `"hot" (string)`, `an array`."""
    if isinstance(v, list):
        return "an array" if v else "an empty array"
    if isinstance(v, dict):
        return "an object"
    if v is None:
        return "null"
    text = json.dumps(v)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({_json_type(v)})"


# ---------------------------------------------------------------------- text with stop strings
class TextAssembler:
    """Token ids -> text deltas, honouring `stop` strings.

    The whole sequence is re-decoded after each token (byte-level BPE pieces can be half a UTF-8
    character; a trailing U+FFFD means "wait for the next token"). Text that could be the start
    of a stop string is held back until it is either completed (generation stops and the stop
    string is cut off) or ruled out.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
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
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(cut)
        return self._emit(len(text) - self._held(text))

    def finish(self) -> str:
        """Generation ended without a stop string: hand out what was held back."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text = text
        return self._emit(len(text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def _find_stop(self, text: str) -> int | None:
        best = None
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0 and (best is None or at < best):
                best = at
        return best

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held


# ------------------------------------------------------------------------------------ responses
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage_: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:  # with stream_options.include_usage every chunk carries the key (null until the end)
        body["usage"] = usage_
    return body


def usage_chunk(id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def models_body(name: str, created: int, context: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created, context)]}


def model_card(name: str, created: int, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanovlm", "max_model_len": context}


def now() -> int:
    return int(time.time())
