"""DLPack hand-offs with torch and JAX on the GPU (skipped where they are not installed)."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern

pytestmark = pytest.mark.gpu


def test_torch_cuda_tensors_cross_without_copies(cp):
    torch = pytest.importorskip("torch")
    t = torch.arange(12, device="cuda").to(torch.bfloat16).reshape(3, 4)
    a = w4kern.asarray(t)
    assert isinstance(a, cp.ndarray) and a.dtype == w4kern.bfloat16 and a.shape == (3, 4)
    assert a.data.ptr == t.data_ptr()
    y = w4kern.quantize_q8(cp.ones((2, 64), dtype=w4kern.bfloat16)).blocks
    ty = torch.from_dlpack(y)
    assert ty.data_ptr() == y.data.ptr and ty.dtype == torch.uint8


def test_fp8_bits_reinterpret_as_torch_float8(cp, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q = w4kern.quantize_per_token_fp8(cp.asarray(x)).q
    t = w4kern.interop.fp8_to_torch(q)
    assert t.dtype == torch.float8_e4m3fn and t.data_ptr() == q.data.ptr
    expected = cp.asnumpy(q).view(w4kern.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(t.float().cpu().numpy(), expected)
    back = w4kern.interop.fp8_from_torch(t)
    assert isinstance(back, cp.ndarray) and back.data.ptr == q.data.ptr


def test_jax_arrays_cross(cp, rng):
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    a = jax.numpy.arange(8, dtype=jax.numpy.float32)
    b = w4kern.asarray(a)
    assert isinstance(b, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(b), np.arange(8, dtype=np.float32))
    q = cp.asarray(np.arange(256, dtype=np.uint8))
    f8 = w4kern.interop.fp8_to_jax(q)
    np.testing.assert_array_equal(np.asarray(f8.astype(jax.numpy.float32))[0x38], 1.0)


def test_linear_takes_torch_tensors_and_writes_torch_out(cp, rng):
    torch = pytest.importorskip("torch")
    w = rng.standard_normal((64, 256)).astype(np.float32)
    qw = w4kern.quantize_int4(cp.asarray(w), group_size=128)
    x = torch.randn(2, 256, device="cuda").to(torch.bfloat16)
    out = torch.full((2, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = w4kern.linear(x, qw, out=out)
    torch.cuda.synchronize()
    assert y.data.ptr == out.data_ptr()
    expected = w4kern.linear(cp.asarray(x.float().cpu().numpy()).astype(w4kern.bfloat16), qw)
    np.testing.assert_array_equal(out.view(torch.int16).cpu().numpy(), cp.asnumpy(expected).view(np.int16))


def test_torch_stream_orders_work_and_captures_in_torch_graphs(cp, rng):
    torch = pytest.importorskip("torch")
    qw = w4kern.quantize_int4(cp.asarray(rng.standard_normal((256, 512)).astype(np.float32)), group_size=128)
    x = torch.randn(4, 512, device="cuda").to(torch.bfloat16)
    out = torch.empty(4, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), w4kern.interop.torch_stream():
        eager = torch.empty_like(out)
        w4kern.linear(x, qw, out=eager)             # on the side stream: ordered before the copy below
        doubled = eager.float() * 2
        w4kern.linear(x, qw, out=out)               # warm-up: sizes this stream's workspace
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(doubled, eager.float() * 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side), w4kern.interop.torch_stream():
        w4kern.linear(x, qw, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), eager.view(torch.int16))


def test_decode_attention_takes_torch_tensors_and_matches_torch_sdpa(cp, rng):
    """torch tensors straight in (no copies), out= a torch tensor written in place,
    and the result close to torch's own SDPA on the same tensors."""
    torch = pytest.importorskip("torch")
    q = torch.randn(2, 32, 128, device="cuda").to(torch.bfloat16)
    k = torch.randn(2, 8, 1000, 128, device="cuda").to(torch.bfloat16)
    v = torch.randn(2, 8, 1000, 128, device="cuda").to(torch.bfloat16)
    lens = torch.full((2,), 1000, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    got = w4kern.decode_attention(q, k, v, lens, out=out)
    assert got.data.ptr == out.data_ptr()
    cp.cuda.Device().synchronize()
    expected = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def _jax_gpu():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    return jax


def test_jax_bf16_crosses_both_ways_without_copies(cp):
    jax = _jax_gpu()
    jnp = jax.numpy
    a = jnp.arange(16, dtype=jnp.float32).astype(jnp.bfloat16) * 0.5
    b = w4kern.asarray(a)
    assert isinstance(b, cp.ndarray) and b.dtype == w4kern.bfloat16 and b.data.ptr == a.unsafe_buffer_pointer()
    np.testing.assert_array_equal(cp.asnumpy(b).astype(np.float32), np.arange(16, dtype=np.float32) * 0.5)
    c = (cp.arange(16, dtype=np.float32) * 0.25).astype(w4kern.bfloat16)
    j = jax.dlpack.from_dlpack(c)
    assert j.dtype == jnp.bfloat16 and j.unsafe_buffer_pointer() == c.data.ptr
    np.testing.assert_array_equal(np.asarray(j.astype(jnp.float32)), np.arange(16, dtype=np.float32) * 0.25)


def test_jax_fp8_bits_both_ways_byte_exact(cp):
    jax = _jax_gpu()
    codes = np.arange(256, dtype=np.uint8)
    f8 = w4kern.interop.fp8_to_jax(cp.asarray(codes))
    assert f8.dtype == jax.numpy.float8_e4m3fn
    expected = codes.view(w4kern.float8_e4m3fn).astype(np.float32)     # NaN codes compare equal
    np.testing.assert_array_equal(np.asarray(f8.astype(jax.numpy.float32)), expected)
    back = w4kern.interop.fp8_from_jax(f8)
    assert isinstance(back, cp.ndarray) and back.dtype == np.uint8
    np.testing.assert_array_equal(cp.asnumpy(back), codes)


def test_cupy_graph_of_a_decode_step_replays_eager_bits(cp, rng):
    """quantize -> linear on the pre-quantized blocks -> fused_moe (decode path), captured
    in one CuPy graph and replayed, gives the eager bits."""
    hidden, inter, experts = 256, 64, 8
    qw = w4kern.quantize_int4(cp.asarray(rng.standard_normal((hidden, 512)).astype(np.float32) * 0.05),
                              group_size=128)
    w13 = w4kern.quantize_int4(cp.asarray(rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) * 0.05),
                               group_size=64)
    w2 = w4kern.quantize_int4(cp.asarray(rng.standard_normal((experts, hidden, inter)).astype(np.float32) * 0.05),
                              group_size=64)
    x = cp.asarray(rng.standard_normal((1, 512)).astype(np.float32)).astype(w4kern.bfloat16)
    ids = cp.asarray(np.array([[3, 5]], dtype=np.int32))
    weights = cp.asarray(np.array([[0.25, 0.75]], dtype=np.float32))

    def step(xq, h, y):
        w4kern.quantize_q8(x, out=xq)
        w4kern.linear(w4kern.Q8Activations(xq), qw, out=h)
        w4kern.fused_moe(h, w13, w2, weights, ids, activation="int8", out=y)

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        bufs = [cp.empty((1, 512 // 32, 48), dtype=np.uint8), cp.empty((1, hidden), dtype=w4kern.bfloat16),
                cp.empty((1, hidden), dtype=w4kern.bfloat16)]
        step(*bufs)                                   # eager (and plans, compiles, sizes workspaces)
        eager = [b.copy() for b in bufs]
        for b in bufs:
            b.fill(0)
        stream.begin_capture()
        step(*bufs)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    assert float(cp.abs(eager[2].astype(np.float32)).max()) > 0
    for got, want in zip(bufs, eager):
        np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint8), cp.asnumpy(want).view(np.uint8))
