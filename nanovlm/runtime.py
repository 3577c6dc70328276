"""Where and in what precision to run: device choice, bf16 detection, the CPU allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed ones for reuse.

    By default glibc maps each block above a threshold (at most 32 MB, 128 kB at start) fresh
    from the kernel and unmaps it when freed, so every large temporary of a CPU training step
    (a chunk of vocabulary logits, a vocabulary-sized gradient, a packed batch's activations)
    is page-faulted in and zeroed again, step after step: on the easyvqa preset that was 10-15%
    of the CPU time of a training run (docs/benchmarks.md). The price: the process keeps the
    memory of its peak step. Linux with glibc only (elsewhere nothing changes); applied once per
    process. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
