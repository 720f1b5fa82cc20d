"""matvec_bulk (the tiled walk fed by the copy engine, sm_90) against matvec_a16's
tiled walk on the same Int4TiledWeight, in one process: graph mode, weights
rotated past 4x the L2, W4A16 (bf16 x) and W4A8 on pre-quantized per-token INT8 x,
on the five dense shapes. Checks both kernels against each other first (the same
math summed in another order: fp32 rounding apart). The evidence behind
linear.BULK_MAX_TILES.

    python3 scripts/bulk_ab.py OUT.json [--m 1,8] [--quick]
"""
import json
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.bench import DENSE_SHAPES, Timer, _decode_weights, _read_ceiling, environment, measure_ceilings
from w4kern.linear import _linear

OUT = sys.argv[1]
MS = (1, 8)
if "--m" in sys.argv:
    MS = tuple(int(v) for v in sys.argv[sys.argv.index("--m") + 1].split(","))
QUICK = "--quick" in sys.argv


def main():
    timer = Timer()
    ceilings = measure_ceilings(timer)
    rng = cp.random.default_rng(5)
    rows = []
    shapes = list(DENSE_SHAPES.items())[:2] if QUICK else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        _, weights, _ = _decode_weights(rng, n, k, ceilings, timer)
        copies = len(weights)
        tiled = [w4kern.prepare(w) for w in weights]
        weights = None
        ceiling_us = _read_ceiling(timer, ceilings, ("graph",), {"name": name}, tiled[0].nbytes, copies)[0].time_us
        floor_us = tiled[0].nbytes / ceilings.read_gbps / 1e3
        print(f"{name}: {-(-n // 16)} tiles, floor {floor_us:.2f} us, read ceiling {ceiling_us:.2f} us", flush=True)
        rows.append({"shape": name, "N": n, "K": k, "system": "read-ceiling", "us": ceiling_us, "floor_us": floor_us})
        for m in MS:
            x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
            xi = w4kern.quantize_per_token_int8(x)
            for act, arg, walk in (("bf16", x, "a16"), ("int8", xi, "a8")):
                outs = {}
                for kernel in (walk, "bulk", None):
                    out = cp.full((m, n), np.nan, dtype=np.float32)
                    outs[kernel] = _linear(arg, tiled[0], act=act, out=out, kernel=kernel)
                    out16 = cp.empty((m, n), dtype=w4kern.bfloat16)
                    us = timer.graph(lambda i: _linear(arg, tiled[i % copies], act=act, out=out16, kernel=kernel))
                    label = kernel or "auto"
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "act": act, "kernel": label, "us": us,
                                 "floor_us": floor_us, "pct_floor": 100 * floor_us / us})
                    print(f"  M={m} {act:5s} {label:5s} {us:8.2f} us {100 * floor_us / us:5.1f}% of floor", flush=True)
                ref = outs[walk]
                err = float(cp.abs(outs["bulk"] - ref).max() / (cp.abs(ref).max() + 1e-30))
                print(f"  M={m} {act}: bulk vs {walk} max rel diff {err:.1e}{'' if err < 1e-5 else ' MISMATCH'}")
                rows.append({"shape": name, "M": m, "act": act, "bulk_vs_walk_rel": err})
        tiled = None
        cp.get_default_memory_pool().free_all_blocks()
    with open(OUT, "w") as f:
        json.dump({"environment": environment(), "read_gbps": ceilings.read_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
