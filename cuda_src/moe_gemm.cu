// moe_gemm: fused_moe's batched expert GEMMs (w4kern/moe.py, the batched path)
// over the blocks of moe_align_block_size: bf16/fp16 activations (A16), INT4
// expert weights (stacked Int4Weight [E, N, K / 2]) dequantized in registers,
// mma.sync m16n8k16 with fp32 accumulation.
//
// A CTA computes one (aligned block, column tile) pair: the block's BM = 16 *
// kMTiles rows are flat (token, slot) items i (moe_align's sorted_token_ids,
// sentinel >= n_items in the padding), all routed to the block's expert; row r
// of the A tile is activation row i / act_div (GEMM1: the token's x row,
// act_div = k; GEMM2: the item's own intermediate row, act_div = 1).
//
// A tile of kMoeBN = 128 weight rows has a low half (tile columns 0..63) and a
// high half (64..127): for GEMM1 (kSiluGateUp) the gate rows n0 .. n0 + 63 and
// the matching up rows I + n0 .. I + n0 + 63, so that every thread holds the
// gate and up accumulators of the same outputs and the epilogue writes
// silu(g) * u straight away (as ActT, GEMM2's A operand); for GEMM2 simply 128
// consecutive rows, written as fp32 per item (the combine kernel of
// moe_decode.cu sums an item's k rows in slot order: deterministic).
//
// Warp w (of 4) owns tile columns 16w .. 16w + 15 of both halves (4 n8 MMA
// tiles) and all BM rows. Each K tile (kMoeBK = 64) goes through a kMoeStages
// cp.async ring in shared memory: the A rows (gathered; padding rows are
// zero-filled) and the raw nibbles of the weight rows. A thread's B fragment
// of an n8 tile and k16 step needs weights k = 2t, 2t + 1, 2t + 8, 2t + 9 of
// weight row g (t = lane % 4, g = lane / 4): bytes t and 4 + t of the row's 8
// bytes for that step, i.e. byte t of two consecutive words, so a thread reads
// its row's 32 bytes as two 16-byte loads. Dequantizing takes no int-to-float
// conversion (a quarter-rate instruction): a rotate and a LOP3 put a nibble q
// into mantissa bits 19..22 under the exponent of 1.0, giving m = 1 + q / 16
// exactly, and w = (q - z) s = m * 16 s - (16 + z) s is one fp32 FMA (exact up
// to the final rounding to ActT, bar 2^-19 s from rounding (16 + z) s). Scales
// and zeros of the next K tile are loaded into registers while this one computes.
#include "common/formats.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kMoeGemmThreads = 128;
constexpr int kMoeGemmWarps = kMoeGemmThreads / 32;
constexpr int kMoeBN = 128;                  // weight rows per tile (two halves of 64)
constexpr int kMoeHalf = kMoeBN / 2;
constexpr int kMoeBK = 64;                   // k per K tile
constexpr int kMoeStages = 3;
constexpr int kMoeARowBytes = kMoeBK * 2 + 16;   // padded: 8 ldmatrix rows hit distinct banks
constexpr int kMoeBRowBytes = kMoeBK / 2;        // 32 bytes of nibbles (see moe_b_offset)
constexpr int kMoeNTiles = 4;                // n8 MMA tiles per warp: 2 low, 2 high
constexpr u32 kMoeNibbleBits = 0x00780000u;  // mantissa bits 19..22
constexpr u32 kMoeOne = 0x3F800000u;         // 1.0f

template <int kMTiles>
struct MoeGemmLayout {
    static constexpr int kRows = 16 * kMTiles;                      // BM: the alignment block size
    static constexpr int kABytes = kRows * kMoeARowBytes;
    static constexpr int kBBytes = kMoeBN * kMoeBRowBytes;
    static constexpr int kStageBytes = kABytes + kBBytes;
    static constexpr int kSmemBytes = kMoeStages * kStageBytes + kRows * 4;   // + the block's item ids
};

// The (aligned block, column tile) a CTA of either expert GEMM works on: the
// block's expert, and the columns of the tile's low and high halves: for GEMM1 (kSiluGateUp) gate rows lo_base .. + 63 and the matching
// up rows hi_base = I + lo_base ..; for GEMM2 128 consecutive rows. valid is false
// past the used blocks and for a block without an expert.
template <bool kSiluGateUp>
struct MoeTile {
    bool valid;
    int expert;
    int out_cols;            // columns of the output rows (I for GEMM1, N for GEMM2)
    int lo_base, hi_base;    // first weight row of each half
    int lo_end;              // where the low half's rows end
    // weight row of tile column c, clamped in bounds (only real columns are stored)
    __device__ __forceinline__ int weight_row(int c, int n_rows) const {
        return c < kMoeHalf ? min(lo_base + c, lo_end - 1) : min(hi_base + c - kMoeHalf, n_rows - 1);
    }
};

template <bool kSiluGateUp>
__device__ __forceinline__ MoeTile<kSiluGateUp> moe_tile(int block, int col, int block_rows, const i32* expert_ids,
                                                         const i32* num_post_padded, int n_rows, int n_experts) {
    MoeTile<kSiluGateUp> tile;
    tile.valid = block * block_rows < num_post_padded[0];   // past the used blocks: nothing to do
    tile.expert = tile.valid ? expert_ids[block] : -1;
    tile.valid = tile.valid && tile.expert >= 0 && tile.expert < n_experts;   // (moe_align writes none here)
    tile.out_cols = kSiluGateUp ? n_rows / 2 : n_rows;
    tile.lo_base = col * (kSiluGateUp ? kMoeHalf : kMoeBN);
    tile.hi_base = kSiluGateUp ? n_rows / 2 + tile.lo_base : tile.lo_base + kMoeHalf;
    tile.lo_end = kSiluGateUp ? n_rows / 2 : n_rows;
    return tile;
}

// Where half h (16 bytes) of weight row r of a K tile sits in shared memory. Rows
// are 32 bytes, unpadded, and a row's halves swap places when bit 2 of r is set:
// the A8 B-fragment reads (rows g = 0..7 of an n8 tile, bytes 4t of the same
// half) then hit 32 distinct banks, and the loads (the two threads of a pair
// copy the two halves of one row, so a warp's request is 16 whole 32-byte
// sectors, where one thread per row made each sector travel twice) write 512
// contiguous bytes.
__device__ __forceinline__ u32 moe_b_offset(int row, int half) {
    return row * kMoeBRowBytes + ((half ^ ((row >> 2) & 1)) << 4);
}

// Copies this thread's two weight-row halves of K tile kt: tile rows tid / 2 and
// tid / 2 + 64, half tid % 2 (src[r]: the weight row's first byte).
__device__ __forceinline__ void moe_load_weight_tile(u32 b_dst, const u8* const (&src)[2], int kt, i64 row_bytes,
                                                     int tid) {
    const int half = tid & 1;
    const i64 byte = static_cast<i64>(kt) * kMoeBRowBytes + 16 * half;
    const bool in = byte < row_bytes;   // K is a multiple of 32: whole halves
#pragma unroll
    for (int r = 0; r < 2; ++r)
        cp_async16(b_dst + moe_b_offset((tid >> 1) + 64 * r, half), src[r] + (in ? byte : 0), in ? 16 : 0);
}

// 16 * scale and -(16 + zero) * scale of a thread's weight rows for the two 32-k
// halves of a K tile (the two constants of w = m * 16 s - (16 + z) s).
// Column tiles of an expert GEMM: GEMM1 tiles the I = N / 2 outputs by half a tile
// (the gate and up rows of the same columns), GEMM2 the N outputs by a whole one.
template <bool kSiluGateUp>
__device__ __forceinline__ int moe_col_tiles(int n_rows) {
    return kSiluGateUp ? (n_rows / 2 + kMoeHalf - 1) / kMoeHalf : (n_rows + kMoeBN - 1) / kMoeBN;
}

// Which (block, column tile) pairs a CTA computes. Not kPersistent: the grid is
// (column tiles, max blocks), one pair per CTA (CTAs past the used blocks return at
// once). kPersistent: a 1-D grid of resident CTAs walks pairs blockIdx.x, +
// gridDim.x, ... of the used blocks only, numbered in groups of group_m blocks:
// within a group the column tile changes slowest, so the group's blocks
// (consecutive blocks share an expert) take one weight tile one after another
// while it is in L2 (Triton's GROUP_SIZE_M order). A template parameter, not a
// runtime switch: the loop costs the four-tile A8 instances 20+ registers and
// spills, so the persistent kernels are instances (and families) of their own.
template <bool kSiluGateUp, bool kPersistent, typename RunTile>
__device__ __forceinline__ void moe_walk_tiles(int group_m, int block_rows, int n_rows, const i32* num_post_padded,
                                               RunTile&& run_tile) {
    if constexpr (!kPersistent) {
        run_tile(static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x));
        return;
    }
    const int cols = moe_col_tiles<kSiluGateUp>(n_rows);
    const int used = (num_post_padded[0] + block_rows - 1) / block_rows;
    const int per_group = group_m * cols;
    for (int id = blockIdx.x; id < used * cols; id += gridDim.x) {
        const int first = id / per_group * group_m;
        const int size = min(used - first, group_m);
        const int r = id % per_group;
        run_tile(first + r % size, r / size);
        cp_async_wait<0>();
        __syncthreads();   // the next pair reuses the shared memory
    }
}

struct MoeGroupScales {
    float s16[kMoeNTiles][2], offset[kMoeNTiles][2];
};

// One (block, column tile) pair of the A16 GEMM; moe_gemm_a16_kernel (below) walks
// them. Its launch bounds: 4 CTAs per SM at one m16 tile (ptxas, left alone,
// capped these at 96 registers and spilled); none at four (ptxas picks 166
// registers, 3 CTAs). (Two m16 tiles, 32-row blocks, ran slower than four:
// w4kern.moe.moe_block_size.)
template <typename ActT, typename ScaleT, bool kHasZeros, int kMTiles, bool kSiluGateUp>
__device__ __forceinline__ void moe_gemm_a16_tile(
    int block, int col,
    const ActT* __restrict__ act,              // [rows, K]
    const u8* __restrict__ qweight,            // [E, N, K / 2]
    const ScaleT* __restrict__ scales,         // [E, N, n_groups]
    const ScaleT* __restrict__ zeros,          // [E, N, n_groups] (asymmetric only)
    const i32* __restrict__ sorted_ids,        // [max_blocks * BM]
    const i32* __restrict__ expert_ids,        // [max_blocks], -1 for unused blocks
    const i32* __restrict__ num_post_padded,   // [1]
    void* __restrict__ out,                    // GEMM1: ActT [n_items, N / 2]; GEMM2: float [n_items, N]
    i32 n_rows,                                // N (weight rows per expert)
    i32 k_dim, i32 n_groups,
    i32 group_shift,                           // log2(group size); 31 for one group per row
    i32 n_items, i32 act_div, i32 n_experts)
{
    using Layout = MoeGemmLayout<kMTiles>;
    constexpr int kBM = Layout::kRows;
    extern __shared__ __align__(16) u8 smem[];
    i32* block_items = reinterpret_cast<i32*>(smem + kMoeStages * Layout::kStageBytes);

    const MoeTile<kSiluGateUp> tile =
        moe_tile<kSiluGateUp>(block, col, kBM, expert_ids, num_post_padded, n_rows, n_experts);
    if (!tile.valid) return;
    const int expert = tile.expert;
    const int out_cols = tile.out_cols, lo_base = tile.lo_base, hi_base = tile.hi_base;
    auto weight_row = [&](int c) { return tile.weight_row(c, n_rows); };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    const i64 row_bytes = k_dim / 2;
    const u8* expert_q = qweight + static_cast<i64>(expert) * n_rows * row_bytes;
    const ScaleT* expert_s = scales + static_cast<i64>(expert) * n_rows * n_groups;
    const ScaleT* expert_z = kHasZeros ? zeros + static_cast<i64>(expert) * n_rows * n_groups : nullptr;

    if (tid < kBM) block_items[tid] = sorted_ids[block * kBM + tid];
    __syncthreads();

    // Loads: thread tid copies 16-byte chunk tid % 8 of A rows tid / 8 + 16 j,
    // and both 16-byte halves of weight row tid.
    const ActT* a_src[kMTiles];
    bool a_valid[kMTiles];
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
        const int item = block_items[tid / 8 + 16 * j];
        a_valid[j] = item >= 0 && item < n_items;
        a_src[j] = act + static_cast<i64>(a_valid[j] ? item / act_div : 0) * k_dim + (tid % 8) * 8;
    }
    const u8* b_src[2] = {expert_q + static_cast<i64>(weight_row(tid >> 1)) * row_bytes,
                          expert_q + static_cast<i64>(weight_row((tid >> 1) + 64)) * row_bytes};
    const u32 smem_base = smem_address(smem);
    const int k_tiles = (k_dim + kMoeBK - 1) / kMoeBK;

    auto load_tile = [&](int kt, int stage) {
        const u32 a_dst = smem_base + stage * Layout::kStageBytes;
        const u32 b_dst = a_dst + Layout::kABytes;
        const int k0 = kt * kMoeBK;
        const bool a_in = k0 + (tid % 8) * 8 < k_dim;   // K is a multiple of 32: whole chunks
#pragma unroll
        for (int j = 0; j < kMTiles; ++j) {
            const int r = tid / 8 + 16 * j;
            cp_async16(a_dst + r * kMoeARowBytes + (tid % 8) * 16, a_src[j] + (a_in ? k0 : 0),
                       a_valid[j] && a_in ? 16 : 0);
        }
        moe_load_weight_tile(b_dst, b_src, kt, row_bytes, tid);
    };

    // this thread's weight row in n8 tile j (tile columns 16w + 8j + g, high half for j >= 2)
    int my_row[kMoeNTiles];
#pragma unroll
    for (int j = 0; j < kMoeNTiles; ++j) my_row[j] = weight_row((j >= 2 ? kMoeHalf : 0) + 16 * warp + 8 * (j & 1) + g);
    auto load_scales = [&](MoeGroupScales& sc, int kt) {
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int group = min((kt * kMoeBK + 32 * h) >> group_shift, n_groups - 1);
                const i64 at = static_cast<i64>(my_row[j]) * n_groups + group;
                const float s = to_float(expert_s[at]);
                const float z = kHasZeros ? to_float(expert_z[at]) : static_cast<float>(kInt4SymmetricZero);
                sc.s16[j][h] = 16.0f * s;
                sc.offset[j][h] = -(16.0f + z) * s;
            }
    };

    // rotations that bring the low / high nibble of byte t to bits 19..22
    const u32 rot_lo = (19u - 8u * t) & 31u, rot_hi = (15u - 8u * t) & 31u;
    float acc[kMTiles][kMoeNTiles][4];
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

#pragma unroll
    for (int s = 0; s < kMoeStages - 1; ++s) {
        if (s < k_tiles) load_tile(s, s);
        cp_async_commit();
    }
    MoeGroupScales cur, next;
    load_scales(cur, 0);

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kMoeStages - 2>();
        __syncthreads();   // tile kt is in shared memory; the slot of tile kt - 1 is free
        if (kt + kMoeStages - 1 < k_tiles) load_tile(kt + kMoeStages - 1, (kt + kMoeStages - 1) % kMoeStages);
        cp_async_commit();
        if (kt + 1 < k_tiles) load_scales(next, kt + 1);

        const u32 a_tile = smem_base + (kt % kMoeStages) * Layout::kStageBytes;
        const u32 b_tile = a_tile + Layout::kABytes;
        // this thread's 32 nibble bytes of each of its 4 weight rows
        u32 w[kMoeNTiles][8];
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j) {
            const int c = (j >= 2 ? kMoeHalf : 0) + 16 * warp + 8 * (j & 1) + g;
            const uint4 lo = lds_u32x4(b_tile + moe_b_offset(c, 0));
            const uint4 hi = lds_u32x4(b_tile + moe_b_offset(c, 1));
            w[j][0] = lo.x; w[j][1] = lo.y; w[j][2] = lo.z; w[j][3] = lo.w;
            w[j][4] = hi.x; w[j][5] = hi.y; w[j][6] = hi.z; w[j][7] = hi.w;
        }
#pragma unroll
        for (int step = 0; step < kMoeBK / 16; ++step) {
            u32 b[kMoeNTiles][2];
#pragma unroll
            for (int j = 0; j < kMoeNTiles; ++j) {
                const float s16 = cur.s16[j][step / 2], offset = cur.offset[j][step / 2];
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    // byte t of the word: low nibble k even, high nibble k odd
                    const u32 word = w[j][2 * step + half];
                    const float m_lo = __uint_as_float((rotl(word, rot_lo) & kMoeNibbleBits) | kMoeOne);
                    const float m_hi = __uint_as_float((rotl(word, rot_hi) & kMoeNibbleBits) | kMoeOne);
                    b[j][half] = pack2<ActT>(fmaf(m_lo, s16, offset), fmaf(m_hi, s16, offset));
                }
            }
#pragma unroll
            for (int i = 0; i < kMTiles; ++i) {
                u32 a[4];
                // lanes 0-15: rows 16i + lane at k 16 step; lanes 16-31: the same rows at + 8
                ldmatrix_x4(a, a_tile + (16 * i + (lane & 15)) * kMoeARowBytes + step * 32 + (lane >> 4) * 16);
#pragma unroll
                for (int j = 0; j < kMoeNTiles; ++j) mma_m16n8k16<ActT>(acc[i][j], a, b[j][0], b[j][1]);
            }
        }
        cur = next;
    }

    // Epilogue: accumulator c of tile (i, j) is row 16i + g + 8 (c / 2), tile
    // column 16w + 8 (j & 1) + 2t + (c & 1) of half j / 2.
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
            const int item = block_items[16 * i + g + 8 * rh];
            if (item < 0 || item >= n_items) continue;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = 16 * warp + 8 * j + 2 * t;   // within a half; even, and out_cols is even
                if constexpr (kSiluGateUp) {
                    if (lo_base + col >= out_cols) continue;
                    float v[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float gate = acc[i][j][2 * rh + e], up = acc[i][j + 2][2 * rh + e];
                        v[e] = gate / (1.0f + expf(-gate)) * up;
                    }
                    *reinterpret_cast<u32*>(static_cast<ActT*>(out) + static_cast<i64>(item) * out_cols + lo_base +
                                            col) = pack2<ActT>(v[0], v[1]);
                } else {
                    float* row = static_cast<float*>(out) + static_cast<i64>(item) * out_cols;
                    if (lo_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + lo_base + col) =
                            make_float2(acc[i][j][2 * rh], acc[i][j][2 * rh + 1]);
                    if (hi_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + hi_base + col) =
                            make_float2(acc[i][j + 2][2 * rh], acc[i][j + 2][2 * rh + 1]);
                }
            }
        }
}

template <typename ActT, typename ScaleT, bool kHasZeros, int kMTiles, bool kSiluGateUp, bool kPersistent>
__global__ void __launch_bounds__(kMoeGemmThreads, kMTiles == 1 ? 4 : 0) moe_gemm_a16_kernel(
    const ActT* __restrict__ act, const u8* __restrict__ qweight, const ScaleT* __restrict__ scales,
    const ScaleT* __restrict__ zeros, const i32* __restrict__ sorted_ids, const i32* __restrict__ expert_ids,
    const i32* __restrict__ num_post_padded, void* __restrict__ out, i32 n_rows, i32 k_dim, i32 n_groups,
    i32 group_shift, i32 n_items, i32 act_div, i32 n_experts,
    i32 group_m)                               // kPersistent: blocks per group (moe_walk_tiles)
{
    moe_walk_tiles<kSiluGateUp, kPersistent>(group_m, 16 * kMTiles, n_rows, num_post_padded, [&](int block, int col) {
        moe_gemm_a16_tile<ActT, ScaleT, kHasZeros, kMTiles, kSiluGateUp>(
            block, col, act, qweight, scales, zeros, sorted_ids, expert_ids, num_post_padded, out, n_rows, k_dim,
            n_groups, group_shift, n_items, act_div, n_experts);
    });
}

// ---------------------------------------------------------------------------
// A8: per-token INT8 activations (Q8 blocks whose d is the row's scale, as
// moe_decode.cu's moe_token_q8_kernel writes them) against the same INT4
// weights, with mma.sync m16n8k32 s8 and int32 accumulation.
//
// No dequantization: a Q8 block stores its 32 values as qs_even (k = 0, 2, ..)
// then qs_odd (k = 1, 3, ..), and the MMA's k slots are taken in that order. So
// B's slots 4t..4t+3 (k = 8t, 8t+2, 8t+4, 8t+6) are the low nibbles of weight
// word t of the 16-byte k32 chunk and slots 16+4t.. (the odd k) its high
// nibbles: b0 = word & 0x0F0F0F0F, b1 = (word >> 4) & 0x0F0F0F0F, the nibbles q
// in [0, 15] as int8. The zero point and the scales come back per group, as in
// matvec_q8: sum_k w x = s * (d * sum q_w q_x - z * S), with S the sum of the
// blocks' `sum` fields (d * sum q_x) over the group, once the group's int32 dot
// is complete (groups wider than 128 k, and per-channel weights, flush every 128
// k: the int32 dot of 128 k stays below 2^22, so a magic-number add converts it
// exactly). A tile's smem rows hold its blocks' int8 values (rows padded by 16
// bytes, conflict-free for ldmatrix) and, apart, their 16-byte d / sum headers. The
// int32 accumulator of thread (g, t) holds output columns 2t and 2t + 1 of an
// n8 tile (not its B column g), so the flush reads those columns' scales.
constexpr int kMoeA8Blocks = kMoeBK / kQ8BlockValues;     // Q8 blocks per row per K tile
constexpr int kMoeA8RowBytes = kMoeBK + 16;         // the blocks' int8 values, padded (conflict-free ldmatrix)
constexpr int kMoeA8HeaderBytes = kMoeA8Blocks * 16 + 16;   // their 16-byte d / sum headers, padded
constexpr int kMoeA8MaxFlushK = 128;                // int32 dots flushed at least this often
constexpr float kMoeRoundMagic = 12582912.0f;       // 1.5 * 2^23: i + magic holds i in the mantissa
constexpr i32 kMoeRoundMagicBits = 0x4B400000;

template <int kMTiles>
struct MoeGemmA8Layout {
    static constexpr int kRows = 16 * kMTiles;
    static constexpr int kABytes = kRows * kMoeA8RowBytes;
    static constexpr int kHeaderBytes = kRows * kMoeA8HeaderBytes;
    static constexpr int kBBytes = kMoeBN * kMoeBRowBytes;
    static constexpr int kStageBytes = kABytes + kHeaderBytes + kBBytes;
    static constexpr int kSmemBytes = kMoeStages * kStageBytes + kRows * 4;
    // A loads: each row's blocks are 3 * kMoeA8Blocks 16-byte chunks (qs_even,
    // qs_odd, header), spread over the kThreadsPerRow threads of the row
    static constexpr int kThreadsPerRow = kMoeGemmThreads / kRows;
    static constexpr int kRowChunks = 3 * kMoeA8Blocks;
};

// One (block, column tile) pair of the A8 GEMM; moe_gemm_a8_kernel (below) walks
// them. Its launch bounds: 4 CTAs per SM at one m16 tile (128 registers), 3 at two
// (168), 1 at four (an explicit minimum: without one ptxas held the instances to
// 72 registers and spilled; they take ~240, 2 CTAs per SM).
template <typename ScaleT, bool kHasZeros, int kMTiles, bool kSiluGateUp>
__device__ __forceinline__ void moe_gemm_a8_tile(
    int block, int col,
    const Q8Block* __restrict__ act,           // [rows, K / 32], per-token (one d per row)
    const u8* __restrict__ qweight,            // [E, N, K / 2]
    const ScaleT* __restrict__ scales,         // [E, N, n_groups]
    const ScaleT* __restrict__ zeros,          // [E, N, n_groups] (asymmetric only)
    const i32* __restrict__ sorted_ids,        // [max_blocks * BM]
    const i32* __restrict__ expert_ids,        // [max_blocks], -1 for unused blocks
    const i32* __restrict__ num_post_padded,   // [1]
    float* __restrict__ out,                   // GEMM1: silu(g) * u [n_items, N / 2]; GEMM2: [n_items, N]
    i32 n_rows, i32 k_dim, i32 n_groups,
    i32 group_shift,                           // log2(group size); 31 for one group per row
    i32 n_items, i32 act_div, i32 n_experts)
{
    using Layout = MoeGemmA8Layout<kMTiles>;
    constexpr int kBM = Layout::kRows;
    extern __shared__ __align__(16) u8 smem[];
    i32* block_items = reinterpret_cast<i32*>(smem + kMoeStages * Layout::kStageBytes);

    const MoeTile<kSiluGateUp> tile =
        moe_tile<kSiluGateUp>(block, col, kBM, expert_ids, num_post_padded, n_rows, n_experts);
    if (!tile.valid) return;
    const int expert = tile.expert;
    const int out_cols = tile.out_cols, lo_base = tile.lo_base, hi_base = tile.hi_base;
    auto weight_row = [&](int c) { return tile.weight_row(c, n_rows); };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const i64 row_bytes = k_dim / 2;
    const int n_blocks = k_dim / kQ8BlockValues;
    const u8* expert_q = qweight + static_cast<i64>(expert) * n_rows * row_bytes;
    const ScaleT* expert_s = scales + static_cast<i64>(expert) * n_rows * n_groups;
    const ScaleT* expert_z = kHasZeros ? zeros + static_cast<i64>(expert) * n_rows * n_groups : nullptr;

    if (tid < kBM) block_items[tid] = sorted_ids[block * kBM + tid];
    __syncthreads();

    const u8* b_src[2] = {expert_q + static_cast<i64>(weight_row(tid >> 1)) * row_bytes,
                          expert_q + static_cast<i64>(weight_row((tid >> 1) + 64)) * row_bytes};
    const u32 smem_base = smem_address(smem);
    const int k_tiles = (k_dim + kMoeBK - 1) / kMoeBK;

    // A: this thread's row of the tile and its activation row (resolved once: the
    // per-stage loop only adds the K tile's offset)
    const int a_row = tid / Layout::kThreadsPerRow, a_sub = tid % Layout::kThreadsPerRow;
    const int a_item = block_items[a_row];
    const bool a_valid = a_item >= 0 && a_item < n_items;
    const u8* a_src = reinterpret_cast<const u8*>(act + static_cast<i64>(a_valid ? a_item / act_div : 0) * n_blocks);
    auto load_tile = [&](int kt, int stage) {
        const u32 a_dst = smem_base + stage * Layout::kStageBytes;
        const u32 h_dst = a_dst + Layout::kABytes;
        const u32 b_dst = h_dst + Layout::kHeaderBytes;
#pragma unroll
        for (int c0 = 0; c0 < Layout::kRowChunks; c0 += Layout::kThreadsPerRow) {
            const int c = c0 + a_sub;   // chunk: block c / 3, part c % 3 (qs_even, qs_odd, header)
            if (Layout::kRowChunks % Layout::kThreadsPerRow != 0 && c >= Layout::kRowChunks) break;
            const int b = c / 3, part = c % 3;
            const int blk = kt * kMoeA8Blocks + b;
            const bool in = a_valid && blk < n_blocks;
            const u32 dst = part < 2 ? a_dst + a_row * kMoeA8RowBytes + b * 32 + part * 16
                                     : h_dst + a_row * kMoeA8HeaderBytes + b * 16;
            cp_async16(dst, a_src + (in ? static_cast<i64>(blk) * sizeof(Q8Block) + part * 16 : 0), in ? 16 : 0);
        }
        moe_load_weight_tile(b_dst, b_src, kt, row_bytes, tid);
    };

    // B fragments: weight row (tile column) g of each n8 tile; accumulators: tile
    // columns 2t and 2t + 1, whose scales and zeros the flush needs
    auto tile_col = [&](int j) { return (j >= 2 ? kMoeHalf : 0) + 16 * warp + 8 * (j & 1); };
    // scale and zero of the accumulators' weight rows for the group holding k
    float s_cur[kMoeNTiles][2], z_cur[kMoeNTiles][2];
    auto load_group = [&](int k) {
        const int group = min(k >> group_shift, n_groups - 1);
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const i64 at = static_cast<i64>(weight_row(tile_col(j) + 2 * t + e)) * n_groups + group;
                s_cur[j][e] = to_float(expert_s[at]);
                z_cur[j][e] = kHasZeros ? to_float(expert_z[at]) : static_cast<float>(kInt4SymmetricZero);
            }
    };
    const int flush_k = min(group_shift >= 31 ? kMoeA8MaxFlushK : (1 << group_shift), kMoeA8MaxFlushK);

    float acc[kMTiles][kMoeNTiles][4];
    i32 dot[kMTiles][kMoeNTiles][4];
    float block_sums[kMTiles][2];   // S of rows 16i + g (+ 8) over the blocks since the last flush
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) {
        block_sums[i][0] = block_sums[i][1] = 0.0f;
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[i][j][c] = 0.0f;
                dot[i][j][c] = 0;
            }
    }

#pragma unroll
    for (int st = 0; st < kMoeStages - 1; ++st) {
        if (st < k_tiles) load_tile(st, st);
        cp_async_commit();
    }
    load_group(0);

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kMoeStages - 2>();
        __syncthreads();
        if (kt + kMoeStages - 1 < k_tiles) load_tile(kt + kMoeStages - 1, (kt + kMoeStages - 1) % kMoeStages);
        cp_async_commit();

        const u32 a_tile = smem_base + (kt % kMoeStages) * Layout::kStageBytes;
        const u32 h_tile = a_tile + Layout::kABytes;
        const u32 b_tile = h_tile + Layout::kHeaderBytes;
#pragma unroll
        for (int step = 0; step < kMoeA8Blocks; ++step) {
            const int k_end = kt * kMoeBK + 32 * (step + 1);   // k after this block
            if (step > 0 && k_end > k_dim) break;                // K's last tile may hold fewer blocks
            u32 b[kMoeNTiles][2];
#pragma unroll
            for (int j = 0; j < kMoeNTiles; ++j) {
                const u32 word = lds_u32(b_tile + moe_b_offset(tile_col(j) + g, step) + 4 * t);
                b[j][0] = word & kLowNibbles;
                b[j][1] = (word >> 4) & kLowNibbles;
            }
#pragma unroll
            for (int i = 0; i < kMTiles; ++i) {
                u32 a[4];
                ldmatrix_x4(a, a_tile + (16 * i + (lane & 15)) * kMoeA8RowBytes + step * 32 + (lane >> 4) * 16);
#pragma unroll
                for (int j = 0; j < kMoeNTiles; ++j) mma_s8_m16n8k32_acc(dot[i][j], a, b[j][0], b[j][1]);
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    block_sums[i][h] += __uint_as_float(
                        lds_u32(h_tile + (16 * i + g + 8 * h) * kMoeA8HeaderBytes + step * 16 + 4));
            }
            if ((k_end & (flush_k - 1)) == 0 || k_end >= k_dim) {
                // acc += s * (d * dot - z * S); d is the row's scale (every block's d)
#pragma unroll
                for (int i = 0; i < kMTiles; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float d = __uint_as_float(
                            lds_u32(h_tile + (16 * i + g + 8 * h) * kMoeA8HeaderBytes + step * 16));
#pragma unroll
                        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                i32& v = dot[i][j][2 * h + e];
                                const float f = __int_as_float(v + kMoeRoundMagicBits) - kMoeRoundMagic;
                                acc[i][j][2 * h + e] = fmaf(
                                    s_cur[j][e], fmaf(d, f, -z_cur[j][e] * block_sums[i][h]), acc[i][j][2 * h + e]);
                                v = 0;
                            }
                        block_sums[i][h] = 0.0f;
                    }
                if (k_end < k_dim) load_group(k_end);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
            const int item = block_items[16 * i + g + 8 * rh];
            if (item < 0 || item >= n_items) continue;
            float* row = out + static_cast<i64>(item) * out_cols;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = 16 * warp + 8 * j + 2 * t;
                if constexpr (kSiluGateUp) {
                    if (lo_base + col >= out_cols) continue;
                    float v[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float gate = acc[i][j][2 * rh + e], up = acc[i][j + 2][2 * rh + e];
                        v[e] = gate / (1.0f + expf(-gate)) * up;
                    }
                    *reinterpret_cast<float2*>(row + lo_base + col) = make_float2(v[0], v[1]);
                } else {
                    if (lo_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + lo_base + col) =
                            make_float2(acc[i][j][2 * rh], acc[i][j][2 * rh + 1]);
                    if (hi_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + hi_base + col) =
                            make_float2(acc[i][j + 2][2 * rh], acc[i][j + 2][2 * rh + 1]);
                }
            }
        }
}

template <typename ScaleT, bool kHasZeros, int kMTiles, bool kSiluGateUp, bool kPersistent>
__global__ void __launch_bounds__(kMoeGemmThreads, kMTiles == 1 ? 4 : (kMTiles == 2 ? 3 : 1)) moe_gemm_a8_kernel(
    const Q8Block* __restrict__ act, const u8* __restrict__ qweight, const ScaleT* __restrict__ scales,
    const ScaleT* __restrict__ zeros, const i32* __restrict__ sorted_ids, const i32* __restrict__ expert_ids,
    const i32* __restrict__ num_post_padded, float* __restrict__ out, i32 n_rows, i32 k_dim, i32 n_groups,
    i32 group_shift, i32 n_items, i32 act_div, i32 n_experts,
    i32 group_m)                               // kPersistent: blocks per group (moe_walk_tiles)
{
    moe_walk_tiles<kSiluGateUp, kPersistent>(group_m, 16 * kMTiles, n_rows, num_post_padded, [&](int block, int col) {
        moe_gemm_a8_tile<ScaleT, kHasZeros, kMTiles, kSiluGateUp>(
            block, col, act, qweight, scales, zeros, sorted_ids, expert_ids, num_post_padded, out, n_rows, k_dim,
            n_groups, group_shift, n_items, act_div, n_experts);
    });
}

}  // namespace w4kern
