"""The accuracy table of scripts/qat-report.sh from its outputs (report.json of the QAT run and the
`kestrel val --json` files), as Markdown, with the two acceptance gaps.

usage: qat_report_table.py REPORT_DIR
"""
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


report = load("demo/report.json")
rows = []


def four_tch(m):
    return (m["ap"], m["ap50"], m["precision"], m["recall"]) if m else None


def four_val(m):
    return (m["map50_95"], m["map50"], m["precision"], m["recall"]) if m else None


def tch(label, m):
    if m:
        rows.append((label, four_tch(m), four_tch(m.get("mask"))))


def val(label, name):
    m = load(name)
    if m:
        rows.append((label, four_val(m), four_val(m.get("mask"))))


tch("Origin: float, tch", report.get("origin"))
val("Origin: float, CPU backend", "float-cpu.json")
val("Origin: FP16 CUDA engine", "float-cuda-fp16.json")
tch(f"PTQ ({report['calibration']}): tch fake-quant", report.get("ptq"))
val("PTQ: INT8 (Q/DQ) on the CPU backend", "ptq-cpu.json")
best = report.get("best")
if best:
    tch(f"QAT best (epoch {best['epoch'] + 1} of {len(report.get('qat', []))}): tch fake-quant", best)
val("QAT: INT8 (Q/DQ) on the CPU backend", "qat-cpu.json")
val("QAT: INT8 CUDA engine", "qat-cuda-int8.json")

card = ""
if os.path.exists(os.path.join(out, "card.txt")):
    card = open(os.path.join(out, "card.txt")).read().strip()
seg = any(masks for _, _, masks in rows)
if seg:
    # YOLOv9's segmentation table: P, R, mAP50, mAP50-95 for Box and for Mask.
    print("| model | Box P | Box R | Box mAP50 | Box mAP50-95 | Mask P | Mask R | Mask mAP50 | Mask mAP50-95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (ap, ap50, p, r), masks in rows:
        cells = f"| {label} | {p:.4f} | {r:.4f} | {ap50:.4f} | {ap:.4f} |"
        if masks:
            mp, m50, mpr, mr = masks
            cells += f" {mpr:.4f} | {mr:.4f} | {m50:.4f} | {mp:.4f} |"
        else:
            cells += " | | | |"
        print(cells)
else:
    print("| model | mAP50-95 | mAP50 | P | R |")
    print("|---|---|---|---|---|")
    for label, (ap, ap50, p, r), _ in rows:
        print(f"| {label} | {ap:.4f} | {ap50:.4f} | {p:.4f} | {r:.4f} |")
print()
origin = report.get("origin")
if origin and best:
    print(f"- QAT vs Origin: {best['ap'] - origin['ap']:+.4f} AP (acceptance: within 0.005)")
    if origin.get("mask") and best.get("mask"):
        print(f"- QAT vs Origin, masks: {best['mask']['ap'] - origin['mask']['ap']:+.4f} mask AP "
              "(acceptance: within 0.005)")
engine = load("qat-cuda-int8.json")
if engine and best:
    print(f"- INT8 engine vs QAT in tch: {engine['map50_95'] - best['ap']:+.4f} AP "
          f"(acceptance: within 0.005){' on ' + card if card else ''}")
    if engine.get("mask") and best.get("mask"):
        print(f"- INT8 engine vs QAT in tch, masks: "
              f"{engine['mask']['map50_95'] - best['mask']['ap']:+.4f} mask AP")
cpu = load("qat-cpu.json")
if cpu and best:
    print(f"- INT8 CPU backend vs QAT in tch: {cpu['map50_95'] - best['ap']:+.4f} AP")
print(f"- QAT per epoch (mAP50-95): "
      + ", ".join(f"{e['ap']:.4f}" for e in report.get("qat", [])))
