"""Elementwise helpers written once for NumPy and CuPy (``xp`` is either module).

Every function here is exact: IEEE float32 operations only, no
transcendental functions, so NumPy and CuPy (and the CUDA kernels that
mirror them) give the same bits.
"""
from __future__ import annotations

import numpy as np

from .formats import FP8_E4M3_MAX, float8_e4m3fn

F32 = np.float32


def round_half_away(xp, v):
    """C's roundf: round to nearest, ties away from zero (float32 in, float32 out)."""
    r = xp.trunc(v)
    frac = v - r                                    # exact for float32
    step = xp.where(xp.abs(frac) >= F32(0.5), xp.sign(v), xp.zeros_like(v))
    return r + step


def float32_to_e4m3_bits(xp, x):
    """float32 -> float8 e4m3fn bit patterns (uint8), round to nearest even.

    Matches ml_dtypes' cast for every finite |x| <= 448; larger magnitudes
    saturate to +-448 (ml_dtypes gives NaN there: e4m3fn has no infinity);
    NaN gives 0x7F with x's sign bit.
    """
    x = x.astype(F32, copy=False)
    sign = xp.signbit(x).astype(np.uint8) << 7
    a = xp.minimum(xp.abs(x), F32(FP8_E4M3_MAX))
    a = xp.where(xp.isnan(x), xp.zeros_like(a), a)
    _, e = xp.frexp(a)                              # a = m * 2**e, m in [0.5, 1)
    exponent = xp.maximum(e - 1, -6)                # below 2**-6 the spacing is fixed (subnormals)
    quantum = xp.ldexp(xp.ones_like(a), exponent - 3)   # 3 mantissa bits
    r = xp.rint(a / quantum) * quantum              # exact scaling by powers of two; rint is RNE
    _, e2 = xp.frexp(r)
    e2 = e2 - 1
    normal = r >= F32(2.0 ** -6)
    mantissa = ((r / xp.ldexp(xp.ones_like(r), e2) - F32(1)) * F32(8)).astype(np.int32)
    bits_normal = ((e2 + 7) << 3) | mantissa
    bits_subnormal = (r * F32(512)).astype(np.int32)
    bits = xp.where(normal, bits_normal, bits_subnormal).astype(np.uint8)
    bits = xp.where(xp.isnan(x), xp.full_like(bits, 0x7F), bits)
    return bits | sign


_E4M3_TABLE = np.arange(256, dtype=np.uint8).view(float8_e4m3fn).astype(np.float32)


def e4m3_bits_to_float32(xp, bits):
    """float8 e4m3fn bit patterns (uint8) -> float32, exactly."""
    return xp.asarray(_E4M3_TABLE)[bits]
