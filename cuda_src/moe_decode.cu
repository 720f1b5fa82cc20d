// moe_decode: the glue of fused_moe's decode path (w4kern/moe.py,
// _fused_moe_decode_cuda). The two expert GEMMs are matvec_q8's kItems
// instances; around them run three launches of this file:
//   1. moe_token_q8_kernel<In, false>: x [T, H] -> per-token INT8 rows stored as
//      Q8 blocks [T, H / 32] that all carry the row's scale.
//   2. moe_token_q8_kernel<float, true>: GEMM1's fp32 [g; u] rows [T * k, 2I] ->
//      silu(g) * u, quantized the same way into [T * k, I / 32] Q8 blocks.
//   3. moe_combine_kernel<Out>: y[t] = sum_j topk_weights[t, j] * down[t * k + j],
//      summed in slot order j = 0, 1, ... (the same bits every run).
// Before these kernels the glue was ~30 CuPy element-wise and reduction
// launches per call, which cost more than the GEMMs themselves.
//
// Bit-exact with quant.per_token_q8_blocks (the NumPy/CuPy definition):
// non-finite values are left out of max|x|; scale = max|x| / 127 (IEEE fp32
// division); q = roundf(v / scale) clamped to [-127, 127] (an all-zero row
// divides by 1 instead and gets q = 0); a row holding NaN/Inf gets d = NaN and
// q = 0; every block's sum is d * sum(q) over its own 32 values.
#include "common/formats.cuh"

namespace w4kern {

constexpr int kMoeRowThreads = 256;                       // one CTA per quantized row
constexpr int kMoeRowWarps = kMoeRowThreads / 32;
constexpr int kMoeCombineThreads = 256;
constexpr unsigned kMoeFullWarp = 0xFFFFFFFFu;

// Value c of a row: x itself, or silu(g) * u for a [g; u] row of 2 * cols floats.
// silu is written as CuPy's element-wise path wrote it (g / (1 + exp(-g)) * u).
template <typename In, bool kSiluGateUp>
__device__ __forceinline__ float moe_row_value(const In* row, int c, int cols) {
    if constexpr (kSiluGateUp) {
        const float g = to_float(row[c]);
        const float u = to_float(row[cols + c]);
        return g / (1.0f + expf(-g)) * u;
    } else {
        return to_float(row[c]);
    }
}

// One CTA per row: pass 1 finds max|v| and whether the row is finite, pass 2
// (one warp per Q8 block, a lane per value) quantizes and packs. Pass 2
// recomputes v rather than keeping the row in shared memory: rows are a few
// KiB and the second read hits L1/L2. cols is a multiple of 32 (the host checks).
template <typename In, bool kSiluGateUp>
__global__ void __launch_bounds__(kMoeRowThreads)
moe_token_q8_kernel(const In* __restrict__ x, Q8Block* __restrict__ out, int cols) {
    const int row = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const In* xr = x + static_cast<i64>(row) * (kSiluGateUp ? 2 * cols : cols);

    float amax = 0.0f;
    int non_finite = 0;
    for (int c = threadIdx.x; c < cols; c += kMoeRowThreads) {
        const float v = moe_row_value<In, kSiluGateUp>(xr, c, cols);
        if (isfinite(v)) amax = fmaxf(amax, fabsf(v));
        else non_finite = 1;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kMoeFullWarp, amax, off));
    non_finite = __any_sync(kMoeFullWarp, non_finite);
    __shared__ float warp_amax[kMoeRowWarps];
    __shared__ int warp_non_finite[kMoeRowWarps];
    if (lane == 0) {
        warp_amax[warp] = amax;
        warp_non_finite[warp] = non_finite;
    }
    __syncthreads();
    amax = 0.0f;
    non_finite = 0;
#pragma unroll
    for (int w = 0; w < kMoeRowWarps; ++w) {
        amax = fmaxf(amax, warp_amax[w]);
        non_finite |= warp_non_finite[w];
    }
    const float scale = amax / 127.0f;
    const float divisor = scale == 0.0f ? 1.0f : scale;
    const float d = non_finite ? __int_as_float(0x7FC00000) : scale;   // NaN marks the row

    // Word w of a block (4 int8 each): w < 4 are qs_even (values 8w, 8w+2, 8w+4,
    // 8w+6), 4 <= w < 8 are qs_odd (those + 1); so lane w gathers its 4 bytes from
    // lanes src, src + 2, src + 4, src + 6 with src = 8 * (w & 3) + (w >> 2).
    const int src = 8 * (lane & 3) + ((lane >> 2) & 1);
    Q8Block* orow = out + static_cast<i64>(row) * (cols / kQ8BlockValues);
    for (int b = warp; b < cols / kQ8BlockValues; b += kMoeRowWarps) {
        const float v = moe_row_value<In, kSiluGateUp>(xr, b * kQ8BlockValues + lane, cols);
        int q = 0;
        if (!non_finite) q = static_cast<int>(fminf(fmaxf(roundf(v / divisor), -127.0f), 127.0f));
        const int q_sum = __reduce_add_sync(kMoeFullWarp, q);
        u32 word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 byte = static_cast<u32>(__shfl_sync(kMoeFullWarp, q, src + 2 * i)) & 0xFFu;
            word |= byte << (8 * i);
        }
        u32* block_words = reinterpret_cast<u32*>(orow + b);
        if (lane < 8) block_words[lane] = word;
        else if (lane == 8) block_words[8] = __float_as_uint(d);
        else if (lane == 9) block_words[9] = __float_as_uint(d * static_cast<float>(q_sum));
        else if (lane < 12) block_words[lane] = 0u;
    }
}

// y[t, h] = sum over slots j (in order) of topk_weights[t, j] * down[t * k + j, h].
// grid (ceil(H / kMoeCombineThreads), T).
template <typename Out>
__global__ void __launch_bounds__(kMoeCombineThreads)
moe_combine_kernel(const float* __restrict__ down, const float* __restrict__ topk_weights, Out* __restrict__ out,
                   int hidden, int k) {
    const int t = blockIdx.y;
    const int h = blockIdx.x * kMoeCombineThreads + threadIdx.x;
    if (h >= hidden) return;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const int item = t * k + j;
        acc = __fadd_rn(acc, __fmul_rn(topk_weights[item], down[static_cast<i64>(item) * hidden + h]));
    }
    out[static_cast<i64>(t) * hidden + h] = from_float<Out>(acc);
}

}  // namespace w4kern
