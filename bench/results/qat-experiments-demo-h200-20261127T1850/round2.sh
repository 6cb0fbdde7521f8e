#!/usr/bin/env bash
# QAT experiments, round 2: learned ranges (--scale-lr) and a float layer, four runs at once.
tar xJf .gpux/bundle.tar.xz; set --; source .gpu/env.sh
export KESTREL_WORKSPACE=$PWD
T=$PWD/.gpu/bin/kestrel-train
common="--weights models/gelan-t-shapes.onnx --data synthetic:0:4000 --device cuda:0 --batch-size 16 --iters 200 --calibrator histogram --method mse --no-eval-origin --no-eval-ptq --keep-head-float --supervise-head --exist-ok --lr 3e-5 --detection-loss 1"
run() { name=$1; shift; timeout ${LIMIT:-540} $T qat quantize $common --project /tmp/exp --name $name "$@" > $OUT/$name.log 2>&1; cp /tmp/exp/$name/report.json $OUT/$name-report.json 2>/dev/null; }
E=${EPOCHS:-7}
run D --epochs $E --scale-lr 1e-3 &
run E --epochs $E --scale-lr 1e-4 &
run F --epochs $E --float-layers 2 &
run G --epochs $E --scale-lr 1e-3 --float-layers 2 &
wait
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/card.txt
