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
// bytes of rows g and g + 8 (one vector load each, coalesced four threads to
// a 4 * kChunkBytes run) and the matching 2 * kChunkBytes activations of token
// g (vector loads too); the four threads of a row cover one weight group per
// step (8 * kChunkBytes = group size; 128 k per step for per-channel weights),
// or 128 k holding 2 or 4 groups with group slots (below).
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
// Group slots (kGroupSlots = 2 or 4: g64 or g32 weights, M <= 8 / kGroupSlots):
// a step still takes 128 k (16 bytes per row and thread, one vector load), so
// the four threads of a row hold kGroupSlots different groups, which one MMA
// would mix. B's spare columns keep them apart: column n holds token
// n / kGroupSlots, and only the threads whose k range lies in group slot
// n % kGroupSlots give it their activations (the others zeros), so each column
// of the result is one group's sum, scaled on its own; the finish adds a
// token's slots. Without slots a g32 step is 32 k (one 4-byte load per row),
// and its fixed cost per step made W4A16 2.2-2.5x slower at g32 than at g128.
//
// Work split: kSplit warps of a CTA share a row block (kTiles x 16 rows) and
// split its K steps; CTAs are persistent and each warp issues the loads of its
// next step (the same or the next row block) before the MMAs of this one.
// Split warps reduce through shared memory in a fixed order (deterministic).
//
// Row runs (kRowRun, one token, 16-bit activations): the walk above makes each
// load instruction read 64 bytes from each of 8 rows, and a pure-load copy of it
// streams well below loads of 512 contiguous bytes of one row, which come near the
// read ceiling (scripts/load_patterns.py, H200: gemma3-27b.gate_up 40.1 against
// 31.3 us, a plain stream 28.8). So for M = 1 the B operand's 8 columns hold 8
// consecutive k chunks of the one token instead of 8 tokens, and A row g (g + 8)
// holds chunk g of one weight row (another row): thread (g, t) owns bytes
// (g * 4 + t) * kChunkBytes of a step's run, i.e. lane * kChunkBytes, so a warp's
// load covers 32 * kChunkBytes contiguous bytes of one row. Only the diagonal of
// the result is wanted: D[g][g] = chunk g of the row times chunk g of x, held by
// thread (g, g / 2) in result column g % 2. The other columns are computed and
// dropped, each step scales the diagonal by its group (one chunk = one group:
// kChunkBytes = group size / 8), and a row's chunks are summed across the warp
// once, when the row block is done. The walk executes 31-40% more instructions
// than the one above (ncu, session 13), and both are latency-bound at 2 CTAs per
// SM, so it wins on long rows only: linear takes it from K >= A16_ROWS_MIN_K.
//
// INT8 activations (ActT = i8, W4A8 with per-token activation scales: x ~= d[m] *
// q[m, k], PerTokenInt8): the same walk with mma.m16n8k32 s8 MMAs. A weight word's
// low nibbles (its even k) and high nibbles (odd k) are the A slots 4t.. and
// 16 + 4t.., and prmt splits the thread's 8 activation bytes of that word the
// same way, so one MMA per word covers 32 k of 16 rows. Nibbles need one AND
// (low) or a shift and an AND (high), against a shift and a LOP3 per pair of
// values for 16-bit activations, and the sums stay exact int32 until the
// group's scale: y += s * (sum q x - z * sum x), with sum x from an all-ones
// MMA; the token's scale d multiplies the finished sum once. A per-token scale
// is what makes this work: with Q8 blocks (a scale per 32 k) every MMA's int32
// result would need its own conversion and scaling per token and block, which
// costs as much as the 16-bit nibble conversion. No group slots (one group per
// step: 32, 64 or 128 k).
//
// Tiled weights (kTiled: an Int4TiledWeight from w4kern.prepare, g128 or
// per-channel, 128 k per step): the same walk and fragments, but each 16-row tile's
// step is one 1 KiB chunk, [ceil(N / 16)][ceil(K / 128)][2][32][16 bytes]: half h,
// lane l holds the 16 bytes that thread l loads for row g + 8h (rows and k past the
// weight are zero bytes). Each load instruction of a warp then reads 512 contiguous
// bytes instead of 64 bytes from each of 8 rows, which the memory system streams
// faster (H200: the a16 and a8 tile walks 3-12% faster on the five dense shapes,
// benchmarks/results/2026-11-23-h200-session17/raw-scales/). Scales and zeros are
// transposed, [n_groups][n_tiles * 16], so a step's 16 rows are one 32-byte run (the
// layout matvec_bulk.cu copies). Not with items, row runs or group slots.
//
// Items (item_experts not null: fused_moe's bf16 decode path): blockIdx.y is an
// item (common/moe_items.cuh): expert item_experts[i]'s weights, the activation
// rows of item i / act_item_div, output rows i * M ...; zeros for an id outside
// [0, E).
#include "common/formats.cuh"
#include "common/int4_pairs.cuh"
#include "common/moe_items.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kA16Threads = 256;
constexpr int kA16Warps = kA16Threads / 32;

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

// Everything one step of one warp reads from global memory, so the next step's
// loads can be in flight during this step's math.
template <int kChunkBytes, int kTiles, int kColScales, int kActBytes, typename ScaleT>
struct A16Step {
    static constexpr int kWords = kChunkBytes / 4;   // weight words per row and thread
    static constexpr int kXWords = kActBytes * kWords * 2;   // 8 activations (of kActBytes) per weight word
    u32 w[kTiles][2][kWords];                        // rows g and g + 8 of each tile
    u32 x[kXWords];                                  // B column g
    // group scale and zero of those rows: one per step, or (group slots) one per
    // result column this thread holds (2t and 2t + 1). Kept as loaded and converted
    // to float in the step's math: a conversion where they are loaded would wait
    // for the load there, a step early.
    ScaleT s[kTiles][2][kColScales], z[kTiles][2][kColScales];
};

template <typename ActT, typename ScaleT, bool kHasZeros, int kChunkBytes, bool kPerChannel, int kTiles,
          int kSplit, int kGroupSlots, bool kRowRun, bool kTiled>
__global__ void __launch_bounds__(kA16Threads, 2) matvec_a16_kernel(
    const u8* __restrict__ qweight,      // [N, K / 2] ([E, N, K / 2] with items)
    const ScaleT* __restrict__ scales,   // [N, n_groups]
    const ScaleT* __restrict__ zeros,    // [N, n_groups] (asymmetric only)
    const ActT* __restrict__ x,          // [M, K]
    const float* __restrict__ x_scales,  // [M] per-token scales of INT8 x (i8 only; else unused)
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 k_dim, i32 m_tokens, i32 n_groups, i32 out_kind,
    const i32* __restrict__ item_experts,   // [items] expert of each item, or null
    i32 n_experts, i32 act_item_div)
{
    static_assert(kA16Warps % kSplit == 0, "a CTA's warps split evenly over its row blocks");
    static_assert(!kPerChannel || kChunkBytes == 16, "per-channel weights take 128 k per step");
    static_assert(kGroupSlots == 1 || ((kGroupSlots == 2 || kGroupSlots == 4) && kChunkBytes == 16 && !kPerChannel),
                  "group slots split a 128-k step of g64 or g32 weights");
    constexpr bool kInt8 = sizeof(ActT) == 1;        // i8: per-token INT8 activations
    static_assert(!kInt8 || kGroupSlots == 1, "INT8 activations take one group per step");
    static_assert(!kRowRun || (!kInt8 && kGroupSlots == 1), "row runs: 16-bit activations, one group per chunk");
    static_assert(!kTiled || (8 * kChunkBytes == kTiledStepK && 64 * kChunkBytes == kTiledChunkBytes && kGroupSlots == 1 &&
                              !kRowRun),
                  "tiled weights: 128-k steps of one group (g128) or of a per-channel row");
    constexpr int kColScales = kGroupSlots > 1 ? 2 : 1;
    using Step = A16Step<kChunkBytes, kTiles, kColScales, static_cast<int>(sizeof(ActT)), ScaleT>;
    constexpr bool kLop3 = kGroupSlots == 1;          // see a16_pair
    constexpr int kWords = Step::kWords;
    // a tile is 16 weight rows, or with row runs 2 (A rows g and g + 8 hold one each)
    constexpr int kBlockRows = (kRowRun ? 2 : 16) * kTiles;
    constexpr int kBlocksPerSet = kA16Warps / kSplit;
    // k per step per row: 4 threads x 2 * kChunkBytes, or with row runs 8 chunks of that
    constexpr int kStepK = (kRowRun ? 64 : 8) * kChunkBytes;
    constexpr int kOutPerThread = kTiles * 4;        // (rows g, g + 8) x (tokens 2t, 2t + 1) per tile

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int part = warp % kSplit;
    const int n_blocks = (n_rows + kBlockRows - 1) / kBlockRows;
    const int n_sets = (n_blocks + kBlocksPerSet - 1) / kBlocksPerSet;
    const int steps = (k_dim + kStepK - 1) / kStepK;               // per row block
    const int my_steps = (steps + kSplit - 1) / kSplit;            // per warp, the same for all
    const i64 row_bytes = k_dim / 2;
    // Weight offsets inside one matrix (one expert's with items) in 32 bits: the
    // host keeps N * K / 2 below 2^32 (linear.py, _check_a16_weight_bytes), and
    // 64-bit products cost issue slots in a loop bound by them.
    const u32 row_bytes32 = static_cast<u32>(row_bytes);
    // tiled weights: 16-row tiles of the layout (its chunks are addressed in 32 bits
    // too: the host keeps the tiled bytes below 2^32)
    const int n_tiles = (n_rows + kTiledRows - 1) / kTiledRows;
    i64 out_base = 0;        // the item's first output element
    bool zero_item = false;  // an item whose expert id is out of range writes zeros
    if (item_experts != nullptr) {
        const MoeItem it = moe_item(item_experts, n_experts, act_item_div, m_tokens, n_rows);
        zero_item = it.dropped;
        out_base = it.out_base;
        it.move_to_expert<kHasZeros>(qweight, scales, zeros, n_rows, row_bytes, n_groups);
        x += it.act_row * k_dim;
        if constexpr (kInt8) x_scales += it.act_row;
    }
    __shared__ float partial[kSplit > 1 ? kA16Warps : 1][kOutPerThread][32];

    auto block_of = [&](int set) { return set * kBlocksPerSet + warp / kSplit; };
    // row r of tile i of row block b, clamped so every load is in bounds (only real rows are stored)
    auto row_of = [&](int b, int i, int r) { return min(b * kBlockRows + i * 16 + r, n_rows - 1); };
    // row runs: half h of tile i is one weight row, also clamped
    auto run_row_of = [&](int b, int i, int h) { return min(b * kBlockRows + 2 * i + h, n_rows - 1); };

    auto load_step = [&](Step& st, int set, int step) {
        const int b = block_of(set);
        if (b >= n_blocks) return;
        const int chunk = step * kSplit + part;
        // this thread's first k: its slot of the row block's step, or (row runs) of chunk g
        const int k0 = chunk * kStepK + (kRowRun ? lane : t) * 2 * kChunkBytes;
        // A step past the end of K (the last warps of a split) contributes nothing;
        // a thread past the end of a step that K ends inside (per-channel K not a
        // multiple of 128) keeps the row's scale, because the MMA result it holds
        // sums the other threads' k too. Such a thread reads its rows' first bytes
        // instead of zeroing its weight registers: the threads with the same t (the
        // same k slots) give zero activations to every B column there, so any finite
        // weights add nothing, and the zeroing would cost issue slots in a loop
        // bound by them.
        const bool step_in_k = chunk < steps;
        const bool mine_in_k = step_in_k && k0 < k_dim;
        const int k_byte = mine_in_k ? k0 / 2 : 0;
#pragma unroll
        for (int i = 0; i < kTiles; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = kRowRun ? run_row_of(b, i, h) : row_of(b, i, g + 8 * h);
                // Row runs skip the load past K instead (whole chunks drop out there, and
                // the registers keep finite weights: the nibble conversion makes any bits
                // a finite value, which meets zero activations)
                if constexpr (kTiled) {
                    // this thread's 16 bytes of the tile's chunk for the step (any chunk of
                    // the tile for a step past K: its activations are zeros); the 256-byte
                    // L2 fetch does not pay on 512-byte runs (session 17, tiled-address/)
                    const u32 tile = static_cast<u32>(min(b * kTiles + i, n_tiles - 1));
                    const u32 at = (tile * static_cast<u32>(steps) + static_cast<u32>(step_in_k ? chunk : 0)) *
                                       static_cast<u32>(kTiledChunkBytes) +
                                   static_cast<u32>(h * 32 + lane) * kChunkBytes;
                    load_streaming<kChunkBytes, false>(st.w[i][h], qweight + at);
                } else if (!kRowRun || mine_in_k) {
                    load_streaming<kChunkBytes, true>(
                        st.w[i][h], qweight + (static_cast<u32>(row) * row_bytes32 + static_cast<u32>(k_byte)));
                }
#pragma unroll
                for (int c = 0; c < kColScales; ++c) {
                    // the step's group, or (slots) that of result column 2t + c; a
                    // column past the last group has zero activations and scale 0
                    const int group = kGroupSlots > 1 ? chunk * kGroupSlots + (2 * t + c) % kGroupSlots
                                      : kPerChannel ? 0
                                      : kRowRun ? chunk * 8 + g   // chunk g of the step
                                                : chunk;
                    // (bits 0: scale 0 and zero 0 in every scale type)
                    st.s[i][h][c] = ScaleT{};
                    st.z[i][h][c] = ScaleT{};
                    if (step_in_k && group < n_groups) {
                        // (tiled weights: the scales transposed, [n_groups][n_tiles * 16])
                        const u32 at = kTiled ? static_cast<u32>(group) * static_cast<u32>(n_tiles * kTiledRows) +
                                                    static_cast<u32>(row)
                                              : static_cast<u32>(row) * static_cast<u32>(n_groups) +
                                                    static_cast<u32>(group);
                        st.s[i][h][c] = scales[at];
                        if constexpr (kHasZeros) st.z[i][h][c] = zeros[at];
                    }
                }
            }
        // B column g: token g / kGroupSlots, given by the threads whose k range is in
        // group slot g % kGroupSlots (without slots: token g, every thread; row runs:
        // chunk g of token 0, every thread)
        const int x_token = kRowRun ? 0 : g / kGroupSlots;
        if (mine_in_k && x_token < m_tokens && t * kGroupSlots / 4 == g % kGroupSlots) {
            const ActT* src = x + static_cast<i64>(x_token) * k_dim + k0;
            if constexpr (Step::kXWords < 4) {
                load_words<4 * Step::kXWords>(st.x, src);   // INT8 x of a 4-byte chunk: 8 bytes
            } else {
#pragma unroll
                for (int j = 0; j < Step::kXWords / 4; ++j) {
                    u32 v[4];
                    load_words<16>(v, reinterpret_cast<const u8*>(src) + 16 * j);
#pragma unroll
                    for (int e = 0; e < 4; ++e) st.x[4 * j + e] = v[e];
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < Step::kXWords; ++j) st.x[j] = 0u;
        }
    };

    float y[kTiles][4];
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) y[i][e] = 0.0f;

    // a step's scale and zero point as float (symmetric weights: the implicit zero)
    auto scale_of = [](const Step& st, int i, int h, int c) { return to_float(st.s[i][h][c]); };
    auto zero_of = [](const Step& st, int i, int h, int c) {
        return kHasZeros ? to_float(st.z[i][h][c]) : static_cast<float>(kInt4SymmetricZero);
    };

    // One step over one weight group (each branch is instantiated only for its
    // activation types).
    // - INT8: one s8 MMA per weight word and tile and one all-ones MMA per word
    //   for sum x, exact int32 sums, then the group's scale and zero in fp32.
    // - 16-bit: kWords x 2 MMAs per tile, one all-ones MMA per pair of k slots
    //   for sum x, then the group's scale and zero in fp32.
    auto compute_step = [&](const Step& st) {
        if constexpr (kInt8) {
            i32 acc[kTiles][4], sum_x[4] = {0, 0, 0, 0};
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][e] = 0;
            const u32 ones[4] = {0x01010101u, 0x01010101u, 0x01010101u, 0x01010101u};
#pragma unroll
            for (int j = 0; j < kWords; ++j) {
                // activations k .. k + 7 of this word split into its even-k and odd-k bytes
                const u32 x_even = byte_perm(st.x[2 * j], st.x[2 * j + 1], 0x6420);
                const u32 x_odd = byte_perm(st.x[2 * j], st.x[2 * j + 1], 0x7531);
#pragma unroll
                for (int i = 0; i < kTiles; ++i) {
                    const u32 lo = st.w[i][0][j], hi = st.w[i][1][j];   // rows g and g + 8
                    const u32 a[4] = {lo & kLowNibbles, hi & kLowNibbles, (lo >> 4) & kLowNibbles,
                                      (hi >> 4) & kLowNibbles};
                    mma_s8_m16n8k32_acc(acc[i], a, x_even, x_odd);
                }
                mma_s8_m16n8k32_acc(sum_x, ones, x_even, x_odd);
            }
            // acc: (row g, tokens 2t, 2t+1), (row g+8, same tokens); sum_x: those
            // two tokens' sums of q in every row
            const float sx[2] = {static_cast<float>(sum_x[0]), static_cast<float>(sum_x[1])};
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        y[i][2 * h + c] += scale_of(st, i, h, 0) *
                                           (static_cast<float>(acc[i][2 * h + c]) - zero_of(st, i, h, 0) * sx[c]);
        } else {
            using Nib = A16Nibbles<ActT>;
            float acc[kTiles][4];
            float sum_x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
            const u32 ones[4] = {Nib::kOnes, Nib::kOnes, Nib::kOnes, Nib::kOnes};
#pragma unroll
            for (int j = 0; j < kWords; ++j) {
                // activations k .. k + 7 of this word, paired as (k, k + 4), (k + 1, k + 5), ...
                const u32* u = st.x + 4 * j;
                const u32 x04 = byte_perm(u[0], u[2], 0x5410), x15 = byte_perm(u[0], u[2], 0x7632);
                const u32 x26 = byte_perm(u[1], u[3], 0x5410), x37 = byte_perm(u[1], u[3], 0x7632);
#pragma unroll
                for (int i = 0; i < kTiles; ++i) {
                    const u32 lo = st.w[i][0][j], hi = st.w[i][1][j];   // rows g and g + 8
                    const u32 a0[4] = {a16_pair<ActT, 0, kLop3>(lo), a16_pair<ActT, 0, kLop3>(hi),
                                       a16_pair<ActT, 4, kLop3>(lo), a16_pair<ActT, 4, kLop3>(hi)};
                    mma_m16n8k16<ActT>(acc[i], a0, x04, x15);
                    const u32 a1[4] = {a16_pair<ActT, 8, kLop3>(lo), a16_pair<ActT, 8, kLop3>(hi),
                                       a16_pair<ActT, 12, kLop3>(lo), a16_pair<ActT, 12, kLop3>(hi)};
                    mma_m16n8k16<ActT>(acc[i], a1, x26, x37);
                }
                mma_m16n8k16<ActT>(sum_x, ones, x04, x15);
                mma_m16n8k16<ActT>(sum_x, ones, x26, x37);
            }
            // acc: (row g, tokens 2t, 2t+1), (row g+8, same tokens); sum_x: the same
            // two tokens' sums in every row
            if constexpr (kRowRun) {
                // the diagonal: column g % 2 of thread (g, g / 2) is chunk g (one group) of
                // the tile's two rows; the other threads scale columns nobody keeps
                const int c = g & 1;
                const float sx = c ? sum_x[1] : sum_x[0];
#pragma unroll
                for (int i = 0; i < kTiles; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float a = c ? acc[i][2 * h + 1] : acc[i][2 * h];
                        y[i][2 * h] += scale_of(st, i, h, 0) * (2.0f * a - (16.0f + zero_of(st, i, h, 0)) * sx);
                    }
                return;
            }
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int cs = kColScales > 1 ? c : 0;
                        const float s = scale_of(st, i, h, cs), zz = 16.0f + zero_of(st, i, h, cs);
                        y[i][2 * h + c] += s * (2.0f * acc[i][2 * h + c] - zz * sum_x[c]);
                    }
                }
        }
    };

    // Row block b is done: sum the split warps' results through shared memory
    // in split order and store. Every warp of the CTA calls this at once.
    auto finish_block = [&](int b) {
        if constexpr (kRowRun) {
            // a row's chunks: thread (g, g / 2) holds chunk g's sum in y[i][2h]; a
            // butterfly over the warp (a fixed order: the same bits every run) leaves
            // the row's sum in every lane
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float v = t == (g >> 1) ? y[i][2 * h] : 0.0f;
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    y[i][2 * h] = v;
                }
        }
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
        if constexpr (kRowRun) {
            // lane 2i + h stores row 2i + h of the block (token 0)
            if (part == 0 && b < n_blocks) {
#pragma unroll
                for (int i = 0; i < kTiles; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int row = b * kBlockRows + 2 * i + h;
                        if (lane == 2 * i + h && row < n_rows) {
                            float v = zero_item ? 0.0f : y[i][2 * h];
                            if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                            store_from_float(out, out_base + row, v, out_kind);
                        }
                    }
            }
        } else if (part == 0 && b < n_blocks) {
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = b * kBlockRows + i * 16 + g + 8 * h;
                    if constexpr (kGroupSlots == 1) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int m = 2 * t + c;
                            if (row < n_rows && m < m_tokens) {
                                float v = zero_item ? 0.0f : y[i][2 * h + c];
                                if constexpr (kInt8) v *= x_scales[m];   // the token's scale, once
                                if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                                store_from_float(out, out_base + static_cast<i64>(m) * n_rows + row, v, out_kind);
                            }
                        }
                    } else {
                        // a token's slots: columns 2t, 2t + 1 here, and with four slots
                        // also those of lane t ^ 1 (the same order in both lanes)
                        float v = y[i][2 * h] + y[i][2 * h + 1];
                        if constexpr (kGroupSlots == 4) {
                            const float other = __shfl_xor_sync(0xffffffffu, v, 1);
                            v = (t & 1) ? other + v : v + other;
                        }
                        const int m = 2 * t / kGroupSlots;
                        if ((kGroupSlots == 2 || (t & 1) == 0) && row < n_rows && m < m_tokens) {
                            v = zero_item ? 0.0f : v;
                            if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                            store_from_float(out, out_base + static_cast<i64>(m) * n_rows + row, v, out_kind);
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
    if constexpr (kRowRun) {   // weights a thread skips past K stay defined (see load_step)
#pragma unroll
        for (int i = 0; i < kTiles; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < kWords; ++j) cur.w[i][h][j] = next.w[i][h][j] = 0u;
    }
    load_step(cur, set, 0);
    while (true) {
        int next_set = set, next_step = step + 1;
        if (next_step == my_steps) { next_set = set + gridDim.x; next_step = 0; }
        const bool more = next_set < n_sets;   // the same for every warp of the CTA
        if (more) load_step(next, next_set, next_step);
        const int b = block_of(set);
        if (b < n_blocks) compute_step(cur);
        if (next_step == 0) finish_block(b);
        if (!more) break;
        set = next_set;
        step = next_step;
        cur = next;
    }
}

}  // namespace w4kern
