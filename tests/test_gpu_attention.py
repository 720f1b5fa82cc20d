"""decode_attention on CuPy arrays: its CUDA kernels are not written yet, and it says so."""
from __future__ import annotations

import numpy as np
import pytest

import w4kern

pytestmark = pytest.mark.gpu


def test_not_written_yet_says_so(cp):
    q = cp.zeros((1, 8, 64), dtype=w4kern.bfloat16)
    k = cp.zeros((1, 2, 16, 64), dtype=w4kern.bfloat16)
    with pytest.raises(NotImplementedError, match="issue 6"):
        w4kern.decode_attention(q, k, k, cp.asarray(np.array([3], np.int32)))
