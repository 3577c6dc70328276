"""Processors: the tokenizer, the image processor, the image prompt string, and the encoder
that turns a chat into input ids and (shifted) labels.

The image rules are the original nanoVLM's (`data/custom_transforms.py`): the long side goes
to `max_img_size` (or up to the next tile multiple when smaller), the short side keeps the
aspect ratio rounded UP to whole tiles, bicubic resampling; the picture is cut row-major into
`vit_img_size` tiles, and when there is more than one tile a global view (the whole picture at
one tile's size) goes first. Unlike the original, the grid is capped at the number of
`<row_i_col_j>` tokens (8x8) by shrinking the picture, so the prompt can always name every tile.
PIL + torch only.

The prompt layout per image is the original's too: `<image: k>` (only when a sample has
several images), `<|global_image|>` + image tokens, then `<row_i_col_j>` + image tokens per
tile when the grid is larger than 1x1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from nanovlm.config import CHATML_TEMPLATE, IGNORE_INDEX
from nanovlm.data.images import to_rgb
from nanovlm.data.tokenizer import get_tokenizer  # noqa: F401  (re-exported: the public import path)

MAX_GRID = 8  # the default extra tokens name tiles <row_1_col_1> .. <row_8_col_8>


class ImageProcessor:
    """`proc(pil_image) -> (tiles, (n_rows, n_cols))`, tiles float (n_tiles, 3, S, S) in [0, 1]
    (the model normalises them: `VisionLanguageModel.encode_images`).

    A class rather than a closure so that DataLoader worker processes can pickle it.
    """

    def __init__(self, max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                 max_grid: int = MAX_GRID):
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

    def tiles_uint8(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tiles as uint8 (n_tiles, 3, S, S): what the easy-VQA cache stores."""
        image = to_rgb(image)
        t = self.tile
        w, h = self.target_size(*image.size)
        resized = image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)
        x = _to_uint8_chw(resized)  # (3, H, W)
        n_rows, n_cols = h // t, w // t
        tiles = (x.view(3, n_rows, t, n_cols, t)
                  .permute(1, 3, 0, 2, 4)  # (n_rows, n_cols, 3, t, t), row-major
                  .reshape(n_rows * n_cols, 3, t, t))
        if n_rows * n_cols > 1:
            whole = image if image.size == (t, t) else image.resize((t, t), Image.BICUBIC)
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


def n_tiles(grid: tuple[int, int]) -> int:
    """Tiles an image of this grid becomes: the grid, plus the global view when larger than 1x1."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


def get_image_processor(max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                        max_grid: int = MAX_GRID) -> ImageProcessor:
    """The image processor of the original nanoVLM; see `ImageProcessor`."""
    return ImageProcessor(max_img_size, splitted_image_size, resize_to_max_side_len, max_grid)


def image_processor_for(cfg) -> ImageProcessor:
    """The processor a VLMConfig implies, with the grid capped by its row/col tokens."""
    return get_image_processor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len,
                               max_grid=grid_limit(cfg.vlm_extra_tokens))


def grid_limit(extra_tokens: dict[str, str]) -> int:
    """The largest n such that every r{i}c{j} token for i, j <= n exists."""
    n = 0
    while all(f"r{i}c{j}" in extra_tokens for i in range(1, n + 2) for j in range(1, n + 2)):
        n += 1
    return n


def get_image_string(tokenizer: Any, splitted_image_counts: Sequence[tuple[int, int]],
                     mp_image_token_length: int) -> str:
    """The prompt text that holds the image tokens of one sample's images, in order."""
    parts: list[str] = []
    several = len(splitted_image_counts) > 1
    for k, (rows, cols) in enumerate(splitted_image_counts):
        if several:
            parts.append(f"<image: {k}>")
        # Tokenizers without a global-image token (older checkpoints) start with the image tokens.
        parts.append(getattr(tokenizer, "global_image_token", "") + tokenizer.image_token * mp_image_token_length)
        if rows * cols == 1:
            continue  # the single tile is the global view
        for i in range(rows):
            for j in range(cols):
                tag = getattr(tokenizer, f"r{i + 1}c{j + 1}", None)
                if tag is None:
                    raise ValueError(f"a {rows}x{cols} grid needs the token r{i + 1}c{j + 1}, which the tokenizer "
                                     "lacks; lower max_img_size or add row/col tokens to vlm_extra_tokens.")
                parts.append(tag + tokenizer.image_token * mp_image_token_length)
    return "".join(parts)


def encode_prompt(tokenizer: Any, vlm_cfg: Any, images: Sequence[Any], question: str,
                  image_processor: ImageProcessor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference input for one question, laid out exactly as training lays out a sample:
    (input_ids (T,) ending with the assistant prompt, tiles (n_tiles, 3, S, S)).

    images: PIL images, paths or bytes (see `load_image`). Their image string goes in front of
    the question, or in place of `<image>` placeholders when the question has one per image.
    """
    from nanovlm.data.images import load_image

    proc = image_processor or image_processor_for(vlm_cfg)
    tiles, grids = [], []
    for source in images:
        t, grid = proc(load_image(source))
        tiles.append(t)
        grids.append(grid)
    mp = vlm_cfg.mp_image_token_length
    if grids and question.count("<image>") == len(grids):
        parts = question.split("<image>")
        several = len(grids) > 1
        question = parts[0] + "".join((f"<image: {k}>" if several else "") + get_image_string(tokenizer, [g], mp) + p
                                      for k, (g, p) in enumerate(zip(grids, parts[1:])))
    elif grids:
        question = get_image_string(tokenizer, grids, mp) + question
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, vlm_cfg.vit_img_size, vlm_cfg.vit_img_size)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long), pixels


# ---------------------------------------------------------------------------- chat -> ids, labels
class ChatEncoder:
    """Messages -> (input_ids, labels), labels already shifted (labels[t] is the target at t).

    Supervised: each assistant message's content and the end-of-turn token that closes it
    (the first `eos_token_id` after it, `<|im_end|>` in ChatML). The chat is rendered once with
    the tokenizer's template; the text outside assistant content is tokenized in whole pieces
    (so prompts tokenize as at inference), assistant content on its own (as the model generates
    it after the `<|im_start|>assistant\\n` prompt). Piece encodings are cached, which makes
    encoding templated data such as easy-VQA nearly free.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 200_000):
        self.tokenizer = tokenizer
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
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            if self._render(probe) != tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False):
                self._template = None  # rendered differently: let the tokenizer do it every time

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_template"] = None  # compiled templates do not pickle; recompiled lazily
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__init__(self.tokenizer, self._cache_size)

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self._chatml:
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if self._template is None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        tok = self.tokenizer
        return self._template.render(messages=messages, add_generation_prompt=False,
                                     bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def _encode_piece(self, text: str) -> tuple[int, ...]:
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
        text = self._render(messages)
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
            piece_ids = self._encode_piece(piece)
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
        return ids, shift_labels(ids, supervised)


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
