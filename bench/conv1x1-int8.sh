#!/usr/bin/env bash
# On the GPU machine (nvcc, no Rust needed): build bench/kernels/conv1x1_int8.cu against the
# engine's kernels.cu and time every 1x1 INT8 tile shape on gelan-c's 1x1 layer shapes (batch 8)
# against Kestrel's implicit GEMM, checking that both give the same bytes. Writes
# $OUT/conv1x1-int8.jsonl (one line per layer shape and output type) and $OUT/conv1x1-int8.txt.
# Extra nvcc flags (e.g. -DSILU_EXP) go in $NVCC_FLAGS; $TAG names the output files.
#   OUT=$OUT bash bench/conv1x1-int8.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
tag=${TAG:-conv1x1-int8}
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
# wgmma (the Hopper kernels) needs the arch-specific target.
[ "$arch" = 90 ] && arch=90a
nvcc -O3 -std=c++17 -arch=sm_$arch -DI8_STAGES=3 ${NVCC_FLAGS:-} bench/kernels/conv1x1_int8.cu -o /tmp/$tag
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ; echo "nvcc flags: ${NVCC_FLAGS:-}"; } > "$OUT/$tag.txt"
/tmp/$tag "${1:-50}" > "$OUT/$tag.jsonl" 2>> "$OUT/$tag.txt"
