// One item of fused_moe's decode paths: a (token, expert slot) pair that a
// matvec launch (matvec_q8 or matvec_a16, items mode) handles as blockIdx.y.
//
// Item i reads the weights of expert item_experts[i] from stacked [E, N, ...]
// weights and the activation rows of item i / act_item_div, and writes output
// rows i * M ... An expert id outside [0, E) is the caller's error: that item
// reads expert 0 and writes zeros (never out of bounds).
#pragma once

#include "types.cuh"

namespace w4kern {

struct MoeItem {
    int expert;      // the expert whose weights the item reads (0 when dropped)
    bool dropped;    // the id was out of range: the item writes zeros
    i64 act_row;     // first activation row of the item
    i64 out_base;    // first output element of the item

    // Moves stacked [E, N, ...] weight pointers (qweight rows of row_bytes, scales
    // and zeros rows of n_groups) to this item's expert. The pointer types are
    // template parameters so that the kernels' __restrict__ parameters bind.
    template <bool kHasZeros, typename WeightPtr, typename ScalePtr>
    __device__ __forceinline__ void move_to_expert(WeightPtr& qweight, ScalePtr& scales, ScalePtr& zeros,
                                                   int n_rows, i64 row_bytes, int n_groups) const {
        qweight += static_cast<i64>(expert) * n_rows * row_bytes;
        scales += static_cast<i64>(expert) * n_rows * n_groups;
        if constexpr (kHasZeros) zeros += static_cast<i64>(expert) * n_rows * n_groups;
    }
};

__device__ __forceinline__ MoeItem moe_item(const i32* __restrict__ item_experts, int n_experts, int act_item_div,
                                            int m_tokens, int n_rows) {
    const int item = blockIdx.y;
    const int e = item_experts[item];
    const bool dropped = e < 0 || e >= n_experts;
    return MoeItem{dropped ? 0 : e, dropped, static_cast<i64>(item / act_item_div) * m_tokens,
                   static_cast<i64>(item) * m_tokens * n_rows};
}

}  // namespace w4kern
