"""Activation quantizers on the NumPy path, against independent scalar re-derivations."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import w4kern
from w4kern._numeric import e4m3_bits_to_float32, float32_to_e4m3_bits

FLOATS = [np.float32, np.float16, w4kern.bfloat16]


def q8_block_scalar(values):
    """llama.cpp's quantize_q8_1 for one block, value by value (float32 arithmetic)."""
    v = [np.float32(x) for x in values]
    amax = max(abs(x) for x in v)
    d = np.float32(amax / np.float32(127))
    if d == 0:
        return [0] * 32, d
    q = []
    for x in v:
        r = np.float32(x / d)
        q.append(int(math.copysign(math.floor(abs(float(r)) + 0.5), float(r))))
    return q, d


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 4096), (2, 3, 64)], ids=str)
def test_quantize_q8_matches_scalar_llama_cpp(rng, dtype, shape):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(dtype)
    xq = w4kern.quantize_q8(x)
    assert xq.blocks.shape == shape[:-1] + (shape[-1] // 32, 48) and xq.shape == shape
    flat_x = x.astype(np.float32).reshape(-1, 32)
    flat_q = xq.qs.reshape(-1, 32)
    flat_d = xq.d.reshape(-1)
    flat_s = xq.sum.reshape(-1)
    for b in range(0, flat_x.shape[0], max(1, flat_x.shape[0] // 16)):
        q, d = q8_block_scalar(flat_x[b])
        assert flat_d[b] == d
        assert list(flat_q[b]) == q
        assert flat_s[b] == np.float32(d * np.float32(sum(q)))
    assert (xq.blocks[..., 40:] == 0).all()


def test_quantize_q8_ties_round_away_from_zero():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :4] = [127.0, 0.5, -0.5, -2.5]          # d = 1 exactly
    xq = w4kern.quantize_q8(x)
    assert xq.d[0, 0] == 1.0
    np.testing.assert_array_equal(xq.qs[0, :4], [127, 1, -1, -3])


def test_quantize_q8_zero_block():
    xq = w4kern.quantize_q8(np.zeros((2, 64), dtype=w4kern.bfloat16))
    assert (xq.qs == 0).all() and (xq.d == 0).all() and (xq.sum == 0).all()


def test_quantize_q8_subnormal_block_is_zero_not_garbage():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = np.float32(1e-45)                  # max|x| / 127 underflows to 0
    xq = w4kern.quantize_q8(x)
    assert xq.d[0, 0] == 0 and (xq.qs == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_q8_non_finite_block(bad):
    x = np.ones((1, 64), dtype=np.float32)
    x[0, 33] = bad
    xq = w4kern.quantize_q8(x)
    assert np.isnan(xq.d[0, 1]) and np.isnan(xq.sum[0, 1]) and (xq.qs[0, 32:] == 0).all()
    assert xq.d[0, 0] == np.float32(1 / np.float32(127)) and (xq.qs[0, :32] == 127).all()
    assert np.isnan(w4kern.dequantize_q8(xq)[0, 32:]).all()


def test_quantize_q8_into_out(rng):
    x = rng.standard_normal((3, 64)).astype(np.float32)
    out = w4kern.Q8Activations(np.full((3, 2, 48), 0xAB, dtype=np.uint8))
    result = w4kern.quantize_q8(x, out=out)
    assert result is out
    np.testing.assert_array_equal(out.blocks, w4kern.quantize_q8(x).blocks)


def test_dequantize_q8_error_bound(rng):
    x = rng.standard_normal((4, 256)).astype(np.float32)
    xq = w4kern.quantize_q8(x)
    err = np.abs(w4kern.dequantize_q8(xq) - x)
    assert (err <= 0.5 * np.repeat(xq.d, 32, axis=-1) * 1.0001).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_per_token_int8(rng, dtype):
    x = (rng.standard_normal((7, 96)) * 3).astype(dtype)
    xq = w4kern.quantize_per_token_int8(x)
    xf = x.astype(np.float32)
    expected_scale = np.abs(xf).max(axis=1) / np.float32(127)
    np.testing.assert_array_equal(xq.scales, expected_scale)
    assert np.abs(xq.q.astype(int)).max() == 127
    err = np.abs(w4kern.dequantize_per_token_int8(xq) - xf)
    assert (err <= 0.5 * expected_scale[:, None] * 1.0001).all()


def test_per_token_int8_nan_row_and_zero_row():
    x = np.ones((3, 32), dtype=np.float32)
    x[1] = 0
    x[2, 5] = np.nan
    xq = w4kern.quantize_per_token_int8(x)
    assert xq.scales[1] == 0 and (xq.q[1] == 0).all()
    assert np.isnan(xq.scales[2]) and (xq.q[2] == 0).all()


def test_per_token_q8_blocks_carry_the_row_scale(rng):
    """The MoE decode path's activations: per-token INT8 in the Q8 block layout, so
    the Q8 kernels compute exactly the per-token INT8 product."""
    from w4kern.quant import per_token_q8_blocks

    x = (rng.standard_normal((5, 96)) * 3).astype(np.float32)
    x[2] = 0.0          # all-zero row: scale 0
    x[3, 5] = np.nan    # non-finite row: scale NaN, q = 0
    blocks = per_token_q8_blocks(x)
    pq = w4kern.quantize_per_token_int8(x)
    np.testing.assert_array_equal(w4kern.dequantize_q8(blocks), w4kern.dequantize_per_token_int8(pq))
    raw = blocks.blocks.reshape(5, 3, 48)
    d = raw[..., 32:36].copy().view(np.float32)[..., 0]
    total = raw[..., 36:40].copy().view(np.float32)[..., 0]
    np.testing.assert_array_equal(d, np.broadcast_to(pq.scales[:, None], (5, 3)))
    np.testing.assert_array_equal(total, d * pq.q.reshape(5, 3, 32).sum(axis=-1).astype(np.float32))
    assert not raw[..., 40:].any()
    with pytest.raises(ValueError, match="multiple of 32"):
        per_token_q8_blocks(x[:, :40].copy())


def test_e4m3_bits_match_ml_dtypes_on_every_value_and_midpoint():
    table = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.sort(table[np.isfinite(table)])
    mids = (finite[1:].astype(np.float64) + finite[:-1]) / 2           # exact ties
    near = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, 1e9)]).astype(np.float32)
    values = np.concatenate([finite, near, -near])
    values = values[np.abs(values) <= 448]
    expected = values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(float32_to_e4m3_bits(np, values), expected)


def test_e4m3_bits_random_values_and_roundtrip(rng):
    values = (rng.standard_normal(20000) * rng.choice([1e-3, 0.1, 10, 100], 20000)).astype(np.float32)
    values = np.clip(values, -448, 448)
    bits = float32_to_e4m3_bits(np, values)
    np.testing.assert_array_equal(bits, values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    np.testing.assert_array_equal(e4m3_bits_to_float32(np, bits),
                                  bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_e4m3_saturates_and_nan():
    bits = float32_to_e4m3_bits(np, np.array([1e6, -1e6, np.nan], dtype=np.float32))
    assert list(bits[:2]) == [0x7E, 0xFE] and bits[2] & 0x7F == 0x7F


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_per_token_fp8(rng, dtype):
    x = (rng.standard_normal((5, 128)) * 2).astype(dtype)
    xq = w4kern.quantize_per_token_fp8(x)
    xf = x.astype(np.float32)
    np.testing.assert_array_equal(xq.scales, np.abs(xf).max(axis=1) / np.float32(448))
    expected = (xf / xq.scales[:, None]).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(xq.q, expected)
    rel = np.linalg.norm(w4kern.dequantize_per_token_fp8(xq) - xf) / np.linalg.norm(xf)
    assert rel < 0.04


def test_per_token_fp8_nan_row():
    x = np.ones((2, 32), dtype=np.float32)
    x[1, 3] = np.inf
    xq = w4kern.quantize_per_token_fp8(x)
    assert np.isnan(xq.scales[1]) and (xq.q[1] == 0).all() and xq.scales[0] == np.float32(1 / 448)
