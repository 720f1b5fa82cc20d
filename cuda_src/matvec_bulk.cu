// matvec_bulk: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for an Int4TiledWeight
// (w4kern.prepare; g128 or per-channel) against bf16/fp16 activations (W4A16) or
// per-token INT8 ones (W4A8), M <= 8 tokens, on sm_90: the tile walk of matvec_a16.cu
// (the same fragments and math, one 16-row tile per warp) with the weights fed by
// the copy engine instead of the warp's own loads.
//
// Each warp owns a ring of kStages shared-memory stages. A stage is one step of its
// tile: the 1 KiB chunk [tile][step] of the tiled layout and the tile's 16 scales
// (and zeros) of that step's group, which the transposed scale layout
// [n_groups][n_tiles * 16] keeps in one 32-byte run. Lanes 0..2 each issue one
// cp.async.bulk per stage, completing on the stage's mbarrier, kStages - 1 steps
// ahead of the warp's math. So the bytes in flight cost neither registers nor issue
// slots: matvec_a16's register double buffer holds one step ahead, and three-stage
// register rings or loads two steps ahead were slower (session 17). Each thread then
// reads its 16 + 16 weight bytes with two ld.shared.v4 (the chunk is already in the
// order the MMA fragments want) and its rows' scales, and refills the stage it read
// a step earlier (whose bytes are in registers and used by then).
//
// Work split: a CTA's 8 warps are kSplit parts of the K steps of 8 / kSplit tiles
// (a contiguous run of steps each, so a warp's chunks are consecutive in memory);
// CTAs are persistent and walk tile sets blockIdx.x, blockIdx.x + gridDim.x, ...;
// the parts reduce through shared memory in a fixed order (deterministic). With
// kSplit = 8 a narrow matrix (qkv, down: 256-384 tiles) still fills the GPU, which
// is where this kernel beats matvec_a16's tiled walk on an H200 (INT8 x: 6-22%;
// 16-bit x: 3-15% from about 2.5 CTAs an SM; linear.BULK_TILES has the measurements).
// Wide matrices (gate_up) keep matvec_a16, whose two tiles per warp share the
// activation loads and sum-x MMAs.
//
// Bounds: the tiled layout pads rows to whole tiles and k to whole steps with zero
// bytes, and the transposed scales pad rows the same way (zero scales), so every
// copy is inside the arrays; activations past K or M are zeros, and only rows < N
// and tokens < M are stored.
#include "common/formats.cuh"
#include "common/int4_pairs.cuh"
#include "common/ptx.cuh"

namespace w4kern {

constexpr int kBulkThreads = 256;
constexpr int kBulkWarps = kBulkThreads / 32;
// a stage: the weight chunk, then 16 scales, then 16 zeros (room for fp32)
constexpr int kBulkScaleRoom = kTiledRows * 4;
constexpr int kBulkStageBytes = kTiledChunkBytes + 2 * kBulkScaleRoom;
// shared memory before the stages: the warps' mbarriers (8 bytes each), rounded up
constexpr int kBulkBarrierBytes = 512;

template <typename ActT, typename ScaleT, bool kHasZeros, bool kPerChannel, int kSplit, int kStages>
__global__ void __launch_bounds__(kBulkThreads, 2) matvec_bulk_kernel(
    const u8* __restrict__ qweight,      // [n_tiles, steps, 1024]
    const ScaleT* __restrict__ scales,   // [n_groups, n_tiles * 16]
    const ScaleT* __restrict__ zeros,    // same (asymmetric only)
    const ActT* __restrict__ x,          // [M, K]
    const float* __restrict__ x_scales,  // [M] per-token scales of INT8 x (i8 only)
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 k_dim, i32 m_tokens, i32 out_kind)
{
    static_assert(kBulkWarps % kSplit == 0, "a CTA's warps split evenly over its tiles");
    static_assert(kStages >= 2 && 8 * kStages * kBulkWarps <= kBulkBarrierBytes, "ring depth");
#if __CUDA_ARCH__ >= 900
    constexpr bool kInt8 = sizeof(ActT) == 1;
    constexpr int kTilesPerSet = kBulkWarps / kSplit;
    constexpr u32 kScaleBytes = kTiledRows * sizeof(ScaleT);
    constexpr int kXWords = kInt8 ? 8 : 16;   // 32 k of token g per thread and step
    extern __shared__ __align__(128) u8 smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 bars = smem_address(smem) + 8 * kStages * warp;
    const u32 ring = smem_address(smem) + kBulkBarrierBytes + kBulkStageBytes * kStages * warp;
    float* partial = reinterpret_cast<float*>(smem + kBulkBarrierBytes + kBulkStageBytes * kStages * kBulkWarps);

    const int g = lane >> 2, t = lane & 3;
    const int part = warp % kSplit;
    const int n_tiles = (n_rows + kTiledRows - 1) / kTiledRows;
    const int n_sets = (n_tiles + kTilesPerSet - 1) / kTilesPerSet;
    const int steps = (k_dim + kTiledStepK - 1) / kTiledStepK;
    const int per_part = (steps + kSplit - 1) / kSplit;
    const int s_begin = min(part * per_part, steps), s_end = min(s_begin + per_part, steps);
    const u32 scale_stride = static_cast<u32>(n_tiles) * kTiledRows;
    auto tile_of = [&](int set) { return set * kTilesPerSet + warp / kSplit; };

    if (lane == 0) {
        for (int st = 0; st < kStages; ++st) mbarrier_init(bars + 8 * st, 1);
        fence_mbarrier_init();
    }
    __syncwarp();

    // The producer walks the warp's (set, step) sequence kStages - 1 stages ahead of
    // the math; lane 0 arms the stage's barrier with the bytes it expects.
    int p_set = blockIdx.x, p_step = s_begin;
    u32 produced = 0;
    auto produce = [&]() {
        if (p_set >= n_sets || tile_of(p_set) >= n_tiles || s_begin == s_end) return;
        const u32 slot = produced % kStages;
        const u32 bar = bars + 8 * slot, dst = ring + kBulkStageBytes * slot;
        const u32 tile = static_cast<u32>(tile_of(p_set));
        if (lane == 0) {
            mbarrier_arrive_expect_tx(bar, kTiledChunkBytes + (kHasZeros ? 2 : 1) * kScaleBytes);
            bulk_copy_to_shared(dst, qweight + (tile * static_cast<u32>(steps) + p_step) * kTiledChunkBytes,
                                kTiledChunkBytes, bar);
        } else if (lane <= (kHasZeros ? 2 : 1)) {
            const u32 at = static_cast<u32>(kPerChannel ? 0 : p_step) * scale_stride + tile * kTiledRows;
            bulk_copy_to_shared(dst + kTiledChunkBytes + (lane - 1) * kBulkScaleRoom, (lane == 1 ? scales : zeros) + at,
                                kScaleBytes, bar);
        }
        ++produced;
        if (++p_step == s_end) { p_step = s_begin; p_set += gridDim.x; }
    };
    for (int st = 0; st < kStages - 1; ++st) produce();

    float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // (row g, tokens 2t, 2t + 1), (row g + 8, same)
    u32 consumed = 0;
    for (int set = blockIdx.x; set < n_sets; set += gridDim.x) {
        const int tile = tile_of(set);
        for (int s = s_begin; s < (tile < n_tiles ? s_end : s_begin); ++s) {
            // B column g: token g's 32 k from k0 (zeros past K or M), loaded before the wait
            u32 xw[kXWords];
            const int k0 = s * kTiledStepK + t * 32;
            if (k0 < k_dim && g < m_tokens) {
                const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<i64>(g) * k_dim + k0);
#pragma unroll
                for (int j = 0; j < kXWords / 4; ++j) {
                    const uint4 v = src[j];
                    xw[4 * j] = v.x; xw[4 * j + 1] = v.y; xw[4 * j + 2] = v.z; xw[4 * j + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < kXWords; ++j) xw[j] = 0u;
            }
            const u32 slot = consumed % kStages;
            mbarrier_wait_parity(bars + 8 * slot, (consumed / kStages) & 1);
            const u32 stage = ring + kBulkStageBytes * slot;
            u32 w[2][4];   // rows g and g + 8: 16 bytes each, as thread `lane` of matvec_a16 loads them
            float sc[2], zz[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint4 v = lds_u32x4(stage + 512 * h + 16 * lane);
                w[h][0] = v.x; w[h][1] = v.y; w[h][2] = v.z; w[h][3] = v.w;
                const u32 r = (g + 8 * h) * sizeof(ScaleT);
                sc[h] = lds_scale<ScaleT>(stage + kTiledChunkBytes + r);
                zz[h] = kHasZeros ? lds_scale<ScaleT>(stage + kTiledChunkBytes + kBulkScaleRoom + r)
                                  : static_cast<float>(kInt4SymmetricZero);
            }
            ++consumed;
            // the stage read a step ago is free (its bytes were used by that step's
            // math): refill it kStages - 1 steps ahead
            __syncwarp();
            produce();
            if constexpr (kInt8) {
                // one s8 MMA per weight word (even k: low nibbles, odd k: high) and one
                // all-ones MMA for sum x; exact int32 until the group's scale
                i32 acc[4] = {0, 0, 0, 0}, sum_x[4] = {0, 0, 0, 0};
                const u32 ones[4] = {0x01010101u, 0x01010101u, 0x01010101u, 0x01010101u};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 x_even = byte_perm(xw[2 * j], xw[2 * j + 1], 0x6420);
                    const u32 x_odd = byte_perm(xw[2 * j], xw[2 * j + 1], 0x7531);
                    const u32 a[4] = {w[0][j] & kLowNibbles, w[1][j] & kLowNibbles, (w[0][j] >> 4) & kLowNibbles,
                                      (w[1][j] >> 4) & kLowNibbles};
                    mma_s8_m16n8k32_acc(acc, a, x_even, x_odd);
                    mma_s8_m16n8k32_acc(sum_x, ones, x_even, x_odd);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        y[2 * h + c] += sc[h] * (static_cast<float>(acc[2 * h + c]) -
                                                 zz[h] * static_cast<float>(sum_x[c]));
            } else {
                // f = 8 + q / 2 per nibble: sum (q - z) x = 2 sum f x - (16 + z) sum x
                using Nib = A16Nibbles<ActT>;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sum_x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                const u32 ones[4] = {Nib::kOnes, Nib::kOnes, Nib::kOnes, Nib::kOnes};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32* u = xw + 4 * j;
                    const u32 x04 = byte_perm(u[0], u[2], 0x5410), x15 = byte_perm(u[0], u[2], 0x7632);
                    const u32 x26 = byte_perm(u[1], u[3], 0x5410), x37 = byte_perm(u[1], u[3], 0x7632);
                    const u32 lo = w[0][j], hi = w[1][j];
                    const u32 a0[4] = {a16_pair<ActT, 0, true>(lo), a16_pair<ActT, 0, true>(hi),
                                       a16_pair<ActT, 4, true>(lo), a16_pair<ActT, 4, true>(hi)};
                    mma_m16n8k16<ActT>(acc, a0, x04, x15);
                    const u32 a1[4] = {a16_pair<ActT, 8, true>(lo), a16_pair<ActT, 8, true>(hi),
                                       a16_pair<ActT, 12, true>(lo), a16_pair<ActT, 12, true>(hi)};
                    mma_m16n8k16<ActT>(acc, a1, x26, x37);
                    mma_m16n8k16<ActT>(sum_x, ones, x04, x15);
                    mma_m16n8k16<ActT>(sum_x, ones, x26, x37);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        y[2 * h + c] += sc[h] * (2.0f * acc[2 * h + c] - (16.0f + zz[h]) * sum_x[c]);
            }
        }
        // the set's tiles are done: the parts reduce in a fixed order, then part 0 stores
        if constexpr (kSplit > 1) {
#pragma unroll
            for (int e = 0; e < 4; ++e) partial[(warp * 4 + e) * 32 + lane] = y[e];
            __syncthreads();
            if (part == 0) {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    for (int p = 1; p < kSplit; ++p) y[e] += partial[((warp + p) * 4 + e) * 32 + lane];
            }
            __syncthreads();   // partial[] is free for the next set
        }
        if (part == 0 && tile < n_tiles) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = tile * kTiledRows + g + 8 * h;
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int m = 2 * t + c;
                    if (row < n_rows && m < m_tokens) {
                        float v = y[2 * h + c];
                        if constexpr (kInt8) v *= x_scales[m];   // the token's scale, once
                        if (bias != nullptr) v += load_as_float(bias, row, out_kind);
                        store_from_float(out, static_cast<i64>(m) * n_rows + row, v, out_kind);
                    }
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) y[e] = 0.0f;
    }
#endif
}

}  // namespace w4kern
