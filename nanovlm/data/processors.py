"""Processors: the tokenizer, the image processor, and the one chat renderer.

The image rules are the original nanoVLM's (`data/custom_transforms.py`): the long side goes
to `max_img_size` (or up to the next tile multiple when smaller), the short side keeps the
aspect ratio rounded UP to whole tiles, bicubic resampling; the picture is cut row-major into
`vit_img_size` tiles, and when there is more than one tile a global view (the whole picture at
one tile's size) goes first. Unlike the original, the grid is capped at the number of
`<row_i_col_j>` tokens (8x8) by shrinking the picture, so the prompt can always name every tile.
`image_processor_for(cfg)` is the one way a processor is built from a VLMConfig. PIL + torch only.

The prompt layout per image is the original's too: `<image: k>` (only when a sample has
several images), `<|global_image|>` + image tokens, then `<row_i_col_j>` + image tokens per
tile when the grid is larger than 1x1.

With `vlm_image_layout = "idefics3"` both follow Idefics3 / SmolVLM's processor instead
(`Idefics3ImageProcessor`, `idefics3_image_tokens`): resizing, tiling and the prompt text are
the ones transformers' `Idefics3Processor` produces for the same checkpoint files, so a SmolVLM
reads the same ids and pixels here as there.

`ChatRenderer` turns messages and their images into (input ids, shifted labels, tiles):
training data, `generate` / `answer`, evaluation and the server all render through it, so a
question reads the same to the model wherever it is asked. Images go where the text has
`<image>` placeholders (LLaVA), where a content list holds them (the server's parts), or else
in front of the first question (Cauldron, easy-VQA, `answer`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from nanovlm.config import CHATML_TEMPLATE, IGNORE_INDEX
from nanovlm.data.images import load_image, to_rgb
from nanovlm.data.tokenizer import get_tokenizer  # noqa: F401  (re-exported: the public import path)

IMAGE_PLACEHOLDER = "<image>"  # marks where an image goes in a message's text (LLaVA data)
MAX_GRID = 8  # the default extra tokens name tiles <row_1_col_1> .. <row_8_col_8>
PIL_FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}  # vlm_image_resample -> PIL filter


class ImageProcessor:
    """`proc(pil_image) -> (tiles, (n_rows, n_cols))`, tiles float (n_tiles, 3, S, S) in [0, 1]
    (the model normalises them: `VisionLanguageModel.encode_images`).

    A class rather than a closure so that DataLoader worker processes can pickle it.
    """

    def __init__(self, max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                 max_grid: int = MAX_GRID, resample: str = "bicubic"):
        self.resample = PIL_FILTERS[resample]
        if splitted_image_size <= 0 or max_img_size <= 0:
            raise ValueError(f"image sizes must be positive, got max_img_size={max_img_size}, "
                             f"splitted_image_size={splitted_image_size}.")
        self.tile = int(splitted_image_size)
        self.max_grid = int(max_grid)
        # The grid may not outgrow the row/col tokens: cap the long side at max_grid tiles.
        self.max_side = min(int(max_img_size), self.max_grid * self.tile)
        if self.max_side < self.tile:
            self.max_side = self.tile  # a max_img_size below one tile still gives one tile
        self.resize_to_max_side_len = bool(resize_to_max_side_len)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_width, new_height), both multiples of the tile size."""
        t = self.tile
        long, short = (width, height) if width >= height else (height, width)
        if self.resize_to_max_side_len:
            target_long = self.max_side
        else:
            target_long = min(self.max_side, math.ceil(long / t) * t)
        target_short = max(t, math.ceil(short * target_long / long / t) * t)
        target_short = min(target_short, target_long)  # float round-up must not flip the long side
        return (target_long, target_short) if width >= height else (target_short, target_long)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(n_rows, n_cols) for an image of this size, without touching pixels."""
        w, h = self.target_size(width, height)
        return h // self.tile, w // self.tile

    def largest_grid(self) -> tuple[int, int]:
        """The grid of the most tiles any image becomes."""
        return self.max_side // self.tile, self.max_side // self.tile

    def tiles_uint8(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tiles as uint8 (n_tiles, 3, S, S): what the easy-VQA cache stores."""
        image = to_rgb(image)
        t = self.tile
        w, h = self.target_size(*image.size)
        resized = image if (w, h) == image.size else image.resize((w, h), self.resample)
        x = _to_uint8_chw(resized)  # (3, H, W)
        n_rows, n_cols = h // t, w // t
        tiles = (x.view(3, n_rows, t, n_cols, t)
                  .permute(1, 3, 0, 2, 4)  # (n_rows, n_cols, 3, t, t), row-major
                  .reshape(n_rows * n_cols, 3, t, t))
        if n_rows * n_cols > 1:
            whole = image if image.size == (t, t) else image.resize((t, t), self.resample)
            tiles = torch.cat([_to_uint8_chw(whole).unsqueeze(0), tiles], dim=0)  # global view first
        return tiles, (n_rows, n_cols)

    def normalize(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 tiles -> float in [0, 1]."""
        return tiles_uint8.float().div_(255.0)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        tiles, grid = self.tiles_uint8(image)
        return self.normalize(tiles), grid

    def __repr__(self) -> str:
        return (f"ImageProcessor(tile={self.tile}, max_side={self.max_side}, "
                f"resize_to_max_side_len={self.resize_to_max_side_len})")


def _to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


# transformers' Idefics3 processors shrink any image whose longest side exceeds this (4k).
IDEFICS3_MAX_SIDE = 4096


class Idefics3ImageProcessor:
    """Idefics3 / SmolVLM's image rules (transformers' `Idefics3ImageProcessor`), in PIL + torch.

    1. The longest edge goes to `longest_edge` (up or down); the other side keeps the aspect
       ratio, truncated, then rounded up to even; neither side above 4096.
    2. With splitting, both sides go up to whole tiles (the short one from the new long one and
       the aspect ratio); a picture larger than one tile is cut row-major into tiles, followed by
       the global view, that picture resized to one tile. Without splitting, step 1's picture is
       resized to one tile.
    Each resize works on 8-bit pixels with the checkpoint's filter (Lanczos for SmolVLM), and
    [0, 1] pixels are computed as x * (1/255) in float64, as transformers rescales. The call
    returns `ImageProcessor`'s (tiles, (n_rows, n_cols)); a single tile is the grid (1, 1).
    """

    def __init__(self, longest_edge: int, tile: int, splitting: bool = True, resample: str = "lanczos"):
        if longest_edge <= 0 or tile <= 0:
            raise ValueError(f"image sizes must be positive, got longest_edge={longest_edge}, tile={tile}.")
        self.longest_edge, self.tile, self.splitting = int(longest_edge), int(tile), bool(splitting)
        self.resample_name = resample
        self.resample = PIL_FILTERS[resample]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Step 1: (width, height) with the longest edge at `longest_edge`."""
        aspect = width / height
        if width >= height:
            width, height = self.longest_edge, int(self.longest_edge / aspect)
            height += height % 2
        else:
            width, height = int(self.longest_edge * aspect), self.longest_edge
            width += width % 2
        width, height = max(width, 1), max(height, 1)
        aspect = width / height
        if width >= height and width > IDEFICS3_MAX_SIDE:
            width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
        elif height > width and height > IDEFICS3_MAX_SIDE:
            width, height = int(IDEFICS3_MAX_SIDE * aspect), IDEFICS3_MAX_SIDE
        return max(width, 1), max(height, 1)

    def tiled_size(self, width: int, height: int) -> tuple[int, int]:
        """Step 2: (width, height) of step 1's picture grown to whole tiles."""
        t, aspect = self.tile, width / height
        if width >= height:
            width = math.ceil(width / t) * t
            height = math.ceil(int(width / aspect) / t) * t
        else:
            height = math.ceil(height / t) * t
            width = math.ceil(int(height * aspect) / t) * t
        return width, height

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(n_rows, n_cols) for an image of this size, without touching pixels."""
        if not self.splitting:
            return 1, 1
        w, h = self.tiled_size(*self.resized_size(width, height))
        return h // self.tile, w // self.tile

    def largest_grid(self) -> tuple[int, int]:
        """The grid of the most tiles any image becomes (a square one's)."""
        return self.grid(self.longest_edge, self.longest_edge)

    def _resize(self, image: Image.Image, width: int, height: int) -> Image.Image:
        return image if image.size == (width, height) else image.resize((width, height), self.resample)

    def tiles_uint8(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tiles as uint8 (n_tiles, 3, S, S), the global view last."""
        t, image = self.tile, to_rgb(image)
        image = self._resize(image, *self.resized_size(*image.size))
        if not self.splitting:
            return _to_uint8_chw(self._resize(image, t, t)).unsqueeze(0), (1, 1)
        w, h = self.tiled_size(*image.size)
        image = self._resize(image, w, h)
        x = _to_uint8_chw(image)  # (3, H, W)
        n_rows, n_cols = h // t, w // t
        if n_rows * n_cols == 1:
            return x.unsqueeze(0), (1, 1)
        tiles = (x.view(3, n_rows, t, n_cols, t)
                  .permute(1, 3, 0, 2, 4)  # (n_rows, n_cols, 3, t, t), row-major
                  .reshape(n_rows * n_cols, 3, t, t))
        whole = _to_uint8_chw(self._resize(image, t, t)).unsqueeze(0)  # (1, 3, t, t)
        return torch.cat([tiles, whole], dim=0), (n_rows, n_cols)

    def normalize(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 tiles -> float32 in [0, 1], rounded as transformers' rescale rounds them."""
        return (tiles_uint8.double() * (1 / 255)).float()

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        tiles, grid = self.tiles_uint8(image)
        return self.normalize(tiles), grid

    def __repr__(self) -> str:
        return (f"Idefics3ImageProcessor(longest_edge={self.longest_edge}, tile={self.tile}, "
                f"splitting={self.splitting}, resample={self.resample_name!r})")


def n_tiles(grid: tuple[int, int]) -> int:
    """Tiles an image of this grid becomes: the grid, plus the global view when larger than 1x1."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


def get_image_processor(max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                        max_grid: int = MAX_GRID, resample: str = "bicubic") -> ImageProcessor:
    """The image processor of the original nanoVLM; see `ImageProcessor`."""
    return ImageProcessor(max_img_size, splitted_image_size, resize_to_max_side_len, max_grid, resample)


def image_processor_for(cfg) -> ImageProcessor | Idefics3ImageProcessor:
    """The processor a VLMConfig implies: its layout's, with the nanoVLM grid capped by its
    row/col tokens; without `vlm_image_splitting`, one tile per image."""
    if cfg.vlm_image_layout == "idefics3":
        return Idefics3ImageProcessor(cfg.max_img_size, cfg.vit_img_size, cfg.vlm_image_splitting,
                                      cfg.vlm_image_resample)
    max_img_size = cfg.max_img_size if cfg.vlm_image_splitting else cfg.vit_img_size
    return get_image_processor(max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len,
                               max_grid=grid_limit(cfg.vlm_extra_tokens), resample=cfg.vlm_image_resample)


def grid_limit(extra_tokens: dict[str, str]) -> int:
    """The largest n such that every r{i}c{j} token for i, j <= n exists."""
    n = 0
    while all(f"r{i}c{j}" in extra_tokens for i in range(1, n + 2) for j in range(1, n + 2)):
        n += 1
    return n


def image_tag(k: int, n_images: int) -> str:
    """What precedes image k of a sample: `<image: k>` when the sample holds several images."""
    return f"<image: {k}>" if n_images > 1 else ""


def get_image_string(tokenizer: Any, splitted_image_counts: Sequence[tuple[int, int]],
                     mp_image_token_length: int) -> str:
    """The prompt text that holds the image tokens of one sample's images, in order."""
    n = len(splitted_image_counts)
    return "".join(image_tag(k, n) + _image_tokens(tokenizer, grid, mp_image_token_length)
                   for k, grid in enumerate(splitted_image_counts))


def _image_tokens(tokenizer: Any, grid: tuple[int, int], mp_image_token_length: int) -> str:
    """One image's tokens, without its `<image: k>` tag."""
    rows, cols = grid
    # Tokenizers without a global-image token (older checkpoints) start with the image tokens.
    parts = [getattr(tokenizer, "global_image_token", "") + tokenizer.image_token * mp_image_token_length]
    if rows * cols > 1:  # else the single tile is the global view
        for i in range(rows):
            for j in range(cols):
                tag = getattr(tokenizer, f"r{i + 1}c{j + 1}", None)
                if tag is None:
                    raise ValueError(f"a {rows}x{cols} grid needs the token r{i + 1}c{j + 1}, which the tokenizer "
                                     "lacks; lower max_img_size or add row/col tokens to vlm_extra_tokens.")
                parts.append(tag + tokenizer.image_token * mp_image_token_length)
    return "".join(parts)


def idefics3_image_tokens(tokenizer: Any, grid: tuple[int, int], mp_image_token_length: int) -> str:
    """One image's text as Idefics3Processor writes it: per tile `<fake_token_around_image>`,
    its `<row_r_col_c>` tag and the image tokens, a newline after each row; then a newline and
    the global view between fake tokens, tagged `<global-img>`. A single tile is the global view."""
    try:
        fake, glob = tokenizer.fake_image_token, tokenizer.global_image_token
    except AttributeError:
        raise ValueError("the idefics3 image layout needs the extra tokens fake_image_token and global_image_token "
                         "(<fake_token_around_image>, <global-img>); add them to vlm_extra_tokens.") from None
    run = tokenizer.image_token * mp_image_token_length
    whole = f"{fake}{glob}{run}{fake}"
    rows, cols = grid
    if rows * cols == 1:
        return whole
    # Tags past the tokenizer's own are written out as text, as Idefics3Processor does.
    rows_text = ["".join(f"{fake}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n" for r in range(rows)]
    return "".join(rows_text) + "\n" + whole


def image_string_pattern(layout: str, tokenizer: Any) -> re.Pattern:
    """A regex that matches one whole image string of `layout` in rendered text (a chat template
    that takes typed content parts gets each as an image part: `ChatEncoder`)."""
    image, row_col = f"(?:{re.escape(tokenizer.image_token)})+", r"<row_\d+_col_\d+>"
    glob = re.escape(getattr(tokenizer, "global_image_token", ""))
    if layout == "idefics3":
        fake = re.escape(tokenizer.fake_image_token)
        return re.compile(f"(?:(?:(?:{fake}{row_col}{image})+\n)+\n)?{fake}{glob}{image}{fake}")
    return re.compile(f"(?:<image: \\d+>)?{glob}{image}(?:{row_col}{image})*")


# ---------------------------------------------------------------------------- chat -> ids, labels
class ChatEncoder:
    """Messages -> (input_ids, labels), labels already shifted (labels[t] is the target at t).

    Supervised: each assistant message's content and the end-of-turn token that closes it
    (the first `eos_token_id` after it, `<|im_end|>` in ChatML). The chat is rendered once with
    the tokenizer's template; the text outside assistant content is tokenized in whole pieces
    (so prompts tokenize as at inference), assistant content on its own (as the model generates
    it after the `<|im_start|>assistant\\n` prompt). Piece encodings are cached, which makes
    encoding templated data such as easy-VQA nearly free; inference prompts (`add_generation_prompt`,
    each one new) are encoded without the cache, so a long-running server does not fill it.

    A template that reads typed content parts (`[{"type": "image"}, {"type": "text", ...}]`, as
    SmolVLM's does) gets them: each message's text is cut at the image strings `image_pattern`
    matches, each becomes an image part, and the marker the template writes for it (the image
    token, which Idefics3Processor expands) is replaced by that image string again.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 200_000, image_pattern: re.Pattern | None = None):
        self.tokenizer = tokenizer
        self._image_pattern = image_pattern
        self._parts = False
        self.eos_token_id = tokenizer.eos_token_id
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size
        self._template = None
        self._chatml = False
        template = getattr(tokenizer, "chat_template", None)
        if template == CHATML_TEMPLATE:
            self._chatml = True  # the default template, rendered with string joins (10x faster than jinja)
        elif template:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as VLMTokenizer renders it
            self._template = env.from_string(template)
            self._parts = self._wants_parts()
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            if not self._parts and self._render(probe) != tokenizer.apply_chat_template(
                    probe, add_generation_prompt=False, tokenize=False):
                self._template = None  # rendered differently: let the tokenizer do it every time

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_template"] = None  # compiled templates do not pickle; recompiled lazily
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__init__(self.tokenizer, self._cache_size, self._image_pattern)

    def _wants_parts(self) -> bool:
        """Whether the template drops plain-text content but shows typed text parts."""
        def shows(content) -> bool:
            return "q7x" in self._template.render(messages=[{"role": "user", "content": content}],
                                                  add_generation_prompt=False, bos_token="", eos_token="")
        try:
            return not shows("q7x") and shows([{"type": "text", "text": "q7x"}])
        except Exception:  # a template that fails on one of the probes is not a parts template
            return False

    def _as_parts(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Messages with text content -> typed parts, and the image strings cut out, in order."""
        out, images = [], []
        for m in messages:
            content, parts, at = m["content"], [], 0
            for match in self._image_pattern.finditer(content) if self._image_pattern is not None else ():
                if match.start() > at:
                    parts.append({"type": "text", "text": content[at:match.start()]})
                parts.append({"type": "image"})
                images.append(match.group())
                at = match.end()
            if at < len(content) or not parts:
                parts.append({"type": "text", "text": content[at:]})
            out.append({"role": m["role"], "content": parts})
        return out, images

    def _render_parts(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        parts, images = self._as_parts(messages)
        text = self._template.render(messages=parts, add_generation_prompt=add_generation_prompt,
                                     bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        marker = getattr(tok, "image_token", None)
        pieces = text.split(marker) if images and marker else [text]
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the chat template shows {len(pieces) - 1} image part(s) as {marker!r} "
                             f"for {len(images)} image(s).")
        return pieces[0] + "".join(image + piece for image, piece in zip(images, pieces[1:]))

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._chatml:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + "<|im_start|>assistant\n" if add_generation_prompt else text
        if self._template is None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        if self._parts:
            return self._render_parts(messages, add_generation_prompt)
        tok = self.tokenizer
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def _encode_piece(self, text: str, cache: bool = True) -> Sequence[int]:
        if not cache:
            return self.tokenizer.encode(text)
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text))
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[text] = ids
        return ids

    def encode(self, messages: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each LongTensor (T,). Raises ValueError if the template hides a message."""
        ids, labels = self.encode_lists(messages)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def encode_lists(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """`encode` with plain lists, for building large pre-tokenized datasets."""
        ids, supervised = self.encode_supervised(messages)
        return ids, shift_labels(ids, supervised)

    def encode_supervised(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                          cache: bool = True) -> tuple[list[int], list[bool]]:
        """(input ids, supervised flags per token); with `add_generation_prompt` the ids end with
        the assistant prompt (an inference prompt). Raises ValueError if the template hides a message."""
        text = self._render(messages, add_generation_prompt)
        pieces: list[tuple[str, bool]] = []  # (text, is assistant content)
        cursor = piece_start = 0
        for m in messages:
            content = m["content"]
            at = text.find(content, cursor)
            if at < 0 and content.strip():
                content = content.strip()
                at = text.find(content, cursor)
            if at < 0:
                raise ValueError(f"the chat template does not reproduce the {m['role']} message text.")
            if m["role"] == "assistant":
                pieces.append((text[piece_start:at], False))
                pieces.append((content, True))
                piece_start = at + len(content)
            cursor = at + len(content)
        pieces.append((text[piece_start:], False))

        ids: list[int] = []
        supervised: list[bool] = []
        after_answer = False
        for piece, is_answer in pieces:
            if not piece:
                continue
            piece_ids = self._encode_piece(piece, cache)
            mask = [is_answer] * len(piece_ids)
            if after_answer and not is_answer and self.eos_token_id is not None:
                # The end-of-turn token is part of the answer: the model must learn to stop.
                try:
                    end = piece_ids.index(self.eos_token_id)
                    mask[:end + 1] = [True] * (end + 1)
                except ValueError:
                    pass
            after_answer = is_answer
            ids.extend(piece_ids)
            supervised.extend(mask)
        return ids, supervised


def shift_labels(input_ids: Sequence[int], supervised: Sequence[bool]) -> list[int]:
    """The one place labels are shifted: labels[t] = input_ids[t + 1] where that token is
    supervised, else IGNORE_INDEX (and IGNORE_INDEX at the last position)."""
    labels = [nxt if sup else IGNORE_INDEX for nxt, sup in zip(input_ids[1:], supervised[1:])]
    labels.append(IGNORE_INDEX)
    return labels[:len(input_ids)]


def share_prefix(encodings: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int], list[int]]:
    """Several (input_ids, labels) with a common prompt -> one sample (input_ids, labels,
    position_ids): the longest common unsupervised prefix once, then the rest of each encoding,
    its positions going back to where the prefix ends. The language model lets each branch see
    the prefix and itself only (`build_attention_mask`), so every branch is trained as if alone,
    and the prompt (the image, above all) is computed once."""
    first_ids = encodings[0][0]
    shared = min(len(ids) for ids, _ in encodings)
    for ids, labels in encodings:
        supervised = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        shared = min(shared, supervised[0] if supervised else len(ids))
        shared = next((t for t in range(shared) if ids[t] != first_ids[t]), shared)
    out_ids, out_labels = list(first_ids[:shared]), list(encodings[0][1][:shared])
    positions = list(range(shared))
    for ids, labels in encodings:
        out_ids.extend(ids[shared:])
        out_labels.extend(labels[shared:])
        positions.extend(range(shared, len(ids)))
    return out_ids, out_labels, positions


# ---------------------------------------------------------------------------- messages + images -> prompt
class RenderError(ValueError):
    """A chat that cannot be laid out as a prompt; `reason` names the kind of fault, as data skips do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class RenderedChat:
    """A chat laid out for the model.

    input_ids: the token ids; labels: the training targets, already shifted (`shift_labels`;
    all IGNORE_INDEX for an inference prompt); tiles: float (n_tiles, 3, S, S) in the order the
    image tokens appear; grids: (n_rows, n_cols) per image; position_ids: None, or the
    positions of a `share_prefix` sample (`independent_turns`).
    """

    input_ids: list[int]
    labels: list[int]
    tiles: torch.Tensor
    grids: list[tuple[int, int]] = field(default_factory=list)
    position_ids: list[int] | None = None


def _after_image(text: str) -> str:
    """The text after a placeholder, less the one line break that sets the placeholder apart."""
    if text.startswith("\r\n"):
        return text[2:]
    return text[1:] if text.startswith("\n") else text


def _image_parts(parts: Sequence[Any]) -> int:
    """The images in a content part list (every part that is not text)."""
    return sum(not isinstance(part, str) for part in parts)


class ChatRenderer:
    """Messages (+ their images) -> `RenderedChat`: the one place a prompt is laid out.

    A message is `{"role", "content"}`; content is text, or a list of parts (text, or an image
    where it stands). Each image becomes its image string (`get_image_string`, with its
    `<image: k>` tag when there are several): in a part list where it stands, but images that
    only follow the text go before it (the idefics3 layout, trained on interleaved text and
    images, keeps them there); in text at its `<image>` placeholder (one per image, in order);
    and where no message marks a place, all images go in front of the first user message. The
    chat template is applied by one `ChatEncoder`, whose piece cache makes re-encoding templated
    training data nearly free.

    `add_generation_prompt=True` ends the ids with the assistant prompt: an inference prompt is
    then, token for token, the start of the training sample that holds the same question and
    image, with the same tiles (the image processor is `image_processor_for(cfg)` everywhere).
    """

    def __init__(self, tokenizer: Any, cfg: Any, image_processor: ImageProcessor | None = None):
        self.tokenizer = tokenizer
        self.mp = cfg.mp_image_token_length
        self.tile = cfg.vit_img_size
        self.layout = getattr(cfg, "vlm_image_layout", "nanovlm")
        self.image_processor = image_processor if image_processor is not None else image_processor_for(cfg)
        self.encoder = ChatEncoder(tokenizer, image_pattern=image_string_pattern(self.layout, tokenizer))
        self.image_token_id = tokenizer.image_token_id
        self._image_strings: dict[tuple, list[str]] = {}

    # --- the pieces, for callers that keep their own images (easy-VQA's tile cache) ---
    def check_images(self, messages: Sequence[dict[str, Any]], n_images: int,
                     placeholders_required: bool = False) -> int:
        """How many places the messages mark for images; a RenderError where they cannot take
        `n_images` images. `placeholders_required`: every image must have its place (LLaVA)."""
        n_slots = 0
        for m in messages:
            content = m["content"]
            k = content.count(IMAGE_PLACEHOLDER) if isinstance(content, str) else _image_parts(content)
            if k:
                if m["role"] == "assistant":
                    raise RenderError("image_placeholder_mismatch", "an answer holds an image or an "
                                      f"{IMAGE_PLACEHOLDER} placeholder; images belong in user turns.")
                n_slots += k
        if (placeholders_required or n_slots) and n_slots != n_images:
            fix = ("mark each image with one placeholder" if placeholders_required else
                   "give one placeholder per image, or none to put the images before the first question")
            raise RenderError("image_placeholder_mismatch",
                              f"{n_images} image(s) but {n_slots} {IMAGE_PLACEHOLDER} placeholder(s); {fix}.")
        return n_slots

    def process_images(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (PIL, or what `load_image` reads) -> (tiles (n_tiles, 3, S, S), grid per image)."""
        tiles, grids = [], []
        for k, image in enumerate(images):
            image = image if isinstance(image, Image.Image) else load_image(image)
            try:
                t, grid = self.image_processor(image)
            except Exception as e:  # the picture's own fault (a shape the processor cannot tile)
                raise RenderError("bad_image", f"image {k + 1} cannot be processed ({e}).") from e
            tiles.append(t)
            grids.append(grid)
        if not tiles:
            return torch.zeros(0, 3, self.tile, self.tile), grids
        return (tiles[0] if len(tiles) == 1 else torch.cat(tiles)), grids

    def image_strings(self, grids: Sequence[tuple[int, int]]) -> list[str]:
        """Each image's string with its `<image: k>` tag, built once per tuple of grids."""
        key = tuple(map(tuple, grids))
        strings = self._image_strings.get(key)
        if strings is None:
            if self.layout == "idefics3":  # Idefics3Processor tags no image
                strings = [idefics3_image_tokens(self.tokenizer, g, self.mp) for g in key]
            else:
                strings = [image_tag(k, len(key)) + _image_tokens(self.tokenizer, g, self.mp)
                           for k, g in enumerate(key)]
            if len(self._image_strings) < 1024:  # a few grids recur (one per image shape); don't hoard the rest
                self._image_strings[key] = strings
        return strings

    def place_images(self, messages: Sequence[dict[str, Any]], grids: Sequence[tuple[int, int]],
                     placeholders_required: bool = False) -> list[dict[str, str]]:
        """The messages as text, with each image's string in its place (see the class docstring)."""
        n_slots = self.check_images(messages, len(grids), placeholders_required)
        strings = self.image_strings(grids) if grids else []
        if n_slots:
            pending = iter(strings)
            out = []
            for m in messages:
                content = m["content"]
                if isinstance(content, str):
                    pieces = content.split(IMAGE_PLACEHOLDER)
                    # LLaVA's "<image>\nQ": the newline only lays out the placeholder; without it
                    # the question follows its image as it does where no placeholder marks one.
                    text = pieces[0] + "".join(next(pending) + _after_image(p) for p in pieces[1:])
                else:
                    is_text = [isinstance(p, str) for p in content]
                    # Images after all the text (OpenAI's example) go where training puts unmarked ones.
                    if self.layout != "idefics3" and is_text == sorted(is_text, reverse=True):
                        content = sorted(content, key=lambda p: isinstance(p, str))
                    text = "".join(p if isinstance(p, str) else next(pending) for p in content)
                out.append({"role": m["role"], "content": text})
            return out
        out, placed = [], not strings
        for m in messages:
            role, content = m["role"], m["content"]
            if not isinstance(content, str):
                content = "".join(content)
            if not placed and role == "user":  # no marked places: the images go before the first question
                content, placed = "".join(strings) + content, True
            out.append({"role": role, "content": content})
        if not placed:
            raise RenderError("image_placeholder_mismatch", "the sample has images but no user turn to hold them.")
        return out

    def encode(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
               independent_turns: bool = False) -> tuple[list[int], list[int], list[int] | None]:
        """Text messages (images placed) -> (input_ids, labels, position_ids or None).

        `independent_turns`: each question with its answer is encoded as if asked alone after
        the first question's images, and the branches share that prompt (`share_prefix`); a
        chat with fewer than two question/answer pairs, other roles, or images elsewhere than in
        the first question is encoded as the conversation it is (position_ids None)."""
        try:
            branches = self._branches(messages) if independent_turns else None
            if branches is not None:
                return share_prefix([self.encoder.encode_lists(b) for b in branches])
            # Inference prompts are each new: caching them would only fill the cache.
            ids, supervised = self.encoder.encode_supervised(messages, add_generation_prompt,
                                                             cache=not add_generation_prompt)
        except ValueError as e:
            raise RenderError("chat_template", str(e)) from e
        labels = [IGNORE_INDEX] * len(ids) if add_generation_prompt else shift_labels(ids, supervised)
        return ids, labels, None

    def _branches(self, messages: list[dict[str, str]]) -> list[list[dict[str, str]]] | None:
        roles = [m["role"] for m in messages]
        if len(messages) < 4 or roles != ["user", "assistant"] * (len(messages) // 2):
            return None
        image_token = self.tokenizer.image_token
        first = messages[0]["content"]
        end = first.rfind(image_token)
        if end < 0 or any(image_token in m["content"] for m in messages[1:]):
            return None
        end += len(image_token)
        if self.layout == "idefics3":  # the last image string ends with its fake token
            end += len(self.tokenizer.fake_image_token)
        images = first[:end]  # the images and whatever text introduces them
        questions = [first] + [images + m["content"] for m in messages[2::2]]
        return [[{"role": "user", "content": q}, a] for q, a in zip(questions, messages[1::2])]

    def check_image_tokens(self, input_ids: Sequence[int], n_tiles: int) -> None:
        """A RenderError unless the ids hold exactly the image tokens the tiles fill."""
        n = input_ids.count(self.image_token_id) if isinstance(input_ids, list) else \
            sum(1 for i in input_ids if i == self.image_token_id)
        if n != n_tiles * self.mp:
            raise RenderError("image_token_mismatch",
                              f"the prompt holds {n} image tokens where {n_tiles} tile(s) x {self.mp} were expected; "
                              f"remove the reserved image token {self.tokenizer.image_token!r} from the text.")

    # --- the whole way ---
    def render(self, messages: Sequence[dict[str, Any]], images: Sequence[Any] = (), *,
               placeholders_required: bool = False, add_generation_prompt: bool = False,
               independent_turns: bool = False) -> RenderedChat:
        """Messages and their images -> RenderedChat. `images` are the images that text
        messages place (placeholders, or before the first question); images inside part lists
        come from the parts. A RenderError (a ValueError with a `reason`) says what does not fit."""
        inline = [p for m in messages if not isinstance(m["content"], str) for p in m["content"]
                  if not isinstance(p, str)]
        if inline and len(images):
            raise RenderError("image_placeholder_mismatch", "give a chat's images either inside its messages' "
                                                            "content lists or as the images argument, not both.")
        images = inline or list(images)
        self.check_images(messages, len(images), placeholders_required)  # before any pixel is touched
        tiles, grids = self.process_images(images)
        placed = self.place_images(messages, grids, placeholders_required)
        ids, labels, positions = self.encode(placed, add_generation_prompt=add_generation_prompt,
                                             independent_turns=independent_turns)
        self.check_image_tokens(ids, tiles.shape[0])
        return RenderedChat(ids, labels, tiles, grids, positions)
