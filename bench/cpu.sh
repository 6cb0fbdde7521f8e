#!/usr/bin/env bash
# CPU-backend benchmark of gelan-t and gelan-c at 640x640, batch 1 (random weights: speed does not
# depend on them). Writes one JSON per model under bench/results/ (card, command, date, figures).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p kestrel-service
K=target/release/kestrel
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
date=$(date -u +%Y%m%d)
for m in gelan-t gelan-c; do
  $K export --model "$m" --imgsz 640 --dynamic -o "$tmp/$m.onnx"
  $K bench --model "$tmp/$m.onnx" --backend cpu --batch 1 --warmup 2 --duration "${DURATION:-30}" \
    --min-iterations 5 --json "bench/results/cpu-$m-640-b1-$date.json"
done
