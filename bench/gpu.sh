#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried, see NOTES in README): Kestrel's cuda backend
# against the PyTorch peer on the same card in the same run, at 640x640 with random weights.
# Writes $OUT/gpu-<model>.json with both sides and the ratios (copy it to bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
source .gpu/env.sh
OUT=${OUT:-out/gpu-bench}
mkdir -p "$OUT"
K=.gpu/bin/kestrel
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
for m in ${MODELS:-gelan-c}; do
  $K export --model "$m" --imgsz 640 --dynamic -o "/tmp/$m.onnx"
  $K bench --model "/tmp/$m.onnx" --backend cuda --precision fp16 --batch "${BATCHES:-1,8}" \
    --warmup 1 --duration "${DURATION:-3}" --json "/tmp/kestrel-$m.json"
  # INT8: post-training quantization (max calibration on synthetic scenes, CPU backend), then the
  # Q/DQ model's INT8 engine on the same card in the same run.
  [ -d /tmp/calib ] || $K synth -o /tmp/calib --images 16 --seed 5 > /dev/null
  $K quantize --onnx "/tmp/$m.onnx" --calibrate /tmp/calib --images 16 -o "/tmp/$m.qdq.onnx"
  $K bench --model "/tmp/$m.qdq.onnx" --backend cuda --precision int8 --batch "${BATCHES:-1,8}" \
    --warmup 1 --duration "${DURATION:-3}" --json "/tmp/kestrel-$m-int8.json"
  $PY bench/peers/torch_peer.py "/tmp/$m.onnx" --batch "${BATCHES:-1,8}" --json "/tmp/torch-$m.json" 2>&1 | grep -v Warning
  $PY bench/combine.py "/tmp/kestrel-$m.json" "/tmp/torch-$m.json" "$OUT/gpu-$m.json" "/tmp/kestrel-$m-int8.json"
done
