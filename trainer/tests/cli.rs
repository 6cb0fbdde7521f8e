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

/// The CPU backend, FP32, one image per batch.
fn cpu_batch_1() -> BuildOptions {
    BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
        device: 0,
    }
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
    let run_dir = project.join("tiny");
    let weights = run_dir.join("weights");
    for png in ["losses.png", "map.png", "pr.png"] {
        let plot = image::open(run_dir.join(png)).unwrap();
        assert_eq!((plot.width(), plot.height()), (900, 450), "{png}");
    }
    // Validated every epoch: two rows with metrics, and a best checkpoint.
    let csv = std::fs::read_to_string(run_dir.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].starts_with("epoch,box,cls,dfl"), "{csv}");
    assert_eq!(rows[2].split(',').count(), 9, "{csv}");
    assert!(!rows[2].ends_with(','), "epoch 2 has no metrics: {csv}");
    assert!(weights.join("best.ema.safetensors").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["skipped_images"], 0);
    assert!(summary["final"]["map50_95"].as_f64().unwrap() >= 0.0);
    // `plots` redraws the curves from the checkpoint's history.
    std::fs::remove_file(run_dir.join("map.png")).unwrap();
    let redrawn = run(&["plots", run_dir.to_str().unwrap()]);
    assert!(redrawn.contains("wrote 2 epochs"), "{redrawn}");
    assert!(run_dir.join("map.png").exists());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(weights.join("last.json")).unwrap()).unwrap();
    assert_eq!(state["epoch"], 2);
    assert_eq!(state["model"], "gelan-t");
    assert_eq!(state["data"], "synthetic:3:8");

    let pr = dir.join("pr.png");
    let val = run(&[
        "val",
        "--weights",
        weights.join("last.safetensors").to_str().unwrap(),
        "--data",
        "synthetic:3:8",
        "--pr-plot",
        pr.to_str().unwrap(),
    ]);
    assert!(val.contains("mAP50-95"), "{val}");
    assert!(pr.exists(), "{val}");
    let onnx = dir.join("tiny.onnx");
    let ema = weights.join("last.ema.safetensors");
    run(&[
        "export",
        "--weights",
        ema.to_str().unwrap(),
        "-o",
        onnx.to_str().unwrap(),
    ]);
    let options = cpu_batch_1();
    // The class names recorded at training travel into the model's metadata.
    let model = kestrel_exporter::onnx::read_model(&onnx).unwrap();
    let names = model
        .metadata_props
        .iter()
        .find(|p| p.key == "names")
        .map(|p| p.value.clone())
        .unwrap_or_default();
    assert!(
        names.contains("circle") && names.contains("cross"),
        "{names}"
    );
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
    assert!(err.contains("already exported"), "{err}");
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

#[test]
fn a_segmentation_model_trains_on_masks_and_exports_both_outputs() {
    let dir = std::env::temp_dir().join(format!("kestrel-train-cli-seg-{}", std::process::id()));
    let project = dir.join("runs");
    let log = run(&[
        "train",
        "--model",
        "gelan-t-seg",
        "--data",
        "synthetic:3:8",
        "--epochs",
        "2",
        "--imgsz",
        "64",
        "--batch-size",
        "4",
        "--project",
        project.to_str().unwrap(),
        "--name",
        "seg",
    ]);
    assert!(
        log.contains("epoch 2: box") && log.contains(" seg "),
        "{log}"
    );
    assert!(log.contains("val masks: P"), "{log}");
    let run_dir = project.join("seg");
    let csv = std::fs::read_to_string(run_dir.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].ends_with(",seg,mask_precision,mask_recall,mask_map50,mask_map50_95"),
        "{csv}"
    );
    assert_eq!(rows[2].split(',').count(), 14, "{csv}");
    let seg_loss: f64 = rows[2].split(',').nth(9).unwrap().parse().unwrap();
    assert!(seg_loss > 0.0, "{csv}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let m = summary["final_masks"]["map50_95"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&m), "{summary}");

    let onnx = dir.join("seg.onnx");
    let ema = run_dir.join("weights").join("last.ema.safetensors");
    run(&[
        "export",
        "--weights",
        ema.to_str().unwrap(),
        "-o",
        onnx.to_str().unwrap(),
    ]);
    let options = cpu_batch_1();
    let mut engine = build_engine(&onnx, &options).unwrap();
    let (out, prototypes) = engine
        .run_with_prototypes(&vec![0.5f32; 3 * 64 * 64], 1)
        .unwrap();
    // 4 box rows + 6 classes + 32 mask coefficients, 84 anchors; 32 prototypes of 16x16.
    assert_eq!(out.len(), (4 + 6 + 32) * 84);
    assert_eq!(prototypes.map(<[f32]>::len), Some(32 * 16 * 16));

    // End to end: NMS and the masks inside the graph, run by the CPU backend's detector.
    let e2e = dir.join("seg-e2e.onnx");
    let log = run(&[
        "export",
        "--weights",
        ema.to_str().unwrap(),
        "-o",
        e2e.to_str().unwrap(),
        "--end2end",
        "onnx",
        "--conf",
        "0.001",
    ]);
    assert!(log.contains("end-to-end (onnx)"), "{log}");
    let mut detector = kestrel_runtime::Detector::new(build_engine(&e2e, &options).unwrap());
    let info = detector.info().end_to_end.clone().unwrap();
    assert_eq!(
        (info.max_detections, info.masks.map(|m| m.width)),
        (100, Some(16))
    );
    let (scene, _) = kestrel_runtime::synth::render_scene(3, 64, 64);
    let (mut dets, mut masks) = (Vec::new(), Vec::new());
    let nms = kestrel_runtime::nms::NmsConfig::evaluation();
    detector
        .detect_masks(&[scene], &nms, &mut dets, &mut masks)
        .unwrap();
    assert_eq!(masks[0].len(), dets[0].len());
    let _ = std::fs::remove_dir_all(dir);
}
