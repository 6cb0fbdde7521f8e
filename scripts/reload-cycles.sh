#!/usr/bin/env bash
# Unload and load one model N times against `kestrel serve` (no inference requests), printing the
# server's resident memory, threads and mappings every 20 cycles: how the per-reload growth of
# docs/RELIABILITY.md ("Soak", point 4) was measured.
#   bash scripts/reload-cycles.sh [N=100]     (K=path/to/kestrel, default target/release/kestrel)
#   WRAP="heaptrack -o /tmp/heaptrack.kestrel" bash scripts/reload-cycles.sh 60   # the heap profile
set -euo pipefail
cd "$(dirname "$0")/.."
K=${K:-$PWD/target/release/kestrel}
N=${1:-100}
PORT=${PORT:-8999}
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
for m in m p; do
  mkdir -p "$repo/$m/1"
  cp models/gelan-t-shapes.onnx "$repo/$m/1/model.onnx"
done
${WRAP:-} "$K" serve --listen "127.0.0.1:$PORT" --repository "$repo" > "$repo/serve.log" 2>&1 &
for _ in $(seq 100); do
  curl -sf "localhost:$PORT/v2/health/ready" > /dev/null && break
  sleep 1
done
pid=$(pgrep -n -f "kestrel serve --listen 127.0.0.1:$PORT")
state() { echo "rss_kb $(awk '/VmRSS/{print $2}' /proc/$pid/status) threads $(ls /proc/$pid/task | wc -l) maps $(wc -l < /proc/$pid/maps)"; }
echo "start $(state)"
for i in $(seq "$N"); do
  curl -sf -XPOST "localhost:$PORT/v2/repository/models/m/unload" > /dev/null || echo "cycle $i: unload failed"
  curl -sf -XPOST "localhost:$PORT/v2/repository/models/m/load" > /dev/null || echo "cycle $i: load failed"
  if ((i % 20 == 0)); then echo "cycle $i $(state)"; fi
done
kill -TERM "$pid"
wait || true
