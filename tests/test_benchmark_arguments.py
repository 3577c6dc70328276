"""benchmarks/train_vs_original.py refuses bad arguments with one sentence, before it builds anything."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_vs_original.py")


@pytest.mark.parametrize("argv, message", [
    (["--original", "/nonexistent", "--sides", "ours-fp32,nope"], "unknown side 'nope'"),
    (["--original", "/nonexistent", "--sides", "ours-fp32", "--text-tokens", "8"], "--text-tokens must be at least 64"),
])
def test_train_vs_original_names_the_bad_argument(argv, message):
    proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_train_vs_original_names_a_checkout_without_the_models(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--original", str(tmp_path), "--sides", "ours-fp32",
                           "--preset", "tiny", "--rounds", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "holds no models/vision_language_model.py" in proc.stderr, proc.stderr
