"""ncu target: matvec_a16's two walks at M = 1 on one shape (default llama3-8b.gate_up).

    ncu --kernel-name regex:matvec_a16 python3 scripts/profile_a16_rows.py [N K]
"""
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.linear import _linear

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (28672, 4096)
rng = cp.random.default_rng(0)
w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
weight = w4kern.quantize_int4(w, group_size=128, symmetric=False)
x = rng.standard_normal((1, k), dtype=np.float32).astype(w4kern.bfloat16)
for kernel, config in (("a16", (2, 2)), ("a16_rows", (2, 1)), ("a16_rows", (2, 2))):
    _linear(x, weight, act="bf16", kernel=kernel, matvec_config=config)
cp.cuda.Device().synchronize()
print("done")
