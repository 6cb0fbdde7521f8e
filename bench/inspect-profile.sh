#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried): `kestrel inspect --profile --svg` on a
# gelan-c INT8 cuda engine (640, random weights, Q/DQ from `kestrel quantize` with max calibration
# on synthetic scenes, batch profile 1:8:8), at batch 1 and 8. Checks that each SVG parses
# (scripts/py/svg_summary.py, Python's XML parser) and that the per-layer times sum to within 10%
# of the engine's measured latency (median of CUDA-graph replays).
# Writes $OUT/inspect-profile.json and the SVGs and JSON reports under $OUT.
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash bench/inspect-profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
$K build --onnx $m.qdq.onnx --backend cuda --precision int8 --batch 1:8:8 -o $m.int8.engine \
  > "$OUT/build.txt" 2>&1
for b in 1 8; do
  $K inspect $m.int8.engine --profile --batch $b --svg "$OUT/gelan-c-int8-b$b.svg" \
    > "$OUT/inspect-b$b.txt" 2>&1
  $K inspect $m.int8.engine --profile --batch $b --json > "$OUT/inspect-b$b.json" 2>> "$OUT/inspect-b$b.txt"
  "$PY" scripts/py/svg_summary.py "$OUT/gelan-c-int8-b$b.svg" > "$OUT/svg-b$b.json"
done
"$PY" - "$OUT" <<'PY'
import datetime, json, subprocess, sys
out = sys.argv[1]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip().splitlines()[0]
rows, ok = [], True
for b in (1, 8):
    report = json.load(open(f"{out}/inspect-b{b}.json"))
    layers = report["profile"]["layers"]
    total = sum(l["ms"] for l in layers)
    measured = report["profile"]["measured_ms"]
    svg = json.load(open(f"{out}/svg-b{b}.json"))
    ratio = total / measured if measured else None
    within = ratio is not None and abs(ratio - 1) <= 0.10
    ok &= within and sum(svg["rects"].values()) > 0
    top = sorted(layers, key=lambda l: -l["ms"])[:5]
    rows.append({"batch": b, "layers": len(layers), "layer_sum_ms": total,
                 "measured_latency_ms": measured, "sum_over_measured": ratio,
                 "within_10_percent": within, "svg_rects_by_class": svg["rects"],
                 "slowest_layers": top})
report = {"card": card, "command": "OUT=$OUT bash bench/inspect-profile.sh",
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "model": "gelan-c 640, random weights, Q/DQ (kestrel quantize, max), cuda int8, profile 1:8:8",
          "results": rows, "pass": ok}
json.dump(report, open(f"{out}/inspect-profile.json", "w"), indent=2)
print(json.dumps({k: v for k, v in report.items()}, indent=1)[:3000])
sys.exit(0 if ok else 1)
PY
