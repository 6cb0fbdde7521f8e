"""Run an ONNX model with onnxruntime (CPU) on a raw float32 input and compare with our output.

usage: ort_compare.py MODEL INPUT.f32 B,C,H,W OURS.f32 NUM_CLASSES [REFERENCE_OUT.f32]
Prints JSON: relative L2 error of the whole output0 and of its box and score rows; with a sixth
argument, also writes onnxruntime's output0 there (raw little-endian float32).
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, inp, shape, ours, nc = sys.argv[1:6]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
(ref,) = sess.run(["output0"], {"images": x})
got = np.fromfile(ours, dtype="<f4").reshape(ref.shape)
if len(sys.argv) > 6:
    ref.astype("<f4").tofile(sys.argv[6])


def rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


print(json.dumps({
    "shape": list(ref.shape),
    "rel_l2": rel_l2(got, ref),
    "rel_l2_boxes": rel_l2(got[:, :4], ref[:, :4]),
    "rel_l2_scores": rel_l2(got[:, 4:4 + int(nc)], ref[:, 4:4 + int(nc)]),
    "max_score": float(ref[:, 4:].max()),
}))
