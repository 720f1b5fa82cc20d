"""w4kern.io: safetensors round trips and clear errors on damaged or mismatched files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import w4kern
from w4kern import io as wio


def _int4(rng, shape, group_size, symmetric, scale_dtype):
    return w4kern.quantize_int4(rng.standard_normal(shape).astype(np.float32), group_size=group_size,
                                symmetric=symmetric, scale_dtype=scale_dtype)


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
        return
    assert a.group_size == b.group_size
    for field in ("qweight", "scales", "zeros"):
        x, y = getattr(a, field, None), getattr(b, field, None)
        assert (x is None) == (y is None), field
        if x is not None:
            _same(x, y)


@pytest.mark.parametrize("scale_dtype", [np.float16, w4kern.bfloat16, np.float32], ids=lambda d: np.dtype(d).name)
def test_round_trip_every_kind(tmp_path, rng, scale_dtype):
    tensors = {
        "layers.0.qkv": _int4(rng, (48, 256), 128, False, scale_dtype),
        "layers.0.down": _int4(rng, (32, 96), 32, True, scale_dtype),
        "layers.0.per_channel": _int4(rng, (8, 64), -1, False, scale_dtype),
        "experts.w13": _int4(rng, (4, 16, 64), 64, False, scale_dtype),        # stacked MoE experts
        "lm_head": w4kern.quantize_int8(rng.standard_normal((16, 64)).astype(np.float32), group_size=32,
                                        scale_dtype=scale_dtype),
        "norm": rng.standard_normal(64).astype(w4kern.bfloat16),
        "positions": np.arange(7, dtype=np.int32),
    }
    path = tmp_path / "model.safetensors"
    wio.save(path, tensors, metadata={"model": "test"})
    loaded = wio.load(path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        _same(tensors[name], loaded[name])
    assert wio.metadata(path)["model"] == "test"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_file_is_plain_safetensors(tmp_path, rng):
    """The layout by hand: 8-byte length, JSON header, 8-byte aligned data in header order."""
    w = _int4(rng, (8, 64), 32, True, np.float16)
    path = tmp_path / "w.safetensors"
    wio.save(path, {"w": w})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8:8 + size])
    assert json.loads(header["__metadata__"]["w4kern.w"]) == {
        "kind": "int4", "layout": "plain", "group_size": 32, "symmetric": True, "version": 1}
    entry = header["w.qweight"]
    assert entry["dtype"] == "U8" and entry["shape"] == [8, 32]
    begin, end = entry["data_offsets"]
    np.testing.assert_array_equal(np.frombuffer(raw[8 + size + begin:8 + size + end], np.uint8).reshape(8, 32),
                                  w.qweight)
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return
    np.testing.assert_array_equal(load_file(str(path))["w.qweight"], w.qweight)


def test_truncated_file_is_an_error_not_a_short_tensor(tmp_path, rng):
    path = tmp_path / "w.safetensors"
    wio.save(path, {"w": _int4(rng, (16, 128), 128, False, np.float16)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(wio.FormatError, match="truncated"):
        wio.load(path)
    path.write_bytes(raw[:5])
    with pytest.raises(wio.FormatError, match="too short"):
        wio.load(path)
    path.write_bytes(struct.pack("<Q", 10 ** 9) + raw[8:])
    with pytest.raises(wio.FormatError, match="header claims"):
        wio.load(path)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size:])


def test_mismatched_records_are_named_errors(tmp_path, rng):
    path = tmp_path / "w.safetensors"
    wio.save(path, {"w": _int4(rng, (16, 128), 64, False, np.float16)})

    def group_128(h):
        h["__metadata__"]["w4kern.w"] = h["__metadata__"]["w4kern.w"].replace('"group_size": 64', '"group_size": 128')
    _rewrite_header(path, group_128)
    with pytest.raises(wio.FormatError, match="'w' does not match its recorded int4 format"):
        wio.load(path)

    wio.save(path, {"w": _int4(rng, (16, 128), 64, False, np.float16)})
    _rewrite_header(path, lambda h: h.pop("w.zeros"))
    with pytest.raises(wio.FormatError, match="tensor w.zeros is missing"):
        wio.load(path)

    wio.save(path, {"w": _int4(rng, (16, 128), 64, False, np.float16)})
    _rewrite_header(path, lambda h: h["__metadata__"].update({"w4kern.w": '{"kind": "int4", "group_size": 64, '
                                                                            '"symmetric": false, "version": 9}'}))
    with pytest.raises(wio.FormatError, match="format version 9"):
        wio.load(path)

    wio.save(path, {"w": _int4(rng, (16, 128), 64, False, np.float16)})
    _rewrite_header(path, lambda h: h["w.scales"].update({"shape": [16, 3]}))
    with pytest.raises(wio.FormatError, match="'w.scales' .* needs 96 bytes, its data_offsets give 64"):
        wio.load(path)

    wio.save(path, {"w": _int4(rng, (16, 128), 64, False, np.float16)})
    _rewrite_header(path, lambda h: h["__metadata__"].update({"w4kern.w": "not json"}))
    with pytest.raises(wio.FormatError, match="format record of 'w' is malformed"):
        wio.load(path)


def test_malformed_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    with pytest.raises(wio.FormatError, match="not valid JSON"):
        wio.load(path)


def test_save_rejects_bad_input(tmp_path, rng):
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="used twice"):
        wio.save(path, {"w": _int4(rng, (8, 64), 32, True, np.float16), "w.qweight": np.zeros(3, np.uint8)})
    with pytest.raises(ValueError, match="reserved prefix"):
        wio.save(path, {"x": np.zeros(3, np.float32)}, metadata={"w4kern.x": "1"})
    with pytest.raises(TypeError, match="cannot be stored"):
        wio.save(path, {"x": np.zeros(3, np.complex64)})
    with pytest.raises(TypeError, match="tensor names must be non-empty strings"):
        wio.save(path, {3: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="device must be"):
        wio.load(path, device="tpu")
