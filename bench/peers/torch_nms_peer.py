"""PyTorch peer of Kestrel's GPU decode + NMS: YOLOv9's non_max_suppression (detection models) as
users run it, with torchvision.ops.batched_nms, on a raw head already on the GPU; the kept
detections are moved to the host, as Kestrel's are.

usage: torch_nms_peer.py HEAD.f32 BATCH CLASSES ANCHORS [--iters 20]
Prints one JSON object: milliseconds per batch (median), with batched_nms and with YOLOv9's
class-offset trick (`*_offset_nms`), for the evaluation settings (conf 0.001,
IoU 0.7, multi-label) and the display settings (conf 0.25, IoU 0.45, best class), 300 detections,
30,000 candidates, and the kept counts per image.
"""
import argparse
import json
import time

import numpy as np
import torch
import torchvision


def xywh2xyxy(x):
    y = x.clone()
    y[:, 0] = x[:, 0] - x[:, 2] / 2
    y[:, 1] = x[:, 1] - x[:, 3] / 2
    y[:, 2] = x[:, 0] + x[:, 2] / 2
    y[:, 3] = x[:, 1] + x[:, 3] / 2
    return y


def non_max_suppression(prediction, conf_thres, iou_thres, multi_label, max_det=300, max_nms=30000,
                        offset=False):
    """YOLOv9's utils/general.py non_max_suppression for a detection head [B, 4 + nc, A]: with
    torchvision.ops.batched_nms, or (offset=True) YOLOv9's own class-offset trick with
    torchvision.ops.nms, which is faster on many classes."""
    bs = prediction.shape[0]
    nc = prediction.shape[1] - 4
    xc = prediction[:, 4 : 4 + nc].amax(1) > conf_thres
    prediction = prediction.transpose(-1, -2)
    output = [torch.zeros((0, 6), device=prediction.device)] * bs
    for xi, x in enumerate(prediction):
        x = x[xc[xi]]
        if not x.shape[0]:
            continue
        box, cls = x.split((4, nc), 1)
        box = xywh2xyxy(box)
        if multi_label:
            i, j = (cls > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], cls[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = cls.max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        if offset:
            c = x[:, 5:6] * 7680  # YOLOv9's max_wh
            keep = torchvision.ops.nms(x[:, :4] + c, x[:, 4], iou_thres)[:max_det]
        else:
            keep = torchvision.ops.batched_nms(x[:, :4], x[:, 4], x[:, 5].long(), iou_thres)[:max_det]
        output[xi] = x[keep]
    return [o.cpu() for o in output]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("head")
    p.add_argument("batch", type=int)
    p.add_argument("classes", type=int)
    p.add_argument("anchors", type=int)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    head = np.fromfile(a.head, dtype=np.float32).reshape(a.batch, 4 + a.classes, a.anchors)
    x = torch.from_numpy(head).cuda()
    result = {"peer": "YOLOv9 non_max_suppression with torchvision.ops.batched_nms",
              "torch": torch.__version__, "torchvision": torchvision.__version__,
              "gpu": torch.cuda.get_device_name(0)}
    for name, conf, iou, multi in (("evaluation", 0.001, 0.7, True), ("display", 0.25, 0.45, False)):
        for variant, offset in (("batched_nms", False), ("offset_nms", True)):
            out = non_max_suppression(x, conf, iou, multi, offset=offset)  # warm-up
            times = []
            for _ in range(a.iters):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = non_max_suppression(x, conf, iou, multi, offset=offset)
                times.append((time.perf_counter() - t) * 1e3)
            key = name if variant == "batched_nms" else f"{name}_{variant}"
            result[key] = {"ms_per_batch": float(np.median(times)), "kept": [int(o.shape[0]) for o in out]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
