#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried): the segmentation model's INT8 engine against
# its FP16 engine, same card, same run, gelan-c-seg at 640x640 (random weights, 80 classes), batch 8
# (and 1), with the detector gelan-c alongside for reference. INT8 is the Q/DQ model from
# `kestrel quantize` (max calibration on synthetic scenes). Writes $OUT/gpu-seg-int8-vs-fp16.json
# (copy it to bench/results/) and the layer profiles of the seg engines at batch 8.
set -uo pipefail
cd "$(dirname "$0")/.."
source .gpu/env.sh
OUT=${OUT:-out/gpu-seg-bench}
mkdir -p "$OUT"
K=.gpu/bin/kestrel
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
[ -d /tmp/calib ] || $K synth -o /tmp/calib --images 16 --seed 5 > /dev/null
for m in ${MODELS:-gelan-c-seg gelan-c}; do
  $K export --model "$m" --imgsz 640 --dynamic -o "/tmp/$m.onnx" > /dev/null
  $K quantize --onnx "/tmp/$m.onnx" --calibrate /tmp/calib --images 16 -o "/tmp/$m.qdq.onnx" > /dev/null
  for p in fp16 int8; do
    onnx=/tmp/$m.onnx
    [ $p = int8 ] && onnx=/tmp/$m.qdq.onnx
    $K bench --model "$onnx" --backend cuda --precision $p --batch "${BATCHES:-1,8}" \
      --warmup 1 --duration "${DURATION:-3}" --json "$OUT/kestrel-$m-$p.json" > "$OUT/bench-$m-$p.txt" 2>&1
    if [ "$m" = gelan-c-seg ]; then
      $K bench --model "$onnx" --backend cuda --precision $p --batch 8 --warmup 1 --duration 1 \
        --profile > "$OUT/profile-$m-$p-b8.txt" 2>&1
    fi
  done
done
"$PY" - "$OUT" ${MODELS:-gelan-c-seg gelan-c} <<'PY'
import json, os, subprocess, sys, datetime
out, models = sys.argv[1], sys.argv[2:]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip().splitlines()[0]
rows = []
for m in models:
    runs = {p: json.load(open(f"{out}/kestrel-{m}-{p}.json")) for p in ("fp16", "int8")}
    for r16 in runs["fp16"]["results"]:
        b = r16["batch"]
        r8 = next(r for r in runs["int8"]["results"] if r["batch"] == b)
        rows.append({
            "model": m, "batch": b,
            "fp16_images_per_s": r16["compute_images_per_s"],
            "int8_images_per_s": r8["compute_images_per_s"],
            "ratio_int8_vs_fp16": r8["compute_images_per_s"] / r16["compute_images_per_s"],
            "fp16_compute_ms_median": r16["compute_ms"]["median"],
            "int8_compute_ms_median": r8["compute_ms"]["median"],
        })
record = {
    "what": "segmentation INT8 vs FP16 engine speed (GPU compute, no transfers), same card and run",
    "card": card,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "OUT=$OUT bash bench/seg-int8.sh",
    "int8_model": "kestrel quantize --calibrate (16 synthetic scenes, max calibration)",
    "original_project_reports": "1.8x on an RTX 4090 (TensorRT)",
    "comparison": rows,
}
json.dump(record, open(f"{out}/gpu-seg-int8-vs-fp16.json", "w"), indent=2)
for r in rows:
    print(f"{r['model']} b{r['batch']}: FP16 {r['fp16_images_per_s']:.0f} img/s, INT8 "
          f"{r['int8_images_per_s']:.0f} img/s, INT8/FP16 {r['ratio_int8_vs_fp16']:.2f}x")
PY
