#!/usr/bin/env bash
# On the GPU machine (with .gpu/bin/kestrel carried): where the INT8 engine of gelan-c at 640 gains
# on the FP16 engine, layer by layer. Builds both (batch profile 8:8:8, random weights; INT8 from the
# Q/DQ model of `kestrel quantize`, max calibration), times each step with `kestrel inspect
# --profile --batch 8 --json` (eager launches, CUDA events) and joins the steps by the tensor they
# write. Writes $OUT/layer-compare.json: per step kind and per layer the FP16 and INT8 times (ms)
# and their ratio, sorted by what each layer loses against a 2x INT8 speed-up.
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash bench/layer-compare.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
source bench/models.sh
gelan_models gelan-c
m=/tmp/gelan-c
for p in fp16 int8; do
  src=$m.onnx
  [ $p = int8 ] && src=$m.qdq.onnx
  $K build --onnx $src --backend cuda --precision $p --batch 8:8:8 -o $m.$p.engine \
    > "$OUT/build-$p.txt" 2>&1
  $K inspect $m.$p.engine --profile --batch 8 --json > "$OUT/profile-$p.json" 2>> "$OUT/build-$p.txt"
done
"$PY" - "$OUT" <<'PY'
import collections, datetime, json, re, subprocess, sys
out = sys.argv[1]
card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip().splitlines()[0]
def layers(p):
    prof = json.load(open(f"{out}/profile-{p}.json"))["profile"]
    rows = {}
    for l in prof["layers"]:
        key = re.sub(r"\.int8$", "", l["layer"].split(" [")[0])
        r = rows.setdefault(key, {"ms": 0.0, "kinds": []})
        r["ms"] += l["ms"]
        r["kinds"].append(l["kind"])
    kinds = collections.Counter()
    for l in prof["layers"]:
        kinds[l["kind"]] += l["ms"]
    return rows, dict(kinds), prof["measured_ms"], prof["sum_ms"]
f16, k16, m16, s16 = layers("fp16")
i8, k8, m8, s8 = layers("int8")
joined = []
for key in sorted(set(f16) | set(i8)):
    a, b = f16.get(key, {"ms": 0.0, "kinds": []}), i8.get(key, {"ms": 0.0, "kinds": []})
    joined.append({"layer": key, "fp16_ms": a["ms"], "int8_ms": b["ms"],
                   "fp16_kinds": a["kinds"], "int8_kinds": b["kinds"],
                   "ratio": a["ms"] / b["ms"] if b["ms"] else None,
                   "loss_vs_2x_ms": b["ms"] - a["ms"] / 2})
joined.sort(key=lambda r: -r["loss_vs_2x_ms"])
report = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": "OUT=$OUT bash bench/layer-compare.sh",
          "model": "gelan-c 640, random weights, batch 8",
          "timing": "kestrel inspect --profile: eager launches, CUDA events per step",
          "measured_ms": {"fp16": m16, "int8": m8}, "sum_ms": {"fp16": s16, "int8": s8},
          "by_kind_ms": {"fp16": k16, "int8": k8}, "layers": joined}
json.dump(report, open(f"{out}/layer-compare.json", "w"), indent=1)
print(f"measured fp16 {m16:.3f} ms, int8 {m8:.3f} ms, ratio {m16 / m8:.3f}")
for k in sorted(set(k16) | set(k8), key=lambda k: -max(k16.get(k, 0), k8.get(k, 0))):
    print(f"  {k:32s} fp16 {k16.get(k, 0):.3f}  int8 {k8.get(k, 0):.3f}")
print("layers losing most against 2x (ms: fp16, int8, ratio):")
for r in joined[:40]:
    ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
    print(f"  {r['layer']:40s} {r['fp16_ms']:.4f} {r['int8_ms']:.4f} {ratio:>5s}  {','.join(sorted(set(r['int8_kinds'])))}")
PY
