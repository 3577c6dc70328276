"""Where and in what precision to run: device choice and bf16 detection."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix units (Intel AMX / AVX512-BF16, Arm BF16 matmul)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16", " bf16 "))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def pick_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """'fp32' | 'bf16' | 'auto' -> a torch dtype. Never fp16 on CPU (it is very slow there)."""
    device = default_device() if device is None else device
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}.")
