"""Time decode_attention built from several copies of cuda_src/ in one process
(graph mode, caches rotated past 4x the L2), over configs and forced split counts,
and check each variant's output against the tree's (fp32-accumulation tolerance).
Beside them: torch SDPA (flash) on the same tensors.

    python3 scripts/attention_variants.py OUT.json [label=DIR | label=smem:BYTES |
        label=attr:NAME=V[,NAME=V] | label=env:NAME=V ...] [--only D] [--batch B] [--plain]

A variant smem:BYTES runs the tree's kernels as if a CTA could have BYTES of
shared memory (shallower rings, more CTAs per SM); attr:NAME=V sets module
constants (integers: attention.SPLIT_WAVES, attention.MIN_SPLIT_TOKENS,
attention.FEW_SPLITS, attention.MANY_SPLIT_TOKENS, _runtime.FIRST_KERNEL_PDL); env:NAME=V
sets an environment variable (e.g. W4KERN_PDL=never). --only D keeps the configs
of head dim D, --batch B those of batch B; --plain also times the rule's split
count with plain launches. The JSON is rewritten after every config.
"""
import json
import os
import sys

import cupy as cp
import numpy as np

import w4kern
from w4kern import _runtime, attention
from w4kern.bench import Timer, _torch_and_timer

OUT = sys.argv[1]
VARIANTS = [("tree", None)] + [tuple(a.split("=", 1)) for a in sys.argv[2:] if "=" in a]
ONLY = int(sys.argv[sys.argv.index("--only") + 1]) if "--only" in sys.argv else None
BATCH = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else None
PLAIN = "--plain" in sys.argv
CONFIGS = [  # (Hq, Hkv, D), B, L, forced split counts (None: the rule)
    ((32, 8, 128), 1, 256, (None, 1, 2, 4)),
    ((32, 8, 128), 1, 2048, (None, 4, 8, 16, 32)),
    ((64, 8, 128), 1, 2048, (None, 8, 16)),
    ((32, 16, 256), 1, 2048, (None, 4, 8, 16)),
    ((32, 8, 128), 1, 8192, (None, 16, 33)),
    ((32, 8, 128), 1, 32768, (None, 16, 33, 66)),
    ((32, 8, 128), 1, 131072, (None, 33, 66)),
    ((32, 8, 128), 8, 8192, (None, 4, 8)),
    ((32, 16, 256), 1, 32768, (None, 8, 16)),
    ((64, 8, 128), 8, 8192, (None, 4, 8)),
    ((64, 8, 128), 64, 2048, (None, 1)),
    ((32, 8, 128), 8, 32768, (None, 2, 3, 4, 5, 6, 8)),
    ((64, 8, 128), 8, 32768, (None, 3, 4, 5, 6, 8)),
    ((32, 8, 128), 8, 131072, (None, 3, 4, 6, 8)),
    ((32, 16, 256), 64, 256, (None, 1, 2)),
    ((32, 16, 256), 8, 2048, (None, 1, 2)),
    ((32, 16, 256), 8, 8192, (None, 1, 2)),
    ((32, 16, 256), 32, 256, (None,)),
    ((32, 16, 256), 16, 512, (None,)),
    ((32, 16, 256), 64, 512, (None,)),
    ((32, 16, 256), 64, 1024, (None,)),
    ((32, 16, 256), 64, 2048, (None,)),
    ((32, 8, 128), 64, 256, (None,)),
    ((32, 8, 128), 64, 512, (None,)),
    # short contexts (the split rule's MIN_SPLIT_TOKENS)
    ((32, 8, 128), 1, 512, (None, 2, 4, 8)),
    ((32, 8, 128), 1, 1024, (None, 4, 8, 16)),
    ((64, 8, 128), 1, 256, (None, 2, 4)),
    ((32, 16, 256), 1, 256, (None, 2, 4)),
    ((32, 8, 128), 8, 256, (None, 1, 2, 4)),
    ((32, 8, 128), 8, 512, (None, 2, 4, 8)),
    ((32, 16, 256), 8, 256, (None, 1, 2, 4)),
]


_OPTIN = attention._cta_smem_optin
_HOMES = {"SPLIT_WAVES": attention, "MIN_SPLIT_TOKENS": attention, "FEW_SPLITS": attention,
          "MANY_SPLIT_TOKENS": attention, "FIRST_KERNEL_PDL": _runtime}   # where attr: variants set a constant
_ATTRS = {name: getattr(home, name) for name, home in _HOMES.items()}
_ENV = {name: os.environ.get(name) for name in ("W4KERN_PDL",)}


def use(src):
    attention._cta_smem_optin = _OPTIN
    attention._PLANS.clear()
    for name, value in _ATTRS.items():
        setattr(_HOMES[name], name, value)
    for name, value in _ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.environ.pop("W4KERN_CUDA_SRC", None)
    if src is None:
        return
    if src.startswith("smem:"):
        attention._cta_smem_optin = lambda device, n=int(src[5:]): n
    elif src.startswith("attr:"):
        for item in src[5:].split(","):
            name, value = item.split("=")
            setattr(_HOMES[name], name, int(value))
    elif src.startswith("env:"):
        name, value = src[4:].split("=", 1)
        os.environ[name] = value
    else:
        os.environ["W4KERN_CUDA_SRC"] = os.path.abspath(src)


def main():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timer = Timer(warmup=3, repeats=7, launches=20)
    torch, ttimer = _torch_and_timer(timer)
    rng = cp.random.default_rng(0)
    rows = []
    for (hq, hkv, d), b, length, split_list in CONFIGS:
        if (ONLY is not None and d != ONLY) or (BATCH is not None and b != BATCH):
            continue
        kv_bytes = 2 * b * hkv * length * d * 2
        copies = max(1, min(20, (256 << 20) // kv_bytes + 1))
        q = rng.standard_normal((b, hq, d), dtype=np.float32).astype(w4kern.bfloat16)
        ks = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
        vs = [rng.standard_normal((b, hkv, length, d), dtype=np.float32).astype(w4kern.bfloat16) for _ in range(copies)]
        lens = cp.full(b, length, dtype=np.int32)
        out = cp.empty((b, hq, d), dtype=w4kern.bfloat16)
        floor = kv_bytes / 4.5e6
        name = f"{hq}/{hkv}/{d} B={b} L={length}"
        tq = torch.from_dlpack(q)
        tks = [torch.from_dlpack(k) for k in ks]
        tvs = [torch.from_dlpack(v) for v in vs]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = ttimer.graph(lambda i: F.scaled_dot_product_attention(
                tq[:, :, None], tks[i % copies], tvs[i % copies], enable_gqa=True))
        line = [f"{name} floor={floor:.1f}us flash={flash:.1f}"]
        rows.append({"config": name, "system": "flash", "us": flash, "floor_us": floor})
        base = None
        for label, src in VARIANTS:
            use(src)
            got = w4kern.decode_attention(q, ks[0], vs[0], lens, out=out).astype(np.float32)
            if base is None:
                base = got.copy()
            err = float(cp.abs(got - base).max())
            parts = [f"{label}(err {err:.1e})"]
            for splits in split_list:
                t = timer.graph(lambda i, s=splits: w4kern.decode_attention(q, ks[i % copies], vs[i % copies], lens,
                                                                              num_splits=s, out=out))
                parts.append(f"{splits}:{t:.1f}")
                rows.append({"config": name, "system": label, "splits": splits, "us": t, "floor_us": floor,
                             "max_abs_diff_vs_tree": err})
            if PLAIN:
                t = timer.plain(lambda i: w4kern.decode_attention(q, ks[i % copies], vs[i % copies], lens, out=out))
                parts.append(f"plain:{t:.1f}")
                rows.append({"config": name, "system": label, "splits": None, "mode": "plain", "us": t,
                             "floor_us": floor, "max_abs_diff_vs_tree": err})
            line.append(" ".join(parts))
        use(None)
        print(" | ".join(line), flush=True)
        with open(OUT, "w") as f:
            json.dump({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
