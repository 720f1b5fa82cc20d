"""Decode attention: one query token per sequence over its KV cache, with GQA.

``decode_attention`` validates its arguments on both sides. On NumPy arrays it
runs the NumPy reference; on CuPy arrays the flash-decoding kernels of
``cuda_src/decode_attention.cu``: one CTA per (split of a sequence, KV head,
up to 8 of its query heads), the query heads being the 8-column operand of the
tensor-core MMAs, so every K/V row loaded serves the query heads that share
it, and a merge kernel that combines the splits by their log-sum-exp. The
split count comes from :func:`choose_splits` (or ``num_splits``); the partials
live in a per-stream workspace, so after a first call of the same size the op
allocates nothing and is CUDA-graph capturable.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import _runtime
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
from ._registry import ATTENTION_HEAD_DIMS as HEAD_DIMS          # head dims of the kernel instances
from ._registry import ATTENTION_HEADS_PER_CTA as HEADS_PER_CTA  # query heads of one KV head a CTA takes
from ._registry import ATTENTION_STAGES, attention_smem_bytes
from .formats import bfloat16

DTYPES = (bfloat16, np.dtype(np.float16))
PAGE_SIZES = (16, 256)   # inclusive range

#: Split-K rule, from scripts/attention_variants.py on an H200 (graph mode; the
#: results are in benchmarks/results/): a cache of at least SPLIT_MIN_TOKENS
#: tokens is split until the grid fills SPLIT_WAVES waves of resident CTAs (as
#: many as the SM's shared memory holds, see resident_ctas), each split keeping
#: at least MIN_SPLIT_TOKENS tokens, and more than FEW_SPLITS splits only where
#: each keeps MANY_SPLIT_TOKENS. ``num_splits`` overrides it. At B=1, 32/8/128,
#: 64 tokens a split (rather than 128) took L=256 from 6.7 to 5.7 us, L=512 6.7 ->
#: 5.9, L=1024 7.0 -> 6.4, while L=2048 ran 16 splits in 7.7 us and 32 in 8.0
#: (benchmarks/results/2026-11-23-h200-session15/attention-splits/).
SPLIT_MIN_TOKENS = 256
SPLIT_WAVES = 1
MIN_SPLIT_TOKENS = 64
FEW_SPLITS = 16
MANY_SPLIT_TOKENS = 256
MAX_SPLITS = 256
MERGE_THREADS = 512            # kMergeThreads: threads of the merge kernel (at least MAX_SPLITS)
SM_SHARED_BYTES = 228 * 1024   # shared memory of an sm_90 SM (resident_ctas' default)


#: A grid of at least this many waves of CTAs takes the shallowest ring where the
#: deepest leaves one CTA (4 warps) per SM: 32/16/256 at B=64 (1024 CTAs, 7.8
#: waves) ran 3-10% faster on a 1-stage ring with 3 CTAs per SM (L=256: 72.5 vs
#: 80.3 us, L=2048: 502.8 vs 510.6), equal at 2-4 waves and slower below
#: (benchmarks/results/2026-11-22-h200-session9/variants-shallow-256/)
SHALLOW_RING_WAVES = 4


def ring_stages(head_dim: int, smem_optin: int, ctas: int = 0, sm_count: int = 1,
                sm_shared: int = SM_SHARED_BYTES) -> int:
    """The ring depth (kStages) of a launch of ``ctas`` CTAs: the deepest compiled one
    whose shared memory a CTA may have, or the shallowest where that one leaves one CTA
    per SM (of ``sm_shared`` bytes) and the grid holds SHALLOW_RING_WAVES waves of it."""
    fits = [s for s in ATTENTION_STAGES[head_dim] if attention_smem_bytes(head_dim, s) <= smem_optin]
    if not fits:
        raise ValueError(f"decode_attention with head dim {head_dim} needs "
                         f"{attention_smem_bytes(head_dim, min(ATTENTION_STAGES[head_dim]))} bytes of shared "
                         f"memory per CTA; this GPU offers {smem_optin}")
    if len(fits) > 1 and resident_ctas(head_dim, fits[0], sm_shared) == 1 and ctas >= SHALLOW_RING_WAVES * sm_count:
        return fits[-1]
    return fits[0]


def _cta_smem_optin(device: int) -> int:
    """Dynamic shared memory one CTA may have on ``device`` (what picks the ring depth;
    tests stand in a smaller GPU here, leaving the loaded kernels' limits alone)."""
    return _runtime.max_dynamic_smem(device)


def resident_ctas(head_dim: int, stages: int, sm_shared: int = SM_SHARED_BYTES) -> int:
    """CTAs of decode_attention_kernel one SM holds at once (shared memory bound;
    1 KiB per CTA is reserved by the driver, under 512 bytes are static)."""
    return max(1, min(16, sm_shared // (attention_smem_bytes(head_dim, stages) + 1024 + 512)))


def choose_splits(batch: int, hkv: int, group: int, capacity: int, sm_count: int, resident: int) -> int:
    """KV splits per sequence for a cache of ``capacity`` tokens (see SPLIT_MIN_TOKENS);
    ``resident``: CTAs per SM (resident_ctas)."""
    if capacity < SPLIT_MIN_TOKENS:
        return 1
    ctas = batch * hkv * -(-group // HEADS_PER_CTA)
    want = SPLIT_WAVES * resident * sm_count // max(ctas, 1)
    by_tokens = min(capacity // MIN_SPLIT_TOKENS, max(FEW_SPLITS, capacity // MANY_SPLIT_TOKENS))
    return max(1, min(want, by_tokens, MAX_SPLITS))


@accepts_dlpack("q", "k_cache", "v_cache", "kv_lens", "block_table", "out")
def decode_attention(q, k_cache, v_cache, kv_lens, *, scale=None, block_table=None, num_splits=None, out=None):
    """softmax(q k^T * scale) v for one query token per sequence.

    q : bfloat16 | float16 [B, Hq, D], D in (64, 96, 128, 256)
    k_cache, v_cache : q's dtype; contiguous [B, Hkv, L_max, D], or paged
        [num_pages, page_size, Hkv, D] (page_size 16..256) with ``block_table``
    kv_lens : int32 [B], 0 <= kv_lens[b] <= the cache length of sequence b
    block_table : int32 [B, max_pages] (paged caches): the pages of sequence b
    scale : softmax scale, default 1 / sqrt(D)
    num_splits : KV splits per sequence for the split-K kernel (None: chosen by
        a measured rule)
    out : optional [B, Hq, D] of q's dtype

    Query head h reads KV head h // (Hq // Hkv) (GQA); Hq must be a multiple
    of Hkv. A sequence of length 0 gives zeros. Softmax in fp32 (float64 on the
    NumPy path). Returns [B, Hq, D] in q's dtype.
    """
    xp = array_module(q=q, k_cache=k_cache, v_cache=v_cache, kv_lens=kv_lens, block_table=block_table, out=out)
    check_dtype("q", q, DTYPES)
    check_ndim("q", q, 3, "[B, Hq, D]")
    b, hq, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q's head dim D={d} is not supported; supported: {HEAD_DIMS}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype.name}, got {cache.dtype.name}")
        check_ndim(name, cache, 4, "[B, Hkv, L_max, D] or [num_pages, page_size, Hkv, D]")
        check_contiguous(name, cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"the caches' head dim D={k_cache.shape[3]} does not match q's D={d}")
    paged = block_table is not None
    if paged:
        _, page_size, hkv, _ = k_cache.shape
        if not PAGE_SIZES[0] <= page_size <= PAGE_SIZES[1]:
            raise ValueError(f"page_size={page_size} must lie in [{PAGE_SIZES[0]}, {PAGE_SIZES[1]}]")
        check_dtype("block_table", block_table, [np.int32])
        check_ndim("block_table", block_table, 2, "[B, max_pages]")
        if block_table.shape[0] != b:
            raise ValueError(f"block_table has {block_table.shape[0]} rows but q has B={b} sequences")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"the contiguous caches hold {k_cache.shape[0]} sequences but q has B={b}")
        hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"q's Hq={hq} heads must be a multiple of the caches' Hkv={hkv} heads (GQA)")
    check_dtype("kv_lens", kv_lens, [np.int32])
    check_shape("kv_lens", kv_lens, (b,), "[B]")
    if num_splits is not None and (not isinstance(num_splits, (int, np.integer)) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive integer or None, got {num_splits!r}")
    if scale is not None and not np.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if out is not None:
        check_out(out, q.dtype, tuple(q.shape), "[B, Hq, D]")
    if xp is not np:
        if os.environ.get("W4KERN_DEBUG"):
            # the values need a device read (a synchronization): checked only on request
            _check_values(k_cache, xp.asnumpy(kv_lens), None if block_table is None else xp.asnumpy(block_table),
                          capacity, paged)
        return _decode_attention_cuda(xp, q, k_cache, v_cache, kv_lens, scale, block_table, num_splits, out,
                                      hkv, capacity, paged)
    _check_values(k_cache, kv_lens, block_table, capacity, paged)
    from . import reference

    y = reference.decode_attention(q, k_cache, v_cache, kv_lens, scale=scale, block_table=block_table)
    return deliver(y.astype(q.dtype), out)


def _check_values(k_cache, kv_lens, block_table, capacity, paged):
    """kv_lens and the used block_table entries against the cache (host arrays)."""
    b = kv_lens.shape[0]
    if b and (kv_lens.min() < 0 or kv_lens.max() > capacity):
        raise ValueError(f"kv_lens must lie in [0, {capacity}] (the cache length), got values in "
                         f"[{int(kv_lens.min())}, {int(kv_lens.max())}]")
    if paged:
        # only the pages a sequence uses are read; entries past them may hold anything (e.g. -1)
        used = np.arange(block_table.shape[1])[None, :] < -(-kv_lens[:, None] // k_cache.shape[1])
        pages = block_table[used]
        if pages.size and (pages.min() < 0 or pages.max() >= k_cache.shape[0]):
            raise ValueError(f"block_table's used entries must be page indices in [0, {k_cache.shape[0]}), "
                             f"got values in [{int(pages.min())}, {int(pages.max())}]")


#: launch plans by (device, stream, shapes, dtype, layout, num_splits, scale): a plain
#: (non-graph) call is host-bound at short contexts, so a repeat call only validates,
#: looks its plan up and launches
_PLANS: dict[tuple, tuple] = _runtime.plan_cache()


def _decode_attention_cuda(cp, q, k_cache, v_cache, kv_lens, scale, block_table, num_splits, out, hkv, capacity,
                           paged):
    b = q.shape[0]
    if out is None:
        out = cp.empty(q.shape, dtype=q.dtype)
    if b == 0:
        return out
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if a.data.ptr % 16:
            raise ValueError(f"{name} must be 16-byte aligned for the kernel's vector loads")
    key = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr, os.environ.get("W4KERN_CUDA_SRC"), q.shape,
           q.dtype, k_cache.shape, None if block_table is None else block_table.shape, num_splits, scale)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _attention_plan(cp, q, k_cache, block_table, num_splits, scale, hkv, capacity, paged)
    kernel, grid, smem, head, tail, merge, merge_args = plan
    table = block_table if paged else kv_lens   # any int32 pointer: the contiguous kernel never reads it
    pdl = _runtime.pdl_enabled() if merge is not None or _runtime.FIRST_KERNEL_PDL else False
    # the op's first kernel: a programmatic launch waits for its predecessor before it touches memory
    _runtime.launch(kernel, grid, (128,), (q, k_cache, v_cache, kv_lens, table, out) + head + tail,
                    shared_mem=smem, pdl=pdl and _runtime.FIRST_KERNEL_PDL, checked=True)
    if merge is not None:   # a programmatic dependent launch: it waits for the splits
        _runtime.launch(merge, (b * q.shape[1],), (MERGE_THREADS,), merge_args[:2] + (out,) + merge_args[2:],
                        pdl=pdl, checked=True)
    return out


def _attention_plan(cp, q, k_cache, block_table, num_splits, scale, hkv, capacity, paged):
    """(kernel, grid, shared memory, split-K scratch, scalar arguments, merge kernel
    or None, its arguments but the output) of one decode_attention call."""
    from ._registry import cxx_bool, cxx_type
    from .linear import _sm_count, _Workspace

    b, hq, d = q.shape
    group = hq // hkv
    device = cp.cuda.runtime.getDevice()
    optin, sms = _cta_smem_optin(device), _sm_count(cp)
    stages = ring_stages(d, optin)
    sm_shared = int(cp.cuda.Device(device).attributes["MaxSharedMemoryPerMultiprocessor"])
    resident = resident_ctas(d, stages, sm_shared)
    splits = num_splits if num_splits is not None else choose_splits(b, hkv, group, capacity, sms, resident)
    splits = int(min(splits, MAX_SPLITS))
    # the split count is the deep ring's: a grid of SHALLOW_RING_WAVES waves has one split
    stages = ring_stages(d, optin, splits * hkv * -(-group // HEADS_PER_CTA) * b, sms, sm_shared)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kernel = _runtime.get_kernel("decode_attention", (cxx_type(q.dtype), str(d), cxx_bool(paged), str(stages)))
    if paged:
        rows, max_pages, n_pages = k_cache.shape[1], block_table.shape[1], k_cache.shape[0]
        if n_pages == 0:
            capacity = 0         # nothing to read: every sequence attends to nothing
    else:
        rows, max_pages, n_pages = k_cache.shape[2], 0, 0
    n_o = b * hq * splits * d if splits > 1 else 0
    # the plan keeps its views of the stream's workspace: if the workspace grows
    # later, they keep the old buffer alive and stay this plan's alone
    scratch = _Workspace.get(cp).attention_partials(n_o + 2 * b * hq * splits if splits > 1 else 1)
    part_o, part_ml = scratch[:n_o], scratch[n_o:]
    grid = (splits, hkv * -(-group // HEADS_PER_CTA), b)
    tail = (np.int32(hq), np.int32(hkv), np.int32(rows), np.int32(max_pages), np.int32(n_pages),
            np.int32(capacity), np.int32(splits), np.float32(scale * math.log2(math.e)))
    merge, merge_args = None, ()
    if splits > 1:
        merge = _runtime.get_kernel("decode_attention_merge", (cxx_type(q.dtype), str(d)))
        merge_args = (part_o, part_ml, np.int32(splits))
    return kernel, grid, attention_smem_bytes(d, stages), (part_o, part_ml), tail, merge, merge_args
