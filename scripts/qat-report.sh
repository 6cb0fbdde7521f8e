#!/usr/bin/env bash
# The quantization accuracy report (docs/quantization.md): the bundled demo model
# (models/gelan-t-shapes.onnx) on Kestrel's synthetic scenes, from PyTorch-style fake quantization
# to the INT8 engine:
#   Origin (float, tch) | PTQ (tch) | QAT best (tch) | INT8 on the CPU backend | INT8 CUDA engine
# MODEL=models/gelan-t-seg-shapes.onnx gives the segmentation model's table (Box and Mask columns).
# All rows are evaluated on the same 500 held-out scenes (seed 1000003: the validation split of
# synthetic:0:N, which the model never trained on), with YOLOv9's settings (conf 0.001, IoU 0.7).
#
#   DEVICE=cuda:0 bash scripts/qat-report.sh     # the report's recipe (below), about 9 min on an H200
#   bash scripts/qat-report.sh                   # CPU: the same, slowly; EPOCHS/ITERS shorten it
# The report's recipe: 6 epochs x 200 iterations, batch 16, Adam at 3e-5, distillation of every
# layer and the head's maps plus YOLOv9's detection loss, the head's last convolutions and layer 2
# in floating point. EPOCHS, ITERS, LR and EXTRA (the qat quantize options) change it; LR=1e-6
# EPOCHS=10 EXTRA= is the seed recipe.
# On the GPU machine (no Rust) KESTREL_TRAIN and KESTREL name prebuilt binaries; the CUDA rows
# run when DEVICE is cuda*. Writes $REPORT_OUT (default out/qat-report): the QAT run, the
# quantized models, the evaluations as JSON, and table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
OUT=${REPORT_OUT:-out/qat-report}
TRAIN_IMAGES=${TRAIN_IMAGES:-4000}
EPOCHS=${EPOCHS:-6}
ITERS=${ITERS:-200}
BATCH=${BATCH:-16}
LR=${LR:-3e-5}
EXTRA=${EXTRA---supervise-head --keep-head-float --detection-loss 1 --float-layers 2}
CALIBRATOR=${CALIBRATOR:-histogram}
METHOD=${METHOD:-mse}
MODEL=${MODEL:-models/gelan-t-shapes.onnx}   # models/gelan-t-seg-shapes.onnx: the seg table
PY=${KESTREL_PYTHON:-python3}

if [ -z "${KESTREL_TRAIN:-}" ]; then
  features=()
  [[ $DEVICE == cuda* ]] && features=(--features cuda)
  cargo build --release --locked -p kestrel-trainer "${features[@]}"
  KESTREL_TRAIN=target/release/kestrel-train
fi
if [ -z "${KESTREL:-}" ]; then
  cargo build --release --locked -p kestrel-service --no-default-features
  KESTREL=target/release/kestrel
fi
rm -rf "$OUT"
mkdir -p "$OUT"

"$KESTREL_TRAIN" qat quantize --weights "$MODEL" --data "synthetic:0:$TRAIN_IMAGES" \
  --device "$DEVICE" --batch-size "$BATCH" --epochs "$EPOCHS" --iters "$ITERS" --lr "$LR" $EXTRA \
  --calibrator "$CALIBRATOR" --method "$METHOD" --project "$OUT" --name demo 2>&1 \
  | tee "$OUT/qat.log"
QAT=$OUT/demo/qat_best_demo.onnx
PTQ=$(ls "$OUT"/demo/ptq_*demo.onnx)

# The held-out scenes as files, for `kestrel val`.
"$KESTREL" synth -o "$OUT/val" --images 500 --seed 1000003 --imgsz 320 --val-fraction 1 > /dev/null
DATA=$OUT/val/data.yaml
# The evaluations are independent: run them at once (the engine builds overlap the CPU rows).
pids=()
"$KESTREL" val --model "$MODEL" --data "$DATA" --json > "$OUT/float-cpu.json" & pids+=($!)
"$KESTREL" val --model "$PTQ" --data "$DATA" --json > "$OUT/ptq-cpu.json" & pids+=($!)
"$KESTREL" val --model "$QAT" --data "$DATA" --json > "$OUT/qat-cpu.json" & pids+=($!)
if [[ $DEVICE == cuda* ]]; then
  (
    "$KESTREL" val --model "$MODEL" --backend cuda --precision fp16 --data "$DATA" --batch 16 \
      --json > "$OUT/float-cuda-fp16.json"
    "$KESTREL" val --model "$QAT" --backend cuda --precision int8 --data "$DATA" --batch 16 \
      --json > "$OUT/qat-cuda-int8.json"
  ) & pids+=($!)
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/card.txt"
fi
for pid in "${pids[@]}"; do wait "$pid"; done
"$PY" scripts/py/qat_report_table.py "$OUT" | tee "$OUT/table.md"
