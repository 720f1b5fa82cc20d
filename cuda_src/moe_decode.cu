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
// Bit-exact with quant.per_token_q8_blocks (the NumPy/CuPy definition):
// non-finite values are left out of max|x|; scale = max|x| / 127 (IEEE fp32
// division); q = roundf(v / scale) clamped to [-127, 127] (an all-zero row
// divides by 1 instead and gets q = 0), reached without a division per value
// (common/q8_rounding.cuh, as quantize_q8.cu); a row holding NaN/Inf gets d = NaN
// and q = 0; every block's sum is d * sum(q) over its own 32 values.
#include "common/formats.cuh"
#include "common/ptx.cuh"
#include "common/q8_rounding.cuh"

namespace w4kern {

// One CTA per quantized row, of 32 x (1 .. 32) threads (blockDim.x: the host gives
// a row's chunks one thread each, up to 1024 threads, w4kern._registry.moe_row_threads)
constexpr int kMoeRowMaxThreads = 1024;
constexpr int kMoeRowMaxWarps = kMoeRowMaxThreads / 32;
constexpr int kMoeChunkValues = 8;                        // a thread's values: a quarter of a Q8 block
// chunks a thread loads before using any: 3 x 1024 x 8 = 24576 values (the [g; u]
// rows, 64 bytes a chunk, take 2 under the 64 registers of 1024 threads); a row that
// fits is read once, its chunks kept in registers for the second pass. Up to 1024
// threads on one row because M = 1 puts the row on one SM: a long row (K = 21504)
// took 6.8 us at 512 threads with a division per value (H200), while the MoE
// decode path's short rows (768 to 7168 values) want few threads.
template <bool kSiluGateUp> constexpr int kMoeUnroll = kSiluGateUp ? 2 : 3;
constexpr int kMoeCombineThreads = 256;
constexpr unsigned kMoeFullWarp = 0xFFFFFFFFu;

// The 8 values of chunk c of a row, loaded as raw 16-byte vectors (so that a
// thread issues all its loads before the first use: at decode sizes every
// round trip to memory is on the critical path). Values: x itself, or
// silu(g) * u for a [g; u] row of 2 * cols floats, written as CuPy's
// element-wise path wrote it (g / (1 + exp(-g)) * u). Rows are 16-byte aligned
// (the host checks) and cols is a multiple of 32.
template <typename In, bool kSiluGateUp>
struct MoeChunk {
    static constexpr int kVecs = kSiluGateUp ? 4 : kMoeChunkValues * static_cast<int>(sizeof(In)) / 16;
    uint4 raw[kVecs];

    __device__ __forceinline__ void load(const In* row, int chunk, int cols) {
        if constexpr (kSiluGateUp) {
            const uint4* g = reinterpret_cast<const uint4*>(row + chunk * kMoeChunkValues);
            const uint4* u = reinterpret_cast<const uint4*>(row + cols + chunk * kMoeChunkValues);
            raw[0] = g[0]; raw[1] = g[1]; raw[2] = u[0]; raw[3] = u[1];
        } else {
            const uint4* p = reinterpret_cast<const uint4*>(row + chunk * kMoeChunkValues);
#pragma unroll
            for (int h = 0; h < kVecs; ++h) raw[h] = p[h];
        }
    }
    __device__ __forceinline__ void values(float (&v)[kMoeChunkValues]) const {
        if constexpr (kSiluGateUp) {
            const float* f = reinterpret_cast<const float*>(raw);
#pragma unroll
            for (int i = 0; i < kMoeChunkValues; ++i) {
                const float g = f[i];
                v[i] = g / (1.0f + expf(-g)) * f[kMoeChunkValues + i];
            }
        } else {
            const In* e = reinterpret_cast<const In*>(raw);
#pragma unroll
            for (int i = 0; i < kMoeChunkValues; ++i) v[i] = to_float(e[i]);
        }
    }
};

// One CTA per row. Pass 1 finds max|v| and whether the row is finite; pass 2
// quantizes and packs. A thread holds values 8t .. 8t+7 of a Q8 block (t =
// lane & 3): its even ones are exactly qs_even word t and its odd ones qs_odd
// word t, and the block's sum(q) reduces over 4 adjacent lanes. At decode sizes
// every memory round trip is on the critical path, so a CTA loads a whole row
// (up to kMoeUnroll chunks a thread) in one batch and pass 2 quantizes those
// registers; only a longer row is read again (L1/L2 hits). Every thread runs
// the same number of loop iterations (full-warp shuffles); lanes past the row's
// end store nothing. kQ8Blocks = false writes the row's q in natural order (8
// bytes per thread) to out [rows, cols] int8 and its scale to row_scales[row]
// instead.
template <typename In, bool kSiluGateUp, bool kQ8Blocks>
__global__ void __launch_bounds__(kMoeRowMaxThreads)
moe_token_q8_kernel(const In* __restrict__ x, u8* __restrict__ out, float* __restrict__ row_scales, int cols,
                    int first_kernel) {   // 1: the op's first kernel (common/ptx.cuh)
    using Chunk = MoeChunk<In, kSiluGateUp>;
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
    const int row = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_chunks = cols / kMoeChunkValues;
    constexpr int kUnroll = kMoeUnroll<kSiluGateUp>;
    const int threads = blockDim.x;
    const int stride = threads * kUnroll;
    const bool one_batch = n_chunks <= stride;   // pass 2 reuses pass 1's chunks
    const In* xr = x + static_cast<i64>(row) * (kSiluGateUp ? 2 * cols : cols);

    float amax = 0.0f;
    int non_finite = 0;
    Chunk chunk[kUnroll];
    for (int base = threadIdx.x; base < n_chunks; base += stride) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * threads < n_chunks) chunk[u].load(xr, base + u * threads, cols);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (base + u * threads >= n_chunks) break;
            float v[kMoeChunkValues];
            chunk[u].values(v);
#pragma unroll
            for (int i = 0; i < kMoeChunkValues; ++i) {
                if (isfinite(v[i])) amax = fmaxf(amax, fabsf(v[i]));
                else non_finite = 1;
            }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kMoeFullWarp, amax, off));
    non_finite = __any_sync(kMoeFullWarp, non_finite);
    __shared__ float warp_amax[kMoeRowMaxWarps];
    __shared__ int warp_non_finite[kMoeRowMaxWarps];
    if (lane == 0) {
        warp_amax[warp] = amax;
        warp_non_finite[warp] = non_finite;
    }
    __syncthreads();
    amax = 0.0f;
    non_finite = 0;
#pragma unroll
    for (int w = 0; w < threads / 32; ++w) {
        amax = fmaxf(amax, warp_amax[w]);
        non_finite |= warp_non_finite[w];
    }
    const float scale = amax / 127.0f;
    const float d = non_finite ? __int_as_float(0x7FC00000) : scale;   // NaN marks the row

    const int t = lane & 3;
    u32* row_words = reinterpret_cast<u32*>(out + static_cast<i64>(row) * (kQ8Blocks ? cols / kQ8BlockValues * sizeof(Q8Block) : cols));
    if (!kQ8Blocks && threadIdx.x == 0) row_scales[row] = d;
    for (int base0 = warp * 32; base0 < n_chunks; base0 += stride) {   // warp-uniform trip count
        const int base = base0 + lane;   // = threadIdx.x in the first batch, as in pass 1
        if (!one_batch) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * threads < n_chunks) chunk[u].load(xr, base + u * threads, cols);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (base0 + u * threads >= n_chunks) break;   // warp-uniform
            const int c = base + u * threads;
            const bool valid = c < n_chunks;                     // the same for a block's 4 lanes
            float v[kMoeChunkValues];
            chunk[u].values(v);
            // q = roundf(v / scale) clamped, as the bits of kRoundMagic + q (its low
            // byte is q); scale 0 (an all-zero row) gives q = 0
            u32 bits[kMoeChunkValues];
            int ignored = 0;   // the row's non-finite flag is known from pass 1
            quantize_values_q8(v, scale, bits, ignored);
            u32 bits_sum = 0;
#pragma unroll
            for (int i = 0; i < kMoeChunkValues; ++i) {
                if (non_finite || !valid) bits[i] = kRoundMagicBits;   // q = 0
                bits_sum += bits[i];
            }
            if constexpr (!kQ8Blocks) {   // the chunk's 8 bytes in k order
                if (valid)
                    *reinterpret_cast<uint2*>(row_words + 2 * c) =
                        make_uint2(pack_low_bytes(bits[0], bits[1], bits[2], bits[3]),
                                   pack_low_bytes(bits[4], bits[5], bits[6], bits[7]));
                continue;
            }
            int q_sum = q_sum_from_bits<kMoeChunkValues>(bits_sum);
            q_sum += __shfl_xor_sync(kMoeFullWarp, q_sum, 1);
            q_sum += __shfl_xor_sync(kMoeFullWarp, q_sum, 2);
            if (!valid) continue;
            const u32 even = pack_low_bytes(bits[0], bits[2], bits[4], bits[6]);
            const u32 odd = pack_low_bytes(bits[1], bits[3], bits[5], bits[7]);
            u32* block = row_words + (c >> 2) * (sizeof(Q8Block) / 4);
            block[t] = even;        // qs_even word t
            block[4 + t] = odd;     // qs_odd word t
            if (t == 0)
                *reinterpret_cast<uint4*>(block + 8) =
                    make_uint4(__float_as_uint(d), __float_as_uint(d * static_cast<float>(q_sum)), 0u, 0u);
        }
    }
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
