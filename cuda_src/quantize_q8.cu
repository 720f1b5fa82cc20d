// quantize_q8: activation rows [..., K] (fp32/fp16/bf16) -> Q8 blocks [..., K/32].
//
// A thread quantizes chunks of 8 consecutive values (one 16-byte load for
// 16-bit inputs, two for fp32); the 4 threads of a 32-value block are 4 adjacent
// lanes of one warp, so the block's max|x|, finiteness and sum(q) reduce with
// two xor-shuffles and no shared memory. The output rows are contiguous, so
// the whole [rows, K] input is one flat run of chunks and a chunk's block is
// simply chunk / 4.
//
// Bit-exact with the NumPy path (w4kern/quant.py): d = amax / 127 is an IEEE
// fp32 division here and there, and q = roundf(x / d) (half away from zero) is
// reached without a division per value (quantize_values_q8 says how).
#include "common/formats.cuh"
#include "common/ptx.cuh"
#include "common/q8_rounding.cuh"

namespace w4kern {

constexpr int kQ8ValuesPerThread = 8;
constexpr int kQ8ThreadsPerBlock = kQ8BlockValues / kQ8ValuesPerThread;  // 4 lanes per Q8Block
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

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
    pdl_first_kernel_start();   // the op's matvec may then start and fetch its weights
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
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) amax = fmaxf(amax, fabsf(v[i]));   // NaN is ignored here
#pragma unroll
        for (int offset = 1; offset < kQ8ThreadsPerBlock; offset <<= 1)
            amax = fmaxf(amax, __shfl_xor_sync(kFullWarp, amax, offset));
        const float d_finite = amax / 127.0f;   // inf if the block holds an Inf

        u32 bits[kQ8ValuesPerThread];
        int non_finite = 0;
        quantize_values_q8(v, d_finite, bits, non_finite);
        u32 bits_sum = 0;
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) bits_sum += bits[i];
        int q_sum = q_sum_from_bits<kQ8ValuesPerThread>(bits_sum);
#pragma unroll
        for (int offset = 1; offset < kQ8ThreadsPerBlock; offset <<= 1) {
            q_sum += __shfl_xor_sync(kFullWarp, q_sum, offset);
            non_finite |= __shfl_xor_sync(kFullWarp, non_finite, offset);
        }

        // A block holding NaN or Inf gets d = sum = NaN (the quiet NaN
        // 0x7FC00000, as NumPy writes it) and q = 0, so any dot product with it
        // is NaN (documented in quantize_q8).
        const float nan = __int_as_float(0x7FC00000);
        const float d = non_finite ? nan : d_finite;

        // The even values are qs_even[4t .. 4t+3], the odd ones qs_odd[4t .. 4t+3].
        const u32 even_word = non_finite ? 0u : pack_low_bytes(bits[0], bits[2], bits[4], bits[6]);
        const u32 odd_word = non_finite ? 0u : pack_low_bytes(bits[1], bits[3], bits[5], bits[7]);

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
    pdl_first_kernel_start();   // the op's matvec may then start and fetch its weights
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
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kQ8ValuesPerThread; ++i) {
            const float f = to_float(in[c].v[i]);
            v[c * kQ8ValuesPerThread + i] = f;
            amax = fmaxf(amax, fabsf(f));   // NaN is ignored here
        }
    }
    const float d_finite = amax / 127.0f;   // inf if the block holds an Inf

    u32 bits[kQ8BlockValues];
    int non_finite = 0;
    quantize_values_q8(v, d_finite, bits, non_finite);
    u32 bits_sum = 0;
#pragma unroll
    for (int i = 0; i < kQ8BlockValues; ++i) bits_sum += bits[i];
    const int q_sum = q_sum_from_bits<kQ8BlockValues>(bits_sum);

    const float nan = __int_as_float(0x7FC00000);
    const float d = non_finite ? nan : d_finite;
    Vec<u32, 4> even, odd;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {   // qs_even[4c .. 4c+3] = q[8c + 2j], qs_odd the odd ones
        const u32* b = bits + c * kQ8ValuesPerThread;
        even.v[c] = non_finite ? 0u : pack_low_bytes(b[0], b[2], b[4], b[6]);
        odd.v[c] = non_finite ? 0u : pack_low_bytes(b[1], b[3], b[5], b[7]);
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
