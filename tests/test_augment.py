"""`image_shift`: training tiles move by a few pixels, drawn per sample from (seed, epoch, index):
the same on a resumed run and under any number of processes."""

from __future__ import annotations

import pytest
import torch
from test_train_checkpoint import assert_resumes_like
from test_train_synthetic import losses, run_synthetic

from nanovlm.config import ConfigError, TrainConfig
from nanovlm.data.augment import ShiftedSamples, shift_pixels, shift_tiles


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


class _Epoch:
    epoch = 0


def test_a_samples_offsets_come_from_the_seed_the_epoch_and_its_index_alone():
    images = [torch.rand(1 + i % 3, 3, 32, 32) for i in range(6)]
    data = [{"images": t, "input_ids": torch.ones(4)} for t in images] + [{"skip": "broken"}]
    sampler = _Epoch()
    every = ShiftedSamples(data, range(7), 0.1, seed=0, sampler=sampler)
    some = ShiftedSamples(data, [5, 2], 0.1, seed=0, sampler=sampler)  # another split, other neighbours
    assert shift_pixels(32, 0.1) == 3 and shift_pixels(64, 0.05) == 3 and shift_pixels(64, 0.0) == 0
    assert torch.equal(some[0]["images"], every[5]["images"]) and torch.equal(some[1]["images"], every[2]["images"])
    for k, t in enumerate(images):
        out = every[k]
        assert out["input_ids"] is data[k]["input_ids"] and data[k]["images"] is t  # the sample is left alone
        for a, b in zip(out["images"], t):
            assert any(torch.equal(a, _moved(b, dy, dx)) for dy in range(-3, 4) for dx in range(-3, 4))
    assert every[6] == {"skip": "broken"}
    first = [every[k]["images"] for k in range(6)]
    sampler.epoch = 1
    assert not all(torch.equal(a, every[k]["images"]) for k, a in enumerate(first))  # a new epoch, new offsets
    other_seed = ShiftedSamples(data, range(6), 0.1, seed=1, sampler=sampler)
    assert not all(torch.equal(other_seed[k]["images"], every[k]["images"]) for k in range(6))


def test_a_bad_image_shift_is_one_sentence():
    with pytest.raises(ConfigError, match=r"image_shift must be in \[0, 0.5\) \(a share of the tile's side\), got 0.7."):
        TrainConfig.from_dict({"image_shift": 0.7})


def test_a_run_with_shifted_images_resumes_exactly(tmp_path):
    settings = dict(max_training_steps=4, save_interval=2, image_shift=0.2)
    whole = run_synthetic(tmp_path / "whole", **settings)
    run_synthetic(tmp_path / "plain", max_training_steps=4, save_interval=2)
    assert losses(tmp_path / "whole") != losses(tmp_path / "plain")  # the shift reached the model
    assert whole["steps"] == 4
    assert_resumes_like(tmp_path / "whole", tmp_path / "broken", settings, dies_after=3, resumed_at="step_000002")
