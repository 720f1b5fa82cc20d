"""Dense linear layers with quantized weights: ``w4kern.linear``.

``linear(x, weight)`` computes y = x @ W.T (+ bias) for an Int4Weight or
Int8Weight W [N, K] and activations x [..., K] (M = prod(x.shape[:-1])
tokens). On CuPy arrays it picks one of three paths by M:

- ``matvec``: dp4a over Q8 activation blocks (``cuda_src/matvec_q8.cu``),
  INT4 or INT8 weights; the decode step (M = 1).
- ``small_m``: the weight-stationary tensor-core kernel
  (``cuda_src/gemm_small_m.cu``), INT4 weights against Q8 blocks (int8 MMA) or
  bf16/fp16 activations (16-bit MMA), up to 8 tokens per launch; its time is
  flat in M (speculative-decoding verification).
- ``a16``: INT4 weights against bf16/fp16 activations (W4A16) on tensor cores
  fed straight from global memory (``cuda_src/matvec_a16.cu``), M <= 8, flat
  in M; g32 weights at M <= 2 and g64 at M <= 4 take 128-k steps holding
  several groups (``a16_instance``).
- ``a16_rows``: the same kernel for one token (M = 1) with a walk that reads
  each weight row in 512-byte runs (the tensor core's 8 columns hold 8 chunks of
  the token instead of 8 tokens), g128 and per-channel weights; W4A16's decode
  step on long rows (``A16_ROWS_MIN_K``).
- ``a8``: INT4 weights against per-token INT8 activations (``act="int8"``,
  W4A8 with one scale per token) on int8 tensor cores, the same kernel as
  ``a16`` with s8 MMAs (``cuda_src/matvec_a16.cu``), M <= 8, flat in M. At
  the smallest M, act="int8" takes ``matvec`` instead, on the same per-token
  INT8 laid out as Q8 blocks that share the row's scale
  (``quant.per_token_q8_blocks``): the same products, summed in another order.
- An :class:`Int4TiledWeight` (``w4kern.prepare(weight, for_op="linear")``)
  takes ``a16`` (act="bf16") or ``a8`` (act="int8") at every M up to 8, on its
  tiled layout (each warp load reads 512 contiguous bytes); more tokens unpack
  it to the plain layout each call (``dense``), and act="q8" is refused.
- ``bulk``: on sm_90, an Int4TiledWeight of a few hundred 16-row tiles (narrow
  layers: qkv, down; :data:`BULK_TILES`) takes the same tile walk with the
  weight chunks and scales streamed into shared memory by the copy engine
  (``cuda_src/matvec_bulk.cu``), 8 warps splitting each tile's K.
- ``dense``: M > 8, until w4kern has a prefill GEMM: the weight is
  dequantized and multiplied with cuBLAS through CuPy, in float32, using x
  itself (no activation quantization).

Which kernel serves a given M is a measured, per-GPU table
(:data:`DISPATCH`), not a guess; ``python -m w4kern bench --suite
linear_tuning`` prints the numbers it comes from.

Activations: ``act="q8"`` quantizes x into Q8 blocks once per call (inside
the op; callers pass bf16 and get bf16), ``act="int8"`` quantizes each token
to INT8 with one scale (``quantize_per_token_int8``: coarser than Q8's scale
per 32 values, and what lets the int8 tensor cores sum a whole weight group
exactly, so several tokens cost about what one does), ``act="bf16"`` feeds
bf16/fp16 x to the kernel unrounded (W4A16). Pre-quantized
:class:`Q8Activations` and :class:`PerTokenInt8` are accepted too, for callers
that reuse them across several weights.

On NumPy arrays the same call runs the NumPy reference on the same
quantized inputs (float64 math, then the output dtype).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np

from . import _runtime
from ._arrays import (
    accepts_dlpack,
    array_module,
    check_aligned,
    check_contiguous,
    check_dtype,
    check_shape,
    deliver,
)
from .quant import _quantize_per_token_cuda, _quantize_q8_cuda
from .formats import (
    FLOAT_DTYPES,
    Q8_BLOCK_BYTES,
    Q8_BLOCK_VALUES,
    TILE_K,
    TILE_ROWS,
    Int4TiledWeight,
    Int4Weight,
    Int8Weight,
    PerTokenInt8,
    Q8Activations,
    bfloat16,
)

ACTS = ("q8", "bf16", "int8")
#: most tokens the matvec and small-M kernels take in one launch
MAX_SMALL_M = 8

#: Kernel per token count, per GPU (``cupy.cuda.runtime.getDeviceProperties``
#: name). Keys: (weight kind, act) -> tuple of kernel names for M = 1..8.
#: "matvec" = dp4a, "small_m" = tensor cores. W8A8 and W4A16 have one kernel
#: each. Measured with ``python -m w4kern bench --suite linear_tuning``.
DISPATCH: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {
    # default until a GPU has its own row: dp4a at M = 1, tensor cores above
    "default": {
        ("int4", "q8"): ("matvec",) + ("small_m",) * 7,
        ("int4", "bf16"): ("a16",) * 8,
        ("int4", "int8"): ("a8",) * 8,
        # an Int4TiledWeight: the tensor-core kernels only (the dp4a matvec and the
        # small-M kernel read the plain layout)
        ("int4-tiled", "bf16"): ("a16",) * 8,
        ("int4-tiled", "int8"): ("a8",) * 8,
    },
    # linear_tuning on an H200 (benchmarks/results/2026-11-22-h200-linear/): dp4a is
    # faster up to M = 4 on the five dense shapes summed (M = 4: 157 vs 181 us), the
    # tensor-core kernel from M = 5 (M = 8: 2x faster)
    "NVIDIA H200": {
        ("int4", "q8"): ("matvec",) * 4 + ("small_m",) * 4,
        # per-token INT8: dp4a (on row-scaled Q8 blocks) up to M = 4, the s8 tensor-core
        # kernel from 5. Session 10 (benchmarks/results/2026-11-22-h200-session10/) had
        # them even at M = 4 (130 vs 130 us, the five dense shapes summed, pre-quantized
        # x). With the matvec's scales loaded a step ahead, the public act="int8" op at
        # M = 4, graph mode, quantizer included, summed to 144.4 us on a8 (bench-5d17962
        # in benchmarks/results/2026-11-23-h200-session16/) and 135.5 on dp4a
        # (bench-bf08df3): faster on qkv and both down shapes (gemma3-27b.down 39.9 ->
        # 31.9), 2-4% slower on the two gate_up shapes.
        ("int4", "int8"): ("matvec",) * 4 + ("a8",) * 4,
    },
}

#: CTAs the small-M kernel aims to launch per SM (split-K fills the rest)
SMALL_M_CTAS_PER_SM = {"default": 3}
#: matvec_q8 instances (kMaxM, kRows, kUnroll, kSplit) per token count and weight
#: kind, preferred first: a layer takes the first that still gives every SM
#: MATVEC_WARPS_PER_SM warps (N / kRows * kSplit warps in all). Many rows per warp
#: share each activation load; splitting K keeps a layer with few rows busy.
MATVEC_CANDIDATES = {
    ("int4", 1): ((1, 8, 1, 1), (1, 8, 1, 4), (1, 4, 2, 4)),
    ("int8", 1): ((4, 4, 1, 1), (4, 4, 1, 4)),   # INT8 rows take twice the registers
    ("int4", 4): ((4, 4, 1, 1), (4, 4, 1, 4)),
    ("int8", 4): ((4, 4, 1, 1), (4, 4, 1, 4)),
    ("int4", 8): ((8, 4, 1, 1),),
    ("int8", 8): ((8, 4, 1, 1),),
}
#: matvec_a16 instances (kTiles, kSplit), preferred first, chosen the same way
#: (N / (16 kTiles) * kSplit warps against A16_WARPS_PER_SM per SM)
A16_CANDIDATES = ((2, 2), (1, 4), (1, 8))
#: H200: 11 puts llama3-8b.qkv (N = 6144, 1536 warps at 16 rows x 4 split warps) on
#: (1, 4) rather than (1, 8): 10.21 vs 10.50 us at M = 1, 3-4% faster at every M up to
#: 8, and leaves the other four shapes' picks, the fastest there (linear_tuning,
#: benchmarks/results/2026-11-22-h200-session9/q8-mma-dfda4f4/tuning.log)
A16_WARPS_PER_SM = {"default": 12, "NVIDIA H200": 11}
#: H200: 12 puts llama3-8b.down (N = 4096) on 8 rows x 4 split warps (10.9 us) rather
#: than 4 rows x 4 (13.7 us), and keeps 8 rows x 1 warp on the gate_up shapes
MATVEC_WARPS_PER_SM = {"default": 12}
#: INT8 weights (W8A8) alone. H200: 10 takes the unsplit (4, 4, 1, 1) instance on
#: llama3-8b.qkv (9.14 vs 10.20 us at M = 1) and gemma3-27b.down (31.30 vs 32.14),
#: keeping split K on llama3-8b.down, the best of the two on all five shapes
#: (linear_tuning, benchmarks/results/2026-11-22-h200-session9/q8-mma-dfda4f4/tuning.log)
MATVEC_INT8_WARPS_PER_SM = {"default": 12, "NVIDIA H200": 10}
#: the MoE decode path skips a split-K candidate whose warps would find a K block
#: in less than this share of their step slots (see matvec_items_config)
MATVEC_MIN_K_USE = 0.75
#: row-group sets each CTA of an items launch walks (H200 sweep, 2026-11-22,
#: results/2026-11-22-h200-session4/sweep-moe-items.json: 4 was best or within noise
#: on all four expert GEMMs of Qwen3-30B-A3B and DeepSeek-V3 at 128 items, 70-97% of
#: read bandwidth, against 58-83% for the GPU's resident CTAs shared among items)
MATVEC_ITEM_SETS_PER_CTA = 4


def matvec_config(kind: str, m: int, n: int, sm_count: int, warps_per_sm: int) -> tuple[int, int, int, int]:
    """The matvec instance for M tokens and an N-row layer (see MATVEC_CANDIDATES)."""
    max_m = 1 if m == 1 else 4 if m <= 4 else 8
    candidates = MATVEC_CANDIDATES[(kind, max_m)]
    for config in candidates:
        if -(-n // config[1]) * config[3] >= warps_per_sm * sm_count:
            return config
    return candidates[-1]


#: matvec_a16 row-run instances (kTiles, kSplit), preferred first: a layer takes the
#: first that gives every SM A16_ROWS_WARPS_PER_SM warps (N / (2 kTiles) * kSplit)
A16_ROW_CANDIDATES = ((2, 1), (2, 2), (2, 4), (2, 8))
A16_ROWS_WARPS_PER_SM = {"default": 12}


#: W4A16 at M = 1 takes the row-run walk from this K on (g128 and per-channel
#: weights), per GPU; None: never (not measured there). H200 (compare_sources,
#: benchmarks/results/2026-11-23-h200-session13/chains/): faster on llama3-8b.down
#: (K = 14336: 15.8 vs 16.4 us) and gemma3-27b.down (K = 21504: 33.6 vs 37.5 us),
#: slower on the K <= 5376 shapes (llama3-8b.gate_up 32.0 vs 24.9 us)
A16_ROWS_MIN_K = {"default": None, "NVIDIA H200": 8192}


def uses_a16_rows(k: int, group_size: int) -> bool:
    """Whether linear's one-token W4A16 call takes the row-run walk on this GPU."""
    from ._registry import a16_rows_instance

    min_k = A16_ROWS_MIN_K.get(_gpu_name(), A16_ROWS_MIN_K["default"])
    return min_k is not None and k >= min_k and a16_rows_instance(group_size) is not None


#: An Int4TiledWeight whose count of 16-row tiles lies in this range, per activation
#: kind, takes matvec_bulk (the tile walk fed by the copy engine, kSplit = 8) on sm_90
#: GPUs, per GPU (None: never). H200, graph mode, one process against matvec_a16's
#: tiled walk (scripts/bulk_ab.py, benchmarks/results/2026-11-23-h200-session18/bulk-ab/):
#: - act="int8": 6-22% faster on the narrow shapes (llama3-8b.qkv and .down,
#:   gemma3-27b.down: 256-384 tiles), 3-12% slower on the wide gate_up shapes (1792 and
#:   2688 tiles), whose two tiles per warp in matvec_a16 share the activation loads;
#: - act="bf16": 3-15% faster on llama3-8b.qkv (384 tiles) and gemma3-27b.down (336),
#:   but 4-10% slower on llama3-8b.down (256 tiles, under 2 CTAs an SM of warps whose
#:   16-bit math needs more of them) and 27-43% slower on gate_up.
BULK_TILES = {"default": {"int8": (1, 512), "bf16": (320, 512)}}


def uses_bulk(n: int, act: str) -> bool:
    """Whether linear takes matvec_bulk for an N-row Int4TiledWeight and act on this GPU."""
    import cupy

    span = BULK_TILES.get(_gpu_name(), BULK_TILES["default"]).get(act)
    return span is not None and span[0] <= -(-n // 16) <= span[1] and _has_bulk_copies(cupy.cuda.Device().id)


@functools.cache
def _has_bulk_copies(device_id: int) -> bool:
    """sm_90 or newer (cp.async.bulk); cached: the op's host path is timed per call."""
    import cupy

    return int(cupy.cuda.Device(device_id).compute_capability) >= 90


def a16_rows_config(n: int, sm_count: int, warps_per_sm: int) -> tuple[int, int]:
    """The row-run matvec_a16 instance for an N-row layer (see A16_ROW_CANDIDATES)."""
    for tiles, split in A16_ROW_CANDIDATES:
        if -(-n // (2 * tiles)) * split >= warps_per_sm * sm_count:
            return tiles, split
    return A16_ROW_CANDIDATES[-1]


def a16_config(n: int, sm_count: int, warps_per_sm: int) -> tuple[int, int]:
    """The matvec_a16 instance for an N-row layer (see A16_CANDIDATES)."""
    for tiles, split in A16_CANDIDATES:
        if -(-n // (16 * tiles)) * split >= warps_per_sm * sm_count:
            return tiles, split
    return A16_CANDIDATES[-1]


def _gpu_name() -> str:
    import cupy

    return _device_facts(cupy.cuda.Device().id)[0]


@functools.cache
def _device_facts(device_id: int) -> tuple[str, int]:
    """(name, SM count) of a device; cached because getDeviceProperties takes about a
    millisecond, far longer than a decode kernel."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else str(name)), int(props["multiProcessorCount"])


#: the activations an Int4TiledWeight takes: those with a tensor-core row in DISPATCH
TILED_ACTS = tuple(act for kind, act in DISPATCH["default"] if kind == "int4-tiled")


def _table(table: dict, key):
    own = table.get(_gpu_name(), {})
    if isinstance(own, dict) and key in own:
        return own[key]
    default = table["default"]
    return default[key] if isinstance(default, dict) else default


def choose_kernel(weight_kind: str, act: str, m: int) -> str:
    """'matvec', 'small_m', 'a16', 'a8' or 'dense' for M tokens on the current GPU
    (weight_kind "int4", "int4-tiled" or "int8")."""
    if m > MAX_SMALL_M:
        return "dense"
    if weight_kind == "int8":
        return "matvec"
    return _table(DISPATCH, (weight_kind, act))[m - 1]


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Call:
    xp: object
    kind: str             # "int4" or "int8"
    act: str
    m: int
    n: int
    k: int
    lead: tuple           # x.shape[:-1]
    out_dtype: np.dtype
    tiled: bool = False   # an Int4TiledWeight


def _check(x, weight, act, bias, out, out_dtype) -> _Call:
    tiled = isinstance(weight, Int4TiledWeight)
    if isinstance(weight, Int4Weight) or tiled:
        kind = "int4"
    elif isinstance(weight, Int8Weight):
        kind = "int8"
    else:
        raise TypeError(f"weight must be an Int4Weight, Int4TiledWeight or Int8Weight, got {type(weight).__name__}")
    if tiled and act not in TILED_ACTS:
        raise ValueError(f"weight is an Int4TiledWeight (w4kern.prepare), which the tensor-core kernels take: use act "
                         f"in {TILED_ACTS}, or pass the plain Int4Weight for act={act!r}")
    if not tiled and weight.qweight.ndim != 2:
        raise ValueError(
            f"weight must be 2-D [N, K] for linear, got qweight shape {tuple(weight.qweight.shape)} "
            f"(stacked expert weights go to w4kern.fused_moe)"
        )
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    n, k = weight.shape[-2], weight.shape[-1]

    if isinstance(x, Q8Activations):
        if act != "q8":
            raise ValueError(f"x is Q8Activations, which needs act='q8', got act={act!r}")
        xp = array_module(x=x.blocks, qweight=weight.qweight, bias=bias, out=out)
        lead = tuple(x.blocks.shape[:-2])
        xk = x.k
        default_out = bfloat16
    elif isinstance(x, PerTokenInt8):
        if act != "int8":
            raise ValueError(f"x is PerTokenInt8, which needs act='int8', got act={act!r}")
        xp = array_module(x=x.q, qweight=weight.qweight, bias=bias, out=out)
        check_contiguous("x.q", x.q)
        lead = tuple(x.q.shape[:-1])
        xk = x.q.shape[-1]
        default_out = bfloat16
    else:
        xp = array_module(x=x, qweight=weight.qweight, bias=bias, out=out)
        if not hasattr(x, "dtype") or x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"x must be a float32, float16 or bfloat16 array, a Q8Activations or a PerTokenInt8, got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.ndim < 1:
            raise ValueError("x must be [..., K], got a 0-d array")
        if act == "bf16" and x.dtype not in (np.dtype(np.float16), bfloat16):
            raise TypeError(
                f"act='bf16' feeds x to the kernel unrounded, so x must be bfloat16 or float16, got "
                f"{x.dtype.name}; cast x, or use act='q8'"
            )
        check_contiguous("x", x)
        lead = tuple(x.shape[:-1])
        xk = x.shape[-1]
        default_out = x.dtype
    if kind == "int8" and act != "q8":
        raise ValueError(f"Int8Weight runs against Q8 activations only (W8A8): use act='q8', got act={act!r}")
    if xk != k:
        raise ValueError(f"x's K={xk} does not match weight's K={k} (weight shape [N, K] = {tuple(weight.shape)})")
    m = math.prod(lead)
    if m == 0:
        raise ValueError(f"x has no tokens (M = 0, x's leading shape {lead})")

    if out is not None:
        if out_dtype is not None and np.dtype(out_dtype) != out.dtype:
            raise TypeError(f"out has dtype {out.dtype.name} but out_dtype={np.dtype(out_dtype).name}")
        check_dtype("out", out, FLOAT_DTYPES)
        check_shape("out", out, lead + (n,), "[..., N]")
        check_contiguous("out", out)
        dtype = out.dtype
    else:
        dtype = default_out if out_dtype is None else np.dtype(out_dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype.name}")
    if bias is not None:
        check_shape("bias", bias, (n,), "[N]")
        if bias.dtype != dtype:
            raise TypeError(f"bias must have the output dtype {dtype.name}, got {bias.dtype.name}")
        check_contiguous("bias", bias)
    return _Call(xp, kind, act, m, n, k, lead, np.dtype(dtype), tiled)


# ---------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------

@accepts_dlpack("x", "bias", "out")
def linear(x, weight, *, act: str = "q8", bias=None, out=None, out_dtype=None):
    """y [..., N] = x [..., K] @ W.T (+ bias) for an Int4Weight or Int8Weight W [N, K].

    Parameters
    ----------
    x : bfloat16 | float16 | float32 [..., K], Q8Activations (act="q8") or
        PerTokenInt8 [M, K] (act="int8")
    weight : Int4Weight or Int8Weight, 2-D, or an Int4TiledWeight from
        ``w4kern.prepare(weight, for_op="linear")`` (act="bf16" or "int8"; faster
        tensor-core kernels up to 8 tokens)
    act : "q8" (default) quantizes x to Q8 blocks once (W4A8 / W8A8);
        "int8" quantizes each token to INT8 with one scale (W4A8 on int8
        tensor cores, INT4 weights only; flat in M up to 8 tokens);
        "bf16" uses bfloat16/float16 x directly (W4A16, INT4 weights only).
    bias : optional [N] array of the output dtype
    out : optional [..., N] array to write (any float dtype); with it, after a
        first call of the same size on the stream, the op allocates nothing
        and is CUDA-graph capturable.
    out_dtype : output dtype when ``out`` is not given; default x's dtype
        (bfloat16 for Q8Activations).

    Returns y (``out`` when given). CuPy in -> CUDA kernels on the current
    stream; NumPy in -> the NumPy reference on the same quantized inputs.

    ValueError / TypeError name the argument for mismatched shapes or dtypes,
    M = 0, or a wrong ``out``; the tensor-core matvec (act="bf16" or "int8", up to
    8 tokens on the GPU) also refuses a weight of 4 GiB of qweight or more
    (N * K >= 2^33).
    """
    return _linear(x, weight, act=act, bias=bias, out=out, out_dtype=out_dtype)


def _linear(x, weight, *, act="q8", bias=None, out=None, out_dtype=None, kernel=None, ctas_per_sm=None,
            matvec_config=None, matvec_ctas=None):
    """linear() with the kernel choice exposed (tests and the tuning benchmark force
    'matvec' / 'small_m' / 'a16' / 'a8' / 'bulk' / 'dense', the small-M kernel's CTAs
    per SM, the matvec or a16 / a8 instance and its grid size; 'bulk' is matvec_bulk on
    an Int4TiledWeight, sm_90 only)."""
    call = _check(x, weight, act, bias, out, out_dtype)
    if call.xp is np:
        return _linear_numpy(call, x, weight, bias, out)
    if kernel is not None:
        if kernel not in ("matvec", "small_m", "a16", "a16_rows", "a8", "bulk", "dense"):
            raise ValueError(f"kernel must be 'matvec', 'small_m', 'a16', 'a16_rows', 'a8', 'bulk' or 'dense', "
                             f"got {kernel!r}")
        if kernel != "dense" and call.m > MAX_SMALL_M:
            raise ValueError(f"kernel={kernel!r} takes at most {MAX_SMALL_M} tokens, got M={call.m}")
        if kernel == "small_m" and call.kind == "int8":
            raise ValueError("the small-M tensor-core kernel takes INT4 weights only")
        if kernel == "small_m" and call.act == "int8":
            raise ValueError("the small-M tensor-core kernel takes Q8 or bf16/fp16 activations, not act='int8'")
        if kernel == "matvec" and (call.act == "bf16" or isinstance(x, PerTokenInt8)):
            raise ValueError("the dp4a matvec takes Q8 blocks (act='q8', or act='int8' quantizing x itself)")
        if kernel in ("a16", "a16_rows") and (call.act != "bf16" or call.kind != "int4"):
            raise ValueError(f"the {kernel} kernel takes INT4 weights and bf16/fp16 activations only (act='bf16')")
        from ._registry import a16_rows_instance

        if kernel == "a16_rows" and (call.m != 1 or a16_rows_instance(weight.group_size) is None):
            raise ValueError(f"the a16_rows kernel takes one token and g128 or per-channel weights, got "
                             f"M={call.m}, group_size={weight.group_size}")
        if kernel == "a8" and call.act != "int8":
            raise ValueError("the a8 kernel takes per-token INT8 activations only (act='int8')")
        if call.tiled and kernel not in ("a16", "a8", "bulk", "dense"):
            raise ValueError(f"an Int4TiledWeight runs on the 'a16', 'a8', 'bulk' or 'dense' kernel, "
                             f"got kernel={kernel!r}")
        if kernel == "bulk" and not call.tiled:
            raise ValueError("the bulk kernel takes an Int4TiledWeight (w4kern.prepare)")
        if kernel == "bulk" and not _has_bulk_copies(call.xp.cuda.Device().id):
            raise ValueError("the bulk kernel needs an sm_90 GPU (cp.async.bulk)")
    return _linear_cuda(call, x, weight, bias, out, kernel=kernel, ctas_per_sm=ctas_per_sm,
                        matvec_config=matvec_config, matvec_ctas=matvec_ctas)


def _linear_numpy(call, x, weight, bias, out):
    """The reference on exactly what the GPU path feeds its kernels: Q8 blocks of x
    for act='q8' and per-token INT8 for act='int8' up to MAX_SMALL_M tokens, x
    itself otherwise."""
    from . import reference
    from .quant import quantize_per_token_int8, quantize_q8

    if call.tiled:
        weight = weight.to_plain()
    if isinstance(x, Q8Activations):
        x2 = Q8Activations(x.blocks.reshape(call.m, call.k // Q8_BLOCK_VALUES, Q8_BLOCK_BYTES))
    elif isinstance(x, PerTokenInt8):
        x2 = x
    else:
        x2 = x.reshape(call.m, call.k)
        if call.act == "q8" and call.m <= MAX_SMALL_M:
            x2 = quantize_q8(x2)
        elif call.act == "int8" and call.m <= MAX_SMALL_M:
            x2 = quantize_per_token_int8(x2)
    return deliver(reference.linear(x2, weight, bias).astype(call.out_dtype).reshape(call.lead + (call.n,)), out)


# ---------------------------------------------------------------------------
# CUDA path
# ---------------------------------------------------------------------------

class _Workspace:
    """Per (device, stream) scratch: Q8 blocks or per-token INT8 of x, split-K partials and tickets,
    and decode_attention's split partials.

    Grown on demand and then reused, so repeated calls (and CUDA-graph
    capture after a first eager call) allocate nothing. Keyed by stream so
    that calls on different streams never share a buffer.
    """

    _by_key: dict = {}

    def __init__(self, cp):
        self.cp = cp
        self.q8 = cp.empty(0, dtype=np.uint8)
        self.q8_views: dict[tuple[int, int], object] = {}
        self.int8 = cp.empty(0, dtype=np.int8)
        self.int8_scales = cp.empty(0, dtype=np.float32)
        self.partials = cp.empty(0, dtype=np.float32)
        self.tickets = cp.zeros(0, dtype=np.uint32)
        self.attention = cp.empty(0, dtype=np.float32)
        self.moe = cp.empty(0, dtype=np.int32)
        self.buffers: dict[str, object] = {}   # scratch(): by name
        self.views: dict[tuple, object] = {}
        self.outgrown: list = []

    @classmethod
    def get(cls, cp):
        key = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr)
        ws = cls._by_key.get(key)
        if ws is None:
            ws = cls._by_key[key] = cls(cp)
        return ws

    def per_token_int8(self, m, k):
        """(q int8 [m, k], scales float32 [m]) scratch for act='int8' (16-byte aligned)."""
        if self.int8.size < m * k:
            self.int8 = self.cp.empty(m * k, dtype=np.int8)
        if self.int8_scales.size < m:
            self.int8_scales = self.cp.empty(m, dtype=np.float32)
        return self.int8[:m * k].reshape(m, k), self.int8_scales[:m]

    def q8_blocks(self, m, k):
        view = self.q8_views.get((m, k))   # a view per shape: slicing a CuPy array costs microseconds
        if view is not None:
            return view
        n = m * (k // Q8_BLOCK_VALUES) * Q8_BLOCK_BYTES
        if self.q8.size < n:
            self.q8 = self.cp.empty(n, dtype=np.uint8)
            self.q8_views = {}   # the old buffer's views stay valid for their holders, not for new calls
        view = self.q8_views[(m, k)] = self.q8[:n].reshape(m, k // Q8_BLOCK_VALUES, Q8_BLOCK_BYTES)
        return view

    def attention_partials(self, n):
        """float32 scratch of decode_attention's split-K partials."""
        if self.attention.size < n:
            self.attention = self.cp.empty(n, dtype=np.float32)
        return self.attention[:n]

    def moe_counts(self, n):
        """int32 scratch of moe_align_block_size's per-chunk expert counts."""
        if self.moe.size < n:
            self.moe = self.cp.empty(n, dtype=np.int32)
        return self.moe[:n]

    def scratch(self, name: str, shape: tuple, dtype):
        """A C-contiguous [shape] view of the named scratch buffer (an op's
        intermediate, e.g. fused_moe's [g; u] rows), 256-byte aligned. The buffer
        outlives the call, so a CUDA graph that captured it stays valid; a later
        call of another size grows it, and the outgrown buffer is kept (a graph
        captured earlier may still use it) rather than freed."""
        dtype = np.dtype(dtype)
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < nbytes:
            if buffer is not None:
                self.outgrown.append(buffer)
            buffer = self.buffers[name] = self.cp.empty(nbytes, dtype=np.uint8)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}
        view = self.views[key] = buffer[:math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        return view

    def split_k(self, n_partials, n_tiles):
        if self.partials.size < n_partials:
            self.partials = self.cp.empty(n_partials, dtype=np.float32)
        if self.tickets.size < n_tiles:
            self.tickets = self.cp.zeros(n_tiles, dtype=np.uint32)   # the kernel leaves them zero
        return self.partials, self.tickets


_OUT_KIND = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, bfloat16: 2}


def _pointer(a):
    """A kernel pointer argument that may be null."""
    return np.uint64(0) if a is None else a


_RESIDENT: dict[int, int] = {}


def _resident_ctas(kernel, threads: int, smem: int) -> int:
    """CTAs of ``kernel`` one SM holds at once (the driver's occupancy calculator), cached."""
    key = id(kernel)
    n = _RESIDENT.get(key)
    if n is None:
        import cupy

        n = _RESIDENT[key] = max(1, cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, threads, smem))
    return n


def _group_shift(weight) -> int:
    """log2(Q8 blocks per group); 31 marks one group per row."""
    if weight.group_size == -1:
        return 31
    return int(math.log2(weight.group_size // Q8_BLOCK_VALUES))


def _sm_count(cp) -> int:
    return _device_facts(cp.cuda.runtime.getDevice())[1]


def small_m_splits(n: int, k: int, sm_count: int, ctas_per_sm: int) -> tuple[int, int]:
    """(splits, stages per split) for the small-M kernel: split K until about
    ``ctas_per_sm`` CTAs per SM exist, never leaving a split empty."""
    from ._registry import SMALL_M_TILE_ROWS

    n_tiles = -(-n // SMALL_M_TILE_ROWS)
    n_stages = -(-k // 256)
    splits = max(1, min(n_stages, -(-ctas_per_sm * sm_count // n_tiles)))
    per_split = -(-n_stages // splits)
    return -(-n_stages // per_split), per_split


def _linear_cuda(call, x, weight, bias, out, *, kernel=None, ctas_per_sm=None, matvec_config=None,
                 matvec_ctas=None):
    cp = call.xp
    if out is None:
        out = cp.empty(call.lead + (call.n,), dtype=call.out_dtype)
    if kernel is None:
        kernel = choose_kernel("int4-tiled" if call.tiled else call.kind, call.act, call.m)
        # the row-run walk reads the plain layout
        if kernel == "a16" and call.m == 1 and not call.tiled and uses_a16_rows(call.k, weight.group_size):
            kernel = "a16_rows"
        if call.tiled and kernel in ("a16", "a8") and uses_bulk(call.n, call.act):
            kernel = "bulk"
    if kernel == "bulk":   # before any launch (act="int8" quantizes x first)
        # the copy engine reads the scales (and zeros) in 16-byte aligned runs from their start
        check_aligned("weight.scales", weight.scales)
        if weight.zeros is not None:
            check_aligned("weight.zeros", weight.zeros)
    if kernel == "dense":
        return _dense(cp, call, x, weight, bias, out)
    ws = _Workspace.get(cp)
    if call.act == "int8":
        _linear_int8(call, x, weight, bias, out, ws, kernel, matvec_config, matvec_ctas)
        return out
    quantized_here = call.act == "q8" and not isinstance(x, Q8Activations)   # the matvec may overlap it
    pdl_ok = _runtime.pdl_enabled() if quantized_here and kernel == "matvec" else False   # asked once a call
    if call.act == "q8":
        if isinstance(x, Q8Activations):
            act = x.blocks
        else:
            # x was validated above (float dtype, contiguous, K a multiple of 32 like W's)
            check_aligned("x", x)
            act = ws.q8_blocks(call.m, call.k)    # the workspace is 16-byte aligned
            # the op's first kernel; a programmatic launch where the dp4a matvec after it is one
            _quantize_q8_cuda(x, act, pdl="first" if kernel == "matvec" else None, pdl_ok=pdl_ok)
    else:
        act = x
    check_aligned("x", act)
    check_aligned("qweight", weight.qweight)
    if kernel == "matvec":
        _launch_matvec(call, act, weight, bias, out, matvec_config, matvec_ctas, pdl=pdl_ok)
    elif kernel in ("a16", "a16_rows"):
        _launch_a16(call, act, weight, bias, out, matvec_config, matvec_ctas, rows=kernel == "a16_rows")
    elif kernel == "bulk":
        _launch_bulk(call, act, weight, bias, out, matvec_ctas)
    else:
        _launch_small_m(cp, call, act, weight, bias, out, ws, ctas_per_sm)
    return out


# Launch plans: everything a launch needs besides the arrays, computed once per
# (device, shapes, dtypes, choice). Plain-launch decode is host-bound, so the hot
# path is a dict lookup plus CuPy's launch.
_PLANS: dict[tuple, tuple] = _runtime.plan_cache()


def _matvec_plan(call, weight, out_dtype, config, ctas, item_mode="plain"):
    from ._registry import MATVEC_CONFIGS, MATVEC_ITEM_MODES, cxx_bool, cxx_type

    bits = 4 if call.kind == "int4" else 8
    zeros = getattr(weight, "zeros", None)
    if config is None:
        table = MATVEC_INT8_WARPS_PER_SM if call.kind == "int8" else MATVEC_WARPS_PER_SM
        warps = table.get(_gpu_name(), table["default"])
        config = matvec_config(call.kind, call.m, call.n, _sm_count(call.xp), warps)
    config = tuple(config)
    if config not in MATVEC_CONFIGS or config[0] < call.m:
        raise ValueError(f"matvec config {config} is not one of {MATVEC_CONFIGS} with kMaxM >= M={call.m}")
    rows, split = config[1], config[3]
    kernel = _runtime.get_kernel(
        "matvec_q8",
        (str(bits), cxx_type(weight.scales.dtype), cxx_bool(zeros is not None), *map(str, config),
         str(MATVEC_ITEM_MODES[item_mode])),
    )
    row_group_sets = -(-(-(-call.n // rows)) // (4 // split))
    # persistent CTAs: no more than the GPU keeps resident at once
    if ctas is None:
        ctas = min(row_group_sets, _sm_count(call.xp) * _resident_ctas(kernel, 128, 0))
    tail = (np.int32(call.n), np.int32(call.m), np.int32(call.k // Q8_BLOCK_VALUES),
            np.int32(weight.scales.shape[-1]), np.int32(_group_shift(weight)), np.int32(_OUT_KIND[out_dtype]),
            np.uint64(0), np.uint64(0), np.int32(1), np.int32(1))   # item arguments (unused when plain)
    return kernel, (ctas,), tail


def _launch_matvec(call, act, weight, bias, out, config=None, ctas=None, pdl=False):
    """The dp4a matvec (matvec_q8.cu); pdl: right after the op's quantizer, a
    programmatic dependent launch (_runtime.launch; the caller has asked
    _runtime.pdl_enabled())."""
    zeros = getattr(weight, "zeros", None)
    key = ("matvec", call.xp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), call.kind, call.m, call.n, call.k, weight.group_size,
           weight.scales.dtype, zeros is not None, out.dtype, None if config is None else tuple(config), ctas)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _matvec_plan(call, weight, out.dtype, config, ctas)
    kernel, grid, tail = plan
    _runtime.launch(kernel, grid, (128,), (weight.qweight, weight.scales, weight.scales if zeros is None else zeros,
                                           act, _pointer(bias), out) + tail, pdl=pdl, checked=True)


def _a16_block_sets(n, tiles, split, rows=False):
    """Row-block sets of an N-row matvec_a16 launch: blocks of 16 * tiles rows (row
    runs: 2 * tiles), 8 // split of them per CTA of 8 warps (kBlocksPerSet)."""
    return -(-(-(-n // ((2 if rows else 16) * tiles))) // (8 // split))


#: matvec_a16 addresses one weight matrix (one expert's) with 32-bit byte offsets
A16_MAX_WEIGHT_BYTES = 1 << 32


def _check_a16_weight_bytes(n: int, k: int) -> None:
    """ValueError for a weight matrix past matvec_a16's 32-bit offsets (N * K / 2
    bytes of qweight, per expert for stacked experts; 8.6 G parameters)."""
    if n * k // 2 >= A16_MAX_WEIGHT_BYTES:
        raise ValueError(f"weight: the W4A16 matvec takes at most {A16_MAX_WEIGHT_BYTES} bytes of qweight per "
                         f"matrix, got N x K = {n} x {k} ({n * k // 2} bytes)")


def _linear_int8(call, x, weight, bias, out, ws, kernel, matvec_config, matvec_ctas):
    """act='int8': x quantized per token once (or a PerTokenInt8 as given), then the
    s8 tensor-core kernel (a8), or the dp4a matvec on the same values laid out as Q8
    blocks carrying the row's scale. A PerTokenInt8 always takes a8 (no layout change)."""
    check_aligned("qweight", weight.qweight)
    if isinstance(x, PerTokenInt8):
        check_aligned("x.q", x.q)
        _launch_s8(kernel, call, x.q, x.scales, weight, bias, out, matvec_config, matvec_ctas)
        return
    # x was validated above (float dtype, contiguous, K a multiple of 32 like W's); the
    # workspace is 16-byte aligned
    check_aligned("x", x)
    rows = x.reshape(call.m, call.k)
    if kernel == "matvec":
        blocks = ws.q8_blocks(call.m, call.k)
        _quantize_per_token_cuda(rows, blocks, pdl="first")
        _launch_matvec(call, blocks, weight, bias, out, matvec_config, matvec_ctas, pdl=_runtime.pdl_enabled())
    else:
        q, scales = ws.per_token_int8(call.m, call.k)
        _quantize_per_token_cuda(rows, q, scales)
        # a plain launch: matvec_a16 takes no programmatic one (its wait before the
        # first step's loads, or those loads split around it, cost W4A16 1-8%)
        _launch_s8(kernel, call, q, scales, weight, bias, out, matvec_config, matvec_ctas)


def _launch_s8(kernel, call, q, scales, weight, bias, out, config, ctas):
    """Per-token INT8 x on the s8 tensor cores: matvec_bulk ('bulk', a tiled weight on
    sm_90) or matvec_a16's a8 instances."""
    if kernel == "bulk":
        _launch_bulk(call, q, weight, bias, out, ctas, x_scales=scales)
    else:
        _launch_a16(call, q, weight, bias, out, config, ctas, x_scales=scales)


def _a16_plan(call, weight, act_dtype, out_dtype, config, ctas, rows=False):
    """rows: the row-run walk (one token, 16-bit x, a16_rows_instance's group sizes)."""
    from ._registry import (A16_CONFIGS, A16_ROW_CONFIGS, INT8_ACT, a8_instance, a16_instance, a16_rows_instance,
                            cxx_bool, cxx_type, tiled_instance)

    # the matrix the kernel addresses in 32 bits (a tiled weight's padded chunks)
    _check_a16_weight_bytes(*((weight.qweight.shape[0] * TILE_ROWS, weight.qweight.shape[1] * TILE_K) if call.tiled
                              else (call.n, call.k)))
    if call.tiled:
        assert not rows, "tiled weights take the tile walk"
        family, chunk, per_channel = tiled_instance(weight.group_size, act_dtype == np.int8)
        slots = 1
        act_type = INT8_ACT if act_dtype == np.int8 else cxx_type(act_dtype)
        configs, warps_table, pick = A16_CONFIGS, A16_WARPS_PER_SM, a16_config
    elif rows:
        assert call.m == 1 and act_dtype != np.int8, "the row-run walk takes one token of 16-bit x"
        family, chunk, per_channel = a16_rows_instance(weight.group_size)
        slots, act_type = 1, cxx_type(act_dtype)
        configs, warps_table, pick = A16_ROW_CONFIGS, A16_ROWS_WARPS_PER_SM, a16_rows_config
    elif act_dtype == np.int8:   # per-token INT8 activations: one group per step
        family, chunk, per_channel = a8_instance(weight.group_size)
        slots, act_type = 1, INT8_ACT
        configs, warps_table, pick = A16_CONFIGS, A16_WARPS_PER_SM, a16_config
    else:
        family, chunk, per_channel, slots = a16_instance(weight.group_size, call.m)
        act_type = cxx_type(act_dtype)
        configs, warps_table, pick = A16_CONFIGS, A16_WARPS_PER_SM, a16_config
    if config is None:
        config = pick(call.n, _sm_count(call.xp), warps_table.get(_gpu_name(), warps_table["default"]))
    config = tuple(config)
    if config not in configs:
        raise ValueError(f"a16 config {config} is not one of {configs}")
    tiles, split = config
    kernel = _runtime.get_kernel(
        family,
        (act_type, cxx_type(weight.scales.dtype), cxx_bool(weight.zeros is not None), str(chunk),
         cxx_bool(per_channel), str(tiles), str(split), str(slots), cxx_bool(rows), cxx_bool(call.tiled)),
    )
    block_sets = _a16_block_sets(call.n, tiles, split, rows)
    if ctas is None:   # persistent CTAs: no more than the GPU keeps resident at once
        ctas = min(block_sets, _sm_count(call.xp) * _resident_ctas(kernel, 256, 0))
    # (a tiled weight's scales are transposed: [groups, rows])
    tail = (np.int32(call.n), np.int32(call.k), np.int32(call.m),
            np.int32(weight.scales.shape[0 if call.tiled else -1]), np.int32(_OUT_KIND[out_dtype]))
    return kernel, (ctas,), tail


def _launch_a16(call, act, weight, bias, out, config=None, ctas=None, x_scales=None, rows=False):
    """matvec_a16 on bf16/fp16 x (W4A16; rows: the one-token row-run walk) or on
    per-token INT8 x with its scales (W4A8)."""
    zeros = weight.zeros
    key = ("a16", call.xp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), act.dtype, call.m, call.n,
           call.k, weight.group_size, weight.scales.dtype, zeros is not None, out.dtype,
           None if config is None else tuple(config), ctas, rows, call.tiled)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _a16_plan(call, weight, act.dtype, out.dtype, config, ctas, rows)
    kernel, grid, tail = plan
    kernel(grid, (256,), (weight.qweight, weight.scales, weight.scales if zeros is None else zeros, act,
                          _pointer(x_scales), _pointer(bias), out) + tail + (np.uint64(0), np.int32(0), np.int32(1)))


def _bulk_plan(call, weight, act_dtype, out_dtype, ctas):
    from ._registry import BULK_CONFIG, BULK_THREADS, INT8_ACT, bulk_family, bulk_smem_bytes, cxx_bool, cxx_type

    # the layout's chunks and scales, addressed in 32 bits like matvec_a16's
    _check_a16_weight_bytes(weight.qweight.shape[0] * TILE_ROWS, weight.qweight.shape[1] * TILE_K)
    int8 = act_dtype == np.int8
    kernel = _runtime.get_kernel(
        bulk_family(int8, "gch" if weight.group_size == -1 else f"g{weight.group_size}"),
        (INT8_ACT if int8 else cxx_type(act_dtype), cxx_type(weight.scales.dtype), cxx_bool(weight.zeros is not None),
         cxx_bool(weight.group_size == -1), *map(str, BULK_CONFIG)))
    split, stages = BULK_CONFIG
    smem = bulk_smem_bytes(split, stages)
    tile_sets = -(-weight.qweight.shape[0] // (8 // split))
    if ctas is None:   # persistent CTAs: no more than the GPU keeps resident at once
        ctas = min(tile_sets, _sm_count(call.xp) * _resident_ctas(kernel, BULK_THREADS, smem))
    tail = (np.int32(call.n), np.int32(call.k), np.int32(call.m), np.int32(_OUT_KIND[out_dtype]))
    return kernel, (ctas,), (BULK_THREADS,), smem, tail


def _launch_bulk(call, act, weight, bias, out, ctas=None, x_scales=None):
    """matvec_bulk on an Int4TiledWeight (sm_90): bf16/fp16 x, or per-token INT8 x with its scales."""
    zeros = weight.zeros
    key = ("bulk", call.xp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), act.dtype, call.m, call.n,
           call.k, weight.group_size, weight.scales.dtype, zeros is not None, out.dtype, ctas)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _bulk_plan(call, weight, act.dtype, out.dtype, ctas)
    kernel, grid, block, smem, tail = plan
    kernel(grid, block, (weight.qweight, weight.scales, weight.scales if zeros is None else zeros, act,
                          _pointer(x_scales), _pointer(bias), out) + tail, shared_mem=smem)


def _launch_a16_items(cp, weight, act, out, item_experts, act_item_div):
    """matvec_a16 over items (fused_moe's bf16 decode path): out[i] = W[item_experts[i]]
    @ x[i // act_item_div] for stacked INT4 expert weights W [E, N, K], bf16/fp16
    activation rows ``act`` [rows, K] and out [items, N] (float32). An expert id
    outside [0, E) gives a zero row (the kernel never reads out of bounds). One CTA
    per row-block set and item: the config is picked for the N * items rows."""
    n_experts, n, k = weight.shape
    items = item_experts.shape[0]
    if not 1 <= items <= MATVEC_MAX_ITEMS:
        raise ValueError(f"{items} (token, expert) items: one launch takes 1..{MATVEC_MAX_ITEMS}")
    call = _Call(cp, "int4", "bf16", 1, n, k, (items,), out.dtype)
    key = ("a16_items", cp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), act.dtype, n, k,
           weight.group_size, weight.scales.dtype, weight.zeros is not None, out.dtype, items)
    plan = _PLANS.get(key)
    if plan is None:
        warps = A16_WARPS_PER_SM.get(_gpu_name(), A16_WARPS_PER_SM["default"])
        config = a16_config(n * items, _sm_count(cp), warps)
        kernel, _, tail = _a16_plan(call, weight, act.dtype, out.dtype, config, None)
        # every set of one item: a CTA each
        plan = _PLANS[key] = (kernel, (_a16_block_sets(n, *config), items), tail)
    kernel, grid, tail = plan
    zeros = weight.zeros
    kernel(grid, (256,), (weight.qweight, weight.scales, weight.scales if zeros is None else zeros, act,
                          np.uint64(0), np.uint64(0), out) + tail + (item_experts, np.int32(n_experts),
                                                                      np.int32(act_item_div)))


#: items (grid y) one matvec_q8 launch takes
MATVEC_MAX_ITEMS = 65535


def matvec_items_config(n: int, k: int, items: int, sm_count: int, warps_per_sm: int) -> tuple[int, int, int, int]:
    """The M=1 matvec instance for ``items`` (token, expert) items of an N x K expert
    layer: the grid holds items * N rows, and a candidate that splits K so finely
    that some of its warps get no K block (short expert K, e.g. 2048) is skipped."""
    n_blocks = k // Q8_BLOCK_VALUES
    usable = [c for c in MATVEC_CANDIDATES[("int4", 1)] if c[3] == 1 or _k_use(c, n_blocks) >= MATVEC_MIN_K_USE]
    for config in usable:
        if -(-(n * items) // config[1]) * config[3] >= warps_per_sm * sm_count:
            return config
    return usable[-1]


def _k_use(config, n_blocks: int) -> float:
    """Share of a row group's warp-step slots (kSplit warps x steps x 32 kUnroll
    lanes) that hold a K block."""
    step_blocks = 32 * config[2]
    steps = -(-n_blocks // step_blocks)
    return n_blocks / (config[3] * -(-steps // config[3]) * step_blocks)


def _items_plan(cp, call, weight, out_dtype, grid_rows, item_mode, config=None, ctas=None):
    """(kernel, grid, tail without the item arguments) of a matvec_q8 item-mode launch
    with ``grid_rows`` grid rows (items or tokens); ``call.k`` is the row the config
    sees. ``config`` and ``ctas`` (CTAs per grid row) override the rules (sweeps)."""
    if config is None:
        warps = MATVEC_WARPS_PER_SM.get(_gpu_name(), MATVEC_WARPS_PER_SM["default"])
        config = matvec_items_config(call.n, call.k, grid_rows, _sm_count(cp), warps)
    kernel, (sets,), tail = _matvec_plan(call, weight, out_dtype, config, None, item_mode=item_mode)
    if ctas is None:
        # about MATVEC_ITEM_SETS_PER_CTA row-group sets per CTA, and at least the
        # GPU's resident CTAs over all grid rows
        total = _sm_count(cp) * _resident_ctas(kernel, 128, 0)
        ctas = max(1, min(sets, max(-(-sets // MATVEC_ITEM_SETS_PER_CTA), -(-total // grid_rows))))
    return kernel, (ctas, grid_rows), tail[:-4]


def _launch_items(plan, weight, act, out, item_args, pdl):
    kernel, grid, tail = plan
    zeros = weight.zeros
    _runtime.launch(kernel, grid, (128,), (weight.qweight, weight.scales, weight.scales if zeros is None else zeros,
                                           act, np.uint64(0), out) + tail + item_args, pdl=pdl)


def _launch_matvec_items(cp, weight, act, out, item_experts, act_item_div, config=None, ctas=None, pdl=False):
    """matvec_q8 over items (the MoE decode path): out[i] = W[item_experts[i]] @
    x[i // act_item_div] for stacked INT4 expert weights W [E, N, K], Q8 activation
    rows ``act`` [rows, K // 32, 48] and out [items, N] (float32, bfloat16 or float16).
    An expert id outside [0, E) gives a zero row (the kernels never read out of bounds).
    ``config`` and ``ctas`` (CTAs per item, grid x) override the rules (sweeps); pdl:
    right after another kernel of the op (_runtime.launch)."""
    n_experts, n, k = weight.shape
    items = item_experts.shape[0]
    if not 1 <= items <= MATVEC_MAX_ITEMS:
        raise ValueError(f"{items} (token, expert) items: one launch takes 1..{MATVEC_MAX_ITEMS}")
    key = ("matvec_items", cp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), n, k, weight.group_size,
           weight.scales.dtype, weight.zeros is not None, out.dtype, items,
           None if config is None else tuple(config), ctas)
    plan = _PLANS.get(key)
    if plan is None:
        call = _Call(cp, "int4", "q8", 1, n, k, (items,), out.dtype)
        plan = _PLANS[key] = _items_plan(cp, call, weight, out.dtype, items, "per_item", config, ctas)
    _launch_items(plan, weight, act, out, (item_experts, np.uint64(0), np.int32(n_experts), np.int32(act_item_div)),
                  pdl)


def _launch_matvec_token_sums(cp, weight, act, out, topk_ids, topk_weights, pdl=False, config=None):
    """matvec_q8 summing each token's slots (the MoE int8 decode path's GEMM2 with the
    combine fused): out[t] = sum_j topk_weights[t, j] * W[topk_ids[t, j]] @ a[t * k + j]
    for stacked INT4 expert weights W [E, N, K], Q8 activation rows ``act`` [T * k,
    K // 32, 48] and out [T, N] (float32, bfloat16 or float16), summed in one fixed
    order (the same bits every run). Slots with an id outside [0, E) are left out.
    k <= MATVEC_TOKEN_SUM_MAX_SLOTS (one slot per lane). pdl: right after another
    kernel of the op (_runtime.launch). ``config`` overrides the rule (sweeps)."""
    from ._registry import MATVEC_TOKEN_SUM_MAX_SLOTS

    n_experts, n, k = weight.shape
    tokens, slots = topk_ids.shape
    if not 1 <= slots <= MATVEC_TOKEN_SUM_MAX_SLOTS:
        raise ValueError(f"k={slots} slots: the token-sum matvec takes 1..{MATVEC_TOKEN_SUM_MAX_SLOTS}")
    if not 1 <= tokens <= MATVEC_MAX_ITEMS:
        raise ValueError(f"{tokens} tokens: one launch takes 1..{MATVEC_MAX_ITEMS}")
    key = ("matvec_token_sums", cp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), n, k, slots,
           weight.group_size, weight.scales.dtype, weight.zeros is not None, out.dtype, tokens,
           None if config is None else tuple(config))
    plan = _PLANS.get(key)
    if plan is None:
        # the slots' K run one after another: the config sees one row of slots * K
        call = _Call(cp, "int4", "q8", 1, n, slots * k, (tokens,), out.dtype)
        kernel, grid, tail = _items_plan(cp, call, weight, out.dtype, tokens, "token_sum", config)
        # but n_blocks is one slot's K blocks (the kernel multiplies by the slots)
        plan = _PLANS[key] = (kernel, grid, tail[:2] + (np.int32(k // Q8_BLOCK_VALUES),) + tail[3:])
    _launch_items(plan, weight, act, out, (topk_ids, topk_weights, np.int32(n_experts), np.int32(slots)), pdl)


def _small_m_plan(cp, call, weight, act_dtype, out_dtype, ctas_per_sm):
    from ._registry import (
        Q8_ACT,
        SMALL_M_STAGES,
        SMALL_M_TILE_ROWS,
        cxx_bool,
        cxx_type,
        small_m_family,
        small_m_stage_bytes,
        small_m_window_pieces,
    )

    zeros = weight.zeros
    act_type = Q8_ACT if call.act == "q8" else cxx_type(act_dtype)
    kernel = _runtime.get_kernel(
        small_m_family(weight.group_size),
        (act_type, cxx_type(weight.scales.dtype), cxx_bool(zeros is not None), str(_group_shift(weight))),
    )
    if ctas_per_sm is None:
        ctas_per_sm = SMALL_M_CTAS_PER_SM.get(_gpu_name(), SMALL_M_CTAS_PER_SM["default"])
    n_tiles = -(-call.n // SMALL_M_TILE_ROWS)
    splits, per_split = small_m_splits(call.n, call.k, _sm_count(cp), ctas_per_sm)
    pieces = small_m_window_pieces(weight.scales.dtype.itemsize, weight.group_size)
    stage_bytes = small_m_stage_bytes(call.act == "q8", pieces, zeros is not None)
    tail = (np.int32(call.n), np.int32(call.k), np.int32(call.m), np.int32(weight.scales.shape[-1]),
            np.int32(pieces), np.int32(stage_bytes), np.int32(per_split), np.int32(_OUT_KIND[out_dtype]))
    partial_floats = splits * n_tiles * 8 * SMALL_M_TILE_ROWS if splits > 1 else 0
    return kernel, (n_tiles, splits), SMALL_M_STAGES * stage_bytes, partial_floats, n_tiles, tail


def _launch_small_m(cp, call, act, weight, bias, out, ws, ctas_per_sm):
    zeros = weight.zeros
    key = ("small_m", cp.cuda.runtime.getDevice(), os.environ.get("W4KERN_CUDA_SRC"), call.act, act.dtype, call.m, call.n, call.k, weight.group_size,
           weight.scales.dtype, zeros is not None, out.dtype, ctas_per_sm)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _small_m_plan(cp, call, weight, act.dtype, out.dtype, ctas_per_sm)
    kernel, grid, smem, partial_floats, n_tiles, tail = plan
    partials, tickets = ws.split_k(partial_floats, n_tiles)
    kernel(grid, (128,), (weight.qweight, weight.scales, weight.scales if zeros is None else zeros, act,
                          _pointer(bias), out, partials, tickets) + tail, shared_mem=smem)


def _dense(cp, call, x, weight, bias, out):
    """M > 8: dequantize W and run a float32 cuBLAS GEMM (until a prefill GEMM exists)."""
    from .pack import dequantize_int4, dequantize_int8
    from .quant import dequantize_q8

    if call.tiled:   # unpacked each call: the tiled layout is for up to MAX_SMALL_M tokens
        weight = weight.to_plain()
    w = dequantize_int4(weight, np.float32) if call.kind == "int4" else dequantize_int8(weight, np.float32)
    if isinstance(x, Q8Activations):
        a = dequantize_q8(Q8Activations(x.blocks.reshape(call.m, call.k // Q8_BLOCK_VALUES, Q8_BLOCK_BYTES)))
    elif isinstance(x, PerTokenInt8):
        a = x.q.astype(np.float32) * x.scales[:, None]
    else:
        a = x.reshape(call.m, call.k).astype(np.float32)
    y = a @ w.T
    if bias is not None:
        y += bias.astype(np.float32)
    out.reshape(call.m, call.n)[...] = y.astype(out.dtype)
    return out
