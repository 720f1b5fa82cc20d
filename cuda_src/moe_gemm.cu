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
// high half (64..127): for GEMM1 (kSiluGateUp) the gate rows n0 .. n0 + 63 and the
// matching up rows I + n0 .. I + n0 + 63, so that every thread holds the gate
// and up accumulators of the same outputs and the epilogue writes silu(g) * u
// straight away (as ActT, GEMM2's A operand); for GEMM2 simply 128 consecutive
// rows, written as fp32 per item (the combine kernel of moe_decode.cu sums an
// item's k rows in slot order: deterministic).
//
// Warp w owns tile columns 16w .. 16w + 15 of both halves (4 n8 MMA tiles) and
// all BM rows (the A8 GEMM's 64-row CTAs have two warps along M: warp w % 4's
// columns, half the rows). Each K tile (kMoeBK = 64) goes through a kMoeStages
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
// and zeros of the next K tile are loaded into registers while this one computes
// (where its groups are new).
#include "common/formats.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kMoeGemmThreads = 128;         // the A16 GEMM's CTA (the A8 GEMM's: MoeGemmA8Layout)
constexpr int kMoeGemmWarpsN = 4;            // warps along a tile's columns
constexpr int kMoeBN = kMoeGemmThreads;      // weight rows per tile (two halves); a thread pair loads two
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
// tid / 2 + kMoeBN / 2, half tid % 2 (src[r]: the weight row's first byte).
__device__ __forceinline__ void moe_load_weight_tile(u32 b_dst, const u8* const (&src)[2], int kt, i64 row_bytes,
                                                     int tid) {
    const int half = tid & 1;
    const i64 byte = static_cast<i64>(kt) * kMoeBRowBytes + 16 * half;
    const bool in = byte < row_bytes;   // K is a multiple of 32: whole halves
#pragma unroll
    for (int r = 0; r < 2; ++r)
        cp_async16(b_dst + moe_b_offset((tid >> 1) + kMoeHalf * r, half), src[r] + (in ? byte : 0), in ? 16 : 0);
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

    // Loads: thread tid copies 16-byte chunk tid % 8 of A rows tid / 8 + kARowsPerPass j,
    // and two weight-row halves (moe_load_weight_tile).
    constexpr int kARowsPerPass = kMoeGemmThreads / 8;
    constexpr int kAPasses = kBM / kARowsPerPass;
    static_assert(kBM % kARowsPerPass == 0, "the A rows split evenly over the passes");
    const ActT* a_src[kAPasses];
    bool a_valid[kAPasses];
#pragma unroll
    for (int j = 0; j < kAPasses; ++j) {
        const int r = tid / 8 + kARowsPerPass * j;
        const int item = block_items[r];
        a_valid[j] = item >= 0 && item < n_items;
        a_src[j] = act + static_cast<i64>(a_valid[j] ? item / act_div : 0) * k_dim + (tid % 8) * 8;
    }
    const u8* b_src[2] = {expert_q + static_cast<i64>(weight_row(tid >> 1)) * row_bytes,
                          expert_q + static_cast<i64>(weight_row((tid >> 1) + kMoeHalf)) * row_bytes};
    const u32 smem_base = smem_address(smem);
    const int k_tiles = (k_dim + kMoeBK - 1) / kMoeBK;

    auto load_tile = [&](int kt, int stage) {
        const u32 a_dst = smem_base + stage * Layout::kStageBytes;
        const u32 b_dst = a_dst + Layout::kABytes;
        const int k0 = kt * kMoeBK;
        const bool a_in = k0 + (tid % 8) * 8 < k_dim;   // K is a multiple of 32: whole chunks
#pragma unroll
        for (int j = 0; j < kAPasses; ++j) {
            const int r = tid / 8 + kARowsPerPass * j;
            cp_async16(a_dst + r * kMoeARowBytes + (tid % 8) * 16, a_src[j] + (a_in ? k0 : 0),
                       a_valid[j] && a_in ? 16 : 0);
        }
        moe_load_weight_tile(b_dst, b_src, kt, row_bytes, tid);
    };

    // this thread's weight row in n8 tile j (tile columns 16w + 8j + g, high half for j >= 2)
    int my_row[kMoeNTiles];
#pragma unroll
    for (int j = 0; j < kMoeNTiles; ++j) my_row[j] = weight_row((j >= 2 ? kMoeHalf : 0) + 16 * warp + 8 * (j & 1) + g);
    // The groups of a K tile's two 32-k halves; their scales are loaded once per
    // change (every K tile for groups of 32, every other one for 128, once for one
    // group per row), the second half's only when it is another group. (The second
    // half's group changes exactly when the first's does: K tiles are 64 k.)
    auto tile_group = [&](int kt, int h) { return min((kt * kMoeBK + 32 * h) >> group_shift, n_groups - 1); };
    auto load_scales = [&](MoeGroupScales& sc, int kt) {
        const int group0 = tile_group(kt, 0), group1 = tile_group(kt, 1);
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (h == 1 && group1 == group0) {
                    sc.s16[j][1] = sc.s16[j][0];
                    sc.offset[j][1] = sc.offset[j][0];
                    continue;
                }
                const i64 at = static_cast<i64>(my_row[j]) * n_groups + (h ? group1 : group0);
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
        // the next K tile's scales, if its groups differ from this one's
        const bool new_groups = kt + 1 < k_tiles && tile_group(kt + 1, 0) != tile_group(kt, 0);
        if (new_groups) load_scales(next, kt + 1);

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
        if (new_groups) cur = next;
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
__global__ void __launch_bounds__(kMoeGemmThreads, kMTiles == 1 ? 512 / kMoeGemmThreads : 0) moe_gemm_a16_kernel(
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
// matvec_q8, but with the row's d taken out (it is every block's d): sum_k w x =
// d * sum_groups s * (sum q_w q_x - z * sum q_x). sum q_x of a row over the group
// comes from the MMA too: one more m16n8k32 per m16 tile and k32 step with B all
// ones gives every row's sum in each of its columns (exact, in int32). The flush
// adds s * (dot - z * sum q_x) to an fp32 accumulator once the group's int32
// dot is complete (groups wider than 128 k, and per-channel weights, flush every
// 128 k), and the epilogue multiplies by d, which the tile reads once per row.
// So the blocks' d / sum headers are never loaded. The int32 dots start at the
// bits of 1.5 * 2^23 (a group's first MMAs take that as their C): a dot of 128
// k stays below 2^22 in magnitude, so the accumulator's bits are the float
// 1.5 * 2^23 + dot and one subtraction converts it exactly. So a flush costs
// three instructions per accumulator (subtract, two FMAs).
//
// A tile's smem rows hold its blocks' int8 values (rows padded by 16 bytes,
// conflict-free for ldmatrix). The int32 accumulator of thread (g, t) holds
// output columns 2t and 2t + 1 of an n8 tile (not its B column g), so the flush
// needs those columns' scales and zeros: lane l of a warp loads the group's (s, z) of the warp's weight row
// 8 (l / 8) + l % 8 (a global load per group, issued a group ahead), the warp
// puts them in shared memory, and thread (g, t) reads columns 2t, 2t + 1 of n8
// tile j as one 16-byte (s, z, s, z).
constexpr int kMoeA8Blocks = kMoeBK / kQ8BlockValues;     // Q8 blocks per row per K tile
constexpr int kMoeA8RowBytes = kMoeBK + 16;         // the blocks' int8 values, padded (conflict-free ldmatrix)
constexpr u32 kMoeA8Ones = 0x01010101u;            // a B fragment of ones: the MMA sums A's rows
constexpr int kMoeA8MaxFlushK = 128;                // int32 dots flushed at least this often
constexpr float kMoeRoundMagic = 12582912.0f;       // 1.5 * 2^23: i + magic holds i in the mantissa
constexpr i32 kMoeRoundMagicBits = 0x4B400000;
// The 1, 2 and 4-tile A8 instances: warps along M (a CTA has 4 of them along N, so
// 128 or 256 threads; with 2 each warp computes half the block's m16 tiles, and
// two warps share every B fragment) and the launch bounds' CTAs per SM (see
// moe_gemm_a8_tile)
constexpr int kMoeA8WarpsM[3] = {1, 1, 2};
constexpr int kMoeA8MinCtas[3] = {4, 4, 2};
__host__ __device__ constexpr int moe_a8_instance(int m_tiles) { return m_tiles == 1 ? 0 : (m_tiles == 2 ? 1 : 2); }

template <int kMTiles>
struct MoeGemmA8Layout {
    static constexpr int kWarpsM = kMoeA8WarpsM[moe_a8_instance(kMTiles)];
    static constexpr int kThreads = 32 * kMoeGemmWarpsN * kWarpsM;
    static constexpr int kMTilesPerWarp = kMTiles / kWarpsM;
    static_assert(kMoeBN == 32 * kMoeGemmWarpsN, "a warp owns 16 columns of each half of the tile");
    // B loads: the tile's 2 * kMoeBN 16-byte row halves over the threads
    static constexpr int kBLoads = 2 * kMoeBN / kThreads;
    static constexpr int kRows = 16 * kMTiles;
    static constexpr int kABytes = kRows * kMoeA8RowBytes;
    static constexpr int kBBytes = kMoeBN * kMoeBRowBytes;
    static constexpr int kStageBytes = kABytes + kBBytes;
    // the stages, the block's item ids and rows' d, the warps' group scales and zeros
    // (a warp's 32 weight rows' (s, z) as float2)
    static constexpr int kItemsOffset = kMoeStages * kStageBytes;
    static constexpr int kRowDOffset = kItemsOffset + kRows * 4;
    static constexpr int kGroupOffset = kRowDOffset + kRows * 4;
    static constexpr int kSmemBytes = kGroupOffset + kThreads * 8;
    // A loads: a K tile of a row is 2 * kMoeA8Blocks 16-byte chunks (each block's
    // qs_even and qs_odd; not its header), spread over the row's kThreadsPerRow threads
    static constexpr int kThreadsPerRow = kThreads / kRows;
    static constexpr int kRowChunks = 2 * kMoeA8Blocks;
    static constexpr int kChunksPerThread = (kRowChunks + kThreadsPerRow - 1) / kThreadsPerRow;
};

// One (block, column tile) pair of the A8 GEMM; moe_gemm_a8_kernel (below) walks
// them. Its launch bounds: 4 CTAs per SM at one and two m16 tiles, 2 (of 256
// threads) at four: 128 registers, 16 warps per SM, every warp two m16 tiles at
// most (one warp of four m16 tiles took ~250 registers, 8 warps per SM; two of
// 128 threads at 168 registers had 12).
// Addresses that do not change along K (shared-memory offsets, source pointers)
// are worked out once before the K loop, and the ring's stages are walked by
// adding the stage size: the loop body is mostly MMAs, nibble masks and the flush.
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
    i32* block_items = reinterpret_cast<i32*>(smem + Layout::kItemsOffset);

    const MoeTile<kSiluGateUp> tile =
        moe_tile<kSiluGateUp>(block, col, kBM, expert_ids, num_post_padded, n_rows, n_experts);
    if (!tile.valid) return;
    const int expert = tile.expert;
    const int out_cols = tile.out_cols, lo_base = tile.lo_base, hi_base = tile.hi_base;
    auto weight_row = [&](int c) { return tile.weight_row(c, n_rows); };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_n = warp % kMoeGemmWarpsN;                        // the warp's columns
    const int m0 = warp / kMoeGemmWarpsN * Layout::kMTilesPerWarp;   // its first m16 tile
    const int g = lane >> 2, t = lane & 3;
    const i64 row_bytes = k_dim / 2;
    const int n_blocks = k_dim / kQ8BlockValues;
    const u8* expert_q = qweight + static_cast<i64>(expert) * n_rows * row_bytes;
    const ScaleT* expert_s = scales + static_cast<i64>(expert) * n_rows * n_groups;
    const ScaleT* expert_z = kHasZeros ? zeros + static_cast<i64>(expert) * n_rows * n_groups : nullptr;

    if (tid < kBM) block_items[tid] = sorted_ids[block * kBM + tid];
    __syncthreads();

    const u32 smem_base = smem_address(smem);
    const int k_tiles = (k_dim + kMoeBK - 1) / kMoeBK;

    // A loads: this thread's row of the tile, its activation row, and its chunks
    // (chunk c: block c / 2, part c % 2: qs_even, qs_odd), as offsets into a stage
    // and into the K tile's span of the activation row
    const int a_row = tid / Layout::kThreadsPerRow, a_sub = tid % Layout::kThreadsPerRow;
    const int a_item = block_items[a_row];
    const bool a_valid = a_item >= 0 && a_item < n_items;
    const u8* a_src = reinterpret_cast<const u8*>(act + static_cast<i64>(a_valid ? a_item / act_div : 0) * n_blocks);
    u32 a_dst_off[Layout::kChunksPerThread], a_src_off[Layout::kChunksPerThread];
    int a_block[Layout::kChunksPerThread];
#pragma unroll
    for (int u = 0; u < Layout::kChunksPerThread; ++u) {
        const int c = u * Layout::kThreadsPerRow + a_sub, b = c / 2, part = c % 2;
        a_block[u] = c < Layout::kRowChunks ? b : kMoeA8Blocks;   // past the row's chunks: none
        a_dst_off[u] = a_row * kMoeA8RowBytes + c * 16;
        a_src_off[u] = b * static_cast<u32>(sizeof(Q8Block)) + part * 16;
    }
    int a_blocks_left = a_valid ? n_blocks : 0;   // of the row, from the next K tile to load on
    // B loads: weight-row halves tid % 2 of tile rows tid / 2 + r * kThreads / 2 (the
    // pairs of moe_load_weight_tile), and how many of the row's bytes are left from
    // the next K tile's half on
    i64 b_bytes_left = row_bytes - 16 * (tid & 1);
    const int b_half = b_bytes_left > 0 ? 16 * (tid & 1) : 0;   // (K = 32: a row has one half)
    const u8* b_src[Layout::kBLoads];
    u32 b_dst_off[Layout::kBLoads];
#pragma unroll
    for (int r = 0; r < Layout::kBLoads; ++r) {
        const int row = (tid >> 1) + r * (Layout::kThreads / 2);
        b_src[r] = expert_q + static_cast<i64>(weight_row(row)) * row_bytes + b_half;
        b_dst_off[r] = Layout::kABytes + moe_b_offset(row, tid & 1);
    }
    // Loads the next K tile into `stage`; the sources advance by a K tile each call.
    // A source past the row's end is never read (zero bytes copied): the pointers
    // stay where they are then.
    auto load_next_tile = [&](u32 stage) {
#pragma unroll
        for (int u = 0; u < Layout::kChunksPerThread; ++u) {
            if (a_block[u] >= kMoeA8Blocks) break;
            const bool in = a_block[u] < a_blocks_left;
            cp_async16(stage + a_dst_off[u], a_src + (in ? a_src_off[u] : 0), in ? 16 : 0);
        }
        const bool a_more = a_blocks_left > kMoeA8Blocks;
        a_src += a_more ? kMoeA8Blocks * sizeof(Q8Block) : 0;
        a_blocks_left -= kMoeA8Blocks;
        const bool in = b_bytes_left > 0;   // K is a multiple of 32: whole halves
#pragma unroll
        for (int r = 0; r < Layout::kBLoads; ++r) cp_async16(stage + b_dst_off[r], b_src[r], in ? 16 : 0);
        b_bytes_left -= kMoeBRowBytes;
#pragma unroll
        for (int r = 0; r < Layout::kBLoads; ++r) b_src[r] += b_bytes_left > 0 ? kMoeBRowBytes : 0;
    };

    // Per-fragment shared-memory offsets within a stage: the A rows for ldmatrix
    // (lanes 0-15: rows 16i + lane at k 32 step; lanes 16-31: + 16 bytes), the B
    // word of thread (g, t) in n8 tile j, and the headers of rows 16i + g (+ 8)
    const u32 a_frag_off = (16 * m0 + (lane & 15)) * kMoeA8RowBytes + (lane >> 4) * 16;
    auto tile_col = [&](int j) { return (j >= 2 ? kMoeHalf : 0) + 16 * warp_n + 8 * (j & 1); };
    // n8 tile j's rows lie 8 (j & 1) + kMoeHalf (j >= 2) rows past tile 0's, multiples
    // of 8 that leave moe_b_offset's swizzle bit (row bit 2) and the half's bit 4 alone
    const u32 b_frag_off = Layout::kABytes + moe_b_offset(16 * warp_n + g, 0) + 4 * t;
    auto b_tile_rows = [](int j) { return static_cast<u32>(((j & 1) * 8 + (j >= 2 ? kMoeHalf : 0)) * kMoeBRowBytes); };

    // The group's scale and zero of the accumulators' weight rows. Lane l loads
    // those of warp row 8 (l / 8) + l % 8 (tile column tile_col(l / 8) + l % 8).
    const int my_group_row = weight_row(tile_col(lane >> 3) + (lane & 7));
    const ScaleT* my_s = expert_s + static_cast<i64>(my_group_row) * n_groups;
    const ScaleT* my_z = kHasZeros ? expert_z + static_cast<i64>(my_group_row) * n_groups : nullptr;
    float2* warp_sz = reinterpret_cast<float2*>(smem + Layout::kGroupOffset) + 32 * warp;
    // The group's values, loaded a group ahead: published to the warp's shared
    // memory at the flush, which reads columns 2t, 2t + 1 of n8 tile j as one
    // 16-byte (s, z, s, z)
    ScaleT s_raw, z_raw;
    auto load_group = [&](int k) {
        const int group = min(k >> min(group_shift, 30), n_groups - 1);
        s_raw = my_s[group];
        if constexpr (kHasZeros) z_raw = my_z[group];
    };
    auto publish_group = [&]() {
        __syncwarp();   // every lane has read the last group's
        warp_sz[lane] = make_float2(to_float(s_raw),
                                    kHasZeros ? to_float(z_raw) : static_cast<float>(kInt4SymmetricZero));
        __syncwarp();
    };

    // d of rows 16i + g (+ 8): every block's d; 1 / d scales the blocks' sums down
    // to sum q_x (0 for an all-zero row, whose d is 0, and for padding rows)
    float* block_d = reinterpret_cast<float*>(smem + Layout::kRowDOffset);

    const int flush_k = min(group_shift >= 31 ? kMoeA8MaxFlushK : (1 << group_shift), kMoeA8MaxFlushK);
    const int group_blocks = flush_k / kQ8BlockValues;   // Q8 blocks per flush

    // the warp's m16 tiles m0 + i
    constexpr int kWarpTiles = Layout::kMTilesPerWarp;
    float acc[kWarpTiles][kMoeNTiles][4];
    i32 dot[kWarpTiles][kMoeNTiles][4];
    i32 row_sums[kWarpTiles][4];   // sum q_x of rows 16 (m0 + i) + g (c 0, 1) and + 8 (c 2, 3)
#pragma unroll
    for (int i = 0; i < kWarpTiles; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) row_sums[i][c] = kMoeRoundMagicBits;
#pragma unroll
        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[i][j][c] = 0.0f;
                dot[i][j][c] = kMoeRoundMagicBits;
            }
    }

    u32 load_stage = smem_base;   // the stage the next K tile's loads go to
#pragma unroll
    for (int st = 0; st < kMoeStages - 1; ++st) {
        if (st < k_tiles) load_next_tile(load_stage);
        cp_async_commit();
        load_stage += Layout::kStageBytes;
    }
    // after the first loads are on their way: group 0's (s, z), and the rows' d for
    // the epilogue (the loop's first barrier publishes them)
    load_group(0);
    if (tid < kBM) {
        const int item = block_items[tid];
        block_d[tid] = item >= 0 && item < n_items ? act[static_cast<i64>(item / act_div) * n_blocks].d : 0.0f;
    }
    u32 stage = smem_base;        // the stage of K tile kt
    const u32 last_stage = smem_base + (kMoeStages - 1) * Layout::kStageBytes;
    int blocks_to_flush = group_blocks;

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kMoeStages - 2>();
        __syncthreads();   // tile kt is in shared memory; the stage of tile kt - 1 is free
        if (kt + kMoeStages - 1 < k_tiles) load_next_tile(load_stage);
        cp_async_commit();
        load_stage = load_stage == last_stage ? smem_base : load_stage + Layout::kStageBytes;

#pragma unroll
        for (int step = 0; step < kMoeA8Blocks; ++step) {
            const int k_end = kt * kMoeBK + 32 * (step + 1);   // k after this block
            if (step > 0 && k_end > k_dim) break;                // K's last tile may hold fewer blocks
            u32 b[kMoeNTiles][2];
#pragma unroll
            for (int j = 0; j < kMoeNTiles; ++j) {
                const u32 word = lds_u32(stage + (b_frag_off ^ (16 * step)) + b_tile_rows(j));
                b[j][0] = word & kLowNibbles;
                b[j][1] = (word >> 4) & kLowNibbles;
            }
            // a group's first k32 step starts its dots over (C = the magic bits)
            const bool group_start = blocks_to_flush == group_blocks;
#pragma unroll
            for (int i = 0; i < kWarpTiles; ++i) {
                u32 a[4];
                ldmatrix_x4(a, stage + a_frag_off + 16 * i * kMoeA8RowBytes + step * 32);
                if (group_start) {
#pragma unroll
                    for (int j = 0; j < kMoeNTiles; ++j)
                        mma_s8_m16n8k32_from(dot[i][j], a, b[j][0], b[j][1], kMoeRoundMagicBits);
                    mma_s8_m16n8k32_from(row_sums[i], a, kMoeA8Ones, kMoeA8Ones, kMoeRoundMagicBits);
                } else {
#pragma unroll
                    for (int j = 0; j < kMoeNTiles; ++j) mma_s8_m16n8k32_acc(dot[i][j], a, b[j][0], b[j][1]);
                    mma_s8_m16n8k32_acc(row_sums[i], a, kMoeA8Ones, kMoeA8Ones);
                }
            }
            if (--blocks_to_flush == 0 || k_end >= k_dim) {
                // acc += s * (dot - z * sum q_x)
                publish_group();
                float4 sz[kMoeNTiles];   // (s, z) of columns 2t, 2t + 1
#pragma unroll
                for (int j = 0; j < kMoeNTiles; ++j) sz[j] = *reinterpret_cast<const float4*>(warp_sz + 8 * j + 2 * t);
#pragma unroll
                for (int i = 0; i < kWarpTiles; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float sums_q = __int_as_float(row_sums[i][2 * h]) - kMoeRoundMagic;
#pragma unroll
                        for (int j = 0; j < kMoeNTiles; ++j)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const float f = __int_as_float(dot[i][j][2 * h + e]) - kMoeRoundMagic;
                                const float s = e ? sz[j].z : sz[j].x, z = e ? sz[j].w : sz[j].y;
                                acc[i][j][2 * h + e] = fmaf(s, fmaf(-z, sums_q, f), acc[i][j][2 * h + e]);
                            }
                    }
                blocks_to_flush = group_blocks;
                if (k_end < k_dim) load_group(k_end);
            }
        }
        stage = stage == last_stage ? smem_base : stage + Layout::kStageBytes;
    }

#pragma unroll
    for (int i = 0; i < kWarpTiles; ++i)
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
            const int r = 16 * (m0 + i) + g + 8 * rh;
            const int item = block_items[r];
            if (item < 0 || item >= n_items) continue;
            float* row = out + static_cast<i64>(item) * out_cols;
            const float d = block_d[r];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = 16 * warp_n + 8 * j + 2 * t;
                if constexpr (kSiluGateUp) {
                    if (lo_base + col >= out_cols) continue;
                    float v[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float gate = d * acc[i][j][2 * rh + e], up = d * acc[i][j + 2][2 * rh + e];
                        v[e] = gate / (1.0f + expf(-gate)) * up;
                    }
                    *reinterpret_cast<float2*>(row + lo_base + col) = make_float2(v[0], v[1]);
                } else {
                    if (lo_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + lo_base + col) =
                            make_float2(d * acc[i][j][2 * rh], d * acc[i][j][2 * rh + 1]);
                    if (hi_base + col < out_cols)
                        *reinterpret_cast<float2*>(row + hi_base + col) =
                            make_float2(d * acc[i][j + 2][2 * rh], d * acc[i][j + 2][2 * rh + 1]);
                }
            }
        }
}

template <typename ScaleT, bool kHasZeros, int kMTiles, bool kSiluGateUp, bool kPersistent>
__global__ void __launch_bounds__(MoeGemmA8Layout<kMTiles>::kThreads, kMoeA8MinCtas[moe_a8_instance(kMTiles)])
moe_gemm_a8_kernel(
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
