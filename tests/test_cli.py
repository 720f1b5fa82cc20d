"""`python -m w4kern` subcommands on a machine without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from w4kern.__main__ import gpu_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "w4kern", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def test_info_lists_kernels_and_cache():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("w4kern 0.1.0", "kernel cache:", "quantize_q8", "dequant_int4", "cuda sources:"):
        assert word in proc.stdout


def test_demo_numpy_path_small():
    proc = run("demo", "--cpu", "--n", "256", "--k", "512", "--m", "3")
    assert proc.returncode == 0, proc.stderr
    assert "NumPy path" in proc.stdout and "W4A8 (int4 weight, Q8 x)" in proc.stdout
    cos = float(proc.stdout.split("W4A8 (int4 weight, Q8 x)")[1].split("cosine")[1].split()[0])
    assert 0.98 < cos < 1.0


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU: bench would run for minutes")
def test_bench_without_gpu_says_why():
    proc = run("bench")
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_unknown_command_fails():
    assert run("frobnicate").returncode == 2
