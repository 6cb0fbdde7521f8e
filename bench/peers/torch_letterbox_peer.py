"""PyTorch peer of Kestrel's GPU letterbox, written as a user would: each RGB frame (uint8, host
memory) to the GPU, to float, F.interpolate (bilinear, half-pixel centres) to the letterboxed size,
padded with 114 and scaled to [0, 1], stacked into an NCHW batch, and copied back to the host, as
Kestrel's timed `GpuLetterboxer::run` does; with --on-gpu the batch stays on the GPU (the engine's
input), as `GpuLetterboxer::run_device` leaves it; with --pinned the frames start in pinned host
memory (torch's pin_memory, done before timing) and go to the GPU with non_blocking copies.

usage: torch_letterbox_peer.py FRAMES.u8 COUNT WIDTH HEIGHT [--size 640] [--iters 20] [--on-gpu] [--pinned]
FRAMES.u8 holds COUNT packed RGB frames of WIDTH x HEIGHT. Prints one JSON object with the median
milliseconds per batch.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def letterbox(frames, size, on_gpu):
    out = []
    for f in frames:
        h, w = f.shape[:2]
        r = min(size / h, size / w)
        nw, nh = round(w * r), round(h * r)
        x = f if torch.is_tensor(f) else torch.from_numpy(f)
        x = x.cuda(non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        left, top = round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)
        x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=114.0)
        out.append(x / 255.0)
    batch = torch.cat(out)
    if on_gpu:
        torch.cuda.synchronize()
        return batch
    return batch.cpu()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("frames")
    p.add_argument("count", type=int)
    p.add_argument("width", type=int)
    p.add_argument("height", type=int)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--on-gpu", action="store_true")
    p.add_argument("--pinned", action="store_true")
    a = p.parse_args()
    raw = np.fromfile(a.frames, dtype=np.uint8).reshape(a.count, a.height, a.width, 3)
    frames = [raw[i] for i in range(a.count)]
    if a.pinned:
        frames = [torch.from_numpy(f).pin_memory() for f in frames]
    letterbox(frames, a.size, a.on_gpu)  # warm-up
    times = []
    for _ in range(a.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        letterbox(frames, a.size, a.on_gpu)
        times.append((time.perf_counter() - t) * 1e3)
    where = "stays on the GPU" if a.on_gpu else "to the host"
    if a.pinned:
        where += ", frames in pinned memory"
    print(json.dumps({"peer": f"torch F.interpolate + F.pad per frame, batch {where}",
                      "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                      "ms_per_batch": float(np.median(times))}))


if __name__ == "__main__":
    main()
