"""Weight packing: INT4 (plain layout) and INT8, written once for NumPy and CuPy.

Every function takes NumPy or CuPy arrays and returns the same kind
(``xp`` below is whichever module the inputs belong to). ``dequantize_int4``
on CuPy arrays runs a CUDA kernel (``cuda_src/dequant_int4.cu``) that is
bit-identical to the NumPy path.
"""
from __future__ import annotations

import numpy as np

from ._arrays import (
    accepts_dlpack,
    array_module,
    check_aligned,
    check_dtype,
    check_ndim,
    check_out,
    deliver,
)
from ._numeric import F32, round_half_away
from .formats import (
    FLOAT_DTYPES,
    INT4_SYMMETRIC_ZERO,
    SCALE_DTYPES,
    TILE_BYTES,
    TILE_K,
    TILE_ROWS,
    TILED_GROUP_SIZES,
    Int4TiledWeight,
    Int4Weight,
    bfloat16,
    Int8Weight,
    check_group_size,
)


@accepts_dlpack("q")
def pack_int4(q):
    """Pack 4-bit values into bytes.

    q : uint8 [..., K] with values in [0, 15], K even.
    Returns uint8 [..., K // 2]: byte j holds q[2j] in its low nibble and
    q[2j + 1] in its high nibble. Raises ValueError on values above 15
    (this reads the values; it is a load-time utility, not a hot-path op).
    """
    array_module(q=q)
    check_dtype("q", q, [np.uint8])
    check_ndim("q", q, range(1, 8), "[..., K]")
    if q.shape[-1] % 2:
        raise ValueError(f"q's last dimension K={q.shape[-1]} must be even")
    if q.size and int(q.max()) > 15:
        raise ValueError(f"q must hold 4-bit values in [0, 15], got a maximum of {int(q.max())}")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@accepts_dlpack("packed")
def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: uint8 [..., K // 2] -> uint8 [..., K] in [0, 15]."""
    xp = array_module(packed=packed)
    check_dtype("packed", packed, [np.uint8])
    check_ndim("packed", packed, range(1, 8), "[..., K // 2]")
    out = xp.stack([packed & 0x0F, packed >> 4], axis=-1)
    return out.reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def _check_weight_input(w, scale_dtype):
    """Validate a float weight [N, K] / [E, N, K]; return (array module, scale dtype).
    The default scale dtype is w's for 16-bit w, else float32."""
    xp = array_module(w=w)
    check_dtype("w", w, FLOAT_DTYPES)
    check_ndim("w", w, (2, 3), "[N, K] or [E, N, K]")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (np.dtype(np.float16), bfloat16) else np.dtype(F32)
    scale_dtype = np.dtype(scale_dtype)
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(
            f"scale_dtype must be one of ({', '.join(d.name for d in SCALE_DTYPES)}), got {scale_dtype.name}"
        )
    return xp, scale_dtype


def _grouped_f32(xp, w, group_size: int):
    """w [..., N, K] -> (float32 [..., N, G, gs] with non-finite values zeroed, finite mask [..., N, G])."""
    k = w.shape[-1]
    gs = check_group_size(group_size, k)
    wf = w.astype(F32).reshape(w.shape[:-1] + (k // gs, gs))
    finite = xp.isfinite(wf)
    return xp.where(finite, wf, xp.zeros_like(wf)), finite.all(axis=-1)


@accepts_dlpack("w")
def quantize_int4(w, group_size: int = 128, symmetric: bool = False, scale_dtype=None) -> Int4Weight:
    """Quantize a float weight to INT4 in the plain layout.

    Parameters
    ----------
    w : float32 | float16 | bfloat16 [N, K] or [E, N, K]
        The weight (out_features, in_features), or a stack of experts.
    group_size : 32, 64, 128 or -1 (one group per row)
    symmetric : bool
        True: s = max|w| / 7, q = clip(round(w / s), -8, 7) + 8, zeros=None.
        False: the group's range [min(w, 0), max(w, 0)] over 15 steps,
        z = clip(round(-min / s), 0, 15), q = clip(round(w / s) + z, 0, 15).
    scale_dtype : float16 | bfloat16 | float32, default: w's dtype for
        16-bit w, else float32. q is computed against the stored (rounded)
        scale, so dequantization reproduces exactly what was chosen.

    Rounding is half away from zero. A group holding NaN or Inf gets a NaN
    scale (and q = z = 8), so its dequantized values are NaN. An all-zero
    group gets s = 0.
    """
    xp, scale_dtype = _check_weight_input(w, scale_dtype)
    wf, finite = _grouped_f32(xp, w, group_size)
    if symmetric:
        amax = xp.abs(wf).max(axis=-1)
        s = (amax / F32(7)).astype(scale_dtype)
        sf = s.astype(F32)
        safe = xp.where(sf == 0, xp.ones_like(sf), sf)[..., None]
        q = xp.clip(round_half_away(xp, wf / safe), -8, 7) + F32(INT4_SYMMETRIC_ZERO)
        zeros = None
    else:
        wmax = xp.maximum(wf.max(axis=-1), F32(0))
        wmin = xp.minimum(wf.min(axis=-1), F32(0))
        s = ((wmax - wmin) / F32(15)).astype(scale_dtype)
        sf = s.astype(F32)
        safe = xp.where(sf == 0, xp.ones_like(sf), sf)
        z = xp.clip(round_half_away(xp, -wmin / safe), 0, 15)
        q = xp.clip(round_half_away(xp, wf / safe[..., None]) + z[..., None], 0, 15)
        z = xp.where(finite, z, xp.full_like(z, INT4_SYMMETRIC_ZERO))
        zeros = z.astype(scale_dtype)
    q = xp.where(finite[..., None], q, xp.full_like(q, INT4_SYMMETRIC_ZERO))
    # (where() is applied to float32 and cast after: CuPy promotes bfloat16 in where)
    s = xp.where(finite, sf, xp.full_like(sf, np.nan)).astype(scale_dtype)
    q = q.astype(np.uint8).reshape(w.shape)
    return Int4Weight(qweight=pack_int4(q), scales=s, zeros=zeros, group_size=group_size)


def dequantize_int4_xp(weight: Int4Weight, dtype):
    """The NumPy path (and reference) of dequantize_int4: (q - z) * s in float32."""
    q = unpack_int4(weight.qweight).astype(F32)
    gs = weight.effective_group_size
    grouped = q.reshape(q.shape[:-1] + (weight.k // gs, gs))
    s = weight.scales.astype(F32)[..., None]
    if weight.zeros is None:
        z = F32(INT4_SYMMETRIC_ZERO)
    else:
        z = weight.zeros.astype(F32)[..., None]
    w = (grouped - z) * s
    return w.reshape(weight.shape).astype(dtype)


@accepts_dlpack("out")
def dequantize_int4(weight: Int4Weight, dtype=None, *, out=None):
    """Expand an Int4Weight to a dense [..., N, K] array: w = (q - z) * s.

    dtype : bfloat16 (default), float16 or float32. Computed in float32 and
    rounded to nearest even; the CUDA kernel gives the same bits as NumPy.
    out : optional preallocated [..., N, K] array of ``dtype`` (CuPy path: no
    allocation when given).
    """
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    dtype = bfloat16 if dtype is None else np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"dtype must be one of ({', '.join(d.name for d in FLOAT_DTYPES)}), got {dtype.name}"
        )
    xp = array_module(qweight=weight.qweight, out=out)
    if out is not None:
        check_out(out, dtype, weight.shape, "[..., N, K]")
    if xp is np:
        return deliver(dequantize_int4_xp(weight, dtype), out)
    return _dequantize_int4_cuda(xp, weight, dtype, out)


def _dequantize_int4_cuda(cp, weight: Int4Weight, dtype, out):
    from . import _runtime
    from ._registry import cxx_bool, cxx_type

    if out is None:
        out = cp.empty(weight.shape, dtype=dtype)
    check_aligned("out", out)
    check_aligned("qweight", weight.qweight, 4)
    n_words = weight.qweight.size // 4
    if n_words == 0:
        return out
    kernel = _runtime.get_kernel(
        "dequant_int4",
        (cxx_type(weight.scales.dtype), cxx_type(dtype), cxx_bool(weight.zeros is not None)),
    )
    words_per_row = weight.k // 8
    threads = 256
    blocks = (n_words + threads - 1) // threads
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # unused when symmetric
    kernel(
        (blocks,), (threads,),
        (weight.qweight, weight.scales, zeros, out, np.int64(n_words), np.int32(words_per_row),
         np.int32(weight.effective_group_size // 8), np.int32(weight.k // weight.effective_group_size)),
    )
    return out


@accepts_dlpack("w")
def quantize_int8(w, group_size: int = -1, scale_dtype=None) -> Int8Weight:
    """Quantize a float weight to symmetric INT8: s = max|w| / 127 per group,
    q = clip(round(w / s), -127, 127) (half away from zero).

    w : float32 | float16 | bfloat16 [N, K] or [E, N, K]; group_size 32, 64,
    128 or -1 (per channel, the default). A group holding NaN/Inf gets a NaN
    scale and q = 0.
    """
    xp, scale_dtype = _check_weight_input(w, scale_dtype)
    wf, finite = _grouped_f32(xp, w, group_size)
    s = (xp.abs(wf).max(axis=-1) / F32(127)).astype(scale_dtype)
    sf = s.astype(F32)
    safe = xp.where(sf == 0, xp.ones_like(sf), sf)[..., None]
    q = xp.clip(round_half_away(xp, wf / safe), -127, 127)
    q = xp.where(finite[..., None], q, xp.zeros_like(q)).astype(np.int8).reshape(w.shape)
    s = xp.where(finite, sf, xp.full_like(sf, np.nan)).astype(scale_dtype)
    return Int8Weight(qweight=q, scales=s, group_size=group_size)


def dequantize_int8(weight: Int8Weight, dtype=np.float32):
    """Expand an Int8Weight to a dense [..., N, K] array: w = q * s (float32 math)."""
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    gs = weight.effective_group_size
    q = weight.qweight.astype(F32)
    grouped = q.reshape(q.shape[:-1] + (weight.k // gs, gs))
    return (grouped * weight.scales.astype(F32)[..., None]).reshape(weight.shape).astype(dtype)


#: ops with a derived weight layout (w4kern.prepare's ``for_op``)
PREPARE_OPS = ("linear",)


def prepare(weight, for_op: str = "linear"):
    """Derive an op's kernel layout from a plain Int4Weight, once, at load time.

    ``for_op="linear"`` returns an Int4TiledWeight: 16-row x 128-k tiles in the order
    the tensor-core decode kernels' threads load them, so each warp load reads 512
    contiguous bytes. ``w4kern.linear`` takes it with act="bf16" (W4A16) or act="int8"
    (W4A8, per-token INT8) on the tensor-core kernels up to 8 tokens (the plain
    layout's loads read 64 bytes from each of 8 rows); more tokens unpack it each
    call, and act="q8" (the dp4a matvec) needs the plain weight. On an H200 (session 17,
    the five dense shapes): W4A16 0-9% faster at M = 1 and 8, act="int8" 5-9% faster at
    M = 8, but 1.2-1.6x slower at M = 1 than the plain weight, which takes the dp4a
    matvec there (up to M = 4). On sm_90, narrow layers (qkv, down) take the
    copy-engine kernel (matvec_bulk; session 18, one process against the tiled walk:
    act="int8" 6-22% faster, W4A16 3-15% faster on llama3-8b.qkv and
    gemma3-27b.down; gemma3-27b.down with pre-quantized INT8 x at M = 1 is 23.4 us
    there, against 19.4 us for the plain weight's dp4a path on pre-quantized Q8 blocks
    in session 17's suite). Group size 128 or per channel
    (-1). The result's arrays are new (qweight padded to whole tiles, scales and zeros
    transposed to [groups, rows]), so drop the plain weight if nothing else needs it.
    Works on NumPy and CuPy weights alike; ``Int4TiledWeight.to_plain()`` inverts it.
    """
    if for_op not in PREPARE_OPS:
        raise ValueError(f"for_op must be one of {PREPARE_OPS}, got {for_op!r}")
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight (plain layout), got {type(weight).__name__}")
    if weight.qweight.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K] for linear, got qweight shape {tuple(weight.qweight.shape)}")
    if weight.group_size not in TILED_GROUP_SIZES:
        raise ValueError(f"weight has group_size={weight.group_size}; the tiled layout takes {TILED_GROUP_SIZES} "
                         f"(one group per 128-k step): keep the plain weight for smaller groups")
    xp = array_module(qweight=weight.qweight)
    n, k = weight.shape
    tiles, steps = -(-n // TILE_ROWS), -(-k // TILE_K)
    padded = xp.zeros((tiles * TILE_ROWS, steps * TILE_K // 2), dtype=np.uint8)
    padded[:n, :k // 2] = weight.qweight
    # row 16 T + 8 h + g, byte 64 s + 16 t + j -> chunk [T, s], byte 512 h + 16 (4 g + t) + j
    chunks = padded.reshape(tiles, 2, 8, steps, 4, 16).transpose(0, 3, 1, 2, 4, 5).reshape(tiles, steps, TILE_BYTES)

    def transposed(a):   # [N, G] -> [G, tiles * 16], rows past N zero
        if a is None:
            return None
        t = xp.zeros((a.shape[1], tiles * TILE_ROWS), dtype=a.dtype)
        t[:, :n] = a.T
        return t

    return Int4TiledWeight(xp.ascontiguousarray(chunks), transposed(weight.scales), transposed(weight.zeros),
                           weight.group_size, k, n)
