// moe_align: group the flat (token, slot) indices i = t * k + j of topk_ids by
// expert, each expert's run padded to a multiple of block_size (DESIGN.md,
// "MoE routing and alignment"), bit-identical to reference.moe_align_block_size:
// experts in ascending (local) id order, indices ascending within an expert,
// the sentinel T * k in padding and in the unused tail, expert id -1 for unused
// blocks.
//
// Three launches. The flat indices are cut into at most 32 chunks (of at least
// 256 indices; the host picks the chunk length), one warp each, so that every
// expert's per-chunk counts fit one warp-wide load and scan:
//   1. moe_count_kernel: warp c counts the experts of chunk c in a shared-memory
//      row and writes it to column c of an [E, chunks] matrix.
//   2. moe_offsets_kernel (one CTA): per expert, one warp scans its row of the
//      matrix (an exclusive prefix over the chunks keeps indices ascending); the
//      CTA scans the padded run lengths over the experts, then writes where each
//      chunk's first entry of each expert goes, the padding, expert_ids and the
//      tail.
//   3. moe_scatter_kernel: warp c loads column c into a shared-memory row and
//      walks its chunk again, 32 indices a step; __match_any_sync finds the lanes
//      of one expert, a lane's rank among them (lower lanes = lower indices)
//      places it, and their leader advances the expert's position by their count.
// The per-step read-modify-writes stay in shared memory: in global memory each
// would be a round trip on the warp's critical path.
// Expert ids outside [0, E) and experts that expert_map sends to -1 (or past
// E) are dropped, so no input can make a kernel write out of bounds.
#include "common/types.cuh"

namespace w4kern {

constexpr int kMoeMaxChunks = 32;   // one chunk per lane of a warp (host: MOE_ALIGN_MAX_CHUNKS)
constexpr int kMoeSteps = 16;       // 32-index steps whose ids a warp loads at once

// The local experts of flat indices i, i + 32, ..., i + 32 (kMoeSteps - 1): -1 past
// end and for a dropped id (outside [0, E), or sent outside [0, E) by expert_map).
// Independent loads, so a warp waits for memory once per kMoeSteps steps.
__device__ __forceinline__ void moe_load_steps(int (&ev)[kMoeSteps], const i32* ids, const i32* expert_map, int i,
                                               int end, int n_experts) {
#pragma unroll
    for (int u = 0; u < kMoeSteps; ++u) ev[u] = i + 32 * u < end ? ids[i + 32 * u] : -1;
#pragma unroll
    for (int u = 0; u < kMoeSteps; ++u) {
        int e = ev[u];
        if (e < 0 || e >= n_experts) { ev[u] = -1; continue; }
        if (expert_map != nullptr) e = expert_map[e];
        ev[u] = e >= 0 && e < n_experts ? e : -1;
    }
}

// Dynamic shared memory: kWarps rows of n_experts counters.
template <int kWarps>
__global__ void __launch_bounds__(32 * kWarps) moe_count_kernel(
    const i32* __restrict__ topk_ids,     // [T * k]
    const i32* __restrict__ expert_map,   // [E] or null
    i32* __restrict__ counts,             // [E, chunks]
    i32 n, i32 n_experts, i32 n_chunks, i32 chunk_len)
{
    extern __shared__ i32 moe_rows[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.x * kWarps + warp;
    if (chunk >= n_chunks) return;   // whole warp; no CTA-wide barrier follows
    i32* row = moe_rows + warp * n_experts;
    for (int e = lane; e < n_experts; e += 32) row[e] = 0;
    __syncwarp();
    const int begin = chunk * chunk_len, end = min(n, begin + chunk_len);
    for (int base = begin; base < end; base += 32 * kMoeSteps) {
        int ev[kMoeSteps];
        moe_load_steps(ev, topk_ids, expert_map, base + lane, end, n_experts);
#pragma unroll
        for (int u = 0; u < kMoeSteps; ++u) {
            const int e = ev[u];
            const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
            if (e >= 0 && lane == __ffs(peers) - 1) row[e] += __popc(peers);
            __syncwarp();   // the next step's leader reads what this one wrote
        }
    }
    for (int e = lane; e < n_experts; e += 32) counts[static_cast<i64>(e) * n_chunks + chunk] = row[e];
}

// Exclusive prefix of v over the lanes, and the warp's total.
__device__ __forceinline__ i32 warp_exclusive_scan(i32 v, int lane, i32& total) {
    i32 incl = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const i32 up = __shfl_up_sync(0xFFFFFFFFu, incl, offset);
        if (lane >= offset) incl += up;
    }
    total = __shfl_sync(0xFFFFFFFFu, incl, 31);
    return incl - v;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) moe_offsets_kernel(
    i32* __restrict__ counts,              // [E, chunks]: counts in, start positions out
    i32* __restrict__ sorted_token_ids,    // [max_padded]
    i32* __restrict__ expert_ids,          // [max_padded / block_size]
    i32* __restrict__ num_tokens_post_padded,   // [1]
    i32 n_chunks, i32 n_experts, i32 block_size, i32 max_padded, i32 sentinel)
{
    constexpr int kWarps = kThreads / 32;
    constexpr int kPerWarp = kThreads / kWarps;   // experts of a round per warp: r = warp + kWarps * q
    constexpr int kBatch = 8;                     // of them loaded at once (independent loads)
    static_assert(kPerWarp % kBatch == 0, "whole batches");
    __shared__ i32 scan[kThreads];                // blocks of this round's experts, scanned
    __shared__ i32 run_used[kThreads], run_blocks[kThreads], run_first[kThreads];
    __shared__ i32 carry;                         // blocks of the earlier rounds' experts
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    // experts in rounds of kThreads; lane c of expert r's warp holds its count of chunk c
    for (int round = 0; round < n_experts; round += kThreads) {
        const int round_experts = min(kThreads, n_experts - round);
        run_used[threadIdx.x] = 0;   // experts past n_experts stay empty
        __syncthreads();
        i32 before[kPerWarp];        // exclusive prefix over the chunks, kept for the last phase
#pragma unroll
        for (int q0 = 0; q0 < kPerWarp; q0 += kBatch) {
            i32 v[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int r = warp + kWarps * (q0 + u);
                v[u] = r < round_experts && lane < n_chunks
                       ? counts[static_cast<i64>(round + r) * n_chunks + lane] : 0;
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int r = warp + kWarps * (q0 + u);
                i32 total = 0;
                before[q0 + u] = r < round_experts ? warp_exclusive_scan(v[u], lane, total) : 0;
                if (lane == 0 && r < round_experts) run_used[r] = total;
            }
        }
        __syncthreads();
        // padded run lengths in blocks (the one division per expert), scanned over the round
        const i32 blocks = (run_used[threadIdx.x] + block_size - 1) / block_size;
        run_blocks[threadIdx.x] = blocks;
        scan[threadIdx.x] = blocks;
        __syncthreads();
        for (int offset = 1; offset < kThreads; offset <<= 1) {   // inclusive scan
            const i32 v = threadIdx.x >= static_cast<unsigned>(offset) ? scan[threadIdx.x - offset] : 0;
            __syncthreads();
            scan[threadIdx.x] += v;
            __syncthreads();
        }
        run_first[threadIdx.x] = carry + scan[threadIdx.x] - blocks;   // the expert's first block
        __syncthreads();   // everyone has read carry; run_first is complete
#pragma unroll
        for (int q = 0; q < kPerWarp; ++q) {
            const int r = warp + kWarps * q;
            if (r >= round_experts) break;   // the same for the whole warp; r grows with q
            const i32 first = run_first[r], n_blocks = run_blocks[r], used = run_used[r];
            const i32 start = first * block_size;
            if (lane < n_chunks) counts[static_cast<i64>(round + r) * n_chunks + lane] = start + before[q];
            for (int p = start + used + lane; p < start + n_blocks * block_size; p += 32)
                sorted_token_ids[p] = sentinel;
            for (int b = first + lane; b < first + n_blocks; b += 32) expert_ids[b] = round + r;
        }
        if (threadIdx.x == kThreads - 1) carry += scan[threadIdx.x];
        __syncthreads();   // carry is final and run_* free for the next round
    }
    const i32 used_blocks = carry, used = carry * block_size;
    if (threadIdx.x == 0) num_tokens_post_padded[0] = used;
    for (int p = used + static_cast<int>(threadIdx.x); p < max_padded; p += kThreads)
        sorted_token_ids[p] = sentinel;
    for (int b = used_blocks + static_cast<int>(threadIdx.x); b < max_padded / block_size; b += kThreads)
        expert_ids[b] = -1;
}

// Dynamic shared memory: kWarps rows of n_experts positions.
template <int kWarps>
__global__ void __launch_bounds__(32 * kWarps) moe_scatter_kernel(
    const i32* __restrict__ topk_ids,
    const i32* __restrict__ expert_map,
    const i32* __restrict__ positions,     // [E, chunks]: where chunk c's first entry of expert e goes
    i32* __restrict__ sorted_token_ids,
    i32 n, i32 n_experts, i32 n_chunks, i32 chunk_len)
{
    extern __shared__ i32 moe_rows[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.x * kWarps + warp;
    if (chunk >= n_chunks) return;
    i32* row = moe_rows + warp * n_experts;
    for (int e = lane; e < n_experts; e += 32) row[e] = positions[static_cast<i64>(e) * n_chunks + chunk];
    __syncwarp();
    const unsigned lower_lanes = (1u << lane) - 1u;
    const int begin = chunk * chunk_len, end = min(n, begin + chunk_len);
    for (int base = begin; base < end; base += 32 * kMoeSteps) {
        int ev[kMoeSteps];
        moe_load_steps(ev, topk_ids, expert_map, base + lane, end, n_experts);
#pragma unroll
        for (int u = 0; u < kMoeSteps; ++u) {
            const int i = base + 32 * u + lane, e = ev[u];
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
}

}  // namespace w4kern
