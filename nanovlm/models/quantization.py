"""Weight-only int8 for inference: the language model's linear layers read int8 weights.

Batch-1 decoding reads every weight once per token, so its speed is set by the bytes of the
weights: int8 halves bf16's. Each output channel (weight row) n gets one scale,
s_n = max_k |W[n, k]| / 127, and stores round(W[n, k] / s_n) in [-127, 127]; the matmul is
ATen's CPU kernel `_weight_int8pack_mm(x_bf16 (M, K), w_int8 (N, K), s_bf16 (N,)) -> (M, N)`
(as gpt-fast's int8 path and torchao's `int8_weight_only` use it), which converts the int8
weights on the fly and applies the scales to its output. From `DEQUANTIZE_ROWS` rows on (a
prefill, a batch) the weight is widened to bf16 for ATen's bf16 matmul instead, which is faster
there; a batch-1 decode step under `torch.compile` uses `row_matmul`.

Design choices:
- Quantizing keeps the float weights: it is a way of running a checkpoint, not a checkpoint
  format, so `save_pretrained` still writes the float weights (and a reload quantizes again).
  The int8 copies are non-persistent buffers.
- Activations go through the kernel in bf16 (its fast path; fp32 activations are far slower);
  the result comes back in the caller's dtype.
- The error of one weight is at most s_n / 2, so one output's error is at most
  s_n / 2 * sum_k |x_k| plus the bf16 rounding of x and of the output (`int8_error_bound`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8")


def check_quantize(mode: str | None) -> str:
    """The quantization mode, checked: None or "none" -> "none"; "int8"; anything else an error."""
    mode = "none" if mode is None else mode
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}.")
    return mode


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (N, K) float -> (int8 (N, K), fp32 scales (N,))."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scales


# From this many rows on (a prefill, a batch of prompts), the int8 weight is widened to bf16 and
# multiplied by ATen's bf16 matmul, which is faster there than `_weight_int8pack_mm`.
DEQUANTIZE_ROWS = 32


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) times int8 weight (N, K)^T, scaled per output channel -> (..., N) in x's dtype."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    # bf16 activations and scales: the kernel's fast path (`.to(dtype)` of a model may recast the scales).
    scales = scales.to(torch.bfloat16)
    if rows.shape[0] >= DEQUANTIZE_ROWS:
        y = F.linear(rows, weight * scales[:, None])  # int8 x bf16 -> bf16 in one pass
    else:
        y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales)
    return y.view(*shape[:-1], weight.shape[0]).to(x.dtype)  # (..., N)


def int8_supported(device: torch.device | str) -> str | None:
    """None when the int8 kernel runs on `device`, else one sentence saying why not."""
    try:
        w, s = quantize_rows(torch.ones(8, 32))
        int8_matmul(torch.ones(1, 32, device=device), w.to(device), s.to(device=device, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"int8 weight-only quantization needs torch's _weight_int8pack_mm on {torch.device(device).type}, "
                f"which failed here ({first[:120]}); running with the unquantized weights.")
    return None


def one_compiled_row(x: torch.Tensor) -> bool:
    """Whether `x` (..., K) is a single row inside `torch.compile` on the CPU: the batch-1
    decode step, where `row_matmul` beats ATen's kernels."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def row_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """One row x (..., K) times weight (N, K)^T (float, or int8 with per-row scales) -> (..., N)
    in x's dtype, written as a multiply-and-sum in fp32 so that inductor generates one vectorized
    loop that converts each weight as it streams past (no fp32 copy of the weight is made), faster
    than ATen's one-row matmul."""
    y = (weight.float() * x.float()[..., None, :]).sum(-1)  # (..., N)
    if scales is not None:
        y = y * scales.float()
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T for inference: float weights, or int8 ones with their per-row scales; a
    single row under `torch.compile` (the decode step) goes through `row_matmul`."""
    if one_compiled_row(x):
        return row_matmul(x, weight, scales)
    return F.linear(x, weight) if scales is None else int8_matmul(x, weight, scales)


class InferenceLinear(nn.Linear):
    """An `nn.Linear` (no bias) for inference, sharing the original's weight (state dict
    unchanged), that computes through `linear`. Build with `from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "InferenceLinear":
        if linear.bias is not None:
            raise ValueError(f"{cls.__name__} takes linear layers without bias.")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the float parameter, shared (tied heads stay tied)
        new.register_parameter("bias", None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Int8Linear(nn.Linear):
    """An `nn.Linear` (no bias) that computes with an int8 copy of its weight; `weight` stays
    the float parameter (state dict unchanged). Build with `Int8Linear.from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize `linear` (or `weight` (N, K) in its place: a fused projection)."""
        if linear.bias is not None:
            raise ValueError("Int8Linear takes linear layers without bias.")
        w = linear.weight if weight is None else weight
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = w.shape[1], w.shape[0]
        new.weight = linear.weight  # the float parameter, shared (tied heads stay tied)
        new.register_parameter("bias", None)
        q, scales = quantize_rows(w)
        new.register_buffer("weight_int8", q.to(w.device), persistent=False)
        new.register_buffer("scales", scales.to(device=w.device, dtype=torch.bfloat16), persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_int8, self.scales)


def int8_error_bound(x: torch.Tensor, scales: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """Bound on |int8 output - exact output| per element for inputs x (..., K), scales (N,), y_ref
    the exact output (..., N): the weight rounding (s_n / 2 per weight, times sum |x_k|), plus
    bf16 rounding of the inputs and of the widened weights (2^-8 relative each, times sum |x_k|
    max|W[n]| = 127 s_n sum|x_k|) and of the output (2^-8 relative, again on the bound of |y|)."""
    l1 = x.float().abs().sum(-1, keepdim=True)  # (..., 1)
    s = scales.float()
    weight_part = 0.5 * s * l1
    input_part = 2 * 2.0**-8 * 127.0 * s * l1
    output_part = 2.0**-8 * (y_ref.float().abs() + weight_part + input_part)
    return weight_part + input_part + output_part
