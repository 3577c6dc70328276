"""Processors: images cut and written into the prompt as the original nanoVLM or transformers'
`Idefics3Processor` does; `ChatRenderer` lays out every prompt (training, `answer`, eval, server).
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
from nanovlm.data import tokenizer as _tokenizer
from nanovlm.data.images import load_image, to_rgb
from nanovlm.data.tokenizer import TEXT_PART, template_shows

get_tokenizer = _tokenizer.get_tokenizer  # the public import path (SPEC)
IMAGE_PLACEHOLDER = "<image>"  # marks where an image goes in a message's text (LLaVA data)
MAX_GRID = 8  # the default extra tokens name tiles <row_1_col_1> .. <row_8_col_8>
PIL_FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}  # vlm_image_resample -> PIL filter
IDEFICS3_MAX_SIDE = 4096  # transformers' Idefics3 processors shrink any longer side to this


def _to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def _cut(x: torch.Tensor, t: int) -> torch.Tensor:
    """(3, H, W) -> (n_rows * n_cols, 3, t, t), row-major."""
    n_rows, n_cols = x.shape[1] // t, x.shape[2] // t
    return x.view(3, n_rows, t, n_cols, t).permute(1, 3, 0, 2, 4).reshape(n_rows * n_cols, 3, t, t)


class _Tiles:
    """`proc(pil_image) -> (tiles (n_tiles, 3, S, S) in [0, 1], (n_rows, n_cols))`, plus a global view."""

    global_first = True  # the original: the whole picture first; Idefics3: the tiled picture last

    def _resize(self, image: Image.Image, width: int, height: int) -> Image.Image:
        return image if image.size == (width, height) else image.resize((width, height), self.resample)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(n_rows, n_cols) for an image of this size, without touching pixels."""
        w, h = self.target_size(*self.resized_size(width, height))
        return h // self.tile, w // self.tile

    def largest_grid(self) -> tuple[int, int]:
        return self.grid(self.max_side, self.max_side)

    def tiles_uint8(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        image, t = to_rgb(image), self.tile
        image = self._resize(image, *self.resized_size(*image.size))
        w, h = self.target_size(*image.size)
        tiled = self._resize(image, w, h)
        tiles = _cut(_to_uint8_chw(tiled), t)
        if len(tiles) > 1:
            view = _to_uint8_chw(self._resize(image if self.global_first else tiled, t, t)).unsqueeze(0)
            tiles = torch.cat([view, tiles] if self.global_first else [tiles, view])
        return tiles, (h // t, w // t)

    def normalize(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        return tiles_uint8.float().div_(255.0)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        tiles, grid = self.tiles_uint8(image)
        return self.normalize(tiles), grid


class ImageProcessor(_Tiles):
    """The original's rules: the long side to `max_img_size`, the short one by aspect, both in whole tiles."""

    def __init__(self, max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                 max_grid: int = MAX_GRID, resample: str = "bicubic"):
        if splitted_image_size <= 0 or max_img_size <= 0:
            raise ValueError(f"image sizes must be positive, got max_img_size={max_img_size}, "
                             f"splitted_image_size={splitted_image_size}.")
        self.tile, self.max_grid, self.resample = int(splitted_image_size), int(max_grid), PIL_FILTERS[resample]
        # The grid may not outgrow the row/col tokens; a max_img_size below one tile still gives one.
        self.max_side = max(self.tile, min(int(max_img_size), self.max_grid * self.tile))
        self.resize_to_max_side_len = bool(resize_to_max_side_len)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_width, new_height), both multiples of the tile size."""
        t = self.tile
        long, short = (width, height) if width >= height else (height, width)
        target_long = self.max_side if self.resize_to_max_side_len else min(self.max_side, math.ceil(long / t) * t)
        target_short = min(max(t, math.ceil(short * target_long / long / t) * t), target_long)
        return (target_long, target_short) if width >= height else (target_short, target_long)


class Idefics3ImageProcessor(_Tiles):
    """transformers' `Idefics3ImageProcessor`: longest edge to `longest_edge`, then whole tiles, global view last."""

    global_first = False

    def __init__(self, longest_edge: int, tile: int, splitting: bool = True, resample: str = "lanczos"):
        if longest_edge <= 0 or tile <= 0:
            raise ValueError(f"image sizes must be positive, got longest_edge={longest_edge}, tile={tile}.")
        self.max_side, self.tile, self.splitting = int(longest_edge), int(tile), bool(splitting)
        self.resample = PIL_FILTERS[resample]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        aspect = width / height
        if width >= height:
            width, height = self.max_side, int(self.max_side / aspect)
            height += height % 2
        else:
            width, height = int(self.max_side * aspect), self.max_side
            width += width % 2
        width, height = max(width, 1), max(height, 1)
        aspect = width / height
        if width >= height and width > IDEFICS3_MAX_SIDE:
            width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
        elif height > width and height > IDEFICS3_MAX_SIDE:
            width, height = int(IDEFICS3_MAX_SIDE * aspect), IDEFICS3_MAX_SIDE
        return max(width, 1), max(height, 1)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        t, aspect = self.tile, width / height
        if not self.splitting:
            return t, t
        if width >= height:
            width = math.ceil(width / t) * t
            return width, math.ceil(int(width / aspect) / t) * t
        height = math.ceil(height / t) * t
        return math.ceil(int(height * aspect) / t) * t, height

    def normalize(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        return (tiles_uint8.double() * (1 / 255)).float()


get_image_processor = ImageProcessor  # the original nanoVLM's name for it


def image_processor_for(cfg) -> ImageProcessor | Idefics3ImageProcessor:
    """The processor a VLMConfig implies (one tile per image without `vlm_image_splitting`)."""
    if cfg.vlm_image_layout == "idefics3":  # max_img_size 0 (not fitted to data yet): one tile
        return Idefics3ImageProcessor(cfg.max_img_size or cfg.vit_img_size, cfg.vit_img_size,
                                      cfg.vlm_image_splitting, cfg.vlm_image_resample)
    max_grid = 0  # the largest n such that every r{i}c{j} token for i, j <= n exists
    while all(f"r{i}c{j}" in cfg.vlm_extra_tokens for i in range(1, max_grid + 2) for j in range(1, max_grid + 2)):
        max_grid += 1
    return ImageProcessor(cfg.max_img_size if cfg.vlm_image_splitting and cfg.max_img_size else cfg.vit_img_size,
                          cfg.vit_img_size, cfg.resize_to_max_side_len, max_grid, cfg.vlm_image_resample)


def get_image_string(tokenizer: Any, splitted_image_counts: Sequence[tuple[int, int]],
                     mp_image_token_length: int) -> str:
    """The prompt text that holds the image tokens of one sample's images, in order."""
    return "".join(_tagged_image_strings(tokenizer, splitted_image_counts, mp_image_token_length))


def _tagged_image_strings(tokenizer: Any, grids: Sequence[tuple[int, int]], mp_image_token_length: int) -> list[str]:
    return [(f"<image: {k}>" if len(grids) > 1 else "") + _image_tokens(tokenizer, grid, mp_image_token_length)
            for k, grid in enumerate(grids)]


def _image_tokens(tokenizer: Any, grid: tuple[int, int], mp_image_token_length: int) -> str:
    rows, cols = grid
    run = tokenizer.image_token * mp_image_token_length
    # Tokenizers without a global-image token (older checkpoints) start with the image tokens.
    parts = [getattr(tokenizer, "global_image_token", "") + run]
    for i in range(rows if rows * cols > 1 else 0):  # a single tile is the global view
        for j in range(cols):
            tag = getattr(tokenizer, f"r{i + 1}c{j + 1}", None)
            if tag is None:
                raise ValueError(f"a {rows}x{cols} grid needs the token r{i + 1}c{j + 1}, which the tokenizer "
                                 "lacks; lower max_img_size or add row/col tokens to vlm_extra_tokens.")
            parts.append(tag + run)
    return "".join(parts)


def idefics3_image_tokens(tokenizer: Any, grid: tuple[int, int], mp_image_token_length: int) -> str:
    """One image's text as Idefics3Processor writes it (tiles row by row, then the global view)."""
    try:
        fake, glob = tokenizer.fake_image_token, tokenizer.global_image_token
    except AttributeError:
        raise ValueError("the idefics3 image layout needs the extra tokens fake_image_token and global_image_token "
                         "(<fake_token_around_image>, <global-img>); add them to vlm_extra_tokens.") from None
    run = tokenizer.image_token * mp_image_token_length
    rows, cols = grid
    whole = f"{fake}{glob}{run}{fake}"
    if rows * cols == 1:
        return whole
    # Tags past the tokenizer's own are written out as text, as Idefics3Processor does.
    return "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                   for r in range(rows)) + "\n" + whole


def image_string_pattern(layout: str, tokenizer: Any) -> re.Pattern:
    """A regex matching one whole image string of `layout` (for templates that take typed parts)."""
    image, row_col = f"(?:{re.escape(tokenizer.image_token)})+", r"<row_\d+_col_\d+>"
    glob = re.escape(getattr(tokenizer, "global_image_token", ""))
    if layout == "idefics3":
        fake = re.escape(tokenizer.fake_image_token)
        return re.compile(f"(?:(?:(?:{fake}{row_col}{image})+\n)+\n)?{fake}{glob}{image}{fake}")
    return re.compile(f"(?:<image: \\d+>)?{glob}{image}(?:{row_col}{image})*")


class ChatEncoder:
    """Messages -> (input_ids, shifted labels), supervising each answer and the end-of-turn after it.
    Text between answers is tokenized in whole pieces (as at inference), each answer alone (as generated)."""

    def __init__(self, tokenizer: Any, cache_size: int = 200_000, image_pattern: re.Pattern | None = None):
        self.tokenizer, self._image_pattern, self._cache_size = tokenizer, image_pattern, cache_size
        self.eos_token_id, template = tokenizer.eos_token_id, tokenizer.chat_template
        self._cache: dict[str, tuple[int, ...]] = {}
        self._chatml = template == CHATML_TEMPLATE  # the default: string joins, faster than jinja
        # A template that drops plain-text content but shows typed text parts (SmolVLM's) gets parts.
        self._parts = bool(template) and not self._chatml and not template_shows(template, "q7x") \
            and template_shows(template, TEXT_PART)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}  # a DataLoader worker starts with an empty cache

    def _template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._chatml:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + "<|im_start|>assistant\n" if add_generation_prompt else text
        if not self._parts:
            return self._template(messages, add_generation_prompt)
        parts, images = [], []
        for m in messages:
            content, pieces, at = m["content"], [], 0
            for match in self._image_pattern.finditer(content) if self._image_pattern is not None else ():
                pieces += [{"type": "text", "text": content[at:match.start()]}] if match.start() > at else []
                pieces.append({"type": "image"})
                images.append(match.group())
                at = match.end()
            if at < len(content) or not pieces:
                pieces.append({"type": "text", "text": content[at:]})
            parts.append({"role": m["role"], "content": pieces})
        marker = getattr(self.tokenizer, "image_token", None)
        text = self._template(parts, add_generation_prompt)
        pieces = text.split(marker) if images and marker else [text]
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the chat template shows {len(pieces) - 1} image part(s) as {marker!r} "
                             f"for {len(images)} image(s).")
        return pieces[0] + "".join(image + piece for image, piece in zip(images, pieces[1:]))

    def _encode_piece(self, text: str, cache: bool = True) -> Sequence[int]:
        if not cache:
            return self.tokenizer.encode(text)
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            ids = self._cache[text] = tuple(self.tokenizer.encode(text))
        return ids

    def encode_lists(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """(input_ids, shifted labels) as lists. Raises ValueError if the template hides a message."""
        ids, supervised = self.encode_supervised(messages)
        return ids, shift_labels(ids, supervised)

    def encode_supervised(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                          cache: bool = True) -> tuple[list[int], list[bool]]:
        """(input ids, supervised flag per token). Raises ValueError if the template hides a message."""
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
                pieces += [(text[piece_start:at], False), (content, True)]
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
            if after_answer and not is_answer and self.eos_token_id in piece_ids:
                end = piece_ids.index(self.eos_token_id)  # the end-of-turn token: the model must learn to stop
                mask[:end + 1] = [True] * (end + 1)
            after_answer = is_answer
            ids.extend(piece_ids)
            supervised.extend(mask)
        return ids, supervised


def shift_labels(input_ids: Sequence[int], supervised: Sequence[bool]) -> list[int]:
    """The one place labels are shifted: labels[t] = input_ids[t + 1] if supervised, else IGNORE_INDEX."""
    labels = [nxt if sup else IGNORE_INDEX for nxt, sup in zip(input_ids[1:], supervised[1:])]
    labels.append(IGNORE_INDEX)
    return labels[:len(input_ids)]


def share_prefix(encodings: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int], list[int]]:
    """Several (input_ids, labels) with a common prompt -> one (input_ids, labels, position_ids): the common
    unsupervised prefix once, then each rest, its positions restarting where the prefix ends."""
    first_ids = encodings[0][0]
    shared = min(len(ids) for ids, _ in encodings)
    for ids, labels in encodings:
        supervised = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        shared = min(shared, supervised[0] if supervised else len(ids))
        shared = next((t for t in range(shared) if ids[t] != first_ids[t]), shared)
    out_ids, out_labels, positions = list(first_ids[:shared]), list(encodings[0][1][:shared]), list(range(shared))
    for ids, labels in encodings:
        out_ids.extend(ids[shared:])
        out_labels.extend(labels[shared:])
        positions.extend(range(shared, len(ids)))
    return out_ids, out_labels, positions


class RenderError(ValueError):
    """A chat that cannot be laid out as a prompt; `reason` names the fault, as data skips do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class RenderedChat:
    """labels are shifted; tiles in their image tokens' order; position_ids: see `share_prefix`, or None."""

    input_ids: list[int]
    labels: list[int]
    tiles: torch.Tensor
    grids: list[tuple[int, int]] = field(default_factory=list)
    position_ids: list[int] | None = None


class ChatRenderer:
    """Messages (+ images) -> `RenderedChat`, the one place a prompt is laid out: each image's string
    where it stands in a part list (images that only follow the text go before it, as training put
    them), at its `<image>` placeholder, or else before the first user message. An inference prompt
    is, token for token, the start of the same question's sample."""

    def __init__(self, tokenizer: Any, cfg: Any, image_processor: ImageProcessor | None = None):
        self.tokenizer, self.mp, self.tile, self.layout = tokenizer, cfg.mp_image_token_length, cfg.vit_img_size, \
            cfg.vlm_image_layout
        self.interleaved = cfg.vlm_extra_tokens_in_vocab  # a SmolVLM tokenizer: trained on interleaved images
        self.image_processor = image_processor if image_processor is not None else image_processor_for(cfg)
        self.encoder = ChatEncoder(tokenizer, image_pattern=image_string_pattern(self.layout, tokenizer))
        self._image_strings: dict[tuple, list[str]] = {}

    @staticmethod
    def check_images(messages: Sequence[dict[str, Any]], n_images: int, placeholders_required: bool = False) -> int:
        """How many places the messages mark for images; a RenderError where `n_images` do not fit."""
        n_slots = 0
        for m in messages:
            content = m["content"]
            k = content.count(IMAGE_PLACEHOLDER) if isinstance(content, str) else \
                sum(not isinstance(part, str) for part in content)
            if k and m["role"] == "assistant":
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
        tiles, grids = [torch.zeros(0, 3, self.tile, self.tile)], []
        for k, image in enumerate(images):
            image = image if isinstance(image, Image.Image) else load_image(image)
            try:
                t, grid = self.image_processor(image)
            except Exception as e:  # the picture's own fault (a shape the processor cannot tile)
                raise RenderError("bad_image", f"image {k + 1} cannot be processed ({e}).") from e
            tiles.append(t)
            grids.append(grid)
        return torch.cat(tiles), grids

    def image_strings(self, grids: Sequence[tuple[int, int]]) -> list[str]:
        """Each image's string with its `<image: k>` tag, built once per tuple of grids."""
        key = tuple(map(tuple, grids))
        strings = self._image_strings.get(key)
        if strings is None:
            strings = ([idefics3_image_tokens(self.tokenizer, g, self.mp) for g in key] if self.layout == "idefics3"
                       else _tagged_image_strings(self.tokenizer, key, self.mp))  # Idefics3Processor tags no image
            if len(self._image_strings) < 1024:  # a few grids recur (one per image shape); don't hoard the rest
                self._image_strings[key] = strings
        return strings

    def place_images(self, messages: Sequence[dict[str, Any]], grids: Sequence[tuple[int, int]],
                     placeholders_required: bool = False) -> list[dict[str, str]]:
        n_slots = self.check_images(messages, len(grids), placeholders_required)
        strings = self.image_strings(grids) if grids else []
        out, pending, placed = [], iter(strings), not strings or n_slots
        for m in messages:
            content = m["content"]
            if n_slots and isinstance(content, str):
                # LLaVA's "<image>\nQ": the one line break after a placeholder only lays it out.
                pieces = content.split(IMAGE_PLACEHOLDER)
                content = pieces[0] + "".join(next(pending) + re.sub(r"^\r?\n", "", p) for p in pieces[1:])
            elif not isinstance(content, str):
                is_text = [isinstance(p, str) for p in content]
                # Images after all the text (OpenAI's example) go where training put unmarked ones.
                if not self.interleaved and is_text == sorted(is_text, reverse=True):
                    content = sorted(content, key=lambda p: isinstance(p, str))
                content = "".join(p if isinstance(p, str) else next(pending) for p in content)
            if not placed and m["role"] == "user":  # no marked places: the images go before the first question
                content, placed = "".join(strings) + content, True
            out.append({"role": m["role"], "content": content})
        if not placed:
            raise RenderError("image_placeholder_mismatch", "the sample has images but no user turn to hold them.")
        return out

    def _branches(self, messages: list[dict[str, str]]) -> list[list[dict[str, str]]] | None:
        roles = [m["role"] for m in messages]
        if len(messages) < 4 or roles != ["user", "assistant"] * (len(messages) // 2):
            return None
        image_token, first = self.tokenizer.image_token, messages[0]["content"]
        end = first.rfind(image_token)
        if end < 0 or any(image_token in m["content"] for m in messages[1:]):
            return None
        end += len(image_token) + (len(self.tokenizer.fake_image_token) if self.layout == "idefics3" else 0)
        questions = [first] + [first[:end] + m["content"] for m in messages[2::2]]  # each after the images
        return [[{"role": "user", "content": q}, a] for q, a in zip(questions, messages[1::2])]

    def lay_out(self, messages: Sequence[dict[str, Any]], tiles: torch.Tensor, grids: Sequence[tuple[int, int]], *,
                placeholders_required: bool = False, add_generation_prompt: bool = False,
                independent_turns: bool = False) -> RenderedChat:
        """Messages and their processed images -> RenderedChat; `independent_turns`: see `share_prefix`."""
        placed, positions = self.place_images(messages, grids, placeholders_required), None
        try:
            branches = self._branches(placed) if independent_turns else None
            if branches is not None:
                ids, labels, positions = share_prefix([self.encoder.encode_lists(b) for b in branches])
            else:
                ids, supervised = self.encoder.encode_supervised(placed, add_generation_prompt,
                                                                 cache=not add_generation_prompt)
                labels = [IGNORE_INDEX] * len(ids) if add_generation_prompt else shift_labels(ids, supervised)
        except ValueError as e:
            raise RenderError("chat_template", str(e)) from e
        n, n_tiles = ids.count(self.tokenizer.image_token_id), tiles.shape[0]
        if n != n_tiles * self.mp:  # the text held the reserved image token
            raise RenderError("image_token_mismatch",
                              f"the prompt holds {n} image tokens where {n_tiles} tile(s) x {self.mp} were expected; "
                              f"remove the reserved image token {self.tokenizer.image_token!r} from the text.")
        return RenderedChat(ids, labels, tiles, list(grids), positions)

    def render(self, messages: Sequence[dict[str, Any]], images: Sequence[Any] = (), *,
               placeholders_required: bool = False, add_generation_prompt: bool = False,
               independent_turns: bool = False) -> RenderedChat:
        inline = [p for m in messages if not isinstance(m["content"], str) for p in m["content"]
                  if not isinstance(p, str)]
        if inline and len(images):
            raise RenderError("image_placeholder_mismatch", "give a chat's images either inside its messages' "
                                                            "content lists or as the images argument, not both.")
        images = inline or list(images)
        self.check_images(messages, len(images), placeholders_required)  # before any pixel is touched
        tiles, grids = self.process_images(images)
        return self.lay_out(messages, tiles, grids, placeholders_required=placeholders_required,
                            add_generation_prompt=add_generation_prompt, independent_turns=independent_turns)
