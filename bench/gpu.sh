#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried, see NOTES in README): Kestrel's cuda backend
# against the PyTorch peer on the same card in the same run, at 640x640 with random weights.
# Writes $OUT/gpu-<model>.json with both sides and the ratios (copy it to bench/results/).
# PROFILE=1 adds each engine's per-layer profile to its bench output (kestrel bench --profile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
source bench/models.sh
for m in ${MODELS:-gelan-c}; do
  gelan_models "$m"
  $K bench --model "/tmp/$m.onnx" --backend cuda --precision fp16 --batch "${BATCHES:-1,8}" \
    --warmup 1 --duration "${DURATION:-3}" ${PROFILE:+--profile} --json "/tmp/kestrel-$m.json"
  # INT8: the Q/DQ model of bench/models.sh (post-training quantization, max calibration on
  # synthetic scenes, CPU backend), its INT8 engine on the same card in the same run.
  $K bench --model "/tmp/$m.qdq.onnx" --backend cuda --precision int8 --batch "${BATCHES:-1,8}" \
    --warmup 1 --duration "${DURATION:-3}" ${PROFILE:+--profile} --json "/tmp/kestrel-$m-int8.json"
  $PY bench/peers/torch_peer.py "/tmp/$m.onnx" --batch "${BATCHES:-1,8}" --json "/tmp/torch-$m.json" 2>&1 | grep -v Warning
  $PY bench/combine.py "/tmp/kestrel-$m.json" "/tmp/torch-$m.json" "$OUT/gpu-$m.json" "/tmp/kestrel-$m-int8.json"
done
