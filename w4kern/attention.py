"""Decode attention: one query token per sequence over its KV cache, with GQA.

``decode_attention`` validates its arguments on both sides and runs the
NumPy reference on NumPy arrays. Its split-K CUDA kernels are the work of
issue 6 and not written yet: CuPy arrays get a NotImplementedError that says
so (never a silent fallback to the host).
"""
from __future__ import annotations

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
from .formats import bfloat16

HEAD_DIMS = (64, 96, 128, 256)
DTYPES = (bfloat16, np.dtype(np.float16))
PAGE_SIZES = (16, 256)   # inclusive range


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
        raise NotImplementedError("decode_attention has no CUDA kernels yet (issue 6); "
                                  "call it on NumPy arrays for now")
    # values that need a device read on the GPU are checked here, on the host
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
    from . import reference

    y = reference.decode_attention(q, k_cache, v_cache, kv_lens, scale=scale, block_table=block_table)
    return deliver(y.astype(q.dtype), out)
