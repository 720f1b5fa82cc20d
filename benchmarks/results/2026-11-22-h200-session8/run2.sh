#!/usr/bin/env bash
# session 8: the weight-ring matvec_a16: its GPU tests, a sanitizer sample, one-process A/B against HEAD's kernels, grid sweep
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_linear.py tests/test_gpu_moe.py -k "a16 or bf16 or walk" 2>&1 | tail -15 | tee $OUT/tests.log
compute-sanitizer --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_linear.py \
  -k "(kernels_match_reference and a16 and float16 and (g32 or g-1 or g64)) or (a16_every_instance)" 2>&1 | tail -5 | tee $OUT/sanitizer.log
python3 scripts/compare_sources.py $OUT/compare.json old=exp/old/cuda_src 2>&1 | grep -v compiling | tee $OUT/compare.log
timeout 200 python3 scripts/sweep_a16.py $OUT/sweep.json 2>&1 | grep -v compiling > $OUT/sweep.log
tail -5 $OUT/sweep.log
