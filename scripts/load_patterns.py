"""Pure weight-load patterns of the decode matvecs, timed on the GPU (no math).

Each kernel reads every byte of an [N, K/2] int4 weight matrix once with 16-byte
loads, keeps one step of loads in flight while it folds the previous one into a
word, and differs from the others only in which bytes a warp's load instruction
covers:

  a16   matvec_a16's walk (two 16-row tiles, two warps splitting K): one load
        instruction covers 8 rows x 64 bytes (4 lanes per row).
  diag  the same warps, registers and bytes per step, but one load instruction
        covers 512 contiguous bytes of one row (a lane per 16 bytes), 4 rows a step.
  dp4a  matvec_q8's M=1 walk (8 rows per warp, no split): 8 rows x 512 bytes a step.
  read  the membench stream (the read ceiling).

Usage (GPU): python scripts/load_patterns.py [OUT.json]
"""
from __future__ import annotations

import json
import sys

import cupy as cp
import numpy as np

SOURCE = r"""
typedef unsigned int u32;
struct __align__(16) V4 { u32 x, y, z, w; };
__device__ __forceinline__ V4 ld(const unsigned char* p) {
    V4 v;
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 fold(V4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// kPattern 0: a16 (8 rows x 64 B per instruction), 1: diag (1 row x 512 B per
// instruction, 4 rows per step), 2: dp4a-like (8 rows x 512 B per step, no split)
template <int kPattern>
__global__ void __launch_bounds__(256, 2) walk(const unsigned char* __restrict__ w, int n_rows, int row_bytes,
                                                 u32* __restrict__ sink) {
    constexpr int kLoads = kPattern == 2 ? 8 : 4;
    constexpr int kSplit = kPattern == 2 ? 1 : 2;
    constexpr int kRowsPerBlock = kPattern == 0 ? 32 : (kPattern == 1 ? 4 : 8);
    constexpr int kStepBytes = kPattern == 0 ? 64 : 512;
    constexpr int kBlocksPerSet = 8 / kSplit;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, part = warp % kSplit;
    const int n_blocks = (n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
    const int n_sets = (n_blocks + kBlocksPerSet - 1) / kBlocksPerSet;
    const int steps = (row_bytes + kStepBytes - 1) / kStepBytes;
    const int my_steps = (steps + kSplit - 1) / kSplit;
    auto addr = [&](int set, int step, int l) -> const unsigned char* {
        const int b = set * kBlocksPerSet + warp / kSplit;
        const int chunk = step * kSplit + part;
        int row, off;
        if (kPattern == 0) { row = b * 32 + (l >> 1) * 16 + g + 8 * (l & 1); off = chunk * 64 + t * 16; }
        else { row = b * kRowsPerBlock + l; off = chunk * 512 + lane * 16; }
        row = min(row, n_rows - 1);
        off = min(off, row_bytes - 16);
        return w + (size_t)row * row_bytes + off;
    };
    u32 acc = 0;
    int set = blockIdx.x, step = 0;
    if (set >= n_sets) return;
    V4 cur[kLoads], nxt[kLoads];
#pragma unroll
    for (int l = 0; l < kLoads; ++l) cur[l] = ld(addr(set, 0, l));
    while (true) {
        int ns = set, nst = step + 1;
        if (nst == my_steps) { ns = set + gridDim.x; nst = 0; }
        const bool more = ns < n_sets;
        if (more) {
#pragma unroll
            for (int l = 0; l < kLoads; ++l) nxt[l] = ld(addr(ns, nst, l));
        }
#pragma unroll
        for (int l = 0; l < kLoads; ++l) acc ^= fold(cur[l]);
        if (!more) break;
        set = ns; step = nst;
#pragma unroll
        for (int l = 0; l < kLoads; ++l) cur[l] = nxt[l];
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}

__global__ void __launch_bounds__(512) stream(const V4* __restrict__ d, long long n, u32* __restrict__ sink) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    u32 acc = 0;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        V4 v0 = d[i], v1 = d[i + stride], v2 = d[i + 2 * stride], v3 = d[i + 3 * stride];
        acc ^= fold(v0) ^ fold(v1) ^ fold(v2) ^ fold(v3);
    }
    for (; i < n; i += stride) acc ^= fold(d[i]);
    if (acc == 0x9E3779B9u) sink[0] = acc;
}
"""

SHAPES = [("llama3-8b.qkv", 6144, 4096), ("llama3-8b.gate_up", 28672, 4096), ("llama3-8b.down", 4096, 14336),
          ("gemma3-27b.gate_up", 43008, 5376), ("gemma3-27b.down", 5376, 21504)]


def main(out_path=None):
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    sms, l2 = props["multiProcessorCount"], props["l2CacheSize"]
    mod = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=["walk<0>", "walk<1>", "walk<2>", "stream"])
    kernels = {name: mod.get_function(f"walk<{i}>") for i, name in enumerate(("a16", "diag", "dp4a"))}
    stream = mod.get_function("stream")
    sink = cp.zeros(1, dtype=cp.uint32)
    rows = []
    for name, n, k in SHAPES:
        nbytes = n * k // 2
        copies = max(2, -(-4 * l2 // nbytes) + 1)
        bufs = [cp.random.randint(0, 255, size=nbytes, dtype=cp.uint8) for _ in range(copies)]
        res = {"shape": name, "N": n, "K": k, "bytes": nbytes}

        def time_us(launch):
            for i in range(3 * copies):
                launch(bufs[i % copies])
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            samples = []
            for _ in range(7):
                start.record()
                for i in range(20):
                    launch(bufs[i % copies])
                stop.record()
                stop.synchronize()
                samples.append(cp.cuda.get_elapsed_time(start, stop) * 1000 / 20)
            return float(np.median(samples))

        for pat, fn in kernels.items():
            res[pat] = time_us(lambda b, fn=fn: fn((2 * sms,), (256,), (b, np.int32(n), np.int32(k // 2), sink)))
        res["read"] = time_us(lambda b: stream((4 * sms,), (512,), (b, np.int64(nbytes // 16), sink)))
        res = {key: (round(v, 2) if isinstance(v, float) else v) for key, v in res.items()}
        print(json.dumps(res), flush=True)
        rows.append(res)
        del bufs
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"device": props["name"].decode(), "sms": sms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
