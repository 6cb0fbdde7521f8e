"""Run an ONNX model with onnxruntime (CPU) on a raw float32 input and write one output.

usage: ort_run.py MODEL INPUT.f32 B,C,H,W OUTPUT_NAME OUT.f32
Writes the output as raw little-endian float32 and prints {"shape": [...]} as JSON.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, inp, shape, name, out = sys.argv[1:6]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
(value,) = sess.run([name], {"images": x})
value.astype("<f4").tofile(out)
print(json.dumps({"shape": list(value.shape)}))
