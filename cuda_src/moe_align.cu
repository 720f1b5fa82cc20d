// moe_align: group the flat (token, slot) indices i = t * k + j of topk_ids by
// expert, each expert's run padded to a multiple of block_size (DESIGN.md,
// "MoE routing and alignment"), bit-identical to reference.moe_align_block_size:
// experts in ascending (local) id order, indices ascending within an expert,
// the sentinel T * k in padding and in the unused tail, expert id -1 for unused
// blocks.
//
// Three launches, each using the whole GPU at large T:
//   1. moe_count_kernel: warp c counts the experts of chunk c (kChunk
//      consecutive indices) into row c of a [chunks, E] matrix.
//   2. moe_offsets_kernel (one CTA): per expert, a prefix over the chunks (so
//      chunk c's entries of expert e start after those of chunks < c, which
//      keeps indices ascending), the padded run lengths, their scan over the
//      experts, expert_ids, the padding and the tail; the matrix now holds
//      where chunk c's first entry of expert e goes.
//   3. moe_scatter_kernel: warp c walks its chunk again, 32 indices a step;
//      __match_any_sync finds the lanes of one expert, a lane's rank among
//      them (lower lanes = lower indices) places it, and their leader advances
//      the expert's position by their count.
// Expert ids outside [0, E) and experts that expert_map sends to -1 (or past
// E) are dropped, so no input can make a kernel write out of bounds.
#include "common/types.cuh"

namespace w4kern {

constexpr int kMoeWarpsPerCta = 4;

// The local expert of flat index i, or -1 when it is dropped.
__device__ __forceinline__ int moe_local_expert(const i32* ids, const i32* expert_map, int i, int n_experts) {
    int e = ids[i];
    if (e < 0 || e >= n_experts) return -1;
    if (expert_map != nullptr) e = expert_map[e];
    return e >= 0 && e < n_experts ? e : -1;
}

// kChunk: indices per warp (per row of the count matrix)
template <int kChunk>
__global__ void __launch_bounds__(32 * kMoeWarpsPerCta) moe_count_kernel(
    const i32* __restrict__ topk_ids,     // [T * k]
    const i32* __restrict__ expert_map,   // [E] or null
    i32* __restrict__ counts,             // [chunks, E]
    i32 n, i32 n_experts, i32 n_chunks)
{
    const int lane = threadIdx.x & 31;
    const int chunk = blockIdx.x * kMoeWarpsPerCta + (threadIdx.x >> 5);
    if (chunk >= n_chunks) return;   // whole warp
    i32* row = counts + static_cast<i64>(chunk) * n_experts;
    for (int e = lane; e < n_experts; e += 32) row[e] = 0;
    __syncwarp();
    const int begin = chunk * kChunk, end = min(n, begin + kChunk);
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const int e = i < end ? moe_local_expert(topk_ids, expert_map, i, n_experts) : -1;
        const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
        if (e >= 0 && lane == __ffs(peers) - 1) row[e] += __popc(peers);
        __syncwarp();   // the next step's leader reads what this one wrote
    }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) moe_offsets_kernel(
    i32* __restrict__ counts,              // [chunks, E]: counts in, start positions out
    i32* __restrict__ sorted_token_ids,    // [max_padded]
    i32* __restrict__ expert_ids,          // [max_padded / block_size]
    i32* __restrict__ num_tokens_post_padded,   // [1]
    i32 n_chunks, i32 n_experts, i32 block_size, i32 max_padded, i32 sentinel)
{
    // chunks per batch of independent loads: the column walk over the chunks is a
    // chain of L2 round trips otherwise
    constexpr int kBatch = 8;
    constexpr int kWarps = kThreads / 32;
    __shared__ i32 scan[kThreads];
    __shared__ i32 run_start[kThreads], run_used[kThreads];   // this round's experts
    __shared__ i32 carry;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    // experts in rounds of kThreads, each round's padded lengths scanned
    for (int round = 0; round < n_experts; round += kThreads) {
        const int e = round + static_cast<int>(threadIdx.x);
        i32 total = 0;
        if (e < n_experts)
            for (int c0 = 0; c0 < n_chunks; c0 += kBatch) {   // exclusive prefix over the chunks
                i32 v[kBatch];
#pragma unroll
                for (int u = 0; u < kBatch; ++u)
                    v[u] = c0 + u < n_chunks ? counts[static_cast<i64>(c0 + u) * n_experts + e] : 0;
#pragma unroll
                for (int u = 0; u < kBatch; ++u)
                    if (c0 + u < n_chunks) {
                        counts[static_cast<i64>(c0 + u) * n_experts + e] = total;
                        total += v[u];
                    }
            }
        const i32 padded = (total + block_size - 1) / block_size * block_size;
        scan[threadIdx.x] = padded;
        __syncthreads();
        for (int offset = 1; offset < kThreads; offset <<= 1) {   // inclusive scan
            const i32 v = threadIdx.x >= static_cast<unsigned>(offset) ? scan[threadIdx.x - offset] : 0;
            __syncthreads();
            scan[threadIdx.x] += v;
            __syncthreads();
        }
        const i32 start = carry + scan[threadIdx.x] - padded;
        run_start[threadIdx.x] = start;
        run_used[threadIdx.x] = total;
        if (e < n_experts)
            for (int c0 = 0; c0 < n_chunks; c0 += kBatch) {   // prefix -> absolute position
                i32 v[kBatch];
#pragma unroll
                for (int u = 0; u < kBatch; ++u)
                    v[u] = c0 + u < n_chunks ? counts[static_cast<i64>(c0 + u) * n_experts + e] : 0;
#pragma unroll
                for (int u = 0; u < kBatch; ++u)
                    if (c0 + u < n_chunks) counts[static_cast<i64>(c0 + u) * n_experts + e] = v[u] + start;
            }
        __syncthreads();   // everyone has read carry and scan[]; run_* are complete
        // each warp writes whole experts' padding and block ids, lanes on consecutive entries
        for (int r = warp; r < kThreads && round + r < n_experts; r += kWarps) {
            const i32 s = run_start[r], used = run_used[r];
            const i32 end = s + (used + block_size - 1) / block_size * block_size;
            for (int p = s + used + lane; p < end; p += 32) sorted_token_ids[p] = sentinel;
            for (int b = s / block_size + lane; b < end / block_size; b += 32) expert_ids[b] = round + r;
        }
        if (threadIdx.x == kThreads - 1) carry += scan[threadIdx.x];
        __syncthreads();   // carry is final and run_* free for the next round
    }
    const i32 used = carry;
    if (threadIdx.x == 0) num_tokens_post_padded[0] = used;
    for (int p = used + static_cast<int>(threadIdx.x); p < max_padded; p += kThreads)
        sorted_token_ids[p] = sentinel;
    for (int b = used / block_size + static_cast<int>(threadIdx.x); b < max_padded / block_size;
         b += kThreads)
        expert_ids[b] = -1;
}

template <int kChunk>
__global__ void __launch_bounds__(32 * kMoeWarpsPerCta) moe_scatter_kernel(
    const i32* __restrict__ topk_ids,
    const i32* __restrict__ expert_map,
    i32* __restrict__ positions,           // [chunks, E]: where chunk c's next entry of expert e goes
    i32* __restrict__ sorted_token_ids,
    i32 n, i32 n_experts, i32 n_chunks)
{
    const int lane = threadIdx.x & 31;
    const int chunk = blockIdx.x * kMoeWarpsPerCta + (threadIdx.x >> 5);
    if (chunk >= n_chunks) return;
    i32* row = positions + static_cast<i64>(chunk) * n_experts;
    const unsigned lower_lanes = (1u << lane) - 1u;
    const int begin = chunk * kChunk, end = min(n, begin + kChunk);
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const int e = i < end ? moe_local_expert(topk_ids, expert_map, i, n_experts) : -1;
        const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
        const int at = e >= 0 ? row[e] : 0;    // every peer reads the same position
        __syncwarp();
        if (e >= 0) {
            sorted_token_ids[at + __popc(peers & lower_lanes)] = i;
            if (lane == __ffs(peers) - 1) row[e] = at + __popc(peers);
        }
        __syncwarp();
    }
}

}  // namespace w4kern
