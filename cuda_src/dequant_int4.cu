// dequantize_int4: Int4Weight (plain layout) -> dense [rows, K] fp16/bf16/fp32.
//
// One thread expands one 32-bit word of qweight (8 nibbles = 8 consecutive k)
// into one 16-byte (or, for fp32, 32-byte) store. group_size >= 32 and
// K % 32 == 0, so the 8 values of a word always share one scale and zero.
// Stacked MoE weights [E, N, K/2] are just E * N rows here.
//
// Bit-exact with the NumPy path: w = (q - z) * s in fp32 (a subtract then a
// multiply, which no compiler contracts into an FMA), rounded to nearest even.
#include "common/formats.cuh"

namespace w4kern {

constexpr int kNibblesPerWord = 8;

template <typename ScaleT, typename OutT, bool kHasZeros>
__global__ void __launch_bounds__(256) dequant_int4_kernel(
    const u32* __restrict__ qweight,   // [rows, K/8] u32 words of the [rows, K/2] uint8 nibbles
    const ScaleT* __restrict__ scales, // [rows, n_groups]
    const ScaleT* __restrict__ zeros,  // [rows, n_groups], unused when !kHasZeros
    OutT* __restrict__ out,            // [rows, K], 16-byte aligned
    i64 n_words,                       // rows * K / 8
    i32 words_per_row,                 // K / 8
    i32 words_per_group,               // group_size / 8 (K / 8 for one group per row)
    i32 n_groups)                      // K / group_size
{
    const i64 word = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (word >= n_words) return;
    const i64 row = word / words_per_row;
    const i32 group = static_cast<i32>(word - row * words_per_row) / words_per_group;

    const u32 packed = qweight[word];
    const float s = to_float(scales[row * n_groups + group]);
    const float z = kHasZeros ? to_float(zeros[row * n_groups + group])
                              : static_cast<float>(kInt4SymmetricZero);

    Vec<OutT, kNibblesPerWord> w;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const u32 byte = (packed >> (8 * b)) & 0xFFu;
        w.v[2 * b] = from_float<OutT>((static_cast<float>(byte & 0xFu) - z) * s);     // k = 2j
        w.v[2 * b + 1] = from_float<OutT>((static_cast<float>(byte >> 4) - z) * s);   // k = 2j + 1
    }
    reinterpret_cast<Vec<OutT, kNibblesPerWord>*>(out)[word] = w;
}

}  // namespace w4kern
