"""The image size fitted to the pictures: one tile for what survives it, whole tiles for small print."""

import json

import easy_vqa
import shapes_data
from PIL import Image

from nanovlm.cli import main
from nanovlm.data.resolution import detail_lost, fit_image_size
from nanovlm.models.vision_language_model import VisionLanguageModel


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


def _train_tiled(tmp_path, name, budget, capsys):
    """A tiny run on pictures that need tiles, the size left to the pictures and the machine."""
    data = tmp_path / "charts.jsonl"
    if not data.exists():
        shapes_data.write_llava(str(data), 24, ["tallest", "bars"], seed=5)
    out = tmp_path / name
    assert main(["train", "--preset", "tiny", "--out", str(out), f"data={data}", "max_img_size=0",
                 f"max_train_time={budget}", "max_training_steps=2", "val_size=4", "eval_interval=0"]) == 0
    said = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["model"]["max_img_size"]
    final = VisionLanguageModel.from_pretrained(str(out / "final")).cfg.max_img_size
    return said, saved, final


def test_tiles_drop_to_one_where_the_plan_does_not_fit_the_budget(tmp_path, capsys):
    said, saved, final = _train_tiled(tmp_path, "roomy", 10 ** 6, capsys)
    assert "3x2 tiles of 32 px" in said and "and fit the 1000000.0 s budget" in said, said
    assert saved == final == 96
    said, saved, final = _train_tiled(tmp_path, "tight", 0.001, capsys)
    assert "do not fit the 0.0 s budget; one 32 px tile instead" in said, said
    assert saved == final == 32
