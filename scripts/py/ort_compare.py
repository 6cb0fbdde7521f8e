"""Run an ONNX model with onnxruntime (CPU) on a raw float32 input and compare with our output.

usage: ort_compare.py MODEL INPUT.f32 B,C,H,W OURS.f32 NUM_CLASSES [REFERENCE_OUT.f32]
                      [--prototypes OURS_PROTOTYPES.f32]
Prints JSON: relative L2 error of the whole output0 and of its box and score rows (and of the mask
coefficient rows of segmentation models), and the shape of every output; with a sixth argument,
also writes onnxruntime's output0 there (raw little-endian float32). With --prototypes, also the
relative L2 error of a segmentation model's output1 (`rel_l2_prototypes`).

`max_abs_scores` is the largest absolute difference of the class scores (probabilities). Judge
tiny scores by it rather than by their relative error: onnxruntime's and tract's Sigmoid are both
fast approximations whose relative error reaches 1e-3 at probabilities near 1e-5 (measured with
onnxruntime 1.32.0 and tract 0.23.9 on an AVX2 machine), while their absolute error stays near
1e-7.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

args = sys.argv[1:]
prototypes = None
if "--prototypes" in args:
    k = args.index("--prototypes")
    prototypes = args[k + 1]
    del args[k:k + 2]
model, inp, shape, ours, nc = args[:5]
shape = tuple(int(s) for s in shape.split(","))
x = np.fromfile(inp, dtype="<f4").reshape(shape)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
outputs = sess.run(None, {"images": x})
shapes = {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outputs)}
ref = outputs[[o.name for o in sess.get_outputs()].index("output0")]
got = np.fromfile(ours, dtype="<f4").reshape(ref.shape)
if len(args) > 5:
    ref.astype("<f4").tofile(args[5])
proto_err = None
if prototypes is not None:
    ref_p = outputs[[o.name for o in sess.get_outputs()].index("output1")]
    got_p = np.fromfile(prototypes, dtype="<f4").reshape(ref_p.shape)


def rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


masks = ref.shape[1] > 4 + int(nc)
if prototypes is not None:
    proto_err = rel_l2(got_p, ref_p)
print(json.dumps({
    "shape": list(ref.shape),
    "output_shapes": shapes,
    "rel_l2_masks": rel_l2(got[:, 4 + int(nc):], ref[:, 4 + int(nc):]) if masks else None,
    "rel_l2": rel_l2(got, ref),
    "rel_l2_prototypes": proto_err,
    "rel_l2_boxes": rel_l2(got[:, :4], ref[:, :4]),
    "rel_l2_scores": rel_l2(got[:, 4:4 + int(nc)], ref[:, 4:4 + int(nc)]),
    "max_abs_scores": float(np.abs(got[:, 4:4 + int(nc)] - ref[:, 4:4 + int(nc)]).max()),
    "max_score": float(ref[:, 4:].max()),
}))
