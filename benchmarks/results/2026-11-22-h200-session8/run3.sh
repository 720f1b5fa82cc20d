#!/usr/bin/env bash
# session 8: matvec_a16 with fewer instructions per step: GPU tests, sanitizer sample, one-process A/B, grid sweep
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_linear.py tests/test_gpu_moe.py -k "a16 or bf16 or walk" 2>&1 | tail -15 | tee $OUT/tests.log
compute-sanitizer --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_linear.py \
  -k "(kernels_match_reference and a16 and float16 and (g32 or g-1 or g64)) or (a16_every_instance)" 2>&1 | tail -5 | tee $OUT/sanitizer.log
python3 scripts/compare_sources.py $OUT/compare.json old=exp/old/cuda_src lop3=exp/lop3/cuda_src ab=exp/ab/cuda_src 2>&1 | grep -v compiling | tee $OUT/compare.log
timeout 150 python3 scripts/sweep_a16.py $OUT/sweep.json 2>&1 | grep -v compiling > $OUT/sweep.log
timeout 100 python3 scripts/sweep_a16.py $OUT/kinds.json --kinds 2>&1 | grep -v compiling > $OUT/kinds.log
tail -3 $OUT/sweep.log
