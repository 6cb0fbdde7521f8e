#!/usr/bin/env bash
# Multi-GPU placement of `kestrel serve` on a GPU machine with 2 or more GPUs (no Rust there).
# gelan-c (640, random weights, FP16, batches of up to 8), loopback only:
#   1. `--gpus 0`: the load test of bench/serve_load.py on one engine on GPU 0;
#   2. `--gpus 0,1`: the same load on one engine per GPU; /metrics must show batches run by
#      both instances (kestrel_instance_batches_total) and memory in use on both GPUs;
#   3. the bundled demo model with `--gpus 0` and with `--gpus 1`: one detect request each,
#      whose detections must match (same class, IoU >= 0.9, 99% of them);
#   4. `--gpus 0,<count>`: a GPU that does not exist; the model must not load, and the log must
#      name the GPUs that exist.
# Writes $OUT/multi-gpu.json (card, command, date, figures, checks) and the raw files under $OUT.
# Run after `bash scripts/gpu-bundle.sh` here, on a 2-GPU device:
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash bench/multi-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
source .gpu/env.sh
PY=${KESTREL_PYTHON:-/opt/torch/.venv/bin/python}
K=.gpu/bin/kestrel
REQUESTS=${REQUESTS:-3000}
CONCURRENCY=${CONCURRENCY:-48}
export KESTREL_CACHE_DIR=/tmp/kestrel-engines
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
count=$(wc -l < "$OUT/gpus.txt")
$K export --model gelan-c --imgsz 640 --dynamic -o /tmp/gelan-c.onnx > /dev/null
$K synth -o /tmp/img --images 1 --seed 5 --imgsz 640 --val-fraction 1 > /dev/null
image=$(find /tmp/img -name '*.png' | head -n 1)
fetch() { "$PY" -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" "$1"; }
post() { "$PY" -c "import sys,urllib.request; print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=open(sys.argv[2],'rb').read())).read().decode())" "$1" "$2"; }
serve() {  # name, model file, load requests (0: one detect request only), serve args...
  local name=$1 model=$2 requests=$3; shift 3
  local stem; stem=$(basename "$model" .onnx)
  $K serve --model "$model" --backend cuda --precision fp16 --max-batch-size 8 \
    --max-queue-delay-us 2000 --max-queue-size 256 --listen 127.0.0.1:0 "$@" \
    > "/tmp/$name.out" 2> "$OUT/$name.err" &
  local pid=$!
  for _ in $(seq 1500); do grep -q listening "/tmp/$name.out" 2>/dev/null && break; sleep 0.2; done
  local addr; addr=$(sed -n 's|listening on http://||p' "/tmp/$name.out")
  post "http://$addr/v1/models/$stem/detect" "$image" > "$OUT/$name-detect.json" 2>> "$OUT/$name.err"
  if [ "$requests" -gt 0 ]; then
    "$PY" bench/serve_load.py "$addr" "$stem" "$image" "$requests" "$CONCURRENCY" > "$OUT/$name-load.json"
  fi
  sleep 6  # one upkeep round: the GPU memory gauges
  fetch "http://$addr/metrics" > "$OUT/$name.prom" 2>> "$OUT/$name.err"
  kill -TERM "$pid"; wait "$pid"; echo "$name: serve exit $?" >> "$OUT/log.txt"
}
serve one_gpu /tmp/gelan-c.onnx "$REQUESTS" --gpus 0
serve two_gpus /tmp/gelan-c.onnx "$REQUESTS" --gpus 0,1
# Detections to compare: the trained demo model (random gelan-c weights detect nothing).
serve shapes_gpu0 models/gelan-t-shapes.onnx 0 --gpus 0
serve shapes_gpu1 models/gelan-t-shapes.onnx 0 --gpus 1
serve missing_gpu /tmp/gelan-c.onnx 0 --gpus "0,$count"
"$PY" - "$OUT" "$count" "$REQUESTS" "$CONCURRENCY" <<'PY'
import datetime, json, re, sys
out, count, requests, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def prom(name):
    series = {}
    for line in open(f"{out}/{name}.prom"):
        m = re.match(r'(kestrel_instance_batches_total|kestrel_gpu_memory_used_bytes)\{([^}]*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            series.setdefault(m.group(1), {})[labels["gpu"]] = float(m.group(3))
    return series
def detections(name):
    try:
        return json.load(open(f"{out}/{name}-detect.json"))["detections"]
    except (OSError, ValueError, KeyError):
        return None
def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0
def matched(a, b):
    """Share of a's detections with a same-class detection in b at IoU >= 0.9 (greedy)."""
    if a is None or b is None:
        return 0.0
    if not a and not b:
        return 1.0
    free, hits = list(b), 0
    for x in a:
        best = max((y for y in free if y["class_id"] == x["class_id"]),
                   key=lambda y: iou(x["box_xyxy"], y["box_xyxy"]), default=None)
        if best is not None and iou(x["box_xyxy"], best["box_xyxy"]) >= 0.9:
            free.remove(best)
            hits += 1
    return hits / max(len(a), len(b))
one, two = json.load(open(f"{out}/one_gpu-load.json")), json.load(open(f"{out}/two_gpus-load.json"))
m1, m2 = prom("one_gpu"), prom("two_gpus")
batches = m2.get("kestrel_instance_batches_total", {})
memory = m2.get("kestrel_gpu_memory_used_bytes", {})
missing_log = open(f"{out}/missing_gpu.err").read()
checks = {
    "both_instances_ran_batches": len(batches) == 2 and all(v > 0 for v in batches.values()),
    "memory_reported_on_both_gpus": sorted(memory) == ["0", "1"] and all(v > 0 for v in memory.values()),
    "gpu1_detections_match_gpu0": bool(detections("shapes_gpu0"))
        and matched(detections("shapes_gpu1"), detections("shapes_gpu0")) >= 0.99,
    "missing_gpu_named": f"GPU {count} was asked for" in missing_log and "this machine has" in missing_log,
    "no_load_errors": one["errors"] == 0 and two["errors"] == 0,
}
report = {
    "card": open(f"{out}/gpus.txt").read().strip().splitlines(),
    "command": "OUT=$OUT bash bench/multi-gpu.sh",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "model": "gelan-c 640 (random weights), cuda backend, fp16, max batch 8, 2 ms queue delay",
    "load": {"requests": requests, "concurrency": concurrency, "endpoint": "/v1/models/gelan-c/detect (PNG 640x640)"},
    "one_gpu": {"requests_per_s": one["requests_per_s"], "latency_ms": one["latency_ms"], "errors": one["errors"],
                "instance_batches_by_gpu": m1.get("kestrel_instance_batches_total", {})},
    "two_gpus": {"requests_per_s": two["requests_per_s"], "latency_ms": two["latency_ms"], "errors": two["errors"],
                 "instance_batches_by_gpu": batches, "gpu_memory_used_bytes_by_gpu": memory},
    "two_over_one_gpu_throughput": two["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else None,
    "demo_model_detections_gpu0": len(detections("shapes_gpu0") or []),
    "demo_model_detections_gpu1": len(detections("shapes_gpu1") or []),
    "demo_model_gpu1_matched_share": matched(detections("shapes_gpu1"), detections("shapes_gpu0")),
    "missing_gpu_log": [l for l in missing_log.splitlines() if "not loaded" in l],
    "checks": checks,
}
json.dump(report, open(f"{out}/multi-gpu.json", "w"), indent=2)
print(json.dumps(report, indent=2))
sys.exit(0 if all(checks.values()) else 1)
PY
