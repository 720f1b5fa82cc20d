"""``python -m w4kern {demo,info,compile-check,bench}``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def gpu_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device."""
    from ._arrays import cupy_module

    cp = cupy_module()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:   # no driver, or a driver too old for this CuPy
        return False


def cmd_info(args) -> int:
    import w4kern

    from . import _runtime
    from ._arrays import cupy_module
    from ._registry import FAMILIES

    cp = cupy_module()
    print(f"w4kern {w4kern.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    print(f"cupy: {cp.__version__ if cp else 'not installed (NumPy path only)'}")
    try:
        print(f"nvrtc: {'.'.join(map(str, _runtime.nvrtc_version()))}")
    except RuntimeError as e:
        print(f"nvrtc: unavailable ({e})")
    arch = None
    if gpu_available():
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        arch = _runtime.device_arch(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"gpu: {name} (cc {dev.compute_capability}, {arch}), "
              f"driver {cp.cuda.runtime.driverGetVersion()}")
    else:
        print("gpu: none (ops on NumPy arrays run the NumPy path)")
    print(f"cuda sources: {_runtime.source_dir()} (hash {_runtime.source_hash()[:12]})")
    print(f"kernel cache: {_runtime.cache_dir()}")
    print("registered kernels:")
    for fam in FAMILIES.values():
        status = ""
        if arch is not None:
            status = "  [cached for this GPU]" if _runtime.plan(fam, arch).cached else "  [compiles on first use]"
        print(f"  {fam.name:<14} {len(fam.instances):>3} instances from cuda_src/{fam.source}{status}")
    return 0


def cmd_compile_check(args) -> int:
    from . import _runtime

    rows = _runtime.compile_check(archs=tuple(args.arch), use_cache=not args.no_cache)
    print(f"{'family':<14} {'arch':<7} {'regs':>5} {'smem':>6} {'stack':>6} {'spill st/ld':>12}  instance")
    for r in rows:
        if r.error:
            print(f"{r.family:<14} {r.arch:<7} ERROR  {r.instance}\n{r.error}")
            continue
        res = r.resources
        if res is None:
            print(f"{r.family:<14} {r.arch:<7} {'?':>5} {'?':>6} {'?':>6} {'?/?':>12}  {r.instance}"
                  f"   (NVRTC printed no ptxas report)")
            continue
        flag = "" if r.ok else "   <-- spills in a spill-free family"
        print(f"{r.family:<14} {r.arch:<7} {res.registers:>5} {res.shared_bytes:>6} {res.stack_bytes:>6} "
              f"{res.spill_store_bytes:>5}/{res.spill_load_bytes:<6}  {r.instance}{flag}")
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} of {len(rows)} instance builds passed for {', '.join(args.arch)}")
    return 1 if bad else 0


def cmd_demo(args) -> int:
    """Quantize a llama3-8b qkv-sized layer, run what exists, print error and timing against bf16."""
    import w4kern

    on_gpu = gpu_available() and not args.cpu
    if on_gpu:
        import cupy as xp
    else:
        xp = np
    n, k, m = args.n, args.k, args.m
    print(f"w4kern demo: W [{n}, {k}] bf16 -> INT4 (group 128), x [{m}, {k}] bf16 -> Q8 blocks, "
          f"on {'the GPU (CuPy)' if on_gpu else 'the NumPy path (no GPU)'}")
    rng = np.random.default_rng(0)
    w = xp.asarray((rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(w4kern.bfloat16))
    x = xp.asarray(rng.standard_normal((m, k), dtype=np.float32).astype(w4kern.bfloat16))

    def timed(fn, repeats=20):
        fn()
        if on_gpu:
            start, stop = xp.cuda.Event(), xp.cuda.Event()
            start.record()
            for _ in range(repeats):
                fn()
            stop.record()
            stop.synchronize()
            return xp.cuda.get_elapsed_time(start, stop) * 1e3 / repeats
        t0 = time.perf_counter()
        for _ in range(max(1, repeats // 10)):
            fn()
        return (time.perf_counter() - t0) * 1e6 / max(1, repeats // 10)

    qw = w4kern.quantize_int4(w, group_size=128, symmetric=True)
    xq = w4kern.quantize_q8(x)

    y_bf16 = x.astype(np.float32) @ w.astype(np.float32).T
    # w4kern.linear: CUDA kernels on the GPU, the NumPy reference otherwise
    y_w4a16 = w4kern.linear(x, qw, act="bf16", out_dtype=np.float32)
    y_w4a8 = w4kern.linear(x, qw, act="q8", out_dtype=np.float32)

    def report(name, y):
        y, ref = (xp.asnumpy(y), xp.asnumpy(y_bf16)) if on_gpu else (y, y_bf16)
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        cos = float(np.sum(y * ref) / (np.linalg.norm(y) * np.linalg.norm(ref)))
        print(f"  {name:<34} rel. error {rel:.4f}   cosine {cos:.6f}")

    print("error against bf16 math on the unquantized weight:")
    report("linear W4A16 (int4 weight, bf16 x)", y_w4a16)
    report("linear W4A8 (int4 weight, Q8 x)", y_w4a8)
    print("time per call (" + ("device events, plain launches" if on_gpu else "wall clock, NumPy") + "):")
    w_bf16 = xp.empty((n, k), dtype=w4kern.bfloat16)
    y = xp.empty((m, n), dtype=w4kern.bfloat16)
    t_q8 = timed(lambda: w4kern.quantize_q8(x, out=xq))
    t_a8 = timed(lambda: w4kern.linear(x, qw, out=y))
    t_a16 = timed(lambda: w4kern.linear(x, qw, act="bf16", out=y))
    t_dq = timed(lambda: w4kern.dequantize_int4(qw, out=w_bf16))
    t_mm = timed(lambda: x @ w.T)
    print(f"  quantize_q8 x                      {t_q8:10.1f} us")
    print(f"  linear W4A8 (quantize + kernel)    {t_a8:10.1f} us")
    print(f"  linear W4A16                       {t_a16:10.1f} us")
    print(f"  dequantize_int4 W -> bf16          {t_dq:10.1f} us  ({qw.nbytes / 2**20:.1f} MiB int4 "
          f"vs {w.nbytes / 2**20:.1f} MiB bf16)")
    print(f"  bf16 x @ W.T ({'cuBLAS via CuPy' if on_gpu else 'NumPy'})     {t_mm:10.1f} us")
    print("`python -m w4kern bench --suite decode` times linear against tinygemm and cuBLAS "
          "in plain and CUDA-graph modes, beside the memory floor.")
    return 0


def cmd_bench(args) -> int:
    if args.table or args.write_readme:   # the README's performance table: no GPU needed
        if not args.results or len(args.results) != 1:
            print("--table / --write-readme need --from RESULT.json (one file)", file=sys.stderr)
            return 2
        from . import report

        if args.write_readme:
            readme = Path(args.write_readme)
            result = os.path.relpath(args.results[0], readme.parent)
            report.write_readme(readme, result)
            print(f"wrote the performance table of {result} into {readme}")
        else:
            print(report.table(args.results[0]), end="")
        return 0
    if args.results:   # plot earlier results: no GPU needed
        if not args.plot:
            print("--from needs --plot FILE.png (or --table)", file=sys.stderr)
            return 2
        from . import plots

        plots.plot(plots.load(args.results), mode=args.mode, path=args.plot)
        print(f"wrote {args.plot}")
        return 0
    if not gpu_available():
        print("bench needs a CUDA GPU and CuPy (pip install 'w4kern[cuda12]' or [cuda13]); "
              "`bench --plot FILE.png --from RESULT.json` plots earlier results without one", file=sys.stderr)
        return 2
    from . import bench

    record = bench.run(suites=tuple(args.suite), out_dir=args.out, quick=args.quick)
    if args.plot:
        from . import plots

        rows = [{**row, "gpu": record["environment"]["gpu"]} for row in record["rows"]]
        plots.plot(rows, mode=args.mode, path=args.plot)
        print(f"wrote {args.plot}")
    if record.get("errors"):
        print(f"suites that failed (their rows are missing): {', '.join(record['errors'])}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    from . import _runtime

    parser = argparse.ArgumentParser(prog="python -m w4kern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="quantize a llama-sized layer and compare with bf16 (GPU or NumPy path)")
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="force the NumPy path")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("info", help="versions, GPU, kernel cache, registered kernels")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("compile-check", help="compile every kernel instance through NVRTC (no GPU needed)")
    p.add_argument("--arch", nargs="+", default=list(_runtime.CHECK_ARCHS))
    p.add_argument("--no-cache", action="store_true", help="recompile even if cached")
    p.set_defaults(fn=cmd_compile_check)
    p = sub.add_parser("bench", help="benchmarks against peers and floors (GPU)")
    p.add_argument("--suite", nargs="+", default=["foundation"])
    p.add_argument("--out", default=None, help="directory for the JSON record")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw efficiency (floor / time) per op, shape and system")
    p.add_argument("--from", dest="results", nargs="+", default=None, metavar="RESULT.json",
                   help="with --plot: plot these result files instead of running (no GPU needed)")
    p.add_argument("--mode", default="graph", choices=("graph", "plain"), help="timing mode to plot")
    p.add_argument("--table", action="store_true",
                   help="with --from: print the README's performance table of one result file")
    p.add_argument("--write-readme", default=None, metavar="README.md",
                   help="with --from: write that table into README.md's perf-table block")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
