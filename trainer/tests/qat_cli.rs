//! `kestrel-train qat …` on the CPU: a short calibrate + 2-iteration QAT run of the bundled demo
//! model, sensitivity analysis, evaluation and export of the result, and the user errors.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn kestrel_train(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = kestrel_train(args);
    assert!(success, "kestrel-train {args:?} failed:\n{text}");
    text
}

fn fails(args: &[&str], needle: &str) {
    let (success, text) = kestrel_train(args);
    assert!(!success, "kestrel-train {args:?} succeeded:\n{text}");
    assert!(text.contains(needle), "expected '{needle}' in:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
}

fn demo() -> PathBuf {
    kestrel_tests::workspace_root().join("models/gelan-t-shapes.onnx")
}

fn only(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}* in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

#[test]
fn calibrate_then_two_qat_iterations_then_eval_export_and_sensitivity() {
    let dir = kestrel_tests::scratch_dir("qat-cli");
    let project = dir.join("runs");
    let (p, d) = (project.to_str().unwrap(), demo());
    let d = d.to_str().unwrap();
    let short = [
        "--data",
        "synthetic:3:8",
        "--batch-size",
        "4",
        "--calib-batches",
        "1",
        "--calib-batch-size",
        "4",
        "--project",
        p,
    ];
    let mut args = vec!["qat", "quantize", "--weights", d, "--name", "t"];
    args.extend(short);
    args.extend([
        "--iters",
        "2",
        "--epochs",
        "1",
        "--supervise-head",
        "--detection-loss",
        "0.5",
        "--float-layers",
        "2",
        "--scale-lr",
        "1e-3",
    ]);
    let log = ok(&args);
    println!("{log}");
    let run = project.join("t");
    only(&run, "ptq_ap_");
    let epoch = only(&run, "qat_ep_0_ap_");
    assert!(epoch.to_str().unwrap().ends_with("_t.onnx"), "{epoch:?}");
    let best = run.join("qat_best_t.onnx");
    assert!(best.exists() && run.join("qat.png").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    for key in ["origin", "ptq", "best"] {
        let ap = report[key]["ap"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&ap), "{key}: {report}");
    }
    assert_eq!(report["qat"].as_array().unwrap().len(), 1);
    assert_eq!(report["calibration"], "histogram-mse");
    assert_eq!(report["detection_loss"], 0.5);
    assert_eq!(report["float_layers"], serde_json::json!([2]));
    assert_eq!(report["scale_lr"], 1e-3);
    assert_eq!(report["supervised"].as_array().unwrap().len(), 28);
    // The same name again needs --exist-ok.
    fails(&args, "--exist-ok");

    // The result evaluates as trained, exports as it is, and builds on the CPU backend.
    let b = best.to_str().unwrap();
    let log = ok(&["qat", "eval", "--weights", b, "--data", "synthetic:3:8"]);
    assert!(log.contains("mAP50-95"), "{log}");
    let out = dir.join("exported.onnx");
    let log = ok(&["export", "--weights", b, "-o", out.to_str().unwrap()]);
    assert!(
        log.contains("Q/DQ pairs") && log.contains("qat-histogram-mse"),
        "{log}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&best).unwrap());

    // Sensitivity: every layer with quantizers, ranked.
    let mut args = vec![
        "qat",
        "sensitive",
        "--weights",
        d,
        "--name",
        "s",
        "--num-image",
        "2",
    ];
    args.extend(short);
    let log = ok(&args);
    assert!(
        log.contains("layers whose quantization costs the most"),
        "{log}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("s/sensitive.json")).unwrap())
            .unwrap();
    let layers = s["layers"].as_array().unwrap();
    // gelan-t: the 17 of layers 0–22 with convolutions (the head's too); the two upsamples and
    // four concats own none.
    assert_eq!(layers.len(), 17, "{s}");
    assert!(
        layers
            .iter()
            .any(|l| l["layer"] == 22 && l["block"] == "DDetect"),
        "{s}"
    );
    assert_eq!(s["images"], 2);
    let aps: Vec<f64> = layers.iter().map(|l| l["ap"].as_f64().unwrap()).collect();
    assert!(aps.windows(2).all(|w| w[0] >= w[1]), "not ranked: {aps:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A YOLO dataset of one grey image per split with `classes` class names; the train split empty
/// when `empty_train`.
fn tiny_dataset(dir: &Path, classes: usize, empty_train: bool) -> PathBuf {
    for split in ["train", "val"] {
        let images = dir.join("images").join(split);
        let labels = dir.join("labels").join(split);
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&labels).unwrap();
        if split == "train" && empty_train {
            continue;
        }
        image::RgbImage::from_pixel(64, 64, image::Rgb([90, 90, 90]))
            .save(images.join("a.png"))
            .unwrap();
        std::fs::write(labels.join("a.txt"), "0 0.5 0.5 0.25 0.25\n").unwrap();
    }
    let names: Vec<String> = (0..classes).map(|i| format!("c{i}")).collect();
    let yaml = dir.join("data.yaml");
    std::fs::write(
        &yaml,
        format!(
            "path: {}\ntrain: images/train\nval: images/val\nnames: {names:?}\n",
            dir.display()
        ),
    )
    .unwrap();
    yaml
}

#[test]
fn user_errors_name_the_problem_and_the_fix() {
    let dir = kestrel_tests::scratch_dir("qat-cli-errors");
    let project = dir.join("runs");
    let p = project.to_str().unwrap();
    let d = demo();
    let d = d.to_str().unwrap();
    // Evaluating a float model as a quantized one.
    fails(
        &["qat", "eval", "--weights", d, "--data", "synthetic:3:8"],
        "has no quantizers",
    );
    // A layer to keep float that has no convolution, and a negative scale learning rate.
    let quick = [
        "--data",
        "synthetic:3:8",
        "--calib-batches",
        "1",
        "--calib-batch-size",
        "2",
        "--no-eval-origin",
        "--no-eval-ptq",
        "--project",
        p,
        "--exist-ok",
    ];
    let mut args = vec!["qat", "quantize", "--weights", d, "--float-layers", "10"];
    args.extend(quick);
    fails(&args, "layer 10 has no quantized convolution");
    let mut args = vec!["qat", "quantize", "--weights", d, "--scale-lr", "-1"];
    args.extend(quick);
    fails(&args, "scale learning rate -1");
    // An unfused training checkpoint.
    let ckpt = dir.join("last.safetensors");
    std::fs::write(&ckpt, b"x").unwrap();
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            ckpt.to_str().unwrap(),
            "--project",
            p,
        ],
        "unfused",
    );
    // An already quantized model: made by `kestrel-train qat quantize` with no QAT epochs.
    ok(&[
        "qat",
        "quantize",
        "--weights",
        d,
        "--data",
        "synthetic:3:8",
        "--epochs",
        "0",
        "--calib-batches",
        "1",
        "--calib-batch-size",
        "2",
        "--no-eval-origin",
        "--no-eval-ptq",
        "--project",
        p,
        "--name",
        "q",
    ]);
    let ptq = project.join("q/ptq_q.onnx");
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            ptq.to_str().unwrap(),
            "--project",
            p,
        ],
        "already has Q/DQ",
    );
    // A float model given to export, which only copies quantized ones.
    fails(
        &[
            "export",
            "--weights",
            d,
            "-o",
            dir.join("x.onnx").to_str().unwrap(),
        ],
        "already exported",
    );
    // Class counts that do not match.
    let two = tiny_dataset(&dir.join("two"), 2, false);
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            d,
            "--data",
            two.to_str().unwrap(),
            "--project",
            p,
        ],
        "the model has 6 classes",
    );
    // An empty training split: nothing to calibrate on.
    let empty = tiny_dataset(&dir.join("empty"), 6, true);
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            d,
            "--data",
            empty.to_str().unwrap(),
            "--project",
            p,
            "--name",
            "e",
        ],
        "no images found",
    );
    // A bad calibrator, a wrong input size, a file that is not a model.
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            d,
            "--calibrator",
            "minmax",
            "--project",
            p,
        ],
        "calibrator 'minmax'",
    );
    fails(
        &[
            "qat",
            "quantize",
            "--weights",
            d,
            "--imgsz",
            "640",
            "--project",
            p,
        ],
        "--imgsz 640",
    );
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    fails(
        &["qat", "eval", "--weights", junk.to_str().unwrap()],
        "junk.onnx",
    );
    let _ = std::fs::remove_dir_all(dir);
}
