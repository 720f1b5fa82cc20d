"""Run each linear kernel a few times on one decode shape, for ncu / nsys.

    ncu --kernel-name regex:"matvec|gemm_small" python3 scripts/profile_linear.py [N K]

W4KERN_PROFILE_PATHS="a16-bf16 matvec-q8" limits the (kernel, act) pairs; "bulk-bf16"
and "bulk-int8" run matvec_bulk on the prepared weight (sm_90), the latter on
per-token INT8 x.
"""
import os
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern.linear import _linear

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (28672, 4096)
rng = cp.random.default_rng(0)
w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
weight = w4kern.quantize_int4(w, group_size=128, symmetric=False)
tiled = None
for m in (1, 8):
    x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
    paths = os.environ.get("W4KERN_PROFILE_PATHS", "matvec-q8 small_m-q8 small_m-bf16 a16-bf16").split()
    for kernel, act in (p.split("-") for p in paths):
        if kernel == "bulk":
            if tiled is None:
                tiled = w4kern.prepare(weight)
            arg = w4kern.quantize_per_token_int8(x) if act == "int8" else x
            for _ in range(2):
                _linear(arg, tiled, act=act, kernel=kernel)
            continue
        for _ in range(2):
            _linear(x, weight, act=act, kernel=kernel)
cp.cuda.Device().synchronize()
print("done")
