"""Disassemble one kernel family as the device compiles it, on a machine without a GPU.

The lent GPUs compile with NVRTC 13.0, whose code differs from what the NVRTC 12.x
of the `cuda12` extra (or a newer ptxas) makes of the same source: in session 8,
NVRTC 13.0 compiled matvec_a16's `(v & mask) | exponent` as two LOP3s where
ptxas 13.5 fuses them, and that pair was worth 1-11% of W4A16's time. This script
loads a libnvrtc of your choice through ctypes, compiles the family to a cubin with
w4kern's own code and options, disassembles it with nvdisasm, and prints per
instance the instruction count, registers spilled (STL/LDL) and the most common
opcodes, so an instruction-count change can be checked before spending device time.

Setup (no GPU needed; wheels from PyPI):
    pip download --no-deps "nvidia-cuda-nvrtc==13.0.*" nvidia-cuda-nvdisasm -d /tmp/whl
    (cd /tmp/whl && for w in *.whl; do unzip -qo "$w"; done)
    export LD_LIBRARY_PATH=/tmp/whl/nvidia/cu13/lib   # libnvrtc-builtins

    python scripts/sass.py FAMILY [--arch sm_90a] [--nvrtc /tmp/whl/nvidia/cu13/lib/libnvrtc.so.13]
        [--nvdisasm /tmp/whl/nvidia/cu13/bin/nvdisasm] [--match SUBSTRING] [--out FILE.sass]
"""
import argparse
import collections
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from w4kern import _runtime


def compile_cubin(lib: ctypes.CDLL, family: str, arch: str) -> bytes:
    plan = _runtime.plan(family, arch)
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or sys.exit(f"{what} failed ({rc})")  # noqa: E731
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), plan.code.encode(), plan.family.source.encode(), 0, None, None),
          "nvrtcCreateProgram")
    for name in plan.family.name_expressions:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
    options = [o.encode() for o in plan.options]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    if rc:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    size = ctypes.c_size_t()
    check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
    cubin = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    return cubin.raw


def summarize(sass: str, match: str) -> None:
    """Per kernel (.text section): instructions, spill instructions, top opcodes."""
    sections = re.split(r"^(?=\.text\.)", sass, flags=re.M)
    for section in sections:
        if not section.startswith(".text.") or match not in section.split(":", 1)[0]:
            continue
        name = section.split(":", 1)[0][len(".text."):]
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", section)
        counts = collections.Counter(ops)
        spills = counts["STL"] + counts["LDL"]
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
        print(f"{name}\n    {len(ops)} instructions, {spills} spill instructions: {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--nvrtc", default="/tmp/whl/nvidia/cu13/lib/libnvrtc.so.13")
    parser.add_argument("--nvdisasm", default="/tmp/whl/nvidia/cu13/bin/nvdisasm")
    parser.add_argument("--match", default="", help="only kernels whose mangled name holds this")
    parser.add_argument("--out", help="also write the whole disassembly here")
    args = parser.parse_args()
    cubin = compile_cubin(ctypes.CDLL(args.nvrtc), args.family, args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.family}.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([args.nvdisasm, "-c", str(path)], check=True, capture_output=True, text=True).stdout
    if args.out:
        Path(args.out).write_text(sass)
    summarize(sass, args.match)


if __name__ == "__main__":
    main()
