#!/usr/bin/env bash
# The race of benchmarks/race_lbfgs.py on a GPU: the Gaussian problems (p = 32768) with float32 and bfloat16
# designs, random starts with float32, and a vocabulary-scale design (p = 262144, L = 2048, K = 8) with both.
# Resumable like the race itself (rows already in a results file are kept).
#     bash benchmarks/race_cuda.sh [results folder, default benchmarks/results]
set -u
dir=${1:-benchmarks/results}
race() { "${PYTHON:-python3}" benchmarks/race_lbfgs.py --device cuda --no-smollm2 "$@"; }
race --dtype float32 --starts near far --out "$dir/race_lbfgs_cuda_f32"
race --dtype bfloat16 --starts near far --out "$dir/race_lbfgs_cuda_bf16"
race --dtype float32 --starts random --out "$dir/race_lbfgs_cuda_f32_random"
for dt in float32 bfloat16; do
    race --dtype $dt --p 262144 --L 2048 --K 8 --starts near far --out "$dir/race_lbfgs_cuda_big_$([ $dt = float32 ] && echo f32 || echo bf16)"
done
