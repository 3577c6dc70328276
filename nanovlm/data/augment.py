"""Training-time image augmentation that keeps the answers true: each tile shifted a few pixels.

A shift (the border filled with edge pixels) changes every patch the encoder sees, not what the
picture shows; flips, crops and colour jitter would change "left of", "how many" or "what colour"
answers. Offsets come from the seed, the epoch and the sample's index alone, so any number of
processes, and a resumed run, draw the same ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def shift_pixels(side: int, share: float) -> int:
    """The largest offset, in pixels, of a `share` of a tile's `side` (0 for none)."""
    return int(round(share * side))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's offsets in one epoch (never the global one)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63)


def shift_tiles(tiles: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each tile of (n, C, S, S) moved by its own random offset in [-max_shift, max_shift] per axis."""
    if max_shift <= 0 or tiles.shape[0] == 0:
        return tiles
    n, _, H, W = tiles.shape
    padded = F.pad(tiles.float(), (max_shift,) * 4, mode="replicate").to(tiles.dtype)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[k, :, dy:dy + H, dx:dx + W] for k, (dy, dx) in enumerate(offsets)])


class ShiftedSamples(Dataset):
    """`dataset[indices[k]]` with its tiles shifted by up to `share` of their side."""

    def __init__(self, dataset, indices, share: float, seed: int, sampler):
        self.dataset, self.indices, self.share, self.seed, self.sampler = dataset, list(indices), share, seed, sampler

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        index = self.indices[k]
        sample = self.dataset[index]
        tiles = sample.get("images")
        if not isinstance(tiles, torch.Tensor) or tiles.numel() == 0:
            return sample
        moved = shift_tiles(tiles, shift_pixels(tiles.shape[-1], self.share),
                            sample_generator(self.seed, self.sampler.epoch, index))
        return {**sample, "images": moved}
