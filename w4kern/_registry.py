"""The one table of kernel instances w4kern can launch.

Every template instantiation an op may select is listed here, and only here:
the runtime compiles a family's instances together (one NVRTC call per family
and arch), ``python -m w4kern compile-check`` compiles all of them for every
supported arch, and an op asking for a combination that is not listed gets a
``ValueError`` naming the supported ones instead of a mangled-name lookup error.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .formats import bfloat16

# C++ spelling of each element type a template parameter can take.
CXX_TYPES: dict[np.dtype, str] = {
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "w4kern::f16_t",
    np.dtype(bfloat16): "w4kern::bf16_t",
}


def cxx_type(dtype) -> str:
    return CXX_TYPES[np.dtype(dtype)]


def cxx_bool(value: bool) -> str:
    return "true" if value else "false"


@dataclasses.dataclass(frozen=True)
class KernelFamily:
    """One CUDA source file and the template instances compiled from it.

    ``instances`` holds the C++ template arguments of each instance, already
    spelled for the compiler (see :func:`cxx_type`).
    """

    name: str                        # family name, used by ops and in logs
    source: str                      # file under cuda_src/
    template: str                    # fully qualified kernel template
    instances: tuple[tuple[str, ...], ...]
    spill_free: bool = True          # compile-check fails if any instance spills
    max_dynamic_smem: int = 0        # bytes of dynamic shared memory to opt in to
    smem_carveout: int = 100         # preferred shared-memory share of L1 (percent) for those kernels

    def name_expression(self, args: tuple[str, ...]) -> str:
        if args not in self.instances:
            supported = ", ".join("<" + ", ".join(a) + ">" for a in self.instances)
            raise ValueError(
                f"{self.name}: no kernel instance <{', '.join(args)}>; supported: {supported}"
            )
        return f"{self.template}<{', '.join(args)}>"

    @property
    def name_expressions(self) -> tuple[str, ...]:
        return tuple(self.name_expression(a) for a in self.instances)


_FLOAT_TYPES = (np.float32, np.float16, bfloat16)
Q8_CHUNKS_PER_THREAD = (1, 2, 4)
_HALF_TYPES = (np.float16, bfloat16)
#: tokens a matvec_q8 instance handles per launch (M <= kMaxM; it masks the rest)
MATVEC_MAX_M = (1, 4, 8)
#: (kMaxM, kRows, kUnroll, kSplit) instances of matvec_q8: kRows weight rows per warp
#: (each activation block a lane loads serves them all), kUnroll blocks per lane per
#: step (double-buffered), kSplit warps splitting one row group's K
MATVEC_CONFIGS = ((1, 8, 1, 1), (1, 8, 1, 4), (1, 4, 2, 4), (4, 4, 1, 1), (4, 4, 1, 4), (8, 4, 1, 1))
#: matvec_q8's kItemMode: a plain layer, one (token, expert) item per grid row (the MoE
#: decode GEMM1), or one token's k slots summed with their weights (GEMM2, the combine
#: fused; at most MATVEC_TOKEN_SUM_MAX_SLOTS slots, one per lane)
MATVEC_ITEM_MODES = {"plain": 0, "per_item": 1, "token_sum": 2}
MATVEC_TOKEN_SUM_MAX_SLOTS = 32
#: C++ name of the Q8-activation tag type of gemm_small_m
Q8_ACT = "w4kern::Q8Block"
#: shared memory of gemm_small_m (SmallMLayout in gemm_small_m.cu): 4 pipeline stages,
#: each 8 KiB of weights, 8 tokens of activations and 64 rows of scale (and zero)
#: windows of 4-byte pieces
SMALL_M_STAGES = 4
SMALL_M_TILE_ROWS = 64
SMALL_M_MAX_TOKENS = 8
SMALL_M_STAGE_CHUNKS = 8
#: gemm_small_m family per group size: name suffix -> kGroupShift (31: per-channel)
SMALL_M_GROUP_FAMILIES = {"g32": 0, "g64": 1, "g128": 2, "gch": 31}


def small_m_family(group_size: int) -> str:
    return f"gemm_small_m_{'gch' if group_size == -1 else f'g{group_size}'}"


def small_m_window_pieces(scale_itemsize: int, group_size: int) -> int:
    """4-byte pieces covering one row's scales for one stage (256 k), including the
    2-byte misalignment a 2-byte scale row may start with; 0 for per-channel."""
    if group_size == -1:
        return 0
    groups = SMALL_M_STAGE_CHUNKS * 32 // group_size
    misalignment = 2 if scale_itemsize == 2 else 0
    return -(-(groups * scale_itemsize + misalignment) // 4)


def small_m_stage_bytes(act_is_q8: bool, window_pieces: int, has_zeros: bool) -> int:
    token_stride = SMALL_M_STAGE_CHUNKS * 48 + 16 if act_is_q8 else SMALL_M_STAGE_CHUNKS * 32 * 2 + 64
    windows = SMALL_M_TILE_ROWS * 4 * window_pieces * (2 if has_zeros else 1)
    return SMALL_M_TILE_ROWS * SMALL_M_STAGE_CHUNKS * 16 + SMALL_M_MAX_TOKENS * token_stride + windows

#: (kTiles, kSplit) instances of matvec_a16: 16-row tiles per warp (each activation
#: load and sum-of-x MMA serves them all), warps of a CTA splitting one row block's K
A16_CONFIGS = ((2, 2), (1, 4), (1, 8))
#: matvec_a16 family per group size: name suffix -> (bytes of a row per thread and
#: step = group_size / 8, per-channel)
A16_GROUP_FAMILIES = {"g32": (4, False), "g64": (8, False), "g128": (16, False), "gch": (16, True)}
#: group slots of the g32 / g64 families (128-k steps holding 4 / 2 groups, one per
#: result column, for M <= 8 // slots tokens; see matvec_a16.cu)
A16_GROUP_SLOTS = {"g32": 4, "g64": 2}


def a16_instance(group_size: int, m: int) -> tuple[str, int, bool, int]:
    """(family, bytes of a row per thread and step, per-channel, group slots) of the
    matvec_a16 instance for M tokens: slots where the group is smaller than 128 and M
    fits, else one group per step."""
    family = a16_family(group_size)
    label = family.rsplit("_", 1)[1]
    chunk, per_channel = A16_GROUP_FAMILIES[label]
    slots = A16_GROUP_SLOTS.get(label, 1)
    if slots > 1 and m <= 8 // slots:
        return family, 16, per_channel, slots
    return family, chunk, per_channel, 1


#: (kTiles, kSplit) instances of matvec_a16's row-run walk (M = 1, 16-bit x): tiles of
#: 2 weight rows, each load instruction one 512-byte run of a row (see matvec_a16.cu)
A16_ROW_CONFIGS = ((2, 1), (2, 2), (2, 4), (2, 8))
#: group sizes with a row-run family (a chunk of 128 k is one group or part of the
#: per-channel row); g32 and g64 keep the group-slot walk
A16_ROW_GROUP_FAMILIES = {label: A16_GROUP_FAMILIES[label] for label in ("g128", "gch")}


def a16_rows_instance(group_size: int) -> tuple[str, int, bool] | None:
    """(family, bytes of a row per thread and step, per-channel) of matvec_a16's
    row-run walk for a group size, or None where it has none."""
    label = "gch" if group_size == -1 else f"g{group_size}"
    if label not in A16_ROW_GROUP_FAMILIES:
        return None
    chunk, per_channel = A16_ROW_GROUP_FAMILIES[label]
    return f"matvec_a16_rows_{label}", chunk, per_channel


def _matvec_a16_args(acts, per_channel, configs, chunks_and_slots, row_runs=False,
                     tiled=False) -> tuple[tuple[str, ...], ...]:
    """Template arguments of matvec_a16_kernel: (activation type, scale type, has zeros,
    chunk bytes, per-channel, tiles, split, group slots, row runs, tiled weights) for
    every scale dtype, symmetry and (tiles, split) config, per (chunk bytes, group
    slots) pair."""
    return tuple(
        (act, cxx_type(scale), cxx_bool(has_zeros), str(chunk), cxx_bool(per_channel), *map(str, config),
         str(slots), cxx_bool(row_runs), cxx_bool(tiled))
        for chunk, slots in chunks_and_slots
        for act in acts
        for scale in _FLOAT_TYPES
        for has_zeros in (False, True)
        for config in configs
    )


#: group sizes an Int4TiledWeight takes (w4kern.prepare): one group, or part of the
#: per-channel row, per 128-k step of a 16-row tile
TILED_GROUP_FAMILIES = {label: A16_GROUP_FAMILIES[label] for label in ("g128", "gch")}


def tiled_instance(group_size: int, int8: bool) -> tuple[str, int, bool]:
    """(family, bytes of a row per thread and step, per-channel) of matvec_a16's
    instance for an Int4TiledWeight: W4A16, or with ``int8`` the per-token INT8 one."""
    label = "gch" if group_size == -1 else f"g{group_size}"
    chunk, per_channel = TILED_GROUP_FAMILIES[label]
    return f"matvec_{'a8' if int8 else 'a16'}_tiled_{label}", chunk, per_channel


#: matvec_bulk (Int4TiledWeight on sm_90, copy-engine ring): (kSplit, kStages), the
#: one configuration compiled: 8 warps split one tile's K steps, 3 stages a warp
BULK_CONFIG = (8, 3)
BULK_THREADS = 256
#: matvec_bulk.cu's stage and barrier sizes (kBulkStageBytes, kBulkBarrierBytes)
BULK_STAGE_BYTES = 1024 + 2 * 64
BULK_BARRIER_BYTES = 512


def bulk_smem_bytes(split: int, stages: int) -> int:
    """Dynamic shared memory of a matvec_bulk CTA: barriers, 8 warps' rings, the split partials."""
    return BULK_BARRIER_BYTES + BULK_STAGE_BYTES * stages * 8 + (8 * 4 * 32 * 4 if split > 1 else 0)


def bulk_family(int8: bool, label: str) -> str:
    return f"matvec_bulk_{'a8' if int8 else 'a16'}_{label}"


def a16_family(group_size: int) -> str:
    return f"matvec_a16_{'gch' if group_size == -1 else f'g{group_size}'}"


#: C++ spelling of the per-token INT8 activation type of matvec_a16's W4A8 instances
INT8_ACT = "w4kern::i8"


def a8_family_name(label: str) -> str:
    return f"matvec_a8_{label}"


def a8_instance(group_size: int) -> tuple[str, int, bool]:
    """(family, bytes of a row per thread and step, per-channel) of matvec_a16's INT8
    activation instance for a group size: one group per step (no group slots)."""
    label = "gch" if group_size == -1 else f"g{group_size}"
    chunk, per_channel = A16_GROUP_FAMILIES[label]
    return a8_family_name(label), chunk, per_channel


#: decode_attention: head dims of the kernel instances; a CTA takes up to
#: ATTENTION_HEADS_PER_CTA query heads of one KV head (the MMA's 8 columns; more
#: heads per KV head take several CTAs, each reading the same K/V rows)
ATTENTION_HEAD_DIMS = (64, 96, 128, 256)
ATTENTION_HEADS_PER_CTA = 8   # kAttnHeads
ATTENTION_WARPS = 4           # kAttnWarps
ATTENTION_CHUNK = 16          # kAttnChunk: tokens per warp step
#: ring depths (kStages) compiled per head dim, deepest first: the host takes the
#: deepest whose shared memory the GPU offers (sm_90 offers a CTA 227 KiB, sm_80
#: 163 KiB, sm_89 99 KiB; D = 128 needs 102 KiB for 3 stages and 68 KiB for 2,
#: D = 256 198 KiB for 3 and 66 KiB for 1)
ATTENTION_STAGES = {64: (3,), 96: (3,), 128: (3, 2), 256: (3, 1)}


def attention_smem_bytes(head_dim: int, stages: int) -> int:
    """Dynamic shared memory of decode_attention_kernel (AttnShape<kDim, kStages>::kSmemBytes
    in decode_attention.cu): per warp, ``stages`` chunks of 16 K and 16 V rows, each
    row padded by 16 bytes."""
    return ATTENTION_WARPS * stages * 2 * ATTENTION_CHUNK * (head_dim * 2 + 16)


#: moe_align_block_size: the flat indices are cut into at most MOE_ALIGN_MAX_CHUNKS
#: chunks, and at most MOE_ALIGN_MATRIX_COUNTS // E (the one-CTA offsets kernel of
#: MOE_OFFSETS_THREADS threads holds the [chunks, E] count matrix in shared memory),
#: of at least MOE_ALIGN_MIN_CHUNK indices, one warp each, in CTAs of
#: MOE_ALIGN_WARPS warps that keep a row of E counters per warp in shared memory
#: (hence at most MOE_ALIGN_MAX_EXPERTS experts on the GPU)
MOE_ALIGN_MIN_CHUNK = 256
MOE_ALIGN_MAX_CHUNKS = 128
MOE_ALIGN_MATRIX_COUNTS = 32768
MOE_ALIGN_WARPS = 4
MOE_ALIGN_MAX_EXPERTS = 4096
MOE_OFFSETS_THREADS = 1024


#: fused_moe decode glue (moe_decode.cu): threads of the one-CTA-per-row quantizer
#: (kMoeRowThreads) and of the combine kernel (kMoeCombineThreads)
MOE_ROW_MAX_THREADS = 1024


def moe_row_threads(cols: int) -> int:
    """Threads of the per-token quantizer's CTA for a row of ``cols`` values: one per
    8-value chunk, a multiple of 32, at most MOE_ROW_MAX_THREADS (moe_decode.cu)."""
    return min(MOE_ROW_MAX_THREADS, -(-(cols // 8) // 32) * 32)
MOE_COMBINE_THREADS = 256


#: the batched expert GEMMs (moe_gemm.cu): m16 tiles per aligned block (block size
#: 16 * tiles; the A16 kernels take no 2-tile blocks, w4kern.moe.moe_block_size), 128
#: weight rows per CTA, 3 stages of K tiles of 64
MOE_GEMM_M_TILES = (1, 2, 4)
MOE_GEMM_A16_M_TILES = (1, 4)
MOE_GEMM_THREADS = 128
MOE_GEMM_BN = MOE_GEMM_THREADS   # moe_gemm.cu's kMoeBN: a thread pair loads two of the rows
#: the A8 GEMM's warps along M by m16 tiles per block (moe_gemm.cu's kMoeA8WarpsM): a
#: CTA has 4 warps along its 128 weight rows, so 128 or 256 threads. With 2 at 64-row
#: blocks each warp takes two m16 tiles (128 registers, 16 warps per SM where one
#: warp of four tiles needs 250, 8 per SM). Measured on an H200 (scripts/sweep_moe_gemm.py,
#: benchmarks/results/2026-11-23-h200-session14/).
MOE_GEMM_A8_WARPS_M = {1: 1, 2: 1, 4: 2}
MOE_GEMM_BK = 64
MOE_GEMM_STAGES = 3
#: shared-memory carveouts (percent of the SM's 228 KiB) of the expert GEMMs: room for
#: the CTAs their registers allow (A8: 2 of 30 KiB at 64-row blocks, 4 of 21 KiB at
#: 32, 4 of 17 KiB at 16; A16: 3 of 39 KiB, 4 of 19 KiB), the rest
#: left to L1, which then holds the 32-byte sectors of scales and zeros the A16
#: kernels read 2 bytes at a time
MOE_GEMM_A8_CARVEOUT = 50
MOE_GEMM_A16_CARVEOUT = 60


#: the template arguments both expert-GEMM kernels share: (scale type, zeros, m16
#: tiles per block, GEMM1 with the SiLU * up epilogue); A16 puts the activation type first
def _moe_gemm_args(m_tiles: tuple[int, ...], persistent: bool = False) -> tuple[tuple[str, ...], ...]:
    return tuple(
        (cxx_type(s), cxx_bool(zeros), str(tiles), cxx_bool(silu), cxx_bool(persistent))
        for s in CXX_TYPES
        for zeros in (True, False)
        for tiles in m_tiles
        for silu in (True, False)
    )


def moe_gemm_family(activation: str, persistent: bool = False) -> str:
    """The kernel family of fused_moe's batched expert GEMMs: A8 for activation="int8",
    A16 for "bf16"; the persistent CTAs (moe_gemm.cu's moe_walk_tiles) are families of
    their own, compiled only where they are used."""
    return f"moe_gemm_{'a8' if activation == 'int8' else 'a16'}{'_persistent' if persistent else ''}"


def moe_gemm_smem_bytes(m_tiles: int, stages: int = MOE_GEMM_STAGES, bn: int = MOE_GEMM_BN) -> int:
    """Dynamic shared memory of moe_gemm_a16_kernel (MoeGemmLayout in moe_gemm.cu):
    the stages of A rows (padded to 144 bytes) and weight nibble rows (32 bytes),
    plus the block's item ids."""
    rows = 16 * m_tiles
    return stages * (rows * (2 * MOE_GEMM_BK + 16) + bn * MOE_GEMM_BK // 2) + rows * 4


def moe_gemm_threads(activation: str, m_tiles: int) -> int:
    """Threads per CTA of the batched expert GEMM for ``activation`` ("int8": A8,
    else A16) at ``m_tiles`` m16 tiles per block (the tile has MOE_GEMM_BN weight rows)."""
    return MOE_GEMM_THREADS * MOE_GEMM_A8_WARPS_M[m_tiles] if activation == "int8" else MOE_GEMM_THREADS


def moe_gemm_a8_smem_bytes(m_tiles: int, stages: int = MOE_GEMM_STAGES, threads: int | None = None,
                           bn: int = MOE_GEMM_BN) -> int:
    """Dynamic shared memory of moe_gemm_a8_kernel (MoeGemmA8Layout): the stages of
    A rows (BK int8, padded by 16 bytes) and the ``bn`` weight nibble rows (32
    bytes), plus the block's item ids and rows' d and each warp's 32 (scale, zero)
    float pairs of the current group (``threads``: by default the instance's)."""
    threads = moe_gemm_threads("int8", m_tiles) if threads is None else threads
    rows = 16 * m_tiles
    stage = rows * (MOE_GEMM_BK + 16) + bn * MOE_GEMM_BK // 2
    return stages * stage + rows * 8 + threads * 8


def moe_align_chunk(n: int, n_experts: int) -> int:
    """Indices per chunk for n flat indices and E experts: a multiple of 32, at least
    MOE_ALIGN_MIN_CHUNK, and at most min(MOE_ALIGN_MAX_CHUNKS, MOE_ALIGN_MATRIX_COUNTS // E)
    chunks."""
    per = -(-n // max(1, min(MOE_ALIGN_MAX_CHUNKS, MOE_ALIGN_MATRIX_COUNTS // n_experts)))
    return max(MOE_ALIGN_MIN_CHUNK, -(-per // 32) * 32)


FAMILIES: dict[str, KernelFamily] = {
    family.name: family
    for family in (
        KernelFamily(
            name="quantize_q8",
            source="quantize_q8.cu",
            template="w4kern::quantize_q8_kernel",
            # (input type, chunks of 8 values per thread)
            instances=tuple((cxx_type(t), str(c)) for t in _FLOAT_TYPES for c in Q8_CHUNKS_PER_THREAD),
        ),
        KernelFamily(
            name="quantize_q8_thread_per_block",
            source="quantize_q8.cu",
            template="w4kern::quantize_q8_thread_per_block_kernel",
            instances=tuple((cxx_type(t),) for t in _FLOAT_TYPES),
        ),
        KernelFamily(
            name="dequant_int4",
            source="dequant_int4.cu",
            template="w4kern::dequant_int4_kernel",
            instances=tuple(
                (cxx_type(scale), cxx_type(out), cxx_bool(has_zeros))
                for scale, out, has_zeros in itertools.product(
                    _FLOAT_TYPES, _FLOAT_TYPES, (False, True)
                )
            ),
        ),
        KernelFamily(
            name="matvec_q8",
            source="matvec_q8.cu",
            template="w4kern::matvec_q8_kernel",
            # (weight bits, scale type, has zeros, max tokens, rows per warp, blocks per lane
            # per step, warps per row group, item mode): the item modes (MATVEC_ITEM_MODES:
            # the MoE decode path's per-item GEMM1 and token-sum GEMM2) for the one-token
            # INT4 instances only
            instances=tuple(
                (str(bits), cxx_type(scale), cxx_bool(has_zeros), *map(str, config), str(mode))
                for bits, has_zeros in ((4, False), (4, True), (8, False))
                for scale in _FLOAT_TYPES
                for config in MATVEC_CONFIGS
                for mode in (MATVEC_ITEM_MODES.values() if bits == 4 and config[0] == 1 else (0,))
            ),
        ),
    ) + tuple(
        # one family per group size: a first call compiles only the instances it can use
        KernelFamily(
            name=f"gemm_small_m_{label}",
            source="gemm_small_m.cu",
            template="w4kern::gemm_small_m_kernel",
            # (activation type, scale type, has zeros, log2(chunks of 32 per group) or 31)
            instances=tuple(
                (act, cxx_type(scale), cxx_bool(has_zeros), str(shift))
                for act in (Q8_ACT, cxx_type(bfloat16), cxx_type(np.float16))
                for scale in _FLOAT_TYPES
                for has_zeros in (False, True)
            ),
            max_dynamic_smem=SMALL_M_STAGES * small_m_stage_bytes(False, 8, True),
        )
        for label, shift in SMALL_M_GROUP_FAMILIES.items()
    ) + tuple(
        KernelFamily(
            name=f"matvec_a16_{label}",
            source="matvec_a16.cu",
            template="w4kern::matvec_a16_kernel",
            instances=_matvec_a16_args((cxx_type(bfloat16), cxx_type(np.float16)), per_channel, A16_CONFIGS,
                                       ((chunk, 1),) + (((16, A16_GROUP_SLOTS[label]),)
                                                        if label in A16_GROUP_SLOTS else ())),
        )
        for label, (chunk, per_channel) in A16_GROUP_FAMILIES.items()
    ) + tuple(
        # the row-run walk (M = 1): a family of its own, compiled only where it is used
        KernelFamily(
            name=f"matvec_a16_rows_{label}",
            source="matvec_a16.cu",
            template="w4kern::matvec_a16_kernel",
            instances=_matvec_a16_args((cxx_type(bfloat16), cxx_type(np.float16)), per_channel, A16_ROW_CONFIGS,
                                       ((chunk, 1),), row_runs=True),
        )
        for label, (chunk, per_channel) in A16_ROW_GROUP_FAMILIES.items()
    ) + tuple(
        # the same kernel on per-token INT8 activations (W4A8 with int8 MMAs): a family
        # of its own, so a first W4A16 call does not compile these too
        KernelFamily(
            name=a8_family_name(label),
            source="matvec_a16.cu",
            template="w4kern::matvec_a16_kernel",
            instances=_matvec_a16_args((INT8_ACT,), per_channel, A16_CONFIGS, ((chunk, 1),)),
        )
        for label, (chunk, per_channel) in A16_GROUP_FAMILIES.items()
    ) + tuple(
        # the tiled-weight walk (Int4TiledWeight), 16-bit and per-token INT8 activations:
        # families of their own, compiled only for prepared weights
        KernelFamily(
            name=f"matvec_{kind}_tiled_{label}",
            source="matvec_a16.cu",
            template="w4kern::matvec_a16_kernel",
            instances=_matvec_a16_args(acts, per_channel, A16_CONFIGS, ((chunk, 1),), tiled=True),
        )
        for kind, acts in (("a16", (cxx_type(bfloat16), cxx_type(np.float16))), ("a8", (INT8_ACT,)))
        for label, (chunk, per_channel) in TILED_GROUP_FAMILIES.items()
    ) + tuple(
        # the tiled walk fed by the copy engine (sm_90; an empty kernel elsewhere)
        KernelFamily(
            name=bulk_family(kind == "a8", label),
            source="matvec_bulk.cu",
            template="w4kern::matvec_bulk_kernel",
            # (activation type, scale type, has zeros, per-channel, split, ring stages)
            instances=tuple((act, cxx_type(scale), cxx_bool(has_zeros), cxx_bool(per_channel), *map(str, BULK_CONFIG))
                            for act in acts for scale in _FLOAT_TYPES for has_zeros in (False, True)),
        )
        for kind, acts in (("a16", (cxx_type(bfloat16), cxx_type(np.float16))), ("a8", (INT8_ACT,)))
        for label, (_, per_channel) in TILED_GROUP_FAMILIES.items()
    ) + (
        KernelFamily(
            name="decode_attention",
            source="decode_attention.cu",
            template="w4kern::decode_attention_kernel",
            # (cache type, head dim, paged, ring stages)
            instances=tuple(
                (cxx_type(t), str(d), cxx_bool(paged), str(stages))
                for t in _HALF_TYPES
                for d in ATTENTION_HEAD_DIMS
                for paged in (False, True)
                for stages in ATTENTION_STAGES[d]
            ),
            max_dynamic_smem=max(attention_smem_bytes(d, st) for d in ATTENTION_HEAD_DIMS
                                 for st in ATTENTION_STAGES[d]),
        ),
        KernelFamily(
            name="decode_attention_merge",
            source="decode_attention.cu",
            template="w4kern::decode_attention_merge_kernel",
            instances=tuple((cxx_type(t), str(d)) for t in _HALF_TYPES for d in ATTENTION_HEAD_DIMS),
        ),
    ) + (
        KernelFamily(
            name="moe_chunks",
            source="moe_align.cu",
            template="w4kern::moe_chunk_kernel",
            instances=tuple((str(MOE_ALIGN_WARPS), cxx_bool(scatter)) for scatter in (False, True)),
            max_dynamic_smem=MOE_ALIGN_WARPS * MOE_ALIGN_MAX_EXPERTS * 4,
        ),
        KernelFamily(
            name="moe_offsets",
            source="moe_align.cu",
            template="w4kern::moe_offsets_kernel",
            instances=((str(MOE_OFFSETS_THREADS),),),
            max_dynamic_smem=4 * MOE_ALIGN_MATRIX_COUNTS,
        ),
        # fused_moe's decode path: per-token Q8 rows of x (each float type) and of
        # silu(g) * u from GEMM1's fp32 rows (also plain per-token INT8 rows for linear's
        # act="int8"); the slot-order combine into out's dtype
        KernelFamily(
            name="moe_token_q8",
            source="moe_decode.cu",
            template="w4kern::moe_token_q8_kernel",
            # (input type, input is GEMM1's [g; u] rows, Q8 blocks (else plain int8 rows and
            # scales: linear's act="int8"))
            instances=tuple((cxx_type(t), "false", "true") for t in CXX_TYPES) + (("float", "true", "true"),)
            + tuple((cxx_type(t), "false", "false") for t in CXX_TYPES),
        ),
    ) + tuple(
        # the batched path's A16 expert GEMMs: (activation type, scale type, zeros,
        # m16 tiles per aligned block, GEMM1 with the SiLU * up epilogue, persistent)
        KernelFamily(
            name=moe_gemm_family("bf16", persistent),
            source="moe_gemm.cu",
            template="w4kern::moe_gemm_a16_kernel",
            instances=tuple((cxx_type(a),) + args for a in _HALF_TYPES
                            for args in _moe_gemm_args(MOE_GEMM_A16_M_TILES, persistent)),
            max_dynamic_smem=moe_gemm_smem_bytes(max(MOE_GEMM_A16_M_TILES)),
            smem_carveout=MOE_GEMM_A16_CARVEOUT,
        )
        for persistent in (False, True)
    ) + tuple(
        # the batched path's A8 expert GEMMs: (scale type, zeros, m16 tiles per block,
        # GEMM1 with the SiLU * up epilogue, persistent)
        KernelFamily(
            name=moe_gemm_family("int8", persistent),
            source="moe_gemm.cu",
            template="w4kern::moe_gemm_a8_kernel",
            instances=_moe_gemm_args(MOE_GEMM_M_TILES, persistent),
            max_dynamic_smem=max(moe_gemm_a8_smem_bytes(m) for m in MOE_GEMM_M_TILES),
            smem_carveout=MOE_GEMM_A8_CARVEOUT,
        )
        for persistent in (False, True)
    ) + (
        KernelFamily(
            name="moe_silu_mul",
            source="moe_decode.cu",
            template="w4kern::moe_silu_mul_kernel",
            instances=tuple((cxx_type(t),) for t in _HALF_TYPES),
        ),
        KernelFamily(
            name="moe_combine",
            source="moe_decode.cu",
            template="w4kern::moe_combine_kernel",
            instances=tuple((cxx_type(t),) for t in CXX_TYPES),
        ),
    ) + (
        KernelFamily(
            name="membench",
            source="membench.cu",
            template="w4kern::read_bandwidth_kernel",
            instances=(("4",),),
        ),
    )
}
