"""The README's performance table, generated from one committed result file.

``python -m w4kern bench --table --from FILE.json`` prints it and
``--write-readme`` puts it into README.md between the ``perf-table`` markers,
whose first line names the file, so the numbers in the README are never typed
by hand (a CPU test regenerates the block and compares). Graph-replay times in
microseconds; each w4kern cell carries its efficiency against its own floor
(bytes it must move over the read bandwidth measured in the same run).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN = "<!-- perf-table:begin {path} -->"
END = "<!-- perf-table:end -->"
_BEGIN_RE = re.compile(r"<!-- perf-table:begin (\S+) -->")

#: decode linear columns: (heading, system)
LINEAR_COLUMNS = (("W4A8", "w4kern-w4a8"), ("W4A8 pre-quantized x", "w4kern-w4a8-preq"),
                  ("W4A8 per-token INT8", "w4kern-w4a8-int8"), ("W4A16", "w4kern-w4a16"),
                  ("W4A8 per-token INT8, tiled", "w4kern-w4a8-int8-tiled"), ("W4A16, tiled", "w4kern-w4a16-tiled"),
                  ("tinygemm", "tinygemm"), ("cuBLAS bf16", "cublas-bf16"), ("read ceiling", "read-ceiling"))
#: decode attention rows: (config, B, L)
ATTENTION_ROWS = tuple((name, b, length) for name in ("32/8/128", "32/16/256", "64/8/128")
                       for b, length in ((1, 2048), (1, 32768), (8, 8192), (64, 2048)))


def _index(record: dict, mode: str = "graph") -> dict:
    """{(op, frozen shape, system): row} for one timing mode."""
    return {(r["op"], tuple(sorted(r["shape"].items())), r["system"]): r for r in record["rows"] if r["mode"] == mode}


def _us(value: float) -> str:
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def _cell(row: dict | None, efficiency: bool) -> str:
    if row is None:
        return "-"
    if not efficiency:
        return _us(row["time_us"])
    share = "<1%" if row["efficiency"] < 0.005 else f"{row['efficiency']:.0%}"
    return f"{_us(row['time_us'])} ({share})"


def table(path: str | Path) -> str:
    """The markdown performance table of one result file."""
    record = json.loads(Path(path).read_text())
    env, ceilings = record["environment"], record["ceilings"]
    rows = _index(record)
    out = [f"{env['gpu']}, {env['date'][:10]}, commit {env['commit']}, read bandwidth "
           f"{ceilings['read_gbps']:.0f} GB/s; CUDA-graph replay, us (w4kern: % of its floor).", ""]

    linear = [r for (op, _, system), r in rows.items() if op == "linear" and system == "w4kern-w4a8"]
    if linear:
        out += ["| linear, INT4 g128 | M | " + " | ".join(h for h, _ in LINEAR_COLUMNS) + " | int4 floor |",
                "|---|---|" + "---|" * len(LINEAR_COLUMNS) + "---|"]
        for ref in linear:
            if ref["shape"]["M"] not in (1, 8):
                continue
            shape = tuple(sorted(ref["shape"].items()))
            cells = [_cell(rows.get(("linear", shape, system)), system.startswith("w4kern"))
                     for _, system in LINEAR_COLUMNS]
            out.append(f"| {ref['shape']['name']} | {ref['shape']['M']} | " + " | ".join(cells)
                       + f" | {_us(ref['floor_us'])} |")
        out.append("")

    def standalone_kernel(op, system, shape):   # not the quantizer rows of the decode suite
        return system == "w4kern" and (op == "dequantize_int4" or op == "quantize_q8" and "name" not in shape)

    kernels = [r for (op, _, system), r in rows.items() if standalone_kernel(op, system, r["shape"])]
    if kernels:
        out += ["| kernel | shape | w4kern | floor | torch ops |", "|---|---|---|---|---|"]
        for r in kernels:
            shape = tuple(sorted(r["shape"].items()))
            label = r["shape"].get("name") or ", ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "dtype")
            out.append(f"| {r['op']} | {label} | {_cell(r, True)} | {_us(r['floor_us'])} | "
                       f"{_cell(rows.get((r['op'], shape, 'torch-ops')), False)} |")
        out.append("")

    attention = [(name, b, length) for name, b, length in ATTENTION_ROWS
                 if ("decode_attention", tuple(sorted({"name": name, "B": b, "L": length}.items())), "w4kern") in rows]
    if attention:
        out += ["| decode_attention Hq/Hkv/D | B | L | w4kern | torch SDPA flash | floor |", "|---|---|---|---|---|---|"]
        for name, b, length in attention:
            shape = tuple(sorted({"name": name, "B": b, "L": length}.items()))
            ours = rows[("decode_attention", shape, "w4kern")]
            out.append(f"| {name} | {b} | {length} | {_cell(ours, True)} | "
                       f"{_cell(rows.get(('decode_attention', shape, 'torch-sdpa-flash')), False)} | "
                       f"{_us(ours['floor_us'])} |")
        out.append("")

    moe = [r for (op, _, system), r in rows.items() if op == "moe_align_block_size" and system == "w4kern"]
    if moe:
        out += ["| moe_align_block_size | T | w4kern | torch sort + count |", "|---|---|---|---|"]
        for r in moe:
            shape = tuple(sorted(r["shape"].items()))
            label = f"{r['shape']['name']} (E={r['shape']['E']}, k={r['shape']['k']}, block {r['shape']['block_size']})"
            out.append(f"| {label} | {r['shape']['T']} | {_us(r['time_us'])} | "
                       f"{_cell(rows.get(('moe_align_block_size', shape, 'torch-sort')), False)} |")
        out.append("")

    layers = [r for (op, _, system), r in rows.items() if op == "fused_moe" and system == "w4kern-bf16"]
    if layers:
        out += ["| fused_moe (INT4 g128 experts) | T | w4kern int8 | w4kern bf16 | torch grouped_mm bf16 | floor |",
                "|---|---|---|---|---|---|"]
        for r in layers:
            shape = tuple(sorted(r["shape"].items()))
            label = f"{r['shape']['name']} (E={r['shape']['E']}, k={r['shape']['k']})"
            out.append(f"| {label} | {r['shape']['T']} | {_cell(rows.get(('fused_moe', shape, 'w4kern-int8')), True)} "
                       f"| {_cell(r, True)} | {_cell(rows.get(('fused_moe', shape, 'torch-grouped_mm-bf16')), False)} "
                       f"| {_us(r['floor_us'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_block(readme_text: str) -> tuple[str, str, int, int] | None:
    """(result path, current table, start, end) of the README's perf-table block, or None."""
    match = _BEGIN_RE.search(readme_text)
    if match is None:
        return None
    start = match.end() + 1
    end = readme_text.index(END, start)
    return match.group(1), readme_text[start:end], start, end


def write_readme(readme: str | Path, result: str | Path) -> None:
    """Put the table of ``result`` (a path relative to the README's folder) into ``readme``."""
    readme = Path(readme)
    text = readme.read_text()
    found = readme_block(text)
    generated = table(readme.parent / result)
    if found is None:
        raise ValueError(f"{readme} has no '{BEGIN.format(path='FILE')}' ... '{END}' block")
    _, _, start, end = found
    begin_line = BEGIN.format(path=Path(result).as_posix())
    text = text[: text.rindex("<!--", 0, start)] + begin_line + "\n" + generated + text[end:]
    readme.write_text(text)
