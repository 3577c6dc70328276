"""The modality projector: ViT patch features -> language-model embeddings.

Pixel shuffle (space-to-depth, as in Idefics3 / SmolVLM) folds each `s x s` neighbourhood of
patches into one token with `s^2` times the channels, cutting the token count by `s^2`; a
bias-free linear layer then maps to the language model's width. The feature ordering of the
shuffle is the original nanoVLM's, so its `MP.proj.weight` keeps its meaning.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanovlm.config import VLMConfig


class ModalityProjector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.input_dim = cfg.vit_hidden_dim * self.scale_factor**2
        self.output_dim = cfg.lm_hidden_dim
        self.proj = nn.Linear(self.input_dim, self.output_dim, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        side = int(round(N**0.5))
        s = self.scale_factor
        if side * side != N or side % s:
            raise ValueError(f"pixel shuffle needs a square patch grid divisible by {s}, got {N} patches.")
        x = x.view(B, side // s, s, side // s, s, C)  # (B, h_out, s, w_out, s, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h_out, w_out, s, s, C)
        return x.reshape(B, (side // s) ** 2, C * s * s)  # (B, N / s^2, C * s^2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pixel_shuffle(x))
