"""Three decode_attention calls per config, for ncu (profile one launch of each kernel).

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum python3 scripts/profile_attention.py
"""
import cupy as cp, numpy as np, w4kern
rng = cp.random.default_rng(0)
for (hq, hkv, d), b, L in [((32, 8, 128), 1, 32768), ((32, 8, 128), 8, 8192), ((32, 8, 128), 1, 2048), ((32, 8, 128), 64, 2048)]:
    q = rng.standard_normal((b, hq, d), dtype=np.float32).astype(w4kern.bfloat16)
    k = rng.standard_normal((b, hkv, L, d), dtype=np.float32).astype(w4kern.bfloat16)
    v = rng.standard_normal((b, hkv, L, d), dtype=np.float32).astype(w4kern.bfloat16)
    lens = cp.full(b, L, dtype=np.int32)
    for _ in range(3):
        w4kern.decode_attention(q, k, v, lens)
    cp.cuda.Device().synchronize()
