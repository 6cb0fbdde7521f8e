#!/usr/bin/env bash
# Bounded load test of `kestrel serve` on the CPU backend with the bundled model, loopback only:
# REQUESTS image-endpoint requests from CONCURRENCY clients, with the dynamic batcher on (batches
# of up to 8, 2 ms delay) and off (batch 1, no delay), in one run on this machine.
# Writes bench/results/serve-cpu-*.json.
#   bash bench/serve.sh                       # 400 requests, 8 clients
#   REQUESTS=100 CONCURRENCY=4 bash bench/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-400}
CONCURRENCY=${CONCURRENCY:-8}
MODEL=models/gelan-t-shapes.onnx
cargo build --release --locked -p kestrel-service >&2
K=target/release/kestrel
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$K synth -o "$work/img" --images 1 --seed 5 --imgsz 640 --val-fraction 1 >/dev/null
image=$(find "$work/img" -name '*.png' | head -n 1)
run() {  # name, serve args...
  local name=$1; shift
  $K serve --model "$MODEL" --listen 127.0.0.1:0 "$@" > "$work/$name.out" 2> "$work/$name.err" &
  local pid=$!
  for _ in $(seq 100); do grep -q listening "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  local addr; addr=$(sed -n 's|listening on http://||p' "$work/$name.out")
  .venv/bin/python bench/serve_load.py "$addr" gelan-t-shapes "$image" "$REQUESTS" "$CONCURRENCY" \
    > "$work/$name.json"
  .venv/bin/python -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('http://$addr/metrics').read().decode())" \
    > "$work/$name.prom" || true
  kill -TERM "$pid"; wait "$pid" || true
}
run batcher_on --max-batch-size 8 --max-queue-delay-us 2000
run batcher_off --max-batch-size 1 --max-queue-delay-us 0
out=bench/results/serve-cpu-$(date -u +%Y%m%dT%H%M).json
python3 - "$work" "$REQUESTS" "$CONCURRENCY" "$out" <<'PY'
import datetime, json, os, re, sys
work, requests, concurrency, out = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
runs = {}
for name in ("batcher_on", "batcher_off"):
    r = json.load(open(f"{work}/{name}.json"))
    prom = open(f"{work}/{name}.prom").read()
    count = re.search(r'^kestrel_batch_size_count\{model="gelan-t-shapes"\} (\S+)', prom, re.M)
    total = re.search(r'^kestrel_batch_size_sum\{model="gelan-t-shapes"\} (\S+)', prom, re.M)
    if count and total and float(count.group(1)) > 0:
        r["mean_batch_images"] = float(total.group(1)) / float(count.group(1))
    runs[name] = r
record = {
    "what": f"kestrel serve, image endpoint (PNG 640x640 synthetic scene), bundled gelan-t-shapes "
            f"(320x320) on the CPU backend; {requests} requests from {concurrency} keep-alive clients "
            "(bench/serve_load.py), loopback",
    "command": "bash bench/serve.sh" + ("" if (requests, concurrency) == ("400", "8") else
                                          f" (REQUESTS={requests} CONCURRENCY={concurrency})"),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": None},
    "batcher_on": {"max_batch_size": 8, "max_queue_delay_us": 2000, **runs["batcher_on"]},
    "batcher_off": {"max_batch_size": 1, "max_queue_delay_us": 0, **runs["batcher_off"]},
}
on, off = runs["batcher_on"], runs["batcher_off"]
record["throughput_ratio_on_over_off"] = on["requests_per_s"] / off["requests_per_s"]
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record, indent=2))
PY
