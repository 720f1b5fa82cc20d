// decode_attention: softmax(q k^T * scale) v for one query token per sequence,
// with GQA, over a contiguous [B, Hkv, L_max, D] or paged [pages, page_size,
// Hkv, D] KV cache (flash-decoding).
//
// A CTA owns one (split of the sequence, KV head, tile of up to kHeads query
// heads of that KV head, sequence): every K and V row it loads serves all the
// query heads of the tile (GQA packing). It walks its tokens in tiles of
// kTokensPerIter rows of K and V, brought into shared memory by a kAttnStages
// deep cp.async pipeline (every thread copies a few 16-byte pieces; a whole
// tile is in flight at once, and the next ones while this one is used). Its
// lanes form groups of kGroupLanes lanes, each lane holding 8 consecutive
// head-dim values, so a group covers one token row; each group takes
// kAttnTokens consecutive rows of a tile and keeps an online softmax per head:
// running max m, sum l and unnormalized output acc, in fp32, in the log2
// domain (q is pre-scaled by scale * log2 e).
// The groups' states merge through shared memory at the end. With one split
// the CTA writes the normalized output; with several it writes (acc, m, l)
// to a workspace and decode_attention_merge_kernel combines the splits.
//
// Lengths are clamped to [0, capacity] and page indices to [0, pages) on the
// device, so no kv_lens or block_table value can send a load out of bounds
// (values outside the contract give garbage, never a fault).
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnTokens = 4;     // consecutive tokens a lane group takes per tile
constexpr int kAttnStages = 3;     // K/V tiles in flight
constexpr int kAttnValues = 8;     // head-dim values per lane (16 bytes)
// -inf, the max of no scores (NVRTC has no INFINITY without the host headers)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xFF800000u); }

template <typename T>
__device__ __forceinline__ void load8(float (&f)[kAttnValues], const T* p) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = to_float(T{static_cast<u16>(w[j] & 0xFFFFu)});
        f[2 * j + 1] = to_float(T{static_cast<u16>(w[j] >> 16)});
    }
}

template <typename T>
__device__ __forceinline__ void lds8(float (&f)[kAttnValues], u32 address) {
    const uint4 v = lds_u32x4(address);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = to_float(T{static_cast<u16>(w[j] & 0xFFFFu)});
        f[2 * j + 1] = to_float(T{static_cast<u16>(w[j] >> 16)});
    }
}

template <int kDim>
struct AttnShape {
    static constexpr int kGroupLanes = kDim <= 64 ? 8 : kDim <= 128 ? 16 : 32;   // lanes per token row
    static constexpr int kGroupsPerWarp = 32 / kGroupLanes;
    static constexpr int kStates = kAttnWarps * kGroupsPerWarp;   // softmax states per CTA
    static constexpr int kTokensPerIter = kStates * kAttnTokens;  // K/V rows per tile
    static constexpr int kRowBytes = kDim * 2;
    static constexpr int kTileBytes = kTokensPerIter * kRowBytes;  // one of K or V
    static constexpr int kStageBytes = 2 * kTileBytes;
    static constexpr int kPiecesPerRow = kDim / 8;                 // 16-byte pieces
    static constexpr int kPiecesPerThread = kTokensPerIter * kPiecesPerRow / kAttnThreads;
    static_assert(kGroupLanes * kAttnValues >= kDim, "a lane group covers a row");
    static_assert(kTokensPerIter * kPiecesPerRow % kAttnThreads == 0, "a tile splits evenly over the threads");
    // dynamic shared memory of decode_attention_kernel: kAttnStages K/V tiles
    // (w4kern/_registry.py attention_smem_bytes mirrors it)
    static constexpr int kSmemBytes = kAttnStages * kStageBytes;
};

template <typename T, int kDim, int kHeads, bool kPaged>
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
    using Shape = AttnShape<kDim>;
    constexpr int kGroupLanes = Shape::kGroupLanes;
    constexpr int kStates = Shape::kStates;
    constexpr int kTokensPerIter = Shape::kTokensPerIter;
    constexpr int kPass = kHeads >= 4 ? 2 : kAttnTokens;
    __shared__ float sm_m[kStates][kHeads], sm_l[kStates][kHeads];
    static_assert(kStates * kHeads * kDim * 4 <= Shape::kSmemBytes, "the merge reuses the pipeline's memory");

    const int split = blockIdx.x, b = blockIdx.z;
    const int group = hq / hkv;
    const int head_tiles = (group + kHeads - 1) / kHeads;
    const int kvh = blockIdx.y / head_tiles, tile = blockIdx.y % head_tiles;
    const int h0 = kvh * group + tile * kHeads;
    const int n_heads = min(kHeads, group - tile * kHeads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % kGroupLanes;
    const int state = warp * Shape::kGroupsPerWarp + lane / kGroupLanes;
    const int d0 = sub * kAttnValues;
    const bool has_d = d0 < kDim;   // D = 96: the last 4 lanes of a 16-lane group idle

    const int length = min(max(kv_lens[b], 0), capacity);
    const int chunk = (length + splits - 1) / splits;
    const int begin = min(length, split * chunk), end = min(length, begin + chunk);

    float qv[kHeads][kAttnValues];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
        if (h < n_heads && has_d) {
            load8(qv[h], q + (static_cast<i64>(b) * hq + h0 + h) * kDim + d0);
#pragma unroll
            for (int e = 0; e < kAttnValues; ++e) qv[h][e] *= scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < kAttnValues; ++e) qv[h][e] = 0.0f;
        }
    }
    float m[kHeads], l[kHeads], acc[kHeads][kAttnValues];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
        m[h] = neg_inf();
        l[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < kAttnValues; ++e) acc[h][e] = 0.0f;
    }

    auto row_of = [&](const T* cache, int tok) -> const T* {
        if constexpr (kPaged) {
            const int page = min(max(block_table[static_cast<i64>(b) * max_pages + tok / rows], 0), n_pages - 1);
            return cache + ((static_cast<i64>(page) * rows + tok % rows) * hkv + kvh) * kDim;
        } else {
            return cache + ((static_cast<i64>(b) * hkv + kvh) * rows + tok) * kDim;
        }
    };

    extern __shared__ __align__(16) unsigned char attn_smem[];
    const u32 smem = smem_address(attn_smem);
    const int n_tiles = (end - begin + kTokensPerIter - 1) / kTokensPerIter;   // the same for the whole CTA
    // Issue tile `tile` into stage tile % kAttnStages; rows past `end` are zero-filled.
    auto issue_tile = [&](int tile) {
        if (tile < n_tiles) {
            const u32 stage = smem + (tile % kAttnStages) * Shape::kStageBytes;
#pragma unroll
            for (int i = 0; i < Shape::kPiecesPerThread; ++i) {
                const int piece = i * kAttnThreads + threadIdx.x;
                const int r = piece / Shape::kPiecesPerRow, c = piece % Shape::kPiecesPerRow;
                const int tok = begin + tile * kTokensPerIter + r;
                const bool in = tok < end;
                const T* k_src = in ? row_of(k_cache, tok) + c * 8 : k_cache;
                const T* v_src = in ? row_of(v_cache, tok) + c * 8 : v_cache;
                const u32 dst = stage + r * Shape::kRowBytes + c * 16;
                cp_async16(dst, k_src, in ? 16u : 0u);
                cp_async16(dst + Shape::kTileBytes, v_src, in ? 16u : 0u);
            }
        }
        cp_async_commit();   // an empty group past the last tile keeps the wait count uniform
    };
#pragma unroll
    for (int t = 0; t < kAttnStages - 1; ++t) issue_tile(t);

    for (int tile = 0; tile < n_tiles; ++tile) {
        cp_async_wait<kAttnStages - 2>();   // this thread's pieces of `tile` have landed
        __syncthreads();                     // everyone's have, and the stage read last round is free
        issue_tile(tile + kAttnStages - 1);
        const u32 stage = smem + (tile % kAttnStages) * Shape::kStageBytes;
        // the group's kAttnTokens rows, kPass at a time (4 or 8 heads leave registers for 2)
#pragma unroll
        for (int u0 = 0; u0 < kAttnTokens; u0 += kPass) {
            const int base = begin + tile * kTokensPerIter + state * kAttnTokens + u0;
            float kf[kPass][kAttnValues], vf[kPass][kAttnValues];
#pragma unroll
            for (int u = 0; u < kPass; ++u) {
                const u32 row = stage + (state * kAttnTokens + u0 + u) * Shape::kRowBytes + d0 * 2;
                if (has_d) {
                    lds8<T>(kf[u], row);
                    lds8<T>(vf[u], row + Shape::kTileBytes);
                } else {
#pragma unroll
                    for (int e = 0; e < kAttnValues; ++e) kf[u][e] = vf[u][e] = 0.0f;
                }
            }
            float s[kPass][kHeads];
#pragma unroll
            for (int u = 0; u < kPass; ++u)
#pragma unroll
                for (int h = 0; h < kHeads; ++h) {
                    float dot = 0.0f;
#pragma unroll
                    for (int e = 0; e < kAttnValues; ++e) dot = fmaf(qv[h][e], kf[u][e], dot);
#pragma unroll
                    for (int offset = kGroupLanes / 2; offset > 0; offset >>= 1)
                        dot += __shfl_xor_sync(0xFFFFFFFFu, dot, offset);
                    s[u][h] = base + u < end ? dot : neg_inf();
                }
#pragma unroll
            for (int h = 0; h < kHeads; ++h) {
                float m_new = m[h];
#pragma unroll
                for (int u = 0; u < kPass; ++u) m_new = fmaxf(m_new, s[u][h]);
                // a group that has seen no token yet keeps m = -inf, l = 0, acc = 0
                const float m_ref = m_new == neg_inf() ? 0.0f : m_new;
                const float alpha = exp2f(m[h] - m_ref);
                float p[kPass];
                float p_sum = 0.0f;
#pragma unroll
                for (int u = 0; u < kPass; ++u) {
                    p[u] = exp2f(s[u][h] - m_ref);
                    p_sum += p[u];
                }
                l[h] = l[h] * alpha + p_sum;
#pragma unroll
                for (int e = 0; e < kAttnValues; ++e) {
                    float a = acc[h][e] * alpha;
#pragma unroll
                    for (int u = 0; u < kPass; ++u) a = fmaf(p[u], vf[u][e], a);
                    acc[h][e] = a;
                }
                m[h] = m_new;
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();   // the pipeline's memory now holds the states' outputs

    // Merge the CTA's kStates softmax states.
    auto sm_acc = reinterpret_cast<float (*)[kHeads][kDim]>(attn_smem);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
        if (has_d)
#pragma unroll
            for (int e = 0; e < kAttnValues; ++e) sm_acc[state][h][d0 + e] = acc[h][e];
        if (sub == 0) {
            sm_m[state][h] = m[h];
            sm_l[state][h] = l[h];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n_heads * kDim; idx += kAttnThreads) {
        const int h = idx / kDim, d = idx % kDim;
        float m_max = neg_inf();
#pragma unroll
        for (int st = 0; st < kStates; ++st) m_max = fmaxf(m_max, sm_m[st][h]);
        float o = 0.0f, l_sum = 0.0f;
        if (m_max != neg_inf()) {
#pragma unroll
            for (int st = 0; st < kStates; ++st) {
                const float w = exp2f(sm_m[st][h] - m_max);
                o = fmaf(w, sm_acc[st][h][d], o);
                l_sum = fmaf(w, sm_l[st][h], l_sum);
            }
        }
        const i64 row = static_cast<i64>(b) * hq + h0 + h;
        if (splits == 1) {
            out[row * kDim + d] = from_float<T>(l_sum > 0.0f ? o / l_sum : 0.0f);
        } else {
            part_o[(row * splits + split) * kDim + d] = o;
            if (d == 0) {
                part_ml[(row * splits + split) * 2] = m_max;
                part_ml[(row * splits + split) * 2 + 1] = l_sum;
            }
        }
    }
}

// Combines the splits of one (sequence, query head) row: out = sum_s w_s o_s /
// sum_s w_s l_s with w_s = 2^(m_s - max m). A row no split saw a token of
// (length 0) gives zeros.
template <typename T, int kDim>
__global__ void __launch_bounds__(256) decode_attention_merge_kernel(
    const float* __restrict__ part_o, const float* __restrict__ part_ml, T* __restrict__ out, i32 splits)
{
    const i64 row = blockIdx.x;
    const int d = threadIdx.x;
    if (d >= kDim) return;
    const float* ml = part_ml + row * splits * 2;
    float m_max = neg_inf();
    for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, ml[2 * s]);
    float o = 0.0f, l_sum = 0.0f;
    if (m_max != neg_inf()) {
        for (int s = 0; s < splits; ++s) {
            const float w = exp2f(ml[2 * s] - m_max);
            o = fmaf(w, part_o[(row * splits + s) * kDim + d], o);
            l_sum = fmaf(w, ml[2 * s + 1], l_sum);
        }
    }
    out[row * kDim + d] = from_float<T>(l_sum > 0.0f ? o / l_sum : 0.0f);
}

}  // namespace w4kern
