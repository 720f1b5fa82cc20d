"""w4kern.linear on the NumPy path (no GPU needed): semantics, dispatch table, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference
from w4kern.linear import DISPATCH, MAX_SMALL_M, _linear, small_m_splits


@pytest.fixture
def weight(rng):
    return w4kern.quantize_int4(rng.standard_normal((24, 256)).astype(np.float32), group_size=64,
                                symmetric=False)


def test_q8_path_equals_reference_on_the_quantized_activations(rng, weight):
    x = rng.standard_normal((3, 256)).astype(w4kern.bfloat16)
    y = w4kern.linear(x, weight, out_dtype=np.float32)
    np.testing.assert_array_equal(y, reference.linear(w4kern.quantize_q8(x), weight))
    assert not np.array_equal(y, reference.linear(x, weight))   # the activations really were rounded


def test_bf16_path_uses_x_unrounded(rng, weight):
    x = rng.standard_normal((2, 256)).astype(np.float16)
    y = w4kern.linear(x, weight, act="bf16", out_dtype=np.float32)
    np.testing.assert_array_equal(y, reference.linear(x, weight))


def test_int8_path_equals_reference_on_per_token_int8(rng, weight):
    x = rng.standard_normal((5, 256)).astype(np.float32)
    y = w4kern.linear(x, weight, act="int8", out_dtype=np.float32)
    xq = w4kern.quantize_per_token_int8(x)
    np.testing.assert_array_equal(y, reference.linear(xq, weight))
    assert not np.array_equal(y, reference.linear(w4kern.quantize_q8(x), weight))   # one scale per token
    np.testing.assert_array_equal(w4kern.linear(xq, weight, act="int8", out_dtype=np.float32), y)
    assert w4kern.linear(xq, weight, act="int8").dtype == w4kern.bfloat16   # the default output
    x9 = rng.standard_normal((MAX_SMALL_M + 1, 256)).astype(np.float32)   # beyond: x itself, as act="q8"
    np.testing.assert_array_equal(w4kern.linear(x9, weight, act="int8", out_dtype=np.float32),
                                  reference.linear(x9, weight))


def test_more_than_small_m_tokens_use_x_itself(rng, weight):
    x = rng.standard_normal((MAX_SMALL_M + 1, 256)).astype(w4kern.bfloat16)
    y = w4kern.linear(x, weight, out_dtype=np.float32)
    np.testing.assert_array_equal(y, reference.linear(x, weight))


def test_output_dtype_bias_out_and_leading_dims(rng, weight):
    x = rng.standard_normal((2, 3, 256)).astype(w4kern.bfloat16)
    b = rng.standard_normal(24).astype(w4kern.bfloat16)
    y = w4kern.linear(x, weight, bias=b)
    assert y.shape == (2, 3, 24) and y.dtype == w4kern.bfloat16
    expected = reference.linear(w4kern.quantize_q8(x.reshape(6, 256)), weight, b.astype(np.float32))
    np.testing.assert_array_equal(y.reshape(6, 24), expected.astype(w4kern.bfloat16))
    out = np.full((2, 3, 24), np.nan, dtype=w4kern.bfloat16)
    assert w4kern.linear(x, weight, bias=b, out=out) is out
    np.testing.assert_array_equal(out, y)


def test_int8_weights_and_prequantized_activations(rng):
    w8 = w4kern.quantize_int8(rng.standard_normal((16, 128)).astype(np.float32), group_size=32)
    xq = w4kern.quantize_q8(rng.standard_normal((5, 128)).astype(np.float32))
    y = w4kern.linear(xq, w8)
    assert y.dtype == w4kern.bfloat16
    np.testing.assert_array_equal(y, reference.linear(xq, w8).astype(w4kern.bfloat16))


def test_dispatch_table_covers_every_small_m():
    for gpu, table in DISPATCH.items():
        for key, kernels in table.items():
            assert len(kernels) == MAX_SMALL_M, (gpu, key)
            allowed = {"q8": {"matvec", "small_m"}, "bf16": {"small_m", "a16"}, "int8": {"matvec", "a8"}}[key[1]]
            if key[0] == "int4-tiled":   # only the tensor-core kernels read the tiled layout
                allowed = {"bf16": {"a16"}, "int8": {"a8"}}[key[1]]
            assert set(kernels) <= allowed, (gpu, key)


def test_a16_rows_by_k_and_group(monkeypatch):
    """W4A16 at M = 1 takes the row-run walk from the GPU's A16_ROWS_MIN_K on, for the
    group sizes it has a family for; a GPU without a measured row never does."""
    import importlib

    linear = importlib.import_module("w4kern.linear")   # the module (w4kern.linear is the function)
    monkeypatch.setattr(linear, "_gpu_name", lambda: "NVIDIA H200")
    assert linear.uses_a16_rows(14336, 128) and linear.uses_a16_rows(21504, -1)
    assert not linear.uses_a16_rows(4096, 128) and not linear.uses_a16_rows(5376, 128)
    assert not linear.uses_a16_rows(14336, 64) and not linear.uses_a16_rows(14336, 32)
    monkeypatch.setattr(linear, "_gpu_name", lambda: "some GPU without a row")
    assert not linear.uses_a16_rows(21504, 128)


def test_a16_rows_config_by_rows():
    from w4kern.linear import A16_ROW_CANDIDATES, a16_rows_config

    assert a16_rows_config(10**6, 132, 12) == A16_ROW_CANDIDATES[0]
    assert a16_rows_config(7, 132, 12) == A16_ROW_CANDIDATES[-1]
    assert a16_rows_config(28672, 132, 12) == (2, 1)     # 7168 warps
    assert a16_rows_config(5376, 132, 12) == (2, 2)      # 1344 warps unsplit: short of 12 per SM
    assert a16_rows_config(4096, 132, 12) == (2, 2)      # 2048 warps


def test_a16_config_by_rows():
    from w4kern._registry import A16_CONFIGS
    from w4kern.linear import A16_CANDIDATES, a16_config

    assert set(A16_CANDIDATES) <= set(A16_CONFIGS)
    assert a16_config(10**6, 132, 12) == A16_CANDIDATES[0]
    assert a16_config(7, 132, 12) == A16_CANDIDATES[-1]
    assert a16_config(28672, 132, 12) == (2, 2)        # 1792 warps
    assert a16_config(4096, 132, 12) == (1, 8)         # 2048 warps
    assert a16_config(6144, 132, 12) == (1, 8)         # 1536 warps at (1, 4): short of 12 per SM
    assert a16_config(6144, 132, 11) == (1, 4)         # the H200 row: enough at 11


def test_a16_weight_bytes_fit_its_32_bit_offsets():
    from w4kern.linear import _check_a16_weight_bytes

    _check_a16_weight_bytes(65536, 131008)          # just under 4 GiB of qweight
    with pytest.raises(ValueError, match="weight: the W4A16 matvec"):
        _check_a16_weight_bytes(65536, 131072)      # 4 GiB


def test_matvec_config_by_rows():
    from w4kern._registry import MATVEC_CONFIGS
    from w4kern.linear import MATVEC_CANDIDATES, matvec_config

    for (kind, max_m), candidates in MATVEC_CANDIDATES.items():
        assert set(candidates) <= set(MATVEC_CONFIGS)
        assert all(c[0] >= max_m for c in candidates)
        assert matvec_config(kind, max_m, 10**6, 132, 16) == candidates[0]      # many rows
        assert matvec_config(kind, max_m, 7, 132, 16) == candidates[-1]         # few rows
    assert matvec_config("int4", 1, 28672, 132, 16) == (1, 8, 1, 1)
    assert matvec_config("int4", 1, 4096, 132, 16) == (1, 4, 2, 4)
    assert matvec_config("int4", 3, 4096, 132, 16)[0] == 4
    # W8A8 on the H200 (MATVEC_INT8_WARPS_PER_SM = 10): unsplit where N / 4 rows fill 10 warps per SM
    assert matvec_config("int8", 1, 6144, 132, 10) == (4, 4, 1, 1)      # llama3-8b.qkv
    assert matvec_config("int8", 1, 5376, 132, 10) == (4, 4, 1, 1)      # gemma3-27b.down
    assert matvec_config("int8", 1, 4096, 132, 10) == (4, 4, 1, 4)      # llama3-8b.down


def test_matvec_items_config_skips_split_k_that_idles_warps():
    """The MoE decode path's item launches: short expert K (Qwen3's 2048, 768) keeps
    every warp of a split-K instance busy or takes the unsplit one."""
    from w4kern.linear import MATVEC_CANDIDATES, MATVEC_MIN_K_USE, _k_use, matvec_items_config

    for n, k, items in [(1536, 2048, 8), (2048, 768, 8), (1536, 2048, 128), (4096, 7168, 8), (7168, 2048, 128)]:
        config = matvec_items_config(n, k, items, 132, 12)
        assert config in MATVEC_CANDIDATES[("int4", 1)]
        assert config[3] == 1 or _k_use(config, k // 32) >= MATVEC_MIN_K_USE
    # one K step per row group split over 4 warps: three of them would idle
    assert _k_use((1, 8, 1, 4), 64) == 0.5
    assert _k_use((1, 8, 1, 1), 64) == 1.0
    assert _k_use((1, 8, 1, 1), 24) == 0.75   # K = 768: 24 of 32 lanes hold a block


def test_small_m_splits_never_leave_a_split_empty():
    for n in (1, 64, 65, 4096, 28672, 43008):
        for k in (32, 256, 288, 4096, 14336, 21504):
            for per_sm in (1, 3, 64):
                splits, per = small_m_splits(n, k, 132, per_sm)
                stages = -(-k // 256)
                assert 1 <= splits <= stages and (splits - 1) * per < stages <= splits * per


# --- bad input: named errors before any launch --------------------------------

def test_rejects_non_weights(rng):
    x = rng.standard_normal((1, 64)).astype(np.float32)
    with pytest.raises(TypeError, match="weight must be an Int4Weight, Int4TiledWeight or Int8Weight"):
        w4kern.linear(x, np.zeros((4, 32), np.uint8))


def test_rejects_stacked_weights(rng):
    w = w4kern.quantize_int4(rng.standard_normal((2, 8, 64)).astype(np.float32), group_size=32)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        w4kern.linear(rng.standard_normal((1, 64)).astype(np.float32), w)


def test_rejects_k_mismatch(rng, weight):
    with pytest.raises(ValueError, match="x's K=128 does not match weight's K=256"):
        w4kern.linear(rng.standard_normal((1, 128)).astype(np.float32), weight)


def test_rejects_zero_tokens(weight):
    with pytest.raises(ValueError, match="M = 0"):
        w4kern.linear(np.zeros((0, 256), np.float32), weight)


def test_rejects_bad_act_and_dtypes(rng, weight):
    x = rng.standard_normal((1, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="act must be one of"):
        w4kern.linear(x, weight, act="fp8")
    with pytest.raises(TypeError, match="act='bf16' .* must be bfloat16 or float16, got float32"):
        w4kern.linear(x, weight, act="bf16")
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16"):
        w4kern.linear(x.astype(np.int8), weight)
    w8 = w4kern.quantize_int8(rng.standard_normal((4, 256)).astype(np.float32))
    with pytest.raises(ValueError, match="Int8Weight runs against Q8 activations only"):
        w4kern.linear(x.astype(np.float16), w8, act="bf16")
    with pytest.raises(ValueError, match="needs act='q8'"):
        w4kern.linear(w4kern.quantize_q8(x), weight, act="bf16")
    xq = w4kern.quantize_per_token_int8(x)
    with pytest.raises(ValueError, match="x is PerTokenInt8, which needs act='int8', got act='q8'"):
        w4kern.linear(xq, weight)
    with pytest.raises(ValueError, match="Int8Weight runs against Q8 activations only .* got act='int8'"):
        w4kern.linear(x, w8, act="int8")
    with pytest.raises(ValueError, match="x's K=128 does not match weight's K=256"):
        w4kern.linear(w4kern.quantize_per_token_int8(x[:, :128]), weight, act="int8")
    with pytest.raises(ValueError, match="x.q must be C-contiguous"):
        w4kern.linear(w4kern.PerTokenInt8(q=np.zeros((256, 2), np.int8).T, scales=np.ones(2, np.float32)), weight,
                      act="int8")


def test_rejects_bad_out_and_bias(rng, weight):
    x = rng.standard_normal((2, 256)).astype(w4kern.bfloat16)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 24\)"):
        w4kern.linear(x, weight, out=np.empty((2, 25), w4kern.bfloat16))
    with pytest.raises(TypeError, match="out must have dtype in"):
        w4kern.linear(x, weight, out=np.empty((2, 24), np.int32))
    with pytest.raises(TypeError, match="out has dtype float32 but out_dtype=bfloat16"):
        w4kern.linear(x, weight, out=np.empty((2, 24), np.float32), out_dtype=w4kern.bfloat16)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        w4kern.linear(x, weight, out=np.empty((24, 2), w4kern.bfloat16).T)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
        w4kern.linear(x, weight, bias=np.zeros(23, w4kern.bfloat16))
    with pytest.raises(TypeError, match="bias must have the output dtype bfloat16, got float32"):
        w4kern.linear(x, weight, bias=np.zeros(24, np.float32))
    with pytest.raises(TypeError, match="out_dtype must be"):
        w4kern.linear(x, weight, out_dtype=np.int8)


def test_rejects_non_contiguous_x(rng, weight):
    x = rng.standard_normal((256, 2)).astype(np.float32).T
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        w4kern.linear(x, weight)


def test_rejects_objects_that_are_not_arrays(rng, weight):
    class NotAnArray:
        dtype = np.dtype(np.float32)

    with pytest.raises(TypeError, match="x must be a numpy.ndarray or cupy.ndarray"):
        w4kern.linear(NotAnArray(), weight)


def test_forced_kernel_names_are_checked(rng, weight):
    # the NumPy path ignores the kernel choice, so the check sits on the CUDA path;
    # here only the public signature is exercised
    x = rng.standard_normal((1, 256)).astype(np.float32)
    assert _linear(x, weight, kernel="matvec").shape == (1, 24)
