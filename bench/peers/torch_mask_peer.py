"""PyTorch peer of Kestrel's GPU mask decoding, written as a user would, after YOLOv9's
`process_mask_native`: masks = sigmoid(coefficients @ prototypes), crop the letterbox padding,
F.interpolate (bilinear) to the frame size, zero outside each box, threshold 0.5. Inputs start on
the GPU; the timed result is the boolean masks on the GPU.

usage: torch_mask_peer.py DIR COUNT WIDTH HEIGHT [--proto 160] [--iters 20]
DIR holds protos.f32 (32 x proto x proto), coefficients.f32 (COUNT x 32) and boxes.f32 (COUNT x 4,
x1 y1 x2 y2 in frame pixels). Writes DIR/peer_masks.bits (np.packbits of the COUNT x HEIGHT x
WIDTH masks) and prints one JSON object with the median milliseconds per call.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def crop_mask(masks, boxes):
    n, h, w = masks.shape
    x1, y1, x2, y2 = torch.chunk(boxes[:, :, None], 4, 1)
    r = torch.arange(w, device=masks.device, dtype=x1.dtype)[None, None, :]
    c = torch.arange(h, device=masks.device, dtype=x1.dtype)[None, :, None]
    return masks * ((r >= x1) * (r < x2) * (c >= y1) * (c < y2))


def process_mask_native(protos, coefficients, boxes, shape):
    c, mh, mw = protos.shape
    masks = (coefficients @ protos.float().view(c, -1)).sigmoid().view(-1, mh, mw)
    gain = min(mh / shape[0], mw / shape[1])
    pad = (mw - shape[1] * gain) / 2, (mh - shape[0] * gain) / 2
    top, left = int(pad[1]), int(pad[0])
    bottom, right = int(mh - pad[1]), int(mw - pad[0])
    masks = masks[:, top:bottom, left:right]
    masks = F.interpolate(masks[None], shape, mode="bilinear", align_corners=False)[0]
    return crop_mask(masks, boxes).gt_(0.5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("count", type=int)
    p.add_argument("width", type=int)
    p.add_argument("height", type=int)
    p.add_argument("--proto", type=int, default=160)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    load = lambda name, shape: torch.from_numpy(  # noqa: E731
        np.fromfile(f"{a.dir}/{name}", dtype=np.float32).reshape(shape)).cuda()
    protos = load("protos.f32", (32, a.proto, a.proto))
    coefficients = load("coefficients.f32", (a.count, 32))
    boxes = load("boxes.f32", (a.count, 4))
    shape = (a.height, a.width)
    masks = process_mask_native(protos, coefficients, boxes, shape)  # warm-up
    times = []
    for _ in range(a.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        masks = process_mask_native(protos, coefficients, boxes, shape)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    np.packbits(masks.to(torch.uint8).cpu().numpy().reshape(-1)).tofile(f"{a.dir}/peer_masks.bits")
    print(json.dumps({"peer": "torch process_mask_native (matmul, sigmoid, F.interpolate, crop)",
                      "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                      "ms_per_call": float(np.median(times))}))


if __name__ == "__main__":
    main()
