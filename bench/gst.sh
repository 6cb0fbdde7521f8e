#!/usr/bin/env bash
# Throughput and memory of kestrelinfer with the bundled model on the CPU backend: FRAMES frames of
# a moving test pattern (I420, W x H) through `kestrelinfer ! kestreloverlay ! fakesink` in
# gst-launch-1.0 (OVERLAY=0: without the overlay), the process's resident memory sampled every
# second. Writes bench/results/gst-kestrelinfer-cpu-*.json.
#   bash bench/gst.sh                 # 5000 frames of 640x480
#   FRAMES=500 W=1283 H=721 bash bench/gst.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FRAMES=${FRAMES:-5000}
W=${W:-640}
H=${H:-480}
OVERLAY=${OVERLAY:-1}
overlay=()
[ "$OVERLAY" = 1 ] && overlay=(! kestreloverlay)
MODEL=models/gelan-t-shapes.onnx
cargo build --release --locked -p gst-kestrel >&2
export GST_PLUGIN_PATH=$PWD/target/release
samples=$(mktemp)
start=$(date +%s.%N)
gst-launch-1.0 -q videotestsrc num-buffers="$FRAMES" pattern=ball \
  ! "video/x-raw,format=I420,width=$W,height=$H,framerate=1000/1" \
  ! kestrelinfer model="$MODEL" "${overlay[@]}" ! fakesink sync=false &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [ -n "$rss" ] && echo "$(date +%s.%N) $rss" >> "$samples"
  sleep 1
done
wait "$pid"
end=$(date +%s.%N)
out=bench/results/gst-kestrelinfer-cpu-$(date -u +%Y%m%dT%H%M).json
python3 - "$samples" "$start" "$end" "$FRAMES" "$W" "$H" "$out" "$OVERLAY" <<'PY'
import datetime, json, os, platform, sys
samples, start, end, frames, w, h, out, overlay = sys.argv[1:]
start, end, frames = float(start), float(end), int(frames)
rss = [(float(t) - start, int(kb)) for t, kb in (l.split() for l in open(samples))]
# Warm-up: the first 10 s (engine build, first frames); growth is measured after it.
warm = [kb for t, kb in rss if t >= 10.0] or [kb for _, kb in rss]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
record = {
    "what": f"kestrelinfer (bundled gelan-t-shapes, 320x320, CPU backend, batch 1) on {frames} "
            f"frames of videotestsrc pattern=ball, I420 {w}x{h}, "
            + ("then kestreloverlay, " if overlay == "1" else "")
            + "into fakesink; gst-launch-1.0",
    "command": "bash bench/gst.sh" + ("" if (frames, w, h, overlay) == (5000, "640", "480", "1") else
                                       f" (FRAMES={frames} W={w} H={h} OVERLAY={overlay})"),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": None},
    "frames": frames,
    "wall_s": end - start,
    "frames_per_s": frames / (end - start),
    "rss_kib": {"after_warmup": warm[0], "last": warm[-1], "max": max(k for _, k in rss),
                "growth_after_warmup": warm[-1] - warm[0], "samples": len(rss)},
}
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record, indent=2))
PY
rm -f "$samples"
