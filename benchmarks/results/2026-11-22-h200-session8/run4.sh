#!/usr/bin/env bash
# session 8, commit fdf225a: matvec_a16 GPU tests, sanitizer sample, the decode benchmark suite
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 W4KERN_COMMIT=fdf225a
mkdir -p $OUT
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_linear.py tests/test_gpu_moe.py -k "a16 or bf16 or walk" --junitxml=$OUT/tests.xml 2>&1 | tail -6 | tee $OUT/tests.log
compute-sanitizer --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_linear.py \
  -k "(kernels_match_reference and a16 and float16 and (g32 or g-1 or g128)) or (a16_every_instance)" 2>&1 | tail -4 | tee $OUT/sanitizer.log
python3 -m w4kern bench --suite decode --out $OUT 2>&1 | grep -v compiling > $OUT/bench.log
tail -5 $OUT/bench.log; ls $OUT
