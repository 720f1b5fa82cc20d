"""Run fused_moe a few times on the benchmark's MoE layers, for ncu:

    ncu --metrics gpu__time_duration.sum python3 scripts/profile_moe.py [qwen3-30b-a3b|deepseek-v3] [T ...]

Random INT4 g128 asymmetric experts (w4kern.bench's generator), random routing.
W4KERN_PROFILE_ACTIVATION picks the activation (default int8).
"""
import os
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.bench import MOE_LAYERS, _random_int4_experts

name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
tokens = [int(a) for a in sys.argv[2:]] or [1, 16]
activation = os.environ.get("W4KERN_PROFILE_ACTIVATION", "int8")
experts, k, hidden, inter = MOE_LAYERS[name]
rng = cp.random.default_rng(0)
w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
for t in tokens:
    ids = cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
    weights = cp.full((t, k), 1.0 / k, dtype=np.float32)
    x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
    for _ in range(3):
        w4kern.fused_moe(x, w13, w2, weights, ids, activation=activation)
cp.cuda.Device().synchronize()
print("done", name, tokens)
