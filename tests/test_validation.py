"""Every argument rule raises a ValueError/TypeError naming the argument, before any launch."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern


@pytest.fixture
def qw(rng):
    return w4kern.quantize_int4(rng.standard_normal((8, 64)).astype(np.float32), 32)


def test_quantize_int4_wrong_dtype():
    with pytest.raises(TypeError, match=r"^w must have dtype in \(float32, float16, bfloat16\), got int32$"):
        w4kern.quantize_int4(np.zeros((4, 64), np.int32))


def test_quantize_int4_wrong_ndim():
    with pytest.raises(ValueError, match=r"^w must be \[N, K\] or \[E, N, K\] \(ndim in \(2, 3\)\), got shape \(64,\)$"):
        w4kern.quantize_int4(np.zeros(64, np.float32))


def test_quantize_int4_k_not_multiple_of_32():
    with pytest.raises(ValueError, match=r"^K=48 must be a multiple of 32$"):
        w4kern.quantize_int4(np.zeros((4, 48), np.float32), group_size=-1)


def test_quantize_int4_k_not_multiple_of_group():
    with pytest.raises(ValueError, match=r"^K=96 must be a multiple of group_size=64$"):
        w4kern.quantize_int4(np.zeros((4, 96), np.float32), group_size=64)


@pytest.mark.parametrize("group_size", [0, 16, 100, 256])
def test_quantize_int4_unsupported_group_size(group_size):
    with pytest.raises(ValueError, match=rf"^group_size={group_size} is not supported; supported: \(32, 64, 128, -1\)$"):
        w4kern.quantize_int4(np.zeros((4, 256), np.float32), group_size=group_size)


def test_quantize_int4_bad_scale_dtype():
    with pytest.raises(TypeError, match=r"^scale_dtype must be one of \(float16, bfloat16, float32\), got float64$"):
        w4kern.quantize_int4(np.zeros((4, 64), np.float32), 32, scale_dtype=np.float64)


def test_quantize_int4_not_an_array():
    with pytest.raises(TypeError, match=r"^w must be a numpy.ndarray or cupy.ndarray \(or a DLPack tensor\), got builtins.list"):
        w4kern.quantize_int4([[0.0] * 64])


def test_int4_weight_scales_shape(qw):
    with pytest.raises(ValueError, match=r"^scales must have shape \(8, 2\) \(\[..., N, K // group_size\]\), got \(8, 3\)$"):
        w4kern.Int4Weight(qw.qweight, np.ones((8, 3), np.float16), None, 32)


def test_int4_weight_qweight_dtype(qw):
    with pytest.raises(TypeError, match=r"^qweight must have dtype in \(uint8\), got int8$"):
        w4kern.Int4Weight(qw.qweight.view(np.int8), qw.scales, None, 32)


def test_int4_weight_non_contiguous(qw):
    with pytest.raises(ValueError, match=r"^qweight must be C-contiguous"):
        w4kern.Int4Weight(np.asfortranarray(qw.qweight), qw.scales, None, 32)


def test_int4_weight_zeros_dtype(qw):
    with pytest.raises(TypeError, match=r"^zeros must have the scales' dtype float32, got float16$"):
        w4kern.Int4Weight(qw.qweight, qw.scales, qw.zeros.astype(np.float16), 32)


def test_int4_weight_scale_dtype_rule(qw):
    with pytest.raises(TypeError, match=r"^scales must have dtype in \(float16, bfloat16, float32\), got float64$"):
        w4kern.Int4Weight(qw.qweight, qw.scales.astype(np.float64), None, 32)


def test_dequantize_int4_not_a_weight():
    with pytest.raises(TypeError, match=r"^weight must be an Int4Weight, got ndarray$"):
        w4kern.dequantize_int4(np.zeros((4, 32), np.uint8))


def test_dequantize_int4_bad_dtype(qw):
    with pytest.raises(TypeError, match=r"^dtype must be one of \(float32, float16, bfloat16\), got int8$"):
        w4kern.dequantize_int4(qw, np.int8)


def test_dequantize_int4_out_shape(qw):
    with pytest.raises(ValueError, match=r"^out must have shape \(8, 64\) \(\[..., N, K\]\), got \(8, 32\)$"):
        w4kern.dequantize_int4(qw, out=np.empty((8, 32), w4kern.bfloat16))


def test_dequantize_int4_out_dtype(qw):
    with pytest.raises(TypeError, match=r"^out must have dtype in \(bfloat16\), got float32$"):
        w4kern.dequantize_int4(qw, out=np.empty((8, 64), np.float32))


def test_quantize_q8_k_not_multiple_of_32():
    with pytest.raises(ValueError, match=r"^x's last dimension K=40 must be a multiple of 32$"):
        w4kern.quantize_q8(np.zeros((2, 40), np.float32))


def test_quantize_q8_wrong_dtype():
    with pytest.raises(TypeError, match=r"^x must have dtype in \(float32, float16, bfloat16\), got float64$"):
        w4kern.quantize_q8(np.zeros((2, 32), np.float64))


def test_quantize_q8_zero_dim():
    with pytest.raises(ValueError, match=r"^x must be \[..., K\]"):
        w4kern.quantize_q8(np.zeros((), np.float32))


def test_quantize_q8_out_shape():
    with pytest.raises(ValueError, match=r"^out must have shape \(2, 1, 48\)"):
        w4kern.quantize_q8(np.zeros((2, 32), np.float32), out=np.zeros((2, 2, 48), np.uint8))


def test_q8_activations_bad_block_shape():
    with pytest.raises(ValueError, match=r"^blocks must have shape \[..., K // 32, 48\], got \(2, 36\)$"):
        w4kern.Q8Activations(np.zeros((2, 36), np.uint8))


def test_per_token_needs_2d():
    with pytest.raises(ValueError, match=r"^x must be \[M, K\] \(ndim in \(2,\)\), got shape \(2, 3, 32\)$"):
        w4kern.quantize_per_token_int8(np.zeros((2, 3, 32), np.float32))


def test_per_token_fp8_format_field():
    with pytest.raises(ValueError, match=r"^fp8_format must be 'e4m3fn', got 'e5m2'$"):
        w4kern.PerTokenFp8(np.zeros((1, 4), np.uint8), np.ones(1, np.float32), "e5m2")


def test_pack_int4_out_of_range():
    with pytest.raises(ValueError, match=r"^q must hold 4-bit values in \[0, 15\], got a maximum of 16$"):
        w4kern.pack_int4(np.array([[16, 0]], np.uint8))


def test_pack_int4_odd_k():
    with pytest.raises(ValueError, match=r"^q's last dimension K=3 must be even$"):
        w4kern.pack_int4(np.zeros((1, 3), np.uint8))


def test_dequantize_q8_wrong_type():
    with pytest.raises(TypeError, match=r"^xq must be a Q8Activations, got ndarray$"):
        w4kern.dequantize_q8(np.zeros((1, 48), np.uint8))


@pytest.mark.gpu
def test_mixed_numpy_and_cupy_arguments(cp, qw):
    with pytest.raises(TypeError, match=r"^arguments mix NumPy and CuPy arrays \(qweight=numpy, scales=cupy\)"):
        w4kern.Int4Weight(qw.qweight, cp.asarray(qw.scales), None, 32)


def test_unregistered_kernel_instance_names_supported_ones():
    from w4kern._registry import FAMILIES

    with pytest.raises(ValueError, match=r"^quantize_q8: no kernel instance <double, 1>; supported: <float, 1>, "):
        FAMILIES["quantize_q8"].name_expression(("double", "1"))
