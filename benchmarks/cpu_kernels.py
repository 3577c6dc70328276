"""The pieces of a CPU training step that were made faster (see git history of docs/),
each timed the way it was before and the way `nanovlm train` runs it now (forward + backward,
bf16 autocast, the shapes of one `easyvqa` step).

    python benchmarks/cpu_kernels.py [--repeats 20]

Rows: the ViT's patch embedding (64 images), its MLP's GELU, its attention (64 images x 4 heads
x 64 patches), the language model's attention (19 packed rows of 256 tokens, a causal mask), the
fused loss (370 supervised positions, the 49,152-word head), and a 64 MB temporary with glibc's
default allocator against `keep_freed_memory` (last: the setting cannot be undone in a process).
Median milliseconds; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm import VLMConfig
from nanovlm.models import linear_cross_entropy as lce
from nanovlm.models.attention import attention
from nanovlm.models.vision_transformer import ViTPatchEmbeddings
from nanovlm.runtime import cpu_training_path, keep_freed_memory

AMP = dict(device_type="cpu", dtype=torch.bfloat16)


def median_ms(step: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    grad = []  # one fixed incoming gradient, made at the first call

    def step() -> None:
        with torch.autocast(**AMP):
            out = fn(*inputs)
        if not grad:
            grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
        out.backward(grad[0])
    return step


def conv_patches(cfg: VLMConfig, embed: ViTPatchEmbeddings) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:  # the module as it was: the conv kernel
        return embed.conv(x).flatten(2).transpose(1, 2) + embed.position_embedding
    return fn


def fp32_softmax_attention(q, k, v):  # the ViT's plain path as it was
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1).to(v.dtype) @ v


def rows(repeats: int) -> list[tuple[str, str, float, str, float]]:
    cfg = VLMConfig.from_preset("easyvqa")
    g = torch.Generator().manual_seed(0)
    out = []

    embed = ViTPatchEmbeddings(cfg)
    images = torch.rand(64, 3, cfg.vit_img_size, cfg.vit_img_size, generator=g)
    out.append(("patch embedding, 64 images", "conv kernel", median_ms(forward_backward(conv_patches(cfg, embed), images),
                                                                      repeats),
                "one matmul of the flattened patches", median_ms(forward_backward(embed, images), repeats)))

    h = torch.randn(64, 64, cfg.vit_inter_dim, generator=g).bfloat16().requires_grad_()  # fc1 output under autocast
    out.append(("ViT MLP activation (64 x 64 x 512)", "GELU, tanh approximation",
                median_ms(forward_backward(lambda x: F.gelu(x, approximate="tanh"), h), repeats),
                "GELU, exact (`vit_hidden_act=gelu`)", median_ms(forward_backward(F.gelu, h), repeats)))

    q, k, v = (torch.randn(64, 4, 64, 32, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with cpu_training_path():  # `attention` as a CPU training run calls it
        plain = median_ms(forward_backward(attention, q, k, v), repeats)
    out.append(("ViT attention (64 x 4 heads x 64)", "scores cast to fp32 and back",
                median_ms(forward_backward(fp32_softmax_attention, q, k, v), repeats), "scores in bf16", plain))
    out.append(("", "F.scaled_dot_product_attention",
                median_ms(forward_backward(F.scaled_dot_product_attention, q, k, v), repeats), "", float("nan")))

    q, k, v = (torch.randn(19, 4, 256, 32, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(256, 256, dtype=torch.bool).tril().expand(19, 1, 256, 256)
    with cpu_training_path():
        plain = median_ms(forward_backward(lambda *t: attention(*t, mask=mask), q, k, v), repeats)
    out.append(("LM attention (19 x 4 heads x 256, masked)", "F.scaled_dot_product_attention",
                median_ms(forward_backward(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v),
                          repeats), "plain path", plain))

    hidden = torch.randn(370, cfg.lm_hidden_dim, generator=g, requires_grad=True)
    head = (0.08 * torch.randn(cfg.lm_vocab_size, cfg.lm_hidden_dim, generator=g)).requires_grad_()
    targets = torch.randint(0, cfg.lm_vocab_size, (370,), generator=g)
    loss = forward_backward(lambda a, b: lce.linear_cross_entropy(a, b, targets), hidden, head)
    default_rows = lce.W_ROWS
    lce.W_ROWS = 64  # the head's gradient per 64-position chunk, as before
    per_chunk = median_ms(loss, repeats)
    lce.W_ROWS = default_rows
    out.append(("fused loss (370 positions, 49,152 x 128 head)", "head gradient per 64-position chunk", per_chunk,
                f"per {default_rows} positions", median_ms(loss, repeats)))

    big = torch.randn(16 * 1024 * 1024, generator=g)
    fresh = median_ms(lambda: torch.exp(big), repeats)
    applied = keep_freed_memory()
    out.append(("a 64 MB temporary (exp of 16M floats)", "glibc default (mapped afresh)", fresh,
                "`keep_freed_memory`" + ("" if applied else " (not applied here)"),
                median_ms(lambda: torch.exp(big), repeats)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"| piece | before | ms | now | ms |  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|")
    for piece, before, t_before, now, t_now in rows(args.repeats):
        now_ms = "" if t_now != t_now else f"{t_now:.1f}"
        print(f"| {piece} | {before} | {t_before:.1f} | {now} | {now_ms} |", flush=True)


if __name__ == "__main__":
    main()
