// moe_decode: the glue of fused_moe's decode path (w4kern/moe.py,
// _fused_moe_decode_cuda). The two expert GEMMs are matvec_q8's item-mode
// instances (GEMM1 per item, GEMM2 per token summing its slots); around them
// run launches of this file:
//   1. moe_token_q8_kernel<In, false>: x [T, H] -> per-token INT8 rows stored as
//      Q8 blocks [T, H / 32] that all carry the row's scale.
//   2. moe_token_q8_kernel<float, true>: GEMM1's fp32 [g; u] rows [T * k, 2I] ->
//      silu(g) * u, quantized the same way into [T * k, I / 32] Q8 blocks.
//   3. moe_combine_kernel<Out>: y[t] = sum_j topk_weights[t, j] * down[t * k + j],
//      summed in slot order j = 0, 1, ... (the same bits every run), for the
//      batched path (moe_gemm.cu), the bf16 decode path, and the int8 decode path
//      beyond 32 slots (where GEMM2 runs per item).
// Kernel 1 with kQ8Blocks = false also serves w4kern.linear(act="int8"): the
// same per-token INT8 as plain rows, q int8 [T, H] and scales float32 [T]
// (PerTokenInt8, quant.quantize_per_token_int8), for matvec_a16's INT8 instances.
// The bf16 decode path (matvec_a16's items) replaces 1 and 2 with
//   4. moe_silu_mul_kernel<Out>: GEMM1's fp32 [g; u] rows -> silu(g) * u rounded
//      to x's 16-bit type (GEMM2's activations), as the batched A16 epilogue.
// Before these kernels the glue was ~30 CuPy element-wise and reduction
// launches per call, which cost more than the GEMMs themselves.
//
// Kernels 1 and 2 are bit-exact with quant.per_token_q8_blocks (the
// NumPy/CuPy definition; common/moe_row_q8.cuh states it).
#include "common/moe_row_q8.cuh"

namespace w4kern {

constexpr int kMoeCombineThreads = 256;

// One CTA per row (blockIdx.x) of 32 x (1 .. 32) threads (blockDim.x: the host
// gives a row's chunks one thread each, up to 1024 threads,
// w4kern._registry.moe_row_threads); common/moe_row_q8.cuh has the method.
template <typename In, bool kSiluGateUp, bool kQ8Blocks>
__global__ void __launch_bounds__(kMoeRowMaxThreads)
moe_token_q8_kernel(const In* __restrict__ x, u8* __restrict__ out, float* __restrict__ row_scales, int cols,
                    int first_kernel) {   // 1: the op's first kernel (common/ptx.cuh)
    // Programmatic launches: the kernel before it has finished at pdl_wait; the
    // matvec after it may start and fetch weights from pdl_launch_dependents. After
    // GEMM1 in one op, the matvec may start at once; as an op's first kernel, only
    // once the previous op is done.
    if (first_kernel) {
        pdl_first_kernel_start();
    } else {
        pdl_launch_dependents();
        pdl_wait();
    }
    const i64 row = blockIdx.x;
    moe_row_q8<In, kSiluGateUp, kQ8Blocks>(
        x + row * (kSiluGateUp ? 2 * cols : cols),
        out + row * (kQ8Blocks ? cols / kQ8BlockValues * static_cast<int>(sizeof(Q8Block)) : cols),
        row_scales + row, cols);
}

// y[t, h] = sum over slots j (in order) of topk_weights[t, j] * down[t * k + j, h],
// leaving out slots whose expert id is outside [0, E) (the batched path never
// writes their rows; the decode path writes zeros there). grid (ceil(H / 256), T).
template <typename Out>
__global__ void __launch_bounds__(kMoeCombineThreads)
moe_combine_kernel(const float* __restrict__ down, const float* __restrict__ topk_weights,
                   const i32* __restrict__ topk_ids, Out* __restrict__ out, int hidden, int k, int n_experts) {
    const int t = blockIdx.y;
    const int h = blockIdx.x * kMoeCombineThreads + threadIdx.x;
    if (h >= hidden) return;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const int item = t * k + j;
        const int e = topk_ids[item];
        if (e < 0 || e >= n_experts) continue;
        acc = __fadd_rn(acc, __fmul_rn(topk_weights[item], down[static_cast<i64>(item) * hidden + h]));
    }
    out[static_cast<i64>(t) * hidden + h] = from_float<Out>(acc);
}

template <typename Out>
__global__ void __launch_bounds__(kMoeCombineThreads)
moe_silu_mul_kernel(const float* __restrict__ gate_up, Out* __restrict__ out, int cols) {
    const i64 row = blockIdx.y;
    const int c = blockIdx.x * kMoeCombineThreads + threadIdx.x;
    if (c >= cols) return;
    const float g = gate_up[row * 2 * cols + c], u = gate_up[row * 2 * cols + cols + c];
    out[row * cols + c] = from_float<Out>(g / (1.0f + expf(-g)) * u);
}

}  // namespace w4kern
