# Sourced by the GPU bench scripts (with K set to the kestrel binary): the models they share.
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
