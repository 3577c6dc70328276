"""The image size a run from scratch trains at, fitted to its pictures.

One tile is enough for pictures whose detail survives being shrunk to it (a shape, a colour), not
for small letters. Shrink a picture to one tile, grow it back, and count the strongly contrasted
pixels whose neighbourhood lost half its contrast: past `tolerance`, the run keeps the pictures'
own long side in whole tiles (nanoVLM's tiles plus a global view), at most `max_tiles` a side.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable

import numpy as np
from PIL import Image, ImageFilter

from nanovlm.data.images import ImageError, load_image
from nanovlm.data.records import SampleError, open_records, record_to_chat

STRONG = 64  # grey levels between a 3x3 neighbourhood's darkest and brightest pixel


def _contrast(image: Image.Image, k: int) -> np.ndarray:
    """Each pixel's k x k neighbourhood: brightest minus darkest grey level."""
    high = np.asarray(image.filter(ImageFilter.MaxFilter(k)), dtype=np.int16)
    low = np.asarray(image.filter(ImageFilter.MinFilter(k)), dtype=np.int16)
    return high - low


def detail_lost(image: Image.Image, side: int) -> float:
    """Share of the strongly contrasted pixels whose contrast halves with the long side at `side` pixels."""
    grey = image.convert("L")
    if max(grey.size) > 4 * side:  # finer detail than 4 tiles' worth never decides the choice
        grey.thumbnail((4 * side, 4 * side), Image.BOX)
    w, h = grey.size
    scale = side / max(w, h)
    if scale >= 1:
        return 0.0
    small = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX)
    back = small.resize((w, h), Image.BILINEAR)
    before = _contrast(grey, 3)
    after = _contrast(back, 2 * math.ceil(1 / scale) + 1)  # the blur of shrinking spreads an edge this far
    strong = before >= STRONG
    return float((strong & (2 * after < before)).sum() / max(int(strong.sum()), 1))


def fit_image_size(images: Iterable[Image.Image], tile: int, max_tiles: int = 3,
                   tolerance: float = 0.10) -> tuple[int, str]:
    """(max_img_size, one line saying what was chosen and why) for these training pictures."""
    images = list(images)
    if not images:
        return tile, f"no training picture to look at -> one {tile} px tile"
    width = int(statistics.median(im.size[0] for im in images))
    height = int(statistics.median(im.size[1] for im in images))
    seen = f"images {width}x{height} (median of {len(images)})"
    if max(width, height) <= tile:
        return tile, f"{seen} -> one {tile} px tile"
    lost = statistics.fmean(detail_lost(im, tile) for im in images)
    if lost <= tolerance:
        return tile, f"{seen} -> one {tile} px tile ({lost:.0%} of fine detail lost at that size)"
    n = min(max_tiles, math.ceil(max(width, height) / tile))
    cols = min(n, math.ceil(width * n * tile / max(width, height) / tile))
    rows = min(n, math.ceil(height * n * tile / max(width, height) / tile))
    return n * tile, (f"{seen} -> {cols}x{rows} tiles of {tile} px + a global view ({lost:.0%} of fine detail "
                      f"lost at one tile; max_img_size={n * tile})")


def fit_to_data(data: str, image_folder: str | None, tile: int, n: int = 48) -> tuple[int, str]:
    """`fit_image_size` over the first picture of up to `n` training records spread over `data`."""
    records = open_records(data, "train", image_folder)
    images: list[Image.Image] = []
    for i in range(0, len(records), max(1, len(records) // n)):
        try:
            sources = record_to_chat(records[i])[0]
            images += [load_image(sources[0], base_dir=records.base_dir)] if sources else []
        except (SampleError, ImageError):  # counted where training reads them
            continue
        if len(images) >= n:
            break
    return fit_image_size(images, tile)
