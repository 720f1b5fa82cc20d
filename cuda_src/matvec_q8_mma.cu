// matvec_q8_mma: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4 weights
// (Int4Weight, plain layout) against Q8 activation blocks, M <= 8 tokens, on
// int8 tensor cores fed straight from global memory (no shared-memory staging).
//
// matvec_a16's scheme with int8 MMAs: the weights are the 16-row A operand of
// mma.m16n8k32 and the tokens the 8 columns of B (columns >= M are zero and
// never stored), so one weight load serves every token and the time is flat in
// M. One MMA covers one Q8 block (32 k): its int32 result is a per-block dot
// product, which becomes fp32 with the block's activation scale d:
//     sum_k (q - z) x = sum_blocks (d * dot(q, q_x) - z * sum)    (sum = d * sum q_x)
// and the weight scale multiplies once per weight group.
//
// The sum over a block's k does not care which k a fragment slot holds, as
// long as A and B agree. Thread (g, t) of a warp (g = lane / 4 the row, t =
// lane % 4) takes word t (bytes 4t..4t+3, k = 8t..8t+7) of the block's 16
// weight bytes in rows g and g + 8: its low nibbles (k = 8t + 0, 2, 4, 6) are
// one A register, its high nibbles (8t + 1, 3, 5, 7) another, one AND and one
// shift-and-AND per word, no conversion to a float. The matching activations
// are word t of the block's qs_even and qs_odd halves, as the Q8 format stores
// them. A step takes 4 blocks (128 k) per row; a weight group spans
// kGroupBlocks of them (1, 2 or 4; per-channel weights take 4).
//
// Work split as in matvec_a16: kSplit warps of a CTA share a row block
// (kTiles x 16 rows) and split its K steps; CTAs are persistent, and each warp
// issues the loads of its next step before the MMAs of this one. Split warps
// reduce through shared memory in a fixed order (deterministic).
#include "common/formats.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kQ8MmaThreads = 256;
constexpr int kQ8MmaWarps = kQ8MmaThreads / 32;
constexpr int kQ8MmaStepBlocks = 4;   // Q8 blocks (of 32 k) per step

// Everything one step of one warp reads from global memory, so the next step's
// loads can be in flight during this step's math.
template <int kTiles, int kGroupBlocks>
struct Q8MmaStep {
    static constexpr int kGroups = kQ8MmaStepBlocks / kGroupBlocks;   // weight groups per step
    u32 w[kTiles][2][kQ8MmaStepBlocks];   // word t of each block, rows g and g + 8 of each tile
    u32 xe[kQ8MmaStepBlocks], xo[kQ8MmaStepBlocks];   // B column g: word t of qs_even, qs_odd
    float2 ds[kQ8MmaStepBlocks][2];       // (d, sum) of tokens 2t and 2t + 1 per block
    float s[kTiles][2][kGroups], z[kTiles][2][kGroups];   // group scale and zero of rows g, g + 8
};

template <typename ScaleT, bool kHasZeros, int kGroupBlocks, int kTiles, int kSplit>
__global__ void __launch_bounds__(kQ8MmaThreads, 2) matvec_q8_mma_kernel(
    const u8* __restrict__ qweight,      // [N, K / 2]
    const ScaleT* __restrict__ scales,   // [N, n_groups]
    const ScaleT* __restrict__ zeros,    // [N, n_groups] (asymmetric only)
    const Q8Block* __restrict__ act,     // [M, K / 32]
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 n_blocks, i32 m_tokens, i32 n_groups,
    i32 group_shift,                     // log2(blocks per group); 31 for one group per row
    i32 out_kind)
{
    static_assert(kQ8MmaWarps % kSplit == 0, "a CTA's warps split evenly over its row blocks");
    static_assert(kGroupBlocks == 1 || kGroupBlocks == 2 || kGroupBlocks == 4, "a group spans 1, 2 or 4 blocks of a step");
    using Step = Q8MmaStep<kTiles, kGroupBlocks>;
    constexpr int kGroups = Step::kGroups;
    constexpr int kBlockRows = 16 * kTiles;
    constexpr int kBlocksPerSet = kQ8MmaWarps / kSplit;
    constexpr int kOutPerThread = kTiles * 4;        // (rows g, g + 8) x (tokens 2t, 2t + 1) per tile

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int part = warp % kSplit;
    const int n_row_blocks = (n_rows + kBlockRows - 1) / kBlockRows;
    const int n_sets = (n_row_blocks + kBlocksPerSet - 1) / kBlocksPerSet;
    const int steps = (n_blocks + kQ8MmaStepBlocks - 1) / kQ8MmaStepBlocks;   // per row block
    const int my_steps = (steps + kSplit - 1) / kSplit;                       // per warp, the same for all
    // Weight offsets in 32 bits: the host keeps N * K / 2 below 2^32 (linear.py,
    // _check_a16_weight_bytes); 64-bit products cost issue slots in this loop.
    const u32 row_bytes = static_cast<u32>(n_blocks) * 16u;
    const float implicit_zero = static_cast<float>(kInt4SymmetricZero);
    __shared__ float partial[kSplit > 1 ? kQ8MmaWarps : 1][kOutPerThread][32];

    auto block_of = [&](int set) { return set * kBlocksPerSet + warp / kSplit; };
    // row r of tile i of row block rb, clamped so every load is in bounds (only real rows are stored)
    auto row_of = [&](int rb, int i, int r) { return min(rb * kBlockRows + i * 16 + r, n_rows - 1); };

    auto load_step = [&](Step& st, int set, int step) {
        const int rb = block_of(set);
        if (rb >= n_row_blocks) return;
        const int blk0 = (step * kSplit + part) * kQ8MmaStepBlocks;   // the step's first Q8 block
        // A block past the end of K gets zero activations and (d, sum) = 0, so it
        // adds nothing; its weight words come from the row's first bytes (finite,
        // in bounds) rather than being zeroed, which would cost issue slots.
#pragma unroll
        for (int i = 0; i < kTiles; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = row_of(rb, i, g + 8 * h);
                const u8* base = qweight + static_cast<u32>(row) * row_bytes + 4u * t;
#pragma unroll
                for (int j = 0; j < kQ8MmaStepBlocks; ++j) {
                    const int blk = blk0 + j < n_blocks ? blk0 + j : 0;
                    st.w[i][h][j] = *reinterpret_cast<const u32*>(base + 16u * static_cast<u32>(blk));
                }
#pragma unroll
                for (int c = 0; c < kGroups; ++c) {
                    const int blk = blk0 + c * kGroupBlocks;
                    if (blk < n_blocks) {
                        const u32 at = static_cast<u32>(row) * static_cast<u32>(n_groups) +
                                       static_cast<u32>(blk >> group_shift);
                        st.s[i][h][c] = to_float(scales[at]);
                        st.z[i][h][c] = kHasZeros ? to_float(zeros[at]) : implicit_zero;
                    } else {
                        st.s[i][h][c] = 0.0f;
                        st.z[i][h][c] = 0.0f;
                    }
                }
            }
#pragma unroll
        for (int j = 0; j < kQ8MmaStepBlocks; ++j) {
            const int blk = blk0 + j;
            const bool in_k = blk < n_blocks;
            // B column g: token g's quantized values
            if (in_k && g < m_tokens) {
                const u32* q = reinterpret_cast<const u32*>(act + static_cast<i64>(g) * n_blocks + blk);
                st.xe[j] = q[t];        // qs_even word t
                st.xo[j] = q[4 + t];    // qs_odd word t
            } else {
                st.xe[j] = 0u;
                st.xo[j] = 0u;
            }
            // this thread's result columns: tokens 2t and 2t + 1
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int m = 2 * t + c;
                st.ds[j][c] = in_k && m < m_tokens
                    ? *reinterpret_cast<const float2*>(&act[static_cast<i64>(m) * n_blocks + blk].d)
                    : make_float2(0.0f, 0.0f);
            }
        }
    };

    float y[kTiles][4];
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = 0.0f;

    // One step: an int8 MMA per block and tile; each block's dot products times
    // its d summed per weight group, then the group's scale and zero.
    auto compute_step = [&](const Step& st) {
#pragma unroll
        for (int c = 0; c < kGroups; ++c) {
            float acc[kTiles][4];
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
            float sum[2] = {0.0f, 0.0f};   // the group's sum of tokens 2t, 2t + 1
#pragma unroll
            for (int jj = 0; jj < kGroupBlocks; ++jj) {
                const int j = c * kGroupBlocks + jj;
#pragma unroll
                for (int i = 0; i < kTiles; ++i) {
                    const u32 lo = st.w[i][0][j], hi = st.w[i][1][j];   // rows g and g + 8
                    const u32 a[4] = {lo & kLowNibbles, hi & kLowNibbles, (lo >> 4) & kLowNibbles,
                                      (hi >> 4) & kLowNibbles};
                    i32 dot[4];
                    mma_s8_m16n8k32(dot, a, st.xe[j], st.xo[j]);
                    // dot: (row g, tokens 2t, 2t+1), (row g+8, same tokens)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][e] = fmaf(st.ds[j][e & 1].x, static_cast<float>(dot[e]), acc[i][e]);
                }
                sum[0] += st.ds[j][0].y;
                sum[1] += st.ds[j][1].y;
            }
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        y[i][2 * h + e] = fmaf(st.s[i][h][c], fmaf(-st.z[i][h][c], sum[e], acc[i][2 * h + e]),
                                               y[i][2 * h + e]);
        }
    };

    // Row block rb is done: sum the split warps' results through shared memory
    // in split order and store. Every warp of the CTA calls this at once.
    auto finish_block = [&](int rb) {
        if constexpr (kSplit > 1) {
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) partial[warp][i * 4 + e][lane] = y[i][e];
            __syncthreads();
            if (part == 0) {
#pragma unroll
                for (int i = 0; i < kTiles; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        for (int p = 1; p < kSplit; ++p) y[i][e] += partial[warp + p][i * 4 + e][lane];
            }
            __syncthreads();   // partial[] is free for the next row block
        }
        if (part == 0 && rb < n_row_blocks) {
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = rb * kBlockRows + i * 16 + g + 8 * h;
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int m = 2 * t + c;
                        if (row < n_rows && m < m_tokens) {
                            float v = y[i][2 * h + c];
                            if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                            store_from_float(out, static_cast<i64>(m) * n_rows + row, v, out_kind);
                        }
                    }
                }
        }
#pragma unroll
        for (int i = 0; i < kTiles; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) y[i][e] = 0.0f;
    };

    // Persistent CTAs walk row-block sets blockIdx.x, blockIdx.x + gridDim.x, ...
    int set = blockIdx.x, step = 0;
    if (set >= n_sets) return;   // whole CTA
    Step cur, next;
    load_step(cur, set, 0);
    while (true) {
        int next_set = set, next_step = step + 1;
        if (next_step == my_steps) { next_set = set + gridDim.x; next_step = 0; }
        const bool more = next_set < n_sets;   // the same for every warp of the CTA
        if (more) load_step(next, next_set, next_step);
        const int rb = block_of(set);
        if (rb < n_row_blocks) compute_step(cur);
        if (next_step == 0) finish_block(rb);
        if (!more) break;
        set = next_set;
        step = next_step;
        cur = next;
    }
}

}  // namespace w4kern
