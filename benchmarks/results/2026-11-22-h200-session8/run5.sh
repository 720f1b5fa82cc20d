#!/usr/bin/env bash
# session 8: matvec_a16 with weights not zeroed outside K and 32-bit weight offsets (the tree): GPU tests, sanitizer, one-process A/B
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 W4KERN_COMMIT=d904e38
mkdir -p $OUT
python3 scripts/compare_sources.py $OUT/compare.json old=exp/old/cuda_src zero=exp/zero/cuda_src u32=exp/u32/cuda_src u32s=exp/u32s/cuda_src 2>&1 | grep -v compiling | tee $OUT/compare.log
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_linear.py tests/test_gpu_moe.py -k "a16 or bf16 or walk" --junitxml=$OUT/tests.xml 2>&1 | tail -6 | tee $OUT/tests.log
compute-sanitizer --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_linear.py \
  -k "(kernels_match_reference and a16 and float16 and (g32 or g-1 or g128)) or (a16_every_instance)" 2>&1 | tail -4 | tee $OUT/sanitizer.log
