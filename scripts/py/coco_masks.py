"""pycocotools' mask API on masks given as JSON, for the Rust tests of instance-mask ground truth.

Usage:
  coco_masks.py rle IN_JSON
      IN_JSON: [{"size": [h, w], "mask": [row-major 0/1 ...], "counts": "compressed string"}, ...]
      prints [{"counts": mask.encode(mask) as text, "decoded": row-major 0/1 of mask.decode of the
      given string, "area": mask.area of the given string}, ...]
  coco_masks.py polygons IN_JSON
      IN_JSON: [{"size": [h, w], "polygons": [[x1, y1, x2, y2, ...], ...]}, ...] (pixels)
      prints [{"counts": compressed string of the merged frPyObjects RLE, "area": its area}, ...]

Output is one JSON line on stdout.
"""
import json
import sys

import numpy as np
from pycocotools import mask as mask_utils


def rle(items):
    out = []
    for it in items:
        h, w = it["size"]
        m = np.asfortranarray(np.array(it["mask"], dtype=np.uint8).reshape(h, w))
        theirs = mask_utils.encode(m)["counts"].decode("ascii")
        ours = {"size": [h, w], "counts": it["counts"].encode("ascii")}
        decoded = mask_utils.decode(ours)
        out.append({
            "counts": theirs,
            "decoded": decoded.reshape(-1).astype(int).tolist(),
            "area": int(mask_utils.area(ours)),
        })
    return out


def polygons(items):
    out = []
    for it in items:
        h, w = it["size"]
        merged = mask_utils.merge(mask_utils.frPyObjects(it["polygons"], h, w))
        out.append({"counts": merged["counts"].decode("ascii"), "area": int(mask_utils.area(merged))})
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("rle", "polygons"):
        sys.exit(__doc__)
    with open(sys.argv[2]) as f:
        items = json.load(f)
    print(json.dumps(rle(items) if sys.argv[1] == "rle" else polygons(items)))
