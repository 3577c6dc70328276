"""`image_shift`: training tiles move by a few pixels, the same way on a resumed run."""

from __future__ import annotations

import pytest
import torch
from test_train_checkpoint import assert_resumes_like
from test_train_synthetic import losses, run_synthetic

from nanovlm.config import ConfigError, TrainConfig
from nanovlm.data.augment import shift_batch_images, shift_pixels, shift_tiles


def _moved(tile: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`tile` (C, H, W) moved so that output pixel (y, x) is input (y + dy, x + dx), edges repeated."""
    H, W = tile.shape[-2:]
    return tile[:, (torch.arange(H) + dy).clamp(0, H - 1)][:, :, (torch.arange(W) + dx).clamp(0, W - 1)]


def test_shifted_tiles_keep_their_pixels_and_fill_the_border_with_the_edge():
    tiles = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    seen = set()
    for seed in range(20):
        out = shift_tiles(tiles, 2, torch.Generator().manual_seed(seed))
        assert out.shape == tiles.shape and out.dtype == torch.uint8
        for k in range(2):
            match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out[k], _moved(tiles[k], dy, dx))]
            assert len(match) == 1, (seed, k)
            seen.add(match[0])
    assert len(seen) > 10  # offsets vary, both signs on both axes
    assert torch.equal(shift_tiles(tiles, 2, torch.Generator().manual_seed(3)),
                       shift_tiles(tiles, 2, torch.Generator().manual_seed(3)))
    assert shift_tiles(tiles, 0, torch.Generator()) is tiles


def test_a_batch_has_every_image_tensor_shifted_and_nothing_else_changed():
    images = [torch.rand(1, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    batch = {"input_ids": torch.ones(2, 4), "images": images}
    out = shift_batch_images(batch, 0.1, torch.Generator().manual_seed(0))
    assert out["input_ids"] is batch["input_ids"] and batch["images"] is images  # the input is left alone
    assert [t.shape for t in out["images"]] == [t.shape for t in images]
    assert shift_pixels(32, 0.1) == 3 and shift_pixels(64, 0.05) == 3 and shift_pixels(64, 0.0) == 0
    for t, o in zip(images, out["images"]):
        for k in range(t.shape[0]):
            assert any(torch.equal(o[k], _moved(t[k], dy, dx)) for dy in range(-3, 4) for dx in range(-3, 4))
    assert shift_batch_images(batch, 0.0, torch.Generator()) is batch


def test_a_bad_image_shift_is_one_sentence():
    with pytest.raises(ConfigError, match=r"image_shift must be in \[0, 0.5\) \(a share of the tile's side\), got 0.7."):
        TrainConfig(image_shift=0.7)


def test_a_run_with_shifted_images_resumes_exactly(tmp_path):
    settings = dict(max_training_steps=4, save_interval=2, image_shift=0.2)
    whole = run_synthetic(tmp_path / "whole", **settings)
    run_synthetic(tmp_path / "plain", max_training_steps=4, save_interval=2)
    assert losses(tmp_path / "whole") != losses(tmp_path / "plain")  # the shift reached the model
    assert whole["steps"] == 4
    assert_resumes_like(tmp_path / "whole", tmp_path / "broken", settings, dies_after=3, resumed_at="step_000002")
