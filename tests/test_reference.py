"""The NumPy references, each checked against an independent formulation."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference


def int4_q8_dot_integer(xq, qw):
    """W4A8 as the dp4a kernels compute it: per 32-block integer dots, then d_x * s_w scaling,
    with the zero point folded through the block's sum term."""
    q_x = xq.qs.astype(np.int64).reshape(xq.shape[0], -1, 32)            # [M, nb, 32]
    q_w = w4kern.unpack_int4(qw.qweight).astype(np.int64)
    n, k = q_w.shape
    q_w = q_w.reshape(n, -1, 32)                                          # [N, nb, 32]
    gs = qw.effective_group_size
    s = np.repeat(qw.scales.astype(np.float64), gs // 32, axis=1)         # [N, nb]
    z = 8.0 if qw.zeros is None else np.repeat(qw.zeros.astype(np.float64), gs // 32, axis=1)
    dots = np.einsum("mbi,nbi->mnb", q_x, q_w).astype(np.float64)        # sum q_x * q_w
    d = xq.d.astype(np.float64)[:, None, :]
    sums = xq.sum.astype(np.float64)[:, None, :]                          # d * sum(q_x)
    return (s[None] * (d * dots - z * sums)).sum(-1)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_int4_q8_matches_integer_formulation(rng, group_size, symmetric, m):
    k = 256
    qw = w4kern.quantize_int4(rng.standard_normal((19, k)).astype(np.float32), group_size, symmetric)
    xq = w4kern.quantize_q8(rng.standard_normal((m, k)).astype(w4kern.bfloat16))
    np.testing.assert_allclose(reference.linear(xq, qw), int4_q8_dot_integer(xq, qw), rtol=1e-5, atol=1e-4)


def test_linear_int4_bf16_with_bias(rng):
    w = rng.standard_normal((12, 64)).astype(np.float32)
    qw = w4kern.quantize_int4(w, 32)
    x = rng.standard_normal((5, 64)).astype(w4kern.bfloat16)
    bias = rng.standard_normal(12).astype(np.float32)
    expected = x.astype(np.float64) @ w4kern.dequantize_int4(qw, np.float32).T.astype(np.float64) + bias
    np.testing.assert_allclose(reference.linear(x, qw, bias), expected, rtol=1e-5, atol=1e-5)


def test_linear_int8_q8(rng):
    w = rng.standard_normal((10, 128)).astype(np.float32)
    qw = w4kern.quantize_int8(w, 32)
    xq = w4kern.quantize_q8(rng.standard_normal((3, 128)).astype(np.float32))
    q_x = xq.qs.astype(np.int64).reshape(3, 4, 32)
    q_w = qw.qweight.astype(np.int64).reshape(10, 4, 32)
    expected = np.einsum("mbi,nbi,mb,nb->mn", q_x, q_w, xq.d.astype(np.float64), qw.scales.astype(np.float64))
    np.testing.assert_allclose(reference.linear(xq, qw), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quantize", [w4kern.quantize_per_token_int8, w4kern.quantize_per_token_fp8],
                         ids=["int8", "fp8"])
def test_linear_int4_per_token(rng, quantize):
    qw = w4kern.quantize_int4(rng.standard_normal((6, 64)).astype(np.float32), 64)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    xq = quantize(x)
    y = reference.linear(xq, qw)
    rel = np.linalg.norm(y - reference.linear(x, qw)) / np.linalg.norm(y)
    assert 0 < rel < 0.05
    assert reference.linear(xq, qw).dtype == np.float32


def test_linear_quality_against_unquantized(rng):
    """Quantization quality (not kernel correctness): W4A8 g128 stays close to float math."""
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    y = reference.linear(w4kern.quantize_q8(x), w4kern.quantize_int4(w, 128))
    exact = x @ w.T
    cos = np.sum(y * exact) / (np.linalg.norm(y) * np.linalg.norm(exact))
    assert cos > 0.99


def test_linear_rejects_mismatched_k(rng):
    qw = w4kern.quantize_int4(rng.standard_normal((6, 64)).astype(np.float32), 32)
    with pytest.raises(ValueError, match=r"x's K=96 does not match weight's K=64"):
        reference.linear(rng.standard_normal((2, 96)).astype(np.float32), qw)


@pytest.mark.parametrize("t,k,e,bs", [(1, 1, 8, 16), (7, 2, 8, 4), (33, 8, 60, 16), (256, 4, 128, 64)])
def test_moe_align_block_size_properties(rng, t, k, e, bs):
    ids = rng.integers(0, e, size=(t, k)).astype(np.int32)
    ids[0, :] = 0 if t == 1 else ids[0, :]
    sorted_ids, expert_ids, post = reference.moe_align_block_size(ids, e, bs)
    max_padded = t * k + e * (bs - 1)
    assert sorted_ids.shape == (max_padded,) and expert_ids.shape == (max_padded // bs,)
    total = int(post[0])
    assert total % bs == 0
    flat = ids.reshape(-1)
    real = sorted_ids[:total][sorted_ids[:total] != t * k]
    assert sorted(real.tolist()) == list(range(t * k))              # every slot exactly once
    assert (sorted_ids[total:] == t * k).all() and (expert_ids[total // bs:] == -1).all()
    for b in range(total // bs):
        members = sorted_ids[b * bs:(b + 1) * bs]
        members = members[members != t * k]
        assert (flat[members] == expert_ids[b]).all()
        assert (np.diff(members) > 0).all()                          # ascending within an expert
    assert (np.diff(expert_ids[:total // bs]) >= 0).all()            # experts in ascending order
    counts = np.bincount(flat, minlength=e)
    assert total == int(sum(-(-c // bs) * bs for c in counts))      # experts with no tokens take no block


def test_moe_align_block_size_expert_map_drops_remote_experts():
    ids = np.array([[0, 3], [2, 3], [1, 0]], dtype=np.int32)
    expert_map = np.array([-1, 0, -1, 1], dtype=np.int32)            # experts 1 and 3 live here
    sorted_ids, expert_ids, post = reference.moe_align_block_size(ids, 4, 2, expert_map)
    assert post[0] == 4
    np.testing.assert_array_equal(sorted_ids[:4], [4, 6, 1, 3])   # local 0 <- slot 4 (+ pad 6); local 1 <- 1, 3
    np.testing.assert_array_equal(expert_ids[:2], [0, 1])


def test_fused_moe_matches_dense_loop(rng):
    t, h, inter, e, k = 5, 64, 32, 4, 2
    w13 = w4kern.quantize_int4(rng.standard_normal((e, 2 * inter, h)).astype(np.float32) * 0.1, 32)
    w2 = w4kern.quantize_int4(rng.standard_normal((e, h, inter)).astype(np.float32) * 0.1, 32)
    x = rng.standard_normal((t, h)).astype(np.float32)
    ids = np.array([[0, 1], [1, 1], [3, 0], [0, 3], [3, 1]], dtype=np.int32)  # expert 2 gets no tokens
    weights = rng.random((t, k)).astype(np.float32)
    w13f, w2f = w4kern.dequantize_int4(w13, np.float32), w4kern.dequantize_int4(w2, np.float32)
    expected = np.zeros((t, h))
    for i in range(t):
        for j in range(k):
            g_u = w13f[ids[i, j]] @ x[i]
            a = g_u[:inter] / (1 + np.exp(-g_u[:inter])) * g_u[inter:]
            expected[i] += weights[i, j] * (w2f[ids[i, j]] @ a)
    np.testing.assert_allclose(reference.fused_moe(x, w13, w2, weights, ids), expected, rtol=1e-4, atol=1e-5)
    y8 = reference.fused_moe(x, w13, w2, weights, ids, activation="int8")
    cos = np.sum(y8 * expected) / (np.linalg.norm(y8) * np.linalg.norm(expected))
    assert cos > 0.999


def naive_attention(q, k, v, scale):
    s = (q @ k.T) * scale
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (7, 1)])
def test_decode_attention_matches_naive(rng, hq, hkv):
    b, d, lmax = 3, 32, 40
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, lmax, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, lmax, d)).astype(np.float32)
    lens = np.array([1, 17, 40], dtype=np.int32)
    out = reference.decode_attention(q, k, v, lens)
    for i in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            exp = naive_attention(q[i, h].astype(np.float64), k[i, g, :lens[i]], v[i, g, :lens[i]], d ** -0.5)
            np.testing.assert_allclose(out[i, h], exp, rtol=1e-5, atol=1e-6)


def test_decode_attention_paged_equals_contiguous_and_empty_is_zero(rng):
    b, hq, hkv, d, page = 3, 8, 2, 16, 4
    lens = np.array([0, 9, 13], dtype=np.int32)
    lmax = 16
    k = rng.standard_normal((b, hkv, lmax, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, lmax, d)).astype(np.float32)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    pages_per_seq = lmax // page
    perm = rng.permutation(b * pages_per_seq)                       # scatter pages
    k_pages = np.empty((b * pages_per_seq, page, hkv, d), np.float32)
    v_pages = np.empty_like(k_pages)
    table = perm.reshape(b, pages_per_seq).astype(np.int32)
    for i in range(b):
        for p in range(pages_per_seq):
            k_pages[table[i, p]] = k[i, :, p * page:(p + 1) * page].transpose(1, 0, 2)
            v_pages[table[i, p]] = v[i, :, p * page:(p + 1) * page].transpose(1, 0, 2)
    contiguous = reference.decode_attention(q, k, v, lens)
    paged = reference.decode_attention(q, k_pages, v_pages, lens, block_table=table)
    np.testing.assert_allclose(paged, contiguous, rtol=1e-6, atol=1e-6)
    assert (contiguous[0] == 0).all()


def test_decode_attention_large_scores_do_not_overflow(rng):
    q = np.full((1, 2, 8), 100.0, dtype=np.float32)
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32) * 100
    v = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    out = reference.decode_attention(q, k, v, np.array([5], np.int32))
    assert np.isfinite(out).all()


def test_reference_rejects_cupy_like_objects():
    class Fake:
        dtype = np.float32
    with pytest.raises(TypeError, match="reference.dequantize_activations takes NumPy arrays"):
        reference.dequantize_activations(Fake())
