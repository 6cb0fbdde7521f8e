#!/usr/bin/env bash
# Reproduce the bundled demo model, models/gelan-t-shapes.onnx: gelan-t trained from seed 0 on
# Kestrel's synthetic shapes, then checked on a held-out set through the CPU runtime.
#
#   bash scripts/train-demo-model.sh train    # on a CUDA machine: trains runs/demo-model (resumes)
#   bash scripts/train-demo-model.sh finish   # anywhere: export, held-out evaluation, results JSON
#   bash scripts/train-demo-model.sh          # both
#   TASK=seg bash scripts/train-demo-model.sh # the segmentation demo model instead:
#                                             # gelan-t-seg -> models/gelan-t-seg-shapes.onnx
#
# The binaries are built here unless KESTREL_TRAIN (a kestrel-train built with `--features cuda`
# for `train`) and KESTREL (the kestrel CLI) point at prebuilt ones, as on a GPU machine without
# Rust. Knobs (defaults are what made the bundled model): EPOCHS, IMAGES, BATCH, IMGSZ, DEVICE,
# VAL_INTERVAL, NAME (the run folder under runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
EPOCHS=${EPOCHS:-16}
IMAGES=${IMAGES:-10000}       # synthetic training scenes (seed 0), rendered once and kept in memory
BATCH=${BATCH:-64}
IMGSZ=${IMGSZ:-320}
DEVICE=${DEVICE:-cuda:0}
HELDOUT=${HELDOUT:-300}      # held-out scenes, a seed the training never sees
VAL_INTERVAL=${VAL_INTERVAL:-4}
TASK=${TASK:-detect}
case "$TASK" in
  detect) ARCH=gelan-t; DEFAULT_NAME=demo-model; MODEL=models/gelan-t-shapes.onnx
          RESULTS=bench/results/demo-model.json; DOCS=docs/demo-model ;;
  seg) ARCH=gelan-t-seg; DEFAULT_NAME=seg-demo-model; MODEL=models/gelan-t-seg-shapes.onnx
       RESULTS=bench/results/seg-demo-model.json; DOCS=docs/seg-demo-model ;;
  *) echo "TASK=$TASK: give detect or seg" >&2; exit 2 ;;
esac
NAME=${NAME:-$DEFAULT_NAME}
RUN=runs/$NAME

train_bin() {
  if [ -n "${KESTREL_TRAIN:-}" ]; then echo "$KESTREL_TRAIN"; return; fi
  features=()
  [[ $DEVICE == cuda* ]] && features=(--features cuda)
  cargo build --release --locked -p kestrel-trainer "${features[@]}" >&2
  echo target/release/kestrel-train
}

kestrel_bin() {
  if [ -n "${KESTREL:-}" ]; then echo "$KESTREL"; return; fi
  cargo build --release --locked -p kestrel-service >&2
  echo target/release/kestrel
}

if [[ $stage == train || $stage == all ]]; then
  T=$(train_bin)
  mkdir -p runs
  resume=()
  [ -f "$RUN/weights/last.json" ] && resume=(--resume)
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 > "$RUN.card.txt" || true
  "$T" train --model "$ARCH" --data "synthetic:0:$IMAGES" --imgsz "$IMGSZ" --epochs "$EPOCHS" \
    --batch-size "$BATCH" --device "$DEVICE" --project runs --name "$NAME" --seed 0 \
    --close-mosaic 6 --val-interval "$VAL_INTERVAL" --cosine "${resume[@]}"
fi

if [[ $stage == finish || $stage == all ]]; then
  bash scripts/setup.sh >/dev/null
  K=$(kestrel_bin)
  T=${KESTREL_TRAIN:-}
  if [ -z "$T" ]; then DEVICE=cpu; T=$(train_bin); fi
  W=$RUN/weights/best.ema.safetensors
  [ -f "$W" ] || { echo "no $W: run the train stage first" >&2; exit 1; }
  mkdir -p models
  "$T" export --weights "$W" -o "$MODEL"
  python3 -c "import sys; print('\n'.join(sys.argv[1:]))" circle rectangle triangle hexagon star cross \
    > "${MODEL%.onnx}.labels.txt"
  rm -rf "$RUN/heldout"
  "$K" synth -o "$RUN/heldout" --images "$HELDOUT" --seed 424242 --imgsz "$IMGSZ" --val-fraction 1
  "$K" val --model "$MODEL" --data "$RUN/heldout/data.yaml" --json > "$RUN/heldout-cpu-runtime.json"
  mkdir -p "$DOCS"
  "$T" val --weights "$W" --data "$RUN/heldout/data.yaml" --device cpu \
    --pr-plot "$DOCS/pr-heldout.png" | tee "$RUN/heldout-trainer.txt"
  # The run's curves, redrawn here (a GPU machine without fonts draws them without labels).
  "$T" plots "$RUN"
  cp "$RUN/losses.png" "$RUN/map.png" "$RUN/results.csv" "$DOCS/"
  .venv/bin/python - "$RUN" "$MODEL" "$ARCH" "$RESULTS" <<'PY'
import datetime, json, os, re, sys
run, model, arch, results = sys.argv[1:5]
cpu = json.load(open(f"{run}/heldout-cpu-runtime.json"))
text = open(f"{run}/heldout-trainer.txt").read()
m = re.search(r"val: .*mAP50 ([0-9.]+) mAP50-95 ([0-9.]+)", text)
trainer = {"map50": float(m.group(1)), "map50_95": float(m.group(2))}
masks = re.search(r"val masks: .*mAP50 ([0-9.]+) mAP50-95 ([0-9.]+)", text)
summary = json.load(open(f"{run}/summary.json"))
out = {
    "what": f"the bundled demo model: {arch} trained on synthetic shapes (seed 0), evaluated on "
            "300 held-out scenes (seed 424242) through the CPU runtime on its exported ONNX and "
            "through the trainer (tch) on the same files",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "bash scripts/train-demo-model.sh",
    "model": model,
    "training_card": (open(f"{run}.card.txt").read().strip() if os.path.exists(f"{run}.card.txt") else None),
    "training": summary,
    "heldout_cpu_runtime": {k: cpu[k] for k in ("map50", "map50_95", "precision", "recall") if k in cpu},
    "heldout_trainer": trainer,
}
out["heldout_gap_map50_95"] = abs(out["heldout_cpu_runtime"]["map50_95"] - trainer["map50_95"])
if masks:
    out["heldout_trainer_masks"] = {"map50": float(masks.group(1)), "map50_95": float(masks.group(2))}
    if "mask" in cpu:
        out["heldout_cpu_runtime_masks"] = {k: cpu["mask"][k] for k in ("map50", "map50_95", "precision", "recall") if k in cpu["mask"]}
        out["heldout_gap_mask_map50_95"] = abs(out["heldout_cpu_runtime_masks"]["map50_95"] - out["heldout_trainer_masks"]["map50_95"])
json.dump(out, open(results, "w"), indent=2)
print(json.dumps({k: v for k, v in out.items() if k.startswith("heldout")}, indent=2))
PY
fi
