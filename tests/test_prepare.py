"""w4kern.prepare and the Int4TiledWeight layout (NumPy path; the GPU tests run the
kernels on it). The layout is a contract with cuda_src/matvec_a16.cu's kTiled loads
and matvec_bulk.cu's copies, so the first test spells it out byte by byte."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern.formats import Int4TiledWeight

# (N, K, group size): N not a multiple of 16, per-channel K not a multiple of 128
SHAPES = [(1, 128, 128), (37, 384, 128), (16, 256, 128), (5, 32, -1), (40, 1056, -1), (33, 4096, -1)]


def weight(rng, n, k, group_size, symmetric=False, scale_dtype=np.float16):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w4kern.quantize_int4(w, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)


@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_tiled_layout_contract(rng, n, k, group_size):
    """Byte 512 h + 16 l + j of chunk [T, s] is plain byte 64 s + 16 (l % 4) + j of row
    16 T + l // 4 + 8 h, zero past N and K / 2: every byte checked."""
    plain = weight(rng, n, k, group_size)
    tiled = w4kern.prepare(plain)
    assert isinstance(tiled, Int4TiledWeight)
    t_count, s_count = -(-n // 16), -(-k // 128)
    assert tiled.qweight.shape == (t_count, s_count, 1024) and tiled.qweight.dtype == np.uint8
    t, s, b = np.meshgrid(np.arange(t_count), np.arange(s_count), np.arange(1024), indexing="ij")
    h, lane, j = b // 512, (b % 512) // 16, b % 16
    row = 16 * t + lane // 4 + 8 * h
    col = 64 * s + 16 * (lane % 4) + j
    inside = (row < n) & (col < k // 2)
    expected = np.zeros(tiled.qweight.shape, dtype=np.uint8)
    expected[inside] = plain.qweight[row[inside], col[inside]]
    np.testing.assert_array_equal(tiled.qweight, expected)
    # scales and zeros transposed to [groups, 16 * tiles], zero past N
    for got, source in ((tiled.scales, plain.scales), (tiled.zeros, plain.zeros)):
        assert got.shape == (source.shape[1], 16 * t_count) and got.dtype == source.dtype
        np.testing.assert_array_equal(got[:, :n], source.T)
        assert not np.any(got[:, n:].view(np.uint16))
    assert tiled.shape == (n, k) and tiled.n == n and tiled.k == k and tiled.group_size == group_size
    assert tiled.nbytes == tiled.qweight.nbytes + tiled.scales.nbytes + tiled.zeros.nbytes


@pytest.mark.parametrize("n,k,group_size", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_to_plain_inverts_prepare(rng, n, k, group_size, symmetric):
    plain = weight(rng, n, k, group_size, symmetric=symmetric, scale_dtype=np.float32)
    back = w4kern.prepare(plain).to_plain()
    assert isinstance(back, w4kern.Int4Weight) and (back.zeros is None) == symmetric
    np.testing.assert_array_equal(back.qweight, plain.qweight)
    np.testing.assert_array_equal(back.scales, plain.scales)
    if not symmetric:
        np.testing.assert_array_equal(back.zeros, plain.zeros)
    assert back.group_size == group_size


@pytest.mark.parametrize("act", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_linear_numpy_path_takes_tiled_weights(rng, act, m):
    """The NumPy reference on a tiled weight gives the plain weight's bits (M = 9: the
    dense path's size)."""
    plain = weight(rng, 37, 384, 128)
    x = rng.standard_normal((m, 384)).astype(w4kern.bfloat16)
    np.testing.assert_array_equal(w4kern.linear(x, w4kern.prepare(plain), act=act),
                                  w4kern.linear(x, plain, act=act))


def test_linear_refuses_q8_on_tiled_weights(rng):
    tiled = w4kern.prepare(weight(rng, 16, 128, 128))
    x = rng.standard_normal((1, 128)).astype(w4kern.bfloat16)
    with pytest.raises(ValueError, match="Int4TiledWeight.*act"):
        w4kern.linear(x, tiled)   # act="q8" by default
    with pytest.raises(ValueError, match="Int4TiledWeight.*act"):
        w4kern.linear(w4kern.quantize_q8(x), tiled, act="q8")
    with pytest.raises(ValueError, match="x's K=256 does not match"):
        w4kern.linear(rng.standard_normal((1, 256)).astype(w4kern.bfloat16), tiled, act="bf16")


@pytest.mark.parametrize("group_size", [32, 64])
def test_prepare_refuses_small_groups(rng, group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}.*tiled layout takes"):
        w4kern.prepare(weight(rng, 16, 128, group_size))


def test_prepare_bad_input(rng):
    plain = weight(rng, 16, 128, 128)
    with pytest.raises(ValueError, match="for_op must be one of"):
        w4kern.prepare(plain, for_op="fused_moe")
    with pytest.raises(TypeError, match="weight must be an Int4Weight"):
        w4kern.prepare(w4kern.quantize_int8(rng.standard_normal((16, 128)).astype(np.float32)))
    stacked = w4kern.Int4Weight(np.stack([plain.qweight] * 2), np.stack([plain.scales] * 2),
                                np.stack([plain.zeros] * 2), 128)
    with pytest.raises(ValueError, match="must be 2-D"):
        w4kern.prepare(stacked)


def test_tiled_weight_validates_its_arrays(rng):
    tiled = w4kern.prepare(weight(rng, 37, 384, 128))
    with pytest.raises(ValueError, match=r"qweight must have shape \(3, 3, 1024\)"):
        Int4TiledWeight(tiled.qweight[:2], tiled.scales, tiled.zeros, 128, 384, 37)
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 48\)"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros, 128, 512, 37)   # the scales are for K = 384
    with pytest.raises(ValueError, match=r"scales must have shape \(3, 64\)"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros, 128, 384, 49)   # 4 tiles
    with pytest.raises(ValueError, match="n must be a positive int"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros, 128, 384, 0)
    with pytest.raises(ValueError, match=r"zeros must have shape \(3, 48\)"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros[:, :37], 128, 384, 37)   # the plain width
    with pytest.raises(ValueError, match="group_size=64"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros, 64, 384, 37)
    with pytest.raises(TypeError, match="zeros must have the scales' dtype"):
        Int4TiledWeight(tiled.qweight, tiled.scales, tiled.zeros.astype(np.float32), 128, 384, 37)
    with pytest.raises(TypeError, match="qweight"):
        Int4TiledWeight(tiled.qweight.view(np.int8), tiled.scales, tiled.zeros, 128, 384, 37)
