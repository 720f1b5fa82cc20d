// matvec_q8: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4 or INT8
// weights against Q8 activation blocks, with dp4a (llama.cpp's MMVQ idea).
//
// Work split: kSplit warps of a CTA share kRows consecutive weight rows (a row
// group) and split its K; their lanes stride over the K/32 Q8 blocks, so
// consecutive lanes read consecutive 16-byte pieces of each row (coalesced),
// and every activation block a lane loads is reused for kRows rows. Many rows
// per warp save activation loads; splitting K keeps enough warps (and loads
// in flight) on layers with few rows. Warps reduce with shuffles, and split
// warps through shared memory. CTAs are persistent: the grid holds as many as
// the GPU keeps resident, each walking many row groups with its next loads
// always in flight.
//
// One Q8 block of 32 activations meets, per weight row:
//   INT4: 16 bytes (4 words); word j & 0x0F0F0F0F holds the even-k weights
//         matching qs_even word j, (word j >> 4) & 0x0F0F0F0F the odd-k ones.
//   INT8: 32 bytes (8 words) in natural k order; prmt regroups two words into
//         an even-k and an odd-k word.
// The block's int32 dot product becomes fp32 once per block:
//   acc += s * (d * dot(q_w, q_x) - z * sum)      (sum = d * sum(q_x))
// with z the weight zero point (8 for symmetric INT4, 0 for INT8), and s the
// scale of the weight group holding the block. M tokens (1 <= M <= kMaxM)
// share each weight load.
//
// Item modes (kItemMode, the MoE int8 decode path's expert GEMMs):
//   kPerItem (GEMM1): blockIdx.y is an item (common/moe_items.cuh): expert
//     item_experts[i]'s weights, the activation rows of item i / act_item_div,
//     output rows i * M ...; zeros for an id outside [0, E).
//   kTokenSum (GEMM2 with the combine fused): blockIdx.y is a token t with
//     k = act_item_div slots (k <= 32). Its K runs over the k slots one after
//     another: virtual K block v = j * n_blocks + b is block b of slot j, so the
//     activation blocks are simply rows t * k .. t * k + k - 1 read as one long
//     row, while the weights of block v come from expert item_experts[t * k + j].
//     The slot's weight item_weights[t * k + j] scales the activation's d and
//     sum, so y[t] = sum_j w_j W[e_j] a_j comes out of one fixed-order reduction
//     (the same bits every run); a slot whose id is outside [0, E) is left out,
//     as moe_combine_kernel leaves it out. Lane j holds slot j's expert and
//     weight, and the walk reads them with shuffles (no dependent loads).
#include "common/formats.cuh"
#include "common/moe_items.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kMatvecThreads = 128;
constexpr int kMatvecWarps = kMatvecThreads / 32;

template <int kWeightBits>
struct WeightBlock;

template <>
struct WeightBlock<4> {
    static constexpr int kBytes = 16;
    u32 w[4];
    __device__ __forceinline__ void load(const u8* p) { load_streaming<16>(w, p); }
    __device__ __forceinline__ u32 even(int j) const { return w[j] & kLowNibbles; }
    __device__ __forceinline__ u32 odd(int j) const { return (w[j] >> 4) & kLowNibbles; }
};

template <>
struct WeightBlock<8> {
    static constexpr int kBytes = 32;
    u32 w[8];
    __device__ __forceinline__ void load(const u8* p) {
        u32 (&lo)[4] = *reinterpret_cast<u32 (*)[4]>(w);
        u32 (&hi)[4] = *reinterpret_cast<u32 (*)[4]>(w + 4);
        load_streaming<16>(lo, p);
        load_streaming<16>(hi, p + 16);
    }
    // k = 8j + {0, 2, 4, 6}: bytes 0 and 2 of words 2j and 2j+1
    __device__ __forceinline__ u32 even(int j) const { return byte_perm(w[2 * j], w[2 * j + 1], 0x6420); }
    __device__ __forceinline__ u32 odd(int j) const { return byte_perm(w[2 * j], w[2 * j + 1], 0x7531); }
};

// kItemMode; kTokenSum takes at most 32 slots, one per lane (the host checks)
constexpr int kPlainMatvec = 0, kPerItem = 1, kTokenSum = 2;

template <int kWeightBits, typename ScaleT, bool kHasZeros, int kMaxM, int kRows, int kUnroll, int kSplit,
          int kItemMode>
__global__ void __launch_bounds__(kMatvecThreads) matvec_q8_kernel(
    const u8* __restrict__ qweight,      // [N, K * kWeightBits / 8]
    const ScaleT* __restrict__ scales,   // [N, n_groups]
    const ScaleT* __restrict__ zeros,    // [N, n_groups] (INT4 asymmetric only)
    const Q8Block* __restrict__ act,     // [M, K / 32]
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 m_tokens, i32 n_blocks, i32 n_groups,
    i32 group_shift,                     // log2(blocks per group); 31 for one group per row
    i32 out_kind,
    const i32* __restrict__ item_experts,   // [items] expert of each item (item modes only)
    const float* __restrict__ item_weights, // [items] weight of each item (kTokenSum only)
    i32 n_experts, i32 act_item_div)
{
    constexpr bool kItems = kItemMode == kPerItem, kTokenSums = kItemMode == kTokenSum;
    constexpr bool kScalesAhead = kItemMode == kPlainMatvec;   // see cur_s below
    static_assert(!kTokenSums || kMaxM == 1, "token sums: one token per grid row");
    static_assert(kWeightBits == 4 || kWeightBits == 8, "INT4 or INT8 weights");
    static_assert(!(kHasZeros && kWeightBits == 8), "INT8 weights are symmetric");
    static_assert(kMatvecWarps % kSplit == 0, "a CTA's warps split evenly over its row groups");
    static_assert(kRows * kMaxM <= 32, "one output per lane");
    using Block = WeightBlock<kWeightBits>;
    constexpr int kGroupsPerCta = kMatvecWarps / kSplit;   // row groups a CTA works on at once
    constexpr int kStepBlocks = kUnroll * 32;              // K blocks a warp covers per step
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int part = warp % kSplit;                        // this warp's share of K
    const int n_row_groups = (n_rows + kRows - 1) / kRows;
    const int n_sets = (n_row_groups + kGroupsPerCta - 1) / kGroupsPerCta;
    // K blocks of a row: kTokenSum walks the k slots' blocks as one row
    const int k_blocks = kTokenSums ? n_blocks * act_item_div : n_blocks;
    const int steps = (k_blocks + kStepBlocks - 1) / kStepBlocks;    // per row group
    const int my_steps = (steps + kSplit - 1) / kSplit;              // per warp, the same for all
    const i64 row_bytes = static_cast<i64>(n_blocks) * Block::kBytes;
    const float implicit_zero = kWeightBits == 4 ? static_cast<float>(kInt4SymmetricZero) : 0.0f;
    __shared__ float partial[kMatvecWarps][kRows * kMaxM];

    // kItems: this CTA's item moves every base pointer to its expert, activations
    // and outputs (a separate instance: the moved pointers cost registers that the
    // plain layer's kernel-parameter pointers do not)
    bool dropped = false;
    i64 out_base = 0;
    if constexpr (kItems) {
        const MoeItem it = moe_item(item_experts, n_experts, act_item_div, m_tokens, n_rows);
        dropped = it.dropped;
        out_base = it.out_base;
        it.move_to_expert<kHasZeros>(qweight, scales, zeros, n_rows, row_bytes, n_groups);
        act += it.act_row * n_blocks;
    }
    int slot_expert = 0;        // lane j: slot j's expert (0 when left out) ...
    float slot_weight = 0.0f;   // ... its weight ...
    bool slot_used = false;     // ... and whether its id is in [0, E)
    if constexpr (kTokenSums) {
        const i64 first = static_cast<i64>(blockIdx.y) * act_item_div;
        if (lane < act_item_div) {
            const int e = item_experts[first + lane];
            slot_used = e >= 0 && e < n_experts;
            slot_expert = slot_used ? e : 0;
            slot_weight = item_weights[first + lane];
        }
        out_base = static_cast<i64>(blockIdx.y) * n_rows;
        act += first * n_blocks;
    }
    // Where virtual K block v lies: the weight block within the expert's row, the
    // expert's first row, and the factor on the activations (kTokenSum; block v
    // itself and 1 otherwise). Every lane of the warp calls it (shuffles).
    struct SlotBlock {
        int block;
        i64 expert_row0;
        float act_weight;
        bool used;
    };
    auto slot_block = [&](int v) {
        if constexpr (kTokenSums) {
            const int j = min(v / n_blocks, act_item_div - 1);
            const int e = __shfl_sync(0xffffffffu, slot_expert, j);
            const float w = __shfl_sync(0xffffffffu, slot_weight, j);
            const bool used = __shfl_sync(0xffffffffu, static_cast<int>(slot_used), j) != 0;
            return SlotBlock{v - j * n_blocks, static_cast<i64>(e) * n_rows, w, used};
        } else {
            return SlotBlock{v, 0, 1.0f, true};
        }
    };

    // a task is (row-group set, step): the warp's row group in the set and the
    // first K block of the step for this lane
    auto group_of = [&](int set) { return set * kGroupsPerCta + warp / kSplit; };
    auto block_of = [&](int step, int u) { return (step * kSplit + part) * kStepBlocks + u * 32 + lane; };
    // row r of row group g, clamped so every load is in bounds (only real rows are stored)
    auto row_of = [&](int g, int r) { return min(g * kRows + r, n_rows - 1); };

    float acc[kRows][kMaxM];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.0f;

    // Q8 block v of every row of a row group and every token (sb: slot_block(v)), with
    // the rows' weight blocks w and their group's scales ws and zeros wz (as loaded)
    constexpr int kZeroSlots = kHasZeros ? kRows : 1;
    auto accumulate = [&](const Block (&w)[kRows], const ScaleT (&ws)[kRows], const ScaleT (&wz)[kZeroSlots],
                          int g, int v, const SlotBlock& sb) {
        float s[kRows], z[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            if constexpr (kScalesAhead) {
                s[r] = to_float(ws[r]);
                z[r] = kHasZeros ? to_float(wz[kHasZeros ? r : 0]) : implicit_zero;
            } else {
                const i64 at = (sb.expert_row0 + row_of(g, r)) * n_groups + (sb.block >> group_shift);
                s[r] = to_float(scales[at]);
                z[r] = kHasZeros ? to_float(zeros[at]) : implicit_zero;
            }
        }
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
            if (m >= m_tokens) break;
            const uint4* blk = reinterpret_cast<const uint4*>(act + static_cast<i64>(m) * n_blocks + v);
            const uint4 qe = blk[0], qo = blk[1], ds = blk[2];
            const u32 xe[4] = {qe.x, qe.y, qe.z, qe.w};
            const u32 xo[4] = {qo.x, qo.y, qo.z, qo.w};
            float d = __uint_as_float(ds.x), sum = __uint_as_float(ds.y);
            if constexpr (kTokenSums) {   // the slot's weight
                d *= sb.act_weight;
                sum *= sb.act_weight;
            }
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                i32 dot = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    dot = dp4a(w[r].even(j), xe[j], dot);
                    dot = dp4a(w[r].odd(j), xo[j], dot);
                }
                acc[r][m] += s[r] * (d * static_cast<float>(dot) - z[r] * sum);
            }
        }
    };

    // Row group g is done: reduce the warp's sums with shuffles, then (kSplit > 1)
    // across the warps that split its K through shared memory, in a fixed order.
    // Every warp of the CTA calls this at the same time (the barriers need it).
    auto finish_group = [&](int g) {
        float mine = 0.0f;   // lane r * kMaxM + m ends up holding (row r, token m)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) {
                float v = acc[r][m];
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
                if (lane == r * kMaxM + m) mine = v;
                acc[r][m] = 0.0f;
            }
        if constexpr (kSplit > 1) {
            if (lane < kRows * kMaxM) partial[warp][lane] = mine;
            __syncthreads();
            if (part == 0 && lane < kRows * kMaxM) {
                for (int p = 1; p < kSplit; ++p) mine += partial[warp + p][lane];
            }
            __syncthreads();   // partial[] is free for the next row group
        }
        if (part == 0 && lane < kRows * kMaxM && g < n_row_groups) {
            const int r = lane / kMaxM, m = lane % kMaxM;
            const int row = g * kRows + r;
            if (row < n_rows && m < m_tokens) {
                float v = mine;
                if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                store_from_float(out, out_base + static_cast<i64>(m) * n_rows + row, dropped ? 0.0f : v, out_kind);
            }
        }
    };

    // The grid is sized to the GPU (persistent CTAs): each CTA walks row-group
    // sets blockIdx.x, blockIdx.x + gridDim.x, ...; each warp steps through its
    // part of K, kUnroll blocks per lane per step, and loads the next step's
    // weights (of the same or the next row group) before this step's math, so
    // its loads stay in flight across row-group boundaries and the GPU ramps up
    // once per launch rather than once per row group.
    // A plain layer loads the scales (and zeros) of a step's blocks with its weights,
    // a step ahead, rather than in accumulate: there their L2 latency sat between
    // the step's weights arriving and its math, once per step (H200, one process:
    // 0-4% faster at M = 1, 2-8% at M = 2 and 4; benchmarks/results/
    // 2026-11-23-h200-session16/scale-prefetch/). The item modes load them in
    // accumulate: ahead, fused_moe's int8 decode path ran up to 7% slower (Qwen3-30B-A3B
    // T = 16; the same folder's bench-5d17962/ against session 15's bench-284512b/).
    Block cur[kUnroll][kRows], next[kUnroll][kRows];
    ScaleT cur_s[kUnroll][kRows], next_s[kUnroll][kRows];
    ScaleT cur_z[kUnroll][kZeroSlots], next_z[kUnroll][kZeroSlots];
    auto load_step = [&](Block (&w)[kUnroll][kRows], ScaleT (&ws)[kUnroll][kRows], ScaleT (&wz)[kUnroll][kZeroSlots],
                         int set, int step) {
        const int g = group_of(set);
        if (g >= n_row_groups) return;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int v = block_of(step, u);
            const SlotBlock sb = slot_block(v);
            if (v < k_blocks && sb.used) {
#pragma unroll
                for (int r = 0; r < kRows; ++r)
                    w[u][r].load(qweight + (sb.expert_row0 + row_of(g, r)) * row_bytes +
                                 static_cast<i64>(sb.block) * Block::kBytes);
                if constexpr (kScalesAhead) {
                    const int group = sb.block >> group_shift;
#pragma unroll
                    for (int r = 0; r < kRows; ++r) {
                        const i64 at = (sb.expert_row0 + row_of(g, r)) * n_groups + group;
                        ws[u][r] = scales[at];
                        if constexpr (kHasZeros) wz[u][r] = zeros[at];
                    }
                }
            }
        }
    };
    // Under a programmatic dependent launch (the op's quantizer just before), the
    // weights of the first step are in flight while that kernel finishes: they are
    // the op's constant input, while the activations and the output wait for it.
    pdl_launch_dependents();
    int set = blockIdx.x, step = 0;
    if (set >= n_sets) return;   // whole CTA
    load_step(cur, cur_s, cur_z, set, 0);
    pdl_wait();
    while (true) {
        int next_set = set, next_step = step + 1;
        if (next_step == my_steps) { next_set = set + gridDim.x; next_step = 0; }
        const bool more = next_set < n_sets;   // the same for every warp of the CTA
        if (more) load_step(next, next_s, next_z, next_set, next_step);
        const int g = group_of(set);
        if (g < n_row_groups) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int v = block_of(step, u);
                const SlotBlock sb = slot_block(v);
                if (v < k_blocks && sb.used) accumulate(cur[u], cur_s[u], cur_z[u], g, v, sb);
            }
        }
        if (next_step == 0) finish_group(g);
        if (!more) break;
        set = next_set;
        step = next_step;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                cur[u][r] = next[u][r];
                cur_s[u][r] = next_s[u][r];
                if constexpr (kHasZeros) cur_z[u][r] = next_z[u][r];
            }
    }
}

}  // namespace w4kern
