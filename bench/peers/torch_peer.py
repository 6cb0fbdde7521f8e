"""PyTorch peer of a Kestrel-exported GELAN model, for side-by-side speed on the same GPU.

The network is built from the ONNX file Kestrel exported (so it has exactly the same layers and
weights), as plain torch ops: F.conv2d, F.silu (the exporter's Sigmoid+Mul pair), pooling,
F.interpolate, cat/split, and the DFL/decoding tail. It runs in FP16, channels-last, in three
modes: eager, eager + CUDA graph, and torch.compile(mode="reduce-overhead") (CUDA graphs).

usage: torch_peer.py MODEL.onnx --batch 1,8 [--iters 200] [--modes eager,graph,compile] [--json out.json]
"""
import argparse
import json
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def attrs_of(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        g = model.graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.ints = {k: [int(x) for x in v.reshape(-1)] for k, v in inits.items() if v.dtype == np.int64}
        # Small float constants (Resize scales) as Python numbers: no device-to-host reads in forward.
        self.small = {k: [float(x) for x in v.reshape(-1)] for k, v in inits.items()
                      if v.dtype == np.float32 and v.size <= 16}
        self.names = {}
        for i, (k, v) in enumerate((k, v) for k, v in inits.items() if v.dtype == np.float32):
            key = f"c{i}"
            self.register_buffer(key, torch.from_numpy(v.copy()))
            self.names[k] = key
        self.input = [i.name for i in g.input if i.name not in inits][0]
        self.output = g.output[0].name
        nodes = list(g.node)
        consumers = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        # Fuse x * sigmoid(x) into F.silu, as a hand-written model uses nn.SiLU.
        skip, self.program = set(), []
        for n in nodes:
            if id(n) in skip:
                continue
            a = attrs_of(n)
            if n.op_type == "Sigmoid":
                users = consumers.get(n.output[0], [])
                if len(users) == 1 and users[0].op_type == "Mul" and n.input[0] in users[0].input:
                    skip.add(id(users[0]))
                    self.program.append(("SiLU", [n.input[0]], [users[0].output[0]], a))
                    continue
            self.program.append((n.op_type, list(n.input), list(n.output), a))

    def value(self, env, name):
        if name in env:
            return env[name]
        return getattr(self, self.names[name])

    def conv(self, x, name, a):
        """The ONNX Conv producing `name`: inputs `x` (data, weight[, bias]), attributes `a`."""
        p = a.get("pads", [0, 0, 0, 0])
        return F.conv2d(x[0], x[1], x[2] if len(x) > 2 else None, a.get("strides", [1, 1]),
                        (p[0], p[1]), a.get("dilations", [1, 1]), a.get("group", 1))

    def forward(self, images):
        env = {self.input: images}
        for op, ins, outs, a in self.program:
            x = [self.value(env, i) for i in ins if i and (i in env or i in self.names)]
            if op == "Conv":
                y = self.conv(x, outs[0], a)
            elif op == "SiLU":
                y = F.silu(x[0])
            elif op == "Sigmoid":
                y = torch.sigmoid(x[0])
            elif op == "Relu":
                y = F.relu(x[0])
            elif op == "Add":
                y = x[0] + x[1]
            elif op == "Sub":
                y = x[0] - x[1]
            elif op == "Mul":
                y = x[0] * x[1]
            elif op == "Div":
                y = x[0] / x[1]
            elif op == "Concat":
                y = torch.cat(x, dim=a["axis"])
            elif op == "Split":
                ys = torch.split(x[0], self.ints[ins[1]], dim=a.get("axis", 0))
                for o, t in zip(outs, ys):
                    env[o] = t
                continue
            elif op == "MaxPool":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.max_pool2d(x[0], a["kernel_shape"], a.get("strides", 1), (p[0], p[1]))
            elif op == "AveragePool":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.avg_pool2d(x[0], a["kernel_shape"], a.get("strides", 1), (p[0], p[1]),
                                 count_include_pad=bool(a.get("count_include_pad", 0)))
            elif op == "Resize":
                scales = self.small[ins[2]]
                y = F.interpolate(x[0], scale_factor=(scales[2], scales[3]), mode="nearest")
            elif op == "Reshape":
                shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(self.ints[ins[1]])]
                y = x[0].reshape(shape)
            elif op == "Transpose":
                y = x[0].permute(a["perm"])
            elif op == "Softmax":
                y = x[0].softmax(a.get("axis", -1))
            elif op == "Slice":
                start, end, axis = self.ints[ins[1]][0], self.ints[ins[2]][0], self.ints[ins[3]][0]
                y = x[0].narrow(axis, start, end - start)
            else:
                raise NotImplementedError(op)
            env[outs[0]] = y
        return env[self.output]


def time_fn(fn, iters):
    """Median-free throughput: CUDA events around `iters` calls after a warm-up."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms per call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--modes", default="eager,graph,compile")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    net = OnnxNet(onnx.load(args.model)).to(dev).half().eval().to(memory_format=torch.channels_last)
    results = []
    for b in [int(v) for v in args.batch.split(",")]:
        x = torch.rand(b, 3, 640, 640, device=dev).half().contiguous(memory_format=torch.channels_last)
        for mode in args.modes.split(","):
            t0 = time.time()
            with torch.inference_mode():
                if mode == "eager":
                    fn = lambda: net(x)
                elif mode == "graph":
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(3):
                            net(x)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        static_out = net(x)
                    fn = g.replay
                elif mode == "compile":
                    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True, dynamic=False)
                    fn = lambda: compiled(x)
                else:
                    raise SystemExit(f"unknown mode {mode}")
                ms = time_fn(fn, args.iters)
            r = {"batch": b, "mode": mode, "ms_per_batch": ms, "images_per_s": b * 1000.0 / ms,
                 "setup_s": time.time() - t0}
            print(json.dumps(r), flush=True)
            results.append(r)
    # The card's FP16 matmul rate, the ceiling the issue asks achieved TFLOP/s to be read against.
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.float16)
    bm = torch.randn(n, n, device=dev, dtype=torch.float16)
    mm_ms = time_fn(lambda: a @ bm, 50)
    matmul_tflops = 2 * n ** 3 / (mm_ms * 1e-3) / 1e12
    print(json.dumps({"fp16_matmul_8192_tflops": matmul_tflops}), flush=True)
    record = {"tool": "bench/peers/torch_peer.py", "device": torch.cuda.get_device_name(),
              "fp16_matmul_tflops": matmul_tflops,
              "torch": torch.__version__, "model": args.model, "precision": "fp16 channels-last",
              "timing": "CUDA events around 200 calls, input already on the GPU", "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
