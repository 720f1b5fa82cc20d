// quantize_q8: activation rows [..., K] (fp32/fp16/bf16) -> Q8 blocks [..., K/32].
//
// A thread quantizes chunks of 8 consecutive values (one 16-byte load for
// 16-bit inputs, two for fp32); the 4 threads of a 32-value block are 4 adjacent
// lanes of one warp, so the block's max|x|, finiteness and sum(q) reduce with
// two xor-shuffles and no shared memory. The output rows are contiguous, so
// the whole [rows, K] input is one flat run of chunks and a chunk's block is
// simply chunk / 4.
//
// Bit-exact with the NumPy path (w4kern/quant.py): d = amax / 127 and x / d are
// IEEE fp32 divisions here and there, roundf rounds half away from zero.
#include "common/formats.cuh"

namespace w4kern {

constexpr int kQ8ValuesPerThread = 8;
constexpr int kQ8ThreadsPerBlock = kQ8BlockValues / kQ8ValuesPerThread;  // 4 lanes per Q8Block
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// q = roundf(x / d) clamped to [-127, 127]; d == 0 (all-zero block, or a
// max|x| so small that max|x| / 127 underflows) gives 0, as llama.cpp does for
// amax == 0.
//
// An IEEE division per value made the kernel instruction-bound, so the
// quotient comes from x * (1/d) instead. That product is within a few ulp of
// x / d (|x / d| <= 127, so within ~3e-5), and only a quotient that close to a
// rounding tie k + 0.5 can round differently: those (and a non-finite product
// when 1/d overflows for a subnormal d) take the exact division, so q is
// exactly roundf(x / d) and matches the NumPy path bit for bit.
__device__ __forceinline__ int quantize_value_q8(float x, float d, float inv_d) {
    if (d == 0.0f) return 0;
    float r = x * inv_d;
    const float distance_to_tie = fabsf(fabsf(r - truncf(r)) - 0.5f);
    if (!(distance_to_tie >= 1.0e-3f)) r = x / d;   // near a tie, or NaN: divide exactly
    const float q = roundf(r);
    return static_cast<int>(fminf(fmaxf(q, -127.0f), 127.0f));
}

__device__ __forceinline__ u32 pack_4_int8(int a, int b, int c, int e) {
    return (static_cast<u32>(a) & 0xFFu) | ((static_cast<u32>(b) & 0xFFu) << 8) |
           ((static_cast<u32>(c) & 0xFFu) << 16) | ((static_cast<u32>(e) & 0xFFu) << 24);
}

// kChunksPerThread chunks (of 8 values) per thread: their loads are all
// issued before the first is used (more bytes in flight per thread, fewer
// CTAs, more registers). The op picks the instance (w4kern/quant.py).
constexpr int kQ8Threads = 256;

template <typename InT, int kQ8ChunksPerThread>
__global__ void __launch_bounds__(kQ8Threads) quantize_q8_kernel(
    const InT* __restrict__ x,    // [rows, K] contiguous, K % 32 == 0, 16-byte aligned
    Q8Block* __restrict__ out,    // [rows, K / 32] contiguous
    i64 n_chunks)                 // rows * K / 8
{
    // A CTA covers kQ8ChunksPerThread * blockDim.x consecutive chunks, one
    // coalesced pass per iteration. blockDim.x and n_chunks are multiples of
    // 4, so the 4 lanes of one Q8 block are either all active or all inactive;
    // inactive lanes still take part in the shuffles (full-warp masks) and
    // store nothing.
    const i64 first_chunk = static_cast<i64>(blockIdx.x) * kQ8ChunksPerThread * blockDim.x + threadIdx.x;

    Vec<InT, kQ8ValuesPerThread> in[kQ8ChunksPerThread];
#pragma unroll
    for (int it = 0; it < kQ8ChunksPerThread; ++it) {
        const i64 chunk = first_chunk + static_cast<i64>(it) * blockDim.x;
        if (chunk < n_chunks) {
            in[it] = reinterpret_cast<const Vec<InT, kQ8ValuesPerThread>*>(x)[chunk];
        } else {
#pragma unroll
            for (int i = 0; i < kQ8ValuesPerThread; ++i) in[it].v[i] = from_float<InT>(0.0f);
        }
    }

    const int lane = threadIdx.x & 31;
    const int first_lane = lane & ~(kQ8ThreadsPerBlock - 1);
    const int t = lane - first_lane;  // this thread holds values 8t .. 8t+7 of its block

#pragma unroll
    for (int it = 0; it < kQ8ChunksPerThread; ++it) {
        const i64 chunk = first_chunk + static_cast<i64>(it) * blockDim.x;
        float v[kQ8ValuesPerThread];
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) v[i] = to_float(in[it].v[i]);

        float amax = 0.0f;
        int non_finite = 0;
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) {
            amax = fmaxf(amax, fabsf(v[i]));
            non_finite |= !isfinite(v[i]);
        }
#pragma unroll
        for (int offset = 1; offset < kQ8ThreadsPerBlock; offset <<= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(kFullWarp, amax, offset));
            non_finite |= __shfl_xor_sync(kFullWarp, non_finite, offset);
        }

        // A block holding NaN or Inf gets d = sum = NaN (the quiet NaN
        // 0x7FC00000, as NumPy writes it) and q = 0, so any dot product with it
        // is NaN (documented in quantize_q8).
        const float nan = __int_as_float(0x7FC00000);
        const float d = non_finite ? nan : amax / 127.0f;
        const float d_for_q = non_finite ? 0.0f : d;
        const float inv_d = __frcp_rn(d_for_q);   // inf for d == 0, unused then

        int q[kQ8ValuesPerThread];
        int q_sum = 0;
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) {
            q[i] = quantize_value_q8(v[i], d_for_q, inv_d);
            q_sum += q[i];
        }
#pragma unroll
        for (int offset = 1; offset < kQ8ThreadsPerBlock; offset <<= 1)
            q_sum += __shfl_xor_sync(kFullWarp, q_sum, offset);

        // The even values are qs_even[4t .. 4t+3], the odd ones qs_odd[4t .. 4t+3].
        const u32 even_word = pack_4_int8(q[0], q[2], q[4], q[6]);
        const u32 odd_word = pack_4_int8(q[1], q[3], q[5], q[7]);

        // Gather so that each 16-byte part of the block is one 128-bit store:
        // lane t=0 stores qs_even, t=1 qs_odd, t=2 (d, sum, reserved), t=3 nothing.
        Vec<u32, 4> part;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 e = __shfl_sync(kFullWarp, even_word, first_lane + j);
            const u32 o = __shfl_sync(kFullWarp, odd_word, first_lane + j);
            part.v[j] = (t == 0) ? e : o;
        }
        if (t == 2) {
            part.v[0] = __float_as_uint(d);
            part.v[1] = __float_as_uint(non_finite ? nan : d * static_cast<float>(q_sum));
            part.v[2] = 0u;
            part.v[3] = 0u;
        }
        if (chunk < n_chunks && t < 3) {
            const i64 block = chunk / kQ8ThreadsPerBlock;
            reinterpret_cast<Vec<u32, 4>*>(out + block)[t] = part;
        }
    }
}

// The same quantization with one thread per Q8 block: four 16-byte loads
// (bf16/fp16; eight for fp32) and three 16-byte stores per thread, and no
// shuffles: the block's max, sum and byte gathering stay in registers. Each
// load instruction of a warp touches 32 lines at a 64-byte stride, but the
// four loads together use every byte, which L1 serves.
template <typename InT>
__global__ void __launch_bounds__(kQ8Threads) quantize_q8_thread_per_block_kernel(
    const InT* __restrict__ x,    // [rows, K] contiguous, K % 32 == 0, 16-byte aligned
    Q8Block* __restrict__ out,    // [rows, K / 32] contiguous
    i64 n_blocks)                 // rows * K / 32
{
    const i64 block = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (block >= n_blocks) return;
    constexpr int kChunks = kQ8BlockValues / kQ8ValuesPerThread;   // 4 chunks of 8 values
    const Vec<InT, kQ8ValuesPerThread>* src =
        reinterpret_cast<const Vec<InT, kQ8ValuesPerThread>*>(x) + block * kChunks;
    Vec<InT, kQ8ValuesPerThread> in[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) in[c] = src[c];

    float v[kQ8BlockValues];
    float amax = 0.0f;
    int non_finite = 0;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) {
            const float f = to_float(in[c].v[i]);
            v[c * kQ8ValuesPerThread + i] = f;
            amax = fmaxf(amax, fabsf(f));
            non_finite |= !isfinite(f);
        }
    }
    const float nan = __int_as_float(0x7FC00000);
    const float d = non_finite ? nan : amax / 127.0f;
    const float d_for_q = non_finite ? 0.0f : d;
    const float inv_d = __frcp_rn(d_for_q);

    Vec<u32, 4> even, odd;
    int q_sum = 0;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        int q[kQ8ValuesPerThread];
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) {
            q[i] = quantize_value_q8(v[c * kQ8ValuesPerThread + i], d_for_q, inv_d);
            q_sum += q[i];
        }
        even.v[c] = pack_4_int8(q[0], q[2], q[4], q[6]);   // qs_even[4c .. 4c+3] = q[8c + 2j]
        odd.v[c] = pack_4_int8(q[1], q[3], q[5], q[7]);
    }
    Vec<u32, 4> tail;
    tail.v[0] = __float_as_uint(d);
    tail.v[1] = __float_as_uint(non_finite ? nan : d * static_cast<float>(q_sum));
    tail.v[2] = 0u;
    tail.v[3] = 0u;
    Vec<u32, 4>* dst = reinterpret_cast<Vec<u32, 4>*>(out + block);
    dst[0] = even;
    dst[1] = odd;
    dst[2] = tail;
}

}  // namespace w4kern
