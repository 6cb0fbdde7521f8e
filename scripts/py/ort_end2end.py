"""Run an end-to-end model (kestrel export --end2end onnx) with onnxruntime (CPU) on a raw float32
input and print its outputs as JSON.

usage: ort_end2end.py MODEL INPUT.f32 B,C,H,W
Prints {"name": {"shape": [...], "values": [...]}} for num_dets, det_boxes, det_scores,
det_classes (and det_masks: only its shape and the per-detection sums, to keep the output small).
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, inp, shape = sys.argv[1:4]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
outputs = dict(zip(names, sess.run(None, {"images": x})))
out = {}
for name, v in outputs.items():
    entry = {"shape": list(v.shape), "dtype": str(v.dtype)}
    if name == "det_masks":
        entry["sums"] = v.reshape(v.shape[0], v.shape[1], -1).sum(axis=2).ravel().tolist()
    else:
        entry["values"] = v.ravel().tolist()
    out[name] = entry
print(json.dumps(out))
