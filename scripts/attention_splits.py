"""Time decode_attention per forced split count (graph mode), to set the split rule.

    python3 scripts/attention_splits.py
"""
import cupy as cp
import numpy as np

import w4kern
from w4kern.bench import Timer

timer = Timer(warmup=3, repeats=7, launches=20)
rng = cp.random.default_rng(0)
for (hq, hkv, d), b, length in [((32, 8, 128), 1, 2048), ((32, 16, 256), 1, 2048), ((64, 8, 128), 1, 2048),
                                ((32, 8, 128), 1, 8192), ((32, 8, 128), 1, 32768), ((32, 8, 128), 8, 8192),
                                ((32, 16, 256), 1, 32768), ((64, 8, 128), 64, 2048)]:
    q = rng.standard_normal((b, hq, d), dtype=np.float32).astype(w4kern.bfloat16)
    copies = max(1, min(20, (256 << 20) // (2 * b * hkv * length * d * 2) + 1))
    ks = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
    vs = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
    lens = cp.full(b, length, dtype=np.int32)
    out = cp.empty((b, hq, d), dtype=w4kern.bfloat16)
    floor = 2 * b * hkv * length * d * 2 / 4.5e6   # us at 4.5 TB/s
    line = [f"{hq}/{hkv}/{d} B={b} L={length} floor={floor:.1f}us"]
    for splits in (None, 1, 8, 16, 24, 32, 33, 49, 66, 99, 132, 198, 264):
        t = timer.graph(lambda i, s=splits: w4kern.decode_attention(q, ks[i % copies], vs[i % copies], lens,
                                                                      num_splits=s, out=out))
        line.append(f"{splits}:{t:.1f}")
    print(" ".join(line), flush=True)
