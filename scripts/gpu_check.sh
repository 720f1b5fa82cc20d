#!/usr/bin/env bash
# One device call: GPU tests, a compute-sanitizer sample, the cache check and the
# benchmarks, from the source tree (no install, no network). Usage:
#   scripts/gpu_check.sh OUTDIR [--quick]
# Writes into OUTDIR: info.txt, tests.xml (JUnit), tests.log, sanitizer.log,
# cache.log and the benchmark JSON. Exit status: non-zero if any step failed.
# W4KERN_STEPS="tests sanitizer" (any of: info tests cache sanitizer bench) runs a
# subset, W4KERN_SUITES the benchmark suites. The whole check takes longer than one
# 10-minute device call on an H200 (2026-11-23: GPU tests ~5.5 min, sanitizer ~5 min,
# benchmarks ~2.5 min; on an H100 of 2026-11-23 the sanitizer alone took ~8 min): run
# W4KERN_STEPS="info tests cache", then "sanitizer", then "bench". Four concurrent
# pytest processes (one per big test file) were tried on that H100 and had not
# finished in 6 minutes, so the tests stay one process.
# Pass W4KERN_COMMIT=<sha of the committed tree>: the device's copy of the tree may
# carry stale git metadata, and results of the 2026-11-22 fourth session recorded the
# session's first commit that way. Each result file also records `source_tree`
# (w4kern.bench.source_tree_hash), which a checkout can recompute to match it.
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export W4KERN_CACHE_DIR=${W4KERN_CACHE_DIR:-/tmp/w4kern-gpu-check-cache}
export W4KERN_COMMIT=${W4KERN_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
STEPS=${W4KERN_STEPS:-info tests cache sanitizer bench}   # a subset splits the check over device calls
status=0

step() { echo; echo "=== $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

if want info; then
step info
python3 -m w4kern info 2>&1 | tee "$OUTDIR/info.txt" || status=1
fi

if want tests; then
# the GPU tests; W4KERN_TESTS=all adds the CPU ones (CI runs those: the compile check
# of every instance for three archs alone takes minutes of device time)
if [ "${W4KERN_TESTS:-gpu}" = all ]; then marker=(); step "tests (all, GPU included)"
else marker=(-m gpu); step "tests (GPU)"; fi
python3 -m pytest -q -p no:cacheprovider "${marker[@]}" --junitxml="$OUTDIR/tests.xml" tests 2>&1 | tee "$OUTDIR/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want cache; then
step "a second process reuses the compiled kernels (fresh cache directory)"
CACHE_PROBE="
import sys, cupy, w4kern
from w4kern import _runtime
w4kern.quantize_q8(cupy.ones((1, 32), dtype='float32'))
print('process', sys.argv[1], 'compiled:', _runtime.STATS['compiled'], 'cache hits:', _runtime.STATS['cache_hits'])
assert (sys.argv[1] == 'first') == bool(_runtime.STATS['compiled']), 'unexpected compile/cache state'
"
probe_cache=$(mktemp -d)
{ W4KERN_CACHE_DIR=$probe_cache W4KERN_LOG_LEVEL=DEBUG python3 -c "$CACHE_PROBE" first &&
  W4KERN_CACHE_DIR=$probe_cache W4KERN_LOG_LEVEL=DEBUG python3 -c "$CACHE_PROBE" second; } 2>&1 | tee "$OUTDIR/cache.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want sanitizer; then
step "compute-sanitizer memcheck (sample)"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 7 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "(quantize_q8_bit_identical and (3x4128 or 1x32 or 255x32 or 2x3x96)) or (dequantize_int4_bit_identical and (g32 or g-1))" \
      2>&1 | tee "$OUTDIR/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  compute-sanitizer --tool memcheck --error-exitcode 7 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_linear.py \
      -k "(kernels_match_reference and float16 and not asym and (g32 or g-1)) or (int8_matvec_matches_reference and g64) or (split_k and 64) or walk_many or (walks_many and t1-s8) or (a16_rows and walks_many and bf16) or per_token_int8 or (programmatic and 3-) or (tiled_every_instance and t1-s4) or (tiled_weights_match and (int8-g-1-bfloat16-asym or bf16-g128-float16-sym)) or (bulk_matches and (int8-float16-asym or bf16-bfloat16-sym)) or bulk_16bit" \
      2>&1 | tee -a "$OUTDIR/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  compute-sanitizer --tool memcheck --error-exitcode 7 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py \
      -k "out_of_contract or (paged and bfloat16) or (every_head_dim and 32x8) or (batches and 7) or shallow_rings or programmatic" \
      2>&1 | tee -a "$OUTDIR/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  compute-sanitizer --tool memcheck --error-exitcode 7 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_moe.py \
      -k "(moe_align and (out_of_range or expert_map or many_experts or (bit_identical and 33-))) or fused_moe_decode_skewed or token_q8 or token_int8 or combine or batched_skewed or bf16_out_of_range or (batched_matches and 60-4 and (-33] or -1024])) or token_sum or slot_limit or int8_decode_out_of_range or (programmatic and (int8-1-4 or int8-3-33)) or (persistent and one-sm) or int8_64_row_blocks or all_zero_tokens" \
      2>&1 | tee -a "$OUTDIR/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "compute-sanitizer not found" | tee "$OUTDIR/sanitizer.log"; status=1
fi
fi

if want bench; then
step benchmarks
python3 -m w4kern bench --suite ${W4KERN_SUITES:-foundation q8_tuning decode linear_tuning attention moe_align moe} --out "$OUTDIR" $QUICK 2>&1 | tee "$OUTDIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo; echo "gpu_check status: $status"
exit $status
