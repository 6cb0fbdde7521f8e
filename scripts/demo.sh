#!/usr/bin/env bash
# The main job: set up, build, then the end-to-end demo on the CPU backend with the bundled model
# (models/gelan-t-shapes.onnx: gelan-t at 320x320 trained on Kestrel's synthetic shapes by
# scripts/train-demo-model.sh):
#   inspect the model -> synthetic scenes it never saw -> detect -> evaluate -> GStreamer pipeline
#   -> benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p kestrel-service -p gst-kestrel   # gst-kestrel: libgstkestrel.so
K=target/release/kestrel
MODEL=models/gelan-t-shapes.onnx
OUT=out/demo
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. the bundled model =="
$K inspect "$MODEL" | grep -v '^meta names'
echo "== 2. synthetic scenes (seed 7, not a training seed; 320x320) =="
$K synth -o "$OUT/synth" --images 40 --seed 7 --imgsz 320 --val-fraction 0.5
echo "== 3. detect (display thresholds: confidence 0.25, IoU 0.45) =="
$K infer --model "$MODEL" "$OUT/synth/images/val" -o "$OUT/detections" --batch 4
echo "   annotated pictures and JSON: $OUT/detections/"
echo "== 4. evaluate on the val split (YOLOv9's settings: conf 0.001, IoU 0.7) =="
$K val --model "$MODEL" --data "$OUT/synth/data.yaml"
echo "== 5. the same model in a GStreamer pipeline (kestrelinfer ! kestreloverlay) over a synthetic clip =="
$K synth -o "$OUT/clip" --images 30 --seed 8 --imgsz 320 --val-fraction 1
$K pipeline --model "$MODEL" --input "$OUT/clip/images/val/%06d.png" --video annotated.avi -o "$OUT/pipeline"
echo "   (gst-launch-1.0 users: GST_PLUGIN_PATH=target/release, elements kestrelinfer and kestreloverlay)"
echo "== 6. benchmark the CPU backend =="
$K bench --model "$MODEL" --batch 1,4 --duration 5 --json "$OUT/bench.json"
echo "demo done: everything is under $OUT/"
