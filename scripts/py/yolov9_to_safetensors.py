"""Save the weights of a checkpoint trained with the original YOLOv9 code as a safetensors state
dict, for `kestrel-train import`.

usage: python yolov9_to_safetensors.py YOLOV9_REPO CHECKPOINT.pt OUT.safetensors [--no-ema]

YOLOv9's .pt files pickle whole model objects, so unpickling them needs the YOLOv9 repository's
code on the path (YOLOV9_REPO, a checkout of github.com/WongKinYiu/yolov9) and PyTorch. The EMA
weights are taken when the checkpoint has them (what YOLOv9 evaluates and exports), else `model`.
Tensors are written in FP32 with their state-dict names (`model.0.conv.weight`, …); then

    kestrel-train import --weights OUT.safetensors --model gelan-c --names names.txt -o gelan-c

keeps a GELAN checkpoint as it is and reparameterizes a dual-branch one (yolov9-c → gelan-c).
"""
import argparse
import sys

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("checkpoint")
    ap.add_argument("output")
    ap.add_argument("--no-ema", action="store_true", help="take `model` even when `ema` exists")
    args = ap.parse_args()
    sys.path.insert(0, args.repo)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict):
        model = None if args.no_ema else ckpt.get("ema")
        model = model or ckpt.get("model")
        if model is None:
            raise SystemExit(f"{args.checkpoint}: no 'model' or 'ema' entry; keys: {list(ckpt)}")
    else:
        model = ckpt
    state = model.state_dict() if hasattr(model, "state_dict") else model
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    names = getattr(model, "names", None)
    save_file(tensors, args.output)
    print(f"wrote {args.output}: {len(tensors)} tensors")
    if names:
        names = list(names.values()) if isinstance(names, dict) else list(names)
        with open(args.output + ".names.txt", "w") as f:
            f.write("\n".join(names) + "\n")
        print(f"wrote {args.output}.names.txt ({len(names)} classes)")


if __name__ == "__main__":
    main()
