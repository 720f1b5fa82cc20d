"""Run fused_moe's batched expert GEMMs a few times on one MoE layer, for ncu.

    ncu --kernel-name regex:moe_gemm python3 scripts/profile_moe_gemm.py [MODEL T M_TILES ACT]

MODEL is a key of w4kern.bench.MOE_LAYERS (default deepseek-v3), T the tokens
(128), M_TILES the alignment block in m16 tiles (1 or 4; default: fused_moe's
choice) and ACT int8 or bf16. Random routing and random INT4 g128 experts, as the
benchmark has them.
"""
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern import _runtime
from w4kern._registry import cxx_bool, cxx_type, moe_gemm_a8_smem_bytes, moe_gemm_smem_bytes, moe_gemm_threads
from w4kern.bench import MOE_LAYERS, _random_int4_experts
from w4kern.moe import _token_q8_blocks, launch_moe_gemm, moe_align_block_size, moe_block_size

args = sys.argv[1:]
model = args[0] if args else "deepseek-v3"
t = int(args[1]) if len(args) > 1 else 128
experts, k, hidden, inter = MOE_LAYERS[model]
act = args[3] if len(args) > 3 else "int8"
m_tiles = int(args[2]) if len(args) > 2 else moe_block_size(t * k, experts, act) // 16
rng = cp.random.default_rng(0)
w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
ids = cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
aligned = moe_align_block_size(ids, experts, 16 * m_tiles)
items = t * k
for w, silu, act_div, n_out in ((w13, True, k, inter), (w2, False, 1, hidden)):
    base = (cxx_type(w.scales.dtype), cxx_bool(True), str(m_tiles), cxx_bool(silu), "false")
    if act == "int8":
        a = _token_q8_blocks(cp, x) if silu else _token_q8_blocks(
            cp, rng.standard_normal((items, inter), dtype=np.float32))
        kernel, smem = _runtime.get_kernel("moe_gemm_a8", base), moe_gemm_a8_smem_bytes(m_tiles)
        dst = cp.empty((items, n_out), dtype=np.float32)
    else:
        a = x if silu else rng.standard_normal((items, inter), dtype=np.float32).astype(w4kern.bfloat16)
        kernel = _runtime.get_kernel("moe_gemm_a16", (cxx_type(w4kern.bfloat16),) + base)
        smem = moe_gemm_smem_bytes(m_tiles)
        dst = cp.empty((items, n_out), dtype=w4kern.bfloat16 if silu else np.float32)
    for _ in range(2):
        launch_moe_gemm(kernel, smem, w, a, dst, silu, act_div, aligned, items,
                        threads=moe_gemm_threads(act, m_tiles))
cp.cuda.Device().synchronize()
print("done", model, t, m_tiles, act)
