"""Activation quantizers: Q8 blocks, per-token INT8, per-token FP8 (e4m3fn).

Written once for NumPy and CuPy. ``quantize_q8`` on CuPy arrays is one CUDA
launch (``cuda_src/quantize_q8.cu``), bit-identical to the NumPy path.

Non-finite inputs give a defined result, never a crash: a Q8 block (or a
per-token row) holding NaN or Inf gets a NaN scale (and NaN sum) and q = 0,
so anything computed from it is NaN.
"""
from __future__ import annotations

import os

import numpy as np

from . import _runtime
from ._arrays import (
    accepts_dlpack,
    array_module,
    check_aligned,
    check_contiguous,
    check_dtype,
    check_ndim,
    check_shape,
)
from ._numeric import F32, e4m3_bits_to_float32, float32_to_e4m3_bits, round_half_away
from .formats import (
    FLOAT_DTYPES,
    FP8_E4M3_MAX,
    Q8_BLOCK_BYTES,
    Q8_BLOCK_VALUES,
    PerTokenFp8,
    PerTokenInt8,
    Q8Activations,
)


def _check_activations(x, name="x"):
    xp = array_module(**{name: x})
    check_dtype(name, x, FLOAT_DTYPES)
    check_ndim(name, x, range(1, 8), "[..., K]")
    return xp


def _q8_values_xp(xp, x):
    """(q float32 [..., nb, 32], d float32 [..., nb], sum float32 [..., nb]) per llama.cpp's Q8_1 rounding."""
    k = x.shape[-1]
    xf = x.astype(F32).reshape(x.shape[:-1] + (k // Q8_BLOCK_VALUES, Q8_BLOCK_VALUES))
    finite_values = xp.isfinite(xf)
    finite = finite_values.all(axis=-1)
    xf = xp.where(finite_values, xf, xp.zeros_like(xf))   # their blocks get q = 0 below
    amax = xp.abs(xf).max(axis=-1)
    d = amax / F32(127)
    d_for_q = xp.where(finite, d, xp.zeros_like(d))[..., None]
    safe = xp.where(d_for_q == 0, xp.ones_like(d_for_q), d_for_q)
    q = xp.clip(round_half_away(xp, xf / safe), -127, 127)
    q = xp.where(d_for_q == 0, xp.zeros_like(q), q)
    q_sum = q.sum(axis=-1, dtype=np.int32).astype(F32)       # exact integer sum
    nan = xp.full_like(d, np.nan)
    return q, xp.where(finite, d, nan), xp.where(finite, d * q_sum, nan)


def _q8_pack_xp(xp, q, d, s):
    blocks = xp.zeros(q.shape[:-1] + (Q8_BLOCK_BYTES,), dtype=np.uint8)
    q8 = q.astype(np.int8)
    blocks[..., 0:16] = q8[..., 0::2].view(np.uint8)
    blocks[..., 16:32] = q8[..., 1::2].view(np.uint8)
    blocks[..., 32:36] = xp.ascontiguousarray(d.astype(F32)[..., None]).view(np.uint8)
    blocks[..., 36:40] = xp.ascontiguousarray(s.astype(F32)[..., None]).view(np.uint8)
    return blocks


@accepts_dlpack("x", "out")
def quantize_q8(x, *, out=None) -> Q8Activations:
    """Quantize activations into 48-byte Q8 blocks of 32 values along K.

    Parameters
    ----------
    x : float32 | float16 | bfloat16 [..., K], C-contiguous, K % 32 == 0
    out : optional Q8Activations (or uint8 [..., K // 32, 48] array) to write
        into; with it the CuPy path allocates nothing.

    Per block: d = max|x| / 127 (fp32), q = roundf(x / d) (half away from
    zero; 0 when d == 0), sum = d * sum(q): llama.cpp's quantize_q8_1 values,
    with d and sum kept in fp32. Non-finite blocks: d = sum = NaN, q = 0.
    """
    xp = _check_activations(x)
    k = x.shape[-1]
    if k % Q8_BLOCK_VALUES:
        raise ValueError(f"x's last dimension K={k} must be a multiple of {Q8_BLOCK_VALUES}")
    shape = x.shape[:-1] + (k // Q8_BLOCK_VALUES, Q8_BLOCK_BYTES)
    out_blocks = out.blocks if isinstance(out, Q8Activations) else out
    if out_blocks is not None:
        array_module(x=x, out=out_blocks)
        check_dtype("out", out_blocks, [np.uint8])
        check_shape("out", out_blocks, shape, "[..., K // 32, 48]")
        check_contiguous("out", out_blocks)
    if xp is np:
        blocks = _q8_pack_xp(np, *_q8_values_xp(np, x))
        if out_blocks is None:
            return Q8Activations(blocks)
        out_blocks[...] = blocks
        return out if isinstance(out, Q8Activations) else Q8Activations(out_blocks)
    check_contiguous("x", x)
    check_aligned("x", x)
    blocks = xp.empty(shape, dtype=np.uint8) if out_blocks is None else out_blocks
    _quantize_q8_cuda(x, blocks)
    return out if isinstance(out, Q8Activations) else Q8Activations(blocks)


#: Kernel variant by size, from the q8_tuning suite on an H200 (benchmarks/README.md):
#: with at least this many Q8 blocks, one thread per block (variant 0) was fastest
#: (33.8 vs 38.3 us at M=4096, K=8192, graph mode); below it, four threads per block
#: with one chunk each (variant 1) was (7.3 vs 8.1 us at M=1024, K=4096). The
#: threshold is the smallest measured size where variant 0 won.
Q8_THREAD_PER_BLOCK_MIN_BLOCKS = 4096 * 8192 // 32


def _q8_variant(n_blocks: int) -> int:
    return 0 if n_blocks >= Q8_THREAD_PER_BLOCK_MIN_BLOCKS else 1


#: launch plans of the Q8 quantizer by (device, sources, dtype, chunks, variant):
#: (kernel, grid, block, count argument); a plain call is host-bound
_Q8_PLANS: dict[tuple, tuple] = _runtime.plan_cache()


def _quantize_q8_cuda(x, blocks, chunks_per_thread: int | None = None, pdl: str | None = None,
                      pdl_ok: bool | None = None) -> None:
    """chunks_per_thread: 1, 2, 4 (four threads per Q8 block) or 0 (one thread per
    block); None picks by size (_q8_variant). pdl: None or "first" (see
    _first_kernel_pdl); pdl_ok: the caller's _runtime.pdl_enabled() (None: asked here)."""
    n_chunks = x.size // 8
    if n_chunks == 0:
        return
    key = (_runtime.cupy_module().cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), x.dtype, n_chunks,
           chunks_per_thread)
    plan = _Q8_PLANS.get(key)
    if plan is None:
        plan = _Q8_PLANS[key] = _q8_plan(x.dtype, n_chunks, chunks_per_thread)
    kernel, grid, block, count = plan
    wanted = _first_kernel_pdl(pdl)
    _runtime.launch(kernel, grid, block, (x, blocks, count), pdl=wanted if pdl_ok is None else wanted and pdl_ok,
                    checked=pdl_ok is not None)


def _q8_plan(dtype, n_chunks: int, chunks_per_thread: int | None) -> tuple:
    from ._registry import cxx_type

    if chunks_per_thread is None:
        chunks_per_thread = _q8_variant(n_chunks // 4)
    if chunks_per_thread == 0:
        kernel = _runtime.get_kernel("quantize_q8_thread_per_block", (cxx_type(dtype),))
        n_blocks = n_chunks // 4
        return kernel, ((n_blocks + 255) // 256,), (256,), np.int64(n_blocks)
    kernel = _runtime.get_kernel("quantize_q8", (cxx_type(dtype), str(chunks_per_thread)))
    threads = 256                                  # kQ8Threads
    per_cta = threads * chunks_per_thread
    return kernel, ((n_chunks + per_cta - 1) // per_cta,), (threads,), np.int64(n_chunks)


def _first_kernel_pdl(pdl: str | None) -> bool:
    """Whether a quantizer launch is programmatic (_runtime.launch). pdl: None, a plain
    launch; "first", an op's first kernel before a matvec that is a programmatic launch
    (under _runtime.FIRST_KERNEL_PDL; the kernel waits for the previous kernel, then
    lets the matvec start); "chained" (the per-token quantizer only), right after a
    kernel of the same op (fused_moe's silu quantizer after GEMM1; the matvec after it
    may start at once)."""
    if pdl not in (None, "first", "chained"):
        raise ValueError(f"pdl must be None, 'first' or 'chained', got {pdl!r}")
    return pdl == "chained" or (pdl == "first" and _runtime.FIRST_KERNEL_PDL)


def _quantize_per_token_cuda(rows, out, scales=None, silu_gate_up=False, pdl=None) -> None:
    """Per-token INT8 of float rows [M, K] on the GPU (moe_decode.cu's per-token
    quantizer, one CTA per row), bit-identical to ``quantize_per_token_int8``: into q
    int8 [M, K] and scales float32 [M], or, with scales None, into Q8 blocks uint8
    [M, K / 32, 48] that carry the row's scale (``per_token_q8_blocks``).
    silu_gate_up: rows are fp32 [g; u] of 2K values and silu(g) * u is quantized
    (fused_moe's decode path). Rows contiguous and 16-byte aligned, K a multiple of 32.
    pdl: None, "first" or "chained" (_first_kernel_pdl)."""
    cols = rows.shape[1] // (2 if silu_gate_up else 1)
    key = (_runtime.cupy_module().cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), rows.dtype,
           silu_gate_up, scales is None, cols, pdl)
    plan = _TOKEN_PLANS.get(key)
    if plan is None:
        plan = _TOKEN_PLANS[key] = _token_plan(rows.dtype, silu_gate_up, scales is None, cols, pdl)
    kernel, block, tail = plan
    _runtime.launch(kernel, (rows.shape[0],), block, (rows, out, np.uint64(0) if scales is None else scales) + tail,
                    pdl=_first_kernel_pdl(pdl))


#: launch plans of the per-token quantizer: (kernel, block, trailing arguments)
_TOKEN_PLANS: dict[tuple, tuple] = _runtime.plan_cache()


def _token_plan(dtype, silu_gate_up: bool, q8_blocks: bool, cols: int, pdl) -> tuple:
    from ._registry import cxx_bool, cxx_type, moe_row_threads

    kernel = _runtime.get_kernel("moe_token_q8", (cxx_type(dtype), cxx_bool(silu_gate_up), cxx_bool(q8_blocks)))
    return kernel, (moe_row_threads(cols),), (np.int32(cols), np.int32(pdl != "chained"))


def dequantize_q8(xq: Q8Activations, dtype=np.float32):
    """Q8 blocks -> float [..., K]: x = d * q (float32 math, then cast)."""
    if not isinstance(xq, Q8Activations):
        raise TypeError(f"xq must be a Q8Activations, got {type(xq).__name__}")
    q = xq.qs.astype(F32)
    grouped = q.reshape(q.shape[:-1] + (xq.k // Q8_BLOCK_VALUES, Q8_BLOCK_VALUES))
    return (grouped * xq.d[..., None]).reshape(xq.shape).astype(dtype)


def _per_token_scale(xp, x, qmax):
    """(x float32 [M, K] with non-finite zeroed, scale float32 [M], finite [M])."""
    xf = x.astype(F32)
    finite_values = xp.isfinite(xf)
    finite = finite_values.all(axis=-1)
    xf = xp.where(finite_values, xf, xp.zeros_like(xf))
    scale = xp.abs(xf).max(axis=-1) / F32(qmax)
    return xf, scale, finite


@accepts_dlpack("x")
def quantize_per_token_int8(x) -> PerTokenInt8:
    """Per-token symmetric INT8: scale = max|x_row| / 127, q = clip(round(x / scale), -127, 127).

    x : float32 | float16 | bfloat16 [M, K]. Rounding half away from zero; an
    all-zero row gets scale 0 and q = 0; a row with NaN/Inf gets scale NaN, q = 0.
    """
    xp = _check_activations(x)
    check_ndim("x", x, 2, "[M, K]")
    xf, scale, finite = _per_token_scale(xp, x, 127)
    safe = xp.where(scale == 0, xp.ones_like(scale), scale)[:, None]
    q = xp.clip(round_half_away(xp, xf / safe), -127, 127)
    q = xp.where(finite[:, None], q, xp.zeros_like(q)).astype(np.int8)
    return PerTokenInt8(q=q, scales=xp.where(finite, scale, xp.full_like(scale, np.nan)))


def per_token_q8_blocks(x):
    """Per-token INT8 (``quantize_per_token_int8``) laid out as Q8 blocks: every
    block of a row carries the row's scale as d and d * sum(q) as its sum, so the
    Q8 kernels compute exactly the per-token INT8 product (the MoE decode path
    feeds its matvec this way). x float [M, K], K a multiple of 32; returns
    ``Q8Activations`` [M, K] (NumPy or CuPy, like x)."""
    xp = _check_activations(x)
    check_ndim("x", x, 2, "[M, K]")
    m, k = x.shape
    if k % Q8_BLOCK_VALUES:
        raise ValueError(f"x's K={k} must be a multiple of {Q8_BLOCK_VALUES}")
    pq = quantize_per_token_int8(x)
    nb = k // Q8_BLOCK_VALUES
    q = pq.q.reshape(m, nb, Q8_BLOCK_VALUES)
    blocks = xp.zeros((m, nb, Q8_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., 0:16] = q[..., 0::2].view(np.uint8)
    blocks[..., 16:32] = q[..., 1::2].view(np.uint8)
    d = xp.ascontiguousarray(xp.broadcast_to(pq.scales.astype(F32)[:, None], (m, nb)))
    total = d * q.sum(axis=-1, dtype=np.int32).astype(F32)
    blocks[..., 32:36] = d.view(np.uint8).reshape(m, nb, 4)
    blocks[..., 36:40] = xp.ascontiguousarray(total).view(np.uint8).reshape(m, nb, 4)
    return Q8Activations(blocks)


def dequantize_per_token_int8(xq: PerTokenInt8, dtype=np.float32):
    """x = scale * q, float32 math."""
    if not isinstance(xq, PerTokenInt8):
        raise TypeError(f"xq must be a PerTokenInt8, got {type(xq).__name__}")
    return (xq.q.astype(F32) * xq.scales[:, None]).astype(dtype)


@accepts_dlpack("x")
def quantize_per_token_fp8(x) -> PerTokenFp8:
    """Per-token FP8 (e4m3fn): scale = max|x_row| / 448, q = e4m3(x / scale) rounded to nearest even.

    x : float32 | float16 | bfloat16 [M, K]. q is returned as uint8 bit
    patterns (CuPy has no fp8 dtype); ``w4kern.interop`` reinterprets them
    for torch/JAX. An all-zero row gets scale 0 and q = 0; a row with NaN/Inf
    gets scale NaN and q = 0.
    """
    xp = _check_activations(x)
    check_ndim("x", x, 2, "[M, K]")
    xf, scale, finite = _per_token_scale(xp, x, FP8_E4M3_MAX)
    safe = xp.where(scale == 0, xp.ones_like(scale), scale)[:, None]
    bits = float32_to_e4m3_bits(xp, xf / safe)
    bits = xp.where(finite[:, None], bits, xp.zeros_like(bits))
    return PerTokenFp8(q=bits, scales=xp.where(finite, scale, xp.full_like(scale, np.nan)))


def dequantize_per_token_fp8(xq: PerTokenFp8, dtype=np.float32):
    """x = scale * float(q), float32 math."""
    if not isinstance(xq, PerTokenFp8):
        raise TypeError(f"xq must be a PerTokenFp8, got {type(xq).__name__}")
    xp = array_module(q=xq.q)
    return (e4m3_bits_to_float32(xp, xq.q) * xq.scales[:, None]).astype(dtype)
