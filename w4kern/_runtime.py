"""The one place that touches the CUDA compiler.

Flow (DESIGN.md, "From CUDA source to a call"):

1. ``build(family, arch)`` reads ``cuda_src/<family>.cu``, prepends a hash of
   every file under ``cuda_src/`` (so an edited header changes the code
   string), and compiles all of the family's template instances
   (``name_expressions`` from :mod:`w4kern._registry`) with NVRTC into one
   cubin. NVRTC runs through CuPy's low-level bindings, which need no GPU and
   no driver, so the same function serves ``compile-check`` on a CPU machine.
2. The cubin, its lowered (mangled) names and the ptxas resource report are
   stored in w4kern's own disk cache, keyed by a hash of every byte that
   reaches NVRTC: the code (with the source hash), the options, the NVRTC
   version and the name expressions. A second process loads them without
   compiling (logged at DEBUG as a cache hit).
3. ``get_kernel(family, args)`` loads the family's cubin once per device
   (in-process memo), applies the dynamic shared memory opt-in, and returns a
   ``cupy.RawKernel`` that launches on the current CuPy stream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

from . import __version__
from ._arrays import cupy_module
from ._registry import FAMILIES, KernelFamily

log = logging.getLogger("w4kern")
if not log.handlers:
    # A first call compiles for seconds: say so on stderr, once per family,
    # unless the user configured the "w4kern" logger themselves.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("w4kern: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(os.environ.get("W4KERN_LOG_LEVEL", "INFO").upper())
    log.propagate = False

#: Architectures that ``compile-check`` covers (Ampere, Ada, Hopper with wgmma).
CHECK_ARCHS = ("sm_80", "sm_89", "sm_90a")

_PACKAGE_DIR = Path(__file__).resolve().parent


class CompileError(RuntimeError):
    """NVRTC rejected a kernel family; the message carries NVRTC's log."""


def source_dir() -> Path:
    """Where the CUDA sources live.

    ``W4KERN_CUDA_SRC`` overrides (tests use it to edit a copy); otherwise the
    source tree's ``cuda_src/`` (a checkout or an editable install), else the
    copy installed inside the package.
    """
    env = os.environ.get("W4KERN_CUDA_SRC")
    if env:
        return Path(env).resolve()
    for candidate in (_PACKAGE_DIR.parent / "cuda_src", _PACKAGE_DIR / "cuda_src"):
        if (candidate / "common" / "formats.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"w4kern's CUDA sources were not found next to {_PACKAGE_DIR}; reinstall w4kern"
    )


def cache_dir() -> Path:
    """``W4KERN_CACHE_DIR``, else ``$XDG_CACHE_HOME/w4kern``, else ``~/.cache/w4kern``."""
    env = os.environ.get("W4KERN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "w4kern"


def source_hash(src: Path | None = None) -> str:
    """sha256 over every .cu/.cuh file under ``src`` (paths and bytes) and w4kern's version."""
    src = source_dir() if src is None else src
    h = hashlib.sha256(f"w4kern {__version__}\n".encode())
    for path in sorted(p for p in src.rglob("*") if p.suffix in (".cu", ".cuh")):
        h.update(path.relative_to(src).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:
        raise RuntimeError(
            "compiling kernels needs CuPy and NVRTC: pip install 'w4kern[cuda12]' "
            "(or [cuda13] on a CUDA 13 driver)"
        ) from e
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def compile_options(arch: str, src: Path) -> tuple[str, ...]:
    options = ["-std=c++17", f"--gpu-architecture={arch}", f"-I{src}", "--ptxas-options=-v"]
    if os.environ.get("W4KERN_LINEINFO") == "1":
        options.append("-lineinfo")
    return tuple(options)


@dataclasses.dataclass(frozen=True)
class Resources:
    """ptxas's report for one kernel instance."""

    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


@dataclasses.dataclass(frozen=True)
class CompiledFamily:
    family: str
    arch: str
    cubin_path: Path
    lowered_names: dict[str, str]      # name expression -> mangled name
    resources: dict[str, Resources]    # name expression -> ptxas report
    from_cache: bool


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, Resources]:
    """Mangled kernel name -> Resources, from ``--ptxas-options=-v`` output."""
    result: dict[str, Resources] = {}
    current = None
    fields: dict[str, int] = {}

    def flush():
        if current is not None:
            result[current] = Resources(
                registers=fields.get("regs", 0),
                shared_bytes=fields.get("smem", 0),
                stack_bytes=fields.get("stack", 0),
                spill_store_bytes=fields.get("spill_st", 0),
                spill_load_bytes=fields.get("spill_ld", 0),
            )

    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            flush()
            current, fields = m.group(1), {}
            continue
        m = _FRAME.search(line)
        if m:
            fields["stack"], fields["spill_st"], fields["spill_ld"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            fields["regs"] = int(m.group(1))
        m = _SMEM.search(line)
        if m:
            fields["smem"] = int(m.group(1))
    flush()
    return result


_build_lock = threading.Lock()
#: Per-process counters shown by ``python -m w4kern info`` and used by tests.
STATS = {"compiled": [], "cache_hits": []}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclasses.dataclass(frozen=True)
class _BuildPlan:
    """Everything that reaches NVRTC for one (family, arch), and where its result is cached."""

    family: KernelFamily
    arch: str
    code: str
    options: tuple[str, ...]
    cubin_path: Path

    @property
    def meta_path(self) -> Path:
        return self.cubin_path.with_suffix(".json")

    @property
    def cached(self) -> bool:
        return self.cubin_path.is_file() and self.meta_path.is_file()


def plan(family: KernelFamily | str, arch: str) -> _BuildPlan:
    """The code, options and cache location of ``family`` for ``arch`` (compiles nothing)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    src = source_dir()
    code = f"// w4kern-src-hash: {source_hash(src)}\n" + (src / family.source).read_text()
    options = compile_options(arch, src)
    key = hashlib.sha256(
        json.dumps([code, options, list(nvrtc_version()), family.name_expressions]).encode()
    ).hexdigest()[:24]
    return _BuildPlan(family, arch, code, options, cache_dir() / f"{family.name}-{arch}-{key}.cubin")


def build(family: KernelFamily | str, arch: str, *, use_cache: bool = True) -> CompiledFamily:
    """Compile every instance of ``family`` for ``arch`` (or load them from the disk cache)."""
    p = plan(family, arch)
    family, nvrtc = p.family, _nvrtc()
    with _build_lock:
        if use_cache and p.cached:
            meta = json.loads(p.meta_path.read_text())
            log.debug("cache hit: %s for %s (%s)", family.name, arch, p.cubin_path)
            STATS["cache_hits"].append((family.name, arch))
            return _compiled(family, arch, p.cubin_path, meta, from_cache=True)

        log.info("compiling %s for %s (first use; cached in %s)", family.name, arch, p.cubin_path.parent)
        names = family.name_expressions
        prog = nvrtc.createProgram(p.code, family.source, [], [])
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, list(p.options))
            except nvrtc.NVRTCError as e:
                raise CompileError(
                    f"NVRTC failed on {family.source} for {arch}:\n"
                    f"{nvrtc.getProgramLog(prog).rstrip(chr(0))}"
                ) from e
            ptxas_log = nvrtc.getProgramLog(prog).rstrip("\0")
            lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
            cubin = nvrtc.getCUBIN(prog)
        finally:
            nvrtc.destroyProgram(prog)
        meta = {"family": family.name, "arch": arch, "options": list(p.options),
                "lowered_names": lowered, "ptxas_log": ptxas_log}
        p.cubin_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(p.cubin_path, cubin)
        _write_atomic(p.meta_path, json.dumps(meta, indent=1).encode())
        STATS["compiled"].append((family.name, arch))
        return _compiled(family, arch, p.cubin_path, meta, from_cache=False)


def _compiled(family, arch, cubin_path, meta, *, from_cache) -> CompiledFamily:
    by_mangled = parse_ptxas_log(meta["ptxas_log"])
    lowered = meta["lowered_names"]
    return CompiledFamily(
        family=family.name,
        arch=arch,
        cubin_path=cubin_path,
        lowered_names=lowered,
        resources={name: by_mangled[m] for name, m in lowered.items() if m in by_mangled},
        from_cache=from_cache,
    )


def device_arch(device) -> str:
    """NVRTC target for a CuPy device: sm_90a on Hopper (wgmma), sm_XY elsewhere."""
    cc = device.compute_capability
    return "sm_90a" if cc == "90" else f"sm_{cc}"


#: (family, instance args, device id, W4KERN_CUDA_SRC) -> cupy.RawKernel. The hot
#: path of every op is one lookup here: no file access, no hashing, no compile.
_kernels: dict[tuple, object] = {}


_smem_optin: dict[int, int] = {}


def max_dynamic_smem(device_id: int) -> int:
    """Bytes of dynamic shared memory one CTA may opt in to on a device (less the
    static shared memory the kernels declare: 1 KiB is reserved for it)."""
    got = _smem_optin.get(device_id)
    if got is None:
        attrs = cupy_module().cuda.Device(device_id).attributes
        got = _smem_optin[device_id] = int(attrs["MaxSharedMemoryPerBlockOptin"]) - 1024
    return got


def get_kernel(family: str, args: tuple[str, ...]):
    """The ``cupy.RawKernel`` of one instance, compiled/loaded for the current device."""
    cupy = cupy_module()
    device_id = cupy.cuda.runtime.getDevice()
    key = (family, args, device_id, os.environ.get("W4KERN_CUDA_SRC"))
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    fam = FAMILIES[family]
    fam.name_expression(args)                 # ValueError for an unlisted instance
    compiled = build(fam, device_arch(cupy.cuda.Device(device_id)))
    module = cupy.RawModule(path=str(compiled.cubin_path))
    # the one opt-in place; capped at what the GPU offers a CTA (an instance that
    # needs more is not chosen on it: see attention's ring stages)
    smem = min(fam.max_dynamic_smem, max_dynamic_smem(device_id))
    for instance in fam.instances:
        k = module.get_function(compiled.lowered_names[fam.name_expression(instance)])
        if fam.max_dynamic_smem:
            k.max_dynamic_shared_size_bytes = smem
            # ask for a shared-memory carveout (the largest unless the family says
            # otherwise), or the driver may size L1/shared for one CTA per SM and
            # cap the kernel's occupancy
            k.preferred_shared_memory_carveout = fam.smem_carveout
        _kernels[(family, instance) + key[2:]] = k
    return _kernels[key]


# ---------------------------------------------------------------------------
# Programmatic dependent launch (PDL, Hopper and later). A kernel may be launched
# with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: its CTAs then start
# while the kernel before it in the stream still runs, as soon as every CTA of
# that one has executed `griddepcontrol.launch_dependents` (common/ptx.cuh,
# pdl_launch_dependents) or exited, and block in `griddepcontrol.wait` (pdl_wait)
# until it has finished and its writes are visible. Rules for callers:
#   - a kernel whose stream predecessor may be anything (an op's first kernel)
#     calls pdl_wait before any global memory access: it gains its launch and
#     start-up, overlapped with the end of the predecessor;
#   - a kernel whose predecessor is a kernel of the same op (a quantizer, then the
#     matvec that reads its output) may load before pdl_wait data that no kernel
#     of the chain writes (the weights), and calls pdl_wait before it reads what
#     the chain wrote and before its first global write.
# CuPy's launch takes no launch attributes, so such launches go through the
# driver's cuLaunchKernelEx (ctypes). W4KERN_PDL picks when: "graph" (default:
# while the stream is being captured into a CUDA graph, where the saved latency
# shows; eager calls keep CuPy's cheaper host path), "always" or "never".
PDL_MODES = ("graph", "always", "never")
#: Whether an op's first kernel is a programmatic launch of the first kind above:
#: decode_attention's split kernel, and the activation quantizer of linear and of
#: fused_moe's int8 decode path where the dp4a matvec after it is a programmatic
#: launch too. Such a first kernel waits for its predecessor, then lets its own
#: op's matvec start (the other order let that matvec overlap the previous op's
#: and ran up to 8% slower). In graph mode on an H200 it saved 2.6-9.5% at M=1
#: (linear), 7.6% (decode_attention B=1 L=2048) and 0.8-2.7% (fused_moe int8 decode);
#: before a plain-launched kernel (the M=8 paths) it cost 0.5-3%, so those keep a
#: plain launch (benchmarks/results/2026-11-22-h200-session12/pdl-ab-*). Scripts
#: set it to False for A/B runs.
FIRST_KERNEL_PDL = True
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_pdl_driver = None          # (cuLaunchKernelEx, config struct, attribute struct), or False
_pdl_devices: dict[int, bool] = {}


def _pdl_launcher():
    global _pdl_driver
    if _pdl_driver is None:
        import ctypes

        class LaunchAttribute(ctypes.Structure):   # CUlaunchAttribute: id, pad to 8, a 64-byte union
            _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                        ("value_pad", ctypes.c_char * 60)]

        class LaunchConfig(ctypes.Structure):     # CUlaunchConfig
            _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)),
                        ("n_attrs", ctypes.c_uint)]

        try:
            launch = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        except (OSError, AttributeError):   # no driver library, or a driver before CUDA 12
            _pdl_driver = False
        else:
            launch.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                               ctypes.c_void_p]
            launch.restype = ctypes.c_int
            _pdl_driver = (launch, LaunchConfig, LaunchAttribute)
    return _pdl_driver


def _use_pdl(cupy, stream) -> bool:
    mode = os.environ.get("W4KERN_PDL", "graph")
    if mode not in PDL_MODES:
        raise ValueError(f"W4KERN_PDL must be one of {PDL_MODES}, got {mode!r}")
    if mode == "never" or (mode == "graph" and not stream.is_capturing()):
        return False
    device_id = cupy.cuda.runtime.getDevice()
    ok = _pdl_devices.get(device_id)
    if ok is None:
        ok = _pdl_devices[device_id] = (int(cupy.cuda.Device(device_id).compute_capability) >= 90
                                        and bool(_pdl_launcher()))
    return ok


def _kernel_argument(ctypes, np, cupy, a):
    if isinstance(a, cupy.ndarray):
        return ctypes.c_void_p(a.data.ptr)
    for dtype, ctype in ((np.int32, ctypes.c_int32), (np.int64, ctypes.c_int64), (np.uint64, ctypes.c_uint64),
                         (np.float32, ctypes.c_float)):
        if isinstance(a, dtype):
            return ctype(a.item())
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a CuPy array, np.int32, np.int64, "
                    "np.uint64 or np.float32")


def pdl_enabled() -> bool:
    """Whether a launch that asks to be programmatic is one now (W4KERN_PDL, the
    current stream's capture state, the GPU). An op that launches several kernels
    asks once per call and passes the answer on (``launch(..., checked=True)``): a
    plain call is host-bound, and the question costs about 2 us each time."""
    cupy = cupy_module()
    return _use_pdl(cupy, cupy.cuda.get_current_stream())


def launch(kernel, grid, block, args, *, shared_mem=0, pdl=False, checked=False):
    """Launch ``kernel`` (a ``cupy.RawKernel`` from get_kernel) on the current stream,
    as a programmatic dependent launch when ``pdl`` and W4KERN_PDL allow it (see
    above); checked: ``pdl`` already includes pdl_enabled()'s answer."""
    if pdl and not checked:
        pdl = pdl_enabled()
    if not pdl:
        kernel(grid, block, args, shared_mem=shared_mem)
        return
    import ctypes

    import numpy as np

    cupy = cupy_module()
    stream = cupy.cuda.get_current_stream()
    launch_ex, LaunchConfig, LaunchAttribute = _pdl_launcher()
    values = [_kernel_argument(ctypes, np, cupy, a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    config = LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, stream.ptr,
                          ctypes.pointer(attr), 1)
    status = launch_ex(ctypes.byref(config), ctypes.c_void_p(kernel.kernel.ptr), params, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status} ({kernel.name})")


_plan_caches: list[dict] = []


def plan_cache() -> dict:
    """A new dict for an op's launch plans (which hold loaded kernels), emptied by
    clear_memo along with the kernels."""
    cache: dict = {}
    _plan_caches.append(cache)
    return cache


def clear_memo() -> None:
    """Forget loaded kernels and the launch plans that hold them (tests that edit
    sources call this)."""
    _kernels.clear()
    for cache in _plan_caches:
        cache.clear()


@dataclasses.dataclass(frozen=True)
class CheckRow:
    family: str
    instance: str
    arch: str
    resources: Resources | None       # None: compiled, but NVRTC printed no ptxas report
    error: str | None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        return self.resources is None or not (FAMILIES[self.family].spill_free and self.resources.spills)


def compile_check(archs=CHECK_ARCHS, families=None, *, use_cache=True) -> list[CheckRow]:
    """Compile every registered instance for every arch; one row per (instance, arch)."""
    rows: list[CheckRow] = []
    for fam in (FAMILIES.values() if families is None else [FAMILIES[f] for f in families]):
        for arch in archs:
            try:
                compiled = build(fam, arch, use_cache=use_cache)
            except CompileError as e:
                rows.extend(CheckRow(fam.name, n, arch, None, str(e)) for n in fam.name_expressions)
                continue
            # NVRTC 13.0 sometimes returns an empty log for a family that compiled
            # fine (seen for membench on sm_90a): the build stands, its resources are
            # unknown. A log that reports other instances but not this one is an error.
            log_empty = not compiled.resources
            for name in fam.name_expressions:
                res = compiled.resources.get(name)
                err = None if res is not None or log_empty else "no ptxas report for this instance"
                rows.append(CheckRow(fam.name, name, arch, res, err))
    return rows
