"""Sweep the MoE decode path's matvec items launch (config x CTAs per item) on the
benchmark's expert GEMM shapes; prints microseconds per launch (mean of 40
back-to-back launches, routing rotated over disjoint experts so no launch finds
its weights in L2) and the share of the measured read bandwidth. Writes JSON to
argv[1] if given.

    python3 scripts/sweep_moe_items.py [OUT.json]
"""
import json
import sys

import cupy as cp
import numpy as np

from w4kern.bench import MOE_LAYERS, Timer, _random_int4_experts, measure_ceilings
from w4kern.linear import MATVEC_CANDIDATES, _launch_matvec_items

rng = cp.random.default_rng(0)
read_gbps = measure_ceilings(Timer()).read_gbps
rows = []
for name, (experts, k_sel, hidden, inter) in MOE_LAYERS.items():
    for gemm, (n, k) in (("w13", (2 * inter, hidden)), ("w2", (hidden, inter))):
        w = _random_int4_experts(cp, rng, experts, n, k)
        per_expert = (w.qweight.nbytes + w.scales.nbytes + w.zeros.nbytes) // experts
        for items in (8, 128):
            act = cp.zeros((items, k // 32, 48), dtype=np.uint8)
            out = cp.empty((items, n), dtype=np.float32)
            perm = np.random.default_rng(items).permutation(experts).astype(np.int32)
            sets = [cp.asarray(np.resize(np.roll(perm, -i * items), items)) for i in range(16)]
            touched = np.mean([len(np.unique(cp.asnumpy(s))) for s in sets])
            floor_us = touched * per_expert / read_gbps / 1e3
            n_sets = {c: -(-(-(-n // c[1])) // (4 // c[3])) for c in MATVEC_CANDIDATES[("int4", 1)]}
            for config in (None,) + MATVEC_CANDIDATES[("int4", 1)]:
                grids = [None] if config is None else sorted({n_sets[config], max(1, n_sets[config] // 2),
                                                             max(1, n_sets[config] // 4), max(1, 792 // items)})
                for ctas in grids:
                    def launch(i):
                        _launch_matvec_items(cp, w, act, out, sets[i % 16], 1, config=config, ctas=ctas)
                    for i in range(3):
                        launch(i)
                    start, end = cp.cuda.Event(), cp.cuda.Event()
                    start.record()
                    for i in range(40):
                        launch(i)
                    end.record()
                    end.synchronize()
                    us = cp.cuda.get_elapsed_time(start, end) * 1e3 / 40
                    row = dict(layer=name, gemm=gemm, n=n, k=k, items=items, config=config, ctas=ctas, us=round(us, 2),
                               floor_us=round(floor_us, 2), eff=round(floor_us / us, 3))
                    rows.append(row)
                    print(row, flush=True)
        del w
        cp.get_default_memory_pool().free_all_blocks()
if len(sys.argv) > 1:
    json.dump({"read_gbps": read_gbps, "rows": rows}, open(sys.argv[1], "w"), indent=1)
