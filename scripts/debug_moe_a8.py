"""Debug: moe_gemm_a8 on one expert and one 16-row block against NumPy, simple cases."""
import cupy as cp
import numpy as np

import w4kern
from w4kern import _runtime, reference
from w4kern._registry import moe_gemm_a8_smem_bytes
from w4kern.moe import _token_q8_blocks

rng = np.random.default_rng(0)


def run(x, w, silu=False):
    t, k = x.shape
    n = w.shape[1]
    blocks = _token_q8_blocks(cp, cp.asarray(x))
    sorted_ids = cp.arange(16, dtype=np.int32)
    sorted_ids[t:] = t
    out = cp.full((t, n // 2 if silu else n), np.nan, dtype=np.float32)
    kern = _runtime.get_kernel("moe_gemm_a8", (w4kern._registry.cxx_type(w.scales.dtype),
                                               "true" if w.zeros is not None else "false", "1", "true" if silu else "false"))
    gw = w4kern.Int4Weight(cp.asarray(w.qweight), cp.asarray(w.scales), None if w.zeros is None else cp.asarray(w.zeros),
                           w.group_size)
    shift = 31 if w.group_size == -1 else int(w.group_size).bit_length() - 1
    kern((1 if silu else -(-n // 128), 1), (128,), (blocks, gw.qweight, gw.scales, gw.scales if gw.zeros is None else gw.zeros,
                                                    sorted_ids, cp.zeros(1, np.int32), cp.full(1, 16, np.int32), out,
                                                    np.int32(n), np.int32(k), np.int32(w.scales.shape[-1]), np.int32(shift),
                                                    np.int32(t), np.int32(1), np.int32(1)), shared_mem=moe_gemm_a8_smem_bytes(1))
    xq = reference.dequantize_per_token_int8(w4kern.quantize_per_token_int8(x)).astype(np.float64)
    wd = reference.dequantize_weight(w).astype(np.float64)[0]
    exp = xq @ wd.T
    got = cp.asnumpy(out).astype(np.float64)
    return got, exp


def weight(n, k, q=None, s=None, z=None, gs=32):
    w = w4kern.quantize_int4(rng.standard_normal((1, n, k)).astype(np.float32), group_size=gs, symmetric=z is None)
    qw = w.qweight.copy()
    if q is not None:
        qw[...] = q | (q << 4)
    sc = w.scales.copy() if s is None else np.full_like(w.scales, s)
    zz = None if w.zeros is None else (w.zeros.copy() if z == "rand" else np.full_like(w.zeros, z))
    return w4kern.Int4Weight(qw, sc, zz, gs)


for name, x, w in [
    ("ones x, q=9 sym s=1", np.ones((16, 64), np.float32), weight(128, 64, q=9, s=1.0)),
    ("rand x, q=9 sym s=1", rng.standard_normal((16, 64)).astype(np.float32), weight(128, 64, q=9, s=1.0)),
    ("ones x, q=8 sym (w=0)", np.ones((16, 64), np.float32), weight(128, 64, q=8, s=1.0)),
    ("ones x, rand q sym s=1", np.ones((16, 64), np.float32), weight(128, 64, s=1.0)),
    ("rand x, rand q sym s=1", rng.standard_normal((16, 64)).astype(np.float32), weight(128, 64, s=1.0)),
    ("rand x, rand sym", rng.standard_normal((16, 64)).astype(np.float32), weight(128, 64)),
    ("rand x, rand sym K=256 g32", rng.standard_normal((16, 256)).astype(np.float32), weight(128, 256)),
    ("rand x, rand sym K=256 g128", rng.standard_normal((16, 256)).astype(np.float32), weight(128, 256, gs=128)),
    ("rand x, rand asym K=256 g64", rng.standard_normal((16, 256)).astype(np.float32), weight(128, 256, z="rand", gs=64)),
]:
    got, exp = run(x, w)
    err = np.abs(got - exp).max() / max(np.abs(exp).max(), 1e-9)
    print(f"{name:34s} rel err {err:.2e}  got {np.round(got[0, :4], 3)} exp {np.round(exp[0, :4], 3)} "
          f"got[1] {np.round(got[1, :3], 3)} exp[1] {np.round(exp[1, :3], 3)}")
