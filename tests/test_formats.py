"""The Python mirror of cuda_src/common/formats.cuh, checked by the host C++ compiler,
and the format dataclasses' validation."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import w4kern
from w4kern import formats
from w4kern._runtime import source_dir

PROBE = r"""
#include "common/formats.cuh"
#include <cstdio>
#include <cstddef>
using w4kern::Q8Block;
int main() {
  std::printf("{\"sizeof\": %zu, \"alignof\": %zu, "
              "\"qs_even\": [%zu, %zu], \"qs_odd\": [%zu, %zu], \"d\": [%zu, %zu], "
              "\"sum\": [%zu, %zu], \"reserved\": [%zu, %zu], "
              "\"kQ8BlockValues\": %d, \"kInt4SymmetricZero\": %d, \"kInt4KMultiple\": %d, "
              "\"kLowNibbles\": %u, \"bf16\": %zu, \"f16\": %zu, "
              "\"kTiledRows\": %d, \"kTiledStepK\": %d, \"kTiledChunkBytes\": %d}\n",
              sizeof(Q8Block), alignof(Q8Block),
              offsetof(Q8Block, qs_even), sizeof(Q8Block::qs_even),
              offsetof(Q8Block, qs_odd), sizeof(Q8Block::qs_odd),
              offsetof(Q8Block, d), sizeof(Q8Block::d),
              offsetof(Q8Block, sum), sizeof(Q8Block::sum),
              offsetof(Q8Block, reserved), sizeof(Q8Block::reserved),
              w4kern::kQ8BlockValues, w4kern::kInt4SymmetricZero, w4kern::kInt4KMultiple,
              w4kern::kLowNibbles, sizeof(w4kern::bf16_t), sizeof(w4kern::f16_t),
              w4kern::kTiledRows, w4kern::kTiledStepK, w4kern::kTiledChunkBytes);
  return 0;
}
"""


@pytest.fixture(scope="module")
def header_layout(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail("the format mirror test needs a host C++ compiler (g++) on PATH")
    tmp = tmp_path_factory.mktemp("mirror")
    (tmp / "probe.cpp").write_text(PROBE)
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", f"-I{source_dir()}", "probe.cpp", "-o", "probe"],
                   cwd=tmp, check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp / "probe")], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_q8_block_size_and_alignment(header_layout):
    assert header_layout["sizeof"] == formats.Q8_BLOCK_BYTES == formats.Q8_BLOCK_DTYPE.itemsize
    assert header_layout["alignof"] == formats.Q8_BLOCK_ALIGN


@pytest.mark.parametrize("field", ["qs_even", "qs_odd", "d", "sum", "reserved"])
def test_q8_block_field_offset_and_size(header_layout, field):
    dtype, offset = formats.Q8_BLOCK_DTYPE.fields[field][:2]
    assert header_layout[field] == [offset, dtype.itemsize]


def test_constants_mirror_header(header_layout):
    assert header_layout["kQ8BlockValues"] == formats.Q8_BLOCK_VALUES
    assert header_layout["kInt4SymmetricZero"] == formats.INT4_SYMMETRIC_ZERO
    assert header_layout["kInt4KMultiple"] == formats.INT4_K_MULTIPLE
    assert header_layout["kLowNibbles"] == 0x0F0F0F0F
    assert header_layout["bf16"] == 2 and header_layout["f16"] == 2
    assert header_layout["kTiledRows"] == formats.TILE_ROWS
    assert header_layout["kTiledStepK"] == formats.TILE_K
    assert header_layout["kTiledChunkBytes"] == formats.TILE_BYTES


def test_q8_blocks_view_through_structured_dtype(rng):
    x = rng.standard_normal((3, 96)).astype(np.float32)
    xq = w4kern.quantize_q8(x)
    view = xq.blocks.view(formats.Q8_BLOCK_DTYPE)[..., 0]      # [3, 3] structured
    np.testing.assert_array_equal(view["d"], xq.d)
    np.testing.assert_array_equal(view["sum"], xq.sum)
    np.testing.assert_array_equal(view["qs_even"], xq.qs.reshape(3, 3, 32)[..., 0::2])
    np.testing.assert_array_equal(view["qs_odd"], xq.qs.reshape(3, 3, 32)[..., 1::2])
    assert (view["reserved"] == 0).all()


def test_int4_weight_properties(rng):
    w = rng.standard_normal((2, 16, 256)).astype(np.float32)
    qw = w4kern.quantize_int4(w, group_size=64)
    assert qw.shape == (2, 16, 256) and qw.n == 16 and qw.k == 256
    assert qw.qweight.shape == (2, 16, 128) and qw.scales.shape == (2, 16, 4)
    assert not qw.symmetric and qw.effective_group_size == 64
    assert qw.nbytes == qw.qweight.nbytes + qw.scales.nbytes + qw.zeros.nbytes
    per_channel = w4kern.quantize_int4(w[0], group_size=-1, symmetric=True)
    assert per_channel.scales.shape == (16, 1) and per_channel.effective_group_size == 256
