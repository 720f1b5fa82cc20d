"""The kernel runtime without a GPU: NVRTC compile check, disk cache, recompiles on edits."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from w4kern import _runtime
from w4kern._registry import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.mark.parametrize("arch", _runtime.CHECK_ARCHS)
def test_compile_check_every_instance(arch):
    rows = _runtime.compile_check(archs=(arch,))
    expected = sum(len(f.instances) for f in FAMILIES.values())
    assert len(rows) == expected
    bad = [(r.instance, r.error, r.resources) for r in rows if not r.ok]
    assert not bad
    for r in rows:
        if r.resources is None:   # tolerated only where NVRTC 13 printed no ptxas log at all
            assert _runtime.nvrtc_version() >= (13, 0), r
            continue
        assert 0 < r.resources.registers <= 255 and not r.resources.spills


def test_compile_check_cli_prints_resources():
    proc = subprocess.run([sys.executable, "-m", "w4kern", "compile-check"], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "regs" in proc.stdout and "spill st/ld" in proc.stdout
    total = 3 * sum(len(f.instances) for f in FAMILIES.values())
    assert f"{total} of {total} instance builds passed for sm_80, sm_89, sm_90a" in proc.stdout


def test_second_process_hits_the_disk_cache(tmp_path):
    code = ("from w4kern import _runtime; c = _runtime.build('quantize_q8', 'sm_89'); "
            "print('FROM_CACHE', c.from_cache, _runtime.STATS)")
    env = _env(W4KERN_CACHE_DIR=str(tmp_path), W4KERN_LOG_LEVEL="DEBUG")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "FROM_CACHE False" in first.stdout and "compiling quantize_q8 for sm_89" in first.stderr
    assert "FROM_CACHE True" in second.stdout and "cache hit: quantize_q8 for sm_89" in second.stderr
    assert "compiling" not in second.stderr


def test_editing_a_header_changes_the_key_and_recompiles(tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    shutil.copytree(_runtime.source_dir(), src)
    monkeypatch.setenv("W4KERN_CUDA_SRC", str(src))
    monkeypatch.setenv("W4KERN_CACHE_DIR", str(tmp_path / "cache"))
    first = _runtime.build("dequant_int4", "sm_80")
    again = _runtime.build("dequant_int4", "sm_80")
    assert not first.from_cache and again.from_cache and again.cubin_path == first.cubin_path
    header = src / "common" / "formats.cuh"
    header.write_text(header.read_text() + "\n// a comment changes the bytes NVRTC sees\n")
    edited = _runtime.build("dequant_int4", "sm_80")
    assert not edited.from_cache and edited.cubin_path != first.cubin_path


def test_source_hash_covers_headers(tmp_path):
    src = tmp_path / "cuda_src"
    shutil.copytree(_runtime.source_dir(), src)
    before = _runtime.source_hash(src)
    (src / "common" / "types.cuh").write_text((src / "common" / "types.cuh").read_text() + " ")
    assert _runtime.source_hash(src) != before


def test_compile_error_carries_nvrtc_log(tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    shutil.copytree(_runtime.source_dir(), src)
    (src / "quantize_q8.cu").write_text((src / "quantize_q8.cu").read_text() + "\nthis is not C++;\n")
    monkeypatch.setenv("W4KERN_CUDA_SRC", str(src))
    with pytest.raises(_runtime.CompileError, match=r"NVRTC failed on quantize_q8.cu for sm_80:\n.*error"):
        _runtime.build("quantize_q8", "sm_80")


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'
ptxas info    : Function properties for _Z1kv
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
"""
    res = _runtime.parse_ptxas_log(log)["_Z1kv"]
    assert (res.registers, res.shared_bytes, res.stack_bytes) == (40, 1024, 8)
    assert res.spills


def test_device_arch_names():
    class Dev:
        def __init__(self, cc):
            self.compute_capability = cc
    assert _runtime.device_arch(Dev("90")) == "sm_90a"
    assert _runtime.device_arch(Dev("89")) == "sm_89"
    assert _runtime.device_arch(Dev("80")) == "sm_80"


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("W4KERN_CACHE_DIR", str(tmp_path))
    assert _runtime.cache_dir() == tmp_path
    monkeypatch.delenv("W4KERN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _runtime.cache_dir() == tmp_path / "xdg" / "w4kern"


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_every_a16_choice_is_a_registered_instance(group_size):
    """linear's W4A16 instance for every M (a16_instance: group slots for g32 at M <= 2
    and g64 at M <= 4, one group per step otherwise) exists in its family, for every
    dtype and config the plan can combine it with."""
    import numpy as np

    from w4kern import bfloat16
    from w4kern._registry import A16_CONFIGS, a16_instance, cxx_bool, cxx_type

    expected_slots = {32: 4, 64: 2}.get(group_size, 1)
    for m in range(1, 9):
        name, chunk, per_channel, slots = a16_instance(group_size, m)
        family = FAMILIES[name]
        assert name == ("matvec_a16_gch" if group_size == -1 else f"matvec_a16_g{group_size}")
        assert per_channel == (group_size == -1)
        assert slots == (expected_slots if m <= 8 // expected_slots else 1)
        assert chunk == (16 if slots > 1 or group_size in (128, -1) else group_size // 8)
        for act in (bfloat16, np.float16):
            for scale in (np.float16, bfloat16, np.float32):
                for has_zeros in (False, True):
                    for tiles, split in A16_CONFIGS:
                        args = (cxx_type(act), cxx_type(scale), cxx_bool(has_zeros), str(chunk), cxx_bool(per_channel),
                                str(tiles), str(split), str(slots), "false", "false")
                        assert args in family.instances, args


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_every_a16_rows_choice_is_a_registered_instance(group_size):
    """The row-run walk (M = 1) has a family for g128 and per-channel weights, with
    every dtype and config the plan can combine; g32 and g64 have none (linear falls
    back to the group-slot walk)."""
    import numpy as np

    from w4kern import bfloat16
    from w4kern._registry import A16_ROW_CONFIGS, a16_rows_instance, cxx_bool, cxx_type
    from w4kern.linear import A16_ROW_CANDIDATES

    assert set(A16_ROW_CANDIDATES) <= set(A16_ROW_CONFIGS)
    found = a16_rows_instance(group_size)
    if group_size in (32, 64):
        assert found is None
        return
    name, chunk, per_channel = found
    family = FAMILIES[name]
    assert family.source == "matvec_a16.cu" and chunk == 16 and per_channel == (group_size == -1)
    for act in (bfloat16, np.float16):
        for scale in (np.float16, bfloat16, np.float32):
            for has_zeros in (False, True):
                for tiles, split in A16_ROW_CONFIGS:
                    args = (cxx_type(act), cxx_type(scale), cxx_bool(has_zeros), str(chunk), cxx_bool(per_channel),
                            str(tiles), str(split), "1", "true", "false")
                    assert args in family.instances, args


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_every_a8_choice_is_a_registered_instance(group_size):
    """linear's per-token INT8 instance (a8_instance: one group per step) exists in its
    family for every scale dtype, symmetry and config the plan can combine it with."""
    import numpy as np

    from w4kern import bfloat16
    from w4kern._registry import A16_CONFIGS, INT8_ACT, a8_instance, cxx_bool, cxx_type

    name, chunk, per_channel = a8_instance(group_size)
    family = FAMILIES[name]
    assert name == ("matvec_a8_gch" if group_size == -1 else f"matvec_a8_g{group_size}")
    assert family.source == "matvec_a16.cu" and per_channel == (group_size == -1)
    assert chunk == (16 if group_size in (128, -1) else group_size // 8)
    for scale in (np.float16, bfloat16, np.float32):
        for has_zeros in (False, True):
            for tiles, split in A16_CONFIGS:
                args = (INT8_ACT, cxx_type(scale), cxx_bool(has_zeros), str(chunk), cxx_bool(per_channel),
                        str(tiles), str(split), "1", "false", "false")
                assert args in family.instances, args


@pytest.mark.parametrize("int8", [False, True], ids=["a16", "a8"])
@pytest.mark.parametrize("group_size", [128, -1])
def test_every_tiled_choice_is_a_registered_instance(group_size, int8):
    """An Int4TiledWeight's instance (tiled_instance) exists in its own family for every
    activation, scale dtype, symmetry and config the plan can combine it with."""
    import numpy as np

    from w4kern import bfloat16
    from w4kern._registry import A16_CONFIGS, INT8_ACT, tiled_instance, cxx_bool, cxx_type

    name, chunk, per_channel = tiled_instance(group_size, int8)
    family = FAMILIES[name]
    label = "gch" if group_size == -1 else "g128"
    assert name == f"matvec_{'a8' if int8 else 'a16'}_tiled_{label}" and family.source == "matvec_a16.cu"
    assert chunk == 16 and per_channel == (group_size == -1)
    acts = (INT8_ACT,) if int8 else (cxx_type(bfloat16), cxx_type(np.float16))
    for act in acts:
        for scale in (np.float16, bfloat16, np.float32):
            for has_zeros in (False, True):
                for tiles, split in A16_CONFIGS:
                    args = (act, cxx_type(scale), cxx_bool(has_zeros), "16", cxx_bool(per_channel),
                            str(tiles), str(split), "1", "false", "true")
                    assert args in family.instances, args


class _FakeCupy:
    """Just enough of CuPy for the launch helpers' host logic (no GPU here)."""

    class ndarray:
        class data:
            ptr = 4096

    class _Stream:
        def __init__(self, capturing):
            self.capturing = capturing

        def is_capturing(self):
            return self.capturing


def test_programmatic_launch_arguments_are_typed_or_refused():
    import ctypes

    import numpy as np

    from w4kern._runtime import _kernel_argument

    assert _kernel_argument(ctypes, np, _FakeCupy, _FakeCupy.ndarray()).value == 4096
    assert _kernel_argument(ctypes, np, _FakeCupy, np.int32(-7)).value == -7
    assert _kernel_argument(ctypes, np, _FakeCupy, np.uint64(2 ** 40)).value == 2 ** 40
    assert _kernel_argument(ctypes, np, _FakeCupy, np.int64(-2 ** 40)).value == -2 ** 40
    assert _kernel_argument(ctypes, np, _FakeCupy, np.float32(0.5)).value == 0.5
    with pytest.raises(TypeError, match="kernel argument of type int"):
        _kernel_argument(ctypes, np, _FakeCupy, 3)   # a Python int has no C type of its own


@pytest.mark.parametrize("mode,capturing", [("never", True), ("graph", False)])
def test_programmatic_launch_modes_that_never_reach_the_driver(monkeypatch, mode, capturing):
    from w4kern._runtime import _use_pdl

    monkeypatch.setenv("W4KERN_PDL", mode)
    assert _use_pdl(_FakeCupy, _FakeCupy._Stream(capturing)) is False   # no device query needed


def test_programmatic_launch_mode_is_checked(monkeypatch):
    from w4kern._runtime import _use_pdl

    monkeypatch.setenv("W4KERN_PDL", "sometimes")
    with pytest.raises(ValueError, match="W4KERN_PDL must be one of"):
        _use_pdl(_FakeCupy, _FakeCupy._Stream(True))


def test_quantizer_launch_kinds_map_to_programmatic_launches(monkeypatch):
    from w4kern import _runtime
    from w4kern.quant import _first_kernel_pdl

    monkeypatch.setattr(_runtime, "FIRST_KERNEL_PDL", True)
    assert (_first_kernel_pdl(None), _first_kernel_pdl("first"), _first_kernel_pdl("chained")) == (False, True, True)
    monkeypatch.setattr(_runtime, "FIRST_KERNEL_PDL", False)   # only the first kernels follow the switch
    assert (_first_kernel_pdl(None), _first_kernel_pdl("first"), _first_kernel_pdl("chained")) == (False, False, True)
    with pytest.raises(ValueError, match="pdl must be None, 'first' or 'chained'"):
        _first_kernel_pdl("always")


def test_bulk_shared_memory_mirrors_the_kernel():
    """linear sizes matvec_bulk's dynamic shared memory from _registry's mirror of the
    kernel's constants; a mismatch would let the ring run past the allocation."""
    import re

    from w4kern import _registry

    with open(os.path.join(REPO, "cuda_src", "matvec_bulk.cu")) as f:
        src = f.read()

    def constant(name):
        return re.search(rf"constexpr int {name} = ([^;]+);", src).group(1)

    assert constant("kBulkThreads") == str(_registry.BULK_THREADS)
    assert constant("kBulkBarrierBytes") == str(_registry.BULK_BARRIER_BYTES)
    # kBulkStageBytes = kTiledChunkBytes + 2 * kBulkScaleRoom, kBulkScaleRoom = kTiledRows * 4
    assert constant("kBulkScaleRoom") == "kTiledRows * 4"
    assert constant("kBulkStageBytes") == "kTiledChunkBytes + 2 * kBulkScaleRoom"
    assert _registry.BULK_STAGE_BYTES == 1024 + 2 * 16 * 4
    split, stages = _registry.BULK_CONFIG
    # barriers, 8 warps' rings, the split partials (8 warps x 4 x 32 floats)
    assert _registry.bulk_smem_bytes(split, stages) == 512 + 1152 * stages * 8 + 4096
    assert 8 * stages * 8 <= _registry.BULK_BARRIER_BYTES
