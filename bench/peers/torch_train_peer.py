"""PyTorch peer of a Kestrel training step, for side-by-side speed on the same GPU.

The network is the GELAN graph of a Kestrel-exported ONNX file in its training form: every Conv
becomes a bias-free convolution followed by BatchNorm (training mode), as kestrel-trainer builds it,
with fresh random weights. One step is what `trainer/tests/gpu.rs::network_step_speed` times in
tch: forward, loss = mean(output²), backward, SGD (Nesterov momentum 0.937, weight decay 5e-4), in
FP32 and in mixed precision (FP16 autocast, a fixed loss scale), on a batch already on the GPU. The
detection loss and data loading are left out on both sides: this compares the frameworks.
RepConvN (the Conv named `….m.{j}.cv1` in the export) gets its training form back, as in
kestrel-trainer: a 3x3 Conv+BatchNorm and a 1x1 Conv+BatchNorm on the same input, summed before the
activation. Both sides then run the same layers.

usage: torch_train_peer.py MODEL.onnx --batch 16 [--iters 30] [--json out.json]
"""
import argparse
import json
import re
import time

import onnx
import torch

from torch_peer import OnnxNet


class TrainNet(OnnxNet):
    """OnnxNet with trainable convolutions (random init), each followed by BatchNorm; RepConvN
    with its 1x1 branch."""

    REPCONVN = re.compile(r"\.m\.\d+\.cv1\.conv_out$")

    def __init__(self, model):
        super().__init__(model)
        self.layers = torch.nn.ModuleDict()
        self.branches = torch.nn.ModuleDict()
        for op, ins, outs, a in self.program:
            if op != "Conv":
                continue
            c_out, c_in_g, kh, kw = getattr(self, self.names[ins[1]]).shape
            g = a.get("group", 1)
            p = a.get("pads", [0, 0, 0, 0])
            conv = torch.nn.Conv2d(c_in_g * g, c_out, (kh, kw), a.get("strides", [1, 1]),
                                   (p[0], p[1]), a.get("dilations", [1, 1]), g, bias=False)
            self.layers[self.key(outs[0])] = torch.nn.Sequential(
                conv, torch.nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03))
            if self.REPCONVN.search(outs[0]) and (kh, kw) == (3, 3) and g == 1:
                self.branches[self.key(outs[0])] = torch.nn.Sequential(
                    torch.nn.Conv2d(c_in_g, c_out, 1, a.get("strides", [1, 1]), 0, bias=False),
                    torch.nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03))

    @staticmethod
    def key(name):
        return "l" + "".join(c if c.isalnum() else "_" for c in name)

    def conv(self, x, name, a):
        k = self.key(name)
        y = self.layers[k](x[0])
        if k in self.branches:
            y = y + self.branches[k](x[0])
        return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = TrainNet(onnx.load(args.model)).to(dev).train()
    params = list(net.layers.parameters()) + list(net.branches.parameters())
    print(f"{len(net.layers)} convolutions, {len(net.branches)} RepConvN 1x1 branches", flush=True)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.937, nesterov=True, weight_decay=5e-4)
    x = torch.rand(args.batch, 3, 640, 640, device=dev)
    results = []
    for amp in (False, True):
        # A fixed loss scale, as on the tch side: the step's cost is what is measured.
        scale = 1024.0 if amp else 1.0

        def step():
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                y = net(x)
            loss = y.float().square().mean()
            (loss * scale).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / args.iters
        r = {"precision": "mixed (fp16 autocast)" if amp else "fp32", "batch": args.batch,
             "ms_per_step": s * 1e3, "images_per_s": args.batch / s}
        print(json.dumps(r), flush=True)
        results.append(r)
    record = {"tool": "bench/peers/torch_train_peer.py", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "model": args.model, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
