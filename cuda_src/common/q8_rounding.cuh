// Rounding x / d to int8 the way NumPy's quantizers do (w4kern/quant.py: fp32
// division, round half away from zero, clamp to [-127, 127]) without a division
// per value. Shared by quantize_q8.cu (Q8 blocks) and moe_decode.cu (per-token
// INT8), whose scales are both d = max|x| / 127 over the values quantized.
#pragma once

#include "types.cuh"

namespace w4kern {

// q = roundf(x / d) clamped to [-127, 127]; d == 0 (all-zero block, or a
// max|x| so small that max|x| / 127 underflows) gives 0, as llama.cpp does for
// amax == 0. This is the definition; the kernels take it only where the fast
// path below cannot prove it gets the same q.
__device__ __forceinline__ int quantize_value_q8_exact(float x, float d) {
    if (d == 0.0f) return 0;
    const float q = roundf(x / d);
    return static_cast<int>(fminf(fmaxf(q, -127.0f), 127.0f));
}

// The fast path: no division and no conversion instruction per value (F2I and
// FRND issue at a quarter of the fp32 rate, and three of them per value made
// the kernel instruction-bound).
//
// Adding 1.5 * 2^23 to |r| < 2^22 rounds r to the nearest integer q (ties to
// even) and leaves it in the mantissa: the bits of r + kRoundMagic are
// kRoundMagicBits + q. So the low byte of those bits is q as an int8 (packed
// with byte_perm) and summing the bits sums q (minus a known constant).
constexpr float kRoundMagic = 12582912.0f;          // 1.5 * 2^23
constexpr u32 kRoundMagicBits = 0x4B400000u;        // its bits

// r = x * (1/d) is within 1.6e-5 of x / d (|x / d| <= 127 and two roundings
// of 2^-24 relative each) and NumPy's fp32 x / d within 4e-6 of it, so when r
// is farther than kTieMargin from a rounding tie k + 0.5, both round to the
// same q and ties-to-even equals half-away-from-zero. Closer than that (about
// 2 values in 10^4), or r not finite, the value takes the exact division.
constexpr float kTieMargin = 0.4999f;

// A scale d the fast path handles: 0 (then 1/d is replaced by 0, so every q is
// 0 as in the exact rule) or normal and finite, so that 1/d is finite and
// |x / d| <= 127 (1 + 3 * 2^-24) rounds to at most 127 without a clamp. A
// subnormal d (the block's max|x| is below 127 * FLT_MIN) or an infinite one
// (the block holds an Inf) sends the whole block down the exact path.
__device__ __forceinline__ bool q8_scale_is_fast(float d) {
    return d == 0.0f || (d >= 1.17549435e-38f && d <= 3.40282347e+38f);
}

// Quantizes kN values of one block with scale d. Returns the bits of
// kRoundMagic + q per value; sets non_finite if a value is NaN or Inf (the
// block is then written as the NaN block, whatever these bits are).
template <int kN>
__device__ __forceinline__ void quantize_values_q8(const float (&v)[kN], float d, u32 (&bits)[kN],
                                                   int& non_finite) {
    if (q8_scale_is_fast(d)) {
        const float inv_d = d == 0.0f ? 0.0f : __frcp_rn(d);
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            // _rn intrinsics: no FMA contraction, so r, t and the fraction are
            // the roundings the margin above was computed for.
            const float r = __fmul_rn(v[i], inv_d);
            const float t = __fadd_rn(r, kRoundMagic);
            const float fraction = __fadd_rn(r, -__fadd_rn(t, -kRoundMagic));
            if (fabsf(fraction) < kTieMargin) {
                bits[i] = __float_as_uint(t);
            } else {   // near a tie, or r is NaN/Inf
                non_finite |= !isfinite(v[i]);
                bits[i] = kRoundMagicBits + static_cast<u32>(quantize_value_q8_exact(v[i], d));
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            non_finite |= !isfinite(v[i]);
            bits[i] = kRoundMagicBits + static_cast<u32>(quantize_value_q8_exact(v[i], d));
        }
    }
}

// The low bytes of four magic-rounded values, b0 in the lowest byte.
__device__ __forceinline__ u32 pack_low_bytes(u32 b0, u32 b1, u32 b2, u32 b3) {
    return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// sum(q) from the sum of kN magic-rounded bit patterns (wrapping u32 sums).
template <int kN>
__device__ __forceinline__ int q_sum_from_bits(u32 bits_sum) {
    return static_cast<int>(bits_sum - static_cast<u32>(kN) * kRoundMagicBits);
}

}  // namespace w4kern
