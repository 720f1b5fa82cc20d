"""w4kern.moe on the NumPy path: routing, alignment and the fused layer against the
reference, and their bad-input errors."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference


def test_topk_route_softmax_matches_a_direct_computation(rng):
    logits = rng.standard_normal((37, 16)).astype(np.float32)
    weights, ids = w4kern.topk_route(logits, 4)
    assert weights.dtype == np.float32 and ids.dtype == np.int32 and ids.shape == (37, 4)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_ids = np.argsort(-p, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids, expected_ids)
    top = np.take_along_axis(p, expected_ids, 1)
    np.testing.assert_allclose(weights, top / top.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    assert (np.diff(weights, axis=1) <= 0).all()          # descending


def test_topk_route_sigmoid_without_renormalization(rng):
    logits = rng.standard_normal((5, 8)).astype(w4kern.bfloat16)
    weights, ids = w4kern.topk_route(logits, 2, scoring="sigmoid", renormalize=False)
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_array_equal(ids, np.argsort(-s, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(weights, np.take_along_axis(s, ids.astype(np.int64), 1), rtol=1e-6)


def test_topk_route_ties_keep_the_lower_expert_first():
    logits = np.zeros((2, 6), np.float32)
    logits[1, [1, 4]] = 3.0
    _, ids = w4kern.topk_route(logits, 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [1, 4, 0]])


def test_topk_route_bad_input(rng):
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    for k in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer in \\[1, E=4\\]"):
            w4kern.topk_route(logits, k)
    with pytest.raises(ValueError, match="scoring must be one of"):
        w4kern.topk_route(logits, 2, scoring="relu")
    with pytest.raises(TypeError, match="logits must have dtype"):
        w4kern.topk_route(logits.astype(np.int32), 2)
    with pytest.raises(ValueError, match=r"logits must be \[T, E\]"):
        w4kern.topk_route(logits[0], 2)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_moe_align_block_size_is_the_reference(rng, block_size):
    ids = rng.integers(0, 12, size=(33, 4)).astype(np.int32)
    ids[:, 0] = 3                                   # a crowded expert; some get none
    got = w4kern.moe_align_block_size(ids, 12, block_size)
    expected = reference.moe_align_block_size(ids, 12, block_size)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    expert_map = np.full(12, -1, np.int32)
    expert_map[[3, 5, 7]] = [0, 1, 2]
    got = w4kern.moe_align_block_size(ids, 12, block_size, expert_map)
    for g, e in zip(got, reference.moe_align_block_size(ids, 12, block_size, expert_map)):
        np.testing.assert_array_equal(g, e)


def test_moe_align_bad_input(rng):
    ids = rng.integers(0, 8, size=(4, 2)).astype(np.int32)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=8\), got values in \[-1, "):
        w4kern.moe_align_block_size(np.where(ids == ids[0, 0], -1, ids).astype(np.int32), 8, 16)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=4\)"):
        w4kern.moe_align_block_size(ids + 4, 4, 16)
    with pytest.raises(TypeError, match="topk_ids must have dtype in \\(int32\\)"):
        w4kern.moe_align_block_size(ids.astype(np.int64), 8, 16)
    with pytest.raises(ValueError, match="k >= 1"):
        w4kern.moe_align_block_size(np.zeros((4, 0), np.int32), 8, 16)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        w4kern.moe_align_block_size(ids, 8, 0)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        w4kern.moe_align_block_size(ids, 0, 16)
    with pytest.raises(ValueError, match=r"expert_map must have shape \(8,\)"):
        w4kern.moe_align_block_size(ids, 8, 16, np.zeros(7, np.int32))


def _experts(rng, n_experts=4, hidden=64, inter=32, group_size=32):
    w13 = rng.standard_normal((n_experts, 2 * inter, hidden)).astype(np.float32)
    w2 = rng.standard_normal((n_experts, hidden, inter)).astype(np.float32)
    return (w4kern.quantize_int4(w13, group_size=group_size, symmetric=False),
            w4kern.quantize_int4(w2, group_size=group_size))


@pytest.mark.parametrize("activation", ["bf16", "int8"])
def test_fused_moe_is_the_reference(rng, activation):
    w13, w2 = _experts(rng)
    x = rng.standard_normal((7, 64)).astype(w4kern.bfloat16)
    weights, ids = w4kern.topk_route(rng.standard_normal((7, 4)).astype(np.float32), 2)
    y = w4kern.fused_moe(x, w13, w2, weights, ids, activation=activation)
    assert y.dtype == w4kern.bfloat16 and y.shape == (7, 64)
    expected = reference.fused_moe(x, w13, w2, weights, ids, activation).astype(w4kern.bfloat16)
    np.testing.assert_array_equal(y, expected)
    out = np.full((7, 64), np.nan, w4kern.bfloat16)
    assert w4kern.fused_moe(x, w13, w2, weights, ids, activation=activation, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_fused_moe_bad_input(rng):
    w13, w2 = _experts(rng)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    weights, ids = w4kern.topk_route(rng.standard_normal((3, 4)).astype(np.float32), 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        w4kern.fused_moe(x, w13, w2, weights, ids, activation="fp8")
    with pytest.raises(ValueError, match="x has H=32 but w13 expects H=64"):
        w4kern.fused_moe(x[:, :32].copy(), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids has T=2 tokens but x has T=3"):
        w4kern.fused_moe(x, w13, w2, weights[:2].copy(), ids[:2].copy())
    with pytest.raises(ValueError, match=r"topk_weights must have shape \(3, 2\)"):
        w4kern.fused_moe(x, w13, w2, weights[:, :1].copy(), ids)
    with pytest.raises(TypeError, match="topk_weights must have dtype in \\(float32\\)"):
        w4kern.fused_moe(x, w13, w2, weights.astype(np.float16), ids)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=4\)"):
        w4kern.fused_moe(x, w13, w2, weights, ids + 3)
    other13, other2 = _experts(rng, n_experts=5)
    with pytest.raises(ValueError, match="w2 has 5 experts, w13 has 4"):
        w4kern.fused_moe(x, w13, other2, weights, ids)
    _, narrow2 = _experts(rng, inter=64)
    with pytest.raises(ValueError, match=r"w2 must be \[E, H=64, I=32\]"):
        w4kern.fused_moe(x, w13, narrow2, weights, ids)
    flat = w4kern.quantize_int4(rng.standard_normal((64, 64)).astype(np.float32), group_size=32)
    with pytest.raises(ValueError, match="w13 must be stacked expert weights"):
        w4kern.fused_moe(x, flat, w2, weights, ids)
    with pytest.raises(TypeError, match="w13 must be an Int4Weight"):
        w4kern.fused_moe(x, np.zeros((4, 64, 32), np.uint8), w2, weights, ids)
    with pytest.raises(TypeError, match="out must have dtype in \\(float32\\)"):
        w4kern.fused_moe(x, w13, w2, weights, ids, out=np.empty((3, 64), np.float16))


# items that make more 32-row blocks (of one expert) than the batched GEMMs' grid takes
A8_GRID_LIMIT_ITEMS = 32 * (w4kern.moe.MOE_GEMM_MAX_BLOCKS + 1)


def test_moe_block_size_grows_with_the_items_per_expert():
    from w4kern._registry import MOE_GEMM_A16_M_TILES, MOE_GEMM_M_TILES
    from w4kern.moe import MOE_GEMM_LARGE_BLOCK_PER_EXPERT as per, MOE_GEMM_MAX_BLOCKS, moe_block_size

    for act in ("bf16", "int8"):
        assert moe_block_size(1, 8, act) == 16
        assert moe_block_size(8 * per - 1, 8, act) == 16
        assert moe_block_size(128 * 8, 128, act) == 16     # Qwen3-30B-A3B, T = 128: 8 items per expert
    assert moe_block_size(8 * per, 8) == 64
    assert moe_block_size(1024 * 8, 256) == 64            # DeepSeek-V3, T = 1024: 32 per expert
    assert moe_block_size(4096 * 8, 128) == 64            # Qwen3-30B-A3B, T = 4096: 256 per expert
    # int8: 32-row blocks from 16 items per expert on, 64-row ones past the grid limit
    assert moe_block_size(8 * per, 8, "int8") == 32
    assert moe_block_size(1024 * 8, 256, "int8") == 32
    assert moe_block_size(1024 * 8, 128, "int8") == 32    # Qwen3-30B-A3B, T = 1024: 64 per expert
    assert moe_block_size(4096 * 8, 128, "int8") == 32
    assert moe_block_size(32 * MOE_GEMM_MAX_BLOCKS - 31 * 8, 8, "int8") == 32   # exactly the grid limit
    assert moe_block_size(32 * MOE_GEMM_MAX_BLOCKS - 31 * 8 + 32, 8, "int8") == 64
    # every block size is a compiled tile count, and every compiled one is picked
    assert {moe_block_size(n, 1) // 16 for n in (1, per, A8_GRID_LIMIT_ITEMS)} == set(MOE_GEMM_A16_M_TILES)
    assert {moe_block_size(n, 1, "int8") // 16 for n in (1, per, A8_GRID_LIMIT_ITEMS)} == set(MOE_GEMM_M_TILES)


def test_batched_path_checks_its_grid_before_any_launch(rng, monkeypatch):
    """The GPU batched path's block limit, reached with NumPy standing in for CuPy: the
    check runs on the shapes, before any kernel (which this machine could not run)."""
    from w4kern import moe

    w13 = w4kern.quantize_int4(rng.standard_normal((8, 64, 64)).astype(np.float32), group_size=32)
    w2 = w4kern.quantize_int4(rng.standard_normal((8, 64, 32)).astype(np.float32), group_size=32)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    ids = np.argsort(rng.random((64, 8)), axis=1)[:, :2].astype(np.int32)
    weights = np.full((64, 2), 0.5, dtype=np.float32)
    monkeypatch.setattr(moe, "MOE_GEMM_MAX_BLOCKS", 4)
    with pytest.raises(ValueError, match=r"128 items with E = 8 make 9 aligned blocks of 64.*split the tokens"):
        moe._fused_moe_batched_cuda(np, x, w13, w2, weights, ids, None, "bf16")


def test_persistent_moe_gemms_are_chosen_per_gpu_and_activation(monkeypatch):
    """The batched GEMMs take the persistent kernels only where the GPU's row of
    MOE_GEMM_PERSISTENT names the activation; the families exist for both."""
    import importlib

    from w4kern import moe
    from w4kern._registry import FAMILIES, moe_gemm_family

    lin = importlib.import_module("w4kern.linear")
    monkeypatch.setattr(lin, "_gpu_name", lambda: "a GPU without a row")
    assert not moe.uses_persistent_moe_gemm("int8") and not moe.uses_persistent_moe_gemm("bf16")
    monkeypatch.setitem(moe.MOE_GEMM_PERSISTENT, "a GPU without a row", frozenset({"int8"}))
    assert moe.uses_persistent_moe_gemm("int8") and not moe.uses_persistent_moe_gemm("bf16")
    for activation in ("int8", "bf16"):
        plain, persistent = FAMILIES[moe_gemm_family(activation)], FAMILIES[moe_gemm_family(activation, True)]
        assert plain.template == persistent.template and plain.source == persistent.source == "moe_gemm.cu"
        assert {i[:-1] for i in plain.instances} == {i[:-1] for i in persistent.instances}
        assert {i[-1] for i in plain.instances} == {"false"} and {i[-1] for i in persistent.instances} == {"true"}


def test_every_moe_kernel_the_gpu_paths_can_pick_is_registered():
    """CI's compile check covers the registry; the MoE paths pick their instances from
    x's dtype, the weights' scale dtype and zeros, the block size and the GEMM: every
    combination must be a registered instance (name_expression raises otherwise), for
    the one-pair-per-CTA and the persistent GEMMs alike."""
    from w4kern._registry import FAMILIES, cxx_bool, cxx_type, moe_gemm_family
    from w4kern.formats import FLOAT_DTYPES, SCALE_DTYPES
    from w4kern.moe import MOE_GEMM_LARGE_BLOCK_PER_EXPERT, moe_block_size

    m_tiles = {act: {moe_block_size(n, 1, act) // 16 for n in (1, MOE_GEMM_LARGE_BLOCK_PER_EXPERT,
                                                                A8_GRID_LIMIT_ITEMS)}
               for act in ("bf16", "int8")}
    assert m_tiles == {"bf16": {1, 4}, "int8": {1, 2, 4}}
    for x_dtype in FLOAT_DTYPES:
        act = np.dtype(w4kern.bfloat16) if np.dtype(x_dtype) == np.float32 else np.dtype(x_dtype)
        FAMILIES["moe_token_q8"].name_expression((cxx_type(x_dtype), "false", "true"))
        FAMILIES["moe_token_q8"].name_expression((cxx_type(x_dtype), "false", "false"))   # linear act="int8"
        FAMILIES["moe_combine"].name_expression((cxx_type(x_dtype),))
        FAMILIES["moe_silu_mul"].name_expression((cxx_type(act),))   # the bf16 decode path
        for scale in SCALE_DTYPES:
            for zeros in (True, False):
                for activation in ("bf16", "int8"):
                    for persistent in (False, True):
                        family = moe_gemm_family(activation, persistent)
                        for tiles in m_tiles[activation]:
                            for silu in (True, False):
                                args = (cxx_type(scale), cxx_bool(zeros), str(tiles), cxx_bool(silu),
                                        cxx_bool(persistent))
                                FAMILIES[family].name_expression(((cxx_type(act),) if activation == "bf16" else ())
                                                                 + args)
    for silu in (True, False):   # the per-item rows: fp32 [g; u] (decode) and fp32 silu * u (batched)
        FAMILIES["moe_token_q8"].name_expression(("float", cxx_bool(silu), "true"))


def test_a8_gemm_warps_along_m_mirror_the_kernel_source():
    """The A8 GEMM's CTA size comes from MOE_GEMM_A8_WARPS_M on the host and from
    kMoeA8WarpsM in moe_gemm.cu (its launch bounds and layout): a launch with the
    other's thread count would compute the wrong rows, so the two must agree."""
    import re

    from w4kern._registry import MOE_GEMM_A8_WARPS_M, MOE_GEMM_M_TILES
    from w4kern._runtime import source_dir

    source = (source_dir() / "moe_gemm.cu").read_text()
    found = re.search(r"constexpr int kMoeA8WarpsM\[3\] = \{(\d+), (\d+), (\d+)\};", source)
    assert found, "kMoeA8WarpsM not found in moe_gemm.cu"
    assert dict(zip(MOE_GEMM_M_TILES, map(int, found.groups()))) == MOE_GEMM_A8_WARPS_M
