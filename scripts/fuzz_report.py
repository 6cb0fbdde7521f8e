#!/usr/bin/env python3
"""The fuzzing figures: record one `scripts/fuzz.sh` run as JSON, and rewrite the fuzzing table
of docs/RELIABILITY.md from every recorded run (the latest run of each target wins).

  fuzz_report.py record --out bench/results/fuzz-DATE.json --logs fuzz/logs --command CMD
      stdin: one line per target, `target seconds elapsed exit_code new_artifacts`
  fuzz_report.py table --results bench/results --doc docs/RELIABILITY.md

Standard library only. The figures come from libFuzzer's own final statistics
(-print_final_stats=1) and its last status line; nothing is estimated.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

BEGIN = "<!-- fuzz-table:begin (scripts/fuzz_report.py writes this table) -->"
END = "<!-- fuzz-table:end -->"

# What each target feeds, for the table.
COVERS = {
    "onnx_model": "ONNX protobuf decoding and re-encoding; shape inference, parameter/FLOP "
    "counts, Q/DQ report; the cuda backend's lowering to a plan; `describe_model`; tract "
    "parsing, optimisation and one run on the cpu backend",
    "engine_file": "the engine-file container (`EngineFile::decode`: sections, checksum, JSON "
    "header, embedded model hash) and its re-encoding",
    "image_decode": "`decode_image_bytes` (PNG/JPEG/BMP with the pixel limit read from the "
    "header) and the letterbox the service runs next",
    "kserve_request": "`parse_infer_request`: the KServe v2 JSON body and the binary tensor "
    "extension (`Inference-Header-Content-Length`), and re-encoding",
    "yolo_labels": "`parse_yolo_labels(_with_segments)`: boxes and YOLO-seg polygons, and their "
    "paint-order instance masks",
    "coco_json": "`Dataset::from_coco_json_text` (images, annotations, categories, polygon and "
    "RLE segmentations, instance masks) and `Rle::from_coco_string` (compressed RLE counts)",
    "repository_config": "`ModelConfig::from_json`: a model folder's `config.json` of the serve "
    "repository (fields, ranges, engine placements, the labels path kept inside the folder) "
    "and its re-encoding",
}


def stat(text, name):
    m = re.findall(r"stat::%s:\s*(\d+)" % name, text)
    return int(m[-1]) if m else None


def last_status(text):
    """Executions, corpus units and corpus size of libFuzzer's last status line."""
    lines = re.findall(r"^#(\d+)\s+\w+\s.*$", text, re.M)
    full = re.findall(r"^#(\d+)\s+\w+\s.*?corp: (\d+)/(\d+)(b|Kb|Mb)", text, re.M)
    execs = int(lines[-1]) if lines else None
    if not full:
        return execs, None, None
    _, units, size, unit = full[-1]
    scale = {"b": 1, "Kb": 1024, "Mb": 1024 * 1024}[unit]
    return execs, int(units), int(size) * scale


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "rustc": out(["rustc", "+nightly", "--version"]),
        "cargo_fuzz": out(["cargo", "fuzz", "--version"]),
        "sanitizer": "address",
    }


def record(args):
    entries = []
    for line in sys.stdin:
        if not line.strip():
            continue
        target, seconds, elapsed, rc, new_artifacts = line.split()
        log_path = os.path.join(args.logs, target + ".log")
        with open(log_path, errors="replace") as f:
            text = f.read()
        execs, units, size = last_status(text)
        executions = stat(text, "number_of_executed_units") or execs
        crash_files = re.findall(r"Test unit written to (\S+)", text)
        reason = re.search(r"(panicked at .*|ERROR: (?:AddressSanitizer|libFuzzer): .*)", text)
        done = re.search(r"Done (\d+) runs in (\d+) second", text)
        entries.append({
            "target": target,
            "seconds_asked": int(seconds),
            # libFuzzer's own fuzzing time (absent when it stopped on a crash), and the wall time
            # of the whole `cargo fuzz run`, its build check included.
            "seconds_fuzzed": int(done.group(2)) if done else None,
            "seconds_run": int(elapsed),
            "executions": executions,
            "exec_per_s": stat(text, "average_exec_per_sec"),
            "new_units": stat(text, "new_units_added"),
            "corpus_units": units,
            "corpus_bytes": size,
            "peak_rss_mb": stat(text, "peak_rss_mb"),
            "exit_code": int(rc),
            "crashes": len(crash_files) if int(rc) != 0 else 0,
            "crash_files": [os.path.basename(p) for p in crash_files],
            "crash_reason": reason.group(1)[:300] if reason else None,
        })
    doc = {"kind": "fuzz", "runs": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc["runs"].append({
        "finished": now,
        "command": args.command,
        "machine": machine(),
        "targets": entries,
    })
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


def table(args):
    latest = {}
    for path in sorted(glob.glob(os.path.join(args.results, "fuzz-*.json"))):
        with open(path) as f:
            doc = json.load(f)
        for run in doc.get("runs", []):
            for t in run["targets"]:
                latest[t["target"]] = (t, run, os.path.relpath(path, os.path.dirname(args.doc)))
    order = list(COVERS) + sorted(set(latest) - set(COVERS))
    rows = [
        "| target | what it feeds | seconds | executions | exec/s | corpus (inputs) | crashes "
        "in this run | crash inputs kept as regressions | run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in order:
        if name not in latest:
            continue
        t, run, path = latest[name]
        kept_dir = os.path.join("fuzz", "regressions", name)
        kept = len(os.listdir(kept_dir)) if os.path.isdir(kept_dir) else 0
        fmt = lambda v: "—" if v is None else f"{v:,}"
        rows.append(
            f"| `{name}` | {COVERS.get(name, '')} | {fmt(t.get('seconds_fuzzed'))} "
            f"| {fmt(t['executions'])} "
            f"| {fmt(t['exec_per_s'])} | {fmt(t['corpus_units'])} | {t['crashes']} | {kept} "
            f"| [{run['finished'][:10]}]({path}) |"
        )
    with open(args.doc) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.doc}: no fuzz table markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.doc, "w") as f:
        f.write(head + BEGIN + "\n" + "\n".join(rows) + "\n" + END + tail)
    print(f"rewrote the fuzz table of {args.doc} ({len(rows) - 2} targets)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--logs", required=True)
    r.add_argument("--command", required=True)
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    t.add_argument("--doc", required=True)
    args = p.parse_args()
    record(args) if args.cmd == "record" else table(args)


if __name__ == "__main__":
    main()
