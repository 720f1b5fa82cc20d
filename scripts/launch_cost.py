"""Host time of the pieces of a plain (non-graph) decode_attention call, per call:
the whole op, its two kernel launches through CuPy, the same launches through the
driver's cuLaunchKernel with a prebuilt argument array (ctypes), the CuPy/CUDA
queries the op makes, and torch SDPA (flash) on the same tensors.

    python3 scripts/launch_cost.py OUT.json
"""
import ctypes
import json
import sys
import time

import cupy as cp
import numpy as np

import w4kern
from w4kern import _runtime, attention

N = 3000


def per_call_us(fn, n=N):
    for _ in range(200):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    cp.cuda.Device().synchronize()
    return host


def main(out_path):
    rng = cp.random.default_rng(0)
    b, hq, hkv, d, length = 1, 32, 8, 128, 2048
    q = rng.standard_normal((b, hq, d), dtype=np.float32).astype(w4kern.bfloat16)
    kc = rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16)
    vc = rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16)
    lens = cp.full(b, length, dtype=np.int32)
    out = cp.empty_like(q)
    results = {}

    def op():
        w4kern.decode_attention(q, kc, vc, lens, out=out)
    results["decode_attention"] = per_call_us(op)

    plan = next(iter(attention._PLANS.values()))
    kernel, grid, smem, head, tail, merge, merge_args = plan
    args = (q, kc, vc, lens, lens, out) + head + tail
    margs = merge_args[:2] + (out,) + merge_args[2:]
    mgrid = (b * hq,)
    results["cupy launch: split kernel"] = per_call_us(lambda: kernel(grid, (128,), args, shared_mem=smem))
    results["cupy launch: merge kernel"] = per_call_us(lambda: merge(mgrid, (attention.MERGE_THREADS,), margs))

    # the driver's cuLaunchKernel, the argument array built once
    lib = ctypes.CDLL("libcuda.so.1")
    launch = lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                                                  ctypes.c_void_p]
    launch.restype = ctypes.c_int

    def prebuilt(kernel, args):
        values = [_runtime._kernel_argument(ctypes, np, cp, a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        return values, params

    values, params = prebuilt(kernel, args)
    mvalues, mparams = prebuilt(merge, margs)
    g3 = tuple(grid) + (1,) * (3 - len(grid))
    fn_split, fn_merge = ctypes.c_void_p(kernel.kernel.ptr), ctypes.c_void_p(merge.kernel.ptr)

    def ctypes_split():
        st = launch(fn_split, g3[0], g3[1], g3[2], 128, 1, 1, smem, cp.cuda.get_current_stream().ptr, params, None)
        assert st == 0

    def ctypes_both_with_pointer_updates():
        s = cp.cuda.get_current_stream().ptr
        values[0].value = q.data.ptr
        values[1].value = kc.data.ptr
        values[2].value = vc.data.ptr
        values[3].value = lens.data.ptr
        values[4].value = lens.data.ptr
        values[5].value = out.data.ptr
        mvalues[2].value = out.data.ptr
        launch(fn_split, g3[0], g3[1], g3[2], 128, 1, 1, smem, s, params, None)
        launch(fn_merge, mgrid[0], 1, 1, attention.MERGE_THREADS, 1, 1, 0, s, mparams, None)

    results["ctypes cuLaunchKernel: split kernel"] = per_call_us(ctypes_split)
    results["ctypes: both kernels, pointers updated"] = per_call_us(ctypes_both_with_pointer_updates)
    results["cupy: both kernels"] = per_call_us(lambda: (kernel(grid, (128,), args, shared_mem=smem),
                                                        merge(mgrid, (attention.MERGE_THREADS,), margs)))
    stream = cp.cuda.get_current_stream()
    results["get_current_stream().ptr"] = per_call_us(lambda: cp.cuda.get_current_stream().ptr)
    results["stream.is_capturing()"] = per_call_us(lambda: stream.is_capturing())
    results["runtime.getDevice()"] = per_call_us(lambda: cp.cuda.runtime.getDevice())
    results["_runtime.launch(split, pdl=True) (plain: checks, then cupy)"] = per_call_us(
        lambda: _runtime.launch(kernel, grid, (128,), args, shared_mem=smem, pdl=True))

    try:
        import torch
        import torch.nn.functional as F

        tq = torch.from_dlpack(q).unsqueeze(2)     # [B, Hq, 1, D]
        tk = torch.from_dlpack(kc)
        tv = torch.from_dlpack(vc)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            results["torch SDPA flash"] = per_call_us(lambda: F.scaled_dot_product_attention(tq, tk, tv,
                                                                                             enable_gqa=True))
    except Exception as e:   # noqa: BLE001 - a missing peer is reported, not fatal
        results["torch SDPA flash"] = f"unavailable: {e}"
    for k, v in results.items():
        print(f"{v:8.2f} us  {k}" if isinstance(v, float) else f"   {v}  {k}")
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
