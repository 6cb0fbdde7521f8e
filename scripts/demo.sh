#!/usr/bin/env bash
# The main job: set up, build, then the end-to-end demo on the CPU backend.
#   export a GELAN model to ONNX -> inspect it -> synthetic scenes -> detect -> evaluate -> benchmark
# Until the trainer's demo model lands (issue 4), the model's weights are seeded random, i.e. untrained:
# every step runs for real, but the detections and the mAP of an untrained network are meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p kestrel-service
K=target/release/kestrel
OUT=out/demo
rm -rf "$OUT"
mkdir -p "$OUT"
printf 'circle\nrectangle\ntriangle\nhexagon\nstar\ncross\n' > "$OUT/labels.txt"

echo "== 1. export gelan-t (6 classes, 640x640, dynamic batch; UNTRAINED random weights) =="
$K export --model gelan-t --classes 6 --names "$OUT/labels.txt" --imgsz 640 --dynamic -o "$OUT/gelan-t.onnx"
echo "== 2. inspect =="
$K inspect "$OUT/gelan-t.onnx" | grep -v '^meta names'
echo "== 3. synthetic scenes (seed 0) =="
$K synth -o "$OUT/synth" --images 20 --seed 0
echo "== 4. detect (display thresholds; an untrained model finds nothing above conf 0.25) =="
$K infer --model "$OUT/gelan-t.onnx" "$OUT/synth/images/val" -o "$OUT/detections" --batch 2
echo "   annotated pictures and JSON: $OUT/detections/"
echo "== 5. evaluate on the val split (near zero for untrained weights) =="
$K val --model "$OUT/gelan-t.onnx" --data "$OUT/synth/data.yaml"
echo "== 6. benchmark the CPU backend =="
$K bench --model "$OUT/gelan-t.onnx" --batch 1,4 --duration 5 --json "$OUT/bench.json"
echo "demo done: everything is under $OUT/"
