"""Gather the training-step timings of `trainer/tests/gpu.rs::network_step_speed` (tch) and
`bench/peers/torch_train_peer.py` (PyTorch) from one or more GPU-machine runs into one JSON record
under bench/results/, with the tch/PyTorch ratio of each pair measured back to back.

usage: train_step_report.py OUT.json --card NAME --note TEXT  LABEL:TCH.jsonl:PEER.json ...
  TCH.jsonl: the test's `{"tool": "kestrel-trainer (tch)", ...}` lines (from its log);
  PEER.json: the peer's --json output.
"""
import argparse
import datetime
import json
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--card", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("pairs", nargs="+")
    args = ap.parse_args()
    runs, ratios = [], {}
    for pair in args.pairs:
        label, tch_path, peer_path = pair.split(":")
        tch = [json.loads(line) for line in open(tch_path) if line.startswith("{")]
        peer = json.load(open(peer_path))
        run = {"run": label, "pytorch": peer["results"], "kestrel_tch": tch, "ratio_flat_sgd_over_pytorch": {}}
        for p in peer["results"]:
            ours = [t for t in tch if t["optimizer"] == "flat SGD" and t["precision"] == p["precision"]]
            if ours:
                r = ours[0]["images_per_s"] / p["images_per_s"]
                run["ratio_flat_sgd_over_pytorch"][p["precision"]] = round(r, 3)
                ratios.setdefault(p["precision"], []).append(r)
        runs.append(run)
    record = {
        "card": args.card,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "commands": {
            "here": "../shared/tools/gpu-bundle --bin kestrel-train --file gelan-s.onnx -- -p kestrel-trainer --features cuda --test gpu",
            "gpu_machine": "bash scripts/gpu-train-session.sh tests (test-gpu-test network_step_speed, then bench/peers/torch_train_peer.py on the same gelan-s)",
            "report": "python3 bench/train_step_report.py " + " ".join(["OUT"] + args.pairs),
        },
        "what": "one training step of gelan-s at 640x640, batch 16, input on the GPU: forward (training-mode BatchNorm), loss = mean(output^2), backward, Nesterov SGD (momentum 0.937, weight decay 5e-4); cuDNN benchmark mode on both sides; both sides run the same layers (RepConvN with its 1x1 branch). Each run: PyTorch and tch back to back in one call on one card.",
        "note": args.note,
        "runs": runs,
        "median_ratio_flat_sgd_over_pytorch": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "min_ratio_flat_sgd_over_pytorch": {k: round(min(v), 3) for k, v in ratios.items()},
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(json.dumps(record["median_ratio_flat_sgd_over_pytorch"]), json.dumps(record["min_ratio_flat_sgd_over_pytorch"]))


if __name__ == "__main__":
    main()
