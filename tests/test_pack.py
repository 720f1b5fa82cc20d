"""INT4/INT8 weight packing on the NumPy path (the same code runs on CuPy)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import w4kern
from w4kern import formats

GROUPS = [32, 64, 128, -1]
FLOATS = [np.float32, np.float16, w4kern.bfloat16]


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 40).map(lambda n: 2 * n)),
              elements=st.integers(0, 15)))
def test_pack_unpack_roundtrip(q):
    packed = w4kern.pack_int4(q)
    assert packed.shape == q.shape[:-1] + (q.shape[-1] // 2,)
    np.testing.assert_array_equal(w4kern.unpack_int4(packed), q)


def test_pack_nibble_order():
    q = np.array([[1, 2, 3, 4, 15, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(w4kern.pack_int4(q), [[0x21, 0x43, 0x0F]])


def test_low_and_high_nibble_masks_give_even_and_odd_k(rng):
    """The contract the dp4a kernels rely on: word & 0x0F0F0F0F = even k, (word >> 4) & mask = odd k."""
    q = rng.integers(0, 16, size=(1, 8), dtype=np.uint8)
    word = int(w4kern.pack_int4(q).view(np.uint32)[0, 0])
    even = [(word & 0x0F0F0F0F) >> (8 * i) & 0xFF for i in range(4)]
    odd = [((word >> 4) & 0x0F0F0F0F) >> (8 * i) & 0xFF for i in range(4)]
    assert even == list(q[0, 0::2]) and odd == list(q[0, 1::2])


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_quantize_int4_error_within_half_step(rng, group_size, symmetric, dtype):
    n, k = 24, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(dtype)
    qw = w4kern.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    q = w4kern.unpack_int4(qw.qweight)
    assert q.max() <= 15
    deq = w4kern.dequantize_int4(qw, np.float32)
    gs = qw.effective_group_size
    step = np.repeat(qw.scales.astype(np.float32), gs, axis=-1)
    err = np.abs(deq - w.astype(np.float32))
    # inside the representable range the error is at most half a step (plus scale rounding slack)
    assert (err <= 0.5 * step * 1.02 + 1e-7).mean() > 0.99
    assert (err <= 1.0 * step + 1e-6).all()
    assert (qw.zeros is None) == symmetric


def test_quantize_int4_symmetric_known_values():
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, :4] = [7.0, -7.0, 3.5, 0.49]
    qw = w4kern.quantize_int4(w, group_size=32, symmetric=True)
    assert qw.scales[0, 0] == 1.0
    q = w4kern.unpack_int4(qw.qweight)[0]
    # 3.5 ties away from zero -> 4; 0.49 -> 0; zero point 8
    np.testing.assert_array_equal(q[:5], [15, 1, 12, 8, 8])


def test_quantize_int4_asymmetric_uses_zero_point():
    w = np.linspace(0.0, 15.0, 32, dtype=np.float32)[None]
    qw = w4kern.quantize_int4(w, group_size=32, symmetric=False)
    assert qw.scales[0, 0] == 1.0 and qw.zeros[0, 0] == 0.0
    np.testing.assert_allclose(w4kern.dequantize_int4(qw, np.float32), np.round(w + 1e-6), atol=0)


@pytest.mark.parametrize("scale_dtype", [np.float16, w4kern.bfloat16, np.float32], ids=lambda d: np.dtype(d).name)
def test_quantize_int4_scale_dtype(rng, scale_dtype):
    w = rng.standard_normal((8, 128)).astype(np.float32)
    qw = w4kern.quantize_int4(w, 64, scale_dtype=scale_dtype)
    assert qw.scales.dtype == np.dtype(scale_dtype) and qw.zeros.dtype == np.dtype(scale_dtype)


def test_quantize_int4_experts_match_per_expert(rng):
    w = rng.standard_normal((3, 16, 128)).astype(np.float32)
    stacked = w4kern.quantize_int4(w, 32)
    for e in range(3):
        single = w4kern.quantize_int4(w[e], 32)
        np.testing.assert_array_equal(stacked.qweight[e], single.qweight)
        np.testing.assert_array_equal(stacked.scales[e], single.scales)


def test_quantize_int4_all_zero_group_dequantizes_to_zero():
    w = np.zeros((2, 64), dtype=np.float32)
    for symmetric in (True, False):
        qw = w4kern.quantize_int4(w, 32, symmetric=symmetric)
        assert (w4kern.dequantize_int4(qw, np.float32) == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_int4_non_finite_group_is_nan_only_there(bad):
    w = np.ones((2, 64), dtype=np.float32)
    w[1, 40] = bad
    qw = w4kern.quantize_int4(w, 32)
    deq = w4kern.dequantize_int4(qw, np.float32)
    assert np.isnan(deq[1, 32:]).all()
    assert np.isfinite(deq[0]).all() and np.isfinite(deq[1, :32]).all()


@pytest.mark.parametrize("out_dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_dequantize_int4_rounds_once_from_float32(rng, out_dtype):
    qw = w4kern.quantize_int4(rng.standard_normal((4, 64)).astype(np.float32), 32)
    f32 = w4kern.dequantize_int4(qw, np.float32)
    out = w4kern.dequantize_int4(qw, out_dtype)
    assert out.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(out, f32.astype(out_dtype))


def test_dequantize_int4_into_out(rng):
    qw = w4kern.quantize_int4(rng.standard_normal((4, 64)).astype(np.float32), 32)
    out = np.full((4, 64), np.nan, dtype=w4kern.bfloat16)
    result = w4kern.dequantize_int4(qw, out=out)
    assert result is out
    np.testing.assert_array_equal(out, w4kern.dequantize_int4(qw))


@pytest.mark.parametrize("group_size", GROUPS)
def test_quantize_int8_roundtrip(rng, group_size):
    w = rng.standard_normal((16, 128)).astype(np.float32)
    qw = w4kern.quantize_int8(w, group_size)
    deq = w4kern.dequantize_int8(qw)
    step = np.repeat(qw.scales, qw.effective_group_size, axis=-1)
    assert (np.abs(deq - w) <= 0.5 * step + 1e-7).all()
    assert np.abs(qw.qweight.astype(int)).max() == 127


def test_int4_weight_is_frozen(rng):
    qw = w4kern.quantize_int4(rng.standard_normal((4, 64)).astype(np.float32), 32)
    with pytest.raises(AttributeError):
        qw.group_size = 64  # type: ignore[misc]


def test_group_sizes_constant():
    assert formats.GROUP_SIZES == (32, 64, 128, -1)
