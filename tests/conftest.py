"""Shared test setup: offline, two CPU threads (however busy the machine), a fixed seed per test."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads for the two-core CI machine; NANOVLM_TEST_THREADS overrides it (1 is faster on a
# machine whose cores are busy with other work: spinning OpenMP threads then wait on each other).
torch.set_num_threads(int(os.environ.get("NANOVLM_TEST_THREADS", "2")))


class _QuietMachine:
    """In-process training sees a free CPU: its thread count stays what this file set, however
    busy the machine, so runs that must repeat bit for bit do (tests of `runtime.Threads` pass
    their own readings)."""

    def others(self):
        return 0.0


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    from nanovlm import runtime

    monkeypatch.setattr(runtime, "CpuShare", _QuietMachine)
    monkeypatch.setattr(runtime, "cpu_cores", torch.get_num_threads)
    torch.manual_seed(0)
    yield
