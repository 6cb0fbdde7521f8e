//! `kestrel-train` end to end on a tiny synthetic run: train, export, and the exported ONNX runs
//! in the runtime's CPU backend with the trained weights (the EMA's, fused).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kestrel-train {args:?} failed:\n{text}"
    );
    text
}

#[test]
fn train_then_export_gives_a_model_the_runtime_runs() {
    let dir = std::env::temp_dir().join(format!("kestrel-train-cli-{}", std::process::id()));
    let project = dir.join("runs");
    let p = project.to_str().unwrap();
    let log = run(&[
        "train",
        "--model",
        "gelan-t",
        "--data",
        "synthetic:3:8",
        "--epochs",
        "2",
        "--imgsz",
        "64",
        "--batch-size",
        "4",
        "--project",
        p,
        "--name",
        "tiny",
    ]);
    assert!(log.contains("epoch 2: box"), "{log}");
    assert!(log.contains("val: 2 images"), "{log}");
    let weights = project.join("tiny/weights");
    let plot = image::open(project.join("tiny/losses.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (900, 450));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(weights.join("last.json")).unwrap()).unwrap();
    assert_eq!(state["epoch"], 2);
    assert_eq!(state["model"], "gelan-t");
    assert_eq!(state["data"], "synthetic:3:8");

    let val = run(&[
        "val",
        "--weights",
        weights.join("last.safetensors").to_str().unwrap(),
        "--data",
        "synthetic:3:8",
    ]);
    assert!(val.contains("mAP50-95"), "{val}");
    let onnx = dir.join("tiny.onnx");
    let ema = weights.join("last.ema.safetensors");
    run(&[
        "export",
        "--weights",
        ema.to_str().unwrap(),
        "-o",
        onnx.to_str().unwrap(),
    ]);
    let options = BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
    };
    let mut engine = build_engine(&onnx, &options).unwrap();
    let out = engine.run(&vec![0.5f32; 3 * 64 * 64], 1).unwrap();
    // 4 box rows + 6 synthetic classes, 84 anchors at 64x64.
    assert_eq!(out.len(), (4 + 6) * 84);
    assert!(out.iter().all(|v| v.is_finite()));

    // Unusable input is refused with the reason, no panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
        .args([
            "export",
            "--weights",
            onnx.to_str().unwrap(),
            "-o",
            "x.onnx",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(".safetensors checkpoint"), "{err}");
    let bad = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
        .args([
            "train", "--device", "cuda:0", "--epochs", "1", "--imgsz", "64",
        ])
        .output()
        .unwrap();
    if !tch::Cuda::is_available() {
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            !bad.status.success() && err.contains("no CUDA device"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
