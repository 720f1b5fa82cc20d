// INT4 nibbles as 16-bit float pairs for the tensor-core decode kernels
// (matvec_a16.cu, matvec_bulk.cu): a weight word's nibbles at bits s and 16 + s
// (k and k + 4 of its eight) become one bf16x2/f16x2 operand word.
#pragma once

#include "ptx.cuh"

namespace w4kern {

// 16-bit float pairs f = 8 + q / 2 from the nibbles at bits kShift and 16 + kShift
// (a16_pair, with each type's constants in A16Nibbles): a shift, then
// (v & mask) | exponent. kLop3 writes the latter as one LOP3: NVRTC
// 13.0 otherwise emits an AND and an OR, and the loop is bound by instruction
// issue (ncu, session 8: 2.3 IPC, 8% of stalls on memory), so this alone made
// W4A16 1-11% faster. The LOP3 holds one constant in a register, which the
// group-slot instances, at the 128-register cap, cannot spare (they spill on
// sm_80), so they keep the plain form.
template <typename ActT> struct A16Nibbles;

template <> struct A16Nibbles<bf16_t> {
    static constexpr u32 kOnes = 0x3F803F80u;       // bf16 1.0 in both halves
    static constexpr int kLowBit = 3;               // q in mantissa bits 3..6
    static constexpr u32 kMask = 0x00780078u;
    static constexpr u32 kExponent = 0x41004100u;   // exponent of 8: 8 * (1 + q / 16)
};

template <> struct A16Nibbles<f16_t> {
    static constexpr u32 kOnes = 0x3C003C00u;       // fp16 1.0 in both halves
    static constexpr int kLowBit = 6;               // q in mantissa bits 6..9
    static constexpr u32 kMask = 0x03C003C0u;
    static constexpr u32 kExponent = 0x48004800u;   // exponent of 8: 8 * (1 + q / 16)
};

template <typename ActT, int kShift, bool kLop3>
__device__ __forceinline__ u32 a16_pair(u32 w) {
    using Nib = A16Nibbles<ActT>;
    const u32 v = kShift <= Nib::kLowBit ? (w << (Nib::kLowBit - kShift)) : (w >> (kShift - Nib::kLowBit));
    if constexpr (kLop3) return lop3<Nib::kMask, Nib::kExponent, kLutAndOr>(v);
    else return (v & Nib::kMask) | Nib::kExponent;
}

}  // namespace w4kern
