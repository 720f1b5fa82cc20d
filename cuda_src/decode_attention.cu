// decode_attention: softmax(q k^T * scale) v for one query token per sequence,
// with GQA, over a contiguous [B, Hkv, L_max, D] or paged [pages, page_size,
// Hkv, D] KV cache (flash-decoding), on the tensor cores.
//
// A CTA owns one (split of the sequence, KV head, tile of up to 8 query heads
// of that KV head, sequence): every K and V row it loads serves all the query
// heads of the tile (GQA packing). The query heads are the 8-column operand of
// mma.m16n8k16 and the tokens its 16 rows, so one MMA serves 16 tokens of up
// to 8 heads without padding the heads to 16:
//   S^T [16 tokens x 8 heads] = K [16 x D] * Q^T [D x 8]       (D / 16 MMAs)
//   O^T [D x 8 heads]        += V^T [D x 16] * P^T [16 x 8]    (D / 16 MMAs)
// K comes from shared memory through ldmatrix, V through ldmatrix.trans; P^T
// is S^T's accumulator fragment, exponentiated, packed to 16 bits and
// transposed in registers (movmatrix), so the scores never touch memory.
//
// Each of the CTA's 4 warps walks its own 16-token chunks of the split (warp w
// takes chunks w, w + 4, ...) through its own kStages-deep ring in shared
// memory, so the main loop has no CTA barrier (kStages = 1 where a GPU offers
// too little shared memory for a ring: the other warps then hide the latency).
// On sm_90 the copy engine fills the ring: each lane issues one bulk copy of a
// K or V row, completing on the stage's mbarrier; measured 5-7% faster than
// cp.async at long contexts and large batches (benchmarks/results/
// 2026-11-22-h200-session9/), though the per-lane copies are issued one lane
// at a time. Before sm_90, cp.async with 16 bytes per lane.
// A warp keeps an online softmax per head, in fp32, in the log2 domain:
// running max m (the same in every lane), a per-lane partial sum l, and O^T.
// The warps' states merge through shared memory at the end. With one split
// the CTA writes the normalized output; with several it writes (acc, m, l) to
// a workspace and decode_attention_merge_kernel combines the splits.
//
// Shared rows are padded by 16 bytes, so the 8 rows of an ldmatrix matrix hit
// 8 different bank groups (a bulk copy cannot swizzle).
//
// Lengths are clamped to [0, capacity] and page indices to [0, pages) on the
// device, so no kv_lens or block_table value can send a load out of bounds
// (values outside the contract give garbage, never a fault).
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnHeads = 8;      // query heads per CTA: the MMA's 8 columns
constexpr int kAttnChunk = 16;     // tokens per warp step: the MMA's 16 rows
// Whether the copy engine fills the rings (sm_90); tests/test_gpu_attention.py
// sets it to 0 in a copy of this file to run the cp.async path on an sm_90 GPU.
#define W4KERN_ATTN_COPY_ENGINE (__CUDA_ARCH__ >= 900)
// -inf, the max of no scores (NVRTC has no INFINITY without the host headers)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xFF800000u); }

// Orders the shared-memory accesses of one warp's lanes. A named barrier of 32
// threads (ids 1..4, one per warp; 0 is __syncthreads'): sm_80's ptxas turns
// __syncwarp() in this loop into a helper call that costs a register spill.
__device__ __forceinline__ void warp_barrier(int warp) {
    asm volatile("bar.sync %0, 32;\n" :: "r"(warp + 1) : "memory");
}

template <int kDim, int kStages>
struct AttnShape {
    static_assert(kDim % 32 == 0, "a row is loaded as 4 lanes x 16 bytes at a time");
    static constexpr int kPieces = kDim / 8;     // 16-byte pieces of a row
    // shared rows padded by 16 bytes: 8 rows at the same piece hit 8 bank groups
    static constexpr int kRowBytes = kDim * 2 + 16;
    static constexpr int kTileBytes = kAttnChunk * kRowBytes;          // one of K or V
    static constexpr int kStageBytes = 2 * kTileBytes;
    static constexpr int kWarpBytes = kStages * kStageBytes;           // one warp's ring
    // dynamic shared memory of decode_attention_kernel (w4kern/_registry.py
    // attention_smem_bytes mirrors it)
    static constexpr int kSmemBytes = kAttnWarps * kWarpBytes;
    static constexpr int kSteps = kDim / 16;                           // MMAs per product
};

template <typename T, int kDim, bool kPaged, int kStages>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(
    const T* __restrict__ q,              // [B, Hq, D]
    const T* __restrict__ k_cache,        // [B, Hkv, L_max, D] or [pages, page_size, Hkv, D]
    const T* __restrict__ v_cache,        // same
    const i32* __restrict__ kv_lens,      // [B]
    const i32* __restrict__ block_table,  // [B, max_pages] (paged)
    T* __restrict__ out,                  // [B, Hq, D] (one split)
    float* __restrict__ part_o,           // [B, Hq, splits, D] (several splits)
    float* __restrict__ part_ml,          // [B, Hq, splits, 2]: m, l
    i32 hq, i32 hkv,
    i32 rows,                             // L_max (contiguous) or page_size (paged)
    i32 max_pages, i32 n_pages, i32 capacity, i32 splits, float scale_log2)
{
    using Shape = AttnShape<kDim, kStages>;
    constexpr int kSteps = Shape::kSteps;
    __shared__ float sm_m[kAttnWarps][kAttnHeads], sm_l[kAttnWarps][kAttnHeads];
    __shared__ __align__(8) u64 sm_bar[kAttnWarps][kStages];   // chunk arrivals (sm_90 copy engine)
    static_assert(kAttnWarps * kAttnHeads * kDim * 4 <= Shape::kSmemBytes, "the merge reuses the rings' memory");

    // the op's first kernel: nothing global is touched before the previous grid is
    // done; then the merge's CTAs may start (they wait for this grid)
    pdl_first_kernel_start();
    const int split = blockIdx.x, b = blockIdx.z;
    const int group = hq / hkv;
    const int head_tiles = (group + kAttnHeads - 1) / kAttnHeads;
    const int kvh = blockIdx.y / head_tiles, tile = blockIdx.y % head_tiles;
    const int h0 = kvh * group + tile * kAttnHeads;
    const int n_heads = min(kAttnHeads, group - tile * kAttnHeads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;   // the MMA fragments' row group and column pair

    // The split's tokens, in whole 16-token chunks but the last.
    const int length = min(max(kv_lens[b], 0), capacity);
    const int per_split = ((length + splits - 1) / splits + kAttnChunk - 1) / kAttnChunk * kAttnChunk;
    const int begin = min(length, split * per_split), end = min(length, begin + per_split);
    const int n_chunks = (end - begin + kAttnChunk - 1) / kAttnChunk;
    const int my_chunks = n_chunks > warp ? (n_chunks - warp + kAttnWarps - 1) / kAttnWarps : 0;

    auto row_of = [&](const T* cache, int tok) -> const T* {
        if constexpr (kPaged) {
            const int page = min(max(block_table[static_cast<i64>(b) * max_pages + tok / rows], 0), n_pages - 1);
            return cache + ((static_cast<i64>(page) * rows + tok % rows) * hkv + kvh) * kDim;
        } else {
            return cache + ((static_cast<i64>(b) * hkv + kvh) * rows + tok) * kDim;
        }
    };

    extern __shared__ __align__(16) unsigned char attn_smem[];
    const u32 ring = smem_address(attn_smem) + warp * Shape::kWarpBytes;
    const u32 bars = smem_address(&sm_bar[warp][0]);
#if W4KERN_ATTN_COPY_ENGINE
    // Issue the warp's chunk j into stage j % kStages on the copy engine: lane l
    // copies row l % 16 of K (l < 16) or V (l >= 16), one bulk copy of a row.
    // Rows past `end` copy row end - 1 instead (real data, masked by its score),
    // so every chunk brings the same byte count and no row needs zeroing.
    if (lane == 0) {
#pragma unroll
        for (int st = 0; st < kStages; ++st) mbarrier_init(bars + 8 * st, 1);
        fence_mbarrier_init();
    }
    warp_barrier(warp);
    auto issue_chunk = [&](int j) {
        if (j < my_chunks) {
            const u32 stage = ring + (j % kStages) * Shape::kStageBytes;
            const u32 bar = bars + 8 * (j % kStages);
            const int tok0 = begin + (j * kAttnWarps + warp) * kAttnChunk;
            if (lane == 0) mbarrier_arrive_expect_tx(bar, 2 * kAttnChunk * kDim * 2);
            const int r = lane & 15;
            const T* row = row_of(lane < 16 ? k_cache : v_cache, min(tok0 + r, end - 1));
            bulk_copy_to_shared(stage + (lane >> 4) * Shape::kTileBytes + r * Shape::kRowBytes, row, kDim * 2, bar);
        }
    };
    auto wait_chunk = [&](int j) { mbarrier_wait_parity(bars + 8 * (j % kStages), (j / kStages) & 1); };
#else
    // Issue the warp's chunk j into stage j % kStages: lane (g, c) copies rows
    // g and g + 8, pieces c, c + 4, ... (4 lanes cover 64 contiguous bytes of a
    // row, whole sectors); rows past `end` are zero-filled.
    (void)bars;
    auto issue_chunk = [&](int j) {
        if (j < my_chunks) {
            const u32 stage = ring + (j % kStages) * Shape::kStageBytes;
            const int tok0 = begin + (j * kAttnWarps + warp) * kAttnChunk;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = g + 8 * half;
                const int tok = tok0 + r;
                const bool in = tok < end;
                const T* k_row = in ? row_of(k_cache, tok) : k_cache;
                const T* v_row = in ? row_of(v_cache, tok) : v_cache;
#pragma unroll
                for (int p = c; p < Shape::kPieces; p += 4) {
                    const u32 dst = stage + r * Shape::kRowBytes + (p << 4);
                    cp_async16(dst, in ? k_row + p * 8 : k_cache, in ? 16u : 0u);
                    cp_async16(dst + Shape::kTileBytes, in ? v_row + p * 8 : v_cache, in ? 16u : 0u);
                }
            }
        }
        cp_async_commit();   // an empty group past the last chunk keeps the wait count uniform
    };
    // chunk j (issued kStages - 1 chunks ago, or just now with no ring) has landed
    auto wait_chunk = [&](int) {
        if constexpr (kStages == 1) cp_async_wait<0>();
        else cp_async_wait<kStages - 2>();
    };
#endif
#pragma unroll
    for (int j = 0; j < kStages - 1; ++j) issue_chunk(j);

    // Q^T as the B operand: column g is query head h0 + g, rows 2c, 2c + 1 (b0)
    // and 2c + 8, 2c + 9 (b1) of each 16-value step of D.
    u32 qb[kSteps][2];
    {
        const bool has = g < n_heads;
        const u32* qrow = reinterpret_cast<const u32*>(q + (static_cast<i64>(b) * hq + h0 + (has ? g : 0)) * kDim);
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            qb[s][0] = has ? qrow[8 * s + c] : 0u;
            qb[s][1] = has ? qrow[8 * s + 4 + c] : 0u;
        }
    }

    // Lane offsets of the ldmatrix rows. K (A = 16 tokens x 16 values): matrices
    // (rows 0-7, piece 2s), (rows 8-15, 2s), (rows 0-7, 2s+1), (rows 8-15, 2s+1).
    // V^T (A = 16 values x 16 tokens, transposed loads): matrices (tokens 0-7,
    // piece 2i), (0-7, 2i+1), (8-15, 2i), (8-15, 2i+1). In both, lane l's row
    // has row % 8 == l % 8.
    const int x = lane & 7;
    const u32 k_lane = (x + 8 * ((lane >> 3) & 1)) * Shape::kRowBytes;
    const int k_piece = lane >> 4;
    const u32 v_lane = (x + 8 * (lane >> 4)) * Shape::kRowBytes + Shape::kTileBytes;
    const int v_piece = (lane >> 3) & 1;

    // Online softmax state: head 2c + e's running max m[e] (uniform over the
    // lanes of a column pair), this lane's part of its sum l[e], and O^T rows
    // 16 i + g (o[i][0..1]) and 16 i + g + 8 (o[i][2..3]), columns 2c, 2c + 1.
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    float o[kSteps][4];
#pragma unroll
    for (int i = 0; i < kSteps; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    for (int j = 0; j < my_chunks; ++j) {
        if constexpr (kStages == 1) {   // no ring: chunk j is fetched when chunk j - 1 is done
            warp_barrier(warp);
            issue_chunk(j);
            wait_chunk(j);
            warp_barrier(warp);
        } else {
            wait_chunk(j);        // chunk j has landed (cp.async: this lane's pieces of it)
            warp_barrier(warp);   // every lane's have, and chunk j - 1's stage is read
            issue_chunk(j + kStages - 1);
        }
        const u32 stage = ring + (j % kStages) * Shape::kStageBytes;
        const int tok0 = begin + (j * kAttnWarps + warp) * kAttnChunk;

        // S^T = K Q^T, two accumulators to halve the MMA dependency chain
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int st = 0; st < kSteps; ++st) {
            u32 a[4];
            ldmatrix_x4(a, stage + k_lane + ((2 * st + k_piece) << 4));
            if (st % 2 == 0) mma_m16n8k16<T>(s, a, qb[st][0], qb[st][1]);
            else mma_m16n8k16<T>(s2, a, qb[st][0], qb[st][1]);
        }
        // s[0..1]: token tok0 + g, heads 2c, 2c + 1; s[2..3]: token tok0 + g + 8
        const bool in0 = tok0 + g < end, in1 = tok0 + g + 8 < end;
        s[0] = in0 ? (s[0] + s2[0]) * scale_log2 : neg_inf();
        s[1] = in0 ? (s[1] + s2[1]) * scale_log2 : neg_inf();
        s[2] = in1 ? (s[2] + s2[2]) * scale_log2 : neg_inf();
        s[3] = in1 ? (s[3] + s2[3]) * scale_log2 : neg_inf();

        float mx[2] = {fmaxf(s[0], s[2]), fmaxf(s[1], s[3])};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
            for (int offset = 4; offset < 32; offset <<= 1) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xFFFFFFFFu, mx[e], offset));
        }
        float m_ref[2], alpha[2];
        bool grew = false;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float m_new = fmaxf(m[e], mx[e]);
            grew |= m_new != m[e];
            // a head that has seen no token yet keeps m = -inf, l = 0, o = 0
            m_ref[e] = m_new == neg_inf() ? 0.0f : m_new;
            alpha[e] = exp2f(m[e] - m_ref[e]);
            m[e] = m_new;
        }
        const float p0 = exp2f(s[0] - m_ref[0]), p1 = exp2f(s[1] - m_ref[1]);
        const float p2 = exp2f(s[2] - m_ref[0]), p3 = exp2f(s[3] - m_ref[1]);
        l[0] = l[0] * alpha[0] + (p0 + p2);
        l[1] = l[1] * alpha[1] + (p1 + p3);
        // most chunks leave every max where it was: skip the rescale then
        if (__any_sync(0xFFFFFFFFu, grew)) {
#pragma unroll
            for (int i = 0; i < kSteps; ++i) {
                o[i][0] *= alpha[0];
                o[i][1] *= alpha[1];
                o[i][2] *= alpha[0];
                o[i][3] *= alpha[1];
            }
        }
        // P^T as the B operand: rows (tokens) 2c, 2c + 1 and 2c + 8, 2c + 9 of column (head) g
        const u32 pb0 = movmatrix_trans(pack2<T>(p0, p1));
        const u32 pb1 = movmatrix_trans(pack2<T>(p2, p3));
#pragma unroll
        for (int i = 0; i < kSteps; ++i) {
            u32 a[4];
            ldmatrix_x4_trans(a, stage + v_lane + ((2 * i + v_piece) << 4));
            mma_m16n8k16<T>(o[i], a, pb0, pb1);
        }
    }
#if !W4KERN_ATTN_COPY_ENGINE
    cp_async_wait<0>();
#endif
    __syncthreads();   // every ring is drained: its memory now holds the warps' outputs

    // Merge the CTA's 4 warp states: first each warp's lanes' sums, then across warps.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int offset = 4; offset < 32; offset <<= 1) l[e] += __shfl_xor_sync(0xFFFFFFFFu, l[e], offset);
    }
    auto sm_acc = reinterpret_cast<float (*)[kAttnHeads][kDim]>(attn_smem);
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
        sm_acc[warp][2 * c][16 * i + g] = o[i][0];
        sm_acc[warp][2 * c + 1][16 * i + g] = o[i][1];
        sm_acc[warp][2 * c][16 * i + g + 8] = o[i][2];
        sm_acc[warp][2 * c + 1][16 * i + g + 8] = o[i][3];
    }
    if (g == 0) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            sm_m[warp][2 * c + e] = m[e];
            sm_l[warp][2 * c + e] = l[e];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n_heads * kDim; idx += kAttnThreads) {
        const int h = idx / kDim, d = idx % kDim;
        float m_max = neg_inf();
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w) m_max = fmaxf(m_max, sm_m[w][h]);
        float acc = 0.0f, l_sum = 0.0f;
        if (m_max != neg_inf()) {
#pragma unroll
            for (int w = 0; w < kAttnWarps; ++w) {
                const float wt = exp2f(sm_m[w][h] - m_max);
                acc = fmaf(wt, sm_acc[w][h][d], acc);
                l_sum = fmaf(wt, sm_l[w][h], l_sum);
            }
        }
        const i64 row = static_cast<i64>(b) * hq + h0 + h;
        if (splits == 1) {
            out[row * kDim + d] = from_float<T>(l_sum > 0.0f ? __fdividef(acc, l_sum) : 0.0f);
        } else {
            part_o[(row * splits + split) * kDim + d] = acc;
            if (d == 0) {
                part_ml[(row * splits + split) * 2] = m_max;
                part_ml[(row * splits + split) * 2 + 1] = l_sum;
            }
        }
    }
}

// Combines the splits of one (sequence, query head) row: out = sum_s w_s o_s /
// sum_s w_s l_s with w_s = 2^(m_s - max m). A row no split saw a token of
// (length 0) gives zeros. Its time is a chain of dependent loads (ncu: 3.3-4.2
// us for 32 rows before this layout), so the o_s are summed by
// kMergeThreads / kDim thread groups, each over every kGroups-th split, and a
// thread's first kMergePrefetch partials are loaded before the (m, l) of every
// split (one per thread) are reduced to the weights: both loads are in flight
// at once, and the weights only scale what has arrived.
constexpr int kMergeThreads = 512;   // at least the most splits (w4kern.attention.MAX_SPLITS)
constexpr int kMergePrefetch = 16;   // partials a thread loads before the weights exist

template <typename T, int kDim>
__global__ void __launch_bounds__(kMergeThreads) decode_attention_merge_kernel(
    const float* __restrict__ part_o, const float* __restrict__ part_ml, T* __restrict__ out, i32 splits)
{
    constexpr int kGroups = kMergeThreads / kDim;
    constexpr int kWarps = kMergeThreads / 32;
    __shared__ float sm_w[kMergeThreads], sm_red[2][kWarps], sm_part[kGroups][kDim];
    pdl_wait();   // a programmatic dependent launch after the split kernel: its partials
    pdl_launch_dependents();   // the next op's first kernel may start (it waits for this grid)
    const i64 row = blockIdx.x;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int group = t / kDim, d = t % kDim;
    const bool summing = group < kGroups;
    const float* o = part_o + row * splits * kDim + d;

    float pre[kMergePrefetch];
#pragma unroll
    for (int u = 0; u < kMergePrefetch; ++u) {
        const int s = group + u * kGroups;
        pre[u] = summing && s < splits ? o[static_cast<i64>(s) * kDim] : 0.0f;
    }

    float m = neg_inf(), l = 0.0f;
    if (t < splits) {
        const float2 ml = reinterpret_cast<const float2*>(part_ml)[row * splits + t];
        m = ml.x;
        l = ml.y;
    }
    float m_max = m;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) m_max = fmaxf(m_max, __shfl_xor_sync(0xFFFFFFFFu, m_max, offset));
    if (lane == 0) sm_red[0][warp] = m_max;
    __syncthreads();
    m_max = sm_red[0][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m_max = fmaxf(m_max, sm_red[0][w]);
    const float wt = t < splits && m_max != neg_inf() ? exp2f(m - m_max) : 0.0f;
    sm_w[t] = wt;
    float l_sum = wt * l;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) l_sum += __shfl_xor_sync(0xFFFFFFFFu, l_sum, offset);
    if (lane == 0) sm_red[1][warp] = l_sum;
    __syncthreads();

    if (summing) {
        float acc = 0.0f;
#pragma unroll
        for (int u = 0; u < kMergePrefetch; ++u) {
            const int s = group + u * kGroups;
            if (s < splits) acc = fmaf(sm_w[s], pre[u], acc);
        }
#pragma unroll 8
        for (int s = group + kMergePrefetch * kGroups; s < splits; s += kGroups)
            acc = fmaf(sm_w[s], o[static_cast<i64>(s) * kDim], acc);
        sm_part[group][d] = acc;
    }
    __syncthreads();
    if (t < kDim) {
        float acc = 0.0f, total = 0.0f;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) acc += sm_part[g][t];
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += sm_red[1][w];
        out[row * kDim + t] = from_float<T>(total > 0.0f ? acc / total : 0.0f);
    }
}

}  // namespace w4kern
