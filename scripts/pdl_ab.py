"""Programmatic dependent launches on and off, in one process: W4KERN_PDL=never,
the default without the ops' first kernels (_runtime.FIRST_KERNEL_PDL off), and the
default ("graph") for every op chain that uses them (fused_moe's decode
paths, linear's quantizer + matvec at M = 1 and 8, decode_attention's split merge),
graph mode (w4kern.bench.Timer), inputs rotated past the L2. Each mode is timed
twice, alternating, and the median printed.

    python3 scripts/pdl_ab.py [OUT.json]
"""
import os, statistics, sys, json
import cupy as cp
import numpy as np
import w4kern
from w4kern import _runtime
from w4kern.bench import MOE_LAYERS, Timer, _random_int4_experts

timer = Timer(warmup=3, repeats=9, launches=20)
rng = cp.random.default_rng(0)
results = {}

def ab(label, fn):
    # never: no programmatic launch; within: only within an op's chain (the op's
    # first kernel a plain launch); graph: the default (first kernels too)
    got = {"never": [], "within": [], "graph": []}
    for _ in range(2):
        for mode in got:
            os.environ["W4KERN_PDL"] = "never" if mode == "never" else "graph"
            _runtime.FIRST_KERNEL_PDL = mode != "within"
            got[mode].append(timer.graph(fn))
    os.environ.pop("W4KERN_PDL", None)
    _runtime.FIRST_KERNEL_PDL = True
    n, w, g = (statistics.median(got[m]) for m in ("never", "within", "graph"))
    results[label] = {"never_us": n, "within_op_us": w, "pdl_us": g, "runs": got}
    print(f"{label:40s} plain {n:8.2f} us   within-op {w:8.2f} us   all {g:8.2f} us   {100 * (g / n - 1):+.1f}%  "
          f"first-kernel {100 * (g / w - 1):+.1f}%", flush=True)

for name, t in (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("deepseek-v3", 1)):
    e, k, h, inter = MOE_LAYERS[name]
    w13 = _random_int4_experts(cp, rng, e, 2 * inter, h)
    w2 = _random_int4_experts(cp, rng, e, h, inter)
    perm = np.random.default_rng(t).permutation(e).astype(np.int32)
    sets = [cp.asarray(perm[(i * k) % e:(i * k) % e + k].reshape(1, k)) if t == 1 else
            cp.argsort(rng.random((t, e), dtype=np.float32), axis=1)[:, :k].astype(np.int32) for i in range(16)]
    wts = cp.full((t, k), 1.0 / k, dtype=np.float32)
    x = rng.standard_normal((t, h), dtype=np.float32).astype(w4kern.bfloat16)
    out = cp.empty((t, h), dtype=w4kern.bfloat16)
    for act in ("int8", "bf16"):
        ab(f"fused_moe {name} T={t} {act}",
           lambda i, a=act: w4kern.fused_moe(x, w13, w2, wts, sets[i % len(sets)], activation=a, out=out))
    del w13, w2

for name, n, kdim, copies in (("llama3-8b.qkv", 6144, 4096, 20), ("llama3-8b.gate_up", 28672, 4096, 5),
                              ("gemma3-27b.down", 5376, 21504, 5)):
    ws = [w4kern.quantize_int4(rng.standard_normal((n, kdim), dtype=np.float32), group_size=128)
          for _ in range(copies)]
    for m in (1, 8):
        x = rng.standard_normal((m, kdim), dtype=np.float32).astype(w4kern.bfloat16)
        out = cp.empty((m, n), dtype=w4kern.bfloat16)
        for act in ("q8", "int8"):
            ab(f"linear {name} M={m} {act}", lambda i, a=act: w4kern.linear(x, ws[i % copies], act=a, out=out))
    del ws

copies = 30
kv = [(rng.standard_normal((1, 8, 2048, 128), dtype=np.float32).astype(w4kern.bfloat16),
       rng.standard_normal((1, 8, 2048, 128), dtype=np.float32).astype(w4kern.bfloat16)) for _ in range(copies)]
q = rng.standard_normal((1, 32, 128), dtype=np.float32).astype(w4kern.bfloat16)
lens = cp.full((1,), 2048, dtype=np.int32)
out = cp.empty_like(q)
ab("decode_attention 32/8/128 B=1 L=2048", lambda i: w4kern.decode_attention(q, *kv[i % copies], lens, out=out))
if len(sys.argv) > 1:
    json.dump(results, open(sys.argv[1], "w"), indent=1)
