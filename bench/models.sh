# Sourced by the GPU bench scripts, from the repository root: the CUDA machine's library paths
# (.gpu/env.sh), K (the kestrel binary), PY (the Python with torch and onnxruntime; a script may
# set it first) and the models the scripts share.
# .gpu/env.sh runs its arguments: sourced from a function it sees none, whatever the script got.
gpu_env() { source .gpu/env.sh; }
gpu_env
K=.gpu/bin/kestrel
PY=${PY:-${KESTREL_PYTHON:-/opt/torch/.venv/bin/python}}
# gelan_models NAME makes /tmp/NAME.onnx (640 px, dynamic batch, random weights) and
# /tmp/NAME.qdq.onnx (`kestrel quantize`, max calibration on 16 synthetic scenes in /tmp/calib),
# each only where it is missing, so the scripts of one device call build them once.
gelan_models() {
  local m=/tmp/$1
  [ -d /tmp/calib ] || $K synth -o /tmp/calib --images 16 --seed 5 > /dev/null
  [ -f "$m.onnx" ] || $K export --model "$1" --imgsz 640 --dynamic -o "$m.onnx" > /dev/null
  [ -f "$m.qdq.onnx" ] || $K quantize --onnx "$m.onnx" --calibrate /tmp/calib --images 16 \
    -o "$m.qdq.onnx" > /dev/null
}
