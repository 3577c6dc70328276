"""The image size fitted to the pictures: one tile for what survives it, whole tiles for small print."""

import easy_vqa
import shapes_data
from PIL import Image

from nanovlm.data.resolution import detail_lost, fit_image_size


def _drawn(kinds, n=24, size=96):
    return [img for _, img, _ in shapes_data.records(n, kinds, seed=3, size=size)]


def test_pictures_no_larger_than_a_tile_keep_one_tile():
    images = [Image.open(p) for p in list(easy_vqa.get_train_image_paths().values())[:24]]
    size, line = fit_image_size(images, tile=64)
    assert size == 64 and "images 64x64" in line and "one 64 px tile" in line


def test_shapes_and_large_print_shrink_to_one_tile():
    for kinds in (["count", "position", "colour"], ["count", "position", "size", "pattern", "colour"], ["read"]):
        size, line = fit_image_size(_drawn(kinds), tile=64)
        assert size == 64, (kinds, line)


def test_small_letters_keep_their_own_size_in_tiles():
    size, line = fit_image_size(_drawn(["tallest", "bars"]), tile=64)
    assert size == 192 and "images 160x100" in line and "3x2 tiles of 64 px + a global view" in line, line
    size, _ = fit_image_size(_drawn(["cell"]), tile=64)
    assert size == 192


def test_tiles_are_capped():
    size, _ = fit_image_size(_drawn(["tallest"]), tile=64, max_tiles=2)
    assert size == 128


def test_detail_lost_is_zero_without_shrinking():
    img = _drawn(["read"], n=1)[0]
    assert detail_lost(img, 128) == 0.0 and 0.0 < detail_lost(img, 32) <= 1.0
