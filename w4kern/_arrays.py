"""Array-module selection and argument checks shared by every public op.

The array-module rule (DESIGN.md): CuPy arrays in -> CUDA kernels, CuPy out;
NumPy arrays in -> the NumPy path, NumPy out. Mixing the two is a TypeError.
Every check here raises before any launch and names the argument, the rule
and the value given.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np


@functools.cache
def cupy_module():
    """CuPy if it imports, else None. CuPy is optional: the NumPy path needs none."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def is_cupy(a: Any) -> bool:
    cp = cupy_module()
    return cp is not None and isinstance(a, cp.ndarray)


@functools.cache
def _native_types() -> tuple:
    """The array types every op takes as they are: numpy.ndarray, and cupy.ndarray if CuPy imports."""
    cp = cupy_module()
    return (np.ndarray,) if cp is None else (np.ndarray, cp.ndarray)


def _foreign(v) -> bool:
    """An object to import through DLPack: not a NumPy/CuPy array, but speaks DLPack."""
    return _foreign_type(type(v))


@functools.cache
def _foreign_type(t: type) -> bool:
    """Whether objects of type t import through DLPack (cached per type: plain
    launches are host-bound, and every op call asks this of each argument)."""
    return not issubclass(t, (type(None),) + _native_types()) and hasattr(t, "__dlpack__")


def accepts_dlpack(*names: str):
    """Decorator: the named array arguments may be any DLPack object (torch and JAX
    arrays); they are imported without a copy (``w4kern.asarray``) before the
    function runs, so results come back as CuPy (GPU) or NumPy (host) arrays and
    an ``out=`` tensor is written in place. Calls with NumPy/CuPy arrays only
    take a fast path (no signature binding)."""
    def wrap(fn):
        sig = inspect.signature(fn)
        missing = [n for n in names if n not in sig.parameters]
        if missing:
            raise TypeError(f"{fn.__name__} has no parameters {missing}")

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for v in (*args, *kwargs.values()):
                if _foreign_type(type(v)):
                    break
            else:
                return fn(*args, **kwargs)
            from .interop import asarray

            bound = sig.bind(*args, **kwargs)
            for name in names:
                if _foreign(bound.arguments.get(name)):
                    bound.arguments[name] = asarray(bound.arguments[name])
            return fn(*bound.args, **bound.kwargs)
        return inner
    return wrap


def array_module(**named: Any):
    """The module (numpy or cupy) of the named arrays; None entries are ignored.

    Raises TypeError if an argument is not an array, or NumPy and CuPy arrays
    are mixed, or CuPy arrays live on different devices.
    """
    # Fast path (plain launches are host-bound; profile_host.py measured this
    # function at a fifth of decode_attention's host time): one pass, no dicts;
    # anything unusual goes to the checks below for their messages.
    cp = cupy_module()
    cp_array = None if cp is None else cp.ndarray
    n_numpy = n_cupy = 0
    device = -1
    for a in named.values():
        if a is None:
            continue
        if cp_array is not None and isinstance(a, cp_array):
            d = a.data.device_id
            if n_cupy and d != device:
                return _array_module_checked(named)
            device = d
            n_cupy += 1
        elif isinstance(a, np.ndarray):
            n_numpy += 1
        else:
            return _array_module_checked(named)
    if n_numpy and n_cupy:
        return _array_module_checked(named)
    if n_cupy:
        if device != cp.cuda.runtime.getDevice():
            return _array_module_checked(named)
        return cp
    return np


def _array_module_checked(named: dict):
    """array_module with every check spelled out (its errors name the arguments)."""
    kinds: dict[str, str] = {}
    devices: dict[str, int] = {}
    for name, a in named.items():
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            kinds[name] = "numpy"
        elif is_cupy(a):
            kinds[name] = "cupy"
            devices[name] = a.data.device_id
        else:
            raise TypeError(
                f"{name} must be a numpy.ndarray or cupy.ndarray (or a DLPack tensor), got "
                f"{type(a).__module__}.{type(a).__qualname__}"
            )
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{n}={k}" for n, k in kinds.items())
        raise TypeError(f"arguments mix NumPy and CuPy arrays ({listing}); pass all on one side")
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on device {d}" for n, d in devices.items())
        raise ValueError(f"CuPy arguments live on different devices ({listing})")
    if devices:
        cp = cupy_module()
        current = cp.cuda.runtime.getDevice()
        device = next(iter(devices.values()))
        if device != current:
            raise ValueError(
                f"arguments live on device {device} but the current CuPy device is {current}; "
                f"run under `with cupy.cuda.Device({device}):`"
            )
    if "cupy" in kinds.values():
        return cupy_module()
    return np


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def check_dtype(name: str, a, allowed) -> None:
    if a.dtype in allowed:   # NumPy compares a dtype with dtypes and scalar types alike
        return
    allowed = tuple(np.dtype(t) for t in allowed)
    if a.dtype not in allowed:
        names = ", ".join(dtype_name(t) for t in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(a.dtype)}")


def check_ndim(name: str, a, ndims, layout: str) -> None:
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if a.ndim not in ndims:
        raise ValueError(f"{name} must be {layout} (ndim in {ndims}), got shape {tuple(a.shape)}")


def check_shape(name: str, a, expected: tuple, layout: str) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({layout}), got {tuple(a.shape)}")


def check_contiguous(name: str, a) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous, got strides {a.strides} for shape {tuple(a.shape)}; "
            f"pass {name}.copy() or ascontiguousarray({name})"
        )


def check_aligned(name: str, a, alignment: int = 16) -> None:
    """Device pointer alignment for vector loads (CuPy arrays only)."""
    if is_cupy(a) and a.size and a.data.ptr % alignment:
        raise ValueError(
            f"{name} must start at a {alignment}-byte aligned address for vectorized loads, "
            f"got address {a.data.ptr:#x}; pass a copy"
        )


def check_multiple(name: str, value: int, multiple: int, what: str) -> None:
    if value % multiple:
        raise ValueError(f"{name}={value} must be a multiple of {what}={multiple}")


def check_out(out, dtype, shape: tuple, layout: str) -> None:
    """An ``out=`` argument: the given dtype and shape, C-contiguous."""
    check_dtype("out", out, [dtype])
    check_shape("out", out, shape, layout)
    check_contiguous("out", out)


def deliver(result, out):
    """Return ``result``, or copy it into ``out`` and return ``out`` (the NumPy paths)."""
    if out is None:
        return result
    out[...] = result
    return out
