// Per-token INT8 of one row by one CTA: the quantizer of fused_moe's int8
// decode path (moe_decode.cu's moe_token_q8_kernel, one CTA per row, and
// moe_decode_fused.cu's one-kernel path) and of linear's act="int8".
//
// Bit-exact with quant.per_token_q8_blocks (the NumPy/CuPy definition):
// non-finite values are left out of max|x|; scale = max|x| / 127 (IEEE fp32
// division); q = roundf(v / scale) clamped to [-127, 127] (an all-zero row
// divides by 1 instead and gets q = 0), reached without a division per value
// (q8_rounding.cuh, as quantize_q8.cu); a row holding NaN/Inf gets d = NaN
// and q = 0; every block's sum is d * sum(q) over its own 32 values.
#pragma once

#include "formats.cuh"
#include "ptx.cuh"
#include "q8_rounding.cuh"

namespace w4kern {

// A row's CTA: 32 x (1 .. 32) threads (blockDim.x; moe_decode.cu's kernel gives a
// row's chunks one thread each, up to 1024, w4kern._registry.moe_row_threads)
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

// One CTA quantizes one row. Pass 1 finds max|v|
// and whether the row is finite; pass 2 quantizes and packs. A thread holds
// values 8t .. 8t+7 of a Q8 block (t = lane & 3): its even ones are exactly
// qs_even word t and its odd ones qs_odd word t, and the block's sum(q)
// reduces over 4 adjacent lanes. At decode sizes every memory round trip is on
// the critical path, so a CTA loads a whole row (up to kMoeUnroll chunks a
// thread) in one batch and pass 2 quantizes those registers; only a longer row
// is read again (L1/L2 hits). Every thread runs the same number of loop
// iterations (full-warp shuffles); lanes past the row's end store nothing.
// kQ8Blocks = false writes the row's q in natural order (8 bytes per thread)
// to out_row [cols] int8 and its scale to *row_scale instead. xr is the row
// ([g; u] rows: 2 * cols values); out_row may be in shared memory. Every
// thread of the CTA calls it; a caller quantizing several rows in a row puts a
// __syncthreads() between calls (the warps' maxima share one smem array).
template <typename In, bool kSiluGateUp, bool kQ8Blocks>
__device__ __forceinline__ void moe_row_q8(const In* xr, u8* out_row, float* row_scale, int cols) {
    using Chunk = MoeChunk<In, kSiluGateUp>;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_chunks = cols / kMoeChunkValues;
    constexpr int kUnroll = kMoeUnroll<kSiluGateUp>;
    const int threads = blockDim.x;
    const int stride = threads * kUnroll;
    const bool one_batch = n_chunks <= stride;   // pass 2 reuses pass 1's chunks

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
    u32* row_words = reinterpret_cast<u32*>(out_row);
    if (!kQ8Blocks && threadIdx.x == 0) *row_scale = d;
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

}  // namespace w4kern
