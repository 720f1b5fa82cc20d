"""Benchmark plots from result files (no GPU): the committed results load, tabulate and draw."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from w4kern import plots

REPO = Path(__file__).parent.parent


def _record(tmp_path):
    record = {"environment": {"gpu": "TestGPU", "commit": "abc"}, "rows": [
        {"op": "linear", "shape": {"name": "a", "M": 1}, "system": "w4kern", "mode": "graph",
         "time_us": 10.0, "floor_us": 8.0, "efficiency": 0.8, "bytes_moved": 1},
        {"op": "linear", "shape": {"name": "a", "M": 1}, "system": "peer", "mode": "graph",
         "time_us": 20.0, "floor_us": 8.0, "efficiency": 0.4, "bytes_moved": 1},
        {"op": "linear", "shape": {"name": "a", "M": 1}, "system": "w4kern", "mode": "plain",
         "time_us": 30.0, "floor_us": 8.0, "efficiency": 0.27, "bytes_moved": 1},
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    return path


def test_load_and_tabulate(tmp_path):
    rows = plots.load(_record(tmp_path))
    assert rows[0]["gpu"] == "TestGPU" and len(rows) == 3
    assert plots.efficiency_table(rows, "linear") == {"a M=1": {"w4kern": 0.8, "peer": 0.4}}
    assert plots.efficiency_table(rows, "linear", "plain") == {"a M=1": {"w4kern": 0.27}}


def test_the_committed_results_plot(tmp_path):
    pytest.importorskip("matplotlib")
    files = sorted(plots.results_dir().glob("*.json"))
    assert files
    out = tmp_path / "all.png"
    plots.plot(plots.load(files), path=out)
    assert out.stat().st_size > 10_000


def test_plot_rejects_an_empty_selection(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no rows for ops"):
        plots.plot(plots.load(_record(tmp_path)), ops=["fused_moe"])


def test_bench_plot_from_results_needs_no_gpu(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    proc = subprocess.run([sys.executable, "-m", "w4kern", "bench", "--plot", str(out), "--from",
                           str(_record(tmp_path))], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000
    proc = subprocess.run([sys.executable, "-m", "w4kern", "bench", "--from", str(_record(tmp_path))],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--from needs --plot" in proc.stderr
