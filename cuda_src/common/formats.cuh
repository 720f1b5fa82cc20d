// The packed formats shared by host packing code and device kernels.
//
// This header is the truth for struct layouts: `w4kern/formats.py` mirrors
// it and `tests/test_formats.py` compiles this file with the host C++
// compiler and checks every sizeof/offsetof against the Python side.
// It must stay valid host C++17 (no device-only code here).
#pragma once

#include "types.cuh"

namespace w4kern {

// ---------------------------------------------------------------------------
// Q8 activation block: 32 consecutive activations along K, quantized to int8.
// Quantization follows llama.cpp's CUDA quantize_q8_1: d = max|x| / 127 in
// fp32, q = roundf(x / d) (half away from zero), q = 0 for an all-zero block.
// Unlike llama.cpp (half2 d/sum, 36 bytes) w4kern keeps d and sum in fp32 and
// pads to 48 bytes so that each 16-byte half is 16-byte aligned: a matvec
// loads a whole block as two 128-bit loads plus one scale load.
// ---------------------------------------------------------------------------
constexpr int kQ8BlockValues = 32;  // activations per block (along K)

struct alignas(16) Q8Block {
    i8  qs_even[16];   // q[2i]   for i in 0..15: pairs with the low nibbles of an Int4Weight byte
    i8  qs_odd[16];    // q[2i+1] for i in 0..15: pairs with the high nibbles
    float d;           // scale: x ~= d * q, d = max|x| / 127 (NaN if the block held NaN/Inf)
    float sum;         // d * sum(q): folds a weight zero point into one multiply-add
    u32 reserved[2];   // zero; pads the block to 48 bytes (a multiple of 16)
};
static_assert(sizeof(Q8Block) == 48, "Q8Block must be 48 bytes (3 x 16-byte loads)");
static_assert(alignof(Q8Block) == 16, "Q8Block must be 16-byte aligned");

// ---------------------------------------------------------------------------
// Int4Weight (plain layout): W [N, K], y = x @ W.T.
//   qweight uint8 [N, K/2]: byte j of row n holds k = 2j (low nibble) and
//                           k = 2j + 1 (high nibble), q in [0, 15]
//   scales  [N, K/group_size] fp16/bf16/fp32, row-major per output row
//   zeros   None (implicit zero point 8) or [N, K/group_size], scales' dtype
//   w = (q - z) * s
// ---------------------------------------------------------------------------
constexpr int kInt4SymmetricZero = 8;      // implicit zero point of symmetric weights
constexpr int kInt4KMultiple = 32;         // K must be a multiple of this (and of group_size)
constexpr u32 kLowNibbles = 0x0F0F0F0Fu;   // word & mask -> even-k weights, (word >> 4) & mask -> odd-k

// ---------------------------------------------------------------------------
// Int4TiledWeight (w4kern.prepare(weight, for_op="linear"), g128 or per channel):
//   qweight [ceil(N / 16), ceil(K / 128), 1024] uint8: chunk [T, s] holds rows
//   16T .. 16T + 15 and k 128s .. 128s + 127; byte 512h + 16l + j of the chunk is
//   plain byte 64s + 16(l % 4) + j of row 16T + l / 4 + 8h (zero past N and K / 2)
//   scales, zeros: Int4Weight's transposed, [K / group_size (1 per channel)]
//                  [ceil(N / 16) * 16], zero past N (a step's 16 rows are one run)
// ---------------------------------------------------------------------------
constexpr int kTiledRows = 16;                                // rows per tile
constexpr int kTiledStepK = 128;                              // k per chunk
constexpr int kTiledChunkBytes = kTiledRows * kTiledStepK / 2;  // 1024

}  // namespace w4kern

#if !defined(__CUDACC_RTC__)
// Host compilers (the format mirror test) also check the field offsets; NVRTC
// has no offsetof, so device builds check sizes only.
#include <cstddef>
static_assert(offsetof(w4kern::Q8Block, qs_even) == 0, "Q8Block.qs_even offset");
static_assert(offsetof(w4kern::Q8Block, qs_odd) == 16, "Q8Block.qs_odd offset");
static_assert(offsetof(w4kern::Q8Block, d) == 32, "Q8Block.d offset");
static_assert(offsetof(w4kern::Q8Block, sum) == 36, "Q8Block.sum offset");
static_assert(offsetof(w4kern::Q8Block, reserved) == 40, "Q8Block.reserved offset");
#endif
