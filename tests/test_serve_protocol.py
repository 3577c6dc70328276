"""Request parsing and the stop-string text assembler, without a model or a server."""

import base64
import io
import json

import pytest
from PIL import Image

from nanovlm.serve.protocol import APIError, Limits, TextAssembler, parse_chat_request

NAMES = ("served", "default")


def parse(body, **kw):
    return parse_chat_request(json.dumps(body).encode(), model_names=NAMES, **kw)


def png_url(size=(20, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 255)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class CharTokenizer:
    """Token i decodes to VOCAB[i]; '\\x80' stands for half a UTF-8 character."""

    VOCAB = ["Hel", "lo", " wor", "ld", "!", "\x80", "é", "END"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.VOCAB[i] for i in ids)
        # a lone half character decodes to U+FFFD, as byte-level BPE does; completed by the next token
        return text.replace("\x80é", "é").replace("\x80", "\ufffd")


def run(stop, tokens):
    t = TextAssembler(CharTokenizer(), stop)
    deltas = [t.push(i) for i in tokens]
    if not t.stopped:
        deltas.append(t.finish())
    return deltas, t


def test_text_without_stop_streams_every_token():
    deltas, t = run([], [0, 1, 2, 3])
    assert deltas == ["Hel", "lo", " wor", "ld", ""] and not t.stopped


def test_stop_string_across_tokens_is_cut_and_never_sent():
    deltas, t = run(["o wo"], [0, 1, 2, 3])
    assert "".join(deltas) == "Hell" and t.stopped
    assert deltas[1] == "l"  # "o" held back: it may begin the stop string


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    deltas, t = run(["lo!"], [0, 1, 2, 3])
    assert deltas == ["He", "l", "lo wor", "ld", ""] and not t.stopped
    deltas, t = run(["ld?"], [0, 1, 2, 3])
    assert "".join(deltas) == "Hello world" and deltas[-1] == "ld"  # released by finish()


def test_earliest_stop_wins_and_text_after_it_is_dropped():
    deltas, t = run(["world", "lo"], [0, 1, 2, 3, 4])
    assert "".join(deltas) == "Hel" and t.text == "Hel"


def test_half_characters_wait_for_the_rest():
    deltas, _ = run([], [0, 5, 6, 4])
    assert deltas == ["Hel", "", "é", "!", ""]


def test_developer_role_string_image_url_and_max_completion_tokens():
    req = parse({"model": "default", "max_tokens": 9, "max_completion_tokens": 5, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": png_url()}]},
    ]})
    assert req.model == "served" and req.max_tokens == 5
    assert req.messages[0] == {"role": "system", "content": ["be brief"]}
    what, image = req.messages[1]["content"]
    assert what == "what?" and isinstance(image, Image.Image) and image.size == (20, 10)
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.stop == [] and not req.stream


def test_model_may_be_omitted_and_unknown_is_404():
    assert parse({"messages": [{"role": "user", "content": "hi"}]}).model == "served"
    with pytest.raises(APIError) as e:
        parse({"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    assert e.value.status == 404 and e.value.code == "model_not_found" and "'served'" in e.value.message


def test_limits_are_applied_before_decoding():
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}]}
    with pytest.raises(APIError, match="at most 2 per request"):
        parse(body, limits=Limits(max_images=2))
    with pytest.raises(APIError, match="50 pixels") as e:
        parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((10, 5))}}]}]},
              limits=Limits(max_image_pixels=49))
    assert e.value.code == "image_too_large"


def test_stream_options_and_stop_forms():
    req = parse({"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True},
                 "stop": "\n"})
    assert req.stream and req.include_usage and req.stop == ["\n"]
    with pytest.raises(APIError, match="stream_options"):
        parse({"messages": [{"role": "user", "content": "x"}], "stream_options": [1]})
    with pytest.raises(APIError, match="must not be empty"):
        parse({"messages": [{"role": "user", "content": "x"}], "stop": [""]})


def test_error_body_shape():
    try:
        parse({"messages": "hi"})
    except APIError as e:
        body = e.body()
    assert body == {"error": {"message": body["error"]["message"], "type": "invalid_request_error",
                              "param": "messages", "code": None}}
    assert "non-empty list" in body["error"]["message"] and '"hi" (string)' in body["error"]["message"]


def test_empty_messages_and_corrupt_images_read_as_one_sentence():
    with pytest.raises(APIError) as e:
        parse({"messages": []})
    assert e.value.message.endswith("got an empty array.") and e.value.param == "messages"
    with pytest.raises(APIError) as e:
        parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()}}]}]})
    assert "cannot be decoded (" in e.value.message and ".)" not in e.value.message
