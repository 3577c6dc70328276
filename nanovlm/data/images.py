"""Safe image loading: any source a dataset holds -> a decoded RGB image, or an `ImageError` whose
`reason` a dataset counts as a skip. Transparency goes on white and 16-bit / float images are
rescaled (PIL's convert clips them); the pixel cap is checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image cannot be used; `reason` is the skip-counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_image(source: Any, *, base_dir: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image, encoded bytes, a path (relative to `base_dir`) or a `{"bytes", "path"}` dict -> RGB."""
    if isinstance(source, Image.Image):
        _check_size(source, max_pixels, "image")
        try:
            source.load()
        except Exception as e:  # a lazily opened PIL image can still fail here
            raise ImageError("corrupt_image", f"the image cannot be decoded ({e}).") from e
        return to_rgb(source)
    if isinstance(source, dict):
        if not (source.get("bytes") or source.get("path")):
            raise ImageError("bad_image", "the image record has neither bytes nor a path.")
        return load_image(source.get("bytes") or source["path"], base_dir=base_dir, max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("corrupt_image", "the image bytes are empty.")
        return _decode(io.BytesIO(bytes(source)), "image bytes", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not path:
            raise ImageError("bad_image", "the image path is empty.")
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise ImageError("missing_image", f"image file {path} does not exist.")
        with open(path, "rb") as f:
            return _decode(f, path, max_pixels)
    raise ImageError("bad_image", f"an image must be a PIL image, bytes, a path or a {{bytes, path}} dict, "
                                  f"got {type(source).__name__}.")


def _decode(fp, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageError("image_too_large", f"{name} is a decompression bomb ({e}).") from e
        except Image.UnidentifiedImageError as e:
            raise ImageError("corrupt_image", f"{name} is not in an image format PIL can read.") from e
        except Exception as e:
            raise ImageError("corrupt_image", f"{name} is not a readable image ({e}).") from e
        _check_size(img, max_pixels, name)
        try:
            img.load()  # decode now, inside the try: a truncated file fails here
        except Exception as e:
            raise ImageError("corrupt_image", f"{name} is truncated or corrupt ({e}).") from e
    return to_rgb(img)


def _check_size(img: Image.Image, max_pixels: int, name: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError("corrupt_image", f"{name} has size {w}x{h}.")
    if max_pixels and w * h > max_pixels:
        raise ImageError("image_too_large", f"{name} has {w}x{h} = {w * h} pixels, more than the cap of "
                                            f"{max_pixels} (max_image_pixels).")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, keeping what the pixels mean."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except Exception as e:
        raise ImageError("corrupt_image", f"image mode {mode} cannot be converted to RGB ({e}).") from e


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit RGB by rescaling, not clipping."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0  # float images come as [0, 1] or [0, 255]
        a = np.nan_to_num(a) * scale
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
