"""Time w4kern.linear's decode kernels built from several copies of cuda_src/ in
one process (one GPU, one clock state), so a kernel change is measured against
its baseline rather than against a number from another run or another lent GPU.

Each variant is a directory holding a full cuda_src/ tree (W4KERN_CUDA_SRC points
the runtime at it; the tree's own cuda_src/ is the variant "tree"). For each dense
shape of BENCHMARKS.md and each M it times, in graph mode (w4kern.bench.Timer,
weights rotated past 4x the L2), W4A8 with pre-quantized activations and W4A16,
and checks that every variant's output matches the first variant's to fp32
rounding. Beside them it times the read ceiling for the weight's bytes (the
decode suite's read-ceiling row): the membench kernel streaming as many bytes,
rotated the same way, which is what any kernel reading those bytes once can
reach in this harness (launch, ramp-up and tail included).

    python3 scripts/compare_sources.py OUT.json [label=DIR ...] [--m 1,8] [--quick] [--configs]
        [--paths w4a8-preq,w4a16,w4a8-int8-preq,w4a16-walk,w4a16-bulk,w4a8-int8-bulk,...]

The paths: W4A8 on pre-quantized Q8 blocks (dp4a), W4A16 and W4A8 on pre-quantized
per-token INT8 (matvec_a16's s8 instances); w4a16-walk is W4A16 forced onto
matvec_a16's tile walk (no row runs at one token). w4a16-bulk and w4a8-int8-bulk
(matvec_bulk) and w4a16-tiled-walk and w4a8-int8-tiled-walk (matvec_a16's tiled
walk) run on copies prepared by w4kern.prepare (sm_90). --configs times the last two once per
(tiles, split) instance of A16_CONFIGS as well as with the dispatch's choice, and at
M = 1 W4A16's row-run walk once per instance of A16_ROW_CONFIGS.
"""
import json
import os
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.bench import DENSE_SHAPES, Timer, _decode_weights, _read_ceiling, environment, measure_ceilings

from w4kern._registry import A16_CONFIGS, A16_ROW_CONFIGS
from w4kern.linear import _linear

args = [a for i, a in enumerate(sys.argv) if i > 0 and not a.startswith("--") and sys.argv[i - 1] not in ("--m", "--paths")]
OUT = args[0]
VARIANTS = [("tree", None)] + [tuple(a.split("=", 1)) for a in args[1:]]
MS = (1, 8)
for i, a in enumerate(sys.argv):
    if a == "--m":
        MS = tuple(int(v) for v in sys.argv[i + 1].split(","))
QUICK = "--quick" in sys.argv
PATHS = {"w4a8-preq": "q8", "w4a16": "bf16", "w4a8-int8-preq": "int8"}
#: paths that force one kernel where the dispatch would pick another: W4A16 on
#: matvec_a16's tile walk at every M (the dispatch takes the row-run walk for one
#: token from A16_ROWS_MIN_K)
#: path -> (act, kernel, on Int4TiledWeight copies from w4kern.prepare)
FORCED = {"w4a16-walk": ("bf16", "a16", False),
          # on the prepared (tiled) copies: matvec_bulk, and matvec_a16's tiled walk
          "w4a16-bulk": ("bf16", "bulk", True), "w4a8-int8-bulk": ("int8", "bulk", True),
          "w4a16-tiled-walk": ("bf16", "a16", True), "w4a8-int8-tiled-walk": ("int8", "a8", True)}
TILED = {path for path, (_, _, tiled) in FORCED.items() if tiled}
if "--paths" in sys.argv:   # a subset of PATHS, comma-separated
    PATHS = {p: PATHS[p] if p in PATHS else FORCED[p][0]
             for p in sys.argv[sys.argv.index("--paths") + 1].split(",")}
CONFIGS = "--configs" in sys.argv


def use(src):
    if src is None:
        os.environ.pop("W4KERN_CUDA_SRC", None)
    else:
        os.environ["W4KERN_CUDA_SRC"] = os.path.abspath(src)


def main():
    timer = Timer()
    ceilings = measure_ceilings(timer)
    rng = cp.random.default_rng(5)
    rows = []
    shapes = list(DENSE_SHAPES.items())[:2] if QUICK else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        _, weights, _ = _decode_weights(rng, n, k, ceilings, timer)
        copies = len(weights)
        tiled = [w4kern.prepare(w) for w in weights] if TILED & set(PATHS) else None
        use(None)
        ceiling_us = _read_ceiling(timer, ceilings, ("graph",), {"name": name}, weights[0].nbytes, copies)[0].time_us
        floor_us = weights[0].nbytes / ceilings.read_gbps / 1e3
        print(f"{name}: weight bytes {weights[0].nbytes}, floor {floor_us:.2f} us, "
              f"read ceiling {ceiling_us:.2f} us", flush=True)
        rows.append({"shape": name, "N": n, "K": k, "system": "read-ceiling", "us": ceiling_us,
                     "bytes": int(weights[0].nbytes), "floor_us": floor_us})
        for m in MS:
            x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
            xq = w4kern.quantize_q8(x)
            xi = w4kern.quantize_per_token_int8(x)
            for path, act, config in [(p, a, None) for p, a in PATHS.items()] + [
                    (f"{p}-t{c[0]}s{c[1]}", a, c) for p, a in PATHS.items() if CONFIGS and a != "q8"
                    for c in A16_CONFIGS] + [
                    (f"w4a16rows-t{c[0]}s{c[1]}", "bf16", c) for c in A16_ROW_CONFIGS if CONFIGS and m == 1]:
                first = None
                kernel = ("a16_rows" if path.startswith("w4a16rows") else
                          {"q8": None, "bf16": "a16", "int8": "a8"}[act]) if config else None
                if path in FORCED:
                    kernel = FORCED[path][1]
                ws = tiled if path in TILED else weights
                for label, src in VARIANTS:
                    use(src)
                    out = cp.full((m, n), np.nan, dtype=np.float32)
                    arg = {"q8": xq, "int8": xi}.get(act, x)
                    _linear(arg, ws[0], act=act, out=out, kernel=kernel, matvec_config=config)
                    if first is None:
                        first = out.copy()
                    else:
                        err = float(cp.abs(out - first).max() / (cp.abs(first).max() + 1e-30))
                        if not err < 1e-5:
                            print(f"  {label} {path} M={m}: output differs from {VARIANTS[0][0]} (rel {err:.2e})")
                    out16 = cp.empty((m, n), dtype=w4kern.bfloat16)   # timed with the README's output dtype
                    us = timer.graph(lambda i: _linear(arg, ws[i % copies], act=act, out=out16, kernel=kernel,
                                                       matvec_config=config))
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "system": f"{path}:{label}", "us": us,
                                 "floor_us": floor_us, "pct_floor": 100 * floor_us / us})
                    print(f"  M={m} {path:10s} {label:10s} {us:8.2f} us  {100 * floor_us / us:5.1f}% of floor "
                          f"{100 * ceiling_us / us:5.1f}% of the "
                          f"read ceiling", flush=True)
        use(None)
        weights = tiled = ws = None   # free the copies before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    with open(OUT, "w") as f:
        json.dump({"environment": environment(), "read_gbps": ceilings.read_gbps,
                   "variants": dict(VARIANTS), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
