"""Save and load packed weights as safetensors files.

``save(path, tensors)`` writes a dict of Int4Weight, Int8Weight and plain
arrays (NumPy or CuPy) to one safetensors file; ``load(path)`` reads it back
with every format field restored and validated. The file is standard
safetensors (any safetensors reader opens it): each packed weight ``name``
becomes the tensors ``name.qweight``, ``name.scales`` (and ``name.zeros``),
and the header's ``__metadata__`` records, under ``w4kern.<name>``, what they
form (kind, group size, layout, format version).

Loading checks everything it can before building a weight: the header's
length and JSON, each tensor's dtype, shape and byte range against the file
(a truncated file is an error, never a short tensor), and the recorded format
against the tensors (the format classes validate shapes). The safetensors
format is written here directly (an 8-byte little-endian header length, the
JSON header, the raw bytes), so w4kern needs no extra package for it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .formats import Int4Weight, Int8Weight, bfloat16

FORMAT_VERSION = 1
_META_PREFIX = "w4kern."

# safetensors dtype names <-> NumPy dtypes
_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "BF16": bfloat16, "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class FormatError(ValueError):
    """A file that is not a valid w4kern / safetensors file, or does not match its recorded format."""


def _host(a):
    """A C-contiguous NumPy copy of a NumPy or CuPy array."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        a = a.get()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a NumPy or CuPy array, got {type(a).__module__}.{type(a).__name__}")
    return np.ascontiguousarray(a)


def _flatten(tensors: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}

    def put(name, a):
        if name in arrays:
            raise ValueError(f"tensor name {name!r} is used twice")
        a = _host(a)
        if a.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {a.dtype.name} cannot be stored in safetensors")
        arrays[name] = a

    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(value, Int4Weight):
            put(f"{name}.qweight", value.qweight)
            put(f"{name}.scales", value.scales)
            if value.zeros is not None:
                put(f"{name}.zeros", value.zeros)
            metadata[_META_PREFIX + name] = json.dumps({
                "kind": "int4", "layout": "plain", "group_size": value.group_size,
                "symmetric": value.zeros is None, "version": FORMAT_VERSION})
        elif isinstance(value, Int8Weight):
            put(f"{name}.qweight", value.qweight)
            put(f"{name}.scales", value.scales)
            metadata[_META_PREFIX + name] = json.dumps({
                "kind": "int8", "group_size": value.group_size, "version": FORMAT_VERSION})
        else:
            put(name, value)
    return arrays, metadata


def save(path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> Int4Weight | Int8Weight | array) to a safetensors file.

    ``metadata``: extra string pairs for the header (keys must not start with
    "w4kern."). The file is written to a temporary name and renamed, so a
    crash never leaves a half-written file under ``path``.
    """
    arrays, meta = _flatten(tensors)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key.startswith(_META_PREFIX):
            raise ValueError(f"metadata key {key!r} uses the reserved prefix {_META_PREFIX!r}")
        meta[key] = value
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)          # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
    os.replace(tmp, path)


def _read_header(f, path, file_size):
    raw = f.read(8)
    if len(raw) < 8:
        raise FormatError(f"{path}: {file_size} bytes is too short for a safetensors file")
    (size,) = struct.unpack("<Q", raw)
    if size > file_size - 8:
        raise FormatError(f"{path}: the header claims {size} bytes but the file has {file_size - 8} after its "
                          f"length field (truncated or not safetensors)")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the header must be a JSON object")
    return header, 8 + size


def load(path, *, device: str = "cpu") -> dict:
    """Read a file written by :func:`save` (or any safetensors file).

    Returns name -> Int4Weight | Int8Weight | array: tensors that a
    ``w4kern.<name>`` metadata entry groups become that weight; all others
    stay arrays. ``device="cuda"`` returns CuPy arrays on the current device.
    Raises FormatError (a ValueError) naming the file and the tensor on a
    truncated or malformed file or a weight whose tensors do not match its
    recorded format.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, file_size)
        data_size = file_size - data_start
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{path}: __metadata__ must be an object")
        arrays: dict[str, np.ndarray] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if any(d < 0 for d in shape) or end - begin != expected or begin < 0:
                raise FormatError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) needs {expected} bytes, "
                                  f"its data_offsets give {end - begin}")
            if end > data_size:
                raise FormatError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds "
                                  f"{data_size} (truncated)")
            f.seek(data_start + begin)
            arrays[name] = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape).copy()

    result: dict = {}
    used: set[str] = set()
    for key, value in meta.items():
        if not key.startswith(_META_PREFIX):
            continue
        name = key[len(_META_PREFIX):]
        result[name] = _build_weight(path, name, value, arrays)
        used.update(n for n in (f"{name}.qweight", f"{name}.scales", f"{name}.zeros") if n in arrays)
    for name, a in arrays.items():
        if name not in used:
            result[name] = a
    if device == "cuda":
        import cupy

        result = {name: _to_device(cupy, v) for name, v in result.items()}
    return result


def metadata(path) -> dict[str, str]:
    """The header's ``__metadata__`` (the user's pairs and w4kern's format records)."""
    path = Path(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path, path.stat().st_size)
    return dict(header.get("__metadata__", {}) or {})


def _build_weight(path, name, record, arrays):
    try:
        fmt = json.loads(record)
        kind, group_size, version = fmt["kind"], int(fmt["group_size"]), int(fmt["version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: the format record of {name!r} is malformed: {record!r}") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: {name!r} uses format version {version}; this w4kern reads up to "
                          f"{FORMAT_VERSION} (upgrade w4kern)")

    def tensor(part):
        if f"{name}.{part}" not in arrays:
            raise FormatError(f"{path}: {name!r} is recorded as {kind} but the tensor {name}.{part} is missing")
        return arrays[f"{name}.{part}"]

    try:
        if kind == "int4":
            if fmt.get("layout", "plain") != "plain":
                raise FormatError(f"{path}: {name!r} has layout {fmt['layout']!r}; only 'plain' is stored")
            zeros = None if fmt.get("symmetric", False) else tensor("zeros")
            if fmt.get("symmetric", False) and f"{name}.zeros" in arrays:
                raise FormatError(f"{path}: {name!r} is recorded symmetric but has a zeros tensor")
            return Int4Weight(tensor("qweight"), tensor("scales"), zeros, group_size)
        if kind == "int8":
            return Int8Weight(tensor("qweight"), tensor("scales"), group_size)
    except (TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path}: {name!r} does not match its recorded {kind} format: {e}") from None
    raise FormatError(f"{path}: {name!r} has unknown kind {kind!r}")


def _to_device(cupy, value):
    if isinstance(value, Int4Weight):
        return Int4Weight(cupy.asarray(value.qweight), cupy.asarray(value.scales),
                          None if value.zeros is None else cupy.asarray(value.zeros), value.group_size)
    if isinstance(value, Int8Weight):
        return Int8Weight(cupy.asarray(value.qweight), cupy.asarray(value.scales), value.group_size)
    return cupy.asarray(value)
