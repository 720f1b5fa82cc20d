// matvec_q8: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4 or INT8
// weights against Q8 activation blocks, with dp4a (llama.cpp's MMVQ idea).
//
// Work split: each warp owns kRows consecutive weight rows (a CTA holds four
// such warps) and its lanes stride over the K/32 Q8 blocks, so consecutive
// lanes read consecutive 16-byte pieces of each row (coalesced), and every
// activation block a lane loads is reused for kRows rows. A warp streams its
// rows' whole K with several loads in flight per lane and reduces with
// shuffles only: no shared memory, no CTA barrier, so warps never wait for
// each other and a finished warp's slot takes new rows at once.
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
#include "common/formats.cuh"
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
    __device__ __forceinline__ void load(const u8* p) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    }
    __device__ __forceinline__ u32 even(int j) const { return w[j] & kLowNibbles; }
    __device__ __forceinline__ u32 odd(int j) const { return (w[j] >> 4) & kLowNibbles; }
};

template <>
struct WeightBlock<8> {
    static constexpr int kBytes = 32;
    u32 w[8];
    __device__ __forceinline__ void load(const u8* p) {
        const uint4 a = reinterpret_cast<const uint4*>(p)[0];
        const uint4 b = reinterpret_cast<const uint4*>(p)[1];
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    }
    // k = 8j + {0, 2, 4, 6}: bytes 0 and 2 of words 2j and 2j+1
    __device__ __forceinline__ u32 even(int j) const { return byte_perm(w[2 * j], w[2 * j + 1], 0x6420); }
    __device__ __forceinline__ u32 odd(int j) const { return byte_perm(w[2 * j], w[2 * j + 1], 0x7531); }
};

template <int kWeightBits, typename ScaleT, bool kHasZeros, int kMaxM, int kRows, int kUnroll>
__global__ void __launch_bounds__(kMatvecThreads) matvec_q8_kernel(
    const u8* __restrict__ qweight,      // [N, K * kWeightBits / 8]
    const ScaleT* __restrict__ scales,   // [N, n_groups]
    const ScaleT* __restrict__ zeros,    // [N, n_groups] (INT4 asymmetric only)
    const Q8Block* __restrict__ act,     // [M, K / 32]
    const void* __restrict__ bias,       // [N] of the output type, or null
    void* __restrict__ out,              // [M, N]
    i32 n_rows, i32 m_tokens, i32 n_blocks, i32 n_groups,
    i32 group_shift,                     // log2(blocks per group); 31 for one group per row
    i32 out_kind)
{
    static_assert(kWeightBits == 4 || kWeightBits == 8, "INT4 or INT8 weights");
    static_assert(!(kHasZeros && kWeightBits == 8), "INT8 weights are symmetric");
    using Block = WeightBlock<kWeightBits>;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * kMatvecWarps + warp) * kRows;
    if (row0 >= n_rows) return;      // whole warp: nothing below synchronizes across warps
    const i64 row_bytes = static_cast<i64>(n_blocks) * Block::kBytes;
    const float implicit_zero = kWeightBits == 4 ? static_cast<float>(kInt4SymmetricZero) : 0.0f;

    float acc[kRows][kMaxM];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.0f;

    const u8* row_ptr[kRows];   // clamped so every load is in bounds; only real rows are stored
    i64 group_base[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int row = min(row0 + r, n_rows - 1);
        row_ptr[r] = qweight + row * row_bytes;
        group_base[r] = static_cast<i64>(row) * n_groups;
    }

    // one Q8 block b of every row and token
    auto accumulate = [&](const Block (&w)[kRows], int b) {
        const int group = b >> group_shift;
        float s[kRows], z[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            s[r] = to_float(scales[group_base[r] + group]);
            z[r] = kHasZeros ? to_float(zeros[group_base[r] + group]) : implicit_zero;
        }
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
            if (m >= m_tokens) break;
            const uint4* blk = reinterpret_cast<const uint4*>(act + static_cast<i64>(m) * n_blocks + b);
            const uint4 qe = blk[0], qo = blk[1], ds = blk[2];
            const u32 xe[4] = {qe.x, qe.y, qe.z, qe.w};
            const u32 xo[4] = {qo.x, qo.y, qo.z, qo.w};
            const float d = __uint_as_float(ds.x), sum = __uint_as_float(ds.y);
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

    // Lanes stride over the K blocks, kUnroll blocks per lane per step, and the
    // next step's weights are loaded before this step's math (register double
    // buffering), so every lane always has a step of loads in flight.
    Block cur[kUnroll][kRows], next[kUnroll][kRows];
    auto load_step = [&](Block (&w)[kUnroll][kRows], int b) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (b + u * 32 < n_blocks)
#pragma unroll
                for (int r = 0; r < kRows; ++r)
                    w[u][r].load(row_ptr[r] + static_cast<i64>(b + u * 32) * Block::kBytes);
    };
    load_step(cur, lane);
    for (int b = lane; b < n_blocks; b += kUnroll * 32) {
        if (b + kUnroll * 32 < n_blocks) load_step(next, b + kUnroll * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (b + u * 32 < n_blocks) accumulate(cur[u], b + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int r = 0; r < kRows; ++r) cur[u][r] = next[u][r];
    }

    // warp reduction; lane r * kMaxM + m ends up owning (row r, token m)
    float mine = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == r * kMaxM + m) mine = v;
        }
    static_assert(kRows * kMaxM <= 32, "one output per lane");
    if (lane < kRows * kMaxM) {
        const int r = lane / kMaxM, m = lane % kMaxM;
        const int row = row0 + r;
        if (row < n_rows && m < m_tokens) {
            float v = mine;
            if (bias != nullptr) v += load_as_float(bias, row, out_kind);
            store_from_float(out, static_cast<i64>(m) * n_rows + row, v, out_kind);
        }
    }
}

}  // namespace w4kern
