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
