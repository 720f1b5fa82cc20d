"""GPU kernels against the NumPy path: bit-identical outputs, poisoned buffers, tails.

Runs only where CuPy sees a GPU (the device machine); skipped with a reason elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import _runtime
from w4kern._registry import FAMILIES

pytestmark = pytest.mark.gpu

FLOATS = [np.float32, np.float16, w4kern.bfloat16]
POISON = 0xA5   # byte pattern written into every output before a kernel runs


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}")


# 25 shapes: odd and even M, M = 1, leading batch dims, K from 32 to 21504
Q8_SHAPES = [(1, 32), (1, 64), (1, 4096), (1, 14336), (1, 21504), (2, 96), (3, 32), (3, 4128),
             (5, 160), (7, 2048), (8, 5376), (9, 288), (16, 4096), (17, 352), (31, 64), (33, 1056),
             (64, 512), (127, 96), (255, 32), (1000, 128), (4096, 32), (2, 3, 96), (3, 5, 64), (7,  1, 224),
              (1024, 32768)]   # the last takes the thread-per-block variant (size rule in quant.py)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", Q8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_q8_bit_identical(cp, rng, shape, dtype):
    scale = rng.choice([1e-3, 1.0, 300.0])
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    x[..., :32] = 0                                   # one all-zero block per row
    expected = w4kern.quantize_q8(x).blocks
    out = cp.full(expected.shape, POISON, dtype=np.uint8)
    got = w4kern.quantize_q8(cp.asarray(x), out=out)
    assert got.blocks is out
    np.testing.assert_array_equal(cp.asnumpy(out), expected)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_quantize_q8_non_finite_blocks_bit_identical(cp, rng, dtype):
    x = rng.standard_normal((5, 256)).astype(np.float32)
    x[0, 3] = np.nan
    x[2, 100] = np.inf
    x[4, 255] = -np.inf
    x[1, 32:64] = 0
    x[1, 40] = np.nan                                    # NaN in an otherwise all-zero block
    x[3, 64:96] = np.float32(2.0 ** -140)
    x[3, 70] = np.nan                                    # NaN in a block whose d is subnormal
    x = x.astype(dtype)
    expected = w4kern.quantize_q8(x).blocks
    got = w4kern.quantize_q8(cp.asarray(x)).blocks
    np.testing.assert_array_equal(cp.asnumpy(got), expected)


@pytest.mark.parametrize("chunks", [1, 2, 4, 0])
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_quantize_q8_every_instance_on_ties_and_tiny_values(cp, rng, dtype, chunks):
    """Quotients exactly at k + 0.5, blocks whose d is subnormal, and random rows, for
    every (dtype, chunks per thread) instance; the rows count (9) leaves partial CTAs."""
    from w4kern.quant import _quantize_q8_cuda

    x = rng.standard_normal((9, 1056)).astype(np.float32)
    x[0, :32] = np.arange(32) - 15.5                     # d = 16.5/127: many exact .5-ish quotients
    x[1, :32] = 0
    x[1, 0], x[1, 1:6] = 127.0, [0.5, -0.5, 2.5, -2.5, 126.5]   # d = 1: quotients are ties
    x[2, :32] = rng.standard_normal(32) * 1e-38          # d subnormal: 1/d may overflow
    x[3, :32] = np.float32(2.0 ** -140)                  # every value subnormal
    x[4, 32:64] = rng.integers(-127, 128, 32) + 0.5      # ties relative to d = max/127
    x = x.astype(dtype)
    expected = w4kern.quantize_q8(x).blocks
    out = cp.full(expected.shape, POISON, dtype=np.uint8)
    _quantize_q8_cuda(cp.asarray(x), out, chunks)
    np.testing.assert_array_equal(cp.asnumpy(out), expected)


@pytest.mark.parametrize("chunks", [1, 2, 4, 0])
def test_quantize_q8_every_instance_one_ulp_from_ties(cp, rng, chunks):
    """The kernels skip the division per value unless x * (1/d) lands near a rounding
    tie: quotients at k + 0.5 and one or two ulps either side of it, in blocks at
    scales from 1e-30 to 1e30, must still give NumPy's q = roundf(x / d)."""
    from w4kern.quant import _quantize_q8_cuda

    rows = []
    for scale in (1e-30, 1e-3, 1.0, 7.0, 1e30):
        d = np.float32(scale / 127) * rng.uniform(0.5, 2.0, (64, 1)).astype(np.float32)
        k = rng.integers(-127, 127, (64, 32)).astype(np.float32)
        x = ((k + np.float32(0.5)) * d).astype(np.float32)
        x[:, 0] = np.float32(127) * d[:, 0]                  # max|x| = 127 d
        step = rng.integers(-2, 3, x.shape)
        for _ in range(2):                                   # move 0, 1 or 2 ulps
            towards = np.where(step > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
            x = np.where(step == 0, x, np.nextafter(x, towards)).astype(np.float32)
            step = np.where(np.abs(step) == 2, step, 0)
        rows.append(x.reshape(-1))
    x = np.concatenate(rows).reshape(-1, 2048)
    expected = w4kern.quantize_q8(x).blocks
    out = cp.full(expected.shape, POISON, dtype=np.uint8)
    _quantize_q8_cuda(cp.asarray(x), out, chunks)
    np.testing.assert_array_equal(cp.asnumpy(out), expected)


def test_quantize_q8_allocates_when_no_out(cp, rng):
    x = rng.standard_normal((3, 64)).astype(np.float32)
    got = w4kern.quantize_q8(cp.asarray(x))
    assert isinstance(got.blocks, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(got.blocks), w4kern.quantize_q8(x).blocks)


# (leading dims, N, K, group size): 24 shapes, every group size, N odd, K not a multiple of 128
DEQ_CASES = [((), 1, 32, 32), ((), 3, 64, 32), ((), 5, 96, 32), ((), 7, 160, 32), ((), 16, 4128, 32),
             ((), 1, 64, 64), ((), 9, 192, 64), ((), 33, 320, 64), ((), 64, 4096, 64),
             ((), 1, 128, 128), ((), 11, 384, 128), ((), 127, 1024, 128), ((), 256, 5376, 128),
             ((), 6144, 4096, 128), ((), 3, 21504, 128),
             ((), 1, 32, -1), ((), 5, 96, -1), ((), 13, 4096, -1),
             ((3,), 7, 64, 32), ((2,), 16, 128, 128), ((8,), 5, 96, -1), ((4,), 33, 256, 64),
             ((), 4096, 14336, 128), ((), 2, 224, 32)]


@pytest.mark.parametrize("out_dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("scale_dtype", FLOATS, ids=lambda d: "s" + np.dtype(d).name)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("case", DEQ_CASES[:6], ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}")
def test_dequantize_int4_every_instance(cp, rng, case, symmetric, scale_dtype, out_dtype):
    lead, n, k, gs = case
    w = rng.standard_normal(lead + (n, k)).astype(np.float32)
    qw = w4kern.quantize_int4(w, gs, symmetric=symmetric, scale_dtype=scale_dtype)
    _check_dequant(cp, qw, out_dtype)


@pytest.mark.parametrize("case", DEQ_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}")
def test_dequantize_int4_bit_identical(cp, rng, case):
    lead, n, k, gs = case
    w = (rng.standard_normal(lead + (n, k)) * 0.02).astype(w4kern.bfloat16)
    symmetric = bool(rng.integers(2))
    qw = w4kern.quantize_int4(w, gs, symmetric=symmetric)
    _check_dequant(cp, qw, w4kern.bfloat16)


def _check_dequant(cp, qw, out_dtype):
    expected = w4kern.dequantize_int4(qw, out_dtype)
    gpu_w = w4kern.Int4Weight(cp.asarray(qw.qweight), cp.asarray(qw.scales),
                              None if qw.zeros is None else cp.asarray(qw.zeros), qw.group_size)
    out = cp.empty(expected.shape, dtype=expected.dtype)
    out.view(np.uint8)[...] = POISON
    got = w4kern.dequantize_int4(gpu_w, out_dtype, out=out)
    assert got is out
    np.testing.assert_array_equal(bits(cp.asnumpy(out)), bits(expected))


def test_quantize_int4_same_bits_on_cupy(cp, rng):
    """pack.py is one implementation for NumPy and CuPy: both give the same weight."""
    w = (rng.standard_normal((2, 48, 384)) * 0.05).astype(w4kern.bfloat16)
    for gs, symmetric in [(32, False), (128, True), (-1, False)]:
        host = w4kern.quantize_int4(w, gs, symmetric=symmetric)
        dev = w4kern.quantize_int4(cp.asarray(w), gs, symmetric=symmetric)
        np.testing.assert_array_equal(cp.asnumpy(dev.qweight), host.qweight)
        np.testing.assert_array_equal(bits(cp.asnumpy(dev.scales)), bits(host.scales))
        if not symmetric:
            np.testing.assert_array_equal(bits(cp.asnumpy(dev.zeros)), bits(host.zeros))


def test_per_token_quantizers_same_bits_on_cupy(cp, rng):
    x = (rng.standard_normal((7, 256)) * 4).astype(w4kern.bfloat16)
    for fn in (w4kern.quantize_per_token_int8, w4kern.quantize_per_token_fp8):
        host, dev = fn(x), fn(cp.asarray(x))
        np.testing.assert_array_equal(cp.asnumpy(dev.q), host.q)
        np.testing.assert_array_equal(cp.asnumpy(dev.scales), host.scales)


def test_ops_capture_in_a_cuda_graph(cp, rng):
    """quantize_q8 and dequantize_int4 with out= allocate and synchronize nothing: capturable."""
    x = cp.asarray(rng.standard_normal((4, 4096)).astype(w4kern.bfloat16))
    qw = w4kern.quantize_int4(cp.asarray(rng.standard_normal((256, 4096)).astype(np.float32)), 128)
    xq = w4kern.quantize_q8(x)
    w_out = w4kern.dequantize_int4(qw)
    eager_q, eager_w = xq.blocks.copy(), w_out.copy()
    xq.blocks[...] = 0
    w_out[...] = 0
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        w4kern.quantize_q8(x, out=xq)
        w4kern.dequantize_int4(qw, out=w_out)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(xq.blocks), cp.asnumpy(eager_q))
    np.testing.assert_array_equal(bits(cp.asnumpy(w_out)), bits(cp.asnumpy(eager_w)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loaded_kernels_do_not_spill(cp, family):
    from w4kern._registry import FAMILIES as fams

    fam = fams[family]
    for args in fam.instances:
        kernel = _runtime.get_kernel(family, args)
        assert kernel.local_size_bytes == 0, f"{family}<{args}> uses local memory"
        assert 0 < kernel.num_regs <= 255


def test_edited_header_recompiles_on_the_gpu(cp, tmp_path, monkeypatch, rng):
    import shutil

    src = tmp_path / "cuda_src"
    shutil.copytree(_runtime.source_dir(), src)
    monkeypatch.setenv("W4KERN_CUDA_SRC", str(src))
    _runtime.clear_memo()
    x = cp.asarray(rng.standard_normal((2, 64)).astype(np.float32))
    try:
        w4kern.quantize_q8(x)
        before = len(_runtime.STATS["compiled"])
        header = src / "common" / "types.cuh"
        header.write_text(header.read_text() + "\n// edited by a test\n")
        _runtime.clear_memo()
        got = w4kern.quantize_q8(x)
        assert len(_runtime.STATS["compiled"]) == before + 1
        assert _runtime.STATS["compiled"][-1] == ("quantize_q8", _runtime.device_arch(cp.cuda.Device()))
        np.testing.assert_array_equal(cp.asnumpy(got.blocks), w4kern.quantize_q8(cp.asnumpy(x)).blocks)
    finally:
        monkeypatch.delenv("W4KERN_CUDA_SRC")
        _runtime.clear_memo()
