"""fused_moe built several ways in one process, graph mode (the moe bench suite's
routing: disjoint expert sets rotated at T = 1, random at larger T), interleaved
over repeats so that a drift of the GPU or host hits every variant alike:
  tree              the working tree
  NAME=DIR          the tree's Python with cuda_src/ from DIR (W4KERN_CUDA_SRC)
  pool              the tree, but every workspace scratch buffer a fresh CuPy
                    array per call (how fused_moe's intermediates were allocated
                    before they moved to the stream workspace)
Each variant's output is checked against the tree's (bit-identical for the
Python-only variant, fp32 tolerance for another kernel source).

    python3 scripts/moe_variants.py OUT.json [NAME=DIR ...] [--rounds R]
"""
import json
import os
import statistics
import sys

import cupy as cp
import numpy as np

import importlib

import w4kern
from w4kern.bench import MOE_LAYERS, Timer, _random_int4_experts, moe_id_sets, environment

lin = importlib.import_module("w4kern.linear")   # the module (w4kern.linear is the function)
OUT = sys.argv[1]
DIRS = [tuple(a.split("=", 1)) for a in sys.argv[2:] if "=" in a]
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
CASES = [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("deepseek-v3", 1), ("deepseek-v3", 16)]
_SCRATCH = lin._Workspace.scratch


def use(variant):
    kind, src = variant
    lin._Workspace.scratch = _SCRATCH
    os.environ.pop("W4KERN_CUDA_SRC", None)
    if kind == "pool":
        lin._Workspace.scratch = lambda self, name, shape, dtype: self.cp.empty(shape, dtype=dtype)
    elif src is not None:
        os.environ["W4KERN_CUDA_SRC"] = os.path.abspath(src)


def main():
    variants = [("tree", (None, None)), ("pool", ("pool", None))] + [(n, ("src", d)) for n, d in DIRS]
    timer = Timer()
    rows = []
    for name in dict.fromkeys(n for n, _ in CASES):
        experts, k, hidden, inter = MOE_LAYERS[name]
        rng = cp.random.default_rng(6)
        w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
        w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
        for _, t in [c for c in CASES if c[0] == name]:
            id_sets = moe_id_sets(cp, rng, experts, k, t, timer.launches)
            sets = len(id_sets)
            weights = cp.full((t, k), 1.0 / k, dtype=np.float32)
            x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
            out = cp.empty((t, hidden), dtype=w4kern.bfloat16)
            for activation in ("int8", "bf16"):
                times = {label: [] for label, _ in variants}
                reference = None
                for label, variant in variants:   # outputs first
                    use(variant)
                    got = w4kern.fused_moe(x, w13, w2, weights, id_sets[0], activation=activation).astype(np.float32)
                    if reference is None:
                        reference = got
                    err = float(cp.abs(got - reference).max() / (cp.abs(reference).max() + 1e-30))
                    if err > 1e-2:
                        print(f"  {label}: output differs from the tree's (rel {err:.2e})")
                for _ in range(ROUNDS):
                    for label, variant in variants:
                        use(variant)
                        times[label].append(timer.graph(
                            lambda i, a=activation: w4kern.fused_moe(x, w13, w2, weights, id_sets[i % sets],
                                                                     activation=a, out=out)))
                use(variants[0][1])
                for label, ts in times.items():
                    rows.append({"layer": name, "T": t, "activation": activation, "variant": label,
                                 "us": statistics.median(ts), "all_us": ts})
                print(f"{name:14s} T={t:3d} {activation:5s} " +
                      "  ".join(f"{label} {statistics.median(ts):8.2f}" for label, ts in times.items()), flush=True)
                with open(OUT, "w") as f:
                    json.dump({"environment": environment(), "variants": dict(DIRS), "rows": rows}, f, indent=1)
        del w13, w2
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
