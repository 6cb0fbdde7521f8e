"""How much running independent branches side by side could save, from a measured layer profile.

Weights each node of the ONNX graph with the time of the engine layer that writes its output (a
per-layer profile from bench/layer-compare.sh or bench/int8-variants.sh), then compares the sum of
all layer times (what a single stream runs) with the longest dependency chain (what unlimited
concurrency would leave). No GPU needed: this is arithmetic on a stored profile.

    .venv/bin/python bench/critical-path.py MODEL.onnx PROFILE.json KEY
KEY picks the times: `fp16_ms` or `int8_ms` (layer-compare), or a variant name (int8-variants).
"""
import json
import sys

import onnx


def layer_times(profile: dict, key: str) -> dict:
    times = {}
    for layer in profile["layers"]:
        ms = layer[key] if key in layer else layer.get("ms", {}).get(key)
        if ms:
            times[layer["layer"]] = ms
    return times


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model, profile_path, key = sys.argv[1:]
    times = layer_times(json.load(open(profile_path)), key)
    graph = onnx.load(model, load_external_data=False).graph
    finish, total, matched = {}, 0.0, 0
    for node in graph.node:  # ONNX nodes are in topological order
        ms = sum(times.get(o, 0.0) for o in node.output)
        matched += ms > 0
        total += ms
        start = max([finish.get(i, 0.0) for i in node.input] + [0.0])
        for o in node.output:
            finish[o] = start + ms
    critical = max(finish.values())
    print(json.dumps({
        "model": model, "profile": profile_path, "key": key,
        "layers_in_profile": len(times), "nodes_matched": matched,
        "sum_ms": round(total, 4), "critical_path_ms": round(critical, 4),
        "saving_bound": round(1 - critical / total, 4),
    }))


if __name__ == "__main__":
    main()
