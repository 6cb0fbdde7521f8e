#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried): which implementation each INT8 convolution
# of gelan-c at 640 should use. Builds the INT8 engine (batch profile 8:8:8, random weights, Q/DQ
# from `kestrel quantize`) once per variant of the build knobs, times every step with `kestrel
# inspect --profile --batch 8 --json` (eager launches, CUDA events) and joins the steps by the
# tensor they write. Writes $OUT/int8-variants.json: per layer the time (ms) of each variant, and
# per variant the total, and per precision the sum of the per-layer best ("oracle": what picking
# the fastest variant for every layer would give).
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash bench/int8-variants.sh [NAME=ENV ...]
# (a NAME starting with fp16 builds the float model in FP16 with ENV, for comparison).
# Without arguments the variants are: the default build (cuDNN fused plans timed against
# Kestrel's kernels), Kestrel's kernels only, and each Kestrel tile forced on every layer.
set -uo pipefail
cd "$(dirname "$0")/.."
variants=("$@")
OUT=${OUT:?set OUT}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
if [ ${#variants[@]} -eq 0 ]; then
  variants=(default=
    kestrel=KESTREL_FUSED_CONV=off
    m128n128="KESTREL_FUSED_CONV=off KESTREL_INT8_TILE=conv_int8_m128_n128"
    m128n64="KESTREL_FUSED_CONV=off KESTREL_INT8_TILE=conv_int8_m128_n64"
    m64n128="KESTREL_FUSED_CONV=off KESTREL_INT8_TILE=conv_int8_m64_n128"
    m64n64="KESTREL_FUSED_CONV=off KESTREL_INT8_TILE=conv_int8_m64_n64")
fi
names=()
for v in "${variants[@]}"; do
  name=${v%%=*}
  envs=${v#*=}
  names+=("$name")
  start=$(date +%s)
  # A name starting with fp16 builds the float model in FP16 instead, for comparison.
  src=$m.qdq.onnx prec=int8
  [[ $name == fp16* ]] && src=$m.onnx prec=fp16
  env $envs $K build --onnx $src --backend cuda --precision $prec --batch 8:8:8 \
    -o $m.$name.engine > "$OUT/build-$name.txt" 2>&1
  env $envs $K inspect $m.$name.engine --profile --batch 8 --json > "$OUT/profile-$name.json" \
    2>> "$OUT/build-$name.txt"
  echo "$name ($envs): $(( $(date +%s) - start )) s"
done
# The JSON's command names each variant with its environment (NAME=ENV), as it was given.
"$PY" - "$OUT" "${variants[@]}" <<'PY'
import datetime, json, re, subprocess, sys
out, specs = sys.argv[1], sys.argv[2:]
names = [v.split("=", 1)[0] for v in specs]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip().splitlines()[0]
per = {}
measured = {}
for n in names:
    try:
        prof = json.load(open(f"{out}/profile-{n}.json"))["profile"]
    except (OSError, ValueError, KeyError) as e:
        print(f"{n}: no profile ({e})")
        continue
    measured[n] = prof["measured_ms"]
    rows = {}
    for l in prof["layers"]:
        key = re.sub(r"\.int8$", "", l["layer"].split(" [")[0])
        r = rows.setdefault(key, {"ms": 0.0, "kinds": []})
        r["ms"] += l["ms"]
        r["kinds"].append(l["kind"] + (" [" + l["layer"].split(" [")[1] if " [" in l["layer"] else ""))
    per[n] = rows
names = [n for n in names if n in per]
keys = sorted(set().union(*[set(per[n]) for n in names]))
layers, oracle = [], {"int8": 0.0, "fp16": 0.0}
for k in keys:
    ms = {n: per[n][k]["ms"] for n in names if k in per[n]}
    best = {}
    for prec in oracle:
        mine = [n for n in ms if n.startswith("fp16") == (prec == "fp16")]
        if mine:
            best[prec] = min(mine, key=ms.get)
            oracle[prec] += ms[best[prec]]
    layers.append({"layer": k, "ms": ms, "best": best,
                   "kinds": {n: per[n][k]["kinds"] for n in names if k in per[n]}})
layers.sort(key=lambda r: -max(r["ms"].values()))
report = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": "OUT=$OUT bash bench/int8-variants.sh " + " ".join(f"'{v}'" for v in specs),
          "model": "gelan-c 640 INT8 (max calibration), random weights, batch 8",
          "timing": "kestrel inspect --profile: eager launches, CUDA events per step",
          "measured_ms": measured,
          "sum_ms": {n: sum(r["ms"] for r in per[n].values()) for n in names},
          "oracle_sum_ms": oracle, "layers": layers}
json.dump(report, open(f"{out}/int8-variants.json", "w"), indent=1)
print("measured ms:", {n: round(v, 3) for n, v in measured.items()}, "oracle sums", {p: round(v, 3) for p, v in oracle.items()})
print("layer".ljust(36), " ".join(n[:9].rjust(9) for n in names))
for r in layers[:60]:
    print(r["layer"][:36].ljust(36), " ".join(
        (f"{r['ms'][n]:.4f}" if n in r["ms"] else "-").rjust(9) for n in names),
          " ".join(r["best"].values()))
PY
