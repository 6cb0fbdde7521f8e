#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-bundle.sh`; carry .gpux, `tar xJf .gpux/bundle.tar.xz`):
# the one-pass stem kernel (the default; KESTREL_STEM_CONV=0 turns it off) against the unfused stem, gelan-c
# at 640 in FP16 and INT8 (Q/DQ from `kestrel quantize`, max calibration on synthetic scenes),
# batches 1 and 8, GPU compute without transfers, same card, same run, with layer profiles.
# Writes $OUT/stem-conv.json (images/s of each engine and the ratios) and the bench outputs.
#   OUT=$OUT bash bench/stem-conv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
for stem in 0 1; do
  for p in fp16 int8; do
    src=$m.onnx
    [ $p = int8 ] && src=$m.qdq.onnx
    KESTREL_STEM_CONV=$stem $K bench --model $src --backend cuda --precision $p --batch 1,8 \
      --no-cache --warmup 1 --duration 3 --profile --json "$OUT/stem$stem-$p.json" \
      > "$OUT/stem$stem-$p.txt" 2>&1
  done
done
"$PY" - "$OUT" <<'PY'
import datetime, json, subprocess, sys
out = sys.argv[1]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip()
runs, ratios = {}, {}
for p in ("fp16", "int8"):
    for stem in (0, 1):
        d = json.load(open(f"{out}/stem{stem}-{p}.json"))
        runs[f"{p}_stem_kernel" if stem else f"{p}_unfused"] = {
            str(r["batch"]): r["compute_images_per_s"] for r in d["results"]}
    for b in runs[f"{p}_unfused"]:
        ratios[f"{p}_b{b}"] = runs[f"{p}_stem_kernel"][b] / runs[f"{p}_unfused"][b]
for b in runs["fp16_unfused"]:
    ratios[f"int8_vs_fp16_b{b}_unfused"] = runs["int8_unfused"][b] / runs["fp16_unfused"][b]
    ratios[f"int8_vs_fp16_b{b}_stem_kernel"] = runs["int8_stem_kernel"][b] / runs["fp16_stem_kernel"][b]
json.dump({"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": "OUT=$OUT bash bench/stem-conv.sh", "model": "gelan-c 640, random weights",
           "what": "GPU compute images/s (no transfers), stem kernel vs unfused stem",
           "images_per_s": runs, "ratios": ratios},
          open(f"{out}/stem-conv.json", "w"), indent=1)
print(json.dumps(ratios, indent=1))
PY
