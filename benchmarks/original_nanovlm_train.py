"""The original nanoVLM's training step, rewritten small from its public code (for measurement only).

Read from github.com/huggingface/nanoVLM (`models/*.py`, `train.py`, HEAD of 2025-11) and written
anew, not copied: the same model math and the same step, nothing else (no loading, no generation,
no tokenizer). What it keeps because it costs time:

- ViT: the patch embedding as a strided conv; fused qkv; `F.scaled_dot_product_attention`;
  tanh GELU; LayerNorm.
- Projector: pixel shuffle with a `.contiguous()` copy, a bias-free linear layer.
- Language model: RMSNorm in the input's dtype; rotary tables recomputed from the positions at
  every forward (with a `max()` read on the host); grouped heads expanded with
  `repeat_interleave`; an additive fp32 padding mask from the attention mask; SDPA with
  `is_causal`; a SwiGLU MLP; the head tied to the token embedding.
- The VLM: image features written over the image tokens by boolean-mask assignment into a
  clone of the embeddings; the head over every position, `F.cross_entropy` with
  `ignore_index=-100` over the whole (B * T, vocab) logits.
- The step (train.py): bf16 autocast on CPU (or none, for fp32), backward, `clip_grad_norm_`,
  the learning rates written into the groups, `torch.optim.AdamW(param_groups)` with its
  defaults, `zero_grad()`, then `loss.item()` and the token count read back.

Shapes come from a `nanovlm.VLMConfig` (the same fields), so both sides build the same model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init_normal(module: nn.Module) -> None:
    """The original's init: N(0, 0.02) for linear, conv and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- vision
class OriginalViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.vit_hidden_dim
        self.n_heads = cfg.vit_n_heads
        self.ln1 = nn.LayerNorm(C, eps=cfg.vit_ln_eps)
        self.qkv_proj = nn.Linear(C, 3 * C)
        self.out_proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C, eps=cfg.vit_ln_eps)
        self.fc1 = nn.Linear(C, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_proj(self.ln1(x)).split(C, dim=2)
        heads = lambda t: t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=False)  # (B, n_heads, T, head_dim)
        x = x + self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class OriginalViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, p = cfg.vit_hidden_dim, cfg.vit_patch_size
        self.conv = nn.Conv2d(3, C, kernel_size=p, stride=p, padding="valid")
        self.position_embedding = nn.Parameter(torch.rand(1, (cfg.vit_img_size // p) ** 2, C))
        self.blocks = nn.ModuleList([OriginalViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = nn.LayerNorm(C, eps=cfg.vit_ln_eps)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).flatten(2).transpose(1, 2) + self.position_embedding  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x)


class OriginalProjector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.s = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.s**2, cfg.lm_hidden_dim, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        side, s = int(N**0.5), self.s
        x = x.view(B, side // s, s, side // s, s, C).permute(0, 1, 3, 2, 4, 5).contiguous()  # (B, h, w, s, s, C)
        return self.proj(x.reshape(B, (side // s) ** 2, C * s * s))


# ----------------------------------------------------------------------------- language
class OriginalRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class OriginalLMBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.n_heads, self.n_kv = cfg.lm_hidden_dim, cfg.lm_n_heads, cfg.lm_n_kv_heads
        self.head_dim = C // self.n_heads
        self.norm1 = OriginalRMSNorm(C, cfg.lm_rms_eps)
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.out_proj = nn.Linear(C, C, bias=False)
        self.norm2 = OriginalRMSNorm(C, cfg.lm_rms_eps)
        self.gate_proj = nn.Linear(C, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(C, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, C, bias=False)

    def forward(self, x, cos, sin, attention_mask):
        B, T, C = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, n_heads, T, head_dim)
        additive = None
        if attention_mask is not None:
            additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(q.dtype).min  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, is_causal=T > 1)
        x = x + self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class OriginalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.register_buffer("inv_freq", 1.0 / (cfg.lm_re_base ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        self.max_positions = cfg.lm_max_position_embeddings
        self.blocks = nn.ModuleList([OriginalLMBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = OriginalRMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(_init_normal)

    @torch.no_grad()
    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        longest = positions.max() + 1  # a host read, as in the original
        if longest > self.max_positions:
            inv_freq = inv_freq / (longest / self.max_positions)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = self.rotary(torch.arange(T, device=x.device).expand(B, T))
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask)
        return self.norm(x)


class OriginalVLM(nn.Module):
    """ViT -> projector -> language model, the original's forward with targets."""

    def __init__(self, cfg, image_token_id: int):
        super().__init__()
        self.vision_encoder = OriginalViT(cfg)
        self.MP = OriginalProjector(cfg)
        self.decoder = OriginalLM(cfg)
        self.image_token_id = image_token_id

    def forward(self, input_ids, images: list, attention_mask, targets):
        if images and isinstance(images[0], list):  # one list of image tensors per sample
            images = [img for sample in images for img in sample]
        pixels = torch.cat(images, dim=0)  # (n_images, 3, H, W)
        embeddings = self.decoder.token_embedding(input_ids)  # (B, T, C)
        features = self.MP(self.vision_encoder(pixels))  # (n_images, tokens per image, C)
        embeddings = embeddings.clone()
        embeddings[input_ids == self.image_token_id] = features.view(-1, features.shape[-1]).to(embeddings.dtype)
        logits = self.decoder.head(self.decoder(embeddings, attention_mask))  # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def original_optimizer(model: OriginalVLM, lr_mp: float = 2e-3, lr_backbones: float = 5e-5) -> torch.optim.AdamW:
    """train.py's groups (projector, vision, language) with torch's AdamW defaults otherwise."""
    groups = [{"params": list(model.MP.parameters()), "lr": lr_mp},
              {"params": list(model.vision_encoder.parameters()), "lr": lr_backbones},
              {"params": list(model.decoder.parameters()), "lr": lr_backbones}]
    return torch.optim.AdamW(groups)


def _cosine_lr(step: int, max_lr: float, max_steps: int) -> float:
    """train.py's get_lr: 3% linear warm-up, then cosine to 10% of the peak."""
    warmup = max_steps * 0.03
    if step < warmup:
        return max_lr * (step + 1) / warmup
    ratio = min(1.0, (step - warmup) / max(1.0, max_steps - warmup))
    return 0.1 * max_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - 0.1 * max_lr)


def original_train_step(model: OriginalVLM, optimizer: torch.optim.AdamW, batch: dict, bf16: bool,
                        step: int = 100, max_steps: int = 1000, max_grad_norm: float = 1.0) -> float:
    """One update as train.py makes it with gradient_accumulation_steps=1; returns the loss."""
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm=max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = _cosine_lr(step, g.setdefault("peak_lr", g["lr"]), max_steps)
    optimizer.step()
    optimizer.zero_grad()
    value = loss.item()
    int(torch.sum(batch["attention_mask"]).item())  # train.py counts tokens from the mask each step
    return value
