#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-bundle.sh`; carry .gpux, `tar xJf .gpux/bundle.tar.xz`):
# Nsight Compute's counters for the kernels of gelan-c at 640, batch 8, FP16 and INT8 engines (Q/DQ
# from `kestrel quantize`), to see what limits each layer: time, DRAM bytes and throughput, compute
# and memory throughput against the card's peaks, achieved occupancy, issue-slot use and the stall
# reasons. Builds each engine (profile 8:8:8), then profiles the first LAUNCHES kernels of `kestrel
# bench` on it (the warm-up's CUDA graph replays, one node at a time; ncu leaves the clocks alone).
# Writes $OUT/ncu-{fp16,int8}.csv (ncu --page raw: one row per kernel) and $OUT/ncu-kernels.json
# (per kernel: name, ms, GB/s, percentages; per precision the totals by kernel family). About a
# second of profiling per kernel: 250 kernels take 4 to 5 minutes.
#   OUT=$OUT bash bench/ncu-kernels.sh [LAUNCHES [PRECISION ...]]   (320: more than one forward
#   pass; fp16 int8)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
LAUNCHES=${1:-320}
shift || true
PRECISIONS=("$@")
[ $# -eq 0 ] && PRECISIONS=(fp16 int8)
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
for p in "${PRECISIONS[@]}"; do
  src=$m.onnx
  [ $p = int8 ] && src=$m.qdq.onnx
  $K build --onnx $src --backend cuda --precision $p --batch 8:8:8 -o $m.ncu-$p.engine \
    > "$OUT/ncu-build-$p.txt" 2>&1
  timeout 400 "$NCU" --clock-control none --graph-profiling node --launch-count "$LAUNCHES" \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats \
    --metrics sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum \
    --csv --page raw \
    $K bench --model $m.ncu-$p.engine --backend cuda --batch 8 --warmup 0 --duration 0.01 \
    > "$OUT/ncu-$p.csv" 2> "$OUT/ncu-$p.log"
  echo "$p: ncu exit $? ($(wc -l < "$OUT/ncu-$p.csv") lines)"
done
"$PY" - "$OUT" "$LAUNCHES" <<'PY'
import csv, datetime, json, re, subprocess, sys
out, launches = sys.argv[1], sys.argv[2]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip().splitlines()[0]
want = {
    "ms": ("gpu__time_duration.sum", 1e-6),  # ns -> ms
    "dram_read_mb": ("dram__bytes_read.sum", 1e-6),
    "dram_write_mb": ("dram__bytes_write.sum", 1e-6),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    "memory_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    "occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    "registers": ("launch__registers_per_thread", 1),
    "grid": ("launch__grid_size", 1),
    "block": ("launch__block_size", 1),
}
stall = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
def num(v):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return None
report = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": f"OUT=$OUT bash bench/ncu-kernels.sh {launches}",
          "model": "gelan-c 640, random weights, batch 8 (INT8: max calibration)",
          "timing": "ncu --clock-control none, one kernel at a time (graph nodes), first launches of kestrel bench",
          "precisions": {}}
for p in ("fp16", "int8"):
    try:
        rows = list(csv.reader(open(f"{out}/ncu-{p}.csv")))
    except OSError:
        continue
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        print(f"{p}: no ncu table (see ncu-{p}.log)")
        continue
    head = rows[start]
    col = {h: i for i, h in enumerate(head)}
    kernels = []
    for r in rows[start + 2:]:  # the row after the header holds units
        if len(r) != len(head):
            continue
        k = {"name": r[col["Kernel Name"]][:120]}
        for key, (metric, scale) in want.items():
            v = num(r[col[metric]]) if metric in col else None
            k[key] = None if v is None else v * scale
        stalls = {stall.match(h).group(1): num(r[i]) for h, i in col.items() if stall.match(h)}
        top = sorted(((v, s) for s, v in stalls.items() if v), reverse=True)[:3]
        k["top_stalls"] = {s: round(v, 2) for v, s in top}
        if k["ms"]:
            k["gb_per_s"] = ((k["dram_read_mb"] or 0) + (k["dram_write_mb"] or 0)) / k["ms"]
        kernels.append(k)
    family = {}
    for k in kernels:
        f = re.sub(r"[<(].*", "", k["name"])
        f = re.sub(r"_(f16|f32|i8|v8|v16)\b.*", "", f) if not f.startswith(("sm", "cutlass", "xmma")) else f[:60]
        agg = family.setdefault(f, {"kernels": 0, "ms": 0.0})
        agg["kernels"] += 1
        agg["ms"] += k["ms"] or 0.0
    report["precisions"][p] = {"kernels": kernels,
                               "families": dict(sorted(family.items(), key=lambda x: -x[1]["ms"]))}
    print(f"{p}: {len(kernels)} kernels, {sum(k['ms'] or 0 for k in kernels):.3f} ms")
    for f, a in list(report["precisions"][p]["families"].items())[:12]:
        print(f"   {a['ms']:.3f} ms {a['kernels']:4d} x {f}")
json.dump(report, open(f"{out}/ncu-kernels.json", "w"), indent=1)
PY
