"""Image processor, image strings, safe image loading, and the chat loss mask."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm.config import IGNORE_INDEX, VLMConfig
from nanovlm.data.images import ImageError, load_image, to_rgb
from nanovlm.data.processors import (ChatEncoder, ChatRenderer, get_image_processor, get_image_string, get_tokenizer,
                                     shift_labels)
from nanovlm.data.datasets import SampleProcessor, SampleError

MP = 4  # image tokens per tile in these tests


@pytest.fixture(scope="module")
def tok():
    cfg = VLMConfig.from_preset("tiny")
    return get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)


def rgb(w, h, color=(10, 200, 30)):
    return Image.new("RGB", (w, h), color)


# ---------------------------------------------------------------------------- tiles and image strings
@pytest.mark.parametrize("size, grid", [
    ((64, 64), (2, 2)),        # upscaled? no: long side to the next tile multiple, 2x2 tiles
    ((512, 300), (3, 4)),      # long side capped at 128 = 4 tiles, short side 75 px -> 3 tiles
    ((1, 1), (1, 1)),          # one tile, no global view
    ((3000, 100), (1, 4)),     # a strip: short side rounded up to one whole tile
    ((100, 3000), (4, 1)),
    ((40, 33), (2, 2)),        # long side 40 -> 64, short side 33 * 64 / 40 = 52.8 -> 64
])
def test_tile_and_image_token_counts(tok, size, grid):
    proc = get_image_processor(128, 32)
    tiles, got = proc(rgb(*size))
    assert got == grid
    expected_tiles = grid[0] * grid[1] + (1 if grid != (1, 1) else 0)
    assert tiles.shape == (expected_tiles, 3, 32, 32)
    assert tiles.dtype == torch.float32 and 0.0 <= tiles.min() and tiles.max() <= 1.0
    ids = tok.encode(get_image_string(tok, [got], MP))
    assert ids.count(tok.image_token_id) == expected_tiles * MP
    assert ids.count(tok.global_image_token_id) == 1
    assert sum(ids.count(getattr(tok, f"r{i}c{j}_id")) for i in range(1, 9) for j in range(1, 9)) == \
        (0 if grid == (1, 1) else grid[0] * grid[1])


def test_original_nanovlm_sizes():
    # nanoVLM-222M: one 224 tile for anything; nanoVLM-460M: 512 tiles up to 1536 px.
    assert get_image_processor(224, 224).grid(512, 300) == (1, 1)
    assert get_image_processor(1536, 512).grid(1024, 768) == (2, 2)
    assert get_image_processor(1536, 512).grid(4000, 1000) == (1, 3)
    assert get_image_processor(1536, 512, resize_to_max_side_len=True).grid(300, 200) == (2, 3)


def test_grid_is_capped_at_the_row_col_tokens(tok):
    proc = get_image_processor(2048, 32)  # 64 tiles per side would need <row_64_col_64>
    tiles, grid = proc(rgb(1000, 1000))
    assert grid == (8, 8) and tiles.shape[0] == 65
    s = get_image_string(tok, [grid], MP)
    assert s.count(tok.image_token) == 65 * MP and "<row_8_col_8>" in s
    with pytest.raises(ValueError, match="needs the token r9c1"):
        get_image_string(tok, [(9, 1)], MP)


def test_tiles_are_row_major_with_the_global_view_first():
    colors = [[(r * 100, c * 80, 50) for c in range(3)] for r in range(2)]
    a = np.zeros((64, 96, 3), np.uint8)
    for r in range(2):
        for c in range(3):
            a[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = colors[r][c]
    tiles, grid = get_image_processor(128, 32)(Image.fromarray(a))  # 96x64 needs no resize
    assert grid == (2, 3) and tiles.shape == (7, 3, 32, 32)
    for r in range(2):
        for c in range(3):
            want = torch.tensor(colors[r][c], dtype=torch.float32).view(3, 1, 1) / 255
            torch.testing.assert_close(tiles[1 + r * 3 + c], want.expand(3, 32, 32))
    # the global view is the whole picture squeezed to one tile: its left half is mostly row 0
    assert tiles[0].shape == (3, 32, 32)


def test_pixels_leave_the_processor_in_0_1():
    """The processor never normalises (the model does, from vit_pixel_mean / vit_pixel_std:
    tests/test_models.py): 255 -> 1 and 0 -> 0 exactly."""
    tiles, _ = get_image_processor(32, 32)(rgb(32, 32, (255, 0, 255)))
    assert torch.equal(tiles[:, 0], torch.ones(1, 32, 32)) and torch.equal(tiles[:, 1], torch.zeros(1, 32, 32))
    with pytest.raises(TypeError, match="mean"):
        get_image_processor(32, 32, mean=[0.5] * 3, std=[0.5] * 3)


def test_several_images_get_numbered(tok):
    s = get_image_string(tok, [(1, 1), (2, 2)], MP)
    assert s.startswith("<image: 0>" + tok.global_image_token) and "<image: 1>" in s
    assert tok.encode(s).count(tok.image_token_id) == (1 + 5) * MP


# ---------------------------------------------------------------------------- image loading
def png_bytes(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_modes_are_converted_faithfully(tmp_path):
    gray = Image.new("L", (4, 4), 77)
    assert load_image(png_bytes(gray)).getpixel((0, 0)) == (77, 77, 77)
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(transparent)).getpixel((0, 0)) == (255, 255, 255)  # on white, not black
    half = Image.new("LA", (4, 4), (0, 128))
    assert load_image(png_bytes(half)).getpixel((0, 0))[0] in (126, 127, 128)
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    assert load_image(png_bytes(pal)).getpixel((0, 0)) == (0, 0, 255)
    pal_t = Image.new("P", (4, 4), 0)
    pal_t.putpalette([9, 9, 9] * 256)
    pal_t.info["transparency"] = 0
    assert load_image(png_bytes(pal_t)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    r, g, b = load_image(png_bytes(cmyk, "JPEG")).getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60
    wide = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))
    path = tmp_path / "sixteen.png"
    wide.save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(str(path))
    assert [out.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [255, 128, 0, 1]
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(png_bytes(Image.new("1", (3, 3), 1))).getpixel((0, 0)) == (255, 255, 255)
    one = load_image(png_bytes(rgb(1, 1)))
    tiles, grid = get_image_processor(64, 32)(one)
    assert one.size == (1, 1) and grid == (1, 1) and tiles.shape == (1, 3, 32, 32)


def bomb_png(w=100_000, h=100_000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("make, reason", [
    (lambda p: str(p / "nowhere.png"), "missing_image"),
    (lambda p: b"this is not an image", "corrupt_image"),
    (lambda p: png_bytes(rgb(64, 64).resize((300, 300)).effect_spread(5))[:400], "corrupt_image"),  # truncated
    (lambda p: b"", "corrupt_image"),
    (lambda p: bomb_png(), "image_too_large"),        # past PIL's own bomb limit
    (lambda p: bomb_png(9000, 9000), "image_too_large"),  # past our pixel cap, below PIL's
    (lambda p: 12345, "bad_image"),
    (lambda p: {"bytes": None, "path": None}, "bad_image"),
])
def test_bad_images_have_reasons(tmp_path, make, reason):
    with pytest.raises(ImageError) as info:
        load_image(make(tmp_path))
    assert info.value.reason == reason


def test_pixel_cap_is_configurable():
    with pytest.raises(ImageError, match="more than the cap of 1000") as info:
        load_image(png_bytes(rgb(100, 100)), max_pixels=1000)
    assert info.value.reason == "image_too_large"


# ---------------------------------------------------------------------------- chat -> labels
def test_loss_mask_on_a_multi_turn_conversation(tok):
    cfg = VLMConfig.from_preset("tiny")
    proc = SampleProcessor(cfg, tok)
    messages = [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "And the background?"}, {"role": "assistant", "content": "It is white."}]
    sample = proc.process([rgb(20, 20)], messages, placeholders_required=False, sample_id="x")
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.shape == labels.shape and sample["images"].shape == (1, 3, 32, 32)
    sup = labels != IGNORE_INDEX
    # shifted once: labels[t] is the token at t + 1
    assert torch.equal(labels[:-1][sup[:-1]], ids[1:][sup[:-1]]) and labels[-1] == IGNORE_INDEX
    assert tok.decode(labels[sup], skip_special_tokens=False) == "A red circle.<|im_end|>It is white.<|im_end|>"
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<|global_image|>" + "<|image|>" * 4 + "What shape is it?<|im_end|>")
    assert (ids == tok.image_token_id).sum() == 4


def test_prompt_tokens_match_inference_tokenization(tok):
    messages = [{"role": "user", "content": "is there a circle?"}, {"role": "assistant", "content": "yes"}]
    ids, _ = ChatEncoder(tok).encode_lists(messages)
    prompt = tok.encode(tok.apply_chat_template(messages[:1], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt):] == tok.encode("yes") + tok.encode("<|im_end|>\n")


def test_inference_prompt_matches_the_training_layout(tok):
    cfg = VLMConfig.from_preset("tiny")
    image = rgb(20, 20)
    messages = [{"role": "user", "content": "What shape?"}, {"role": "assistant", "content": "Round."}]
    sample = SampleProcessor(cfg, tok).process([image], messages, placeholders_required=False)
    chat = ChatRenderer(tok, cfg).render(messages[:1], [image], add_generation_prompt=True)
    ids, tiles = torch.tensor(chat.input_ids), chat.tiles
    assert torch.equal(sample["input_ids"][:len(ids)], ids)
    assert torch.equal(tiles, sample["images"])
    assert tok.decode(ids[-4:], skip_special_tokens=False) == "<|im_start|>assistant\n"


def test_shift_labels_is_the_only_shift():
    assert shift_labels([5, 6, 7, 8], [False, False, True, True]) == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert shift_labels([5], [True]) == [IGNORE_INDEX]


def test_text_cannot_smuggle_image_tokens(tok):
    cfg = VLMConfig.from_preset("tiny")
    proc = SampleProcessor(cfg, tok)
    messages = [{"role": "user", "content": "hi <|image|><row_1_col_1>"}, {"role": "assistant", "content": "ok"}]
    sample = proc.process([], messages, placeholders_required=False)
    assert (sample["input_ids"] == tok.image_token_id).sum() == 0
    assert sample["images"].shape == (0, 3, 32, 32)


@pytest.mark.parametrize("images, messages, required, reason", [
    ([], [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], False, "empty_text"),
    ([], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], False, "empty_text"),
    ([], [{"role": "user", "content": "q"}], False, "empty_text"),
    ([], [], False, "empty_text"),
    ([], [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}], False, "non_string_text"),
    ([], [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}], False, "non_string_text"),
    ([rgb(8, 8)], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], True,
     "image_placeholder_mismatch"),
    ([rgb(8, 8)], [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}], True,
     "image_placeholder_mismatch"),
    ([], [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], False,
     "image_placeholder_mismatch"),
    ([rgb(8, 8)], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>a"}], True,
     "image_placeholder_mismatch"),
    ([b"garbage"], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False, "corrupt_image"),
    ([3.5], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False,
     "bad_image"),
])
def test_bad_samples_have_reasons(tok, images, messages, required, reason):
    proc = SampleProcessor(VLMConfig.from_preset("tiny"), tok)
    with pytest.raises(SampleError) as info:
        proc.process(images, messages, required, sample_id="s7")
    assert info.value.reason == reason
    assert "sample s7" in str(info.value)
