"""Where fused_moe(activation="int8")'s decode path spends its time: each of its four
kernels alone, and the chains of them, timed in graph mode (20 launches per graph,
routing rotated over disjoint expert sets at T = 1 so no launch finds its experts in
L2, as the moe bench suite does). A stage's marginal cost is its chain's time minus
the shorter chain's. Each GEMM is also timed alone at every matvec_q8 config the
items rule chooses from (gemm1@rows-unroll-split, gemm2@...).

    python3 scripts/stages_moe_decode.py OUT.json [qwen3-30b-a3b|deepseek-v3] [T ...]
"""
import json
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern import moe
from w4kern.bench import MOE_LAYERS, Timer, _random_int4_experts, moe_id_sets
from w4kern.linear import MATVEC_CANDIDATES, _launch_matvec_items, _launch_matvec_token_sums


def main():
    out_path = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else "qwen3-30b-a3b"
    tokens = [int(a) for a in sys.argv[3:]] or [1]
    experts, k, hidden, inter = MOE_LAYERS[name]
    rng = cp.random.default_rng(0)
    w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
    w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
    timer = Timer()
    rows = []
    for t in tokens:
        id_sets = moe_id_sets(cp, rng, experts, k, t, timer.launches)
        sets = len(id_sets)
        weights = cp.full((t, k), 1.0 / k, dtype=np.float32)
        x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
        y = cp.empty((t, hidden), dtype=w4kern.bfloat16)
        gate_up = cp.empty((t * k, 2 * inter), dtype=np.float32)
        x_blocks = moe._token_q8_blocks(cp, x)
        inter_blocks = moe._token_q8_blocks(cp, cp.asarray(rng.standard_normal((t * k, 2 * inter), dtype=np.float32)),
                                            silu_gate_up=True)

        def quant_x(i):
            moe._token_q8_blocks(cp, x, pdl="first")

        def gemm1(i, pdl=False):
            _launch_matvec_items(cp, w13, x_blocks, gate_up, id_sets[i % sets].reshape(t * k), k, pdl=pdl)

        def quant_inter(i):
            moe._token_q8_blocks(cp, gate_up, silu_gate_up=True, pdl="chained")

        def gemm2(i, pdl=False):
            _launch_matvec_token_sums(cp, w2, inter_blocks, y, id_sets[i % sets], weights, pdl=pdl)

        def gemm1_with(config):
            return lambda i: _launch_matvec_items(cp, w13, x_blocks, gate_up, id_sets[i % sets].reshape(t * k), k,
                                                  config=config)

        def gemm2_with(config):
            return lambda i: _launch_matvec_token_sums(cp, w2, inter_blocks, y, id_sets[i % sets], weights,
                                                       config=config)

        stages = {
            "quant_x": quant_x,
            "gemm1": gemm1,
            "quant_inter": quant_inter,
            "gemm2": gemm2,
            "quant_x+gemm1": lambda i: (quant_x(i), gemm1(i, True)),
            "quant_x+gemm1+quant_inter": lambda i: (quant_x(i), gemm1(i, True), quant_inter(i)),
            "gemm1+quant_inter+gemm2": lambda i: (gemm1(i), quant_inter(i), gemm2(i, True)),
            "quant_inter+gemm2": lambda i: (quant_inter(i), gemm2(i, True)),
            "fused_moe": lambda i: w4kern.fused_moe(x, w13, w2, weights, id_sets[i % sets], activation="int8",
                                                     out=y),
        }
        for config in MATVEC_CANDIDATES[("int4", 1)]:   # each GEMM alone at every config (the rule's above)
            stages["gemm1@" + "-".join(map(str, config))] = gemm1_with(config)
            stages["gemm2@" + "-".join(map(str, config))] = gemm2_with(config)
        for label, fn in stages.items():
            us = timer.graph(fn)
            row = {"layer": name, "T": t, "stage": label, "graph_us": round(us, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
