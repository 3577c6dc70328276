"""The vision transformer: the VLM's eye.

Mirrors the nanoVLM tutorial (chapter 2) and the SigLIP vision tower (transformers'
`SiglipVisionModel`): a patch embedding with learned positions and an optional CLS token,
pre-LN blocks of fused-qkv multi-head attention (`nanovlm.models.attention`) and a GELU MLP
(the tanh approximation as in SigLIP, or the exact one), then a final LayerNorm. Module and
parameter names are those of the original nanoVLM so its checkpoints load unchanged.

The patch embedding is a conv with kernel = stride = patch size in its parameters (`conv`,
(C, 3, patch, patch), so SigLIP and nanoVLM weights load as they are) and one matmul of the
flattened patches in its forward: the same numbers, faster to train on CPUs than the conv kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VIT_ACTIVATIONS, VLMConfig
from nanovlm.models.attention import attention


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.img_size = cfg.vit_img_size
        self.patch_size = cfg.vit_patch_size
        self.num_patches = cfg.vit_grid**2
        self.cls_flag = cfg.vit_cls_flag
        self.embd_dim = cfg.vit_hidden_dim
        # Kernel = stride = patch size: each patch projected once. Its parameters, not its forward, are used.
        self.conv = nn.Conv2d(3, self.embd_dim, kernel_size=self.patch_size, stride=self.patch_size,
                              padding="valid")
        if self.cls_flag:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embd_dim))
        self.position_embedding = nn.Parameter(torch.rand(1, self.num_patches + int(self.cls_flag), self.embd_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT expects images of {self.img_size}x{self.img_size} pixels, "
                             f"got {tuple(x.shape[-2:])}; resize them with the image processor.")
        # The conv as one matmul: patches flattened in the (channel, row, column) order of the
        # conv's weight, times that weight flattened (module docstring).
        B, g, p = x.shape[0], self.img_size // self.patch_size, self.patch_size
        patches = x.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, p, p)
        patches = patches.reshape(B, g * g, 3 * p * p)  # (B, num_patches, 3 * p * p)
        x = F.linear(patches, self.conv.weight.view(self.embd_dim, -1), self.conv.bias)  # (B, num_patches, C)
        if self.cls_flag:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + num_patches, C)
        return x + self.position_embedding


class ViTMultiHeadAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.embd_dim = cfg.vit_hidden_dim
        self.head_dim = self.embd_dim // self.n_heads
        self.dropout = cfg.vit_dropout
        self.qkv_proj = nn.Linear(self.embd_dim, 3 * self.embd_dim, bias=True)
        self.out_proj = nn.Linear(self.embd_dim, self.embd_dim, bias=True)
        self.resid_dropout = nn.Dropout(self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, n_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n_heads, T, head_dim)
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class ViTMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)
        self.approximate = VIT_ACTIVATIONS[cfg.vit_hidden_act]
        self.dropout = nn.Dropout(cfg.vit_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate=self.approximate)))


class ViTBlock(nn.Module):
    """Pre-LN transformer encoder block."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTMultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = ViTPatchEmbeddings(cfg)
        self.cls_flag = cfg.vit_cls_flag
        self.dropout = nn.Dropout(cfg.vit_dropout)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ViTPatchEmbeddings):
            nn.init.normal_(module.position_embedding, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, vit_hidden_dim), or (B, vit_hidden_dim) with vit_cls_flag."""
        x = self.dropout(self.patch_embedding(x))
        for block in self.blocks:
            x = block(x)
        if self.cls_flag:
            return self.layer_norm(x[:, 0])
        return self.layer_norm(x)

    @classmethod
    def from_pretrained(cls, cfg: VLMConfig) -> "ViT":
        """Load SigLIP / SigLIP2 vision weights named by `cfg.vit_model_type` (a local
        transformers directory, or a hub id when online). The architecture fields of `cfg`
        must match the checkpoint; position embeddings are resized when `vit_img_size` differs."""
        from nanovlm.weights.hf_siglip import load_siglip_vision

        return load_siglip_vision(cls, cfg)
