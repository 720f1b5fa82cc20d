"""Interop without a GPU: DLPack import of host tensors, and import w4kern stays free of torch/JAX."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import w4kern


class HostTensor:
    """A foreign host array that only speaks DLPack (as a torch CPU tensor would)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_asarray_shares_host_memory(rng):
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = w4kern.asarray(HostTensor(a))
    assert isinstance(b, np.ndarray) and b.shape == (3, 4)
    a[0, 0] = 123.0
    assert b[0, 0] == 123.0                 # the same memory, not a copy
    assert w4kern.asarray(a) is a


def test_asarray_rejects_what_is_not_an_array():
    with pytest.raises(TypeError, match="neither the NumPy/CuPy array types nor DLPack"):
        w4kern.asarray([1, 2, 3])


def test_fp8_helpers_check_their_input():
    with pytest.raises(TypeError, match="uint8 NumPy or CuPy array of e4m3fn bit patterns"):
        w4kern.interop._check_fp8_bits("q", np.zeros(3, np.float32))


def test_import_w4kern_does_not_import_torch_or_jax():
    code = "import sys, w4kern; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fp8_round_trip_through_torch_on_the_host():
    torch = pytest.importorskip("torch")
    bits = np.arange(256, dtype=np.uint8)
    t = w4kern.interop.fp8_to_torch(bits)
    assert t.dtype == torch.float8_e4m3fn
    assert float(t[0x38]) == 1.0            # 0x38 is 1.0 in e4m3fn
    back = w4kern.interop.fp8_from_torch(t)
    np.testing.assert_array_equal(back, bits)


def test_public_ops_take_dlpack_tensors(rng):
    """Every op's array arguments may be foreign DLPack tensors (here host ones): the
    results equal the NumPy call's, and out= tensors are written in place."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(w4kern.quantize_q8(HostTensor(x)).blocks, w4kern.quantize_q8(x).blocks)
    np.testing.assert_array_equal(w4kern.quantize_per_token_int8(HostTensor(x)).q, w4kern.quantize_per_token_int8(x).q)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    qw = w4kern.quantize_int4(HostTensor(w), group_size=32)
    np.testing.assert_array_equal(qw.qweight, w4kern.quantize_int4(w, group_size=32).qweight)
    rebuilt = w4kern.Int4Weight(HostTensor(qw.qweight), HostTensor(qw.scales), HostTensor(qw.zeros), 32)
    assert isinstance(rebuilt.qweight, np.ndarray)
    out = np.full((3, 16), np.nan, np.float32)
    got = w4kern.linear(HostTensor(x), rebuilt, out=HostTensor(out), bias=HostTensor(np.ones(16, np.float32)))
    np.testing.assert_array_equal(out, w4kern.linear(x, qw, bias=np.ones(16, np.float32)))   # written in place
    np.testing.assert_array_equal(got, out)
    weights, ids = w4kern.topk_route(HostTensor(rng.standard_normal((5, 8)).astype(np.float32)), 2)
    assert ids.shape == (5, 2)
    sorted_ids, _, _ = w4kern.moe_align_block_size(HostTensor(ids), 8, 4)
    assert sorted_ids.size == 5 * 2 + 8 * 3
