"""Sweep the W4A16 matvec's instance (tiles, split) and grid size on the dense
shapes of BENCHMARKS.md, graph mode, weights rotated past 4x the L2, beside the
instance and grid that w4kern.linear picks (A16_CANDIDATES, A16_WARPS_PER_SM).

--kinds instead times linear's own pick on weights of other group sizes and
symmetry (g32, g64, g128 asymmetric, g128 symmetric, per-channel): the same code
bytes with more or fewer group-scale loads per byte, which says what the scale
loads cost.

    python3 scripts/sweep_a16.py OUT.json [--quick] [--kinds]
"""
import json
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern._registry import A16_CONFIGS
from w4kern.bench import DENSE_SHAPES, Timer, _decode_weights, environment, measure_ceilings
from w4kern.linear import _a16_block_sets, _linear

OUT = sys.argv[1]
QUICK = "--quick" in sys.argv
KINDS = "--kinds" in sys.argv
MS = (1, 8)
#: (group size, symmetric) of the --kinds table
WEIGHT_KINDS = ((32, False), (64, False), (128, False), (128, True), (-1, False))


def sweep_kinds(timer, ceilings, rng):
    from w4kern.bench import _int4_copies, rotation_count

    rows = []
    shapes = list(DENSE_SHAPES.items())[:2] if QUICK else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
        x = rng.standard_normal((1, k), dtype=np.float32).astype(w4kern.bfloat16)
        xq = w4kern.quantize_q8(x)
        out = cp.empty((1, n), dtype=w4kern.bfloat16)
        for group_size, symmetric in WEIGHT_KINDS:
            base = w4kern.quantize_int4(w, group_size=group_size, symmetric=symmetric)
            weights = _int4_copies(base, rotation_count(base.nbytes, ceilings.l2_bytes, timer.launches))
            copies = len(weights)
            floor_us = base.nbytes / ceilings.read_gbps / 1e3
            us = timer.graph(lambda i: w4kern.linear(x, weights[i % copies], act="bf16", out=out))
            # control: the dp4a matvec on the same weights (one scale line per 8 groups)
            us_q8 = timer.graph(lambda i: w4kern.linear(xq, weights[i % copies], out=out))
            label = f"g{group_size}-{'sym' if symmetric else 'asym'}"
            print(f"{name} M=1 {label:10s} W4A16 {us:8.2f} us ({100 * floor_us / us:5.1f}% of floor), "
                  f"W4A8 pre-quantized {us_q8:8.2f} us; floor {floor_us:6.2f}", flush=True)
            rows.append({"shape": name, "N": n, "K": k, "M": 1, "weights": label, "us": us, "us_w4a8_preq": us_q8,
                         "floor_us": floor_us, "bytes": int(base.nbytes)})
            weights = base = None
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def main():
    timer = Timer()
    ceilings = measure_ceilings(timer)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    rng = cp.random.default_rng(7)
    if KINDS:
        rows = sweep_kinds(timer, ceilings, rng)
        with open(OUT, "w") as f:
            json.dump({"environment": environment(), "read_gbps": ceilings.read_gbps, "rows": rows}, f, indent=1)
        return
    rows = []
    shapes = list(DENSE_SHAPES.items())[:2] if QUICK else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        _, weights, _ = _decode_weights(rng, n, k, ceilings, timer)
        copies = len(weights)
        floor_us = weights[0].nbytes / ceilings.read_gbps / 1e3
        for m in MS:
            x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
            out = cp.empty((m, n), dtype=w4kern.bfloat16)
            default_us = timer.graph(lambda i: w4kern.linear(x, weights[i % copies], act="bf16", out=out))
            print(f"{name} M={m}: default {default_us:.2f} us ({100 * floor_us / default_us:.1f}% of floor)", flush=True)
            rows.append({"shape": name, "N": n, "K": k, "M": m, "config": "default", "us": default_us,
                         "floor_us": floor_us})
            for config in A16_CONFIGS:
                sets = _a16_block_sets(n, *config)
                for ctas in sorted({min(sets, sms), min(sets, 2 * sms), min(sets, 3 * sms), min(sets, 4 * sms)}):
                    us = timer.graph(lambda i: _linear(x, weights[i % copies], act="bf16", kernel="a16", out=out,
                                                       matvec_config=config, matvec_ctas=ctas))
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "config": list(config), "ctas": ctas,
                                 "us": us, "floor_us": floor_us})
                    print(f"  t{config[0]}-s{config[1]} ctas {ctas:5d}: {us:8.2f} us", flush=True)
        weights = None   # free the copies before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    with open(OUT, "w") as f:
        json.dump({"environment": environment(), "read_gbps": ceilings.read_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
