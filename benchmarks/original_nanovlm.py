"""The original nanoVLM's decode, reimplemented for side-by-side timing (benchmarks/decode.py).

Written from reading huggingface/nanoVLM's `models/language_model.py` and
`VisionLanguageModel.generate` (commit 4e0c096), keeping what sets its speed:
- RMSNorm in the activations' dtype; rotary cos/sin recomputed from `inv_freq` on every call;
- separate q/k/v projections; keys/values grown with `torch.cat` each token and expanded to
  every query head with `repeat_interleave` before SDPA;
- the prompt's attention mask grown with `torch.cat` each step; greedy `argmax`.
It runs on the weights of one of our `LanguageModel`s (the state-dict names are the same), so both
sides decode the same numbers. Images go through our ViT and projector (the same math as the
original's); only the language model's decode loop is the original's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class OriginalDecoder:
    """The original's language-model forward over our module's weights (no copies)."""

    def __init__(self, lm):
        self.lm = lm
        cfg = lm.cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_head_dim
        self.eps, self.scaling = cfg.lm_rms_eps, cfg.lm_attn_scaling
        dim = self.head_dim
        self.inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, dim, 2).float() / dim))

    def rms(self, x, weight):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + self.eps) * weight

    def rotary(self, position_ids):
        B, T = position_ids.shape
        freqs = position_ids.reshape(-1).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1).reshape(B, T, -1)  # (B, T, head_dim)
        return torch.cos(emb) * self.scaling, torch.sin(emb) * self.scaling

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]

    def attn(self, a, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q = a.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = a.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = a.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        groups = self.n_heads // self.n_kv_heads
        k_exp = k.repeat_interleave(groups, dim=1)  # (B, n_heads, T_kv, head_dim)
        v_exp = v.repeat_interleave(groups, dim=1)
        additive = None
        if mask is not None:
            additive = (1.0 - mask[:, None, None, : k.shape[2]].float()) * torch.finfo(q.dtype).min
        y = F.scaled_dot_product_attention(q, k_exp, v_exp, attn_mask=additive,
                                           is_causal=T == k.shape[2] and T > 1)
        return a.out_proj(y.transpose(1, 2).contiguous().view(B, T, C)), (k, v)

    def forward(self, x, mask, caches, start_pos):
        B, T, _ = x.shape
        cos, sin = self.rotary(torch.arange(start_pos, start_pos + T).unsqueeze(0).expand(B, -1))
        new_caches = []
        for i, block in enumerate(self.lm.blocks):
            h, kv = self.attn(block.attn, self.rms(x, block.norm1.weight), cos, sin, mask, caches[i])
            x = x + h
            m = block.mlp
            h = self.rms(x, block.norm2.weight)
            x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
            new_caches.append(kv)
        return self.rms(x, self.lm.norm.weight), new_caches


@torch.inference_mode()
def original_generate(model, input_ids, images, max_new_tokens: int, on_token=None) -> torch.Tensor:
    """Greedy decode the way the original's `VisionLanguageModel.generate` does (no EOS stop)."""
    dec = OriginalDecoder(model.decoder)
    x = model.embed(input_ids, images)  # (B, T, C): the image features over the image tokens
    B, T, _ = x.shape
    mask = torch.ones(B, T, dtype=torch.long)
    hidden, caches = dec.forward(x, mask, [None] * len(dec.lm.blocks), 0)
    logits = model.decoder.head(hidden[:, -1])
    out = []
    for _ in range(max_new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        out.append(token)
        if on_token is not None:
            on_token()
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        hidden, caches = dec.forward(model.decoder.token_embedding(token), mask, caches, T)
        T += 1
        logits = model.decoder.head(hidden[:, -1])
    return torch.cat(out, dim=1)
