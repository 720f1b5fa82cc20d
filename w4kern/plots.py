"""Plots of benchmark results (``benchmarks/results/*.json``): achieved bandwidth
against the floor and the peers, per op and shape.

Used by ``notebooks/03_performance.ipynb`` and ``python -m w4kern bench --plot``.
matplotlib is imported only when a figure is drawn (the ``notebooks`` and
``test`` extras bring it).
"""
from __future__ import annotations

import json
from pathlib import Path


def results_dir() -> Path | None:
    """``benchmarks/results`` of a source checkout, or None for an installed package."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    return path if path.is_dir() else None


def load(paths) -> list[dict]:
    """Rows of one or more result files, each row tagged with its file's GPU and commit."""
    rows = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        record = json.loads(Path(path).read_text())
        env = record.get("environment", {})
        for row in record.get("rows", []):
            rows.append({**row, "gpu": env.get("gpu"), "commit": env.get("commit"), "file": Path(path).name})
    return rows


def _label(shape: dict) -> str:
    if "name" in shape:
        return str(shape["name"]) + (f" M={shape['M']}" if "M" in shape else "")
    return ",".join(f"{k}={v}" for k, v in shape.items())


def efficiency_table(rows: list[dict], op: str, mode: str = "graph") -> dict[str, dict[str, float]]:
    """{shape label: {system: floor / time}} for one op and timing mode (the last row wins
    when a file holds the same measurement twice)."""
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["op"] != op or row["mode"] != mode:
            continue
        table.setdefault(_label(row["shape"]), {})[row["system"]] = row["efficiency"]
    return table


def plot(rows: list[dict], ops=None, mode: str = "graph", path=None):
    """One panel per op: per shape, each system's efficiency (floor / time; 1.0 is
    the memory floor). Returns the matplotlib Figure; saves it to ``path`` if given."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'w4kern[notebooks]'") from e
    ops = sorted({r["op"] for r in rows}) if ops is None else list(ops)
    tables = [(op, efficiency_table(rows, op, mode)) for op in ops]
    tables = [(op, t) for op, t in tables if t]
    if not tables:
        raise ValueError(f"no rows for ops {ops} in mode {mode!r}")
    height = sum(max(2.0, 0.28 * len(t)) for _, t in tables) + 1.0
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, height), squeeze=False)
    for ax, (op, table) in zip(axes[:, 0], tables):
        labels = list(table)
        systems = sorted({s for v in table.values() for s in v})
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            ys = [table[label].get(system, 0.0) for label in labels]
            ax.barh([j + i * width for j in range(len(labels))], ys, height=width, label=system)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("floor / time (1.0 = memory floor)")
        ax.set_title(f"{op} ({mode})", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
