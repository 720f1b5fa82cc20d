"""Persistent-grid size A/B of the decode matvecs: the default grid (every resident
CTA slot, min(sets, SMs x resident)) against a balanced one (the fewest CTAs that
still finish in as many rounds of sets: ceil(sets / rounds)), and a few others.

An issue-bound kernel loses the slots that sit idle while the last round's CTAs
finish; a memory-bound one does not (the busy CTAs take the bandwidth). Graph mode,
weights rotated past 4x the L2, M = 1.

    python3 scripts/sweep_grid.py OUT.json
"""
import json
import sys

import cupy as cp
import numpy as np

import w4kern
import importlib

from w4kern.bench import DENSE_SHAPES, Timer, _decode_weights, environment, measure_ceilings

lin = importlib.import_module("w4kern.linear")   # the module (w4kern.linear is the function)

# (label, kernel, act, config, sets(n) for that config)
PATHS = [
    ("q8-m1r8s1", "matvec", "q8", (1, 8, 1, 1), lambda n: -(-(-(-n // 8)) // 4)),
    ("q8-m1r8s4", "matvec", "q8", (1, 8, 1, 4), lambda n: -(-(-(-n // 8)) // 1)),
    ("a16-t2s2", "a16", "bf16", (2, 2), lambda n: lin._a16_block_sets(n, 2, 2)),
    ("a16-t1s8", "a16", "bf16", (1, 8), lambda n: lin._a16_block_sets(n, 1, 8)),
    ("a16rows-t2s1", "a16_rows", "bf16", (2, 1), lambda n: lin._a16_block_sets(n, 2, 1, True)),
    ("a16rows-t2s2", "a16_rows", "bf16", (2, 2), lambda n: lin._a16_block_sets(n, 2, 2, True)),
]


def main(out):
    timer = Timer()
    ceilings = measure_ceilings(timer)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    rng = cp.random.default_rng(7)
    rows = []
    for name, (n, k) in DENSE_SHAPES.items():
        _, weights, _ = _decode_weights(rng, n, k, ceilings, timer)
        copies = len(weights)
        x = rng.standard_normal((1, k), dtype=np.float32).astype(w4kern.bfloat16)
        xq = w4kern.quantize_q8(x)
        out16 = cp.empty((1, n), dtype=w4kern.bfloat16)
        for label, kernel, act, config, sets_of in PATHS:
            arg = xq if act == "q8" else x
            sets = sets_of(n)
            lin._PLANS.clear()
            lin._linear(arg, weights[0], act=act, kernel=kernel, out=out16, matvec_config=config)   # compile, plan
            default_ctas = list(lin._PLANS.values())[-1][1][0]   # min(sets, SMs x resident CTAs)
            rounds = -(-sets // default_ctas)
            grids = {"default": default_ctas, "balanced": -(-sets // rounds), "sms": min(sets, sms)}
            for glabel, ctas in grids.items():
                us = timer.graph(lambda i, c=ctas: lin._linear(arg, weights[i % copies], act=act, kernel=kernel,
                                                               out=out16, matvec_config=config, matvec_ctas=c))
                rows.append({"shape": name, "path": label, "grid": glabel, "ctas": ctas, "sets": sets, "us": us})
                print(f"{name:20s} {label:14s} sets {sets:6d} {glabel:12s} ctas {str(ctas):6s} {us:8.2f} us", flush=True)
        weights = None
        cp.get_default_memory_pool().free_all_blocks()
    with open(out, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
