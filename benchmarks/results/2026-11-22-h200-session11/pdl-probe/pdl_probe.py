"""Probe: does programmatic dependent launch (cuLaunchKernelEx, PROGRAMMATIC_STREAM_SERIALIZATION)
shorten a chain of small dependent kernels, eager and in a CUDA graph? Not part of the package."""
import ctypes, json, os, sys
import cupy as cp
import numpy as np

SRC = r'''
extern "C" __global__ void step(const float* __restrict__ src, float* __restrict__ dst, int n, int mode) {
#if __CUDA_ARCH__ >= 900
    if (mode & 1) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (mode & 2) asm volatile("griddepcontrol.launch_dependents;");
#endif
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = src[i] * 0.999f + 1.0f;
}
'''
mod = cp.RawModule(code=SRC, options=("-std=c++17",))
k = mod.get_function("step")
lib = ctypes.CDLL("libcuda.so.1")

class Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]

class Config(ctypes.Structure):
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
                ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)),
                ("nattrs", ctypes.c_uint)]

lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
print("sizeof Attr", ctypes.sizeof(Attr), "Config", ctypes.sizeof(Config))

def launch_ex(grid, block, args, pdl):
    storage = []
    for a in args:
        if isinstance(a, cp.ndarray): storage.append(ctypes.c_void_p(a.data.ptr))
        elif isinstance(a, np.int32): storage.append(ctypes.c_int32(int(a)))
        else: raise TypeError(type(a))
    params = (ctypes.c_void_p * len(storage))(*[ctypes.addressof(s) for s in storage])
    attr = Attr(); attr.id = 6
    ctypes.memmove(ctypes.addressof(attr) + 8, ctypes.byref(ctypes.c_int(1)), 4)
    cfg = Config(grid, 1, 1, block, 1, 1, 0, cp.cuda.get_current_stream().ptr,
                 ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    r = lib.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(k.kernel.ptr), params, None)
    if r != 0: raise RuntimeError(f"cuLaunchKernelEx -> {r}")

results = {}
for n in (1 << 14, 1 << 18, 1 << 21):
    grid = min(132 * 8, -(-n // 256))
    for variant in ("cupy", "ex", "pdl-wait", "pdl-wait-trigger"):
        a = cp.arange(n, dtype=cp.float32); b = cp.zeros(n, dtype=cp.float32)
        s = cp.cuda.Stream(non_blocking=True)
        def chain():
            bufs = (a, b)
            for i in range(20):
                src, dst = bufs[i % 2], bufs[(i + 1) % 2]
                args = (src, dst, np.int32(n), np.int32({"cupy": 0, "ex": 0, "pdl-wait": 1, "pdl-wait-trigger": 3}[variant]))
                if variant == "cupy": k((grid,), (256,), args)
                else: launch_ex(grid, 256, args, variant.startswith("pdl") and i > 0)
        with s:
            chain(); s.synchronize()
            # eager timing
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(); 
            for _ in range(20): chain()
            e1.record(); e1.synchronize()
            eager = cp.cuda.get_elapsed_time(e0, e1) * 1000 / 400
            s.begin_capture(); chain(); g = s.end_capture()
            g.launch(); s.synchronize()
            ts = []
            for _ in range(30):
                e0.record(); g.launch(); e1.record(); e1.synchronize(); ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1000 / 20)
            a[:] = cp.arange(n, dtype=cp.float32); b[:] = 0; s.synchronize()
            g.launch(); s.synchronize()
            out = cp.asnumpy(a[:8]).tolist()
        results[(n, variant)] = out
        print(f"n={n:8d} {variant:18s} eager {eager:6.2f} us/kernel  graph {np.median(ts):6.2f} us/kernel  a[:3]={out[:3]}")
ok = all(results[(n, v)] == results[(n, 'cupy')] for (n, v) in results)
print("outputs equal across variants:", ok)
