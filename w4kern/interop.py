"""Hand-offs to and from PyTorch and JAX, without copies.

``asarray(obj)`` imports anything that speaks DLPack (torch and JAX arrays,
CuPy, NumPy) as a CuPy array (GPU memory) or a NumPy array (host memory),
sharing its memory. The results of w4kern ops are CuPy arrays, which
``torch.from_dlpack`` and ``jax.dlpack.from_dlpack`` take without copying.

FP8 has no CuPy dtype: w4kern holds e4m3fn values as uint8 bit patterns
(``PerTokenFp8.q``). ``fp8_to_torch`` / ``fp8_from_torch`` (and the JAX pair)
reinterpret those bytes as the framework's float8_e4m3fn: a view of the same
memory, never a numeric conversion.

w4kern ops run on CuPy's current stream. ``torch_stream()`` makes that torch's
current stream for a block, so a torch caller's work and w4kern's are ordered
without a device-wide synchronization (and both land in a ``torch.cuda.graph``
capture).

torch and JAX are imported inside these functions only: ``import w4kern``
never imports them.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ._arrays import cupy_module, is_cupy

_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED = 1, 2, 3, 13


def asarray(obj):
    """A NumPy or CuPy array sharing ``obj``'s memory.

    NumPy and CuPy arrays are returned as they are. Other objects must
    implement ``__dlpack__`` / ``__dlpack_device__``: CUDA memory becomes a
    CuPy array (needs CuPy), host memory a NumPy array. bfloat16 crosses as
    bfloat16 into CuPy; NumPy's DLPack import has no bfloat16, so a host
    bfloat16 tensor raises (convert it on the framework's side first).
    """
    if isinstance(obj, np.ndarray) or is_cupy(obj):
        return obj
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(f"cannot import {type(obj).__module__}.{type(obj).__name__}: it implements neither "
                        f"the NumPy/CuPy array types nor DLPack (__dlpack__ and __dlpack_device__)")
    device_type, _ = obj.__dlpack_device__()
    if device_type in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        cupy = cupy_module()
        if cupy is None:
            raise RuntimeError("a CUDA tensor needs CuPy to be imported: pip install 'w4kern[cuda12]'")
        return cupy.from_dlpack(obj)
    if device_type in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        return np.from_dlpack(obj)
    raise TypeError(f"DLPack device type {device_type} is neither host nor CUDA memory")


def _check_fp8_bits(name, q):
    if not (isinstance(q, np.ndarray) or is_cupy(q)) or q.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 NumPy or CuPy array of e4m3fn bit patterns, got "
                        f"{getattr(q, 'dtype', type(q).__name__)}")


def fp8_to_torch(q):
    """uint8 e4m3fn bits (NumPy or CuPy) -> a torch.float8_e4m3fn tensor on the same memory."""
    import torch

    _check_fp8_bits("q", q)
    return torch.from_dlpack(q).view(torch.float8_e4m3fn)


def fp8_from_torch(t):
    """A torch.float8_e4m3fn tensor -> uint8 bits (CuPy for CUDA tensors, NumPy on the host), same memory."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.float8_e4m3fn:
        raise TypeError(f"t must be a torch.float8_e4m3fn tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return asarray(t.view(torch.uint8))


def fp8_to_jax(q):
    """uint8 e4m3fn bits -> a JAX float8_e4m3fn array (a bitcast of the imported bytes)."""
    import jax
    import jax.numpy as jnp

    _check_fp8_bits("q", q)
    return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(q), jnp.float8_e4m3fn)


def fp8_from_jax(a):
    """A JAX float8_e4m3fn array -> uint8 bits (a bitcast, then a DLPack import)."""
    import jax
    import jax.numpy as jnp

    if getattr(a, "dtype", None) != jnp.float8_e4m3fn:
        raise TypeError(f"a must be a JAX float8_e4m3fn array, got {getattr(a, 'dtype', type(a).__name__)}")
    return asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


@contextlib.contextmanager
def torch_stream(stream=None):
    """Run the w4kern ops of a ``with`` block on a torch stream (default: torch's
    current stream on the current device)::

        with w4kern.interop.torch_stream():
            y = w4kern.linear(x_torch, weight)     # ordered with the torch work around it
    """
    import cupy
    import torch

    stream = torch.cuda.current_stream() if stream is None else stream
    with cupy.cuda.Device(stream.device.index):
        with _cupy_stream(cupy, stream.cuda_stream, stream.device.index):
            yield


class _StreamHandle:
    """A raw cudaStream_t in the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def _cupy_stream(cupy, ptr: int, device_index: int):
    """A CuPy stream over a foreign cudaStream_t: ``Stream.from_external`` where CuPy
    has it (CuPy 14 deprecates ExternalStream), ExternalStream before that."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device_index)
