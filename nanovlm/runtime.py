"""Where and in what precision to run: device choice, bf16 detection, the CPU allocator, CPU threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import time
from typing import Callable

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


# --------------------------------------------------------------------------- CPU threads
def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2:].split()


def _children(pid: int | str) -> list[str]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += f.read().split()
    return children


def _process_jiffies(pid: int | str = "self") -> int:
    """User + system ticks of a process and of its live descendants (DataLoader workers)."""
    try:
        fields = _stat_fields(pid)
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        children = _children(pid)
    except (OSError, ValueError, IndexError):
        return 0
    return ticks + sum(_process_jiffies(c) for c in children)


def _own_tree(pid: int) -> set[int]:
    """This process and its live descendants."""
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        try:
            todo += [int(c) for c in _children(p)]
        except (OSError, ValueError):
            pass
    return tree


def _competing_ticks() -> dict[int, int] | None:
    """User + system ticks of every other process that runs at this one's priority or above
    (`nice` no higher; niced programs yield the CPU, so they do not count), by pid; None
    without /proc."""
    if not os.path.isdir("/proc/self/task"):
        return None
    own, mine = _own_tree(os.getpid()), os.nice(0)
    ticks = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in own:
            continue
        try:
            fields = _stat_fields(name)
            if int(fields[16]) <= mine:
                ticks[int(name)] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return ticks


class CpuShare:
    """How many cores other programs of this one's priority or above have used since the last
    look (None where unknown): their CPU ticks over the wall time between two looks."""

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
    """The intra-op thread count of a CPU process that shares its machine fairly.

    OpenMP threads spin while they wait for each other, so two programs that each run one
    thread per core on the same cores do not halve each other's speed: each step waits for its
    slowest thread, whose core the other program holds, and both runs slow down ~10x
    (docs/benchmarks.md, "A shared CPU"). `requested` > 0 fixes the count. 0 (auto) takes
    `OMP_NUM_THREADS` when set (torchrun sets it), else the cores that others leave free,
    measured now and again at every `adjust()`; a changed count is said in one line. The count
    changes rounding, so a run that must repeat bit for bit sets it.
    """

    def __init__(self, requested: int = 0, say: Callable[[str], None] = print, share: CpuShare | None = None,
                 sample_s: float = 0.3):
        self.cores = cpu_cores()
        self.say = say
        self.auto = requested == 0 and not os.environ.get("OMP_NUM_THREADS")
        self._pending: int | None = None
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
        if others is None:
            return self.cores
        return max(1, min(self.cores, self.cores - round(others)))

    def _notice(self) -> str:
        return (f"other programs are using the CPU: running on {self.count} of {self.cores} thread(s) so that "
                "neither waits on the other (threads=N fixes the count).")

    def adjust(self) -> None:
        """Follow the others' use: a new count once two looks in a row agree on it."""
        if not self.auto:
            return
        want = self._free(self.share.others())
        if want == self.count:
            self._pending = None
            return
        if self._pending != want:
            self._pending = want
            return
        self.count, self._pending = want, None
        torch.set_num_threads(want)
        self.say(self._notice() if want < self.cores else f"the CPU is free again: back to {want} threads.")
