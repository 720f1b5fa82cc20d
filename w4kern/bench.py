"""The one benchmark harness (``python -m w4kern bench``), per BENCHMARKS.md.

- Device events around the timed region, warm-up first, the median of
  ``repeats`` repeats of ``launches`` launches each.
- Inputs rotated through enough copies to exceed 4x the L2 cache, so weights
  come from DRAM, not L2.
- Two modes: plain launches, and CUDA-graph replay (``launches`` launches
  captured once, the graph replayed), since deployments run decode in graphs.
- The floor beside every row: bytes that must move / measured DRAM read
  bandwidth (measured here at start by ``cuda_src/membench.cu``).
- Peers from torch, in the same process on the same data, when torch imports.
- One JSON file per run: GPU, versions, commit, ceilings, and rows.

Each suite is a function returning rows; ``SUITES`` lists them.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__


@dataclasses.dataclass
class Row:
    op: str
    shape: dict
    system: str
    mode: str                 # "plain" or "graph"
    time_us: float
    bytes_moved: int
    floor_us: float

    @property
    def efficiency(self) -> float:
        return self.floor_us / self.time_us if self.time_us > 0 else float("nan")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["efficiency"] = round(self.efficiency, 4)
        d["achieved_gbps"] = round(self.bytes_moved / self.time_us / 1e3, 1)
        d["time_us"] = round(self.time_us, 3)
        d["floor_us"] = round(self.floor_us, 3)
        return d


class Timer:
    """Times a callable on the current CuPy stream, plain or under graph replay.

    Before each timed repeat (outside the events) it overwrites a buffer of
    twice the L2 size, so a repeat starts with a cold L2; within a repeat,
    callers rotate inputs (``fn(i)`` uses copy ``i % copies``) so that no
    launch finds its weights in L2 from an earlier launch either.
    """

    def __init__(self, warmup: int = 3, repeats: int = 7, launches: int = 20):
        import cupy

        self.cp = cupy
        self.warmup, self.repeats, self.launches = warmup, repeats, launches
        l2 = cupy.cuda.Device().attributes["L2CacheSize"]
        self._scrub = cupy.empty(2 * l2, dtype=np.uint8)

    def _median_us(self, run_once: Callable[[], None], per: int) -> float:
        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(self.repeats):
            self._scrub.fill(0)
            start.record()
            run_once()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / per)
        return statistics.median(times)

    def plain(self, fn: Callable[[int], None]) -> float:
        """fn(i) launches call i (i selects the rotated input copy). Microseconds per call."""
        for i in range(self.warmup):
            fn(i)
        self.cp.cuda.Stream.null.synchronize()

        def run_once():
            for i in range(self.launches):
                fn(i)

        return self._median_us(run_once, self.launches)

    def graph(self, fn: Callable[[int], None]) -> float:
        """Capture ``launches`` calls into one CUDA graph, time its replays."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            # compile, load and size any per-stream workspace outside the capture
            for i in range(self.launches):
                fn(i)
            stream.synchronize()
            stream.begin_capture()
            for i in range(self.launches):
                fn(i)
            graph = stream.end_capture()
            for _ in range(self.warmup):
                graph.launch(stream)
            stream.synchronize()
            return self._median_us(lambda: graph.launch(stream), self.launches)


class TorchTimer(Timer):
    """The same timing for torch callables (torch events and torch.cuda.CUDAGraph)."""

    def __init__(self, torch, **kw):
        super().__init__(**kw)
        self.torch = torch

    def _median_us(self, run_once, per):
        torch = self.torch
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.repeats):
            self._scrub.fill(0)
            self.cp.cuda.get_current_stream().synchronize()
            start.record()
            run_once()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3 / per)
        return statistics.median(times)

    def plain(self, fn):
        for i in range(self.warmup):
            fn(i)
        self.torch.cuda.synchronize()

        def run_once():
            for i in range(self.launches):
                fn(i)

        return self._median_us(run_once, self.launches)

    def graph(self, fn):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(self.warmup):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(self.launches):
                fn(i)
        g.replay()
        torch.cuda.synchronize()
        return self._median_us(g.replay, self.launches)


@dataclasses.dataclass
class Ceilings:
    read_gbps: float
    copy_gbps: float          # bytes read + bytes written per second (device-to-device copy)
    l2_bytes: int


def membench_read(buffers) -> Callable[[int], None]:
    """fn(i) streaming buffers[i % len(buffers)] (uint32 arrays of the same size, a
    multiple of 16 bytes) through the membench kernel: the read the ceilings and the
    read-ceiling rows time."""
    import cupy as cp

    from . import _runtime

    kernel = _runtime.get_kernel("membench", ("4",))
    grid = cp.cuda.Device().attributes["MultiProcessorCount"] * 4
    sink = cp.zeros(1, dtype=np.uint32)
    n_vec = np.int64(buffers[0].nbytes // 16)
    return lambda i: kernel((grid,), (512,), (buffers[i % len(buffers)], n_vec, sink))


def measure_ceilings(timer: Timer) -> Ceilings:
    """Read bandwidth (membench kernel over 2 GiB) and copy bandwidth (1 GiB D2D copy)."""
    import cupy as cp

    attrs = cp.cuda.Device().attributes
    n_bytes = 2 << 30
    data = cp.empty(n_bytes // 4, dtype=np.uint32)
    data[...] = 1
    read_us = timer.plain(membench_read([data]))
    src = data[: data.size // 2]
    dst = cp.empty_like(src)
    copy_us = timer.plain(lambda i: cp.copyto(dst, src))
    return Ceilings(
        read_gbps=n_bytes / read_us / 1e3,
        copy_gbps=2 * src.nbytes / copy_us / 1e3,
        l2_bytes=int(attrs["L2CacheSize"]),
    )


def rotation_count(bytes_per_copy: int, l2_bytes: int, launches: int) -> int:
    """Copies to rotate through: enough to touch more than 4x the L2, but never more
    than one per launch of a repeat (the L2 scrub before each repeat covers the rest)."""
    return max(1, min(math.ceil(4 * l2_bytes / max(bytes_per_copy, 1)) + 1, launches))


def _torch_and_timer(timer):
    """torch (None when it is missing or sees no GPU) and a TorchTimer timing like ``timer``."""
    torch = _try_torch()
    if torch is None:
        return None, None
    return torch, TorchTimer(torch, warmup=timer.warmup, repeats=timer.repeats, launches=timer.launches)


def _try_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _measure(timer, system, op, shape, fn, bytes_moved, ceilings, modes) -> list[Row]:
    floor = bytes_moved / ceilings.read_gbps / 1e3
    rows = []
    for mode in modes:
        t = timer.plain(fn) if mode == "plain" else timer.graph(fn)
        rows.append(Row(op, shape, system, mode, t, bytes_moved, floor))
    return rows


# --- suites -----------------------------------------------------------------

DENSE_SHAPES = {  # (N, K) = (out_features, in_features), BENCHMARKS.md
    "llama3-8b.qkv": (6144, 4096),
    "llama3-8b.gate_up": (28672, 4096),
    "llama3-8b.down": (4096, 14336),
    "gemma3-27b.gate_up": (43008, 5376),
    "gemma3-27b.down": (5376, 21504),
}


def suite_foundation(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """quantize_q8 and dequantize_int4, with naive torch peers."""
    import cupy as cp

    import w4kern

    torch, ttimer = _torch_and_timer(timer)
    modes = ("plain", "graph")
    rows: list[Row] = []
    rng = cp.random.default_rng(0)

    q8_shapes = [(1, 4096), (16, 4096), (4096, 8192)] if quick else \
        [(1, 4096), (1, 14336), (16, 4096), (1024, 4096), (4096, 8192)]
    for m, k in q8_shapes:
        x_bytes = m * k * 2
        copies = rotation_count(x_bytes, ceilings.l2_bytes, timer.launches)
        xs = [rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
        outs = [cp.empty((m, k // 32, 48), dtype=np.uint8) for _ in range(copies)]
        moved = x_bytes + m * (k // 32) * 48
        shape = {"M": m, "K": k, "dtype": "bfloat16"}
        rows += _measure(timer, "w4kern", "quantize_q8", shape,
                         lambda i: w4kern.quantize_q8(xs[i % copies], out=outs[i % copies]),
                         moved, ceilings, modes)
        if torch is not None:
            txs = [torch.from_dlpack(x) for x in xs]

            def torch_q8(i):   # the same math as separate torch ops (no 48-byte packing)
                xb = txs[i % copies].view(m, k // 32, 32).float()
                d = xb.abs().amax(-1, keepdim=True) / 127
                q = torch.round(xb / torch.where(d == 0, torch.ones_like(d), d)).to(torch.int8)
                return q, d
            rows += _measure(ttimer, "torch-ops", "quantize_q8", shape, torch_q8, moved, ceilings, modes)
        del xs, outs

    shapes = list(DENSE_SHAPES.items())[:2] if quick else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
        base = w4kern.quantize_int4(w, group_size=128, symmetric=True)
        del w
        copies = rotation_count(base.nbytes, ceilings.l2_bytes, timer.launches)
        weights = [base] + [w4kern.Int4Weight(base.qweight.copy(), base.scales.copy(), None, 128)
                            for _ in range(copies - 1)]
        out = cp.empty((n, k), dtype=w4kern.bfloat16)
        moved = base.nbytes + out.nbytes
        shape = {"name": name, "N": n, "K": k, "group_size": 128, "out": "bfloat16"}
        rows += _measure(timer, "w4kern", "dequantize_int4", shape,
                         lambda i: w4kern.dequantize_int4(weights[i % copies], out=out),
                         moved, ceilings, modes)
        if torch is not None:
            tq = [torch.from_dlpack(wt.qweight) for wt in weights]
            ts = [torch.from_dlpack(wt.scales) for wt in weights]
            tout = torch.from_dlpack(out)

            def torch_dequant(i):
                qw = tq[i % copies]
                q = torch.stack([qw & 15, qw >> 4], -1).view(n, k // 128, 128).float()
                tout.copy_(((q - 8) * ts[i % copies].float()[..., None]).view(n, k))
            rows += _measure(ttimer, "torch-ops", "dequantize_int4", shape, torch_dequant,
                             moved, ceilings, modes)
        del weights, out
    return rows


def suite_q8_tuning(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """quantize_q8 per kernel instance (chunks of 8 values per thread): the data behind
    ``w4kern.quant.Q8_CHUNKS_PER_THREAD``."""
    import cupy as cp

    import w4kern
    from w4kern._registry import Q8_CHUNKS_PER_THREAD
    from w4kern.quant import _quantize_q8_cuda

    rng = cp.random.default_rng(1)
    rows: list[Row] = []
    for m, k in [(1, 4096), (16, 4096), (1024, 4096), (4096, 8192)]:
        x_bytes = m * k * 2
        copies = rotation_count(x_bytes, ceilings.l2_bytes, timer.launches)
        xs = [rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
        outs = [cp.empty((m, k // 32, 48), dtype=np.uint8) for _ in range(copies)]
        moved = x_bytes + m * (k // 32) * 48
        for chunks in Q8_CHUNKS_PER_THREAD + (0,):
            rows += _measure(timer, f"w4kern-c{chunks}", "quantize_q8", {"M": m, "K": k, "dtype": "bfloat16"},
                             lambda i, c=chunks: _quantize_q8_cuda(xs[i % copies], outs[i % copies], c),
                             moved, ceilings, ("plain", "graph"))
    return rows


def _int4_copies(base, copies):
    import w4kern

    return [base] + [w4kern.Int4Weight(base.qweight.copy(), base.scales.copy(),
                                       None if base.zeros is None else base.zeros.copy(), base.group_size)
                     for _ in range(copies - 1)]


def _decode_weights(rng, n, k, ceilings, timer):
    """A random bf16 weight [n, k] and its INT4 (g128, asymmetric) and INT8 (per-channel)
    forms, each copied often enough to rotate past 4x the L2."""
    import w4kern

    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16)
    w4 = w4kern.quantize_int4(w, group_size=128, symmetric=False)
    w8 = w4kern.quantize_int8(w)
    copies4 = rotation_count(w4.nbytes, ceilings.l2_bytes, timer.launches)
    copies8 = rotation_count(w8.nbytes, ceilings.l2_bytes, timer.launches)
    weights8 = [w8] + [w4kern.Int8Weight(w8.qweight.copy(), w8.scales.copy(), -1) for _ in range(copies8 - 1)]
    return w, _int4_copies(w4, copies4), weights8


def _linear_bytes(weight, m, k, n, act):
    act_bytes = {"q8": m * (k // 32) * 48, "int8": m * k + 4 * m}.get(act, m * k * 2)
    return weight.nbytes + act_bytes + m * n * 2


DECODE_MS = (1, 2, 3, 4, 8)


def suite_decode(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """w4kern.linear (W4A8 on Q8 blocks and on per-token INT8, W4A16, W8A8, and the
    tensor-core paths on prepared Int4TiledWeights) at M = 1..8 on the dense shapes,
    beside
    tinygemm (torch._weight_int4pack_mm, group 128) and cuBLAS bf16, plus the
    activation quantizer alone (its share of a decode step)."""
    import cupy as cp

    import w4kern

    torch, ttimer = _torch_and_timer(timer)
    modes = ("plain", "graph")
    rng = cp.random.default_rng(2)
    rows: list[Row] = []
    shapes = list(DENSE_SHAPES.items())[:2] if quick else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        w, weights, weights8 = _decode_weights(rng, n, k, ceilings, timer)
        base, copies, w8_base, copies8 = weights[0], len(weights), weights8[0], len(weights8)
        tiled = [w4kern.prepare(wt) for wt in weights]   # w4kern.prepare(for_op="linear")
        rows += _read_ceiling(timer, ceilings, modes, {"name": name, "N": n, "K": k, "M": 1, "group_size": 128},
                              _linear_bytes(base, 1, k, n, "q8"), copies)
        for m in DECODE_MS:
            x = (rng.standard_normal((m, k), dtype=np.float32)).astype(w4kern.bfloat16)
            out = cp.empty((m, n), dtype=w4kern.bfloat16)
            shape = {"name": name, "N": n, "K": k, "M": m, "group_size": 128}
            xq = w4kern.quantize_q8(x)
            rows += _measure(timer, "w4kern-w4a8-preq", "linear", shape,
                             lambda i: w4kern.linear(xq, weights[i % copies], out=out),
                             _linear_bytes(base, m, k, n, "q8"), ceilings, modes)
            xi = w4kern.quantize_per_token_int8(x)
            rows += _measure(timer, "w4kern-w4a8-int8-preq", "linear", shape,
                             lambda i: w4kern.linear(xi, weights[i % copies], act="int8", out=out),
                             _linear_bytes(base, m, k, n, "int8"), ceilings, modes)
            system = {"q8": "w4kern-w4a8", "bf16": "w4kern-w4a16", "int8": "w4kern-w4a8-int8"}
            for act in ("q8", "bf16", "int8"):
                rows += _measure(timer, system[act], "linear", shape,
                                 lambda i, a=act: w4kern.linear(x, weights[i % copies], act=a, out=out),
                                 _linear_bytes(base, m, k, n, act), ceilings, modes)
            rows += _measure(timer, "w4kern-w4a8-int8-preq-tiled", "linear", shape,   # no quantizer in the time
                             lambda i: w4kern.linear(xi, tiled[i % copies], act="int8", out=out),
                             _linear_bytes(tiled[0], m, k, n, "int8"), ceilings, modes)
            for act in ("bf16", "int8"):
                rows += _measure(timer, system[act] + "-tiled", "linear", shape,
                                 lambda i, a=act: w4kern.linear(x, tiled[i % copies], act=a, out=out),
                                 _linear_bytes(tiled[0], m, k, n, act), ceilings, modes)
            if m in (1, 8):
                rows += _measure(timer, "w4kern-w8a8-preq", "linear", {**shape, "group_size": -1},
                                 lambda i: w4kern.linear(xq, weights8[i % copies8], out=out),
                                 _linear_bytes(w8_base, m, k, n, "q8"), ceilings, modes)
                q8_out = cp.empty((m, k // 32, 48), dtype=np.uint8)
                rows += _measure(timer, "w4kern", "quantize_q8", {"name": name, "M": m, "K": k},
                                 lambda i: w4kern.quantize_q8(x, out=q8_out),
                                 x.nbytes + q8_out.nbytes, ceilings, modes)
            if torch is not None:
                rows += _torch_decode_peers(torch, ttimer, ceilings, modes, shape, x, w, weights, copies)
        del w, base, weights, w8_base, weights8, tiled
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def _read_ceiling(timer, ceilings, modes, shape, n_bytes, copies) -> list[Row]:
    """The read ceiling at one size: the membench kernel (the one that measures the
    read bandwidth) streaming n_bytes, rotated over as many copies as the op's
    weights. Launch, ramp-up and tail included, it is what any kernel reading those
    bytes once reaches in this harness (system "read-ceiling")."""
    import cupy as cp

    words = -(-n_bytes // 16) * 4
    buffers = [cp.ones(words, dtype=np.uint32) for _ in range(copies)]
    return _measure(timer, "read-ceiling", "linear", shape, membench_read(buffers), n_bytes, ceilings, modes)


def _torch_decode_peers(torch, ttimer, ceilings, modes, shape, x, w, weights, copies) -> list[Row]:
    """tinygemm on the same int4 codes (nibbles reordered to its convention) and cuBLAS bf16."""
    rows: list[Row] = []
    n, k, m = shape["N"], shape["K"], shape["M"]
    tx = torch.from_dlpack(x)
    tout = torch.empty((m, n), dtype=torch.bfloat16, device=tx.device)
    key = ("tinygemm", n, k)
    packed = _torch_decode_peers.cache.get(key)
    if packed is None:
        packed = []
        try:
            for wt in weights:
                q = torch.from_dlpack(wt.qweight)
                swapped = ((q & 15) << 4) | (q >> 4)          # tinygemm: even k in the high nibble
                tq = torch._convert_weight_to_int4pack(swapped.contiguous(), 8)
                s = torch.from_dlpack(wt.scales).to(torch.bfloat16)
                z = torch.from_dlpack(wt.zeros).to(torch.bfloat16)
                sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()   # [K/128, N, 2]
                packed.append((tq, sz))
        except (RuntimeError, TypeError) as e:
            print(f"tinygemm unavailable: {e}")
            packed = []
        _torch_decode_peers.cache.clear()
        _torch_decode_peers.cache[key] = packed
    if packed:
        tiny_bytes = weights[0].qweight.nbytes + packed[0][1].numel() * 2 + x.nbytes + m * n * 2
        rows += _measure(ttimer, "tinygemm", "linear", shape,
                         lambda i: torch._weight_int4pack_mm(tx, packed[i % len(packed)][0], 128,
                                                             packed[i % len(packed)][1]),
                         tiny_bytes, ceilings, modes)
    key = ("cublas", n, k)
    dense = _torch_decode_peers.dense.get(key)
    if dense is None:
        tw = torch.from_dlpack(w)
        dcopies = rotation_count(tw.numel() * 2, ceilings.l2_bytes, ttimer.launches)
        dense = [tw] + [tw.clone() for _ in range(dcopies - 1)]
        _torch_decode_peers.dense.clear()
        _torch_decode_peers.dense[key] = dense
    rows += _measure(ttimer, "cublas-bf16", "linear", shape,
                     lambda i: torch.mm(tx, dense[i % len(dense)].t(), out=tout),
                     n * k * 2 + x.nbytes + m * n * 2, ceilings, modes)
    return rows


_torch_decode_peers.cache = {}
_torch_decode_peers.dense = {}


def suite_linear_tuning(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """The data behind ``w4kern.linear.DISPATCH``: dp4a matvec (every instance at M = 1)
    vs the tensor-core small-M kernel per M, for W4A16 the small-M kernel vs every
    matvec_a16 instance (and its row-run walk at M = 1: ``A16_ROWS_MIN_K``), and for
    per-token INT8 every s8 instance of matvec_a16 (its dp4a route is the linear_q8
    matvec rows: the same kernel on row-scaled Q8 blocks)."""
    import cupy as cp

    import w4kern
    from w4kern._registry import A16_CONFIGS, A16_ROW_CONFIGS, MATVEC_CONFIGS
    from w4kern.linear import _linear

    rng = cp.random.default_rng(3)
    rows: list[Row] = []
    shapes = list(DENSE_SHAPES.items())[:2] if quick else list(DENSE_SHAPES.items())
    for name, (n, k) in shapes:
        w, weights, weights8 = _decode_weights(rng, n, k, ceilings, timer)
        del w
        base, copies, w8, copies8 = weights[0], len(weights), weights8[0], len(weights8)
        for m in (1, 2, 3, 4, 8):
            x = rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16)
            out = cp.empty((m, n), dtype=w4kern.bfloat16)
            shape = {"name": name, "N": n, "K": k, "M": m}
            xq = w4kern.quantize_q8(x)     # the kernels alone, on pre-quantized activations
            configs = [c for c in MATVEC_CONFIGS if c[0] >= m] if m == 1 else [None]
            for config in configs:
                label = "matvec" if config is None else "matvec-m{}-r{}-u{}-s{}".format(*config)
                rows += _measure(timer, label, "linear_q8", shape,
                                 lambda i, c=config: _linear(xq, weights[i % copies], kernel="matvec", out=out,
                                                             matvec_config=c),
                                 _linear_bytes(base, m, k, n, "q8"), ceilings, ("graph",))
                if m == 1:
                    rows += _measure(timer, label, "linear_w8a8", {**shape, "group_size": -1},
                                     lambda i, c=config: _linear(xq, weights8[i % copies8], kernel="matvec",
                                                                 out=out, matvec_config=c),
                                     _linear_bytes(w8, m, k, n, "q8"), ceilings, ("graph",))
            for act in ("q8", "bf16"):
                rows += _measure(timer, "small_m-c3", f"linear_{act}", shape,
                                 lambda i, a=act: _linear(xq if a == "q8" else x, weights[i % copies], act=a,
                                                          kernel="small_m", out=out, ctas_per_sm=3),
                                 _linear_bytes(base, m, k, n, act), ceilings, ("graph",))
            xi = w4kern.quantize_per_token_int8(x)
            # matvec_a16 on tensor cores without shared memory: W4A16 and per-token W4A8
            for act, kernel, xa in (("bf16", "a16", x), ("int8", "a8", xi)):
                for config in A16_CONFIGS:
                    rows += _measure(timer, "{}-t{}-s{}".format(kernel, *config), f"linear_{act}", shape,
                                     lambda i, c=config, a=act, kn=kernel, xx=xa:
                                     _linear(xx, weights[i % copies], act=a, kernel=kn, out=out, matvec_config=c),
                                     _linear_bytes(base, m, k, n, act), ceilings, ("graph",))
            if m == 1:   # the one-token row-run walk of matvec_a16
                for config in A16_ROW_CONFIGS:
                    rows += _measure(timer, "a16_rows-t{}-s{}".format(*config), "linear_bf16", shape,
                                     lambda i, c=config: _linear(x, weights[i % copies], act="bf16",
                                                                 kernel="a16_rows", out=out, matvec_config=c),
                                     _linear_bytes(base, m, k, n, "bf16"), ceilings, ("graph",))
        del base, weights, w8, weights8
        cp.get_default_memory_pool().free_all_blocks()
    return rows


ATTENTION_CONFIGS = {"32/8/128": (32, 8, 128), "32/16/256": (32, 16, 256), "64/8/128": (64, 8, 128)}
ATTENTION_BATCHES = (1, 8, 64)
ATTENTION_LENGTHS = (256, 2048, 8192, 32768, 131072)
#: largest K + V cache a row allocates (larger (B, L) pairs are left out)
ATTENTION_MAX_CACHE_BYTES = 8 << 30


def suite_attention(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """decode_attention (contiguous caches, every sequence at length L) beside torch SDPA
    (flash backend, enable_gqa=True) on the same tensors, plus the paged layout at
    page_size 64; caches rotated past 4x L2. Floor: K and V bytes / read bandwidth."""
    import cupy as cp

    import w4kern

    torch, ttimer = _torch_and_timer(timer)
    modes = ("plain", "graph")
    rng = cp.random.default_rng(4)
    rows: list[Row] = []
    configs = list(ATTENTION_CONFIGS.items())[:1] if quick else list(ATTENTION_CONFIGS.items())
    for name, (hq, hkv, d) in configs:
        for b in ((1,) if quick else ATTENTION_BATCHES):
            for length in ((2048, 32768) if quick else ATTENTION_LENGTHS):
                cache_bytes = 2 * b * hkv * length * d * 2
                if cache_bytes > ATTENTION_MAX_CACHE_BYTES:
                    continue
                copies = rotation_count(cache_bytes, ceilings.l2_bytes, timer.launches)
                copies = max(1, min(copies, ATTENTION_MAX_CACHE_BYTES // cache_bytes))
                shape = {"name": name, "B": b, "L": length}
                q = rng.standard_normal((b, hq, d), dtype=np.float32).astype(w4kern.bfloat16)
                ks = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16)
                      for _ in range(copies)]
                vs = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16)
                      for _ in range(copies)]
                lens = cp.full(b, length, dtype=np.int32)
                out = cp.empty((b, hq, d), dtype=w4kern.bfloat16)
                rows += _measure(timer, "w4kern", "decode_attention", shape,
                                 lambda i: w4kern.decode_attention(q, ks[i % copies], vs[i % copies], lens, out=out),
                                 cache_bytes, ceilings, modes)
                if length == 8192 and b == 8:
                    page = 64
                    pages = b * length // page
                    kp = [k.reshape(b, hkv, pages // b, page, d).transpose(0, 2, 3, 1, 4).reshape(pages, page, hkv, d)
                          .copy() for k in ks]
                    vp = [v.reshape(b, hkv, pages // b, page, d).transpose(0, 2, 3, 1, 4).reshape(pages, page, hkv, d)
                          .copy() for v in vs]
                    table = cp.arange(pages, dtype=np.int32).reshape(b, pages // b)
                    rows += _measure(timer, "w4kern-paged64", "decode_attention", shape,
                                     lambda i: w4kern.decode_attention(q, kp[i % copies], vp[i % copies], lens,
                                                                       block_table=table, out=out),
                                     cache_bytes, ceilings, modes)
                    del kp, vp
                if torch is not None:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    tq = torch.from_dlpack(q).unsqueeze(2)
                    tks = [torch.from_dlpack(k) for k in ks]
                    tvs = [torch.from_dlpack(v) for v in vs]

                    def sdpa(i):
                        return torch.nn.functional.scaled_dot_product_attention(
                            tq, tks[i % copies], tvs[i % copies], enable_gqa=True)

                    try:
                        # the backend is chosen once, outside the timed calls (its context
                        # manager would add host time to torch's plain-launch rows)
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            rows += _measure(ttimer, "torch-sdpa-flash", "decode_attention", shape, sdpa,
                                             cache_bytes, ceilings, modes)
                    except RuntimeError as e:   # no flash kernel for this shape in this torch
                        print(f"torch SDPA flash unavailable for {shape}: {str(e).splitlines()[0]}")
                    del tks, tvs
                del ks, vs
                cp.get_default_memory_pool().free_all_blocks()
    return rows


#: MoE routing shapes: (experts, experts per token)
MOE_MODELS = {"qwen3-30b-a3b": (128, 8), "deepseek-v3": (256, 8)}
MOE_TOKENS = (1, 16, 128, 1024, 4096)
MOE_BLOCK_SIZE = 64


def suite_moe_align(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """moe_align_block_size on uniformly random top-k ids, beside torch's sort-based
    grouping (stable sort of the flat ids, bincount, cumsum: the first step of the
    grouped_mm pipeline, doing less than the padded layout). Floor: ids read plus the
    padded outputs written, over read bandwidth (the op is latency-bound at small T)."""
    import cupy as cp

    import w4kern

    torch, ttimer = _torch_and_timer(timer)
    modes = ("plain", "graph")
    rng = cp.random.default_rng(5)
    rows: list[Row] = []
    for name, (experts, k) in list(MOE_MODELS.items())[: 1 if quick else None]:
        for t in ((1, 1024) if quick else MOE_TOKENS):
            ids = cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
            max_padded = t * k + experts * (MOE_BLOCK_SIZE - 1)
            nbytes = 4 * (t * k + max_padded + max_padded // MOE_BLOCK_SIZE + 1)
            shape = {"name": name, "T": t, "E": experts, "k": k, "block_size": MOE_BLOCK_SIZE}
            rows += _measure(timer, "w4kern", "moe_align_block_size", shape,
                             lambda i: w4kern.moe_align_block_size(ids, experts, MOE_BLOCK_SIZE), nbytes,
                             ceilings, modes)
            if torch is not None:
                flat = torch.from_dlpack(ids).flatten().long()
                ones = torch.ones_like(flat)

                def torch_group(i):
                    # bincount would read its maximum on the host: not graph-capturable
                    order = torch.sort(flat, stable=True).indices
                    counts = torch.zeros(experts, dtype=flat.dtype, device=flat.device).index_add_(0, flat, ones)
                    return order, torch.cumsum(counts, 0)

                try:
                    rows += _measure(ttimer, "torch-sort", "moe_align_block_size", shape, torch_group, nbytes,
                                     ceilings, modes)
                except RuntimeError as e:   # e.g. an op this torch cannot capture in a graph
                    print(f"torch peer unavailable for {shape}: {str(e).splitlines()[0]}")
    return rows


#: MoE layer shapes: (experts, experts per token, hidden H, expert intermediate I)
MOE_LAYERS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v3": (256, 8, 7168, 2048)}


def _random_int4_experts(cp, rng, experts, n, k, group_size=128):
    """Stacked INT4 expert weights [E, N, K] with random codes, scales and zeros (no
    float master weights: DeepSeek-V3's would not fit a float32 quantization pass)."""
    import w4kern

    qweight = rng.integers(0, 256, size=(experts, n, k // 2), dtype=np.uint8)
    scales = (rng.random((experts, n, k // group_size), dtype=np.float32) * 0.01 + 0.001).astype(w4kern.bfloat16)
    zeros = (rng.random((experts, n, k // group_size), dtype=np.float32) * 15).astype(w4kern.bfloat16)
    return w4kern.Int4Weight(qweight, scales, zeros, group_size)


def _expert_bytes(w) -> int:
    return (w.qweight.nbytes + w.scales.nbytes + (0 if w.zeros is None else w.zeros.nbytes)) // w.qweight.shape[0]


def moe_id_sets(cp, rng, experts: int, k: int, t: int, launches: int) -> list:
    """topk_ids [t, k] sets the moe suite rotates over: at T = 1, k disjoint experts a
    set (as many sets as launches, or as the experts allow), so no launch finds its
    experts in L2; at larger T, 4 random sets of k distinct experts a token."""
    if t == 1:
        perm = np.random.default_rng(t).permutation(experts).astype(np.int32)
        sets = max(1, min(experts // k, launches))
        return [cp.asarray(perm[(i * k) % experts:(i * k) % experts + k].reshape(1, k)) for i in range(sets)]
    return [cp.argsort(rng.random((t, experts), dtype=np.float32), axis=1)[:, :k].astype(np.int32)
            for _ in range(min(launches, 4))]


def suite_moe(ceilings: Ceilings, timer: Timer, quick: bool = False) -> list[Row]:
    """fused_moe on the Qwen3-30B-A3B and DeepSeek-V3 layers (random INT4 g128
    asymmetric experts): activation="int8" (the decode path up to T = 16, the
    batched A8 path beyond) and "bf16" (the batched A16 path), beside torch's bf16 grouped_mm pipeline (sort,
    gather, two torch._grouped_mm, SiLU, weighted scatter-add) on bf16 experts of
    the same shape. Floor: the larger of the touched experts' INT4 bytes (codes,
    scales, zeros) / read bandwidth and the GEMMs' operations / the bf16 tensor
    rate measured here with torch (cuBLAS 8192^3); "tflop" in the shape is those
    operations. Routing at T = 1 rotates over disjoint expert sets so no launch
    finds its experts in L2."""
    import cupy as cp

    import w4kern

    torch, ttimer = _torch_and_timer(timer)
    modes = ("plain", "graph")
    rng = cp.random.default_rng(6)
    tflops = _bf16_tensor_tflops(torch, ttimer) if torch is not None else None
    if tflops:
        print(f"bf16 tensor rate (torch matmul 8192^3): {tflops:.0f} TFLOP/s")
    rows: list[Row] = []
    for name, (experts, k, hidden, inter) in list(MOE_LAYERS.items())[: 1 if quick else None]:
        w13 = _random_int4_experts(cp, rng, experts, 2 * inter, hidden)
        w2 = _random_int4_experts(cp, rng, experts, hidden, inter)
        per_expert = _expert_bytes(w13) + _expert_bytes(w2)
        for t in ((1, 1024) if quick else MOE_TOKENS):
            id_sets = moe_id_sets(cp, rng, experts, k, t, timer.launches)
            sets = len(id_sets)
            touched = int(np.mean([len(np.unique(cp.asnumpy(ids))) for ids in id_sets]))
            nbytes = touched * per_expert
            gflop = 2 * t * k * (2 * inter * hidden + hidden * inter) / 1e9
            weights = cp.full((t, k), 1.0 / k, dtype=np.float32)
            x = rng.standard_normal((t, hidden), dtype=np.float32).astype(w4kern.bfloat16)
            out = cp.empty((t, hidden), dtype=w4kern.bfloat16)
            shape = {"name": name, "T": t, "E": experts, "k": k, "H": hidden, "I": inter,
                     "tflop": round(gflop / 1e3, 4)}
            for activation in ("int8", "bf16"):
                rows += _with_compute_floor(
                    _measure(timer, f"w4kern-{activation}", "fused_moe", shape,
                             lambda i, a=activation: w4kern.fused_moe(x, w13, w2, weights, id_sets[i % sets],
                                                                      activation=a, out=out),
                             nbytes, ceilings, modes), gflop, tflops)
            if torch is not None:
                try:
                    rows += _with_compute_floor(
                        _torch_grouped_mm_moe(torch, ttimer, ceilings, modes, shape, x, id_sets, weights, experts,
                                              k, hidden, inter, nbytes), gflop, tflops)
                except (RuntimeError, TypeError, AttributeError) as e:   # an older torch, a layout it refuses
                    print(f"torch grouped_mm peer unavailable for {shape}: {str(e).splitlines()[0]}")
            del x, out, weights, id_sets
            cp.get_default_memory_pool().free_all_blocks()
        del w13, w2
        cp.get_default_memory_pool().free_all_blocks()
    return rows


MOE_TOKENS = (1, 16, 128, 1024, 4096)


def _bf16_tensor_tflops(torch, ttimer) -> float | None:
    """The bf16 tensor-core rate cuBLAS reaches through torch on 8192^3 (TFLOP/s)."""
    try:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        us = ttimer.plain(lambda i: a @ b)
        return 2 * 8192 ** 3 / us / 1e6
    except RuntimeError as e:
        print(f"no tensor rate measured: {str(e).splitlines()[0]}")
        return None


def _with_compute_floor(rows: list[Row], gflop: float, tflops: float | None) -> list[Row]:
    """Raise each row's floor to operations / tensor rate where that is larger."""
    if tflops:
        for r in rows:
            r.floor_us = max(r.floor_us, gflop / tflops * 1e3)
    return rows


def _torch_grouped_mm_moe(torch, ttimer, ceilings, modes, shape, x, id_sets, weights, experts, k, hidden, inter,
                          nbytes) -> list[Row]:
    """torch's bf16 MoE pipeline on the same routing: stable sort of the flat ids,
    per-expert offsets (graph-capturable: no bincount), gather, grouped GEMMs, SiLU,
    weighted scatter-add."""
    w13 = torch.randn(experts, hidden, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.02   # [E, K, N]
    w2 = torch.randn(experts, inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    tx = torch.from_dlpack(x)
    tw = torch.from_dlpack(weights)
    tids = [torch.from_dlpack(ids).flatten().long() for ids in id_sets]
    ones = torch.ones_like(tids[0])
    t = tx.shape[0]

    def pipeline(i):
        flat = tids[i % len(tids)]
        order = torch.sort(flat, stable=True).indices
        counts = torch.zeros(experts, dtype=torch.long, device=flat.device).index_add_(0, flat, ones)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        token = order // k
        h = torch._grouped_mm(tx[token], w13, offs=offs)
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = torch._grouped_mm(a, w2, offs=offs)
        scale = tw.flatten()[order].to(y.dtype)[:, None]
        return torch.zeros(t, hidden, device=y.device, dtype=y.dtype).index_add_(0, token, y * scale)

    return _measure(ttimer, "torch-grouped_mm-bf16", "fused_moe", shape, pipeline, nbytes, ceilings, modes)


SUITES = {"foundation": suite_foundation, "q8_tuning": suite_q8_tuning, "decode": suite_decode,
          "linear_tuning": suite_linear_tuning, "attention": suite_attention, "moe_align": suite_moe_align,
          "moe": suite_moe}


def _git_commit() -> str:
    env = os.environ.get("W4KERN_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_tree_hash(root: str | Path | None = None) -> str:
    """sha256 (12 hex digits) of the package's Python files and cuda_src, path and bytes:
    a result file can be matched to a checkout even where the commit it records is
    wrong (the device's copy of the tree has no up-to-date git metadata)."""
    import hashlib

    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = sorted(p for d in ("w4kern", "cuda_src") for p in (root / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".cu", ".cuh"))
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict:
    import cupy as cp

    from . import _runtime

    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    torch = _try_torch()
    return {
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "sm_count": device.attributes["MultiProcessorCount"],
        "compute_capability": device.compute_capability,
        "l2_bytes": device.attributes["L2CacheSize"],
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "nvrtc": ".".join(map(str, _runtime.nvrtc_version())),
        "cupy": cp.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch else None,
        "w4kern": __version__,
        "commit": _git_commit(),
        "source_tree": source_tree_hash(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run(suites=("foundation",), out_dir: str | Path | None = None, quick: bool = False) -> dict:
    """Run suites, print a table, write one JSON file per run; return the record."""
    timer = Timer()
    ceilings = measure_ceilings(timer)
    env = environment()
    print(f"{env['gpu']}: read {ceilings.read_gbps:.0f} GB/s, copy {ceilings.copy_gbps:.0f} GB/s, "
          f"L2 {ceilings.l2_bytes / 2**20:.0f} MiB")
    for name in suites:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; available: {sorted(SUITES)}")
    rows: list[Row] = []
    errors: dict[str, str] = {}
    for name in suites:
        try:
            rows += SUITES[name](ceilings, timer, quick=quick)
        except Exception as e:   # one broken suite must not discard the rows the others measured
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
    print(format_table(rows))
    record = {"environment": env, "ceilings": dataclasses.asdict(ceilings), "suites": list(suites),
              "rows": [r.to_json() for r in rows]}
    if errors:
        record["errors"] = errors
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in env["gpu"]).strip("-")
        path = out_dir / f"{slug}_{'-'.join(suites)}_{env['date'][:10]}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    return record


def format_table(rows: list[Row]) -> str:
    head = f"{'op':<16} {'shape':<44} {'system':<10} {'mode':<6} {'us':>9} {'floor us':>9} {'eff':>6} {'GB/s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        lines.append(f"{r.op:<16} {shape[:44]:<44} {r.system:<10} {r.mode:<6} {r.time_us:9.2f} "
                     f"{r.floor_us:9.2f} {r.efficiency:6.1%} {r.bytes_moved / r.time_us / 1e3:7.0f}")
    return "\n".join(lines)
