"""Import existing INT4 checkpoints into Int4Weight (the plain layout).

Each importer documents the source layout it expects and checks the arrays
against it before converting (NumPy in, NumPy out; this is load-time work).
Both formats store the transposed weight W.T [K, N] (in_features x
out_features) with 4-bit codes packed eight to an int32; w4kern stores
W [N, K] with two codes per byte, so the importers unpack, transpose and
repack. Dequantized values are unchanged: ``reference.dequantize_weight`` of
the result equals the source format's own dequantization.

- GPTQ (AutoGPTQ / GPTQModel, no act-order):
  qweight int32 [K / 8, N]: nibble i (bits 4i..4i+3) of qweight[r, n] is the
  code of k = 8r + i; qzeros int32 [K / g, N / 8]: nibble i of qzeros[j, c]
  is the zero of column 8c + i; scales float16 [K / g, N]; optional g_idx
  int32 [K] (must be k // g: act-order checkpoints are refused). w = (q - z) * s
  with z = stored zero + ``zero_offset``: 1 for the original "gptq" format
  (which stores z - 1), 0 for "gptq_v2".
- AWQ (AutoAWQ "gemm" format):
  qweight int32 [K, N / 8]: nibble i of qweight[k, c] is the code of column
  8c + AWQ_ORDER[i] with AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7); qzeros int32
  [K / g, N / 8] in the same order; scales float16 [K / g, N]. w = (q - z) * s.

- GGUF (llama.cpp), one 2-D tensor's raw blocks, uint8 [N, K / 32 * block bytes]
  (row-major: each of the N rows is K / 32 consecutive blocks of 32 values):
  Q4_0 (18 B: fp16 d, 16 bytes whose low nibbles are values 0-15 and high
  nibbles values 16-31; w = (q - 8) * d) -> symmetric Int4Weight, group 32;
  Q8_0 (34 B: fp16 d, 32 int8; w = q * d) -> Int8Weight, group 32;
  Q4_1 (20 B: fp16 d, fp16 m, 16 bytes as Q4_0; w = q * d + m) -> Int4Weight
  with float32 scales d and zeros -m / d. Q4_0 and Q8_0 dequantize to exactly
  gguf's values; Q4_1's (q + m / d) * d differs from q * d + m by float32
  rounding (a few ulp of the block's largest value).

Zero points that are all 8 become a symmetric Int4Weight (no zeros array).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._arrays import check_dtype, check_ndim, check_shape
from .formats import GROUP_SIZES, Int4Weight, Int8Weight
from .pack import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = np.arange(8, dtype=np.uint32) * 4


def _numpy(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (checkpoints load on the host), got "
                        f"{type(a).__module__}.{type(a).__name__}")
    return a


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., m] -> uint8 [..., m, 8]: nibble i of each word at index i."""
    return ((packed.view(np.uint32)[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def _group_size(k: int, n_groups: int) -> int:
    if n_groups < 1 or k % n_groups:
        raise ValueError(f"scales have {n_groups} groups along K={k}, which does not divide K")
    gs = k // n_groups
    if n_groups == 1 and gs not in GROUP_SIZES:
        return -1
    if gs not in GROUP_SIZES:
        raise ValueError(f"group size {gs} (K={k} / {n_groups} groups) is not supported; supported: "
                         f"{[g for g in GROUP_SIZES if g > 0]} or one group per row")
    return gs


def _to_int4(q_kn: np.ndarray, z_gn: np.ndarray, scales_gn: np.ndarray, group_size: int) -> Int4Weight:
    """codes [K, N], zeros [G, N] (q units), scales [G, N] -> Int4Weight W [N, K]."""
    qweight = pack_int4(np.ascontiguousarray(q_kn.T))
    scales = np.ascontiguousarray(scales_gn.T)
    zeros = np.ascontiguousarray(z_gn.T)
    if (zeros == 8).all():
        return Int4Weight(qweight, scales, None, group_size)
    if zeros.min() < 0 or zeros.max() > 15:
        raise ValueError(f"zero points must lie in [0, 15] after the offset, got [{zeros.min()}, {zeros.max()}]")
    return Int4Weight(qweight, scales, zeros.astype(scales.dtype), group_size)


def _check_packed(qweight, qzeros, scales, *, k_per_row: int, n_per_col: int):
    """Validate the three int32-packed tensors both formats share: qweight
    [K / k_per_row, N / n_per_col] (8 codes per int32 along K for GPTQ, along N for
    AWQ), qzeros [K / g, N / 8], scales [K / g, N]. Returns them with K, N and g."""
    qweight, qzeros, scales = (_numpy(n, a) for n, a in (("qweight", qweight), ("qzeros", qzeros),
                                                         ("scales", scales)))
    check_dtype("qweight", qweight, [np.int32])
    check_dtype("qzeros", qzeros, [np.int32])
    check_dtype("scales", scales, [np.float16, np.float32])
    layout = f"[K / {k_per_row}, N / {n_per_col}]".replace(" / 1", "")
    check_ndim("qweight", qweight, 2, layout)
    k, n = qweight.shape[0] * k_per_row, qweight.shape[1] * n_per_col
    check_ndim("scales", scales, 2, "[K / group_size, N]")
    if scales.shape[1] != n:
        raise ValueError(f"scales must be [K / group_size, N={n}], got {tuple(scales.shape)}")
    group_size = _group_size(k, scales.shape[0])
    if n % 8:
        raise ValueError(f"N={n} must be a multiple of 8 (qzeros packs 8 columns per int32)")
    check_shape("qzeros", qzeros, (scales.shape[0], n // 8), "[K / group_size, N / 8]")
    return qweight, qzeros, scales, k, n, group_size


def from_gptq(qweight, qzeros, scales, g_idx=None, *, zero_offset: int = 1) -> Int4Weight:
    """GPTQ tensors (see the module docstring) -> Int4Weight [N, K].

    zero_offset : 1 for the original "gptq" checkpoint format (stored zero + 1),
        0 for "gptq_v2".
    """
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset must be 1 ('gptq') or 0 ('gptq_v2'), got {zero_offset!r}")
    qweight, qzeros, scales, k, n, group_size = _check_packed(qweight, qzeros, scales, k_per_row=8, n_per_col=1)
    if g_idx is not None:
        g_idx = _numpy("g_idx", g_idx)
        check_shape("g_idx", g_idx, (k,), "[K]")
        gs = k if group_size == -1 else group_size
        if not np.array_equal(g_idx, np.arange(k) // gs):
            raise ValueError("g_idx is not k // group_size: act-order (desc_act) checkpoints reorder K and "
                             "are not supported; re-export without act-order")
    q_kn = _nibbles(qweight).transpose(0, 2, 1).reshape(k, n)        # [K/8, 8, N] -> [K, N]
    z_gn = _nibbles(qzeros).reshape(scales.shape[0], n).astype(np.int16) + zero_offset
    return _to_int4(q_kn, z_gn, scales, group_size)


def from_awq(qweight, qzeros, scales) -> Int4Weight:
    """AWQ "gemm" tensors (see the module docstring) -> Int4Weight [N, K]."""
    qweight, qzeros, scales, k, n, group_size = _check_packed(qweight, qzeros, scales, k_per_row=1, n_per_col=8)
    inverse = np.argsort(AWQ_ORDER)                 # nibble holding column 8c + j
    q_kn = _nibbles(qweight)[..., inverse].reshape(k, n)
    z_gn = _nibbles(qzeros)[..., inverse].reshape(scales.shape[0], n).astype(np.int16)
    return _to_int4(q_kn, z_gn, scales, group_size)


#: bytes per 32-value block of each GGUF type this module reads
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def from_gguf(data, qtype: str):
    """Raw GGUF blocks of one 2-D tensor -> Int4Weight (Q4_0, Q4_1) or Int8Weight (Q8_0).

    data : uint8 [N, K / 32 * block bytes] or [N, K / 32, block bytes] (what
        ``gguf.GGUFReader`` returns as a tensor's ``data``); qtype : "Q4_0",
        "Q4_1" or "Q8_0" (or a ``gguf.GGMLQuantizationType`` of those names).
    """
    data = _numpy("data", data)
    qtype = getattr(qtype, "name", qtype)
    if qtype not in GGUF_BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_BLOCK_BYTES)}, got {qtype!r}")
    check_dtype("data", data, [np.uint8])
    size = GGUF_BLOCK_BYTES[qtype]
    if data.ndim == 3 and data.shape[2] == size:
        blocks = data
    elif data.ndim == 2 and data.shape[1] % size == 0:
        blocks = data.reshape(data.shape[0], data.shape[1] // size, size)
    else:
        raise ValueError(f"data must be [N, K / 32 * {size}] or [N, K / 32, {size}] bytes of {qtype} blocks, "
                         f"got shape {tuple(data.shape)}")
    n, n_blocks = blocks.shape[:2]
    if n_blocks == 0:
        raise ValueError("data holds no blocks (K = 0)")
    blocks = np.ascontiguousarray(blocks)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]                     # [N, K / 32]
    if qtype == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(n, n_blocks * 32)
        return Int8Weight(q, d, 32)
    nibbles = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]       # [N, B, 16]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, n_blocks * 32)   # values 0-15, 16-31
    qweight = pack_int4(q)
    if qtype == "Q4_0":
        return Int4Weight(qweight, d, None, 32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    d32 = d.astype(np.float32)
    if ((d32 == 0) & (m != 0)).any():
        raise ValueError("a Q4_1 block has d = 0 and m != 0 (every value m), which (q - z) * s cannot express")
    zeros = np.where(d32 == 0, np.float32(0), -m / np.where(d32 == 0, np.float32(1), d32)).astype(np.float32)
    return Int4Weight(qweight, d32, zeros, 32)


def load_gguf(path, names=None, *, progress: bool = True) -> dict:
    """Read a GGUF file with the ``gguf`` package: Q4_0 / Q4_1 / Q8_0 tensors become
    Int4Weight / Int8Weight (``from_gguf``), all other tensors NumPy arrays.

    names : optional iterable of tensor names to convert (default: all).
    progress : a tqdm progress bar over the tensors, when tqdm is installed.
    """
    try:
        import gguf
    except ImportError as e:
        raise RuntimeError("reading GGUF files needs the gguf package: pip install gguf") from e
    reader = gguf.GGUFReader(str(path))
    wanted = None if names is None else set(names)
    tensors = [t for t in reader.tensors if wanted is None or t.name in wanted]
    if wanted is not None:
        missing = wanted - {t.name for t in tensors}
        if missing:
            raise KeyError(f"{path}: no tensors named {sorted(missing)}")
    if progress:
        try:
            from tqdm import tqdm

            tensors = tqdm(tensors, desc=f"converting {Path(path).name}", unit="tensor")
        except ImportError:
            pass
    result = {}
    for t in tensors:
        qtype = t.tensor_type.name
        if qtype in GGUF_BLOCK_BYTES:
            result[t.name] = from_gguf(np.asarray(t.data), qtype)
        else:
            result[t.name] = np.array(t.data)
    return result
