// matvec_q8: y[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for INT4 or INT8
// weights against Q8 activation blocks, with dp4a (llama.cpp's MMVQ idea).
//
// Work split: kSplit warps of a CTA share kRows consecutive weight rows (a row
// group) and split its K; their lanes stride over the K/32 Q8 blocks, so
// consecutive lanes read consecutive 16-byte pieces of each row (coalesced),
// and every activation block a lane loads is reused for kRows rows. Many rows
// per warp save activation loads; splitting K keeps enough warps (and loads
// in flight) on layers with few rows. Warps reduce with shuffles, and split
// warps through shared memory. CTAs are persistent: the grid holds as many as
// the GPU keeps resident, each walking many row groups with its next loads
// always in flight.
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
//
// Item modes (kItemMode, the MoE int8 decode path's expert GEMMs):
//   kPerItem (GEMM1): blockIdx.y is an item (common/moe_items.cuh): expert
//     item_experts[i]'s weights, the activation rows of item i / act_item_div,
//     output rows i * M ...; zeros for an id outside [0, E).
//   kTokenSum (GEMM2 with the combine fused): blockIdx.y is a token t with
//     k = act_item_div slots (k <= 32). Its K runs over the k slots one after
//     another: virtual K block v = j * n_blocks + b is block b of slot j, so the
//     activation blocks are simply rows t * k .. t * k + k - 1 read as one long
//     row, while the weights of block v come from expert item_experts[t * k + j].
//     The slot's weight item_weights[t * k + j] scales the activation's d and
//     sum, so y[t] = sum_j w_j W[e_j] a_j comes out of one fixed-order reduction
//     (the same bits every run); a slot whose id is outside [0, E) is left out,
//     as moe_combine_kernel leaves it out. Lane j holds slot j's expert and
//     weight, and the walk reads them with shuffles (no dependent loads).
#include "common/matvec_q8_walk.cuh"

namespace w4kern {

template <int kWeightBits, typename ScaleT, bool kHasZeros, int kMaxM, int kRows, int kUnroll, int kSplit,
          int kItemMode>
__global__ void __launch_bounds__(kMatvecThreads) matvec_q8_kernel(
    const u8* __restrict__ qweight, const ScaleT* __restrict__ scales, const ScaleT* __restrict__ zeros,
    const Q8Block* __restrict__ act, const void* __restrict__ bias, void* __restrict__ out,
    i32 n_rows, i32 m_tokens, i32 n_blocks, i32 n_groups, i32 group_shift, i32 out_kind,
    const i32* __restrict__ item_experts, const float* __restrict__ item_weights, i32 n_experts,
    i32 act_item_div)
{
    // Under a programmatic dependent launch (the op's quantizer just before), the
    // weights of the first step are in flight while that kernel finishes: they are
    // the op's constant input, while the activations and the output wait for it.
    pdl_launch_dependents();
    matvec_q8_walk<kWeightBits, ScaleT, kHasZeros, kMaxM, kRows, kUnroll, kSplit, kItemMode>(
        qweight, scales, zeros, act, bias, out, n_rows, m_tokens, n_blocks, n_groups, group_shift, out_kind,
        item_experts, item_weights, n_experts, act_item_div, blockIdx.x, gridDim.x, blockIdx.y, [] { pdl_wait(); });
}

}  // namespace w4kern
