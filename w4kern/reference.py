"""NumPy references for every op: the ground truth of the GPU tests and the
NumPy path of the public API.

Kernels are checked against these on the *same quantized inputs* (dequantized
packed weights, dequantized activation blocks), so a test's tolerance
measures the kernel, not the quantization. Math is float64 unless noted;
results are float32.
"""
from __future__ import annotations

import numpy as np

from .formats import Int4Weight, Int8Weight, PerTokenFp8, PerTokenInt8, Q8Activations
from .pack import dequantize_int4_xp, dequantize_int8
from .quant import (
    dequantize_per_token_fp8,
    dequantize_per_token_int8,
    dequantize_q8,
    quantize_per_token_int8,
)


def _numpy(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"reference.{name} takes NumPy arrays, got {type(a).__module__}.{type(a).__name__}")
    return a


def dequantize_weight(weight) -> np.ndarray:
    """float32 [..., N, K] of an Int4Weight or Int8Weight."""
    if isinstance(weight, Int4Weight):
        _numpy("dequantize_weight", weight.qweight)
        return dequantize_int4_xp(weight, np.float32)
    if isinstance(weight, Int8Weight):
        _numpy("dequantize_weight", weight.qweight)
        return dequantize_int8(weight, np.float32)
    raise TypeError(f"weight must be an Int4Weight or Int8Weight, got {type(weight).__name__}")


def dequantize_activations(x) -> np.ndarray:
    """float32 [..., K] of a float array, Q8Activations, PerTokenInt8 or PerTokenFp8."""
    if isinstance(x, Q8Activations):
        return dequantize_q8(x, np.float32)
    if isinstance(x, PerTokenInt8):
        return dequantize_per_token_int8(x, np.float32)
    if isinstance(x, PerTokenFp8):
        return dequantize_per_token_fp8(x, np.float32)
    return _numpy("dequantize_activations", x).astype(np.float32)


def linear(x, weight, bias=None) -> np.ndarray:
    """y [..., N] = x [..., K] @ W[N, K].T (+ bias [N]), for every pairing the kernels implement:

    - Int4Weight x float activations (W4A16: bf16/fp16/fp32 x)
    - Int4Weight x Q8Activations (W4A8, dp4a matvec)
    - Int8Weight x Q8Activations (W8A8)
    - Int4Weight x PerTokenInt8 / PerTokenFp8 (GEMMs with per-token activation scales)

    Computed in float64 on the dequantized operands.
    """
    w = dequantize_weight(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K] for linear, got shape {w.shape}")
    a = dequantize_activations(x).astype(np.float64)
    if a.shape[-1] != w.shape[1]:
        raise ValueError(f"x's K={a.shape[-1]} does not match weight's K={w.shape[1]}")
    y = a @ w.astype(np.float64).T
    if bias is not None:
        y = y + _numpy("linear", bias).astype(np.float64)
    return y.astype(np.float32)


def moe_align_block_size(topk_ids, num_experts: int, block_size: int, expert_map=None):
    """Group the flat (token, slot) indices t * k + j by expert, each expert's run
    padded to a multiple of ``block_size`` (DESIGN.md, "MoE routing and alignment").

    Returns (sorted_token_ids int32 [max_padded], expert_ids int32
    [max_padded // block_size], num_tokens_post_padded int32 [1]) with
    max_padded = T * k + num_experts * (block_size - 1). Experts come in
    ascending (local) id order and, within an expert, indices ascend. Padding
    and unused tail entries hold the sentinel T * k; unused blocks have expert
    id -1. With ``expert_map`` int32 [num_experts] (global -> local id, -1 =
    not on this GPU) entries of non-local experts are dropped and blocks carry
    local ids.
    """
    ids = _numpy("moe_align_block_size", topk_ids)
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {ids.shape}")
    t, k = ids.shape
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, num_experts={num_experts})")
    if expert_map is not None:
        local = _numpy("moe_align_block_size", expert_map).astype(np.int64)[flat]
    else:
        local = flat
    sentinel = t * k
    max_padded = t * k + num_experts * (block_size - 1)
    sorted_ids = np.full(max_padded, sentinel, dtype=np.int32)
    expert_ids = np.full(max_padded // block_size, -1, dtype=np.int32)
    pos = 0
    for e in range(num_experts):
        members = np.flatnonzero(local == e)
        padded = -(-members.size // block_size) * block_size
        sorted_ids[pos:pos + members.size] = members
        expert_ids[pos // block_size:(pos + padded) // block_size] = e
        pos += padded
    return sorted_ids, expert_ids, np.array([pos], dtype=np.int32)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _requantize_int8(v: np.ndarray) -> np.ndarray:
    """Round-trip float rows through per-token INT8 (what the A8 path feeds its MMA)."""
    return dequantize_per_token_int8(quantize_per_token_int8(v.astype(np.float32))).astype(np.float64)


def fused_moe(x, w13: Int4Weight, w2: Int4Weight, topk_weights, topk_ids, activation: str = "bf16"):
    """The whole MoE layer: y[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(g) * u),
    [g; u] = W13[e] @ x[t], e = topk_ids[t, j].

    x float [T, H]; w13 Int4Weight [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up);
    w2 Int4Weight [E, H, I]; topk_weights float32 [T, k]; topk_ids int32 [T, k].
    activation "bf16": x as given. "int8": x quantized per token to INT8
    before GEMM1 and each (token, expert) intermediate row before GEMM2, as
    the A8 kernels do. Returns float32 [T, H].
    """
    weights = _numpy("fused_moe", topk_weights).astype(np.float64)
    out = np.zeros((np.shape(x)[0], w2.shape[-2]), dtype=np.float64)
    for tok, slot, a, w2e in moe_expert_rows(x, w13, w2, topk_ids, activation):
        if activation == "int8":
            a = _requantize_int8(a)
        np.add.at(out, tok, weights[tok, slot][:, None] * (a @ w2e.T))
    return out.astype(np.float32)


def moe_expert_rows(x, w13: Int4Weight, w2: Int4Weight, topk_ids, activation: str = "bf16"):
    """fused_moe's intermediates, one routed expert at a time: yields (tok, slot, a,
    w2e) with a = silu(g) * u [rows, I] float64 for the (token, slot) pairs routed to
    the expert (before the int8 path's requantization of a) and w2e its dequantized
    W2 [H, I] float64. Arguments as for fused_moe."""
    if activation not in ("bf16", "int8"):
        raise ValueError(f"activation must be 'bf16' or 'int8', got {activation!r}")
    x = _numpy("fused_moe", x).astype(np.float32)
    ids = _numpy("fused_moe", topk_ids)
    w13f = dequantize_weight(w13).astype(np.float64)
    w2f = dequantize_weight(w2).astype(np.float64)
    if w13f.ndim != 3 or w2f.ndim != 3:
        raise ValueError("w13 and w2 must be stacked expert weights [E, N, K]")
    inter = w13f.shape[1] // 2
    xin = _requantize_int8(x) if activation == "int8" else x.astype(np.float64)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        h = xin[tok] @ w13f[e].T
        yield tok, slot, _silu(h[:, :inter]) * h[:, inter:], w2f[e]


def decode_attention(q, k_cache, v_cache, kv_lens, *, scale=None, block_table=None):
    """One query token per sequence over its KV cache, with GQA; float64 softmax.

    q [B, Hq, D]; contiguous caches k/v [B, Hkv, L_max, D], or paged caches
    k/v [num_pages, page_size, Hkv, D] with block_table int32 [B, max_pages];
    kv_lens int32 [B]. Query head h reads KV head h // (Hq // Hkv). A sequence
    of length 0 gives zeros. Returns float32 [B, Hq, D].
    """
    q = _numpy("decode_attention", q).astype(np.float64)
    kv_lens = _numpy("decode_attention", kv_lens)
    b, hq, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    out = np.zeros((b, hq, d), dtype=np.float64)
    for i in range(b):
        length = int(kv_lens[i])
        if length == 0:
            continue
        if block_table is None:
            keys = k_cache[i, :, :length].astype(np.float64)              # [Hkv, L, D]
            values = v_cache[i, :, :length].astype(np.float64)
        else:
            page_size = k_cache.shape[1]
            pages = block_table[i, : -(-length // page_size)]
            keys = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:length].transpose(1, 0, 2)
            values = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:length].transpose(1, 0, 2)
            keys, values = keys.astype(np.float64), values.astype(np.float64)
        hkv = keys.shape[0]
        qh = q[i].reshape(hkv, hq // hkv, d)
        scores = np.einsum("hgd,hld->hgl", qh, keys) * scale
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[i] = np.einsum("hgl,hld->hgd", p, values).reshape(hq, d)
    return out.astype(np.float32)
