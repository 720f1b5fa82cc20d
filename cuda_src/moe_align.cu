// moe_align: group the flat (token, slot) indices i = t * k + j of topk_ids by
// expert, each expert's run padded to a multiple of block_size (DESIGN.md,
// "MoE routing and alignment"), bit-identical to reference.moe_align_block_size:
// experts in ascending (local) id order, indices ascending within an expert,
// the sentinel T * k in padding and in the unused tail, expert id -1 for unused
// blocks.
//
// Three launches. The flat indices are cut into chunks of at least 256 indices,
// at most 128 of them and at most 32768 / E (the host picks the chunk length),
// one warp each: a warp walks its chunk step by step (each step waits on the
// last), so the walk's length, not the bytes, sets the time, and more chunks
// mean shorter walks.
//   1. moe_chunk_kernel<.., false>: warp c counts the experts of chunk c in a
//      shared-memory row and writes it to row c of a [chunks, E] matrix.
//   2. moe_offsets_kernel (one CTA): loads the matrix into shared memory at
//      once (the host caps chunks * E); a thread per expert sums its column,
//      the CTA scans the padded run lengths over the experts, and each thread
//      writes where each chunk's first entry of its expert goes (an exclusive
//      prefix over the chunks: indices stay ascending); warps write the padding
//      and expert_ids, lanes on consecutive entries. The scans are warp
//      shuffles: a round takes four CTA barriers.
//   3. moe_chunk_kernel<.., true>: warp c loads row c into a shared-memory row
//      and walks its chunk again; a lane's rank among the lanes of its expert
//      (lower lanes = lower indices) places it.
// The per-step read-modify-writes stay in shared memory: in global memory each
// would be a round trip on the warp's critical path.
// Expert ids outside [0, E) and experts that expert_map sends to -1 (or past
// E) are dropped, so no input can make a kernel write out of bounds.
#include "common/types.cuh"

namespace w4kern {

constexpr int kMoeSteps = 8;        // 32-index steps whose ids a warp loads at once

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

// Steps 1 and 3: warp c walks chunk c, 32 indices a step, with a row of E
// counters (kScatter: positions) in dynamic shared memory (kWarps rows).
// __match_any_sync finds the lanes of one expert; their leader advances the row
// entry by their count. Counting starts the row at zero and stores it into row c
// of the [chunks, E] matrix; scattering starts it at the positions the offsets
// kernel stored there, and each lane writes its index at the row entry plus its
// rank among its peers (lower lanes hold lower indices).
template <int kWarps, bool kScatter>
__global__ void __launch_bounds__(32 * kWarps) moe_chunk_kernel(
    const i32* __restrict__ topk_ids,     // [T * k]
    const i32* __restrict__ expert_map,   // [E] or null
    i32* __restrict__ matrix,             // [chunks, E]: counts out, or positions in (kScatter)
    i32* __restrict__ sorted_token_ids,   // [max_padded] (kScatter)
    i32 n, i32 n_experts, i32 n_chunks, i32 chunk_len)
{
    extern __shared__ i32 moe_rows[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.x * kWarps + warp;
    if (chunk >= n_chunks) return;   // whole warp; no CTA-wide barrier follows
    i32* row = moe_rows + warp * n_experts;
    i32* column = matrix + static_cast<i64>(chunk) * n_experts;
    for (int e = lane; e < n_experts; e += 32) row[e] = kScatter ? column[e] : 0;
    __syncwarp();
    const unsigned lower_lanes = (1u << lane) - 1u;
    const int begin = chunk * chunk_len, end = min(n, begin + chunk_len);
    for (int base = begin; base < end; base += 32 * kMoeSteps) {
        int ev[kMoeSteps];
        moe_load_steps(ev, topk_ids, expert_map, base + lane, end, n_experts);
#pragma unroll
        for (int u = 0; u < kMoeSteps; ++u) {
            const int e = ev[u];
            const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
            const int at = e >= 0 ? row[e] : 0;    // every peer reads the same entry
            __syncwarp();                          // read before the leader writes
            if (e >= 0) {
                if constexpr (kScatter) sorted_token_ids[at + __popc(peers & lower_lanes)] = base + 32 * u + lane;
                if (lane == __ffs(peers) - 1) row[e] = at + __popc(peers);
            }
            __syncwarp();   // the next step's leader reads what this one wrote
        }
    }
    if constexpr (!kScatter)
        for (int e = lane; e < n_experts; e += 32) column[e] = row[e];
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) moe_offsets_kernel(
    i32* __restrict__ counts,              // [chunks, E]: counts in, start positions out
    i32* __restrict__ sorted_token_ids,    // [max_padded]
    i32* __restrict__ expert_ids,          // [max_padded / block_size]
    i32* __restrict__ num_tokens_post_padded,   // [1]
    i32 n_chunks, i32 n_experts, i32 block_size, i32 max_padded, i32 sentinel)
{
    constexpr int kWarps = kThreads / 32;
    static_assert(kWarps <= 32, "one warp scans the warps' sums");
    extern __shared__ i32 matrix[];     // the [chunks, E] counts (the host keeps chunks * E small)
    __shared__ i32 warp_sums[kWarps];   // padded run lengths per warp, then their inclusive scan
    __shared__ i32 run_start[kThreads], run_used[kThreads], run_padded[kThreads];   // this round's experts
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // the whole matrix at once (independent loads: one wait on memory)
    const int n_counts = n_chunks * n_experts;
#pragma unroll 8
    for (int i = threadIdx.x; i < n_counts; i += kThreads) matrix[i] = counts[i];
    __syncthreads();
    i32 carry = 0;   // padded lengths of the earlier rounds' experts (the same in every thread)
    // experts in rounds of kThreads, a thread each walking its column (the lanes
    // of a warp read consecutive experts: no bank conflicts)
    for (int round = 0; round < n_experts; round += kThreads) {
        const int e = round + static_cast<int>(threadIdx.x);
        const bool has_e = e < n_experts;
        i32 total = 0;
        if (has_e) {
#pragma unroll 8
            for (int c = 0; c < n_chunks; ++c) total += matrix[c * n_experts + e];
        }
        const i32 padded = (total + block_size - 1) / block_size * block_size;
        // inclusive scan of the padded lengths over the round's experts: over the
        // warp by shuffles, then over the warps' sums by warp 0
        i32 scanned = padded;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const i32 v = __shfl_up_sync(0xFFFFFFFFu, scanned, offset);
            if (lane >= offset) scanned += v;
        }
        if (lane == 31) warp_sums[warp] = scanned;
        __syncthreads();
        if (warp == 0) {
            i32 w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const i32 v = __shfl_up_sync(0xFFFFFFFFu, w, offset);
                if (lane >= offset) w += v;
            }
            if (lane < kWarps) warp_sums[lane] = w;
        }
        __syncthreads();
        const i32 start = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + scanned - padded;
        carry += warp_sums[kWarps - 1];
        if (has_e) {
            i32 at = start;
#pragma unroll 8
            for (int c = 0; c < n_chunks; ++c) {   // an exclusive prefix over the chunks: indices stay ascending
                const i32 v = matrix[c * n_experts + e];
                counts[static_cast<i64>(c) * n_experts + e] = at;
                at += v;
            }
        }
        run_start[threadIdx.x] = start;
        run_used[threadIdx.x] = total;
        run_padded[threadIdx.x] = padded;
        __syncthreads();   // run_* are complete
        // the padding and block ids, a warp per expert with lanes on consecutive entries
        for (int x = warp; x < kThreads && round + x < n_experts; x += kWarps) {
            const i32 s0 = run_start[x], end = s0 + run_padded[x];
            for (int p = s0 + run_used[x] + lane; p < end; p += 32) sorted_token_ids[p] = sentinel;
            for (int b = s0 / block_size + lane; b < end / block_size; b += 32) expert_ids[b] = round + x;
        }
        __syncthreads();   // warp_sums and run_* are free for the next round
    }
    const i32 used = carry;
    if (threadIdx.x == 0) num_tokens_post_padded[0] = used;
    for (int p = used + static_cast<int>(threadIdx.x); p < max_padded; p += kThreads)
        sorted_token_ids[p] = sentinel;
    for (int b = used / block_size + static_cast<int>(threadIdx.x); b < max_padded / block_size;
         b += kThreads)
        expert_ids[b] = -1;
}

}  // namespace w4kern
