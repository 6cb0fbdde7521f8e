"""Evaluate COCO detections with pycocotools (iouType bbox, or segm with --segm) and print the 12
stats as JSON.

Usage: coco_eval.py GT_JSON DETS_JSON [--segm]

With --segm, annotations and results carry "segmentation" as uncompressed RLE
({"size": [h, w], "counts": [...]}); results are compressed with pycocotools before evaluation.

GT_JSON is a COCO instances file; DETS_JSON a COCO results list
([{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]), possibly empty.
Prints one line to stdout: {"stats": [AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl],
"per_class_ap": {category_id: AP or -1}}. pycocotools' own progress output goes to stderr.
"""
import contextlib
import json
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def main(gt_path: str, dets_path: str, iou_type: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        gt = COCO(gt_path)
        with open(dets_path) as f:
            dets = json.load(f)
        if dets and iou_type == "segm":
            from pycocotools import mask as mask_utils
            for d in dets:
                h, w = d["segmentation"]["size"]
                d["segmentation"] = mask_utils.frPyObjects(d["segmentation"], h, w)
            dt = gt.loadRes(dets)
        elif dets:
            dt = gt.loadRes(dets_path)
        else:
            # loadRes cannot take an empty list (it looks at dets[0]); build the empty result by hand.
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        # precision[T, R, K, A, M]: per-category AP at area "all", maxDets 100.
        prec = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            per_class[int(cat_id)] = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
    print(json.dumps({"stats": [float(s) for s in ev.stats], "per_class_ap": per_class}))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] != "--segm"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], "segm" if len(sys.argv) == 4 else "bbox")
