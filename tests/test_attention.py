"""w4kern.decode_attention on the NumPy path: the reference's semantics and every bad-input rule."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference

BF16 = w4kern.bfloat16


def _contiguous(rng, b=3, hq=8, hkv=2, d=64, l_max=40):
    q = rng.standard_normal((b, hq, d)).astype(BF16)
    k = rng.standard_normal((b, hkv, l_max, d)).astype(BF16)
    v = rng.standard_normal((b, hkv, l_max, d)).astype(BF16)
    return q, k, v


def _to_paged(k, lens, page_size, rng):
    """The same cache as pages [num_pages, page_size, Hkv, D], shuffled, with a block table."""
    b, hkv, l_max, d = k.shape
    pages_per_seq = -(-l_max // page_size)
    order = rng.permutation(b * pages_per_seq)
    paged = np.zeros((b * pages_per_seq, page_size, hkv, d), k.dtype)
    table = np.full((b, pages_per_seq), -1, np.int32)
    for i in range(b):
        for p in range(-(-int(lens[i]) // page_size)):
            slot = order[i * pages_per_seq + p]
            chunk = k[i, :, p * page_size:(p + 1) * page_size].transpose(1, 0, 2)
            paged[slot, :chunk.shape[0]] = chunk
            table[i, p] = slot
    return paged, table


def test_matches_the_reference_with_gqa_and_mixed_lengths(rng):
    q, k, v = _contiguous(rng)
    lens = np.array([40, 0, 17], np.int32)
    y = w4kern.decode_attention(q, k, v, lens)
    assert y.dtype == BF16 and y.shape == q.shape
    np.testing.assert_array_equal(y, reference.decode_attention(q, k, v, lens).astype(BF16))
    assert (y[1].astype(np.float32) == 0).all()                       # length 0 gives zeros


def test_paged_equals_contiguous(rng):
    q, k, v = _contiguous(rng, l_max=48)
    lens = np.array([48, 1, 33], np.int32)
    kp, table = _to_paged(k, lens, 16, rng)
    vp2 = np.zeros_like(kp)                                           # v in k's page order
    for i in range(3):
        for p in range(-(-int(lens[i]) // 16)):
            chunk = v[i, :, p * 16:(p + 1) * 16].transpose(1, 0, 2)
            vp2[table[i, p], :chunk.shape[0]] = chunk
    got = w4kern.decode_attention(q, kp, vp2, lens, block_table=table)
    np.testing.assert_array_equal(got, w4kern.decode_attention(q, k, v, lens))   # the same values, pages shuffled


def test_out_and_scale(rng):
    q, k, v = _contiguous(rng)
    lens = np.array([5, 6, 7], np.int32)
    out = np.full(q.shape, np.nan, BF16)
    assert w4kern.decode_attention(q, k, v, lens, scale=0.5, out=out) is out
    np.testing.assert_array_equal(out, reference.decode_attention(q, k, v, lens, scale=0.5).astype(BF16))


def test_bad_input(rng):
    q, k, v = _contiguous(rng)
    lens = np.array([5, 6, 7], np.int32)
    call = w4kern.decode_attention
    with pytest.raises(ValueError, match="Hq=6 heads must be a multiple of the caches' Hkv=4"):
        call(q[:, :6].copy(), np.concatenate([k, k], 1), np.concatenate([v, v], 1), lens)
    with pytest.raises(ValueError, match="head dim D=64 does not match q's D=128"):
        call(rng.standard_normal((3, 8, 128)).astype(BF16), k, v, lens)
    with pytest.raises(ValueError, match="D=48 is not supported"):
        call(rng.standard_normal((3, 8, 48)).astype(BF16), k, v, lens)
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, 40\]"):
        call(q, k, v, np.array([5, 41, 7], np.int32))
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, 40\]"):
        call(q, k, v, np.array([5, -1, 7], np.int32))
    with pytest.raises(TypeError, match="kv_lens must have dtype in \\(int32\\)"):
        call(q, k, v, lens.astype(np.int64))
    with pytest.raises(ValueError, match=r"kv_lens must have shape \(3,\)"):
        call(q, k, v, lens[:2].copy())
    with pytest.raises(TypeError, match="k_cache must have q's dtype bfloat16, got float16"):
        call(q, k.astype(np.float16), v, lens)
    with pytest.raises(ValueError, match="k_cache and v_cache must have one shape"):
        call(q, k, v[:, :, :20].copy(), lens)
    with pytest.raises(ValueError, match="the contiguous caches hold 2 sequences but q has B=3"):
        call(q, k[:2].copy(), v[:2].copy(), lens)
    with pytest.raises(TypeError, match="q must have dtype in"):
        call(q.astype(np.float32), k, v, lens)
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        call(q, k, v, lens, num_splits=0)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 8, 64\)"):
        call(q, k, v, lens, out=np.empty((3, 8, 32), BF16))
    kp, table = _to_paged(k, np.array([40, 40, 40], np.int32), 16, rng)
    with pytest.raises(ValueError, match="block_table has 2 rows but q has B=3"):
        call(q, kp, kp, lens, block_table=table[:2].copy())
    with pytest.raises(TypeError, match="block_table must have dtype in \\(int32\\)"):
        call(q, kp, kp, lens, block_table=table.astype(np.int64))
    bad = table.copy()
    bad[0, 0] = 999
    with pytest.raises(ValueError, match="block_table's used entries must be page indices"):
        call(q, kp, kp, lens, block_table=bad)
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, 48\]"):
        call(q, kp, kp, np.array([49, 1, 1], np.int32), block_table=table)
    tiny = np.zeros((4, 8, 2, 64), BF16)
    with pytest.raises(ValueError, match=r"page_size=8 must lie in \[16, 256\]"):
        call(q, tiny, tiny, lens, block_table=np.zeros((3, 1), np.int32))


def test_split_rule():
    from w4kern.attention import choose_splits, resident_ctas, ring_stages

    # shared memory per SM bounds the resident CTAs: 4, 2, 2, 1 at 3 stages, 3 at 1
    assert [resident_ctas(d, 3) for d in (64, 96, 128, 256)] == [4, 2, 2, 1]
    assert resident_ctas(128, 2) == 3
    assert resident_ctas(256, 1) == 3
    assert choose_splits(1, 8, 4, 255, 132, 2) == 1                 # short caches are not split
    assert choose_splits(1, 8, 4, 32768, 132, 2) == 33              # one wave of resident CTAs
    assert choose_splits(1, 8, 4, 256, 132, 2) == 4                 # at least 64 tokens per split
    assert choose_splits(1, 8, 4, 1024, 132, 2) == 16
    assert choose_splits(1, 8, 4, 2048, 132, 2) == 16               # more than 16 only at 256 tokens a split
    assert choose_splits(1, 8, 4, 8192, 132, 2) == 32
    assert choose_splits(1, 8, 16, 32768, 132, 2) == 16             # 16 heads per KV head: 2 CTAs
    assert choose_splits(64, 8, 16, 2048, 132, 2) == 1              # the batch fills the GPU
    assert choose_splits(1, 1, 1, 10**7, 132, 16) == 256            # capped
    # the deepest ring the GPU's per-CTA shared memory allows (less 1 KiB for static use)
    assert ring_stages(256, 232448 - 1024) == 3                    # sm_90
    assert ring_stages(256, 166912 - 1024) == 1                    # sm_80
    assert ring_stages(128, 101376 - 1024) == 2                    # sm_89
    assert ring_stages(128, 166912 - 1024) == 3                    # sm_80
    # a grid of 4 waves or more takes the shallow ring where the deep one leaves one CTA per SM
    assert ring_stages(256, 232448 - 1024, ctas=1024, sm_count=132) == 1
    assert ring_stages(256, 232448 - 1024, ctas=512, sm_count=132) == 3
    assert ring_stages(128, 232448 - 1024, ctas=4096, sm_count=132) == 3   # 2 CTAs per SM already
    with pytest.raises(ValueError, match="head dim 256 needs 67584 bytes of shared memory"):
        ring_stages(256, 48 * 1024)


def test_shared_memory_mirror():
    """attention_smem_bytes mirrors AttnShape<kDim, kStages>::kSmemBytes: per warp,
    the stages' 16 rows of K and V, each padded by 16 bytes."""
    from w4kern._registry import FAMILIES, attention_smem_bytes

    assert [attention_smem_bytes(d, 3) for d in (64, 96, 128, 256)] == [55296, 79872, 104448, 202752]
    assert attention_smem_bytes(256, 1) == 67584
    assert attention_smem_bytes(128, 2) == 69632
    assert FAMILIES["decode_attention"].max_dynamic_smem == 202752
