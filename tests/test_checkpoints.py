"""GPTQ and AWQ import: each source format packed here from its own description,
then the imported Int4Weight must dequantize to exactly the source's values."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference
from w4kern.checkpoints import AWQ_ORDER, from_awq, from_gptq


def _words(nibbles):
    """uint [..., 8] codes -> int32 [...]: code i in bits 4i..4i+3."""
    w = np.zeros(nibbles.shape[:-1], np.uint32)
    for i in range(8):
        w |= nibbles[..., i].astype(np.uint32) << np.uint32(4 * i)
    return w.view(np.int32)


def _source(rng, k, n, group_size, symmetric=False):
    groups = 1 if group_size == -1 else k // group_size
    q = rng.integers(0, 16, size=(k, n)).astype(np.uint8)
    z = np.full((groups, n), 8) if symmetric else rng.integers(0, 16, size=(groups, n))
    s = (rng.random((groups, n)) * 0.1 + 0.01).astype(np.float16)
    gs = k if group_size == -1 else group_size
    g = np.arange(k) // gs
    w = (q.astype(np.float32) - z[g].astype(np.float32)) * s[g].astype(np.float32)   # [K, N]
    return q, z, s, w


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("v2", [False, True], ids=["gptq", "gptq_v2"])
def test_gptq_import_dequantizes_to_the_source_values(rng, group_size, v2):
    k, n = 256, 48
    q, z, s, w = _source(rng, k, n, group_size)
    if not v2:
        z = np.maximum(z, 1)                               # the v1 format stores z - 1 >= 0
    qweight = _words(q.reshape(k // 8, 8, n).transpose(0, 2, 1))                # [K/8, N]
    qzeros = _words((z - (0 if v2 else 1)).reshape(z.shape[0], n // 8, 8))      # [G, N/8]
    gs = k if group_size == -1 else group_size
    w = (q.astype(np.float32) - z[np.arange(k) // gs].astype(np.float32)) * s[np.arange(k) // gs].astype(np.float32)
    weight = from_gptq(qweight, qzeros, s, np.arange(k, dtype=np.int32) // gs, zero_offset=0 if v2 else 1)
    assert weight.shape == (n, k) and weight.scales.dtype == np.float16
    assert weight.effective_group_size == (k if group_size == -1 else group_size)
    np.testing.assert_array_equal(reference.dequantize_weight(weight), w.T)


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_import_dequantizes_to_the_source_values(rng, group_size):
    k, n = 128, 64
    q, z, s, w = _source(rng, k, n, group_size)
    order = list(AWQ_ORDER)
    qweight = _words(q.reshape(k, n // 8, 8)[..., order])        # nibble i <- column 8c + AWQ_ORDER[i]
    qzeros = _words(z.reshape(z.shape[0], n // 8, 8)[..., order])
    weight = from_awq(qweight, qzeros, s)
    assert weight.shape == (n, k) and weight.effective_group_size == (k if group_size == -1 else group_size)
    np.testing.assert_array_equal(reference.dequantize_weight(weight), w.T)


def test_symmetric_sources_become_symmetric_weights(rng):
    k, n = 128, 16
    q, z, s, w = _source(rng, k, n, 64, symmetric=True)
    weight = from_gptq(_words(q.reshape(k // 8, 8, n).transpose(0, 2, 1)), _words((z - 1).reshape(2, n // 8, 8)), s)
    assert weight.zeros is None
    np.testing.assert_array_equal(reference.dequantize_weight(weight), w.T)


def test_import_bad_input(rng):
    k, n = 128, 16
    q, z, s, _ = _source(rng, k, n, 64)
    qweight = _words(q.reshape(k // 8, 8, n).transpose(0, 2, 1))
    qzeros = _words(np.maximum(z - 1, 0).reshape(2, n // 8, 8))
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(qweight, qzeros, s, rng.permutation(k).astype(np.int32) // 64)
    with pytest.raises(ValueError, match="group size 16 .* not supported"):
        from_gptq(qweight, np.zeros((8, n // 8), np.int32), np.ones((8, n), np.float16))
    with pytest.raises(ValueError, match=r"qzeros must have shape \(2, 2\)"):
        from_gptq(qweight, qzeros[:, :1].copy(), s)
    with pytest.raises(TypeError, match="qweight must have dtype in \\(int32\\)"):
        from_gptq(qweight.view(np.uint32), qzeros, s)
    with pytest.raises(ValueError, match="zero_offset must be"):
        from_gptq(qweight, qzeros, s, zero_offset=2)
    with pytest.raises(ValueError, match="scales must be"):
        from_awq(qweight, qzeros, s[:, :8].copy())
    with pytest.raises(TypeError, match="must be a NumPy array"):
        from_awq([1, 2], qzeros, s)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_gguf_import_matches_gguf_bit_for_bit(rng, qtype):
    gguf = pytest.importorskip("gguf")
    from w4kern.checkpoints import from_gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    w = (rng.standard_normal((24, 160)) * rng.choice([0.01, 1.0, 50.0])).astype(np.float32)
    w[0, :32] = 0                                          # an all-zero block
    raw = gguf.quants.quantize(w, kind)                    # uint8 [24, 5 * block bytes]
    expected = gguf.quants.dequantize(raw, kind).astype(np.float32)
    weight = from_gguf(raw, kind)
    assert weight.shape == (24, 160) and weight.group_size == 32
    got = reference.dequantize_weight(weight)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_gguf_q4_1_import_is_within_rounding(rng):
    gguf = pytest.importorskip("gguf")
    from w4kern.checkpoints import from_gguf

    kind = gguf.GGMLQuantizationType.Q4_1
    w = (rng.standard_normal((16, 96)) + 3.0).astype(np.float32)
    raw = gguf.quants.quantize(w, kind)
    expected = gguf.quants.dequantize(raw, kind).astype(np.float32)
    got = reference.dequantize_weight(from_gguf(raw, "Q4_1"))
    scale = np.abs(expected).reshape(16, 3, 32).max(-1, keepdims=True)
    err = np.abs(got - expected).reshape(16, 3, 32) / scale
    assert err.max() < 4 * 2.0 ** -23
    assert not np.array_equal(got, np.zeros_like(got))


def test_gguf_bad_input():
    from w4kern.checkpoints import from_gguf

    with pytest.raises(ValueError, match="qtype must be one of"):
        from_gguf(np.zeros((2, 18), np.uint8), "Q5_K")
    with pytest.raises(ValueError, match=r"data must be \[N, K / 32 \* 18\]"):
        from_gguf(np.zeros((2, 19), np.uint8), "Q4_0")
    with pytest.raises(TypeError, match="data must have dtype in \\(uint8\\)"):
        from_gguf(np.zeros((2, 18), np.int8), "Q4_0")


def test_load_gguf_file(rng, tmp_path):
    gguf = pytest.importorskip("gguf")
    from w4kern.checkpoints import load_gguf

    w = rng.standard_normal((24, 160)).astype(np.float32)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, qtype in (("q4", "Q4_0"), ("q8", "Q8_0")):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        raw = gguf.quants.quantize(w, kind)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.add_tensor("norm", np.ones(160, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_gguf(path, progress=False)
    assert isinstance(loaded["q4"], w4kern.Int4Weight) and isinstance(loaded["q8"], w4kern.Int8Weight)
    np.testing.assert_array_equal(loaded["norm"], np.ones(160, np.float32))
    for name, qtype in (("q4", "Q4_0"), ("q8", "Q8_0")):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
        np.testing.assert_array_equal(reference.dequantize_weight(loaded[name]), expected)
    with pytest.raises(KeyError, match="no tensors named"):
        load_gguf(path, names=["nope"], progress=False)
