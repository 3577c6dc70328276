"""The machine seam: device and precision, and what a training run tunes for the machine.

Models and trainer stay machine-neutral; `prepare`, the trainer's one entry, applies glibc's allocator
tuning, the thread governor (`Threads`, reading /proc) and the CPU-training attention path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import time
from typing import Callable, Iterator

import torch

PLAIN_MAX_TOKENS = 256  # longer rows keep the fused kernel (the plain path's memory grows with T^2)
_cpu_training = False  # set by `prepare` for a CPU training run


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
    return device.type == "cpu" and cpu_has_fast_bf16()


def pick_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """'fp32' | 'bf16' | 'auto' -> a torch dtype. Never fp16 on CPU (it is very slow there)."""
    if name in ("fp32", "bf16"):
        return torch.float32 if name == "fp32" else torch.bfloat16
    if name == "auto":
        return torch.bfloat16 if bf16_supported(default_device() if device is None else device) else torch.float32
    raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}.")


def autocast_args(precision: str, device: torch.device) -> dict:
    """The `torch.autocast` arguments of a training run: bf16 where `precision` picks it."""
    dtype = pick_dtype(precision, device)
    return {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}


def may_read_back(t: torch.Tensor) -> bool:
    """Whether a value check may read `t` back to the host (never a sync in an accelerator's training step)."""
    return not torch.compiler.is_compiling() and (t.device.type == "cpu" or not torch.is_grad_enabled())


def cpu_training_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention takes the plain path (two matmuls, a softmax): in `prepare` on a CPU, for queries
    autograd records, against at most PLAIN_MAX_TOKENS keys (the fused CPU backward is slow on short rows)."""
    return (_cpu_training and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
            and k.shape[-2] <= PLAIN_MAX_TOKENS)


@contextlib.contextmanager
def cpu_training_path() -> Iterator[None]:
    """Attention takes the CPU-training path inside (where `prepare` switches it on)."""
    global _cpu_training
    before, _cpu_training = _cpu_training, True
    try:
        yield
    finally:
        _cpu_training = before


@contextlib.contextmanager
def prepare(device: torch.device, threads: int = 0, say: Callable[[str], None] = print) -> Iterator:
    """On a CPU: the allocator, the thread count (`Threads`, yielded) and the CPU-training attention path."""
    if device.type != "cpu":
        yield None
        return
    keep_freed_memory()
    governor = Threads(threads, say)
    with cpu_training_path():
        yield governor


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc keep freed large blocks, so a CPU step's temporaries are not page-faulted in and zeroed
    again every step (the price: the process keeps its peak step's memory); returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    # glibc's M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1), from malloc.h
    return bool(mallopt(-3, 1 << 30)) and bool(mallopt(-1, 2**31 - 1))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_tree(pid: int) -> set[int]:
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return tree


def _competing_ticks() -> dict[int, int] | None:
    """CPU ticks by pid of the other processes at this one's priority or above (niced ones yield); None: no /proc."""
    if not os.path.isdir("/proc/self/task"):
        return None
    own, mine = _own_tree(os.getpid()), os.nice(0)
    ticks = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in own:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()  # after the command name: state first
            if int(fields[16]) <= mine:
                ticks[int(name)] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return ticks


class CpuShare:
    """Cores that programs of this one's priority or above used since the last look (None: unknown)."""

    def __init__(self):
        self._last = (_competing_ticks(), time.monotonic())

    def others(self) -> float | None:
        now, last = (_competing_ticks(), time.monotonic()), self._last
        self._last = now
        seconds = now[1] - last[1]
        if now[0] is None or last[0] is None or seconds <= 0:
            return None
        used = sum(t - last[0].get(pid, 0) for pid, t in now[0].items())  # a new process: all its ticks
        return max(0.0, used / os.sysconf("SC_CLK_TCK") / seconds)


class Threads:
    """A thread count that shares the CPU fairly (two programs' spinning OpenMP threads slow both many
    times over): `requested`, else `OMP_NUM_THREADS`, else the cores others leave free, at each `adjust()`."""

    def __init__(self, requested: int = 0, say: Callable[[str], None] = print, share: CpuShare | None = None,
                 sample_s: float = 0.3):
        self.cores, self.say, self._pending = cpu_cores(), say, None
        self.auto = requested == 0 and not os.environ.get("OMP_NUM_THREADS")
        if requested > 0:
            self.count = requested
            if requested > self.cores:
                say(f"threads={requested} is more than the {self.cores} core(s) this process may use; "
                    "its threads will wait on each other.")
        elif not self.auto:
            self.count = max(1, int(os.environ["OMP_NUM_THREADS"]))
        else:
            self.share = share or CpuShare()
            time.sleep(sample_s)
            self.count = self._free(self.share.others())
            if self.count < self.cores:
                say(self._notice())
        torch.set_num_threads(self.count)

    def _free(self, others: float | None) -> int:
        return self.cores if others is None else max(1, min(self.cores, self.cores - round(others)))

    def _notice(self) -> str:
        return (f"other programs are using the CPU: running on {self.count} of {self.cores} thread(s) so that "
                "neither waits on the other (threads=N fixes the count).")

    def adjust(self) -> None:
        """Follow the others' use: a new count once two looks in a row agree on it."""
        if not self.auto:
            return
        want = self._free(self.share.others())
        if want == self.count or self._pending != want:
            self._pending = None if want == self.count else want
            return
        self.count, self._pending = want, None
        torch.set_num_threads(want)
        self.say(self._notice() if want < self.cores else f"the CPU is free again: back to {want} threads.")
