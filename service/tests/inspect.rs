//! `kestrel inspect` on a Q/DQ model and on an engine file: the quantization report, the SVG, the
//! engine header, and --profile's refusal on a backend without device timing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .expect("run kestrel")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("inspect")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn inspect_reports_quantization_draws_it_and_reads_engine_files() {
    let dir = scratch("qdq");
    let model = dir.join("m.onnx");
    ok(&kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--classes",
        "3",
        "--imgsz",
        "64",
        "--dynamic",
        "-o",
        p(&model),
    ]));
    let data = dir.join("calib");
    ok(&kestrel(&[
        "synth",
        "-o",
        p(&data),
        "--images",
        "4",
        "--imgsz",
        "64",
    ]));
    let q = dir.join("q.onnx");
    ok(&kestrel(&[
        "quantize",
        "--onnx",
        p(&model),
        "--calibrate",
        p(&data.join("images")),
        "--images",
        "4",
        "-o",
        p(&q),
    ]));
    let svg = dir.join("q.svg");
    let text = ok(&kestrel(&["inspect", p(&q), "--qdq", "--svg", p(&svg)]));
    assert!(
        text.contains("convolutions: ") && text.contains(" INT8, "),
        "{text}"
    );
    assert!(
        text.contains("every concat, add, pool, resize and split keeps one scale"),
        "{text}"
    );
    let summary = kestrel_tests::run_python("svg_summary.py", &[p(&svg)]);
    let v: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&ok(&kestrel(&["inspect", p(&q), "--qdq", "--json"]))).unwrap();
    let int8 = json["quantization"]["int8_convs"].as_u64().unwrap();
    assert!(int8 > 0);
    assert_eq!(v["rects"]["conv int8"], int8, "{v}");

    // The cuda engine's layers, without a GPU: one row per step, in text and JSON.
    let text = ok(&kestrel(&[
        "inspect",
        p(&q),
        "--layers",
        "--layers-precision",
        "int8",
        "--batch",
        "2",
    ]));
    assert!(
        text.contains("cuda engine layers (int8, batch buckets 1, 2)"),
        "{text}"
    );
    assert!(
        text.contains("conv int8") && text.contains("(Conv)"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&kestrel(&[
        "inspect",
        p(&q),
        "--layers",
        "--layers-precision",
        "int8",
        "--json",
    ])))
    .unwrap();
    let rows = json["layers"]["rows"].as_array().unwrap();
    // Each convolution the quantizer made INT8 runs on int8 tensor cores, or in fp16 after a
    // fake quantization where the engine keeps it float (at 64 px, the small deep layers), or,
    // the first one (3 input channels), as the stem kernel with the input's Q/DQ folded in.
    let count = |kind: &str| rows.iter().filter(|r| r["kind"] == kind).count() as u64;
    assert!(count("conv int8") > 0);
    assert_eq!(count("stem conv"), 1);
    assert_eq!(
        count("conv int8") + count("fake quantize") + count("stem conv"),
        int8
    );

    // An engine file: its header, and the ONNX inside it.
    let engine = dir.join("m.engine");
    ok(&kestrel(&[
        "build",
        "--onnx",
        p(&model),
        "--backend",
        "cpu",
        "--precision",
        "fp32",
        "--batch",
        "1:1:2",
        "-o",
        p(&engine),
    ]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&kestrel(&["inspect", p(&engine), "--json"]))).unwrap();
    assert_eq!(json["engine"]["backend"], "cpu", "{json}");
    assert_eq!(json["engine"]["profile"], serde_json::json!([1, 1, 2]));
    assert!(json["ops"]["Conv"].as_u64().unwrap() > 0, "{json}");
    let text = ok(&kestrel(&["inspect", p(&engine)]));
    assert!(text.contains("engine:      cpu backend"), "{text}");
    // --profile needs device timing (a cuda engine) and an engine, each said in one line.
    let out = kestrel(&["inspect", p(&engine), "--layers"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lists cuda engines"),
        "{err}"
    );
    for (target, want) in [(&engine, "--backend cuda"), (&model, "kestrel build")] {
        let out = kestrel(&["inspect", p(target), "--profile"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
