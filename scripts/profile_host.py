"""Host-side cost of one op call (plain launches are Python-bound): cProfile of many calls.

    python3 scripts/profile_host.py
"""
import cProfile
import pstats
import time

import cupy as cp
import numpy as np

import w4kern

rng = cp.random.default_rng(0)
w = (rng.standard_normal((6144, 4096), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
weight = w4kern.quantize_int4(w, group_size=128, symmetric=False)
x = rng.standard_normal((1, 4096), dtype=np.float32).astype(w4kern.bfloat16)
xq = w4kern.quantize_q8(x)
out = cp.empty((1, 6144), dtype=w4kern.bfloat16)
q8_out = cp.empty((1, 128, 48), dtype=np.uint8)
calls = {
    "quantize_q8": lambda: w4kern.quantize_q8(x, out=q8_out),
    "linear preq": lambda: w4kern.linear(xq, weight, out=out),
    "linear q8": lambda: w4kern.linear(x, weight, out=out),
    "linear bf16": lambda: w4kern.linear(x, weight, act="bf16", out=out),
}
for name, fn in calls.items():
    for _ in range(50):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        fn()
    host = (time.perf_counter() - t0) / 2000 * 1e6
    cp.cuda.Device().synchronize()
    print(f"{name:<14} {host:7.1f} us host time per call")
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    calls["linear q8"]()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
