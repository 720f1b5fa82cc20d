"""The packed formats: plain arrays named by small frozen dataclasses.

These are contracts between host packing code and device kernels (DESIGN.md,
"Formats"). ``cuda_src/common/formats.cuh`` is the truth for struct layouts;
the constants and the structured dtype below mirror it, and
``tests/test_formats.py`` compiles that header with the host C++ compiler and
compares every size and offset.

Constructing a format object validates shapes, dtypes and divisibility (no
device reads), so a kernel never sees a malformed weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from ._arrays import _foreign, array_module, check_contiguous, check_dtype, check_ndim, check_shape


def _import_fields(obj, *fields):
    """Replace DLPack tensors (torch, JAX) in a format's fields by NumPy/CuPy views."""
    for field in fields:
        value = getattr(obj, field)
        if _foreign(value):
            from .interop import asarray

            object.__setattr__(obj, field, asarray(value))

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)

# --- mirrors of cuda_src/common/formats.cuh ---------------------------------
Q8_BLOCK_VALUES = 32        # kQ8BlockValues
Q8_BLOCK_BYTES = 48         # sizeof(Q8Block)
Q8_BLOCK_ALIGN = 16         # alignof(Q8Block)
INT4_SYMMETRIC_ZERO = 8     # kInt4SymmetricZero
INT4_K_MULTIPLE = 32        # kInt4KMultiple

#: NumPy view of one ``Q8Block`` (field names and offsets as in the C struct).
Q8_BLOCK_DTYPE = np.dtype(
    {
        "names": ["qs_even", "qs_odd", "d", "sum", "reserved"],
        "formats": [(np.int8, 16), (np.int8, 16), np.float32, np.float32, (np.uint32, 2)],
        "offsets": [0, 16, 32, 36, 40],
        "itemsize": Q8_BLOCK_BYTES,
    },
    align=True,
)

GROUP_SIZES = (32, 64, 128, -1)   # -1: one group per row (per-channel)
SCALE_DTYPES = (np.dtype(np.float16), bfloat16, np.dtype(np.float32))
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), bfloat16)
FP8_E4M3_MAX = 448.0


def check_group_size(group_size: int, k: int, name: str = "group_size") -> int:
    """Validate a group size against K; return the effective one (K for -1)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{name}={group_size} is not supported; supported: {GROUP_SIZES}")
    if k % INT4_K_MULTIPLE:
        raise ValueError(f"K={k} must be a multiple of {INT4_K_MULTIPLE}")
    if group_size != -1 and k % group_size:
        raise ValueError(f"K={k} must be a multiple of {name}={group_size}")
    return k if group_size == -1 else group_size


class _Int4Properties:
    """What Int4Weight and Int4TiledWeight derive alike from qweight, scales, zeros,
    group_size and k."""

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def effective_group_size(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes a kernel must read: the nibbles (an Int4TiledWeight's padding
        included), scales and zeros."""
        z = 0 if self.zeros is None else self.zeros.nbytes
        return int(self.qweight.nbytes + self.scales.nbytes + z)


def _check_scales_and_zeros(scales, zeros, expected: tuple, layout: str = "[..., N, K // group_size]") -> None:
    """An INT4 weight's scales (a scale dtype) and zeros (None, or the scales' dtype),
    both C-contiguous of shape ``expected`` (spelled ``layout`` in errors)."""
    check_dtype("scales", scales, SCALE_DTYPES)
    check_shape("scales", scales, expected, layout)
    check_contiguous("scales", scales)
    if zeros is not None:
        if zeros.dtype != scales.dtype:
            raise TypeError(f"zeros must have the scales' dtype {scales.dtype.name}, got {zeros.dtype.name}")
        check_shape("zeros", zeros, expected, layout)
        check_contiguous("zeros", zeros)


@dataclasses.dataclass(frozen=True, eq=False)
class Int4Weight(_Int4Properties):
    """INT4 weight W [..., N, K] in the plain layout (y = x @ W.T).

    Attributes
    ----------
    qweight : uint8 [..., N, K // 2]
        Byte j of a row holds k = 2j in its low nibble and k = 2j + 1 in its
        high nibble; values q in [0, 15].
    scales : float16 | bfloat16 | float32 [..., N, K // group_size]
        One scale per (row, group), row-major per output row.
    zeros : same dtype as scales, same shape, or None
        Zero point z in q units; None means symmetric (z = 8).
    group_size : int
        32, 64, 128, or -1 (one group per row).

    The dequantized value is ``w = (q - z) * s``. A leading axis stacks MoE
    experts: qweight [E, N, K // 2].
    """

    qweight: Any
    scales: Any
    zeros: Any
    group_size: int

    def __post_init__(self):
        _import_fields(self, "qweight", "scales", "zeros")
        array_module(qweight=self.qweight, scales=self.scales, zeros=self.zeros)
        check_dtype("qweight", self.qweight, [np.uint8])
        check_ndim("qweight", self.qweight, (2, 3), "[N, K // 2] or [E, N, K // 2]")
        check_contiguous("qweight", self.qweight)
        k = self.qweight.shape[-1] * 2
        gs = check_group_size(self.group_size, k)
        _check_scales_and_zeros(self.scales, self.zeros, self.qweight.shape[:-1] + (k // gs,))

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., N, K] of the dequantized weight."""
        return tuple(self.qweight.shape[:-1]) + (self.qweight.shape[-1] * 2,)

    @property
    def n(self) -> int:
        return self.qweight.shape[-2]

    @property
    def k(self) -> int:
        return self.qweight.shape[-1] * 2



#: Int4TiledWeight: rows per tile, k per step, bytes per (tile, step) chunk
#: (kTiledRows, kTiledStepK, kTiledChunkBytes)
TILE_ROWS = 16
TILE_K = 128
TILE_BYTES = TILE_ROWS * TILE_K // 2
#: group sizes an Int4TiledWeight takes (one group per 128-k step, or per channel)
TILED_GROUP_SIZES = (128, -1)


@dataclasses.dataclass(frozen=True, eq=False)
class Int4TiledWeight(_Int4Properties):
    """An INT4 weight W [N, K] repacked for linear's tensor-core decode kernels
    (``w4kern.prepare(weight, for_op="linear")``; DESIGN.md allows kernel layouts
    derived at load time, and the plain Int4Weight stays the interchange format).

    Attributes
    ----------
    qweight : uint8 [ceil(N / 16), ceil(K / 128), 1024]
        Chunk [T, s] holds rows 16 T .. 16 T + 15 and k 128 s .. 128 s + 127 of the
        plain qweight, in the order the kernel's threads load them: byte
        512 h + 16 l + j of the chunk is plain byte 64 s + 16 (l % 4) + j of row
        16 T + l // 4 + 8 h (h in {0, 1}, lane l in 0..31, j in 0..15); rows past N
        and bytes past K / 2 are zero. One warp load reads 512 contiguous bytes.
    scales, zeros : fp16/bf16/fp32 [K // group_size (1 per channel), ceil(N / 16) * 16]
        The plain layout's transposed, rows past N zero: a step's 16 rows of one
        tile are one contiguous run (one copy for the sm_90 kernel). zeros None for
        symmetric weights, as for Int4Weight.
    group_size : 128 or -1 (per channel): one group per 128-k step
    k : int, the logical K (the chunks pad it to a multiple of 128)
    n : int, the logical N (the tiles pad it to a multiple of 16)
    """

    qweight: Any
    scales: Any
    zeros: Any
    group_size: int
    k: int
    n: int

    def __post_init__(self):
        _import_fields(self, "qweight", "scales", "zeros")
        array_module(qweight=self.qweight, scales=self.scales, zeros=self.zeros)
        if self.group_size not in TILED_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size}: an Int4TiledWeight takes group sizes "
                             f"{TILED_GROUP_SIZES} (one group per 128-k step)")
        gs = check_group_size(self.group_size, self.k, "group_size")
        if not (isinstance(self.n, (int, np.integer)) and self.n >= 1):
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        tiles = -(-self.n // TILE_ROWS)
        check_ndim("scales", self.scales, (2,), "[K // group_size, ceil(N / 16) * 16]")
        _check_scales_and_zeros(self.scales, self.zeros, (self.k // gs, tiles * TILE_ROWS),
                                "[K // group_size, ceil(N / 16) * 16]")
        check_dtype("qweight", self.qweight, [np.uint8])
        check_shape("qweight", self.qweight, (tiles, -(-self.k // TILE_K), TILE_BYTES),
                    "[ceil(N / 16), ceil(K / 128), 1024]")
        check_contiguous("qweight", self.qweight)

    @property
    def shape(self) -> tuple[int, int]:
        """Logical shape [N, K] of the dequantized weight."""
        return (self.n, self.k)

    def to_plain(self) -> "Int4Weight":
        """The plain Int4Weight (new arrays)."""
        xp = array_module(qweight=self.qweight)
        n, k = self.shape
        t, steps, _ = self.qweight.shape
        # [T, s, h, g, t, j] -> [T, h, g, s, t, j]: row 16 T + 8 h + g, byte 64 s + 16 t + j
        plain = self.qweight.reshape(t, steps, 2, 8, 4, 16).transpose(0, 2, 3, 1, 4, 5)
        plain = plain.reshape(t * TILE_ROWS, steps * TILE_K // 2)[:n, :k // 2]
        zeros = None if self.zeros is None else xp.ascontiguousarray(self.zeros[:, :n].T)
        return Int4Weight(xp.ascontiguousarray(plain), xp.ascontiguousarray(self.scales[:, :n].T), zeros,
                          self.group_size)


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Weight:
    """INT8 weight W [..., N, K], symmetric, per-group or per-channel scales.

    qweight int8 [..., N, K]; scales float16/bfloat16/float32
    [..., N, K // group_size]; ``w = q * s``. group_size as for Int4Weight.
    """

    qweight: Any
    scales: Any
    group_size: int

    def __post_init__(self):
        _import_fields(self, "qweight", "scales")
        array_module(qweight=self.qweight, scales=self.scales)
        check_dtype("qweight", self.qweight, [np.int8])
        check_ndim("qweight", self.qweight, (2, 3), "[N, K] or [E, N, K]")
        check_contiguous("qweight", self.qweight)
        k = self.qweight.shape[-1]
        gs = check_group_size(self.group_size, k)
        check_dtype("scales", self.scales, SCALE_DTYPES)
        check_shape("scales", self.scales, self.qweight.shape[:-1] + (k // gs,),
                    "[..., N, K // group_size]")
        check_contiguous("scales", self.scales)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    @property
    def k(self) -> int:
        return self.qweight.shape[-1]

    @property
    def effective_group_size(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.scales.nbytes)


@dataclasses.dataclass(frozen=True, eq=False)
class Q8Activations:
    """Activations x [..., K] in 48-byte Q8 blocks of 32 values along K.

    blocks : uint8 [..., K // 32, 48], each block laid out as ``Q8Block``
    (see ``Q8_BLOCK_DTYPE``): qs_even[16], qs_odd[16], float d, float sum,
    two reserved words (zero).
    """

    blocks: Any

    def __post_init__(self):
        _import_fields(self, "blocks")
        array_module(blocks=self.blocks)
        check_dtype("blocks", self.blocks, [np.uint8])
        if self.blocks.ndim < 2 or self.blocks.shape[-1] != Q8_BLOCK_BYTES:
            raise ValueError(
                f"blocks must have shape [..., K // 32, {Q8_BLOCK_BYTES}], got {tuple(self.blocks.shape)}"
            )
        check_contiguous("blocks", self.blocks)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., K] of the activations."""
        return tuple(self.blocks.shape[:-2]) + (self.blocks.shape[-2] * Q8_BLOCK_VALUES,)

    @property
    def k(self) -> int:
        return self.blocks.shape[-2] * Q8_BLOCK_VALUES

    def _field(self, start: int, stop: int, dtype):
        raw = self.blocks[..., start:stop]
        xp = array_module(blocks=raw)
        return xp.ascontiguousarray(raw).view(dtype)

    @property
    def qs(self):
        """int8 [..., K]: the quantized values in natural k order."""
        even = self._field(0, 16, np.int8)
        odd = self._field(16, 32, np.int8)
        xp = array_module(blocks=even)
        q = xp.stack([even, odd], axis=-1)          # [..., nb, 16, 2]: (q[2i], q[2i+1])
        return q.reshape(self.shape)

    @property
    def d(self):
        """float32 [..., K // 32]: the block scales."""
        return self._field(32, 36, np.float32)[..., 0]

    @property
    def sum(self):
        """float32 [..., K // 32]: d * sum(q) per block."""
        return self._field(36, 40, np.float32)[..., 0]

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)


@dataclasses.dataclass(frozen=True, eq=False)
class PerTokenInt8:
    """Per-token INT8 activations: q int8 [M, K], scales float32 [M]; x ~= scale * q."""

    q: Any
    scales: Any

    def __post_init__(self):
        _import_fields(self, "q", "scales")
        array_module(q=self.q, scales=self.scales)
        check_dtype("q", self.q, [np.int8])
        check_ndim("q", self.q, 2, "[M, K]")
        check_dtype("scales", self.scales, [np.float32])
        check_shape("scales", self.scales, self.q.shape[:1], "[M]")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class PerTokenFp8:
    """Per-token FP8 activations: q uint8 [M, K] holding float8 e4m3fn bits
    (finite max 448), scales float32 [M]; x ~= scale * float(q)."""

    q: Any
    scales: Any
    fp8_format: str = "e4m3fn"

    def __post_init__(self):
        _import_fields(self, "q", "scales")
        array_module(q=self.q, scales=self.scales)
        if self.fp8_format != "e4m3fn":
            raise ValueError(f"fp8_format must be 'e4m3fn', got {self.fp8_format!r}")
        check_dtype("q", self.q, [np.uint8])
        check_ndim("q", self.q, 2, "[M, K]")
        check_dtype("scales", self.scales, [np.float32])
        check_shape("scales", self.scales, self.q.shape[:1], "[M]")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)
