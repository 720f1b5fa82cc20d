"""Sweep the batched MoE expert GEMMs (moe_gemm.cu): stage count and shared-memory
carveout of the A8 and A16 kernels, the alignment block, (--persistent) one CTA
per (block, column tile) against the persistent CTAs of moe_walk_tiles, and
(--wide) 128-thread CTAs (128 weight rows per tile) against 256-thread ones and
(--ab=FILE) the A8 and A16 kernels of another moe_gemm.cu (FILE, e.g. an earlier
commit's) against this one's, (--blocks) the A8 kernel at each block size at T = 1024 and
4096, and (--tune) the A8 kernel's stages and launch bounds at fused_moe's block sizes, on
the Qwen3-30B-A3B and DeepSeek-V3 layers with random routing, for each alignment
block of 16, 32 and 64 rows.

Each variant is moe_gemm.cu with its constants rewritten, compiled through
w4kern's runtime from a copy of cuda_src/ (only the instances timed here), and
launched through w4kern.moe.launch_moe_gemm. GEMM1 and GEMM2 are timed apart
(graph replay, w4kern.bench.Timer); the rate printed is the touched experts'
INT4 bytes (codes, scales, zeros) over the time, and its share of the read
bandwidth measured in the same process. Each variant's outputs are compared
with the first variant's on the same inputs (the pipeline changes no arithmetic
order within a group, so they must agree to fp32 rounding).

    python3 scripts/sweep_moe_gemm.py [OUT.json] [--quick] [--persistent | --wide | --ab=FILE | --blocks | --tune]
"""
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import cupy as cp
import numpy as np

import w4kern
from w4kern import _runtime
from w4kern._registry import (FAMILIES, cxx_bool, cxx_type, moe_gemm_a8_smem_bytes, moe_gemm_family,
                              moe_gemm_smem_bytes)
from w4kern.bench import MOE_LAYERS, Timer, _expert_bytes, _random_int4_experts, measure_ceilings
from w4kern.moe import _token_q8_blocks, launch_moe_gemm, moe_align_block_size, moe_block_size

QUICK = "--quick" in sys.argv
OUT = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
PERSISTENT_AB = "--persistent" in sys.argv
WIDE_AB = "--wide" in sys.argv
BLOCKS = "--blocks" in sys.argv
TUNE = "--tune" in sys.argv
BASE_FILE = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--ab=")), None)
SMEM_LIMIT = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]

# (kernel, stages, shared-memory carveout in percent; None: the family's, persistent CTAs,
#  the CTA shape: A16 threads per CTA = weight rows per tile (moe_gemm.cu's kMoeGemmThreads), A8
#  warps along M per 1 / 2 / 4 m16 tiles (kMoeA8WarpsM; 128 weight rows a tile, 128 threads a warp
#  along M), the A8 launch bounds' CTAs per SM at 1 / 2 / 4 m16 tiles (kMoeA8MinCtas),
#  and optionally another moe_gemm.cu to compile instead of this tree's)
A16_THREADS = 128
A8_WARPS_M = (1, 1, 2)
A8_MIN_CTAS = (4, 4, 2)
# --ab: the A8 kernels before 2026-11-23's session 14 staged each K tile's Q8 block
# headers too (16 bytes a block, 2 blocks a K tile, padded by 16): a base file gets
# that much more shared memory (a little more than the oldest needs; no CTA fewer)
A8_HEADER_BYTES_PER_ROW = 48
A8 = ("a8", A8_WARPS_M, A8_MIN_CTAS)
A16 = ("a16", A16_THREADS, A8_MIN_CTAS)
VARIANTS = [(A8[0], 3, None, False) + A8[1:], (A8[0], 3, 100, False) + A8[1:], (A8[0], 4, None, False) + A8[1:],
            (A8[0], 5, None, False) + A8[1:], (A16[0], 3, None, False) + A16[1:], (A16[0], 3, 100, False) + A16[1:],
            (A16[0], 4, None, False) + A16[1:]]
if PERSISTENT_AB:
    VARIANTS = [(v[0], 3, None, p) + v[1:] for v in (A8, A16) for p in (False, True)]
if WIDE_AB:   # the A16 kernels with 128 and 256 threads per CTA (and weight rows per tile)
    VARIANTS = [("a16", 3, None, False, 128, A8_MIN_CTAS), ("a16", 3, None, False, 256, A8_MIN_CTAS)]
if BASE_FILE:   # against BASE_FILE's A8 and A16 kernels
    VARIANTS = [("a8", 3, None, False, None, None, BASE_FILE), ("a8", 3, None, False) + A8[1:],
                ("a16", 3, None, False, A16_THREADS, A8_MIN_CTAS, BASE_FILE), ("a16", 3, None, False) + A16[1:]]


def a8_cta(warps_m, base_file, m_tiles):
    """(threads, weight rows) of an A8 instance: 128 threads a warp along M (this
    tree's kMoeA8WarpsM, or a base file's; one warp before it existed), 128 rows.
    (Base files from 0454195 or f2710ce, whose kMoeA8Threads set rows = threads,
    are not handled.)"""
    i = (1, 2, 4).index(m_tiles)
    if base_file:
        found = re.search(r"kMoeA8WarpsM\[3\] = \{(\d+), (\d+), (\d+)\}", Path(base_file).read_text())
        warps_m = tuple(map(int, found.groups())) if found else (1, 1, 1)
    return 128 * warps_m[i], 128
if BLOCKS:   # and the 64-row instance with one warp along M (four m16 tiles a warp)
    VARIANTS = [("a8", 3, None, False) + A8[1:], ("a8", 3, None, False, (1, 1, 1), (4, 4, 1))]
if TUNE:   # more CTAs per SM at 16-row blocks (fewer registers), a fourth stage
    VARIANTS = [("a8", 3, None, False) + A8[1:], ("a8", 3, None, False, A8_WARPS_M, (5, 4, 2)),
                ("a8", 3, None, False, A8_WARPS_M, (6, 4, 2)), ("a8", 4, None, False) + A8[1:]]
VARIANTS = [v if len(v) == 7 else v + (None,) for v in VARIANTS]
if QUICK:
    VARIANTS = [v for v in VARIANTS if v[1] == 3 and v[2] is None]
TOKENS = {"qwen3-30b-a3b": (128, 1024, 4096),
          "deepseek-v3": (128, 1024, 4096) if PERSISTENT_AB or WIDE_AB or BASE_FILE or TUNE else (128, 1024)}
if BLOCKS:
    TOKENS = {"qwen3-30b-a3b": (1024, 2048, 4096), "deepseek-v3": (1024, 4096)}
M_TILES = (2, 4) if BLOCKS else (1, 2, 4)


@functools.cache
def variant_source(stages, threads, a8_min_ctas=A8_MIN_CTAS, base_file=None) -> str:
    """A copy of cuda_src/ with the variant's stage count, CTA size and A8 launch
    bounds in moe_gemm.cu (``base_file``: that moe_gemm.cu instead of the tree's)."""
    src = Path(tempfile.mkdtemp(prefix=f"w4kern-moe-s{stages}-"))
    shutil.copytree(_runtime.source_dir(), src, dirs_exist_ok=True)
    path = src / "moe_gemm.cu"
    if base_file:
        shutil.copy(base_file, path)
    text = path.read_text()
    rewrites = [(r"constexpr int kMoeStages = \d+;", f"constexpr int kMoeStages = {stages};")]
    if base_file:
        pass   # its own CTA shapes and launch bounds
    elif isinstance(threads, int):
        rewrites.append((r"constexpr int kMoeGemmThreads = \d+;", f"constexpr int kMoeGemmThreads = {threads};"))
    else:
        rewrites += [(r"constexpr int kMoeA8WarpsM\[3\] = \{[0-9, ]+\};",
                      "constexpr int kMoeA8WarpsM[3] = {%d, %d, %d};" % threads),
                     (r"constexpr int kMoeA8MinCtas\[3\] = \{[0-9, ]+\};",
                      "constexpr int kMoeA8MinCtas[3] = {%d, %d, %d};" % a8_min_ctas)]
    for pattern, value in rewrites:
        text, n = re.subn(pattern, value, text)
        assert n == 1, pattern
    path.write_text(text)
    return str(src)


@functools.cache
def variant_kernels(kind, src, instances, persistent=False):
    """RawKernels of the given instances of moe_gemm_<kind>[_persistent], compiled from ``src``."""
    family = dataclasses.replace(FAMILIES[moe_gemm_family("int8" if kind == "a8" else "bf16", persistent)],
                                 instances=tuple(instances), max_dynamic_smem=0)
    old = os.environ.get("W4KERN_CUDA_SRC")
    os.environ["W4KERN_CUDA_SRC"] = src
    try:
        compiled = _runtime.build(family, _runtime.device_arch(cp.cuda.Device()))
    finally:
        if old is None:
            del os.environ["W4KERN_CUDA_SRC"]
        else:
            os.environ["W4KERN_CUDA_SRC"] = old
    module = cp.RawModule(path=str(compiled.cubin_path))
    regs = {}
    kernels = {}
    for inst in instances:
        name = family.name_expression(inst)
        kernels[inst] = module.get_function(compiled.lowered_names[name])
        regs[inst] = compiled.resources[name].registers if name in compiled.resources else None
    return kernels, regs


def main():
    timer = Timer()
    ceilings = measure_ceilings(timer)
    print(f"read bandwidth {ceilings.read_gbps:.0f} GB/s; smem opt-in limit {SMEM_LIMIT}", flush=True)
    rng = cp.random.default_rng(3)
    rows = []
    for model, (experts, k, hidden, inter) in MOE_LAYERS.items():
        w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
        w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
        for t in TOKENS[model][: 2 if QUICK else None]:
            ids = cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
            touched = len(np.unique(cp.asnumpy(ids)))
            items = t * k
            x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
            x_q8 = _token_q8_blocks(cp, x)
            inter_f = (rng.standard_normal((items, inter), dtype=np.float32) * 0.1)
            inter_q8 = _token_q8_blocks(cp, inter_f)
            inter_bf = inter_f.astype(w4kern.bfloat16)
            baseline = {}
            for m_tiles in M_TILES:
                aligned = moe_align_block_size(ids, experts, 16 * m_tiles)
                for kind, stages, carveout, persistent, threads, min_ctas, base_file in VARIANTS:
                    fam = FAMILIES[f"moe_gemm_{kind}"]
                    carveout = fam.smem_carveout if carveout is None else carveout
                    name = f"{kind}-s{stages}-c{carveout}" + ("-persistent" if persistent else "")
                    if kind == "a8" and (threads, min_ctas) != (A8_WARPS_M, A8_MIN_CTAS) and not base_file:
                        name += "-w" + "".join(map(str, threads)) + "-b" + "".join(map(str, min_ctas))
                    elif kind == "a16" and threads != A16_THREADS:
                        name += f"-t{threads}"
                    if base_file:
                        name += "-base"
                    cta, bn = (threads, threads) if kind == "a16" else a8_cta(threads, base_file, m_tiles)
                    activation = "int8" if kind == "a8" else "bf16"
                    if (PERSISTENT_AB or WIDE_AB or BASE_FILE or TUNE) and m_tiles != moe_block_size(items, experts, activation) // 16:
                        continue   # the A/B at fused_moe's own block size
                    if kind == "a16" and m_tiles == 2:
                        continue   # no 2-tile A16 instances
                    smem = (moe_gemm_a8_smem_bytes(m_tiles, stages, cta, bn) if kind == "a8"
                            else moe_gemm_smem_bytes(m_tiles, stages, bn))
                    if base_file and kind == "a8":   # earlier A8 kernels also staged the blocks' 16-byte headers
                        smem += stages * 16 * m_tiles * A8_HEADER_BYTES_PER_ROW
                    if smem > SMEM_LIMIT:
                        continue
                    src = variant_source(stages, threads, min_ctas, base_file)
                    base = (cxx_type(w13.scales.dtype), cxx_bool(True), str(m_tiles))
                    pre = () if kind == "a8" else (cxx_type(w4kern.bfloat16),)
                    insts = tuple(pre + base + (cxx_bool(s), cxx_bool(persistent)) for s in (True, False))
                    kernels, regs = variant_kernels(kind, src, insts, persistent)
                    for kern in kernels.values():
                        kern.max_dynamic_shared_size_bytes = smem
                        kern.preferred_shared_memory_carveout = carveout
                    for gemm, w, silu, act_div in (("gate_up", w13, True, k), ("down", w2, False, 1)):
                        inst = pre + base + (cxx_bool(silu), cxx_bool(persistent))
                        a = (x_q8 if silu else inter_q8) if kind == "a8" else (x if silu else inter_bf)
                        n_out = inter if silu else hidden
                        f32_out = kind == "a8" or not silu
                        dst = cp.empty((items, n_out), dtype=np.float32 if f32_out else w4kern.bfloat16)
                        dst.view(np.uint32 if f32_out else np.uint16).fill(0x7FC00000 if f32_out else 0x7FC0)  # NaN

                        def fn(i, kern=kernels[inst], w=w, a=a, dst=dst, silu=silu, act_div=act_div, p=persistent,
                               cta=cta, bn=bn):
                            launch_moe_gemm(kern, smem, w, a, dst, silu, act_div, aligned, items, persistent=p,
                                            threads=cta, bn=bn)

                        fn(0)
                        got = dst if f32_out else (dst.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                        key = (kind, gemm)
                        if key not in baseline:
                            baseline[key] = got
                            err = 0.0
                        else:
                            ref = baseline[key]
                            err = float(cp.abs(got - ref).max() / cp.abs(ref).max())
                        finite = bool(cp.isfinite(got).all())
                        us = timer.graph(fn)
                        nbytes = touched * _expert_bytes(w)
                        gbps = nbytes / us / 1e3
                        row = dict(model=model, T=t, gemm=gemm, variant=name, kind=kind, stages=stages, carveout=carveout,
                                   persistent=persistent, threads=cta,
                                   m_tiles=m_tiles, regs=regs[inst], smem=smem, us=round(us, 1),
                                   gbps=round(gbps), eff=round(gbps / ceilings.read_gbps, 3),
                                   rel_err_vs_first=err, finite=finite)
                        rows.append(row)
                        print(row, flush=True)
            del x, x_q8, inter_q8, inter_bf, inter_f
            cp.get_default_memory_pool().free_all_blocks()
        del w13, w2
        cp.get_default_memory_pool().free_all_blocks()
    if OUT:
        Path(OUT).write_text(json.dumps({"read_gbps": ceilings.read_gbps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
