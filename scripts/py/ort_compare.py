"""Run an ONNX model with onnxruntime (CPU) on a raw float32 input and compare with our output.

usage: ort_compare.py MODEL INPUT.f32 B,C,H,W OURS.f32 NUM_CLASSES [REFERENCE_OUT.f32]
Prints JSON: relative L2 error of the whole output0 and of its box and score rows (and of the mask
coefficient rows of segmentation models), and the shape of every output; with a sixth argument,
also writes onnxruntime's output0 there (raw little-endian float32).
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, inp, shape, ours, nc = sys.argv[1:6]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
outputs = sess.run(None, {"images": x})
shapes = {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outputs)}
ref = outputs[[o.name for o in sess.get_outputs()].index("output0")]
got = np.fromfile(ours, dtype="<f4").reshape(ref.shape)
if len(sys.argv) > 6:
    ref.astype("<f4").tofile(sys.argv[6])


def rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


masks = ref.shape[1] > 4 + int(nc)
print(json.dumps({
    "shape": list(ref.shape),
    "output_shapes": shapes,
    "rel_l2_masks": rel_l2(got[:, 4 + int(nc):], ref[:, 4 + int(nc):]) if masks else None,
    "rel_l2": rel_l2(got, ref),
    "rel_l2_boxes": rel_l2(got[:, :4], ref[:, :4]),
    "rel_l2_scores": rel_l2(got[:, 4:4 + int(nc)], ref[:, 4:4 + int(nc)]),
    "max_score": float(ref[:, 4:].max()),
}))
