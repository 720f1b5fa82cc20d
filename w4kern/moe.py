"""Mixture-of-experts ops: routing, expert alignment and the fused layer.

``topk_route`` runs on NumPy and CuPy arrays alike (array ops only).
``moe_align_block_size`` runs ``cuda_src/moe_align.cu`` on CuPy arrays (three
launches, output shapes known without a device read) and the NumPy reference
on NumPy arrays. ``fused_moe`` validates its arguments on both sides and runs
the NumPy reference on NumPy arrays; on CuPy arrays it runs a decode path (up
to MOE_DECODE_MAX_TOKENS tokens: a matvec over each (token, expert) pair, dp4a
for "int8" (whose second GEMM sums a token's experts itself), W4A16 tensor cores
for "bf16": ``_fused_moe_decode_cuda``) or the
batched path
(``_fused_moe_batched_cuda``: alignment, then the tensor-core expert GEMMs of
``cuda_src/moe_gemm.cu``, A16 or A8). Never a fallback to the host.

Contracts (DESIGN.md, "MoE routing and alignment"): ``topk_ids`` int32 [T, k],
``topk_weights`` float32 [T, k]; expert weights are stacked Int4Weight
[E, N, K // 2] (w13: [E, 2I, H], gate rows first; w2: [E, H, I]).
"""
from __future__ import annotations

import os

import numpy as np

from ._arrays import (
    accepts_dlpack,
    array_module,
    check_contiguous,
    check_dtype,
    check_ndim,
    check_out,
    check_shape,
    deliver,
)
from .formats import FLOAT_DTYPES, Q8_BLOCK_BYTES, Q8_BLOCK_VALUES, Int4Weight

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("bf16", "int8")


@accepts_dlpack("logits")
def topk_route(logits, k: int, *, scoring: str = "softmax", renormalize: bool = True):
    """Pick each token's top-k experts from router logits.

    Parameters
    ----------
    logits : float32 | float16 | bfloat16 [T, E]
    k : 1 <= k <= E
    scoring : "softmax" (probabilities over all E experts) or "sigmoid"
        (independent scores, as in DeepSeek-V3)
    renormalize : scale each token's k weights to sum to 1

    Returns (topk_weights float32 [T, k], topk_ids int32 [T, k]), experts in
    descending score; equal scores keep the lower expert id first. Scores are
    computed in float32.
    """
    xp = array_module(logits=logits)
    check_dtype("logits", logits, FLOAT_DTYPES)
    check_ndim("logits", logits, 2, "[T, E]")
    n_experts = logits.shape[1]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n_experts:
        raise ValueError(f"k must be an integer in [1, E={n_experts}], got {k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    z = logits.astype(np.float32)
    if scoring == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        e = xp.exp(z)
        scores = e / e.sum(axis=1, keepdims=True)
    else:
        scores = np.float32(1) / (np.float32(1) + xp.exp(-z))
    # a stable sort of -score: descending score, ties by ascending expert id
    ids = xp.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
    weights = xp.take_along_axis(scores, ids.astype(np.int64), axis=1).astype(np.float32)
    if renormalize:
        total = weights.sum(axis=1, keepdims=True)
        weights = weights / xp.where(total == 0, xp.ones_like(total), total)
    return weights, ids


def _check_ids(xp, topk_ids, num_experts):
    check_dtype("topk_ids", topk_ids, [np.int32])
    check_ndim("topk_ids", topk_ids, 2, "[T, k]")
    if topk_ids.shape[1] == 0:
        raise ValueError("topk_ids must have k >= 1 columns, got shape " + str(tuple(topk_ids.shape)))
    check_contiguous("topk_ids", topk_ids)
    if not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    # the ids' range needs a device read on the GPU: checked on the NumPy path only
    if xp is np and topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        raise ValueError(
            f"topk_ids must lie in [0, num_experts={num_experts}), got values in "
            f"[{int(topk_ids.min())}, {int(topk_ids.max())}]"
        )


def _debug_check_ids(xp, topk_ids, num_experts):
    """W4KERN_DEBUG=1: the GPU path checks the ids' range too (a device read, so only
    on request; otherwise ids outside [0, E) are the caller's contract)."""
    if xp is not np and os.environ.get("W4KERN_DEBUG"):
        _check_ids(np, xp.asnumpy(topk_ids), num_experts)


@accepts_dlpack("topk_ids", "expert_map")
def moe_align_block_size(topk_ids, num_experts: int, block_size: int, expert_map=None):
    """Group the flat (token, slot) indices t * k + j by expert, each expert's run
    padded to a multiple of ``block_size`` (DESIGN.md): returns
    (sorted_token_ids int32 [max_padded], expert_ids int32 [max_padded // block_size],
    num_tokens_post_padded int32 [1]) with max_padded = T * k + E * (block_size - 1),
    so the shapes are known without reading the device. See ``reference.moe_align_block_size``
    for the order and the sentinel values. On the GPU, num_experts is at most
    ``_registry.MOE_ALIGN_MAX_EXPERTS`` (4096; ValueError beyond) and ids outside
    [0, num_experts) are the caller's contract (dropped, never written out of bounds).
    """
    xp = array_module(topk_ids=topk_ids, expert_map=expert_map)
    _check_ids(xp, topk_ids, num_experts)
    _debug_check_ids(xp, topk_ids, num_experts)
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if expert_map is not None:
        check_dtype("expert_map", expert_map, [np.int32])
        check_shape("expert_map", expert_map, (num_experts,), "[num_experts]")
    if xp is not np:
        return _moe_align_cuda(xp, topk_ids, int(num_experts), int(block_size), expert_map)
    from . import reference

    return reference.moe_align_block_size(topk_ids, num_experts, block_size, expert_map)


def _moe_align_cuda(cp, topk_ids, num_experts, block_size, expert_map, scratch=False):
    """cuda_src/moe_align.cu: count per chunk, offsets in one CTA, scatter per chunk.
    Expert ids outside [0, num_experts) are the caller's error: they are dropped.
    scratch: the outputs are the stream workspace's (fused_moe's own use), not new arrays."""
    from . import _runtime
    from ._registry import (
        MOE_ALIGN_MATRIX_COUNTS,
        MOE_ALIGN_MAX_CHUNKS,
        MOE_ALIGN_MAX_EXPERTS,
        MOE_ALIGN_WARPS,
        MOE_OFFSETS_THREADS,
        cxx_bool,
        moe_align_chunk,
    )
    from .linear import _pointer, _Workspace

    if num_experts > MOE_ALIGN_MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts}: the GPU kernels take at most {MOE_ALIGN_MAX_EXPERTS} "
                         "experts (a shared-memory counter row per warp); the NumPy path takes any number")
    t, k = topk_ids.shape
    n = t * k
    max_padded = n + num_experts * (block_size - 1)
    if scratch:
        ws = _Workspace.get(cp)
        sorted_ids = ws.scratch("moe_sorted_ids", (max_padded,), np.int32)
        expert_ids = ws.scratch("moe_expert_ids", (max_padded // block_size,), np.int32)
        post_padded = ws.scratch("moe_post_padded", (1,), np.int32)
    else:
        sorted_ids = cp.empty(max_padded, dtype=np.int32)
        expert_ids = cp.empty(max_padded // block_size, dtype=np.int32)
        post_padded = cp.empty(1, dtype=np.int32)
    chunk = moe_align_chunk(n, num_experts)
    chunks = -(-n // chunk)
    assert chunks <= MOE_ALIGN_MAX_CHUNKS and chunks * num_experts <= MOE_ALIGN_MATRIX_COUNTS
    counts = _Workspace.get(cp).moe_counts(max(chunks, 1) * num_experts)
    emap = _pointer(expert_map)
    ctas = -(-chunks // MOE_ALIGN_WARPS)
    rows_smem = MOE_ALIGN_WARPS * num_experts * 4

    def walk_chunks(scatter):   # moe_chunk_kernel: count (False) or scatter (True)
        _runtime.get_kernel("moe_chunks", (str(MOE_ALIGN_WARPS), cxx_bool(scatter)))(
            (ctas,), (32 * MOE_ALIGN_WARPS,),
            (topk_ids, emap, counts, sorted_ids, np.int32(n), np.int32(num_experts), np.int32(chunks),
             np.int32(chunk)),
            shared_mem=rows_smem)

    if chunks:
        walk_chunks(False)
    _runtime.get_kernel("moe_offsets", (str(MOE_OFFSETS_THREADS),))(
        (1,), (MOE_OFFSETS_THREADS,), (counts, sorted_ids, expert_ids, post_padded, np.int32(chunks),
                                       np.int32(num_experts), np.int32(block_size), np.int32(max_padded),
                                       np.int32(n)),
        shared_mem=4 * max(chunks, 1) * num_experts)
    if chunks:
        walk_chunks(True)
    return sorted_ids, expert_ids, post_padded


#: fused_moe runs the decode paths (no sorting; int8 and bf16) up to this many tokens
MOE_DECODE_MAX_TOKENS = 16
#: the batched GEMMs launch one grid row (CUDA grid y, at most 65535) per aligned block
MOE_GEMM_MAX_BLOCKS = 65535
#: the batched path aligns to 64-row blocks from this many (token, slot) items per
#: expert on average (16-row blocks below). Measured on an H200 (scripts/sweep_moe_gemm.py,
#: benchmarks/results/2026-11-22-h200-session6/): at 4 and 8 items per expert the
#: 16-row blocks take 0.55x the time of 64-row ones, at 32 and 64 1.3x.
MOE_GEMM_LARGE_BLOCK_PER_EXPERT = 16
#: activation="int8" aligns to 32-row blocks (two m16 tiles) from
#: MOE_GEMM_LARGE_BLOCK_PER_EXPERT items per expert on, 64-row ones only where 32-row
#: blocks would pass MOE_GEMM_MAX_BLOCKS. Measured on an H200 (scripts/sweep_moe_gemm.py
#: --blocks, benchmarks/results/2026-11-23-h200-session14/blocks-5d8e958/), GEMM1 + GEMM2
#: with 32 / 64-row blocks: Qwen3-30B-A3B T=1024 370 / 470 us, T=4096 1215 / 1407;
#: DeepSeek-V3 T=1024 3717 / 4748, T=4096 11589 / 12724: the 64-row instance holds 8
#: warps per SM (250 registers), the 32-row one 16. (Before session 14's A8 changes
#: 64-row blocks were faster from about 128 items per expert.) The A16 kernels were
#: slower at 32 rows than at 64 (session 12: 7970 vs 6842, 774 vs 581 us).
#: the batched GEMMs' persistent CTAs (one grid of resident CTAs walking the (block,
#: column tile) pairs in groups of MOE_GEMM_GROUP_M blocks, moe_gemm.cu's
#: moe_walk_tiles): per GPU, the activations ("int8" / "bf16") that take them;
#: measured with scripts/sweep_moe_gemm.py --persistent. None does: on an H200 they
#: were slower on every GEMM of both layers at T = 128, 1024 and 4096 (A8 +0.9 to
#: +9.2%, A16 +5.3 to +16.5%; benchmarks/results/2026-11-23-h200-session13/
#: persistent-542f094/), and as slow with GROUP_SIZE_M = 1, the one-CTA-per-pair
#: grid's own order (persistent-group1-542f094/): the loss is the persistence (a
#: CTA starts its next pair's loads only after its last pair's epilogue, where
#: separate CTAs overlap them), not the order.
MOE_GEMM_PERSISTENT: dict[str, frozenset] = {"default": frozenset()}
MOE_GEMM_GROUP_M = 8


def _fused_moe_decode_cuda(cp, x, w13, w2, topk_weights, topk_ids, out, activation):
    """The MoE decode paths: every (token, slot) pair is one item of a matvec over
    its expert's weights (no sorting, no host read); GEMM1 gives [g; u] in fp32,
    GEMM2 each pair's [H] row, and the k rows of a token are summed with their
    weights in slot order (deterministic) straight into the output. Ids outside
    [0, E) contribute zeros (the caller's contract).
    - "int8": four launches, the dp4a matvec (matvec_q8.cu) after the glue of
      moe_decode.cu: x quantized per token to INT8 (as Q8 blocks sharing the row
      scale), GEMM1 per (token, slot) item, silu(g) * u quantized per item the same
      way, then GEMM2 as one token-sum matvec per token: its K runs over the k
      slots, each slot's weight scaling its activations, so the combine is part of
      GEMM2's own fixed-order reduction (k <= 32; larger k takes a GEMM2 per item
      and the combine kernel). The quantizer is bit-identical to NumPy's
      quant.per_token_q8_blocks (tests/test_gpu_moe.py checks it).
    - "bf16": four launches, the W4A16 tensor-core matvec (matvec_a16.cu) on x
      (float32 x rounded to bfloat16 first), with silu(g) * u rounded to x's 16-bit
      type between the GEMMs (moe_silu_mul_kernel, as the batched A16 epilogue)."""
    from . import _runtime
    from ._registry import MATVEC_TOKEN_SUM_MAX_SLOTS, MOE_COMBINE_THREADS, cxx_type
    from .linear import _launch_a16_items, _launch_matvec_items, _launch_matvec_token_sums, _Workspace

    t, hidden = x.shape
    k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    # H and I are the weights' K: Int4Weight keeps K a multiple of 32 (a Q8 block)
    y = out if out is not None else cp.empty((t, hidden), dtype=x.dtype)
    if t == 0:
        return y
    ids = topk_ids.reshape(t * k)
    # the intermediates live in the stream's workspace: no allocation per call, and a
    # captured graph keeps them (Workspace.scratch)
    ws = _Workspace.get(cp)
    gate_up = ws.scratch("moe_gate_up", (t * k, 2 * inter), np.float32)
    if activation == "int8":
        # each kernel is a programmatic dependent launch (while a graph is captured):
        # the first one's CTAs start while the previous op ends and wait for it, each
        # later one's fetch their first weights while the one before ends
        topk_weights = cp.ascontiguousarray(topk_weights)   # (topk_ids is checked contiguous)
        x_blocks = _token_q8_blocks(cp, x, "moe_x_q8", pdl="first")
        _launch_matvec_items(cp, w13, x_blocks, gate_up, ids, k, pdl=True)
        inter_blocks = _token_q8_blocks(cp, gate_up, "moe_inter_q8", silu_gate_up=True, pdl="chained")
        if k <= MATVEC_TOKEN_SUM_MAX_SLOTS:
            _launch_matvec_token_sums(cp, w2, inter_blocks, y, topk_ids, topk_weights, pdl=True)
            return y
        down = ws.scratch("moe_down", (t * k, hidden), np.float32)
        _launch_matvec_items(cp, w2, inter_blocks, down, ids, 1, pdl=True)
    else:
        down = ws.scratch("moe_down", (t * k, hidden), np.float32)
        act = _a16_activations(cp, x)
        _launch_a16_items(cp, w13, act, gate_up, ids, k)
        inter_rows = ws.scratch("moe_inter_rows", (t * k, inter), act.dtype)
        # plain launches: programmatic ones of the glue kernels measured 0.3-1.9% slower
        # here (benchmarks/results/2026-11-22-h200-session11/pdl-ab/), and matvec_a16
        # takes none (linear.py)
        _runtime.get_kernel("moe_silu_mul", (cxx_type(act.dtype),))(
            (-(-inter // MOE_COMBINE_THREADS), t * k), (MOE_COMBINE_THREADS,), (gate_up, inter_rows, np.int32(inter)))
        _launch_a16_items(cp, w2, inter_rows, down, ids, 1)
    _combine(cp, down, topk_weights, topk_ids, y, w13.shape[0])
    return y


def _a16_activations(cp, x):
    """x as the A16 GEMMs read it (both bf16 paths): its 16-bit type (float32 rounded
    to bfloat16), contiguous and 16-byte aligned (the kernels load 16-byte vectors;
    a DLPack view may start anywhere)."""
    from .formats import bfloat16
    from .linear import _Workspace

    if x.dtype != np.float32 and x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    act = _Workspace.get(cp).scratch("moe_x16", x.shape, bfloat16 if x.dtype == np.float32 else x.dtype)
    act[...] = x   # rounds float32 to bfloat16
    return act


def _combine(cp, down, topk_weights, topk_ids, y, n_experts):
    """y[t] = sum_j topk_weights[t, j] * down[t * k + j] in slot order, slots with an
    id outside [0, E) left out (moe_decode.cu, moe_combine_kernel)."""
    from . import _runtime
    from ._registry import MOE_COMBINE_THREADS, cxx_type

    t, hidden = y.shape
    _runtime.get_kernel("moe_combine", (cxx_type(y.dtype),))(
        (-(-hidden // MOE_COMBINE_THREADS), t), (MOE_COMBINE_THREADS,),
        (down, cp.ascontiguousarray(topk_weights), topk_ids, y, np.int32(hidden), np.int32(topk_ids.shape[1]),
         np.int32(n_experts)))


def moe_block_size(items: int, n_experts: int, activation: str = "bf16") -> int:
    """Alignment block of the batched path: 16 rows (one m16 tile) while the average
    expert gets fewer than MOE_GEMM_LARGE_BLOCK_PER_EXPERT items, 64 from there; for
    activation="int8" 32 from there, unless moe_align_block_size's 32-row blocks
    (items + E * 31 rows) would be more than MOE_GEMM_MAX_BLOCKS."""
    if items < MOE_GEMM_LARGE_BLOCK_PER_EXPERT * n_experts:
        return 16
    if activation == "int8" and (items + n_experts * 31) // 32 <= MOE_GEMM_MAX_BLOCKS:
        return 32
    return 64


def _fused_moe_batched_cuda(cp, x, w13, w2, topk_weights, topk_ids, out, activation):
    """The batched path: moe_align_block_size groups the (token, slot) items by expert
    in blocks, GEMM1 (moe_gemm.cu, tensor cores) computes [g; u] per item and writes
    silu(g) * u, GEMM2 writes each item's fp32 [H] row, and the combine kernel sums a
    token's rows in slot order.
    - "bf16": INT4 dequantized to x's 16-bit type in registers, 16-bit MMAs; silu(g)
      * u is rounded to that type (GEMM2's A operand). float32 x is rounded to
      bfloat16 first.
    - "int8": x quantized per token (moe_decode.cu, once, before GEMM1) and the fp32
      silu(g) * u rows per item (once, before GEMM2), both as Q8 blocks; INT4 nibbles
      feed int8 MMAs directly, scales and zero points per group."""
    from . import _runtime
    from ._registry import (cxx_bool, cxx_type, moe_gemm_a8_smem_bytes, moe_gemm_family, moe_gemm_smem_bytes,
                            moe_gemm_threads)
    from .linear import _Workspace

    t, hidden = x.shape
    k = topk_ids.shape[1]
    n_experts, two_i, _ = w13.shape
    inter = two_i // 2
    items = t * k
    y = out if out is not None else cp.empty((t, hidden), dtype=x.dtype)
    if t == 0:
        return y
    block = moe_block_size(items, n_experts, activation)
    m_tiles = block // 16
    blocks = (items + n_experts * (block - 1)) // block   # moe_align_block_size's, known from the shapes
    if blocks > MOE_GEMM_MAX_BLOCKS:
        raise ValueError(f"fused_moe: T * k = {items} items with E = {n_experts} make {blocks} aligned blocks of "
                         f"{block}; the batched GEMMs take at most {MOE_GEMM_MAX_BLOCKS} (one grid row each): "
                         "split the tokens into several calls")
    sorted_ids, expert_ids, post_padded = _moe_align_cuda(cp, topk_ids, n_experts, block, None, scratch=True)
    assert expert_ids.shape[0] == blocks
    a8 = activation == "int8"
    persistent = uses_persistent_moe_gemm(activation)

    def gemm(w, a, dst, silu, act_div):
        args = (cxx_type(w.scales.dtype), cxx_bool(w.zeros is not None), str(m_tiles), cxx_bool(silu),
                cxx_bool(persistent))
        family = moe_gemm_family(activation, persistent)
        if a8:
            kernel, smem = _runtime.get_kernel(family, args), moe_gemm_a8_smem_bytes(m_tiles)
        else:
            kernel = _runtime.get_kernel(family, (cxx_type(a.dtype),) + args)
            smem = moe_gemm_smem_bytes(m_tiles)
        launch_moe_gemm(kernel, smem, w, a, dst, silu, act_div, (sorted_ids, expert_ids, post_padded), items,
                        persistent=persistent, threads=moe_gemm_threads(activation, m_tiles))

    ws = _Workspace.get(cp)   # the intermediates: see _fused_moe_decode_cuda
    down = ws.scratch("moe_down", (items, hidden), np.float32)
    if a8:
        x_blocks = _token_q8_blocks(cp, x, "moe_x_q8")
        inter_rows = ws.scratch("moe_inter_rows", (items, inter), np.float32)
        gemm(w13, x_blocks, inter_rows, True, k)
        gemm(w2, _token_q8_blocks(cp, inter_rows, "moe_inter_q8"), down, False, 1)
    else:
        act = _a16_activations(cp, x)
        inter_rows = ws.scratch("moe_inter_rows", (items, inter), act.dtype)
        gemm(w13, act, inter_rows, True, k)
        gemm(w2, inter_rows, down, False, 1)
    _combine(cp, down, topk_weights, topk_ids, y, n_experts)
    return y


def uses_persistent_moe_gemm(activation: str) -> bool:
    """Whether the batched path's GEMMs take the persistent kernels on this GPU."""
    from .linear import _gpu_name

    table = MOE_GEMM_PERSISTENT
    return activation in table.get(_gpu_name(), table["default"])


def launch_moe_gemm(kernel, smem, w, a, dst, silu, act_div, aligned, items, *, threads, persistent=False,
                    bn=None):
    """One batched expert GEMM (a moe_gemm.cu kernel) over the aligned blocks
    ``aligned`` = moe_align_block_size's (sorted_ids, expert_ids, post_padded): a CTA
    per (column tile, block), or with ``persistent`` (a kernel of a _persistent
    family) as many CTAs as the GPU holds at once, walking the used blocks' pairs;
    GEMM1 (``silu``) tiles the I outputs of [g; u] by half a tile.
    ``threads``: the kernel's CTA size (w4kern._registry.moe_gemm_threads), ``bn`` its
    tile's weight rows (MOE_GEMM_BN). scripts/sweep_moe_gemm.py launches its variants
    through here too."""
    from ._registry import MOE_GEMM_BN
    from .linear import _resident_ctas, _sm_count

    bn = MOE_GEMM_BN if bn is None else bn
    sorted_ids, expert_ids, post_padded = aligned
    n, kd = w.shape[1], w.shape[2]
    zeros = w.zeros
    cols = -(-(n // 2) // (bn // 2)) if silu else -(-n // bn)
    if persistent:   # the used blocks are known on the device only: the most pairs there can be
        import cupy as cp

        grid = (min(cols * expert_ids.shape[0], _sm_count(cp) * _resident_ctas(kernel, threads, smem)),)
    else:
        grid = (cols, expert_ids.shape[0])
    kernel(grid, (threads,),
           (a, w.qweight, w.scales, w.scales if zeros is None else zeros, sorted_ids, expert_ids, post_padded,
            dst, np.int32(n), np.int32(kd), np.int32(w.scales.shape[-1]),
            np.int32(31 if w.group_size == -1 else int(w.group_size).bit_length() - 1),
            np.int32(items), np.int32(act_div), np.int32(w.shape[0]), np.int32(MOE_GEMM_GROUP_M)),
           shared_mem=smem)


def _token_q8_blocks(cp, rows, name=None, silu_gate_up=False, pdl=None):
    """Per-token INT8 of float rows [M, K] (or of silu(g) * u for [g; u] rows [M, 2K])
    as Q8 blocks [M, K / 32, 48] sharing the row's scale (moe_decode.cu), in the
    stream workspace's scratch buffer ``name`` (None: a new array)."""
    from .linear import _Workspace
    from .quant import _quantize_per_token_cuda

    rows = cp.ascontiguousarray(rows)
    if rows.data.ptr % 16:   # moe_decode.cu loads 16-byte vectors (a DLPack view may start anywhere)
        rows = rows.copy()
    m, cols = rows.shape[0], rows.shape[1] // (2 if silu_gate_up else 1)
    shape = (m, cols // Q8_BLOCK_VALUES, Q8_BLOCK_BYTES)
    blocks = cp.empty(shape, dtype=np.uint8) if name is None else _Workspace.get(cp).scratch(name, shape, np.uint8)
    _quantize_per_token_cuda(rows, blocks, silu_gate_up=silu_gate_up, pdl=pdl)
    return blocks


def _check_experts(name, w, n_experts=None):
    if not isinstance(w, Int4Weight):
        raise TypeError(f"{name} must be an Int4Weight, got {type(w).__name__}")
    if w.qweight.ndim != 3:
        raise ValueError(f"{name} must be stacked expert weights [E, N, K // 2], got qweight shape "
                         f"{tuple(w.qweight.shape)}")
    if n_experts is not None and w.qweight.shape[0] != n_experts:
        raise ValueError(f"{name} has {w.qweight.shape[0]} experts, w13 has {n_experts}")


@accepts_dlpack("x", "topk_weights", "topk_ids", "out")
def fused_moe(x, w13: Int4Weight, w2: Int4Weight, topk_weights, topk_ids, *, activation: str = "bf16",
              out=None):
    """The MoE layer: y[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(g) * u), [g; u] = W13[e] @ x[t],
    e = topk_ids[t, j].

    x bfloat16 | float16 | float32 [T, H]; w13 Int4Weight [E, 2I, H]; w2
    Int4Weight [E, H, I]; topk_weights float32 [T, k]; topk_ids int32 [T, k];
    activation "bf16" (x as given) or "int8" (per-token INT8 before each GEMM,
    as the A8 kernels do). Returns [T, H] in x's dtype (``out`` when given).

    CuPy arrays (no host read, graph-capturable):
    - activation="bf16" (float32 x is rounded to bfloat16 first): up to
      MOE_DECODE_MAX_TOKENS (16) tokens the decode path (one W4A16 tensor-core
      matvec item per (token, slot), no sorting; silu(g) * u rounded to x's
      16-bit type between the GEMMs); beyond, the batched path
      (moe_align_block_size, then two tensor-core expert GEMMs over the aligned
      blocks with INT4 dequantized in registers, SiLU * up fused into the first).
    - activation="int8": up to MOE_DECODE_MAX_TOKENS (16) tokens the decode
      path (a dp4a matvec item per (token, slot) for GEMM1, GEMM2 per token over
      its k slots with the routing weights applied, no sorting); beyond, the
      batched path with int8 tensor-core GEMMs (activations quantized per token
      once before each GEMM, INT4 nibbles fed to the MMAs as int8, scales and
      zero points applied per group).
    The k rows of a token are summed in slot order (the same bits every run).
    Ids outside [0, E) are the caller's contract on the GPU (they contribute
    zeros; W4KERN_DEBUG=1 checks them). The intermediate rows live in a
    per-stream workspace: with ``out`` given, a call after one of the same size
    on the same stream allocates nothing.
    """
    xp = array_module(x=x, qweight=w13.qweight if isinstance(w13, Int4Weight) else None,
                      topk_weights=topk_weights, topk_ids=topk_ids, out=out)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_dtype("x", x, FLOAT_DTYPES)
    check_ndim("x", x, 2, "[T, H]")
    _check_experts("w13", w13)
    n_experts, two_i, hidden = w13.shape
    _check_experts("w2", w2, n_experts)
    if two_i % 2:
        raise ValueError(f"w13 must have 2 * I rows (gate, then up), got {two_i}")
    if hidden != x.shape[1]:
        raise ValueError(f"x has H={x.shape[1]} but w13 expects H={hidden} (w13 shape [E, 2I, H] = "
                         f"{tuple(w13.shape)})")
    if tuple(w2.shape[1:]) != (hidden, two_i // 2):
        raise ValueError(f"w2 must be [E, H={hidden}, I={two_i // 2}], got {tuple(w2.shape)}")
    _check_ids(xp, topk_ids, n_experts)
    _debug_check_ids(xp, topk_ids, n_experts)
    check_dtype("topk_weights", topk_weights, [np.float32])
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape), "[T, k], like topk_ids")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has T={topk_ids.shape[0]} tokens but x has T={x.shape[0]}")
    if out is not None:
        check_out(out, x.dtype, tuple(x.shape), "[T, H]")
    if xp is not np:
        if x.shape[0] <= MOE_DECODE_MAX_TOKENS:
            return _fused_moe_decode_cuda(xp, x, w13, w2, topk_weights, topk_ids, out, activation)
        return _fused_moe_batched_cuda(xp, x, w13, w2, topk_weights, topk_ids, out, activation)
    from . import reference

    return deliver(reference.fused_moe(x, w13, w2, topk_weights, topk_ids, activation).astype(x.dtype), out)
