"""benchmarks/train_vs_original.py refuses bad arguments with one sentence, before it builds anything."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_vs_original.py")


@pytest.mark.parametrize("argv, message", [
    (["--floor", "--narrow", "0"], "--narrow must be a positive integer"),
    (["--floor", "--sides", "original-bf16"], "--floor needs the ours-bf16 side"),
])
def test_train_vs_original_names_the_bad_argument(argv, message):
    proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
