#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-bundle.sh`; carry .gpux, `tar xJf .gpux/bundle.tar.xz`):
# one build knob off (VAR=0) against its default (on), gelan-c at 640 in FP16 and INT8 (Q/DQ from
# `kestrel quantize`, max calibration on synthetic scenes), batches 1 and 8, GPU compute without
# transfers, same card, same run, with layer profiles. Writes $OUT/NAME.json (images/s of each
# engine, the on/off ratios and INT8/FP16 both ways) and the bench outputs ($OUT/NAME-{off,on}-P.*).
#   OUT=$OUT bash bench/knob-ab.sh NAME VAR      e.g. thin-conv KESTREL_THIN_CONV
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
NAME=${1:?usage: knob-ab.sh NAME VAR}
VAR=${2:?usage: knob-ab.sh NAME VAR}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
for state in off on; do
  value=0
  [ $state = on ] && value=1
  for p in fp16 int8; do
    src=$m.onnx
    [ $p = int8 ] && src=$m.qdq.onnx
    env "$VAR=$value" $K bench --model $src --backend cuda --precision $p --batch 1,8 \
      --no-cache --warmup 1 --duration 3 --profile --json "$OUT/$NAME-$state-$p.json" \
      > "$OUT/$NAME-$state-$p.txt" 2>&1
  done
done
"$PY" - "$OUT" "$NAME" "$VAR" <<'PY'
import datetime, json, subprocess, sys
out, name, var = sys.argv[1:4]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip()
runs, ratios = {}, {}
for p in ("fp16", "int8"):
    for state in ("off", "on"):
        d = json.load(open(f"{out}/{name}-{state}-{p}.json"))
        runs[f"{p}_{state}"] = {str(r["batch"]): r["compute_images_per_s"] for r in d["results"]}
    for b in runs[f"{p}_off"]:
        ratios[f"{p}_b{b}_on_vs_off"] = runs[f"{p}_on"][b] / runs[f"{p}_off"][b]
for b in runs["fp16_off"]:
    for state in ("off", "on"):
        ratios[f"int8_vs_fp16_b{b}_{state}"] = runs[f"int8_{state}"][b] / runs[f"fp16_{state}"][b]
json.dump({"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": f"OUT=$OUT bash bench/knob-ab.sh {name} {var}",
           "model": "gelan-c 640, random weights",
           "what": f"GPU compute images/s (no transfers), {var}=1 (on) vs {var}=0 (off)",
           "images_per_s": runs, "ratios": ratios},
          open(f"{out}/{name}.json", "w"), indent=1)
print(json.dumps(ratios, indent=1))
PY
