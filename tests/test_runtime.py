"""The CPU allocator setting: freed large blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
