"""Shared fixtures: seeded RNG per test, GPU detection, an isolated kernel cache."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from w4kern.__main__ import gpu_available

HAS_GPU = gpu_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (none found); runs on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id (different data in every test, reproducible);
    set W4KERN_TEST_SEED to draw other data everywhere."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("W4KERN_TEST_SEED", "0"))
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    """One kernel cache for the whole session (compiles once), never the user's own."""
    path = tmp_path_factory.mktemp("w4kern-cache")
    old = os.environ.get("W4KERN_CACHE_DIR")
    os.environ["W4KERN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("W4KERN_CACHE_DIR", None)
    else:
        os.environ["W4KERN_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _isolated_cache(shared_cache_dir):
    yield


@pytest.fixture
def cp():
    import cupy

    return cupy
