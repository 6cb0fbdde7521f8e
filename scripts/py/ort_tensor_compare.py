"""Run an ONNX model with onnxruntime (CPU) on a raw float32 input, fetch one named tensor (an
intermediate one is made a graph output), and compare it with ours.

usage: ort_tensor_compare.py MODEL INPUT.f32 B,C,H,W TENSOR OURS.f32
Prints JSON: the tensor's shape and the relative L2 error of ours against onnxruntime's.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, inp, shape, tensor, ours = sys.argv[1:6]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
model = onnx.load(model_path)
if tensor not in [o.name for o in model.graph.output]:
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
(ref,) = sess.run([tensor], {"images": x})
got = np.fromfile(ours, dtype="<f4").reshape(ref.shape)
err = float(np.linalg.norm((got - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))
print(json.dumps({"tensor": tensor, "shape": list(ref.shape), "rel_l2": err}))
