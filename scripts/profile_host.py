"""Host-side cost of one op call (plain launches are Python-bound): cProfile of many calls.

    python3 scripts/profile_host.py ["linear q8" attention ...]   (the calls to cProfile)
"""
import cProfile
import sys
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
q = rng.standard_normal((1, 32, 128), dtype=np.float32).astype(w4kern.bfloat16)
kc = rng.standard_normal((1, 8, 2048, 128), dtype=np.float32).astype(w4kern.bfloat16)
lens = cp.full(1, 2048, dtype=np.int32)
att_out = cp.empty_like(q)
ids = cp.argsort(rng.random((16, 128), dtype=np.float32), axis=1)[:, :8].astype(np.int32)
calls = {
    "quantize_q8": lambda: w4kern.quantize_q8(x, out=q8_out),
    "linear preq": lambda: w4kern.linear(xq, weight, out=out),
    "linear q8": lambda: w4kern.linear(x, weight, out=out),
    "linear bf16": lambda: w4kern.linear(x, weight, act="bf16", out=out),
    "attention": lambda: w4kern.decode_attention(q, kc, kc, lens, out=att_out),
    "moe_align": lambda: w4kern.moe_align_block_size(ids, 128, 64),
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
for name in sys.argv[1:] or ["linear q8"]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        calls[name]()
    prof.disable()
    print(f"--- {name}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
