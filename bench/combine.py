"""Combine one run's Kestrel and PyTorch-peer JSON into one record with speed ratios.

usage: combine.py KESTREL.json TORCH.json OUT.json [KESTREL_INT8.json]
Ratios are Kestrel's GPU-compute images/s (no transfers) over each peer mode's images/s at the same
batch: both sides measured on the same card in the same run, with the input already on the GPU.
With a Kestrel INT8 record (the same network quantized), each row also gets INT8 images/s and the
INT8 / FP16 ratio.
"""
import json
import sys

k_path, t_path, out_path = sys.argv[1:4]
k = json.load(open(k_path))
t = json.load(open(t_path))
k8 = json.load(open(sys.argv[4])) if len(sys.argv) > 4 else None
rows = []
for r in k["results"]:
    b = r["batch"]
    row = {"batch": b, "kestrel_images_per_s": r.get("compute_images_per_s"),
           "kestrel_with_transfers_images_per_s": r["images_per_s"],
           "kestrel_achieved_tflops": r.get("achieved_tflops")}
    if r.get("achieved_tflops") and t.get("fp16_matmul_tflops"):
        row["fraction_of_fp16_matmul_rate"] = r["achieved_tflops"] / t["fp16_matmul_tflops"]
    for r8 in (k8 or {}).get("results", []):
        if r8["batch"] == b:
            row["kestrel_int8_images_per_s"] = r8.get("compute_images_per_s")
            row["kestrel_int8_with_transfers_images_per_s"] = r8["images_per_s"]
            if row["kestrel_images_per_s"] and r8.get("compute_images_per_s"):
                row["ratio_int8_vs_fp16"] = r8["compute_images_per_s"] / row["kestrel_images_per_s"]
    for p in t["results"]:
        if p["batch"] == b:
            row[f"torch_{p['mode']}_images_per_s"] = p["images_per_s"]
            if row["kestrel_images_per_s"]:
                row[f"ratio_vs_torch_{p['mode']}"] = row["kestrel_images_per_s"] / p["images_per_s"]
    rows.append(row)
record = {"card": t["device"], "fp16_matmul_tflops": t.get("fp16_matmul_tflops"), "date": k["date"], "model": k["model"], "precision": k["precision"],
          "kestrel_command": k["command"], "torch": t["torch"], "peer_timing": t["timing"],
          "kestrel_timing": "CUDA events around graph replays, no transfers (compute_ms in the Kestrel record)",
          "comparison": rows, "kestrel": k, "kestrel_int8": k8, "peer": t}
json.dump(record, open(out_path, "w"), indent=2)
for row in rows:
    print(json.dumps({key: (round(v, 3) if isinstance(v, float) else v) for key, v in row.items()}))
