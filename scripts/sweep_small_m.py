"""Sweep the tensor-core small-M kernel's grid (CTAs aimed per SM, hence the
split-K count) on the five dense decode shapes at M = 1 and 8; prints graph-replay
microseconds per call (w4kern.bench.Timer: weights rotated past 4x the L2) and
the share of the measured read bandwidth. Writes JSON to argv[1] if given.

    python3 scripts/sweep_small_m.py [OUT.json]
"""
import json
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.bench import DENSE_SHAPES, Timer, _decode_weights, _linear_bytes, measure_ceilings
from w4kern.linear import _linear, small_m_splits

timer = Timer()
ceilings = measure_ceilings(timer)
sm_count = cp.cuda.Device().attributes["MultiProcessorCount"]
rng = cp.random.default_rng(0)
rows = []
for name, (n, k) in DENSE_SHAPES.items():
    _, weights, _ = _decode_weights(rng, n, k, ceilings, timer)
    copies = len(weights)
    for m in (1, 8):
        x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
        xq = w4kern.quantize_q8(x)
        out = cp.empty((m, n), dtype=w4kern.bfloat16)
        floor_us = _linear_bytes(weights[0], m, k, n, "q8") / ceilings.read_gbps / 1e3
        for act in ("q8",):
            for ctas in (1, 2, 3, 4, 6, 8, 12, 16):
                us = timer.graph(lambda i, ws=weights, c=ctas: _linear(xq, ws[i % copies], kernel="small_m", out=out,
                                                                        ctas_per_sm=c))
                splits, per_split = small_m_splits(n, k, sm_count, ctas)
                row = dict(shape=name, n=n, k=k, m=m, act=act, ctas_per_sm=ctas, splits=splits,
                           grid=-(-n // 64) * splits, us=round(us, 2), floor_us=round(floor_us, 2),
                           eff=round(floor_us / us, 3))
                rows.append(row)
                print(row, flush=True)
    del weights
    cp.get_default_memory_pool().free_all_blocks()
if len(sys.argv) > 1:
    json.dump({"read_gbps": ceilings.read_gbps, "rows": rows}, open(sys.argv[1], "w"), indent=1)
