"""fused_moe(activation="int8") decode paths side by side, in one process: the
four-launch path (moe_decode.cu's quantizers around matvec_q8's item GEMMs)
against the one-kernel path (moe_decode_fused.cu), with its GEMM2 config as the
rule picks it and with each registered one, on the benchmark's MoE layers
(random INT4 g128 asymmetric experts, bf16 x), graph mode. Routing rotates over
disjoint expert sets at T = 1 and random sets beyond, as the moe suite does.

    python scripts/sweep_moe_decode.py OUT.json [--tokens 1,2,4] [--layers qwen3-30b-a3b]
        [--src LABEL=DIR ...]   (the fused kernel also compiled from another cuda_src copy)

Behind w4kern.moe.MOE_DECODE_FUSED_MAX_TOKENS.
"""
import argparse
import json
import os
import sys

import numpy as np


def main():
    import cupy as cp

    import w4kern
    from w4kern import bench, moe
    from w4kern._registry import MOE_FUSED_GEMM2_CONFIGS, MOE_FUSED_MAX_X_BYTES
    from w4kern.linear import _gpu_name

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", default="1,2,3,4,6,8,16")
    ap.add_argument("--layers", default=",".join(bench.MOE_LAYERS))
    ap.add_argument("--src", action="append", default=[], help="LABEL=DIR: a variant source tree")
    args = ap.parse_args()
    timer = bench.Timer()
    rng = cp.random.default_rng(6)
    rows = []
    for name in args.layers.split(","):
        experts, k, hidden, inter = bench.MOE_LAYERS[name]
        w13 = bench._random_int4_experts(cp, rng, experts, 2 * inter, hidden)
        w2 = bench._random_int4_experts(cp, rng, experts, hidden, inter)
        per_expert = bench._expert_bytes(w13) + bench._expert_bytes(w2)
        for t in map(int, args.tokens.split(",")):
            sets = max(1, min(experts // k, timer.launches)) if t == 1 else min(timer.launches, 4)
            perm = np.random.default_rng(t).permutation(experts).astype(np.int32)
            id_sets = [cp.asarray(perm[(i * k) % experts:(i * k) % experts + k].reshape(1, k)) if t == 1 else
                       cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
                       for i in range(sets)]
            touched = float(np.mean([len(np.unique(cp.asnumpy(ids))) for ids in id_sets]))
            weights = cp.full((t, k), 1.0 / k, dtype=np.float32)
            x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
            out = cp.empty((t, hidden), dtype=w4kern.bfloat16)

            def chain(i):
                saved, moe.MOE_DECODE_FUSED_MAX_TOKENS = moe.MOE_DECODE_FUSED_MAX_TOKENS, {"default": 0}
                w4kern.fused_moe(x, w13, w2, weights, id_sets[i % sets], activation="int8", out=out)
                moe.MOE_DECODE_FUSED_MAX_TOKENS = saved

            def fused(i, config=None, src=None):
                if src is not None:
                    os.environ["W4KERN_CUDA_SRC"] = src
                moe._fused_moe_decode_fused(cp, x, w13, w2, weights, id_sets[i % sets], out, config2=config)
                os.environ.pop("W4KERN_CUDA_SRC", None)

            variants = [("four-launch", chain)]
            if t * (hidden // 32) * 48 <= MOE_FUSED_MAX_X_BYTES:   # where the fused kernel applies
                variants += [("fused", fused)]
                variants += [(f"fused-{c[1]}-{c[2]}-{c[3]}", lambda i, c=c: fused(i, c))
                             for c in MOE_FUSED_GEMM2_CONFIGS]
                variants += [(f"fused@{spec.split('=')[0]}", lambda i, d=spec.split("=", 1)[1]: fused(i, src=d))
                             for spec in args.src]
            bits = {}
            for label, fn in variants:
                try:
                    us = timer.graph(fn)
                except Exception:
                    print(f"{name} T={t} {label} failed", flush=True)
                    raise
                fn(0)
                bits[label] = cp.asnumpy(out).view(np.uint16).copy()
                row = {"layer": name, "T": t, "variant": label, "graph_us": round(us, 2),
                       "touched_experts": touched, "int4_mb": round(touched * per_expert / 1e6, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            same = {label: bool(np.array_equal(b, bits["four-launch"])) for label, b in bits.items()}
            print(f"{name} T={t}: the four-launch bits (GEMM2 configs differ in summation order): {same}",
                  flush=True)
            del x, out, weights, id_sets
        del w13, w2
        cp.get_default_memory_pool().free_all_blocks()
    with open(args.out, "w") as f:
        json.dump({"gpu": _gpu_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
