"""w4kern.linear's kernels against the NumPy reference on the same quantized inputs.

The reference (float64 on the dequantized weight and the very Q8 blocks /
16-bit activations the kernel reads) differs from a kernel only by fp32
accumulation, so the tolerance is a small multiple of fp32 rounding on the
sum of |x| * |w|. Outputs are poisoned with NaN first; every element is
checked. Runs only on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference
from w4kern._registry import A16_CONFIGS, A16_ROW_CONFIGS, MATVEC_CONFIGS, a16_rows_instance
from w4kern.formats import Int4TiledWeight
from w4kern.linear import _linear

pytestmark = pytest.mark.gpu

SCALES = [np.float16, w4kern.bfloat16, np.float32]
MS = [1, 2, 3, 4, 5, 7, 8]
# (N, K) per group size: K from 32 up to 21504, K not a multiple of 128 for
# g32/g64, N not a multiple of the kernels' 4 / 64 rows
CASES = {
    32: [(1, 32), (67, 96), (200, 4128)],
    64: [(13, 64), (130, 2112)],
    128: [(5, 128), (70, 4096), (13, 21504)],
    -1: [(3, 32), (131, 1056)],
}


def make_int4(rng, n, k, group_size, symmetric, scale_dtype):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w4kern.quantize_int4(w, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)


def to_gpu(cp, weight):
    fields = {f: getattr(weight, f) for f in ("qweight", "scales", "zeros") if hasattr(weight, f)}
    moved = {f: (None if a is None else cp.asarray(a)) for f, a in fields.items()}
    if isinstance(weight, Int4TiledWeight):
        moved["k"], moved["n"] = weight.k, weight.n
    return type(weight)(**moved, group_size=weight.group_size)


def tolerance(x_ref, weight):
    """|x| @ |w|.T times a few fp32 roundings per term, per output element."""
    a = np.abs(reference.dequantize_activations(x_ref)).astype(np.float64)
    w = np.abs(reference.dequantize_weight(weight)).astype(np.float64)
    return 4e-6 * (a @ w.T) + 1e-6


def quantized(x, act):
    """What the GPU path feeds its kernel for act: Q8 blocks, per-token INT8 or x."""
    if act == "q8":
        return w4kern.quantize_q8(x)
    if act == "int8":
        return w4kern.quantize_per_token_int8(x)
    return x


def check(cp, rng, weight, m, k, *, act, kernel, dtype=w4kern.bfloat16, ctas_per_sm=None, bias=False,
          matvec_config=None, matvec_ctas=None):
    """Run one kernel on fresh random x and compare with the reference."""
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1.0, 20.0])).astype(dtype)
    n = weight.shape[0]
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    out = cp.full((m, n), np.nan, dtype=np.float32)
    got = _linear(cp.asarray(x), to_gpu(cp, weight), act=act, kernel=kernel, out=out,
                  bias=None if b is None else cp.asarray(b), ctas_per_sm=ctas_per_sm, matvec_config=matvec_config,
                  matvec_ctas=matvec_ctas)
    assert got is out
    x_ref = quantized(x, act)
    if isinstance(weight, Int4TiledWeight):   # the reference reads the plain layout
        weight = weight.to_plain()
    expected = reference.linear(x_ref, weight, b)
    tol = tolerance(x_ref, weight)
    got = cp.asnumpy(out)
    bad = ~(np.abs(got - expected) <= tol)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}: "
        f"got {got[bad][:4]}, expected {expected[bad][:4]}, tol {tol[bad][:4]}"
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", SCALES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("group_size", list(CASES), ids=lambda g: f"g{g}")
@pytest.mark.parametrize("path", ["matvec-q8", "small_m-q8", "small_m-bf16", "small_m-f16", "a16-bf16", "a16-f16",
                                  "a16_rows-bf16", "a16_rows-f16", "a8-int8", "a8-int8f32", "matvec-int8"])
def test_int4_kernels_match_reference(cp, rng, path, group_size, scale_dtype, symmetric):
    kernel, act = path.split("-")
    dtype = np.float16 if act == "f16" else np.float32 if act == "int8f32" else w4kern.bfloat16
    act = {"f16": "bf16", "int8f32": "int8"}.get(act, act)
    if kernel == "a16_rows" and a16_rows_instance(group_size) is None:
        weight = make_int4(rng, *CASES[group_size][0], group_size, symmetric, scale_dtype)
        with pytest.raises(ValueError, match="a16_rows kernel takes one token and g128 or per-channel"):
            check(cp, rng, weight, 1, CASES[group_size][0][1], act=act, kernel=kernel, dtype=dtype)
        return
    for n, k in CASES[group_size]:
        weight = make_int4(rng, n, k, group_size, symmetric, scale_dtype)
        for m in ([1] if kernel == "a16_rows" else MS):   # the row-run walk takes one token
            check(cp, rng, weight, m, k, act=act, kernel=kernel, dtype=dtype, bias=(m == 3 or kernel == "a16_rows"))


@pytest.mark.parametrize("scale_dtype", SCALES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("group_size", list(CASES), ids=lambda g: f"g{g}")
def test_int8_matvec_matches_reference(cp, rng, group_size, scale_dtype):
    for n, k in CASES[group_size]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        weight = w4kern.quantize_int8(w, group_size=group_size, scale_dtype=scale_dtype)
        for m in MS:
            check(cp, rng, weight, m, k, act="q8", kernel="matvec", bias=(m == 2))


@pytest.mark.parametrize("config", MATVEC_CONFIGS, ids=lambda c: "m{}-r{}-u{}-s{}".format(*c))
@pytest.mark.parametrize("bits", [4, 8])
def test_one_token_matvec_every_instance(cp, rng, bits, config):
    for group_size, cases in CASES.items():
        for n, k in cases:
            w = rng.standard_normal((n, k)).astype(np.float32)
            weight = (w4kern.quantize_int4(w, group_size=group_size, symmetric=False) if bits == 4
                      else w4kern.quantize_int8(w, group_size=group_size))
            check(cp, rng, weight, 1, k, act="q8", kernel="matvec", matvec_config=config, bias=True)


@pytest.mark.parametrize("config", MATVEC_CONFIGS, ids=lambda c: "m{}-r{}-u{}-s{}".format(*c))
def test_matvec_warps_walk_many_row_groups(cp, rng, config):
    """A grid of 1 or 3 CTAs makes each warp walk many row groups (the persistent
    loop, its prefetch across row groups and the per-group reset), and a
    GPU-filling grid on N = 20011 rows does the same at full size."""
    for group_size, n, k, ctas in [(32, 333, 96, 1), (64, 257, 2112, 3), (128, 20011, 384, None), (-1, 99, 1056, 1)]:
        weight = make_int4(rng, n, k, group_size, group_size != 64, np.float16)
        for m in sorted({1, config[0]}):
            check(cp, rng, weight, m, k, act="q8", kernel="matvec", matvec_config=config, matvec_ctas=ctas,
                  bias=(m == 1))


@pytest.mark.parametrize("act", ["bf16", "int8"])
@pytest.mark.parametrize("config", A16_CONFIGS, ids=lambda c: "t{}-s{}".format(*c))
def test_a16_every_instance_walks_many_row_blocks(cp, rng, config, act):
    """Every (tiles, split) instance on 1 or 3 CTAs (each warp walks many row blocks,
    prefetching across them) and on a GPU-filling grid; per-channel K = 1056 ends
    inside a 128-k step, so some threads of the last step load nothing."""
    for group_size, n, k, ctas in [(32, 333, 96, 1), (64, 257, 2112, 3), (128, 20011, 384, None), (-1, 99, 1056, 1),
                                   (-1, 40, 4128, None)]:
        weight = make_int4(rng, n, k, group_size, group_size != 64, np.float16)
        for m in (1, 8):
            check(cp, rng, weight, m, k, act=act, kernel="a16" if act == "bf16" else "a8", matvec_config=config,
                  matvec_ctas=ctas, bias=(m == 1))


@pytest.mark.parametrize("dtype", [w4kern.bfloat16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("config", A16_ROW_CONFIGS, ids=lambda c: "t{}-s{}".format(*c))
def test_a16_rows_every_instance_walks_many_row_blocks(cp, rng, config, dtype):
    """Every row-run instance on 1 or 3 CTAs (each warp walks many row blocks,
    prefetching across them) and on GPU-filling grids. K = 384 and 4224 end inside a
    1024-k step (whole chunks past K), per-channel K = 1056 and 4128 end inside a
    chunk (some threads of it past K), K = 21504 is 21 whole steps, and N = 1, 7,
    20011 leave a row block partly empty."""
    for group_size, n, k, ctas in [(128, 20011, 384, None), (128, 7, 4224, 1), (128, 333, 21504, 3),
                                   (-1, 99, 1056, 1), (-1, 40, 4128, None), (-1, 1, 32, None), (128, 5, 128, 1)]:
        weight = make_int4(rng, n, k, group_size, group_size != 128, np.float16)
        check(cp, rng, weight, 1, k, act="bf16", kernel="a16_rows", dtype=dtype, matvec_config=config,
              matvec_ctas=ctas, bias=(n != 7))


def test_one_token_w4a16_public_dispatch_on_long_rows(cp, rng):
    """linear(act="bf16") at M = 1 on down-projection-length rows (K = 14336: the
    row-run walk where the GPU's table says so, else matvec_a16's walk) agrees with
    the reference, for g128 and per-channel weights."""
    for group_size in (128, -1):
        weight = make_int4(rng, 300, 14336, group_size, False, w4kern.bfloat16)
        x = rng.standard_normal((1, 14336)).astype(w4kern.bfloat16)
        got = w4kern.linear(cp.asarray(x), to_gpu(cp, weight), act="bf16", out_dtype=np.float32)
        np.testing.assert_array_less(np.abs(cp.asnumpy(got) - reference.linear(x, weight)), tolerance(x, weight))


@pytest.mark.parametrize("ctas_per_sm", [1, 3, 64])
@pytest.mark.parametrize("act", ["q8", "bf16"])
def test_small_m_split_k_is_exact_and_deterministic(cp, rng, act, ctas_per_sm):
    """Few rows and long K: split K over many CTAs (64 per SM gives one stage per
    split); the last CTA's sum must match the reference and repeat bit for bit."""
    weight = make_int4(rng, 70, 14336, 128, False, w4kern.bfloat16)
    check(cp, rng, weight, 5, 14336, act=act, kernel="small_m", ctas_per_sm=ctas_per_sm)
    x = cp.asarray(rng.standard_normal((8, 14336)).astype(w4kern.bfloat16))
    wg = to_gpu(cp, weight)
    first = _linear(x, wg, act=act, kernel="small_m", out_dtype=np.float32, ctas_per_sm=ctas_per_sm)
    for _ in range(3):
        again = _linear(x, wg, act=act, kernel="small_m", out_dtype=np.float32, ctas_per_sm=ctas_per_sm)
        np.testing.assert_array_equal(cp.asnumpy(again).view(np.uint32), cp.asnumpy(first).view(np.uint32))


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16, w4kern.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kernel", ["matvec", "small_m", "a16", "a16_rows", "a8"])
def test_output_dtypes_and_bias(cp, rng, kernel, out_dtype):
    m, group_size = (1, 128) if kernel == "a16_rows" else (3, 64)
    weight = make_int4(rng, 77, 512, group_size, True, np.float16)
    x = rng.standard_normal((m, 512)).astype(w4kern.bfloat16)
    b = rng.standard_normal(77).astype(out_dtype)
    out = cp.full((m, 77), np.nan, dtype=out_dtype)
    act = {"a16": "bf16", "a16_rows": "bf16", "a8": "int8"}.get(kernel, "q8")
    _linear(cp.asarray(x), to_gpu(cp, weight), act=act, kernel=kernel, bias=cp.asarray(b), out=out)
    x_ref = quantized(x, act)
    expected = reference.linear(x_ref, weight, b.astype(np.float32))
    tol = tolerance(x_ref, weight) + np.abs(expected) * (2.0 ** -7)
    np.testing.assert_array_less(np.abs(cp.asnumpy(out).astype(np.float32) - expected), tol)


def test_public_dispatch_every_m_and_leading_dims(cp, rng):
    """linear() picks matvec / small_m / dense by M; each agrees with the NumPy path,
    which quantizes x the same way (Q8 up to 8 tokens, x itself beyond)."""
    weight = make_int4(rng, 96, 1024, 128, False, w4kern.bfloat16)
    wg = to_gpu(cp, weight)
    for lead in [(1,), (2,), (3,), (8,), (9,), (2, 2), (1, 5), (33,)]:
        x = rng.standard_normal(lead + (1024,)).astype(w4kern.bfloat16)
        for act in ("q8", "bf16", "int8"):
            got = w4kern.linear(cp.asarray(x), wg, act=act, out_dtype=np.float32)
            expected = w4kern.linear(x, weight, act=act, out_dtype=np.float32)
            assert got.shape == lead + (96,)
            m = int(np.prod(lead))
            x_ref = quantized(x.reshape(m, 1024), act) if m <= 8 else x.reshape(m, 1024)
            tol = tolerance(x_ref, weight).reshape(lead + (96,))
            np.testing.assert_array_less(np.abs(cp.asnumpy(got) - expected), tol)


def test_one_dimensional_x_and_bf16_default_output(cp, rng):
    weight = make_int4(rng, 40, 256, 32, True, np.float16)
    x = rng.standard_normal(256).astype(w4kern.bfloat16)
    y = w4kern.linear(cp.asarray(x), to_gpu(cp, weight))
    assert y.shape == (40,) and y.dtype == w4kern.bfloat16
    expected = w4kern.linear(x, weight, out_dtype=np.float32)
    np.testing.assert_allclose(cp.asnumpy(y).astype(np.float32), expected, rtol=2 ** -7, atol=1e-3)


def test_prequantized_q8_activations(cp, rng):
    weight = make_int4(rng, 50, 640, 64, False, np.float32)
    x = rng.standard_normal((4, 640)).astype(np.float32)
    xq = w4kern.quantize_q8(cp.asarray(x))
    got = w4kern.linear(xq, to_gpu(cp, weight), out_dtype=np.float32)
    expected = reference.linear(w4kern.quantize_q8(x), weight)
    np.testing.assert_array_less(np.abs(cp.asnumpy(got) - expected), tolerance(w4kern.quantize_q8(x), weight))


def test_prequantized_per_token_int8(cp, rng):
    """PerTokenInt8 from the caller (GPU quantizer) at M <= 8 (a8) and M > 8 (dense)."""
    weight = make_int4(rng, 50, 640, 128, False, w4kern.bfloat16)
    for m in (3, 11):
        x = rng.standard_normal((m, 640)).astype(np.float32)
        xq = w4kern.quantize_per_token_int8(x)
        xq_gpu = w4kern.PerTokenInt8(q=cp.asarray(xq.q), scales=cp.asarray(xq.scales))
        got = w4kern.linear(xq_gpu, to_gpu(cp, weight), act="int8", out_dtype=np.float32)
        expected = reference.linear(xq, weight)
        np.testing.assert_array_less(np.abs(cp.asnumpy(got) - expected), tolerance(xq, weight))


def test_gpu_per_token_int8_matches_numpy_quantizer(cp, rng):
    """linear(act="int8") quantizes on the GPU: its q and scales are bit-identical to
    quantize_per_token_int8's, so the kernel test's reference sees the same input."""
    from w4kern.quant import _quantize_per_token_cuda

    for dtype in (np.float32, np.float16, w4kern.bfloat16):
        x = (rng.standard_normal((7, 4128)) * 3).astype(dtype)
        x[4] = 0
        q = cp.full((7, 4128), 99, dtype=np.int8)
        scales = cp.full(7, np.nan, dtype=np.float32)
        _quantize_per_token_cuda(cp.asarray(x), q, scales)
        want = w4kern.quantize_per_token_int8(x)
        np.testing.assert_array_equal(cp.asnumpy(q), want.q)
        np.testing.assert_array_equal(cp.asnumpy(scales), want.scales)


def test_int8_weight_dispatch(cp, rng):
    weight = w4kern.quantize_int8(rng.standard_normal((33, 2048)).astype(np.float32))
    for m in (1, 6, 12):
        x = rng.standard_normal((m, 2048)).astype(w4kern.bfloat16)
        got = w4kern.linear(cp.asarray(x), to_gpu(cp, weight), out_dtype=np.float32)
        expected = w4kern.linear(x, weight, out_dtype=np.float32)
        x_ref = w4kern.quantize_q8(x) if m <= 8 else x
        np.testing.assert_array_less(np.abs(cp.asnumpy(got) - expected), tolerance(x_ref, weight))


@pytest.mark.parametrize("act", ["q8", "bf16", "int8"])
def test_nan_in_one_token_stays_in_that_token(cp, rng, act):
    weight = make_int4(rng, 64, 256, 128, True, np.float16)
    x = rng.standard_normal((4, 256)).astype(w4kern.bfloat16)
    x[2, 77] = np.nan
    for kernel in {"q8": ("matvec", "small_m"), "bf16": ("small_m", "a16"), "int8": ("matvec", "a8")}[act]:
        y = cp.asnumpy(_linear(cp.asarray(x), to_gpu(cp, weight), act=act, kernel=kernel, out_dtype=np.float32))
        assert np.isnan(y[2]).all(), kernel
        assert np.isfinite(np.delete(y, 2, axis=0)).all(), kernel


def assert_graph_replay_gives_eager_bits(cp, x, weight, act, n):
    """linear captured in a CUDA graph on a fresh stream (after a warm-up call that
    sizes the workspace), replayed twice over a zeroed out: the eager call's bits."""
    out = cp.empty((x.shape[0], n), dtype=w4kern.bfloat16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        eager = w4kern.linear(x, weight, act=act).copy()
        w4kern.linear(x, weight, act=act, out=out)
        stream.begin_capture()
        w4kern.linear(x, weight, act=act, out=out)
        graph = stream.end_capture()
        out.fill(0)
        graph.launch()
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint16), cp.asnumpy(eager).view(np.uint16))
    values = cp.asnumpy(eager).astype(np.float32)
    assert np.isfinite(values).all() and (values != 0).any()


@pytest.mark.parametrize("act", ["q8", "bf16", "int8"])
def test_cuda_graph_replay_gives_eager_bits(cp, rng, act):
    weight = to_gpu(cp, make_int4(rng, 4096, 4096, 128, False, w4kern.bfloat16))
    x = cp.asarray(rng.standard_normal((4, 4096)).astype(w4kern.bfloat16))
    assert_graph_replay_gives_eager_bits(cp, x, weight, act, 4096)


def test_quality_against_unquantized_bf16_math(cp, rng, capsys):
    """Cosine similarity of each path with x @ W.T on the unquantized float weight."""
    w = rng.standard_normal((1024, 4096)).astype(np.float32)
    x = rng.standard_normal((4, 4096)).astype(w4kern.bfloat16)
    exact = x.astype(np.float64) @ w.astype(w4kern.bfloat16).astype(np.float64).T

    def cosine(y):
        y = cp.asnumpy(y).astype(np.float64).ravel()
        return float(y @ exact.ravel() / np.linalg.norm(y) / np.linalg.norm(exact))

    w4 = to_gpu(cp, w4kern.quantize_int4(w, group_size=128))
    w8 = to_gpu(cp, w4kern.quantize_int8(w))
    scores = {
        "w4a8_g128": cosine(w4kern.linear(cp.asarray(x), w4, act="q8", out_dtype=np.float32)),
        "w4a16_g128": cosine(w4kern.linear(cp.asarray(x), w4, act="bf16", out_dtype=np.float32)),
        "w4a8_int8_g128": cosine(w4kern.linear(cp.asarray(x), w4, act="int8", out_dtype=np.float32)),
        "w8a8": cosine(w4kern.linear(cp.asarray(x), w8, out_dtype=np.float32)),
    }
    with capsys.disabled():   # the numbers belong in the device log
        print("\ncosine similarity vs bf16 math:", scores)
    assert scores["w4a8_g128"] > 0.99 and scores["w4a16_g128"] > 0.99 and scores["w8a8"] > 0.999
    assert scores["w4a8_int8_g128"] > 0.99


@pytest.mark.parametrize("act,kernel", [("q8", "matvec"), ("int8", "matvec")])
@pytest.mark.parametrize("m", [1, 3])
def test_programmatic_launch_of_the_matvec_gives_the_same_bits(cp, rng, monkeypatch, act, kernel, m):
    """W4KERN_PDL=always: the op's quantizer and the dp4a matvec after it are programmatic
    dependent launches in eager calls too (sm_90+): the same bits as plain launches, for
    INT4 and (act='q8') INT8 weights, over many back-to-back calls."""
    weights = [to_gpu(cp, make_int4(rng, 2048, 4096, 128, False, w4kern.bfloat16))]
    if act == "q8":
        weights.append(to_gpu(cp, w4kern.quantize_int8(rng.standard_normal((1024, 4096)).astype(np.float32))))
    # different x back to back: a matvec that read the quantizer's output early would
    # see the previous call's activations
    xs = [cp.asarray(rng.standard_normal((m, 4096)).astype(w4kern.bfloat16)) for _ in range(12)]
    for weight in weights:
        monkeypatch.setenv("W4KERN_PDL", "never")
        plain = [cp.asnumpy(_linear(x, weight, act=act, kernel=kernel, out_dtype=np.float32)) for x in xs]
        monkeypatch.setenv("W4KERN_PDL", "always")
        # each x written by a copy kernel just before its call: the op's first kernel
        # (the quantizer, a programmatic launch too) must wait for it
        outs = []
        for x in xs:
            fresh = cp.empty_like(x)
            fresh[...] = x
            outs.append(_linear(fresh, weight, act=act, kernel=kernel, out_dtype=np.float32))
        for got, expected in zip(outs, plain):
            np.testing.assert_array_equal(cp.asnumpy(got), expected)


# Int4TiledWeight (w4kern.prepare): (N, K) per group size, N not a multiple of 16 or
# 32 (the last tile and 2-tile block hold rows past N), per-channel K not a multiple
# of 128 (the last step is partly padding)
TILED_CASES = {128: [(5, 128), (37, 384), (13, 4096)], -1: [(3, 32), (40, 1056), (33, 4128)]}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", SCALES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("group_size", list(TILED_CASES), ids=lambda g: f"g{g}")
@pytest.mark.parametrize("act", ["bf16", "f16", "int8", "int8f32"])
def test_tiled_weights_match_reference(cp, rng, act, group_size, scale_dtype, symmetric):
    """The public op on a prepared weight, every M up to 8 (the a16 / a8 kernels on
    the tiled layout), against the reference on the plain weight."""
    dtype = np.float16 if act == "f16" else np.float32 if act == "int8f32" else w4kern.bfloat16
    act = {"f16": "bf16", "int8f32": "int8"}.get(act, act)
    for n, k in TILED_CASES[group_size]:
        tiled = w4kern.prepare(make_int4(rng, n, k, group_size, symmetric, scale_dtype))
        for m in MS:
            check(cp, rng, tiled, m, k, act=act, kernel=None, dtype=dtype, bias=(m == 3))


@pytest.mark.parametrize("act", ["bf16", "int8"])
@pytest.mark.parametrize("config", A16_CONFIGS, ids=lambda c: "t{}-s{}".format(*c))
def test_tiled_every_instance_gives_the_plain_layouts_bits(cp, rng, config, act):
    """Every (tiles, split) instance on the tiled layout, on 1 or 3 CTAs (each warp
    walks many row blocks) and on a GPU-filling grid: the same bits as the same
    instance on the plain layout (the same MMAs in the same order), and the reference."""
    kernel = "a16" if act == "bf16" else "a8"
    for group_size, n, k, ctas in [(128, 333, 512, 1), (128, 20011, 384, None), (-1, 99, 1056, 3),
                                   (-1, 40, 4128, None)]:
        plain = make_int4(rng, n, k, group_size, group_size == 128, np.float16)
        tiled = w4kern.prepare(plain)
        for m in (1, 5, 8):
            check(cp, rng, tiled, m, k, act=act, kernel=kernel, matvec_config=config, matvec_ctas=ctas, bias=(m == 1))
            x = cp.asarray(rng.standard_normal((m, k)).astype(w4kern.bfloat16))
            outs = [cp.full((m, n), np.nan, dtype=np.float32) for _ in range(2)]
            for w, out in zip((plain, tiled), outs):
                _linear(x, to_gpu(cp, w), act=act, kernel=kernel, out=out, matvec_config=config, matvec_ctas=ctas)
            cp.testing.assert_array_equal(outs[1], outs[0])


def needs_sm90(cp):
    if int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("matvec_bulk needs an sm_90 GPU")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scale_dtype", SCALES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("act", ["bf16", "f16", "int8"])
def test_bulk_matches_reference(cp, rng, act, scale_dtype, symmetric):
    """matvec_bulk forced on tiled weights: N past the auto rule's 512 tiles and N not a
    multiple of 16, K of fewer steps than the 8-way split and per-channel K not a
    multiple of 128, 1 or 3 CTAs (each walks many tile sets) and a GPU-filling grid,
    every M up to 8, bias and 16-bit outputs."""
    needs_sm90(cp)
    dtype = np.float16 if act == "f16" else w4kern.bfloat16
    act = "bf16" if act == "f16" else act
    for group_size, n, k, ctas in [(128, 333, 512, 1), (128, 8213, 1280, None), (128, 17, 3072, 3),
                                   (-1, 99, 1056, 3), (-1, 40, 4128, None), (-1, 5, 32, None)]:
        tiled = w4kern.prepare(make_int4(rng, n, k, group_size, symmetric, scale_dtype))
        for m in MS:
            check(cp, rng, tiled, m, k, act=act, kernel="bulk", dtype=dtype, bias=(m == 2), matvec_ctas=ctas)


@pytest.mark.parametrize("out_dtype", [np.float16, w4kern.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("act", ["bf16", "int8"])
def test_bulk_16bit_outputs_and_pre_quantized_x(cp, rng, act, out_dtype):
    """16-bit outputs are the fp32 result rounded once, and a PerTokenInt8 x gives what
    act="int8" gives on the same values."""
    needs_sm90(cp)
    tiled = to_gpu(cp, w4kern.prepare(make_int4(rng, 77, 640, 128, False, w4kern.bfloat16)))
    for m in (1, 6):
        x = cp.asarray(rng.standard_normal((m, 640)).astype(w4kern.bfloat16))
        wide = _linear(x, tiled, act=act, kernel="bulk", out=cp.full((m, 77), np.nan, dtype=np.float32))
        narrow = _linear(x, tiled, act=act, kernel="bulk", out=cp.full((m, 77), np.nan, dtype=out_dtype))
        cp.testing.assert_array_equal(narrow, wide.astype(out_dtype))
        if act == "int8":
            pre = _linear(w4kern.quantize_per_token_int8(x), tiled, act="int8", kernel="bulk")
            cp.testing.assert_array_equal(pre, wide.astype(pre.dtype))


def test_bulk_refuses_plain_weights_and_misaligned_scales(cp, rng):
    needs_sm90(cp)
    plain = to_gpu(cp, make_int4(rng, 16, 128, 128, False, np.float16))
    x = cp.asarray(rng.standard_normal((1, 128)).astype(w4kern.bfloat16))
    with pytest.raises(ValueError, match="bulk kernel takes an Int4TiledWeight"):
        _linear(x, plain, act="bf16", kernel="bulk")
    tiled = to_gpu(cp, w4kern.prepare(make_int4(rng, 16, 256, 128, False, np.float16)))
    for field in ("scales", "zeros"):
        arrays = {"scales": tiled.scales, "zeros": tiled.zeros}
        # the same values, starting 2 bytes into an allocation (contiguous, misaligned)
        moved = cp.empty(arrays[field].size + 1, dtype=arrays[field].dtype)[1:].reshape(arrays[field].shape)
        moved[...] = arrays[field]
        arrays[field] = moved
        shifted = Int4TiledWeight(tiled.qweight, arrays["scales"], arrays["zeros"], 128, 256, 16)
        with pytest.raises(ValueError, match=f"weight.{field} must start at a 16-byte aligned address"):
            _linear(x, shifted, act="bf16", kernel="bulk")


@pytest.mark.parametrize("act", ["bf16", "int8"])
def test_tiled_weights_past_eight_tokens_and_in_graphs(cp, rng, act):
    """M > 8 unpacks the tiled weight to the dense path (the plain weight's bits);
    M <= 8 replays in a CUDA graph with the eager bits."""
    plain = make_int4(rng, 70, 256, 128, False, w4kern.bfloat16)
    tiled_gpu, plain_gpu = to_gpu(cp, w4kern.prepare(plain)), to_gpu(cp, plain)
    for m in (9, 33):
        x = cp.asarray(rng.standard_normal((m, 256)).astype(w4kern.bfloat16))
        cp.testing.assert_array_equal(w4kern.linear(x, tiled_gpu, act=act), w4kern.linear(x, plain_gpu, act=act))
    x = cp.asarray(rng.standard_normal((4, 256)).astype(w4kern.bfloat16))
    assert_graph_replay_gives_eager_bits(cp, x, tiled_gpu, act, 70)
