// matvec_a16: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4 weights
// (Int4Weight, plain layout) against bf16/fp16 activations, M <= 8 tokens, on
// tensor cores fed straight from global memory (no shared-memory staging).
//
// The weights are the 16-row A operand of mma.m16n8k16 and the tokens the 8
// columns of B (columns >= M are zero and never stored), so one weight load
// serves all M tokens and the time is flat in M. The sum over k does not care
// which k a fragment slot holds, as long as A and B agree and all k of one MMA
// share a weight group. So instead of the MMA's own k order, thread (g, t) of
// a warp (g = lane / 4 the row, t = lane % 4) owns kChunkBytes consecutive
// bytes of rows g and g + 8 in each group slice (one vector load each; the
// four threads of a row cover one group, 8 * kChunkBytes k = the group size,
// or 128 k of a per-channel row) and the matching 2 * kChunkBytes activations
// of token g. A step is 256 bytes of each row (512 k, 4 to 16 group slices),
// so a warp's loads of one row are one contiguous run.
//
// Nibbles become 16-bit floats with one shift and one LOP3 per pair: OR-ing q
// into the mantissa under the exponent of 8 gives f = 8 + q / 2 exactly, in
// both halves of a word at once. A word's nibbles at bits s and 16 + s (k and
// k + 4 of its eight) form one pair; prmt pairs the activations the same way.
// With f instead of q - z the sum per group and token is
//     sum (q - z) x = 2 * sum f x - (16 + z) * sum x,
// where sum x comes from one more MMA with an all-ones A (every row of its
// result holds the column sums, exactly where the epilogue needs them). The
// offset costs a few bits of the fp32 accumulator at most (|f| <= 15.5 against
// |q - z| up to 15), far below the output's rounding.
//
// Work split: kSplit warps of a CTA share a row block (16 rows) and split its
// K steps; CTAs are persistent and each warp issues the weight loads of its
// next step (the same or the next row block) before the MMAs of this one.
// Split warps reduce through shared memory in a fixed order (deterministic).
#include "common/formats.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kA16Threads = 256;
constexpr int kA16Warps = kA16Threads / 32;
constexpr int kA16StepRowBytes = 256;   // bytes of each of a warp's 16 rows per step

// 16-bit float pairs f = 8 + q / 2 from the nibbles at bits kShift and 16 + kShift.
template <typename ActT> struct A16Nibbles;

template <> struct A16Nibbles<bf16_t> {
    static constexpr u32 kOnes = 0x3F803F80u;   // bf16 1.0 in both halves
    template <int kShift>
    static __device__ __forceinline__ u32 pair(u32 w) {
        // exponent of 8 (0x4100) and q in mantissa bits 3..6: 8 * (1 + q / 16)
        const u32 v = kShift <= 3 ? (w << (3 - kShift)) : (w >> (kShift - 3));
        return (v & 0x00780078u) | 0x41004100u;
    }
};

template <> struct A16Nibbles<f16_t> {
    static constexpr u32 kOnes = 0x3C003C00u;   // fp16 1.0 in both halves
    template <int kShift>
    static __device__ __forceinline__ u32 pair(u32 w) {
        // exponent of 8 (0x4800) and q in mantissa bits 6..9: 8 * (1 + q / 16)
        const u32 v = kShift <= 6 ? (w << (6 - kShift)) : (w >> (kShift - 6));
        return (v & 0x03C003C0u) | 0x48004800u;
    }
};

// kBytes (4, 8 or 16) bytes as words, in one vector load.
template <int kBytes>
__device__ __forceinline__ void load_words(u32 (&dst)[kBytes / 4], const void* p) {
    if constexpr (kBytes == 16) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    } else if constexpr (kBytes == 8) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        dst[0] = v.x; dst[1] = v.y;
    } else {
        static_assert(kBytes == 4, "4, 8 or 16 bytes");
        dst[0] = *reinterpret_cast<const u32*>(p);
    }
}

template <typename ActT, typename ScaleT, bool kHasZeros, int kChunkBytes, bool kPerChannel, int kSplit>
__global__ void __launch_bounds__(kA16Threads, 2) matvec_a16_kernel(
    const u8* __restrict__ qweight,      // [N, K / 2]
    const ScaleT* __restrict__ scales,   // [N, n_groups]
    const ScaleT* __restrict__ zeros,    // [N, n_groups] (asymmetric only)
    const ActT* __restrict__ x,          // [M, K]
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 k_dim, i32 m_tokens, i32 n_groups, i32 out_kind)
{
    static_assert(kA16Warps % kSplit == 0, "a CTA's warps split evenly over its row blocks");
    static_assert(!kPerChannel || kChunkBytes == 16, "per-channel weights take 128 k per slice");
    using Nib = A16Nibbles<ActT>;
    constexpr int kWords = kChunkBytes / 4;              // weight words per row, thread and group
    constexpr int kGroups = kA16StepRowBytes / 4 / kChunkBytes;   // weight groups (slices) per step
    constexpr int kSliceK = 8 * kChunkBytes;             // k per group slice (4 threads x 2 * kChunkBytes)
    constexpr int kStepK = kGroups * kSliceK;            // 512 k per step
    constexpr int kBlocksPerSet = kA16Warps / kSplit;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int part = warp % kSplit;
    const int n_blocks = (n_rows + 15) / 16;
    const int n_sets = (n_blocks + kBlocksPerSet - 1) / kBlocksPerSet;
    const int steps = (k_dim + kStepK - 1) / kStepK;               // per row block
    const int my_steps = (steps + kSplit - 1) / kSplit;            // per warp, the same for all
    const i64 row_bytes = k_dim / 2;
    __shared__ float partial[kSplit > 1 ? kA16Warps : 1][4][32];

    auto block_of = [&](int set) { return set * kBlocksPerSet + warp / kSplit; };
    // row r of row block b, clamped so every load is in bounds (only real rows are stored)
    auto row_of = [&](int b, int r) { return min(b * 16 + r, n_rows - 1); };
    // first k of this thread in group slice j of step `chunk`
    auto k_of = [&](int chunk, int j) { return chunk * kStepK + j * kSliceK + t * 2 * kChunkBytes; };

    // Only the weights are prefetched (a step ahead, in registers): 64 bytes of
    // rows g and g + 8 per thread and step, read as kGroups runs of kChunkBytes
    // that four threads make 4 * kChunkBytes contiguous, so a warp reads 256
    // contiguous bytes of each of its 16 rows per step. Activations (a few KB,
    // shared by every warp: L1 and L2 hits) and scales are read when used, after
    // the next step's weights are already in flight.
    using Weights = u32[kGroups][2][kWords];
    auto load_weights = [&](Weights& w, int set, int step) {
        const int b = block_of(set);
        const int chunk = step * kSplit + part;
#pragma unroll
        for (int j = 0; j < kGroups; ++j) {
            const int k0 = k_of(chunk, j);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (b < n_blocks && chunk < steps && k0 < k_dim) {
                    load_words<kChunkBytes>(w[j][h], qweight + row_of(b, g + 8 * h) * row_bytes + k0 / 2);
                } else {   // past the end of K: zeros contribute nothing
#pragma unroll
                    for (int e = 0; e < kWords; ++e) w[j][h][e] = 0u;
                }
            }
        }
    };

    float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // (row g, tokens 2t, 2t+1), (row g+8, same tokens)

    // One step: per group slice, two MMAs per weight word over rows g..g+15 and
    // the 8 token columns, two all-ones MMAs for sum x, then the group's scale
    // and zero in fp32. A slice that starts past K is skipped; one that K ends
    // inside (per-channel K not a multiple of 128) has zeros in its last
    // threads' weights and activations, and every thread still applies the
    // row's scale, because the MMA result it holds sums all four threads' k.
    auto compute_step = [&](const Weights& w, int b, int step) {
        const int chunk = step * kSplit + part;
        if (chunk >= steps) return;
#pragma unroll
        for (int j = 0; j < kGroups; ++j) {
            if (chunk * kStepK + j * kSliceK >= k_dim) break;
            const int k0 = k_of(chunk, j);
            const int group = kPerChannel ? 0 : chunk * kGroups + j;
            float s[2], z[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 at = static_cast<i64>(row_of(b, g + 8 * h)) * n_groups + group;
                s[h] = to_float(scales[at]);
                z[h] = kHasZeros ? to_float(zeros[at]) : static_cast<float>(kInt4SymmetricZero);
            }
            u32 xw[4 * kWords];   // token g's 2 * kChunkBytes activations from k0
            if (g < m_tokens && k0 < k_dim) {
                const ActT* src = x + static_cast<i64>(g) * k_dim + k0;
#pragma unroll
                for (int e = 0; e < kWords; ++e) {
                    u32 v[4];
                    load_words<16>(v, src + 8 * e);
#pragma unroll
                    for (int c = 0; c < 4; ++c) xw[4 * e + c] = v[c];
                }
            } else {
#pragma unroll
                for (int e = 0; e < 4 * kWords; ++e) xw[e] = 0u;
            }
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            float sum_x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const u32 ones[4] = {Nib::kOnes, Nib::kOnes, Nib::kOnes, Nib::kOnes};
#pragma unroll
            for (int e = 0; e < kWords; ++e) {
                // activations k .. k + 7 of this word, paired as (k, k + 4), (k + 1, k + 5), ...
                const u32* u = xw + 4 * e;
                const u32 x04 = byte_perm(u[0], u[2], 0x5410), x15 = byte_perm(u[0], u[2], 0x7632);
                const u32 x26 = byte_perm(u[1], u[3], 0x5410), x37 = byte_perm(u[1], u[3], 0x7632);
                const u32 lo = w[j][0][e], hi = w[j][1][e];   // rows g and g + 8
                const u32 a0[4] = {Nib::template pair<0>(lo), Nib::template pair<0>(hi),
                                   Nib::template pair<4>(lo), Nib::template pair<4>(hi)};
                mma_m16n8k16<ActT>(acc, a0, x04, x15);
                const u32 a1[4] = {Nib::template pair<8>(lo), Nib::template pair<8>(hi),
                                   Nib::template pair<12>(lo), Nib::template pair<12>(hi)};
                mma_m16n8k16<ActT>(acc, a1, x26, x37);
                mma_m16n8k16<ActT>(sum_x, ones, x04, x15);
                mma_m16n8k16<ActT>(sum_x, ones, x26, x37);
            }
            // sum_x holds the same two tokens' sums in every row
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float zz = 16.0f + z[h];
#pragma unroll
                for (int c = 0; c < 2; ++c) y[2 * h + c] += s[h] * (2.0f * acc[2 * h + c] - zz * sum_x[c]);
            }
        }
    };

    // Row block b is done: sum the split warps' results through shared memory
    // in split order and store. Every warp of the CTA calls this at once.
    auto finish_block = [&](int b) {
        if constexpr (kSplit > 1) {
#pragma unroll
            for (int e = 0; e < 4; ++e) partial[warp][e][lane] = y[e];
            __syncthreads();
            if (part == 0) {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    for (int p = 1; p < kSplit; ++p) y[e] += partial[warp + p][e][lane];
            }
            __syncthreads();   // partial[] is free for the next row block
        }
        if (part == 0 && b < n_blocks) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = b * 16 + g + 8 * h;
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int m = 2 * t + c;
                    if (row < n_rows && m < m_tokens) {
                        float v = y[2 * h + c];
                        if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                        store_from_float(out, static_cast<i64>(m) * n_rows + row, v, out_kind);
                    }
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) y[e] = 0.0f;
    };

    // Persistent CTAs walk row-block sets blockIdx.x, blockIdx.x + gridDim.x, ...
    int set = blockIdx.x, step = 0;
    if (set >= n_sets) return;   // whole CTA
    Weights cur, next;
    load_weights(cur, set, 0);
    while (true) {
        int next_set = set, next_step = step + 1;
        if (next_step == my_steps) { next_set = set + gridDim.x; next_step = 0; }
        const bool more = next_set < n_sets;   // the same for every warp of the CTA
        if (more) load_weights(next, next_set, next_step);
        const int b = block_of(set);
        if (b < n_blocks) compute_step(cur, b, step);
        if (next_step == 0) finish_block(b);
        if (!more) break;
        set = next_set;
        step = next_step;
#pragma unroll
        for (int j = 0; j < kGroups; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < kWords; ++e) cur[j][h][e] = next[j][h][e];
    }
}

}  // namespace w4kern
