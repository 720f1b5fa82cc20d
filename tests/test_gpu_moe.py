"""w4kern.moe on CuPy arrays: routing runs on the GPU; the MoE kernels are not written yet."""
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


def test_moe_kernels_not_written_yet_say_so(cp, rng):
    ids = cp.asarray(rng.integers(0, 8, size=(4, 2)).astype(np.int32))
    with pytest.raises(NotImplementedError, match="issue 4"):
        w4kern.moe_align_block_size(ids, 8, 16)
