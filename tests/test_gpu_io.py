"""w4kern.io.load(device="cuda") gives CuPy weights equal to the host ones."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import io as wio

pytestmark = pytest.mark.gpu


def test_load_to_the_gpu(cp, tmp_path, rng):
    w = w4kern.quantize_int4(rng.standard_normal((16, 128)).astype(np.float32), group_size=64, symmetric=False)
    path = tmp_path / "w.safetensors"
    wio.save(path, {"w": w, "b": rng.standard_normal(16).astype(w4kern.bfloat16)})
    loaded = wio.load(path, device="cuda")
    assert isinstance(loaded["w"].qweight, cp.ndarray) and isinstance(loaded["b"], cp.ndarray)
    for field in ("qweight", "scales", "zeros"):
        np.testing.assert_array_equal(cp.asnumpy(getattr(loaded["w"], field)), getattr(w, field))
    # and back: saving CuPy weights writes the same bytes
    wio.save(tmp_path / "again.safetensors", loaded)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
