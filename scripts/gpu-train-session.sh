#!/usr/bin/env bash
# How the demo model is trained on the GPU machine (no Rust there), in calls of at most 10 minutes:
#   here:   ../shared/tools/gpu-bundle --bin kestrel-train -- -p kestrel-trainer --features cuda --test gpu
#   there:  bash scripts/gpu-train-session.sh calibrate SECONDS   # 2 epochs, then EPOCHS for SECONDS
#           bash scripts/gpu-train-session.sh train LIMIT          # train (or resume) for <= LIMIT s
#           bash scripts/gpu-train-session.sh tests                # GPU tests and the PyTorch peer
# Everything worth keeping is written under $OUT (at most 8 files come back from the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?calibrate|train|tests}
OUT=${OUT:?set OUT}
P=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH="$P/torch/lib:$P/nvidia/cudnn/lib:$P/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export KESTREL_TRAIN=$PWD/.gpu/bin/kestrel-train
nvidia-smi --query-gpu=name --format=csv,noheader >> "$OUT/log.txt" 2>&1
case "$what" in
  calibrate)
    budget=${2:?seconds of training to plan for}
    NAME=calib EPOCHS=2 VAL_INTERVAL=0 bash scripts/train-demo-model.sh train >> "$OUT/log.txt" 2>&1
    ips=$(awk -F, 'NR==3 {print $5}' runs/calib/results.csv)
    images=${IMAGES:-10000}
    # Per epoch: training, plus validation every 5 epochs (about 10 s each, amortized).
    epochs=$(awk -v b="$budget" -v n="$images" -v r="$ips" 'BEGIN { e = int(b / (n / r + 2)); print (e < 10 ? 10 : e) }')
    echo "calibration: epoch 2 at $ips images/s; $epochs epochs fit $budget s" | tee -a "$OUT/log.txt"
    echo "$epochs" > runs/epochs.txt
    rm -rf runs/calib
    ;;
  train)
    limit=${2:?seconds}
    [ -f runs/epochs.txt ] && export EPOCHS=$(cat runs/epochs.txt)
    timeout "$limit" bash scripts/train-demo-model.sh train \
      >> "$OUT/log.txt" 2>&1
    echo "train stage exit $? after at most $limit s" >> "$OUT/log.txt"
    R=runs/${NAME:-$([ "${TASK:-detect}" = seg ] && echo seg-demo-model || echo demo-model)}
    tar czf "$OUT/run.tgz" $R/*.png $R/*.csv $R/summary.json $R/weights/*.json 2>/dev/null
    for f in last.safetensors last.ema.safetensors best.ema.safetensors; do
      [ -f $R/weights/$f ] && cp $R/weights/$f "$OUT/$f"
    done
    ;;
  tests)
    .gpu/bin/test-gpu-test --include-ignored --nocapture --test-threads 1 >> "$OUT/log.txt" 2>&1
    echo "gpu tests exit $?" >> "$OUT/log.txt"
    # The peer's network: gelan-s exported here (the kestrel binary, built without GStreamer, or the
    # file bundled with `--file gelan-s.onnx`).
    onnx=$PWD/.gpu/files/gelan-s.onnx
    if [ ! -f $onnx ] && [ -x .gpu/bin/kestrel ]; then
      onnx=/tmp/gelan-s.onnx
      .gpu/bin/kestrel export --model gelan-s --classes 6 --imgsz 640 --dynamic -o $onnx \
        >> "$OUT/log.txt" 2>&1
    fi
    if [ -f $onnx ]; then
      (cd bench/peers && /opt/torch/.venv/bin/python torch_train_peer.py "$onnx" \
        --batch 16 --json "$OUT/train-peer.json") >> "$OUT/log.txt" 2>&1
      echo "peer exit $?" >> "$OUT/log.txt"
    fi
    ;;
esac
