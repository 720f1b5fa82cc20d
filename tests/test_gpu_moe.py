"""w4kern.moe on CuPy arrays: routing and expert alignment on the GPU against the NumPy
path (bit-identical); fused_moe's kernels are not written yet."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_route_on_the_gpu_matches_numpy(cp, rng, scoring):
    logits = rng.standard_normal((1000, 128)).astype(np.float32)
    w_cpu, ids_cpu = w4kern.topk_route(logits, 8, scoring=scoring)
    w_gpu, ids_gpu = w4kern.topk_route(cp.asarray(logits), 8, scoring=scoring)
    assert isinstance(ids_gpu, cp.ndarray) and ids_gpu.dtype == np.int32 and w_gpu.dtype == np.float32
    np.testing.assert_array_equal(cp.asnumpy(ids_gpu), ids_cpu)   # random logits: no near-ties
    np.testing.assert_allclose(cp.asnumpy(w_gpu), w_cpu, rtol=1e-5)


def align_case(rng, t, k, e, skew=False):
    ids = rng.integers(0, e, size=(t, k)).astype(np.int32)
    if skew:   # most experts get no token, one gets many
        ids = np.where(rng.random((t, k)) < 0.7, 0, np.minimum(ids, 3)).astype(np.int32)
    return ids


def check_align(cp, ids, e, block_size, expert_map=None):
    expected = w4kern.reference.moe_align_block_size(ids, e, block_size, expert_map)
    got = w4kern.moe_align_block_size(cp.asarray(ids), e, block_size,
                                      None if expert_map is None else cp.asarray(expert_map))
    for name, g, x in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), got, expected):
        assert isinstance(g, cp.ndarray) and g.dtype == np.int32 and g.shape == x.shape, name
        np.testing.assert_array_equal(cp.asnumpy(g), x, err_msg=name)


@pytest.mark.parametrize("t", [1, 2, 7, 16, 33, 256, 1024, 20000])
@pytest.mark.parametrize("e", [8, 60, 128])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_moe_align_bit_identical(cp, rng, t, e, k):
    for block_size in (16, 64):
        check_align(cp, align_case(rng, t, k, e), e, block_size)
    check_align(cp, align_case(rng, t, k, e, skew=True), e, 32)   # experts with no tokens


@pytest.mark.parametrize("t", [1, 33, 4096])
def test_moe_align_expert_map_drops_non_local_experts(cp, rng, t):
    e = 64
    ids = align_case(rng, t, 8, e)
    expert_map = np.where(rng.random(e) < 0.5, -1, rng.permutation(e)).astype(np.int32)
    check_align(cp, ids, e, 16, expert_map)
    check_align(cp, ids, e, 16, np.full(e, -1, np.int32))          # nothing local


def test_moe_align_many_experts_and_block_size_one(cp, rng):
    check_align(cp, align_case(rng, 300, 4, 1500), 1500, 1)           # more experts than one CTA's threads
    check_align(cp, align_case(rng, 1, 1, 1), 1, 256)


def test_moe_align_benchmark_shapes_and_the_expert_limit(cp, rng):
    check_align(cp, align_case(rng, 4096, 8, 256), 256, 64)             # DeepSeek-V3 routing, 32 chunks
    check_align(cp, align_case(rng, 4096, 8, 256, skew=True), 256, 128)
    check_align(cp, align_case(rng, 50, 8, 4096), 4096, 16)             # the most experts the GPU takes
    with pytest.raises(ValueError, match="num_experts=4097"):
        w4kern.moe_align_block_size(cp.asarray(align_case(rng, 5, 2, 4097)), 4097, 16)


def test_moe_align_out_of_range_ids_are_dropped_not_written(cp, rng):
    """Ids outside [0, E) are the caller's error (checking needs a device read): the
    kernels drop them; compute-sanitizer runs this."""
    ids = np.array([[0, 7, -3], [99, 2, 2]], np.int32)
    sorted_ids, expert_ids, n = w4kern.moe_align_block_size(cp.asarray(ids), 8, 4)
    cp.cuda.Device().synchronize()
    assert int(n[0]) == 12   # experts 0, 2, 7: three padded runs of 4


def test_moe_align_captures_in_a_cuda_graph(cp, rng):
    ids = cp.asarray(align_case(rng, 64, 8, 60))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        eager = [a.copy() for a in w4kern.moe_align_block_size(ids, 60, 16)]   # sizes the workspace
        stream.begin_capture()
        outs = w4kern.moe_align_block_size(ids, 60, 16)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    for a, b in zip(outs, eager):
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


def test_fused_moe_kernels_not_written_yet_say_so(cp, rng):
    ids = cp.asarray(rng.integers(0, 8, size=(4, 2)).astype(np.int32))
    w13 = w4kern.quantize_int4(cp.asarray(rng.standard_normal((8, 64, 64)).astype(np.float32)), group_size=32)
    w2 = w4kern.quantize_int4(cp.asarray(rng.standard_normal((8, 64, 32)).astype(np.float32)), group_size=32)
    x = cp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
    with pytest.raises(NotImplementedError, match="issue 4"):
        w4kern.fused_moe(x, w13, w2, cp.ones((4, 2), dtype=np.float32), ids)
