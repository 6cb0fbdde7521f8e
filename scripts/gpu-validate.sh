#!/usr/bin/env bash
# On the GPU machine, after `bash scripts/gpu-bundle.sh` here and carrying .gpux: every GPU test,
# the forced-fused INT8 layer test, the Kestrel-vs-PyTorch benchmark and both gelan-c layer profiles,
# with logs and JSON under $OUT. Device call: `bash scripts/gpu-validate.sh` with carry [".gpux"].
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-validate}
mkdir -p "$OUT"
tar xJf .gpux/bundle.tar.xz
export KESTREL_WORKSPACE=$PWD KESTREL_PYTHON=/opt/torch/.venv/bin/python KESTREL_FUSED_CONV_LOG=1
# .gpu/env.sh runs its arguments when given any: source it with none.
set --
source .gpu/env.sh
T=$(ls .gpu/bin/test-cuda_engine*)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 330 "$T" --include-ignored --nocapture --test-threads 1 > "$OUT/tests.log" 2>&1
grep -E "^test |test result|rel L2|onnxruntime|matched|concat copies|fused conv|panicked" "$OUT/tests.log" | head -60
KESTREL_FUSED_CONV=force timeout 60 "$T" --include-ignored --nocapture --test-threads 1 int8_convolution_matches_cpu > "$OUT/force.log" 2>&1
grep -E "int8 conv case|test result" "$OUT/force.log"
OUT=$OUT DURATION=3 timeout 200 bash bench/gpu.sh > "$OUT/bench.log" 2>&1
grep -E "GPU compute|fused|concat|ratio|images/s|rror" "$OUT/bench.log" | head -24
K=.gpu/bin/kestrel
timeout 60 $K bench --model /tmp/gelan-c.qdq.onnx --backend cuda --precision int8 --batch 8 --warmup 1 --duration 1 --profile > "$OUT/profile-int8.txt" 2>&1
timeout 60 $K bench --model /tmp/gelan-c.onnx --backend cuda --precision fp16 --batch 8 --warmup 1 --duration 1 --profile > "$OUT/profile-fp16.txt" 2>&1
grep -A 16 "layer profile" "$OUT/profile-int8.txt"
grep -A 12 "layer profile" "$OUT/profile-fp16.txt"
