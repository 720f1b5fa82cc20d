// gemm_small_m: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4
// weights (Int4Weight, plain layout) and up to 8 tokens, on tensor cores.
//
// Weight-stationary: every weight byte is read once per call and applied to
// all M <= 8 tokens, so the time is flat in M. The weights are the 16-row A
// operand of mma.sync and the tokens the 8-column B operand (columns >= M are
// zero), which keeps int8 / bf16 tensor-core math far below the DRAM time at
// any M <= 8, where dp4a would run out of issue slots around M = 3-4.
//
// Activations:
//   Q8Block  (W4A8): m16n8k32 s8 MMA, one Q8 block (32 k) per MMA; the int32
//            result is scaled by the block's d per token, and the block's sum
//            carries the zero-point term.
//   bf16/f16 (W4A16): m16n8k16 MMA with fp32 accumulation; nibbles become
//            (q - 8) exactly in 16-bit floats (magic-number trick), so the
//            only rounding is the fp32 accumulation. Asymmetric weights use q
//            and a second MMA with an all-ones A gives sum(x) for the z term.
// The group scale s (and zero z) is applied in fp32 once per group:
//   acc += s * (sum_group(q~ * x) - z * sum_group(x))
//
// Tiling: a CTA owns 64 rows (4 warps x 16 rows) and a range of K stages of
// 256 k (8 chunks of 32 k); a 4-stage cp.async pipeline brings each stage's
// weights, activations and scale windows into shared memory. Each thread's
// copy addresses are computed once and advanced by a constant per stage, so
// the pipeline costs a few instructions per 16 bytes. Weights are
// stored 128 bytes per row with the 16-byte chunks XOR-swizzled by row, so
// ldmatrix reads them conflict-free and hands thread (g, t) exactly word t of
// a chunk for rows g and g + 8: the A-fragment layout of both MMA shapes.
// Small-N shapes split K over gridDim.y CTAs; their fp32 partials go to a
// workspace and the last CTA of a row tile (atomic ticket) sums them in split
// order, so the result is deterministic, then resets the ticket.
#include "common/formats.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kSmallMThreads = 128;
constexpr int kSmallMWarps = 4;
constexpr int kSmallMTileRows = 16 * kSmallMWarps;     // 64 rows per CTA
constexpr int kSmallMMaxTokens = 8;                    // the MMA's N
constexpr int kChunkK = 32;                            // k per chunk (one Q8 block, 16 weight bytes)
constexpr int kStageChunks = 8;                        // 256 k per pipeline stage
constexpr int kSmallMStages = 4;
constexpr int kWeightRowBytes = kStageChunks * 16;     // 128 bytes of a row per stage
constexpr int kWeightStageBytes = kSmallMTileRows * kWeightRowBytes;
constexpr int kWeightLinesPerThread = kWeightStageBytes / 16 / kSmallMThreads;   // 4
constexpr int kMaxWindowPieces = 8;                    // 4-byte pieces of a row's scales per stage
constexpr int kWindowSlotsPerThread = kSmallMTileRows * kMaxWindowPieces / kSmallMThreads;   // 4
constexpr int kNoGroups = 31;                          // group_shift of per-channel weights

// Shared-memory layout of one stage's activations, per activation type.
template <typename ActT> struct SmallMAct;

template <> struct SmallMAct<Q8Block> {
    static constexpr bool kIsQ8 = true;
    // 8 blocks of 48 bytes per token, padded so the 8 tokens' words fall in distinct banks
    static constexpr int kTokenStride = kStageChunks * 48 + 16;
    static constexpr int kLinesPerToken = kStageChunks * 3;
    static constexpr int kSourceStageBytes = kStageChunks * 48;   // a token's blocks of one stage
};
template <> struct SmallMAct<bf16_t> {
    static constexpr bool kIsQ8 = false;
    // 256 values of 2 bytes per token, padded by 64 bytes: two tokens' 16-byte
    // reads in one quarter-warp land in different banks
    static constexpr int kTokenStride = kStageChunks * kChunkK * 2 + 64;
    static constexpr int kLinesPerToken = kStageChunks * kChunkK * 2 / 16;
    static constexpr int kSourceStageBytes = kStageChunks * kChunkK * 2;
};
template <> struct SmallMAct<f16_t> : SmallMAct<bf16_t> {};

template <typename ActT>
struct SmallMLayout {
    static constexpr int kActOffset = kWeightStageBytes;
    static constexpr int kActStageBytes = kSmallMMaxTokens * SmallMAct<ActT>::kTokenStride;
    static constexpr int kActLines = kSmallMMaxTokens * SmallMAct<ActT>::kLinesPerToken;
    static constexpr int kActLinesPerThread = (kActLines + kSmallMThreads - 1) / kSmallMThreads;
    static constexpr int kWindowOffset = kActOffset + kActStageBytes;
    // A stage is kWindowOffset bytes plus 64 scale windows (and 64 zero windows) of
    // window_bytes each; w4kern/linear.py computes the same stage size.
};

// 16-bit float constants for the W4A16 nibble conversion: 0x4300 is bf16 128.0
// and 0x6400 fp16 1024.0; OR-ing q in [0, 15] into the mantissa gives 128 + q
// (1024 + q) exactly, and one packed FMA subtracts 128 + z0 (1024 + z0).
template <typename T> struct NibbleMagic;
template <> struct NibbleMagic<bf16_t> {
    static constexpr u32 kBase = 0x43004300u;   // (128, 128)
    static constexpr u32 kMinusBase = 0xC300C300u;
    static constexpr u32 kMinusBaseAnd8 = 0xC308C308u;   // -136
    static constexpr u32 kOne = 0x3F803F80u;
};
template <> struct NibbleMagic<f16_t> {
    static constexpr u32 kBase = 0x64006400u;   // (1024, 1024)
    static constexpr u32 kMinusBase = 0xE400E400u;
    static constexpr u32 kMinusBaseAnd8 = 0xE408E408u;   // -1032
    static constexpr u32 kOne = 0x3C003C00u;
};

__device__ __forceinline__ u32 lop_and_or(u32 a, u32 mask, u32 bits) { return (a & mask) | bits; }

// Each thread's share of one stage's copies, computed once: global sources
// advance by a fixed number of bytes per stage, shared destinations are fixed.
template <typename ActT>
struct SmallMLoader {
    using Layout = SmallMLayout<ActT>;
    static constexpr bool kQ8 = SmallMAct<ActT>::kIsQ8;

    const u8* w_src[kWeightLinesPerThread];
    u32 w_dst[kWeightLinesPerThread];
    i32 w_chunk[kWeightLinesPerThread];     // chunk index within a stage; -1: row outside N
    const u8* a_src[Layout::kActLinesPerThread];
    u32 a_dst[Layout::kActLinesPerThread];
    i32 a_kpos[Layout::kActLinesPerThread]; // chunk (Q8) or k (16-bit) within a stage; -1: no token
    i64 win_src[kWindowSlotsPerThread];     // byte offset of the piece at stage 0; -1: unused slot
    u32 win_dst[kWindowSlotsPerThread];
    i64 win_stage_bytes;                    // scale bytes per row per stage
    i64 scale_total_bytes;
    i32 window_bytes;

    __device__ __forceinline__ void init(const u8* qweight, const u8* act, i32 n_rows, i32 k, i32 m_tokens,
                                         i32 n_groups, i32 group_shift, i32 scale_size, i32 window_pieces,
                                         i32 row0) {
        const int tid = threadIdx.x;
        const i64 row_bytes = k / 2;
#pragma unroll
        for (int i = 0; i < kWeightLinesPerThread; ++i) {
            const int line = i * kSmallMThreads + tid;
            const int r = line / kStageChunks, c = line % kStageChunks;
            const int row = row0 + r;
            w_src[i] = qweight + (row < n_rows ? row : 0) * row_bytes + c * 16;
            w_chunk[i] = row < n_rows ? c : -1;
            w_dst[i] = (r / 16) * (16 * kWeightRowBytes) + (r % 16) * kWeightRowBytes + ((c ^ (r & 7)) << 4);
        }
#pragma unroll
        for (int i = 0; i < Layout::kActLinesPerThread; ++i) {
            const int line = i * kSmallMThreads + tid;
            const int m = line / SmallMAct<ActT>::kLinesPerToken;
            const int rem = line % SmallMAct<ActT>::kLinesPerToken;
            const bool token = line < Layout::kActLines && m < m_tokens;
            if constexpr (kQ8) {
                const int blk = rem / 3, part = rem % 3;
                a_src[i] = act + (static_cast<i64>(token ? m : 0) * (k / kChunkK) + blk) * 48 + part * 16;
                a_kpos[i] = token ? blk : -1;
                a_dst[i] = Layout::kActOffset + m * SmallMAct<ActT>::kTokenStride + blk * 48 + part * 16;
            } else {
                a_src[i] = act + (static_cast<i64>(token ? m : 0) * k + rem * 8) * 2;
                a_kpos[i] = token ? rem * 8 : -1;
                a_dst[i] = Layout::kActOffset + m * SmallMAct<ActT>::kTokenStride + rem * 16;
            }
            if (line >= Layout::kActLines) a_dst[i] = 0xFFFFFFFFu;   // no such line
        }
        window_bytes = 4 * window_pieces;
        const int groups_per_stage = group_shift == kNoGroups ? 0 : kStageChunks >> group_shift;
        win_stage_bytes = static_cast<i64>(groups_per_stage) * scale_size;
        scale_total_bytes = static_cast<i64>(n_rows) * n_groups * scale_size;
#pragma unroll
        for (int i = 0; i < kWindowSlotsPerThread; ++i) {
            const int slot = i * kSmallMThreads + tid;
            win_src[i] = -1;
            win_dst[i] = 0;
            if (window_pieces == 0 || slot >= kSmallMTileRows * window_pieces) continue;
            const int r = slot / window_pieces, piece = slot % window_pieces;
            const int row = row0 + r;
            if (row >= n_rows) continue;
            // The pieces cover [start & ~3, start + bytes): a 2-byte scale row that
            // starts at an odd element still loads with aligned 4-byte copies.
            const i64 start = static_cast<i64>(row) * n_groups * scale_size;
            if (4 * piece >= static_cast<int>(start & 3) + win_stage_bytes) continue;
            win_src[i] = (start & ~static_cast<i64>(3)) + 4 * piece;
            win_dst[i] = Layout::kWindowOffset + r * window_bytes + 4 * piece;
        }
    }

    template <typename ScaleT>
    __device__ __forceinline__ void load(u32 base, int stage, i32 n_chunks, i32 k, const ScaleT* scales,
                                         const ScaleT* zeros, bool has_zeros) const {
        const int chunk0 = stage * kStageChunks;
#pragma unroll
        for (int i = 0; i < kWeightLinesPerThread; ++i) {
            const bool ok = w_chunk[i] >= 0 && chunk0 + w_chunk[i] < n_chunks;
            cp_async16(base + w_dst[i], ok ? w_src[i] + chunk0 * 16 : w_src[i], ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < Layout::kActLinesPerThread; ++i) {
            if (a_dst[i] == 0xFFFFFFFFu) continue;
            const bool ok = a_kpos[i] >= 0 &&
                            (kQ8 ? chunk0 + a_kpos[i] < n_chunks : chunk0 * kChunkK + a_kpos[i] < k);
            const u8* src = a_src[i] + static_cast<i64>(stage) * SmallMAct<ActT>::kSourceStageBytes;
            cp_async16(base + a_dst[i], ok ? src : a_src[i], ok ? 16 : 0);
        }
        const i64 stage_offset = stage * win_stage_bytes;
#pragma unroll
        for (int i = 0; i < kWindowSlotsPerThread; ++i) {
            if (win_src[i] < 0) continue;
            const i64 src = win_src[i] + stage_offset;
            if (src >= scale_total_bytes) continue;   // groups past K in the last stage: never read
            const u32 valid = scale_total_bytes - src < 4 ? static_cast<u32>(scale_total_bytes - src) : 4u;
            cp_async4(base + win_dst[i], reinterpret_cast<const u8*>(scales) + src, valid);
            if (has_zeros)
                cp_async4(base + win_dst[i] + kSmallMTileRows * window_bytes,
                          reinterpret_cast<const u8*>(zeros) + src, valid);
        }
    }
};

template <typename ActT, typename ScaleT, bool kHasZeros, int kGroupShift>
__global__ void __launch_bounds__(kSmallMThreads, 3) gemm_small_m_kernel(
    const u8* __restrict__ qweight,     // [N, K/2]
    const ScaleT* __restrict__ scales,  // [N, n_groups]
    const ScaleT* __restrict__ zeros,   // [N, n_groups] or unused
    const u8* __restrict__ act,         // Q8 blocks [M, K/32, 48] or 16-bit x [M, K]
    const void* __restrict__ bias,      // [N] of the output type, or null
    void* __restrict__ out,             // [M, N]
    float* __restrict__ workspace,      // [splits, n_tiles, 8, 64] when gridDim.y > 1
    u32* __restrict__ tickets,          // [n_tiles], zero between launches
    i32 n_rows, i32 k, i32 m_tokens, i32 n_groups,
    i32 window_pieces,                  // 4-byte pieces of a row's scales per stage (0: per-channel)
    i32 stage_bytes,                    // shared bytes per pipeline stage (see SmallMLayout)
    i32 stages_per_split, i32 out_kind)
{
    using Layout = SmallMLayout<ActT>;
    constexpr bool kQ8 = SmallMAct<ActT>::kIsQ8;
    constexpr int kTokenStride = SmallMAct<ActT>::kTokenStride;
    extern __shared__ __align__(16) u8 smem[];

    u32 dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    const int window_bytes = 4 * window_pieces;
    if (dynamic_smem < static_cast<u32>(kSmallMStages * stage_bytes) ||
        stage_bytes < Layout::kWindowOffset + kSmallMTileRows * window_bytes * (kHasZeros ? 2 : 1))
        __trap();   // host and kernel disagree on the layout

    // log2(chunks per group), kNoGroups for per-channel: a template parameter, so
    // the group ends inside a stage are known and the chunk loop has no branches
    constexpr int group_shift = kGroupShift;
    constexpr u32 group_mask = (1u << kGroupShift) - 1u;
    const int row0 = blockIdx.x * kSmallMTileRows;
    const int n_chunks = k / kChunkK;
    const u32 smem_base = smem_address(smem);
    SmallMLoader<ActT> loader;
    loader.init(qweight, act, n_rows, k, m_tokens, n_groups, group_shift, sizeof(ScaleT), window_pieces, row0);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;          // MMA group id and thread-in-group
    const int n_stages = (n_chunks + kStageChunks - 1) / kStageChunks;
    const int s_begin = blockIdx.y * stages_per_split;
    const int s_end = min(s_begin + stages_per_split, n_stages);
    const int n_local = s_end - s_begin;

    // The (local row, token) of each of this thread's 4 accumulators. W4A16 uses
    // the weights as the MMA's 16-row A operand: rows g and g + 8, tokens 2t and
    // 2t + 1. W4A8 uses them as the 8-column B operand of two MMAs (rows 0-7 and
    // 8-15), with the tokens as A's rows: rows 2t, 2t + 1, 8 + 2t, 9 + 2t, token g.
    // That costs one nibble split per 8 rows per chunk, and a single per-token
    // block scale d per thread per chunk.
    int acc_row[4], acc_token[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc_row[i] = warp * 16 + (kQ8 ? (i >> 1) * 8 + 2 * t + (i & 1) : (i >> 1) * 8 + g);
        acc_token[i] = kQ8 ? g : 2 * t + (i & 1);
    }
    // rows clamped for scale reads, and where their scales start inside a stage's window
    int row[4], window_start[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        row[i] = min(row0 + acc_row[i], n_rows - 1);
        window_start[i] = Layout::kWindowOffset + acc_row[i] * window_bytes +
                          static_cast<int>((static_cast<i64>(row[i]) * n_groups * sizeof(ScaleT)) & 3);
    }

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};    // by (acc_row, acc_token)
    float gacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // this group's sum of q~ * x (Q8: d-scaled)
    float gx[4] = {0.0f, 0.0f, 0.0f, 0.0f};     // this group's sum of x for acc_token (Q8: gx[0] only)

    // z: the zero point in q units, implicit 8 (symmetric) or the zeros array;
    // the 16-bit symmetric path already subtracted 8 inside the MMA operand
    constexpr float kImplicitZero = kQ8 ? static_cast<float>(kInt4SymmetricZero) : 0.0f;
    auto fold = [&](const float (&s)[4], const float (&z)[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float x_sum = kQ8 ? gx[0] : gx[i];
            acc[i] += s[i] * (gacc[i] - z[i] * x_sum);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) { gacc[i] = 0.0f; gx[i] = 0.0f; }
    };

    auto fold_stage_group = [&](u32 stage_base, int c) {
        const u32 offset = (c >> group_shift) * static_cast<u32>(sizeof(ScaleT));
        float s[4], z[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[i] = lds_scale<ScaleT>(stage_base + window_start[i] + offset);
            z[i] = kHasZeros ? lds_scale<ScaleT>(stage_base + window_start[i] + kSmallMTileRows * window_bytes + offset)
                             : kImplicitZero;
        }
        fold(s, z);
    };

    auto mma_chunk = [&](u32 abase, int c, u32 w_lo_row, u32 w_hi_row) {
        // w_lo_row: word t of this chunk for row g; w_hi_row: for row g + 8
        if constexpr (kQ8) {
            // A: token g's Q8 block (even-k word t in slots 4t.., odd-k word t in 16 + 4t..);
            // rows 8-15 of A are padding (zero). B: word t of weight row g of each 8-row half.
            const u32 tok = abase + g * kTokenStride + c * 48;
            const u32 a[4] = {lds_u32(tok + 4 * t), 0u, lds_u32(tok + 16 + 4 * t), 0u};
            i32 dot_lo[4], dot_hi[4];   // [0], [1]: token g x rows 2t, 2t + 1 of each half
            mma_s8_m16n8k32(dot_lo, a, w_lo_row & kLowNibbles, (w_lo_row >> 4) & kLowNibbles);
            mma_s8_m16n8k32(dot_hi, a, w_hi_row & kLowNibbles, (w_hi_row >> 4) & kLowNibbles);
            const float2 ds = lds_f32x2(tok + 32);   // token g's d and sum
            gacc[0] += ds.x * static_cast<float>(dot_lo[0]);
            gacc[1] += ds.x * static_cast<float>(dot_lo[1]);
            gacc[2] += ds.x * static_cast<float>(dot_hi[0]);
            gacc[3] += ds.x * static_cast<float>(dot_hi[1]);
            gx[0] += ds.y;
        } else {
            using M = NibbleMagic<ActT>;
            constexpr u32 kShift = kHasZeros ? M::kMinusBase : M::kMinusBaseAnd8;
            const uint4 xv = lds_u32x4(abase + g * kTokenStride + c * 64 + 16 * t);
            // x[8t + 0..7] of token g, regrouped to the nibble order below
            const u32 x02 = byte_perm(xv.x, xv.y, 0x5410), x46 = byte_perm(xv.z, xv.w, 0x5410);
            const u32 x13 = byte_perm(xv.x, xv.y, 0x7632), x57 = byte_perm(xv.z, xv.w, 0x7632);
            u32 lo01[2], lo23[2], hi01[2], hi23[2];   // [row g, row g + 8]
            const u32 words[2] = {w_lo_row, w_hi_row};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 b01 = byte_perm(words[h], 0, 0x4140);   // bytes 0, 1 -> halves 0, 1
                const u32 b23 = byte_perm(words[h], 0, 0x4342);   // bytes 2, 3
                lo01[h] = fma2<ActT>(lop_and_or(b01, 0x000F000Fu, M::kBase), M::kOne, kShift);        // q0, q2
                lo23[h] = fma2<ActT>(lop_and_or(b23, 0x000F000Fu, M::kBase), M::kOne, kShift);        // q4, q6
                hi01[h] = fma2<ActT>(lop_and_or(b01 >> 4, 0x000F000Fu, M::kBase), M::kOne, kShift);   // q1, q3
                hi23[h] = fma2<ActT>(lop_and_or(b23 >> 4, 0x000F000Fu, M::kBase), M::kOne, kShift);   // q5, q7
            }
            const u32 a_even[4] = {lo01[0], lo01[1], lo23[0], lo23[1]};
            const u32 a_odd[4] = {hi01[0], hi01[1], hi23[0], hi23[1]};
            mma_m16n8k16<ActT>(gacc, a_even, x02, x46);
            mma_m16n8k16<ActT>(gacc, a_odd, x13, x57);
            if constexpr (kHasZeros) {
                const u32 ones[4] = {M::kOne, M::kOne, M::kOne, M::kOne};
                mma_m16n8k16<ActT>(gx, ones, x02, x46);
                mma_m16n8k16<ActT>(gx, ones, x13, x57);
            }
        }
    };

    auto load_stage = [&](int buffer, int stage) {
        loader.load(smem_base + buffer * stage_bytes, stage, n_chunks, k, scales, zeros, kHasZeros);
    };

    const int ld_row = (lane & 7) + ((lane >> 3) & 1) * 8;   // ldmatrix: the row this lane addresses
    const int ld_chunk = lane >> 4;                          // and which chunk of the pair
    auto compute_stage = [&](u32 base, int stage, bool full) {   // inlined twice, full folded
        const u32 wbase = base + warp * 16 * kWeightRowBytes + ld_row * kWeightRowBytes;
        const u32 abase = base + Layout::kActOffset;
#pragma unroll
        for (int pair = 0; pair < kStageChunks / 2; ++pair) {
            const int c = 2 * pair;
            if (!full && stage * kStageChunks + c >= n_chunks) break;
            u32 w[4];
            ldmatrix_x4(w, wbase + (((c + ld_chunk) ^ (ld_row & 7)) << 4));
            mma_chunk(abase, c, w[0], w[1]);
            if (((c + 1) & group_mask) == 0) fold_stage_group(base, c);
            if (full || stage * kStageChunks + c + 1 < n_chunks) {
                mma_chunk(abase, c + 1, w[2], w[3]);
                if (((c + 2) & group_mask) == 0) fold_stage_group(base, c + 1);
            }
        }
    };

    // pipeline prologue
#pragma unroll
    for (int i = 0; i < kSmallMStages - 1; ++i) {
        if (i < n_local) load_stage(i, s_begin + i);
        cp_async_commit();
    }
    for (int i = 0; i < n_local; ++i) {
        cp_async_wait<kSmallMStages - 2>();
        __syncthreads();
        if (i + kSmallMStages - 1 < n_local)
            load_stage((i + kSmallMStages - 1) % kSmallMStages, s_begin + i + kSmallMStages - 1);
        cp_async_commit();

        const int stage = s_begin + i;
        const u32 base = smem_base + (i % kSmallMStages) * stage_bytes;
        // a full stage runs straight-line (no per-chunk guards, so the compiler can
        // overlap one chunk's shared loads with the previous chunk's math); only
        // the last stage of K may be partial
        if (stage * kStageChunks + kStageChunks <= n_chunks)
            compute_stage(base, stage, true);
        else
            compute_stage(base, stage, false);
    }
    cp_async_wait<0>();
    if constexpr (kGroupShift == kNoGroups) {   // per-channel: one scale per row, applied once
        float s[4], z[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[i] = to_float(scales[row[i]]);
            z[i] = kHasZeros ? to_float(zeros[row[i]]) : kImplicitZero;
        }
        fold(s, z);
    }

    // epilogue
    const int n_tiles = gridDim.x;
    if (gridDim.y == 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + acc_row[i], m = acc_token[i];
            if (r < n_rows && m < m_tokens) {
                float v = acc[i];
                if (bias != nullptr) v += load_as_float(bias, r, out_kind);
                store_from_float(out, static_cast<i64>(m) * n_rows + r, v, out_kind);
            }
        }
        return;
    }
    float* mine = workspace + (static_cast<i64>(blockIdx.y) * n_tiles + blockIdx.x) * kSmallMMaxTokens * kSmallMTileRows;
#pragma unroll
    for (int i = 0; i < 4; ++i) mine[acc_token[i] * kSmallMTileRows + acc_row[i]] = acc[i];
    __threadfence();
    __syncthreads();
    __shared__ u32 is_last;
    if (threadIdx.x == 0) is_last = atomicAdd(&tickets[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int e = threadIdx.x; e < kSmallMMaxTokens * kSmallMTileRows; e += kSmallMThreads) {
        const int m = e / kSmallMTileRows, r = row0 + e % kSmallMTileRows;
        if (m >= m_tokens || r >= n_rows) continue;
        float v = 0.0f;
        for (int sp = 0; sp < static_cast<int>(gridDim.y); ++sp)   // fixed order: deterministic
            v += __ldcg(workspace + (static_cast<i64>(sp) * n_tiles + blockIdx.x) * kSmallMMaxTokens * kSmallMTileRows + e);
        if (bias != nullptr) v += load_as_float(bias, r, out_kind);
        store_from_float(out, static_cast<i64>(m) * n_rows + r, v, out_kind);
    }
    if (threadIdx.x == 0) tickets[blockIdx.x] = 0;   // every split has arrived: ready for the next launch
}

}  // namespace w4kern
