#!/usr/bin/env bash
# `kestrel serve` on the GPU machine (no Rust, no curl there): the bundled model on the cuda
# backend (FP16), one image request, /metrics (GPU memory gauges), then the load test of
# bench/serve_load.py with the batcher on and off. Run after `bash scripts/gpu-bundle.sh` here:
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash scripts/gpu-serve-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
source .gpu/env.sh
PY=${KESTREL_PYTHON:-/opt/torch/.venv/bin/python}
K=.gpu/bin/kestrel
REQUESTS=${REQUESTS:-800}
CONCURRENCY=${CONCURRENCY:-16}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
$K synth -o /tmp/img --images 1 --seed 5 --imgsz 640 --val-fraction 1 >/dev/null
image=$(find /tmp/img -name '*.png' | head -n 1)
fetch() { "$PY" -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" "$1"; }
post() { "$PY" -c "import sys,urllib.request; print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=open(sys.argv[2],'rb').read())).read().decode())" "$1" "$2"; }
run() {  # name, serve args...
  local name=$1; shift
  $K serve --model models/gelan-t-shapes.onnx --backend cuda --precision fp16 \
    --listen 127.0.0.1:0 "$@" > "/tmp/$name.out" 2> "$OUT/$name.err" &
  local pid=$!
  for _ in $(seq 600); do grep -q listening "/tmp/$name.out" 2>/dev/null && break; sleep 0.2; done
  local addr; addr=$(sed -n 's|listening on http://||p' "/tmp/$name.out")
  post "http://$addr/v1/models/gelan-t-shapes/detect" "$image" > "$OUT/$name-detect.json"
  "$PY" bench/serve_load.py "$addr" gelan-t-shapes "$image" "$REQUESTS" "$CONCURRENCY" > "$OUT/$name-load.json"
  sleep 6  # one upkeep round: the GPU memory gauges
  fetch "http://$addr/metrics" > "$OUT/$name.prom"
  kill -TERM "$pid"; wait "$pid"; echo "$name: serve exit $?" >> "$OUT/log.txt"
}
run batcher_on --max-batch-size 8 --max-queue-delay-us 2000
run batcher_off --max-batch-size 1 --max-queue-delay-us 0
grep -h "gpu_memory\|batch_size_count\|batch_size_sum" "$OUT"/*.prom
cat "$OUT"/*-load.json
