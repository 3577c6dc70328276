"""The machine seam: the allocator setting, the thread governor, and `prepare`, the trainer's one entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanovlm.runtime import CpuShare as REAL_CPU_SHARE  # conftest stands in a quiet machine for it

# A training step's large temporaries: allocated, freed, allocated again, step after step. Prints
# the page faults of rounds 10-19 (64 MB each, above glibc's largest default mmap threshold:
# 16,384 pages of 4 kB when mapped afresh); the first rounds let the heap settle (it may grow a
# few times while aligned blocks find their place).
PROBE = """
import resource, sys, torch
from nanovlm.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for step in range(20):
    if step == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    assert _faults("default") > 9 * 16_000  # every round maps and faults its block in afresh
    assert _faults("keep") < 16_000  # the freed block is reused


# ---------------------------------------------------------------------------- CPU threads
class FakeShare:
    """Others' use in cores, one reading per look."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def others(self):
        return self.readings.pop(0)


@pytest.fixture
def two_cores(monkeypatch):
    import torch

    from nanovlm import runtime

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield runtime
    torch.set_num_threads(before)


def test_auto_threads_take_the_cores_others_leave_and_follow_them(two_cores):
    import torch

    said = []
    threads = two_cores.Threads(0, said.append, share=FakeShare(1.1, 1.0, 0.2, 0.1, 0.0, 0.9), sample_s=0)
    assert threads.count == 1 and torch.get_num_threads() == 1
    assert said == ["other programs are using the CPU: running on 1 of 2 thread(s) so that neither waits on the "
                    "other (threads=N fixes the count)."]
    threads.adjust()  # 1.0: still one core taken
    threads.adjust()  # 0.2: free once ...
    assert threads.count == 1 and len(said) == 1
    threads.adjust()  # ... and free again: both cores
    assert threads.count == 2 and torch.get_num_threads() == 2 and said[-1] == "the CPU is free again: back to 2 threads."
    threads.adjust()  # 0.0
    threads.adjust()  # 0.9: one look is not enough to give a core away
    assert threads.count == 2 and len(said) == 2


def test_auto_threads_on_a_free_machine_say_nothing(two_cores):
    said = []
    assert two_cores.Threads(0, said.append, share=FakeShare(0.3), sample_s=0).count == 2 and said == []
    # unreadable /proc: all cores
    assert two_cores.Threads(0, said.append, share=FakeShare(None), sample_s=0).count == 2 and said == []


def test_fixed_threads_and_omp_num_threads_are_kept(two_cores, monkeypatch):
    import torch

    said = []
    fixed = two_cores.Threads(3, said.append, share=FakeShare())
    assert fixed.count == 3 and torch.get_num_threads() == 3 and not fixed.auto
    assert said == ["threads=3 is more than the 2 core(s) this process may use; its threads will wait on each other."]
    fixed.adjust()  # never measures (FakeShare() has no readings to give)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes
    assert two_cores.Threads(0, said.append, share=FakeShare()).count == 1 and len(said) == 1


def test_others_use_is_their_ticks_over_the_time_between_looks(monkeypatch):
    from nanovlm import runtime

    looks = iter([({10: 500, 11: 40}, 100.0), ({10: 650, 12: 30}, 102.0)])  # 11 ended, 12 is new
    readings = next(looks)
    monkeypatch.setattr(runtime, "_competing_ticks", lambda: readings[0])
    monkeypatch.setattr(runtime.time, "monotonic", lambda: readings[1])
    share = REAL_CPU_SHARE()
    readings = next(looks)
    ticks = os.sysconf("SC_CLK_TCK")
    assert share.others() == pytest.approx((150 + 30) / ticks / 2.0)


def test_competing_ticks_leave_out_this_process_its_children_and_niced_programs():
    from nanovlm import runtime

    niced = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "import time; time.sleep(30)"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ticks = runtime._competing_ticks()
        assert os.getpid() not in ticks and child.pid not in ticks and niced.pid not in ticks
        assert 1 in ticks  # init runs at priority 0 or above
    finally:
        for p in (niced, child):
            p.kill()
            p.wait()


def test_prepare_switches_cpu_training_attention_on_for_the_run_inside_only():
    import torch

    from nanovlm import runtime

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    assert not runtime.cpu_training_attention(q, q)  # the plain SDPA path outside a run
    with runtime.prepare(torch.device("cpu"), threads=torch.get_num_threads(), say=print) as threads:
        assert threads.count == torch.get_num_threads() and runtime.keep_freed_memory.cache_info().currsize == 1
        assert runtime.cpu_training_attention(q, q)
        assert not runtime.cpu_training_attention(q.detach(), q)  # nothing to train
        with torch.no_grad():
            assert not runtime.cpu_training_attention(q, q)
        long = torch.randn(1, 2, runtime.PLAIN_MAX_TOKENS + 1, 8)
        assert not runtime.cpu_training_attention(q, long)  # more keys than the plain path takes
    assert not runtime.cpu_training_attention(q, q)
    with runtime.prepare(torch.device("meta")) as threads:  # any other device: nothing to tune
        assert threads is None and not runtime.cpu_training_attention(q, q)
