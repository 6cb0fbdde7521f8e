#!/usr/bin/env bash
# QAT recipe experiments: three variants at once on one GPU (the demo model leaves it mostly idle).
tar xJf .gpux/bundle.tar.xz; set --; source .gpu/env.sh
export KESTREL_WORKSPACE=$PWD
T=$PWD/.gpu/bin/kestrel-train
common="--weights models/gelan-t-shapes.onnx --data synthetic:0:4000 --device cuda:0 --batch-size 16 --iters 200 --calibrator histogram --method mse --no-eval-origin --no-eval-ptq --keep-head-float --supervise-head --exist-ok"
run() { name=$1; shift; timeout ${LIMIT:-540} $T qat quantize $common --project /tmp/exp --name $name "$@" > $OUT/$name.log 2>&1; cp /tmp/exp/$name/report.json $OUT/$name-report.json 2>/dev/null; }
run A --epochs ${EPOCHS:-6} --lr 1e-5 --detection-loss 1 &
run B --epochs ${EPOCHS:-6} --lr 3e-5 --detection-loss 1 &
run C --epochs ${EPOCHS:-6} --lr 1e-5 --detection-loss 4 &
wait
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/card.txt
