"""The language model: a Llama / SmolLM2-style decoder.

Mirrors transformers' `LlamaForCausalLM` (RMSNorm, rotary embeddings in the rotate-half
layout, grouped-query attention, SwiGLU MLP, tied or untied head) with the original nanoVLM's
module names (`token_embedding`, `blocks.i.attn.q_proj`, `norm1`, ...).

Design choices:
- The `attention_mask` argument holds segment ids (`segment_ids` inside): 0 is padding, and
  tokens attend only to earlier tokens with the same non-zero id. A plain 0/1 padding mask is
  the one-segment case; packed sequences number their documents 1, 2, 3, ... Positions are
  derived from the segment ids and restart at 0 where the id changes, so a left-padded row or
  a packed document computes exactly what it would alone.
- Explicit `position_ids` that go back within a segment mark a shared prefix with branches
  (several independent answers to one image prompt, trained in one pass): each branch sees the
  prefix and itself, not its siblings (`build_attention_mask`).
- Which mask to build is decided from shapes and arguments, never from tensor values: a given
  `attention_mask` is always applied (pass None when every token is real), so a training step
  on an accelerator never waits for the device (`may_read_back`).
- The KV cache is static: preallocated once for `max_len` tokens, filled in place. No
  `torch.cat` per decoded token.
- The rotary tables are computed once for `lm_max_position_embeddings` positions.
- For inference, `prepare_for_inference` fuses q/k/v and gate/up into one matmul each and can
  put the linears on int8 weights (`quantization`); the state dict stays the checkpoint's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig
from nanovlm.models.attention import attention
from nanovlm.models.quantization import (InferenceLinear, Int8Linear, check_quantize, int8_supported, linear,
                                         quantize_rows)
from nanovlm.runtime import may_read_back


class RMSNorm(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.lm_hidden_dim))
        self.eps = cfg.lm_rms_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, then scale in the input's dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos / sin tables for every position, computed once (fp32, rotate-half layout)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        dim = cfg.lm_head_dim
        self.max_positions = cfg.lm_max_position_embeddings
        inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        freqs = torch.outer(torch.arange(self.max_positions).float(), inv_freq)  # (max_pos, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, dim)
        self.register_buffer("cos", emb.cos() * cfg.lm_attn_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * cfg.lm_attn_scaling, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.numel() and may_read_back(position_ids):
            top = int(position_ids.max())
            if top >= self.max_positions:
                raise ValueError(f"position {top} is beyond lm_max_position_embeddings "
                                 f"({self.max_positions}); shorten the input.")
        return self.cos[position_ids], self.sin[position_ids]  # each (B, T, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B, 1, T, head_dim)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Static key/value cache: per layer, one preallocated (B, n_kv_heads, max_len, head_dim)
    key and value buffer, written in place at each row's own slots; `length`: those `forward` filled.

    One buffer per layer, not one (layers, ...) tensor: under `torch.compile` an in-place write
    into a view of a shared buffer is replayed on the whole buffer, so every layer of the
    compiled decode step rewrote all layers' caches."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def rows(self, start: int, end: int) -> "KVCache":
        """Rows start..end-1 as a cache of their own (views: writes land in this one)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[start:end] for k in self.k], [v[start:end] for v in self.v]
        view.max_len, view.length = self.max_len, self.length
        return view

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_kv_heads, T_new, head_dim) at each row's slots `input_pos`
        (B, T_new) (a tensor: no host read, one shape for every step); return the whole buffers
        (B, n_kv_heads, max_len, head_dim)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        # Indexed as [rows, :, input_pos] the buffers read (B, T_new, n_kv_heads, head_dim).
        self.k[layer][rows, :, input_pos] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, input_pos] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer], self.v[layer]


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes; 0 on padding.

    segment_ids: (B, T), 0 = padding. Returns (B, T) int64.
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return torch.where(segment_ids > 0, idx - start, torch.zeros_like(idx))


def _branch_starts(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run index, position where the run starts), both (B, T), for explicit positions.

    A run is a stretch of one segment whose positions keep increasing; a new run starts where
    the segment id changes or a branch goes back (token t + 1 in the segment of token t, but not
    at a later position: a branch returning to the end of a shared prefix)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]  # (B, T - 1)
    goes_back = same_segment & (position_ids[:, 1:] <= position_ids[:, :-1])
    new_run = torch.ones_like(segment_ids, dtype=torch.bool)
    new_run[:, 1:] = ~same_segment | goes_back
    first = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T) the run's first index
    return new_run.long().cumsum(dim=1), position_ids.gather(1, first)


def build_attention_mask(segment_ids: torch.Tensor, q_len: int, position_ids: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Boolean (B, 1, q_len, T_kv), True where a query may attend: causal, same segment, never
    padding.

    The last `q_len` columns of `segment_ids` (B, T_kv) are the queries. A padding query may
    attend to itself only, so that no softmax row is empty (its output is never used).

    With `position_ids` (B, T_kv) (training, no cache): a segment may hold a shared prefix and
    several branches, laid out one after the other, each branch's positions restarting where the
    prefix ends. A token then sees the earlier tokens of its own run (see `_branch_starts`) and,
    from earlier runs of its segment, only those placed before its run starts: its prefix, not
    the other branches. Each branch computes exactly what it would after the prefix alone.
    Positions that only increase within a segment give the plain mask.
    """
    B, T_kv = segment_ids.shape
    q_seg = segment_ids[:, -q_len:]  # (B, q_len)
    q_idx = torch.arange(T_kv - q_len, T_kv, device=segment_ids.device)
    k_idx = torch.arange(T_kv, device=segment_ids.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (q_len, T_kv)
    same = (q_seg[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)  # (B, q_len, T_kv)
    allowed = causal[None] & same
    if position_ids is not None:
        run, run_start = _branch_starts(segment_ids, position_ids)  # (B, T_kv) each
        visible = (run[:, -q_len:, None] == run[:, None, :]) | (position_ids[:, None, :] < run_start[:, -q_len:, None])
        allowed = allowed & visible
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    return allowed.unsqueeze(1)  # (B, 1, q_len, T_kv)


def fuse_rows(linears: list[nn.Linear], quantize: str, current: tuple) -> tuple[torch.Tensor | None, ...]:
    """(matrix, scales): the weights of `linears` stacked on the output axis; (None, None) where
    a layer has adapters. Float: the storage of the layers' own Parameters (kept while it still
    is); int8: a quantized copy with per-row scales, made once."""
    if any(type(lin) is not nn.Linear for lin in linears):
        return None, None
    fused = current[0]
    if quantize == "int8":
        if fused is not None and fused.dtype == torch.int8:
            return current
        q, scales = quantize_rows(torch.cat([lin.weight.detach() for lin in linears]))
        return q.to(linears[0].weight.device), scales.to(device=linears[0].weight.device, dtype=torch.bfloat16)
    storage = None if fused is None else fused.untyped_storage().data_ptr()
    if all(lin.weight.untyped_storage().data_ptr() == storage for lin in linears):
        return current
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum N, K)
    for lin, part in zip(linears, weight.split([lin.out_features for lin in linears])):
        lin.weight.data = part  # the same Parameter, now a view of the fused matrix
    return weight, None


def inference_linear(lin: nn.Linear, quantize: str) -> nn.Linear:
    """A block linear or the head computing through `quantization.linear` (int8, or the one-row
    decode loop), sharing the float weight; layers with adapters and finished ones stay."""
    if type(lin) is nn.Linear or (quantize == "int8" and type(lin) is InferenceLinear):
        return Int8Linear.from_linear(lin) if quantize == "int8" else InferenceLinear.from_linear(lin)
    return lin


class LanguageModelGroupedQueryAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.lm_n_heads
        self.n_kv_heads = cfg.lm_n_kv_heads
        self.head_dim = cfg.lm_head_dim
        self.dropout = cfg.lm_dropout
        C = cfg.lm_hidden_dim
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        self.resid_dropout = nn.Dropout(self.dropout)
        # Inference only (`LanguageModel.prepare_for_inference`): q/k/v as one (float or int8) matrix.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_scales", None, persistent=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_weight is None or torch.is_grad_enabled():
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = linear(x, self.qkv_weight, self.qkv_scales)  # (B, T, (n_heads + 2 n_kv_heads) head_dim)
        kv = self.n_kv_heads * self.head_dim
        return qkv.split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:  # the keys the mask covers: all slots, or (eager) the filled ones
            k, v = kv_cache.write(layer, k, v, input_pos)  # (B, n_kv_heads, max_len, head_dim)
            k, v = k[:, :, :attn_mask.shape[-1]], v[:, :, :attn_mask.shape[-1]]  # (B, n_kv_heads, T_kv, head_dim)
        is_causal = attn_mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask, is_causal, dropout)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class LanguageModelMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)
        # Inference only (`LanguageModel.prepare_for_inference`): gate/up as one matrix.
        self.register_buffer("gate_up_weight", None, persistent=False)
        self.register_buffer("gate_up_scales", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None or torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = linear(x, self.gate_up_weight, self.gate_up_scales).chunk(2, dim=-1)  # (B, T, inter) each
        return self.down_proj(F.silu(gate) * up)


class LanguageModelBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.mlp = LanguageModelMLP(cfg)
        self.attn = LanguageModelGroupedQueryAttention(cfg)
        self.norm1 = RMSNorm(cfg)
        self.norm2 = RMSNorm(cfg)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0, input_pos=None):
        x = x + self.attn(self.norm1(x), cos, sin, attn_mask, kv_cache, layer, input_pos)
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    quantization = "none"  # or "int8": how `prepare_for_inference` set the weights up

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.lm_use_tokens = cfg.lm_use_tokens
        self.lm_tie_weights = cfg.lm_tie_weights
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList([LanguageModelBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        block_linears = {id(m) for m in self.blocks.modules() if isinstance(m, nn.Linear)}

        def init_weights(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = cfg.lm_init_std if id(module) in block_linears else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

        self.apply(init_weights)  # one draw per module in the same order whatever the stds
        if self.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        p, cfg = self.token_embedding.weight, self.cfg
        return KVCache(cfg.lm_n_blocks, batch_size, cfg.lm_n_kv_heads, max_len, cfg.lm_head_dim, p.dtype, p.device)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, position_ids: torch.Tensor | None = None):
        """Run the decoder on token ids (lm_use_tokens) or embeddings (B, T, C).

        attention_mask: (B, T) long, a 0/1 padding mask or, in general, segment ids (0 =
        padding; packed rows number their documents 1, 2, ...); None when every token is real.
        position_ids: (B, T); by default derived from the segment ids (restarting at 0 in each
        one). kv_cache: unpadded rows going on from `kv_cache.length` (generation calls `decode_step`).
        Returns (logits or hidden states, kv_cache): logits (B, T, vocab) with lm_use_tokens,
        else final-normed hidden states (B, T, C) for the caller's head.
        """
        if self.lm_use_tokens:
            x = self.token_embedding(x)
        B, T, _ = x.shape
        if kv_cache is not None:
            if attention_mask is not None or position_ids is not None:
                raise ValueError("a call with a kv_cache takes unpadded rows: pass no attention_mask or "
                                 "position_ids (nanovlm.generation decodes padded batches).")
            end = kv_cache.length + T
            x = self.decode_step(x, torch.arange(kv_cache.length, end, device=x.device).expand(B, T), kv_cache, end)
            kv_cache.length = end
        else:
            x = self._forward(x, attention_mask, position_ids)
        return (self.head(x) if self.lm_use_tokens else x), kv_cache

    def _forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None, position_ids: torch.Tensor | None):
        B, T, _ = x.shape
        if segment_ids is not None and segment_ids.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(segment_ids.shape)}; expected (batch, tokens) = "
                             f"({B}, {T}).")
        explicit_positions = position_ids  # branches after a shared prefix need the mask to know them
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T) if segment_ids is None \
                else positions_from_segments(segment_ids)
        cos, sin = self.rotary_embd(position_ids)
        attn_mask = None if segment_ids is None else build_attention_mask(segment_ids, T, explicit_positions)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        return self.norm(x)

    def decode_step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache,
                    kv_len: int | None = None) -> torch.Tensor:
        """New tokens against the static cache, with no host reads: the one cached computation
        (prefill and each token; compiled once, as gpt-fast's `decode_one_token`).
        x: (B, T_new, C) embeddings; input_pos: (B, T_new) long, each row's cache slots for them,
        which are also their positions (a row's tokens start at slot 0: padding goes after).
        kv_len: attend to the first kv_len slots only (eager: fewer keys); None: all of them
        (one shape for every step). Returns final-normed hidden states (B, T_new, C)."""
        cos, sin = self.rotary_embd(input_pos)
        slots = torch.arange(kv_cache.max_len if kv_len is None else kv_len, device=x.device)
        attn_mask = (slots <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T_new, kv_len): causal per row
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, kv_cache, i, input_pos)
        return self.norm(x)

    @torch.inference_mode(False)  # called from generation's inference mode: the fused weights stay trainable
    @torch.no_grad()
    def prepare_for_inference(self, quantize: str | None = None) -> "LanguageModel":
        """Fuse q/k/v and gate/up into one matmul each and, with `quantize="int8"`, run the block
        linears and head on int8 weights (`quantization`); None keeps the mode. In place, idempotent
        and cheap: generation calls it. The model still trains: the fused path runs only without
        autograd, a fused float matrix is the storage of the layers' own Parameters (fused again
        after a recast or move), int8 copies are an inference snapshot; the state dict is unchanged."""
        mode = self.quantization if quantize is None else check_quantize(quantize)
        if mode == "int8" and self.quantization != "int8":
            reason = int8_supported(self.token_embedding.weight.device)
            if reason is not None:
                warnings.warn(reason)
                mode = "none"
        if self.quantization == "int8" and mode != "int8":
            raise ValueError(f"this language model already runs int8 weights; load it again to run it as {mode}.")
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            attn.qkv_weight, attn.qkv_scales = fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], mode,
                                                         (attn.qkv_weight, attn.qkv_scales))
            mlp.gate_up_weight, mlp.gate_up_scales = fuse_rows([mlp.gate_proj, mlp.up_proj], mode,
                                                               (mlp.gate_up_weight, mlp.gate_up_scales))
            attn.out_proj, mlp.down_proj = inference_linear(attn.out_proj, mode), inference_linear(mlp.down_proj, mode)
        self.head = inference_linear(self.head, mode)  # shares the (maybe tied) float weight
        self.quantization = mode
        return self

    @classmethod
    def from_pretrained(cls, cfg: VLMConfig) -> "LanguageModel":
        """Load Llama weights named by `cfg.lm_model_type`: a local transformers directory
        (sharded or not), a `.gguf` file, `packaged:smollm2-135m`, or a hub id when online.
        The vocabulary grows to `cfg.lm_vocab_size` for the extra (image) tokens."""
        from nanovlm.weights.loading import load_language_model

        return load_language_model(cls, cfg)
