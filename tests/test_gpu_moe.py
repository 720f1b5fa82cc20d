"""w4kern.moe on CuPy arrays: routing and expert alignment on the GPU against the NumPy
path (bit-identical); fused_moe's decode path against the reference, and its glue
kernels (moe_decode.cu) bit for bit against the CuPy steps they replace."""
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
    check_align(cp, align_case(rng, 4096, 8, 256), 256, 64)             # DeepSeek-V3 routing, 128 chunks
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


def moe_case(rng, t, e, k, hidden, inter, group_size, symmetric, skew=False):
    x = rng.standard_normal((t, hidden)).astype(np.float32).astype(w4kern.bfloat16)
    w13 = w4kern.quantize_int4(rng.standard_normal((e, 2 * inter, hidden)).astype(np.float32) * 0.05,
                               group_size=group_size, symmetric=symmetric)
    w2 = w4kern.quantize_int4(rng.standard_normal((e, hidden, inter)).astype(np.float32) * 0.05,
                              group_size=group_size, symmetric=symmetric)
    ids = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)   # k distinct experts a token
    if skew:   # every token on expert 0 first, most experts get no token
        ids[:, 0] = 0
    weights = rng.random((t, k)).astype(np.float32)
    return x, w13, w2, weights / weights.sum(axis=1, keepdims=True), ids


def to_gpu(cp, w):
    return w4kern.Int4Weight(cp.asarray(w.qweight), cp.asarray(w.scales),
                             None if w.zeros is None else cp.asarray(w.zeros), w.group_size)


def run_fused_moe(cp, x, w13, w2, weights, ids, activation):
    """fused_moe on the GPU into a NaN-poisoned out=, as float64 on the host."""
    out = cp.full(x.shape, np.nan, dtype=x.dtype)
    got = w4kern.fused_moe(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids),
                           activation=activation, out=out)
    assert got is out
    return cp.asnumpy(got).astype(np.float64)


def assert_within(got, expected, rel, abs_of_scale, extra=0.0):
    """Every element within rel * |expected| + abs_of_scale * max|expected| + extra (+ 1e-6)."""
    scale = float(np.abs(expected).max())
    bad = ~(np.abs(got - expected) <= rel * np.abs(expected) + abs_of_scale * scale + extra + 1e-6)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} off, first at {np.argwhere(bad)[0]}: got {got[bad][:4]}, "
                           f"expected {expected[bad][:4]}")


def int8_step_flips(x, w13, w2, weights, ids):
    """[T, H]: what one INT8 rounding flip per (token, slot) intermediate row can move
    each output by, at worst: sum over slots of weight * step * max_i |W2[e][h, i]|,
    step = max|a| / 127 of the row. The kernel requantizes a = silu(g) * u from fp32
    GEMM sums, the reference from float64 ones, so a value within fp32 rounding of a
    half step rounds the other way (seen: 65.499993 steps, T=1024, E=8, k=2, moving
    an output by 0.0036 with max|out| 1.55)."""
    bound = np.zeros((x.shape[0], w2.shape[-2]))
    for tok, slot, a, w2e in w4kern.reference.moe_expert_rows(x, w13, w2, ids, "int8"):
        step = np.abs(a).max(axis=1) / 127
        np.add.at(bound, tok, (weights[tok, slot] * step)[:, None] * np.abs(w2e).max(axis=1)[None, :])
    return bound


def check_fused_moe(cp, x, w13, w2, weights, ids):
    # fp32 accumulation and bf16 rounding of the output (relative and absolute
    # terms), plus one INT8 rounding flip per intermediate row (int8_step_flips);
    # a wrong kernel is off by O(max|out|)
    assert_within(run_fused_moe(cp, x, w13, w2, weights, ids, "int8"),
                  w4kern.reference.fused_moe(x, w13, w2, weights, ids, "int8"), 2.0 ** -7, 2e-3,
                  extra=int8_step_flips(x, w13, w2, weights, ids))


@pytest.mark.parametrize("activation", ["int8", "bf16"])
@pytest.mark.parametrize("t", [1, 2, 7, 16])
@pytest.mark.parametrize("e,k", [(8, 1), (8, 2), (60, 4), (128, 8)])
def test_fused_moe_decode_matches_reference(cp, rng, activation, t, e, k):
    # the decode paths (up to 16 tokens): H and I not multiples of any tile;
    # asymmetric g64 and symmetric g32
    check_fused(cp, activation, *moe_case(rng, t, e, k, hidden=192, inter=96, group_size=32, symmetric=True))
    check_fused(cp, activation, *moe_case(rng, t, e, k, hidden=320, inter=128, group_size=64, symmetric=False))


def q8_row_case(rng, dtype, rows, cols):
    """Rows for the per-token quantizer: random magnitudes per row, an all-zero row,
    a row with a NaN, one with an Inf, one whose max|x| / 127 is subnormal, and
    values on rounding ties (x / scale = k + 0.5)."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4, (rows, 1))
    x[1] = 0
    x[2, cols // 2] = np.nan
    x[3, 0] = -np.inf
    x[4] *= np.float32(1e-38)
    x[5] = 0
    x[5, :4] = [127.0, 0.5, -2.5, 63.5]   # scale 1: ties
    return x.astype(dtype)


def check_q8_blocks(cp, got, expected):
    got, expected = cp.asnumpy(got), cp.asnumpy(expected)
    assert got.shape == expected.shape and got.dtype == np.uint8
    off = np.argwhere((got[..., :32] != expected[..., :32]).any(axis=-1))
    assert not off.size, f"{len(off)} blocks differ, first (row, block) {off[0]}: {got[tuple(off[0])][:32]} vs " \
                         f"{expected[tuple(off[0])][:32]}"
    np.testing.assert_array_equal(got[..., 40:], expected[..., 40:], err_msg="reserved")
    for name, lo in (("d", 32), ("sum", 36)):
        g = np.ascontiguousarray(got[..., lo:lo + 4]).view(np.float32)
        x = np.ascontiguousarray(expected[..., lo:lo + 4]).view(np.float32)
        np.testing.assert_array_equal(g, x, err_msg=name)   # NaN == NaN here


@pytest.mark.parametrize("dtype", [np.float32, np.float16, w4kern.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("cols", [32, 96, 2080, 7168, 8224, 30016])
def test_moe_token_q8_kernel_matches_per_token_q8_blocks(cp, rng, dtype, cols):
    from w4kern import _runtime
    from w4kern._registry import cxx_type, moe_row_threads

    x = cp.asarray(q8_row_case(rng, dtype, 9, cols))
    got = cp.full((9, cols // 32, 48), 0xA5, dtype=np.uint8)   # poison
    _runtime.get_kernel("moe_token_q8", (cxx_type(dtype), "false", "true"))(
        (9,), (moe_row_threads(cols),), (x, got, np.uint64(0), np.int32(cols), np.int32(1)))
    # against the NumPy definition (the CuPy path's own element-wise kernels may
    # flush subnormals, NumPy does not)
    check_q8_blocks(cp, got, w4kern.quant.per_token_q8_blocks(cp.asnumpy(x)).blocks)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, w4kern.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("cols, threads", [(32, None), (96, None), (2080, None), (2080, 64), (7168, None),
                                           (8224, None), (30016, None), (30016, 256)])
def test_token_int8_kernel_matches_quantize_per_token_int8(cp, rng, dtype, cols, threads):
    """The plain-rows output (linear's act="int8"): q and scales bit-identical to
    the NumPy quantize_per_token_int8, special rows (zero, NaN/Inf, tiny) included;
    rows longer than one batch of loads (30016 values) and CTAs smaller than the
    host's choice walk the row in several batches."""
    from w4kern import _runtime
    from w4kern._registry import cxx_type, moe_row_threads

    x = cp.asarray(q8_row_case(rng, dtype, 9, cols))
    q = cp.full((9, cols), 0x5A, dtype=np.uint8)   # poison
    scales = cp.full((9,), 12345.0, dtype=np.float32)
    _runtime.get_kernel("moe_token_q8", (cxx_type(dtype), "false", "false"))(
        (9,), (threads or moe_row_threads(cols),), (x, q, scales, np.int32(cols), np.int32(1)))
    want = w4kern.quant.quantize_per_token_int8(cp.asnumpy(x))
    np.testing.assert_array_equal(cp.asnumpy(q).view(np.int8), want.q)
    np.testing.assert_array_equal(cp.asnumpy(scales).view(np.uint32), want.scales.view(np.uint32))


@pytest.mark.parametrize("cols", [32, 96, 768, 2048])
def test_moe_token_q8_kernel_silu_gate_up_matches_cupy(cp, rng, cols):
    from w4kern import _runtime
    from w4kern._registry import moe_row_threads

    gate_up = cp.asarray(np.concatenate([q8_row_case(rng, np.float32, 9, cols) * np.float32(3),
                                         q8_row_case(rng, np.float32, 9, cols)], axis=1))
    got = cp.full((9, cols // 32, 48), 0xA5, dtype=np.uint8)
    _runtime.get_kernel("moe_token_q8", ("float", "true", "true"))((9,), (moe_row_threads(cols),),
                                                                   (gate_up, got, np.uint64(0), np.int32(cols),
                                                                    np.int32(0)))   # after GEMM1: trigger first
    g, u = gate_up[:, :cols], gate_up[:, cols:]
    a = g / (np.float32(1) + cp.exp(-g)) * u      # the CuPy steps the kernel replaced (expf, as the kernel)
    check_q8_blocks(cp, got, w4kern.quant.per_token_q8_blocks(cp.asnumpy(a)).blocks)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, w4kern.bfloat16], ids=["f32", "f16", "bf16"])
def test_moe_combine_kernel_sums_slots_in_order(cp, rng, dtype):
    from w4kern import _runtime
    from w4kern._registry import MOE_COMBINE_THREADS, cxx_type

    t, k, hidden = 5, 8, 1000   # H not a multiple of the CTA
    down = (rng.standard_normal((t * k, hidden)) * 100).astype(np.float32)
    weights = rng.random((t, k)).astype(np.float32)
    ids = rng.integers(0, 60, size=(t, k)).astype(np.int32)
    ids[1, 3] = 60   # out of range: the slot is left out (its row may hold anything)
    ids[2, 0] = -1
    down.reshape(t, k, hidden)[1, 3] = np.nan
    down.reshape(t, k, hidden)[2, 0] = np.nan
    expected = np.zeros((t, hidden), dtype=np.float32)
    for j in range(k):   # float32 multiply, then float32 add, slot by slot
        keep = ((ids[:, j] >= 0) & (ids[:, j] < 60))[:, None]
        expected = np.where(keep, expected + weights[:, j, None] * down.reshape(t, k, hidden)[:, j], expected)
    out = cp.full((t, hidden), np.nan, dtype=dtype)
    _runtime.get_kernel("moe_combine", (cxx_type(dtype),))(
        (-(-hidden // MOE_COMBINE_THREADS), t), (MOE_COMBINE_THREADS,),
        (cp.asarray(down), cp.asarray(weights), cp.asarray(ids), out, np.int32(hidden), np.int32(k), np.int32(60)))
    np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint8), expected.astype(dtype).view(np.uint8))


@pytest.mark.parametrize("activation", ["int8", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_fused_moe_decode_other_activation_dtypes(cp, rng, activation, dtype):
    x, w13, w2, weights, ids = moe_case(rng, 3, 8, 2, hidden=160, inter=64, group_size=32, symmetric=False)
    check_fused(cp, activation, x.astype(dtype), w13, w2, weights, ids)


@pytest.mark.parametrize("activation", ["int8", "bf16"])
def test_fused_moe_decode_misaligned_x_gives_the_aligned_bits(cp, rng, activation):
    x, w13, w2, weights, ids = moe_case(rng, 3, 8, 2, hidden=64, inter=32, group_size=32, symmetric=False)
    args = (to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids))
    flat = cp.empty(x.size + 1, dtype=x.dtype)
    flat[1:] = cp.asarray(x).ravel()
    shifted = flat[1:].reshape(x.shape)   # 2 bytes past a 16-byte boundary
    assert shifted.data.ptr % 16
    got = w4kern.fused_moe(shifted, *args, activation=activation)
    expected = w4kern.fused_moe(cp.asarray(x), *args, activation=activation)
    np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint16), cp.asnumpy(expected).view(np.uint16))


@pytest.mark.parametrize("activation", ["int8", "bf16"])
def test_fused_moe_decode_skewed_routing_and_per_channel(cp, rng, activation):
    check_fused(cp, activation, *moe_case(rng, 16, 60, 4, hidden=256, inter=128, group_size=128, symmetric=False,
                                          skew=True))
    # per-channel, asymmetric and symmetric; K = 416: not a multiple of 128
    for hidden, inter, symmetric in ((128, 64, False), (416, 160, True)):
        check_fused(cp, activation, *moe_case(rng, 5, 8, 2, hidden=hidden, inter=inter, group_size=-1,
                                              symmetric=symmetric))


@pytest.mark.parametrize("activation,t", [("int8", 4), ("int8", 50), ("bf16", 4), ("bf16", 50)],
                         ids=["int8-decode", "int8-batched", "bf16-decode", "bf16-batched"])
def test_fused_moe_captures_in_a_cuda_graph(cp, rng, activation, t):
    """Eager calls repeat their bits, and a captured call replays them (no host read,
    no allocation the graph cannot hold)."""
    x, w13, w2, weights, ids = moe_case(rng, t, 16, 4, hidden=128, inter=64, group_size=32, symmetric=False)
    args = (cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        eager = w4kern.fused_moe(*args, activation=activation).copy()   # plans and compiles
        again = w4kern.fused_moe(*args, activation=activation)
        out = cp.empty_like(eager)
        stream.begin_capture()
        w4kern.fused_moe(*args, activation=activation, out=out)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(again).view(np.uint16), cp.asnumpy(eager).view(np.uint16))
    np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint16), cp.asnumpy(eager).view(np.uint16))


@pytest.mark.parametrize("activation", ["int8", "bf16"])
def test_fused_moe_intermediates_reuse_the_stream_workspace(cp, rng, activation):
    """fused_moe's intermediates live in the stream's workspace: calls of the decode
    and the batched path, with bf16 and float32 x, alternating on one stream, repeat
    their first call's bits, each matches the reference, and once every size has run,
    a call with out= takes nothing from CuPy's memory pool."""
    cases = []
    for t, dtype in ((3, w4kern.bfloat16), (40, np.float32), (5, np.float32), (33, w4kern.bfloat16)):
        x, w13, w2, weights, ids = moe_case(rng, t, 16, 4, hidden=128, inter=64, group_size=32, symmetric=False)
        cases.append((x.astype(dtype), w13, w2, weights, ids))
    for case in cases:
        check_fused(cp, activation, *case)
    args = [(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids))
            for x, w13, w2, weights, ids in cases]
    first = [w4kern.fused_moe(*a, activation=activation).copy() for a in args]
    outs = [cp.full(f.shape, np.nan, dtype=f.dtype) for f in first]
    pool = cp.get_default_memory_pool()
    for _ in range(2):
        for a, out, expected in zip(args, outs, first):
            used = pool.used_bytes()
            w4kern.fused_moe(*a, activation=activation, out=out)
            assert pool.used_bytes() == used, "fused_moe with out= allocated"
            np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint8), cp.asnumpy(expected).view(np.uint8))


def test_fused_moe_batched_int8_scale_dtypes_and_float_x(cp, rng):
    x, w13, w2, weights, ids = moe_case(rng, 40, 8, 2, hidden=128, inter=64, group_size=64, symmetric=False)
    for dtype in (np.float32, np.float16):
        cast = [w4kern.Int4Weight(w.qweight, w.scales.astype(dtype), w.zeros.astype(dtype), w.group_size)
                for w in (w13, w2)]
        check_fused_moe(cp, x, *cast, weights, ids)
    check_fused_moe(cp, x.astype(np.float32), w13, w2, weights, ids)


def test_fused_moe_int8_quality_against_bf16_math(cp, rng):
    # issue 4: the A8 path's cosine similarity to fp32 math on the dequantized weights
    # with bf16 activations is at least 0.9998
    x, w13, w2, weights, ids = moe_case(rng, 256, 60, 4, hidden=512, inter=256, group_size=128, symmetric=False)
    got = w4kern.fused_moe(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids),
                           activation="int8")
    exact = w4kern.reference.fused_moe(x, w13, w2, weights, ids, "bf16")
    g, e = cp.asnumpy(got).astype(np.float64).ravel(), exact.astype(np.float64).ravel()
    cosine = g @ e / np.linalg.norm(g) / np.linalg.norm(e)
    print(f"fused_moe int8 vs bf16 math: cosine {cosine:.6f}")
    assert cosine >= 0.9998


def a16_expected(x, w13, w2, weights, ids, round_weights):
    """fused_moe(activation="bf16") as the A16 kernels define it, in float64: x in
    its 16-bit type (bfloat16 for float32 x, which the op rounds first), the
    dequantized weights rounded to that type when ``round_weights`` (the batched
    path's GEMMs dequantize to it; the decode path's matvec applies (q - z) and the
    scale in fp32, unrounded), and silu(g) * u rounded to it before GEMM2 (its
    activations) on both paths. Items with an id outside [0, E) contribute nothing."""
    act = w4kern.bfloat16 if x.dtype == np.float32 else x.dtype
    xin = x.astype(act).astype(np.float64)

    def weight(w):
        f = w4kern.reference.dequantize_weight(w)
        return (f.astype(act) if round_weights else f).astype(np.float64)

    w13f, w2f = weight(w13), weight(w2)
    inter = w13f.shape[1] // 2
    out = np.zeros((x.shape[0], w2f.shape[1]))
    for e in range(w13f.shape[0]):
        tok, slot = np.nonzero(ids == e)
        h = xin[tok] @ w13f[e].T
        a = (h[:, :inter] / (1.0 + np.exp(-h[:, :inter])) * h[:, inter:]).astype(act).astype(np.float64)
        np.add.at(out, tok, weights[tok, slot][:, None].astype(np.float64) * (a @ w2f[e].T))
    return out


def check_fused_moe_bf16(cp, x, w13, w2, weights, ids):
    got = run_fused_moe(cp, x, w13, w2, weights, ids, "bf16")
    # the output's rounding (2^-9 for bfloat16), fp32 accumulation, and silu(g) * u
    # values that fp32 accumulators round to the neighbouring 16-bit float: one such
    # flip moves a row by weight * w2[:, i] * ulp(a_i), seen up to 1.6e-3 * scale
    # (T=1024, E=8, k=2); a wrong kernel is off by O(scale)
    decode = x.shape[0] <= w4kern.moe.MOE_DECODE_MAX_TOKENS
    expected = a16_expected(x, w13, w2, weights, ids, round_weights=not decode)
    assert_within(got, expected, 2.0 ** -8, 4e-3)
    # and the op's own reference (unrounded weights and intermediates) stays close
    reference = w4kern.reference.fused_moe(x.astype(w4kern.bfloat16) if x.dtype == np.float32 else x, w13, w2,
                                           weights, ids, "bf16")
    assert np.abs(got - reference).max() <= 0.02 * float(np.abs(expected).max())


# both activations take the batched path from T = 17 (the decode paths below)
BATCHED_CASES = [(a, t) for a in ("bf16", "int8") for t in (17, 33, 256, 1024)]


def check_fused(cp, activation, *case):
    (check_fused_moe_bf16 if activation == "bf16" else check_fused_moe)(cp, *case)


@pytest.mark.parametrize("activation,t", BATCHED_CASES)
@pytest.mark.parametrize("e,k", [(8, 1), (8, 2), (60, 4), (128, 8)])
def test_fused_moe_batched_matches_reference(cp, rng, activation, t, e, k):
    # H and I not multiples of the 64/128-wide tiles or of K's 64; every block size
    # (16 below 16 items per expert, 64 from there; int8 32 from there, e.g. T=256 at
    # E=8, k=1 and T=1024 at E=128, k=8; int8's 64-row blocks: the test below);
    # symmetric g32 and asymmetric g64
    check_fused(cp, activation, *moe_case(rng, t, e, k, hidden=192, inter=96, group_size=32, symmetric=True))
    check_fused(cp, activation, *moe_case(rng, t, e, k, hidden=320, inter=128, group_size=64, symmetric=False))


def force_int8_64_row_blocks(monkeypatch, items, n_experts):
    """Lower MOE_GEMM_MAX_BLOCKS so that fused_moe(activation="int8") aligns these
    items to 64-row blocks (it takes them only where 32-row ones would pass the grid
    limit)."""
    monkeypatch.setattr(w4kern.moe, "MOE_GEMM_MAX_BLOCKS", (items + n_experts * 63) // 64)
    assert w4kern.moe.moe_block_size(items, n_experts, "int8") == 64


@pytest.mark.parametrize("t", [40, 256, 1024], ids=["rows16", "rows32", "rows64"])
def test_fused_moe_batched_int8_all_zero_tokens(cp, rng, monkeypatch, t):
    # The A8 GEMMs take each row's d (the Q8 scale, 0 for an all-zero row) out of the
    # flush and apply it in the epilogue: every fifth token is all zeros (so is its
    # GEMM2 input), at each of the 16 / 32 / 64-row blocks (E = 8, k = 2: 10, 64 and
    # 256 items per expert)
    x, w13, w2, weights, ids = moe_case(rng, t, 8, 2, hidden=192, inter=96, group_size=32, symmetric=False)
    if t == 1024:
        force_int8_64_row_blocks(monkeypatch, t * 2, 8)
    x[::5] = 0
    check_fused_moe(cp, x, w13, w2, weights, ids)
    assert not run_fused_moe(cp, x, w13, w2, weights, ids, "int8")[::5].any()


@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_fused_moe_batched_int8_64_row_blocks(cp, rng, monkeypatch, persistent):
    # int8 aligns to 64-row blocks only past the grid limit: the 4-tile A8 GEMMs
    # (plain and persistent) on spread and skewed routing, symmetric g32, asymmetric
    # g64 and g128
    import importlib

    if persistent:
        lin = importlib.import_module("w4kern.linear")
        monkeypatch.setitem(w4kern.moe.MOE_GEMM_PERSISTENT, lin._gpu_name(), frozenset({"int8"}))
    force_int8_64_row_blocks(monkeypatch, 1024 * 2, 8)
    check_fused_moe(cp, *moe_case(rng, 1024, 8, 2, hidden=192, inter=96, group_size=32, symmetric=True))
    check_fused_moe(cp, *moe_case(rng, 1024, 8, 2, hidden=320, inter=128, group_size=64, symmetric=False))
    force_int8_64_row_blocks(monkeypatch, 300 * 4, 60)
    check_fused_moe(cp, *moe_case(rng, 300, 60, 4, hidden=256, inter=128, group_size=128, symmetric=False,
                                  skew=True))


@pytest.mark.parametrize("activation,t", [("bf16", 20), ("bf16", 300), ("int8", 20), ("int8", 300)])
def test_fused_moe_batched_skewed_routing_g128_and_per_channel(cp, rng, activation, t):
    # every token on expert 0 (many blocks of one expert), most experts without tokens
    check_fused(cp, activation, *moe_case(rng, t, 60, 4, hidden=256, inter=128, group_size=128, symmetric=False,
                                            skew=True))
    # per-channel weights; K = 416 and 160: the A8 kernel flushes its int32 dots every
    # 128 k, then at K's end (not a multiple of 64 either)
    for hidden, inter, symmetric in ((128, 64, False), (416, 160, False), (416, 160, True)):
        check_fused(cp, activation, *moe_case(rng, t, 8, 2, hidden=hidden, inter=inter, group_size=-1,
                                                symmetric=symmetric))


@pytest.mark.parametrize("sms", [None, 1], ids=["full-grid", "one-sm"])
@pytest.mark.parametrize("activation", ["bf16", "int8"])
def test_fused_moe_batched_persistent_gemms(cp, rng, monkeypatch, activation, sms):
    """The persistent expert GEMMs (resident CTAs walking the used blocks' (block,
    column tile) pairs in groups of MOE_GEMM_GROUP_M blocks) against the reference:
    every block size, skewed routing (one expert's many blocks, most experts empty),
    and a grid of one SM's CTAs, so that each CTA walks many pairs and groups."""
    import importlib

    lin = importlib.import_module("w4kern.linear")
    monkeypatch.setitem(w4kern.moe.MOE_GEMM_PERSISTENT, lin._gpu_name(), frozenset({activation}))
    if sms is not None:
        monkeypatch.setattr(lin, "_sm_count", lambda cp: sms)
    for t, e, k in ((33, 8, 2), (256, 8, 1), (1024, 128, 8), (300, 60, 4)):
        check_fused(cp, activation, *moe_case(rng, t, e, k, hidden=320, inter=128, group_size=64, symmetric=False))
    check_fused(cp, activation, *moe_case(rng, 300, 60, 4, hidden=256, inter=128, group_size=128, symmetric=False,
                                            skew=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_fused_moe_batched_other_activation_dtypes(cp, rng, dtype):
    x, w13, w2, weights, ids = moe_case(rng, 40, 8, 2, hidden=160, inter=64, group_size=32, symmetric=False)
    check_fused_moe_bf16(cp, x.astype(dtype), w13, w2, weights, ids)


@pytest.mark.parametrize("t", [5, 20], ids=["decode", "batched"])
def test_fused_moe_bf16_scale_dtypes(cp, rng, t):
    x, w13, w2, weights, ids = moe_case(rng, t, 8, 2, hidden=128, inter=64, group_size=64, symmetric=False)
    for dtype in (np.float32, np.float16):
        cast = [w4kern.Int4Weight(w.qweight, w.scales.astype(dtype), w.zeros.astype(dtype), w.group_size)
                for w in (w13, w2)]
        check_fused_moe_bf16(cp, x, *cast, weights, ids)


@pytest.mark.parametrize("t", [3, 24], ids=["decode", "batched"])
def test_fused_moe_bf16_out_of_range_ids_contribute_nothing(cp, rng, t):
    x, w13, w2, weights, ids = moe_case(rng, t, 8, 2, hidden=128, inter=64, group_size=32, symmetric=True)
    bad = ids.copy()
    bad[1, 1] = 8
    bad[2, 0] = -3
    got = w4kern.fused_moe(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(bad),
                           activation="bf16")
    # the bad slots left out; t = 3 takes the decode path (unrounded weights)
    expected = a16_expected(x, w13, w2, weights, bad, round_weights=t > w4kern.moe.MOE_DECODE_MAX_TOKENS)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(cp.asnumpy(got).astype(np.float64), expected, rtol=2.0 ** -8, atol=4e-3 * scale)


def test_debug_mode_checks_ids_on_the_gpu(cp, rng, monkeypatch):
    x, w13, w2, weights, ids = moe_case(rng, 3, 8, 2, hidden=64, inter=32, group_size=32, symmetric=True)
    ids[1, 1] = 8
    monkeypatch.setenv("W4KERN_DEBUG", "1")
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        w4kern.moe_align_block_size(cp.asarray(ids), 8, 16)
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        w4kern.fused_moe(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids),
                         activation="int8")


def test_fused_moe_batched_refuses_more_blocks_than_a_grid_takes(cp, rng, monkeypatch):
    x, w13, w2, weights, ids = moe_case(rng, 64, 8, 2, hidden=64, inter=32, group_size=32, symmetric=True)
    monkeypatch.setattr(w4kern.moe, "MOE_GEMM_MAX_BLOCKS", 4)
    for activation in ("bf16", "int8"):
        with pytest.raises(ValueError, match="split the tokens"):
            w4kern.fused_moe(cp.asarray(x), to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids),
                             activation=activation)


@pytest.mark.parametrize("e,k", [(40, 32), (40, 33)], ids=["k32-token-sums", "k33-per-item"])
def test_fused_moe_int8_decode_at_the_token_sum_slot_limit(cp, rng, e, k):
    # k <= 32 sums a token's slots inside GEMM2 (one slot per lane); k = 33 takes a
    # GEMM2 per item and the combine kernel
    check_fused_moe(cp, *moe_case(rng, 2, e, k, hidden=96, inter=64, group_size=32, symmetric=False))


def test_fused_moe_int8_decode_out_of_range_ids_are_left_out(cp, rng):
    x, w13, w2, weights, ids = moe_case(rng, 3, 8, 2, hidden=128, inter=64, group_size=32, symmetric=True)
    bad = ids.copy()
    bad[1, 1] = 8
    bad[2, 0] = -3
    got = run_fused_moe(cp, x, w13, w2, weights, bad, "int8")
    # a left-out slot is the same as a valid slot of weight 0 (each intermediate row
    # is quantized on its own)
    kept = np.where((bad >= 0) & (bad < 8), weights, 0).astype(np.float32)
    valid = np.where((bad >= 0) & (bad < 8), bad, 0).astype(np.int32)
    assert_within(got, w4kern.reference.fused_moe(x, w13, w2, kept, valid, "int8"), 2.0 ** -7, 2e-3,
                  extra=int8_step_flips(x, w13, w2, kept, valid))


@pytest.mark.parametrize("out_dtype", [np.float32, w4kern.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,slots,n,k,group_size,symmetric", [
    (1, 8, 136, 128, 64, True),      # 4 blocks a slot: one warp step holds all 8 slots
    (3, 4, 72, 1056, 32, False),     # 33 blocks a slot: slots straddle warp steps
    (5, 1, 40, 256, -1, False),      # one slot, per-channel
    (2, 32, 24, 64, 32, False),      # the most slots, one per lane
], ids=["t1-k8", "t3-k4", "t5-k1-gch", "t2-k32"])
def test_token_sum_matvec_matches_numpy(cp, rng, out_dtype, tokens, slots, n, k, group_size, symmetric):
    """The MoE int8 decode GEMM2 (matvec_q8 in token-sum mode) on its own: random Q8
    rows, slot weights with a zero, a repeated expert and a left-out slot, against
    float64 sums of the same dequantized values; a NaN-poisoned out."""
    from w4kern.linear import _launch_matvec_token_sums
    from w4kern.quant import dequantize_q8, per_token_q8_blocks

    n_experts = 6
    w = w4kern.quantize_int4(rng.standard_normal((n_experts, n, k)).astype(np.float32) * 0.1,
                             group_size=group_size, symmetric=symmetric)
    rows = rng.standard_normal((tokens * slots, k)).astype(np.float32) * rng.uniform(0.1, 10, (tokens * slots, 1))
    act = per_token_q8_blocks(rows.astype(np.float32))
    ids = rng.integers(0, n_experts, (tokens, slots)).astype(np.int32)
    weights = rng.random((tokens, slots)).astype(np.float32)
    ids[0, 0] = n_experts - 1
    if slots > 1:
        ids[0, 1] = n_experts - 1        # the same expert twice in a token
        weights[-1, -1] = 0.0
    if slots > 2:
        ids[-1, 1] = n_experts + 3       # left out, as the combine leaves it out
    out = cp.full((tokens, n), np.nan, dtype=out_dtype)
    _launch_matvec_token_sums(cp, to_gpu(cp, w), cp.asarray(act.blocks), out, cp.asarray(ids), cp.asarray(weights))
    a = dequantize_q8(act).astype(np.float64).reshape(tokens, slots, k)
    wf = w4kern.reference.dequantize_weight(w).astype(np.float64)
    expected = np.zeros((tokens, n))
    for t in range(tokens):
        for j in range(slots):
            if 0 <= ids[t, j] < n_experts:
                expected[t] += np.float64(weights[t, j]) * (wf[ids[t, j]] @ a[t, j])
    got = cp.asnumpy(out).astype(np.float64)
    rel = 2.0 ** -8 if out_dtype == w4kern.bfloat16 else 1e-5
    assert_within(got, expected, rel, 1e-5)


@pytest.mark.parametrize("activation,t,k", [("int8", 1, 4), ("int8", 5, 4), ("int8", 3, 33)])
def test_fused_moe_programmatic_launches_give_the_same_bits(cp, rng, monkeypatch, activation, t, k):
    """W4KERN_PDL=always makes the int8 decode chain's kernels programmatic
    dependent launches in eager calls too (on sm_90+; elsewhere a plain launch): the
    same bits as plain launches, with different inputs back to back so that an overlap
    without its wait would show (k = 33: GEMM2 per item after the silu quantizer)."""
    x, w13, w2, weights, ids = moe_case(rng, t, 40, k, hidden=256, inter=128, group_size=32, symmetric=False)
    rest = (to_gpu(cp, w13), to_gpu(cp, w2), cp.asarray(weights), cp.asarray(ids))
    # different x back to back: a kernel that read its predecessor's output early
    # would see the previous call's
    xs = [cp.asarray(x) * (1 + i % 3) * (-1) ** i for i in range(12)]
    monkeypatch.setenv("W4KERN_PDL", "never")
    plain = [cp.asnumpy(w4kern.fused_moe(xi, *rest, activation=activation)).view(np.uint16) for xi in xs]
    monkeypatch.setenv("W4KERN_PDL", "always")
    # each x written by a copy kernel just before its call: the chain's first kernel
    # (the quantizer, a programmatic launch too) must wait for it
    outs = []
    for xi in xs:
        fresh = cp.empty_like(xi)
        fresh[...] = xi
        outs.append(w4kern.fused_moe(fresh, *rest, activation=activation))
    for got, expected in zip(outs, plain):
        np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint16), expected)
    monkeypatch.setenv("W4KERN_PDL", "sometimes")
    with pytest.raises(ValueError, match="W4KERN_PDL must be one of"):
        w4kern.fused_moe(xs[0], *rest, activation=activation)
