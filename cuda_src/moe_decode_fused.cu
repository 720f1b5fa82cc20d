// moe_decode_fused: fused_moe's int8 decode path for a few tokens in one
// kernel (w4kern/moe.py, _fused_moe_decode_fused). The four-launch path
// (moe_decode.cu's quantizers around matvec_q8's two item-mode GEMMs) pays a
// kernel boundary three times; at one token that is most of its time (a
// dependent launch drains the GPU, then ramps it up again). Here one
// persistent grid does the same work with the same code, in three phases:
//
//   1. Each CTA quantizes x [T, H] per token into shared memory (every CTA
//      itself: T * H values are a few KiB, read from L2; no grid-wide wait).
//   2. GEMM1, [g; u] = W13[e] x per (token, slot) item, as matvec_q8's kPerItem
//      walk over a virtual grid of ctas1 CTAs per item, into fp32 rows in a
//      workspace. The last virtual CTA to finish an item's rows (a ticket per
//      item) quantizes that item's silu(g) * u per token into Q8 blocks
//      (moe_row_q8, as moe_decode.cu does) and counts the item done.
//   3. GEMM2 with the combine, as matvec_q8's kTokenSum walk over ctas2 virtual
//      CTAs per token: each CTA starts its first weight loads, then waits until
//      every item is done.
//
// So the only grid-wide waits are on the items: a CTA that finishes GEMM1 early
// fetches its GEMM2 weights while the last items are quantized. The results
// are bit-identical to the four-launch path with the same matvec_q8 configs
// (same walks, same fixed-order reductions, the same quantizer).
//
// Waiting across CTAs needs every CTA of the grid resident at once: the host
// launches at most the GPU's resident CTAs of this kernel (occupancy API), as
// cooperative launches do. The cross-CTA counters live in a per-stream
// workspace that the host zeroes once; each launch leaves them zero again (the
// item's quantizer resets its ticket; the last CTA out resets the rest), and
// the next launch on the stream reads them only after this one has finished
// (stream order, or its griddepcontrol.wait under a programmatic launch).
#include "common/matvec_q8_walk.cuh"
#include "common/moe_row_q8.cuh"

namespace w4kern {

// GEMM1's matvec_q8 instance: 8 rows per warp, one block per lane per step, no
// split K (the [g; u] rows of the 8 slots of a token give every SM its warps)
constexpr int kFusedRows1 = 8, kFusedUnroll1 = 1, kFusedSplit1 = 1;
// 3 CTAs (12 warps, matvec_q8's target, w4kern.linear.MATVEC_WARPS_PER_SM) per SM:
// left to itself, ptxas gave the float-x instances up to 201 registers (2 CTAs),
// and 128 (4 CTAs) spilled
constexpr int kFusedMinCtas = 3;
// sync[]: items done (their GEMM2 activations written), CTAs out, then one
// ticket per item (GEMM1 virtual CTAs finished), each in its own 128-byte line:
// every waiting CTA polls the first, and dozens of CTAs count into each ticket
constexpr int kSyncStride = 32;
constexpr int kSyncItemsDone = 0, kSyncCtasOut = kSyncStride, kSyncTickets = 2 * kSyncStride;
// a waiting CTA polls about this often (ns): enough to see the count soon, few
// enough reads that the atomics counting into it are not slowed
constexpr int kSyncPollNs = 200;

__device__ __forceinline__ u32 load_acquire_gpu(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Thread 0 waits until *counter >= target, then the CTA goes on (the
// barrier-and-fence pattern of cooperative groups' grid sync).
__device__ __forceinline__ void wait_for_count(const u32* counter, u32 target) {
    if (threadIdx.x == 0) {
        while (load_acquire_gpu(counter) < target) __nanosleep(kSyncPollNs);
        __threadfence();
    }
    __syncthreads();
}

template <typename In, typename ScaleT, bool kHasZeros, int kRows2, int kUnroll2, int kSplit2>
__global__ void __launch_bounds__(kMatvecThreads, kFusedMinCtas) moe_decode_fused_kernel(
    const In* __restrict__ x,                 // [T, H]
    const u8* __restrict__ w13_q,             // [E, 2I, H / 2]
    const ScaleT* __restrict__ w13_s,         // [E, 2I, groups1]
    const ScaleT* __restrict__ w13_z,         // [E, 2I, groups1] (asymmetric only)
    const u8* __restrict__ w2_q,              // [E, H, I / 2]
    const ScaleT* __restrict__ w2_s,          // [E, H, groups2]
    const ScaleT* __restrict__ w2_z,          // [E, H, groups2] (asymmetric only)
    const i32* __restrict__ topk_ids,         // [T, k]
    const float* __restrict__ topk_weights,   // [T, k]
    float* gate_up,                           // workspace [T * k, 2I]: GEMM1's rows
    u8* inter_blocks,                         // workspace [T * k, I / 32] Q8 blocks: GEMM2's activations
    u32* sync,                                // workspace [32 * (2 + T * k)], zero at launch and at exit
    void* __restrict__ out,                   // [T, H] of out_kind
    i32 tokens, i32 slots, i32 hidden, i32 inter, i32 n_experts,
    i32 groups1, i32 shift1, i32 groups2, i32 shift2, i32 out_kind,
    i32 ctas1,                                // GEMM1 virtual CTAs per item (<= its row-group sets)
    i32 ctas2)                                // GEMM2 virtual CTAs per token (<= its row-group sets)
{
    extern __shared__ __align__(16) u8 x_blocks[];   // [T, H / 32] Q8 blocks of x
    const int items = tokens * slots;
    const int blocks1 = hidden / kQ8BlockValues, blocks2 = inter / kQ8BlockValues;
    constexpr int kOutFloat32 = 0;   // out_kind of the fp32 [g; u] rows (w4kern.linear._OUT_KIND)
    __shared__ int last_of_item;

    // The op's first kernel: the previous op (whatever it wrote) is done before
    // any memory is touched here, then the next op's kernel may start.
    pdl_first_kernel_start();

    // Phases 1 and 2. x is quantized once per CTA, where its first GEMM1 walk
    // has its first weights in flight.
    bool x_ready = false;
    auto quantize_x = [&] {
        if (x_ready) return;   // the same for the whole CTA
        for (int t = 0; t < tokens; ++t) {
            moe_row_q8<In, false, true>(x + static_cast<i64>(t) * hidden,
                                        x_blocks + static_cast<i64>(t) * blocks1 * sizeof(Q8Block), nullptr, hidden);
            __syncthreads();   // the row's blocks are written; the quantizer's smem is free
        }
        x_ready = true;
    };
    for (int v = blockIdx.x; v < ctas1 * items; v += gridDim.x) {
        const int item = v / ctas1;
        matvec_q8_walk<4, ScaleT, kHasZeros, 1, kFusedRows1, kFusedUnroll1, kFusedSplit1, kPerItem>(
            w13_q, w13_s, w13_z, reinterpret_cast<const Q8Block*>(x_blocks), nullptr, gate_up,
            2 * inter, 1, blocks1, groups1, shift1, kOutFloat32, topk_ids, nullptr, n_experts, slots,
            v % ctas1, ctas1, item, quantize_x);
        // This virtual CTA's rows of the item are stored (every virtual CTA has
        // work: ctas1 <= the item's row-group sets). The item's last one
        // quantizes silu(g) * u for GEMM2.
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last_of_item = atomicAdd(&sync[kSyncTickets + kSyncStride * item], 1u) == static_cast<u32>(ctas1 - 1);
            if (last_of_item) __threadfence();   // the other CTAs' rows of the item are visible from here
        }
        __syncthreads();
        if (last_of_item) {
            moe_row_q8<float, true, true>(gate_up + static_cast<i64>(item) * 2 * inter,
                                          inter_blocks + static_cast<i64>(item) * blocks2 * sizeof(Q8Block),
                                          nullptr, inter);
            __syncthreads();
            if (threadIdx.x == 0) {
                sync[kSyncTickets + kSyncStride * item] = 0;   // for the next launch
                __threadfence();
                atomicAdd(&sync[kSyncItemsDone], 1u);
            }
        }
    }

    // Phase 3: GEMM2 and the combine. A walk's first weights are in flight while
    // it waits for the items.
    for (int v = blockIdx.x; v < ctas2 * tokens; v += gridDim.x) {
        matvec_q8_walk<4, ScaleT, kHasZeros, 1, kRows2, kUnroll2, kSplit2, kTokenSum>(
            w2_q, w2_s, w2_z, reinterpret_cast<const Q8Block*>(inter_blocks), nullptr, out,
            hidden, 1, blocks2, groups2, shift2, out_kind, topk_ids, topk_weights, n_experts, slots,
            v % ctas2, ctas2, v / ctas2, [&] { wait_for_count(&sync[kSyncItemsDone], static_cast<u32>(items)); });
    }

    // Every CTA has passed its waits once all have counted themselves out: the
    // last one resets the counters for the next launch.
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(&sync[kSyncCtasOut], 1u) == gridDim.x - 1) {
        sync[kSyncItemsDone] = 0;
        sync[kSyncCtasOut] = 0;
    }
}

}  // namespace w4kern
