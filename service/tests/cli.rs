//! The `kestrel` binary end to end: the happy path on a small model, and every user error giving a
//! one-line message that names the problem, with a non-zero exit and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kestrel_exporter::builder::GraphBuilder;
use kestrel_exporter::onnx::{self, pb};
use kestrel_exporter::shapes::Dim;

fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .expect("run kestrel")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts failure with a single-line message containing every `needle`.
fn assert_user_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.starts_with("error: ")),
        "expected one-line error messages, got: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "message lacks '{n}': {stderr}");
    }
}

/// The command succeeded; otherwise fail with what it printed on stderr.
fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A gelan-t with 64x64 input and random weights at `model`.
fn export_small(model: &Path, dynamic: bool) {
    let mut args = vec![
        "export",
        "--model",
        "gelan-t",
        "--imgsz",
        "64",
        "-o",
        p(model),
    ];
    if dynamic {
        args.push("--dynamic");
    }
    let out = kestrel(&args);
    assert_success(&out);
}

/// A model whose only input has the given dims (an Identity graph).
fn model_with_input(path: &Path, dims: Vec<Dim>) {
    let mut b = GraphBuilder::new();
    let x = b.input("images", dims);
    let y = b.node1("Identity", "id", &[&x], vec![]).unwrap();
    b.output(&y, pb::data_type::FLOAT, "");
    let model = b.finish_model("bad");
    onnx::write_model(&model, path).unwrap();
}

#[test]
fn export_synth_infer_val_bench() {
    let dir = scratch("happy");
    let model = dir.join("t.onnx");
    let names = dir.join("names.txt");
    std::fs::write(
        &names,
        "circle\nrectangle\ntriangle\nhexagon\nstar\ncross\n",
    )
    .unwrap();
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--classes",
        "6",
        "--names",
        p(&names),
        "--imgsz",
        "320",
        "--dynamic",
        "-o",
        p(&model),
    ]);
    assert_success(&out);
    let inspect = kestrel(&["inspect", p(&model)]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("images     FLOAT    [batch, 3, 320, 320]"),
        "{text}"
    );
    assert!(
        text.contains("output0    FLOAT    [batch, 10, 2100]"),
        "{text}"
    );

    let data = dir.join("synth");
    let out = kestrel(&[
        "synth",
        "-o",
        p(&data),
        "--images",
        "5",
        "--seed",
        "3",
        "--imgsz",
        "320",
    ]);
    assert_success(&out);

    let results = dir.join("out");
    let out = kestrel(&[
        "infer",
        "-m",
        p(&model),
        p(&data.join("images")),
        "-o",
        p(&results),
        "--conf",
        "0.00001",
        "--batch",
        "2",
    ]);
    assert_success(&out);
    let jsons: Vec<_> = std::fs::read_dir(&results)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(jsons.len(), 5);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(jsons[0].path()).unwrap()).unwrap();
    assert_eq!(v["width"], 320);
    let dets = v["detections"].as_array().unwrap();
    assert!(
        !dets.is_empty(),
        "random weights still give low-score boxes at conf 1e-5"
    );
    for d in dets {
        let b = d["box"].as_array().unwrap();
        let b: Vec<f64> = b.iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(
            b[0] >= 0.0 && b[2] <= 320.0 && b[0] <= b[2] && b[1] <= b[3],
            "{b:?}"
        );
        assert!(
            [
                "circle",
                "rectangle",
                "triangle",
                "hexagon",
                "star",
                "cross"
            ]
            .contains(&d["class_name"].as_str().unwrap())
        );
    }

    let out = kestrel(&[
        "val",
        "-m",
        p(&model),
        "--data",
        p(&data.join("data.yaml")),
        "--json",
    ]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["map50_95"].as_f64().unwrap() >= 0.0);

    let json = dir.join("bench.json");
    let out = kestrel(&[
        "bench",
        "-m",
        p(&model),
        "--batch",
        "1,2",
        "--warmup",
        "0",
        "--duration",
        "0.1",
        "--min-iterations",
        "2",
        "--json",
        p(&json),
    ]);
    assert_success(&out);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert!(v["results"][1]["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["backend"], "cpu");
}

#[test]
fn missing_model_file() {
    let dir = scratch("missing");
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let out = kestrel(&["infer", "-m", p(&dir.join("nope.onnx")), p(&img)]);
    assert_user_error(
        &out,
        &["nope.onnx", "model file not found", "kestrel export"],
    );
    let out = kestrel(&["inspect", p(&dir.join("nope.onnx"))]);
    assert_user_error(&out, &["model file not found"]);
}

#[test]
fn end_to_end_needs_the_cuda_backend() {
    let dir = scratch("end-to-end");
    let model = dir.join("m.onnx");
    export_small(&model, false);
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let out = kestrel(&["infer", "-m", p(&model), "--end-to-end", p(&img)]);
    assert_user_error(&out, &["--end-to-end", "--backend cuda"]);
    let out = kestrel(&["bench", "-m", p(&model), "--end-to-end"]);
    assert_user_error(&out, &["--end-to-end", "--backend cuda"]);
    let out = kestrel(&[
        "bench",
        "-m",
        p(&model),
        "--backend",
        "cuda",
        "--end-to-end",
        "--frame-size",
        "1920",
    ]);
    assert_user_error(&out, &["--frame-size", "WIDTHxHEIGHT"]);
}

#[test]
fn truncated_and_non_onnx_files() {
    let dir = scratch("truncated");
    let good = dir.join("good.onnx");
    export_small(&good, false);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let out = kestrel(&["infer", "-m", p(&cut), p(&img)]);
    assert_user_error(&out, &["cut.onnx", "not an ONNX model", "truncated"]);
    let text = dir.join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    let out = kestrel(&["inspect", p(&text)]);
    assert_user_error(&out, &["notes.onnx", "not an ONNX model"]);
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, "").unwrap();
    let out = kestrel(&["bench", "-m", p(&empty)]);
    assert_user_error(&out, &["empty.onnx", "empty"]);
}

#[test]
fn wrong_input_rank_and_channels() {
    let dir = scratch("shapes");
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let rank3 = dir.join("rank3.onnx");
    model_with_input(&rank3, vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(64)]);
    let out = kestrel(&["infer", "-m", p(&rank3), p(&img)]);
    assert_user_error(&out, &["rank3.onnx", "rank 3", "[batch, 3, H, W]"]);
    let four = dir.join("four.onnx");
    model_with_input(
        &four,
        vec![Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(64), Dim::Fixed(64)],
    );
    let out = kestrel(&["infer", "-m", p(&four), p(&img)]);
    assert_user_error(&out, &["four.onnx", "4 channels", "RGB"]);
}

#[test]
fn unknown_model_name_and_bad_options() {
    let dir = scratch("names");
    let out = kestrel(&["export", "--model", "gelan-x", "-o", p(&dir.join("x.onnx"))]);
    assert_user_error(
        &out,
        &[
            "unknown model 'gelan-x'",
            "gelan-t, gelan-s, gelan-m, gelan-c, gelan-e",
        ],
    );
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--imgsz",
        "100",
        "-o",
        p(&dir.join("x.onnx")),
    ]);
    assert_user_error(&out, &["input size 100", "multiple of 32"]);
    let model = dir.join("t.onnx");
    export_small(&model, false);
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let out = kestrel(&["infer", "-m", p(&model), p(&img), "--backend", "tpu"]);
    assert_user_error(&out, &["unknown backend 'tpu'", "cpu"]);
    let out = kestrel(&["infer", "-m", p(&model), p(&img), "--conf", "2"]);
    assert_user_error(&out, &["confidence threshold 2"]);
    // A fixed-batch model asked for batches of 4.
    let out = kestrel(&["infer", "-m", p(&model), p(&img), "--batch", "4"]);
    assert_user_error(&out, &["fixed batch of 1", "--dynamic"]);
}

#[test]
fn unreadable_image_is_named_and_others_still_processed() {
    let dir = scratch("images");
    let model = dir.join("t.onnx");
    export_small(&model, false);
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    image::RgbImage::new(40, 30)
        .save(imgs.join("a.png"))
        .unwrap();
    std::fs::write(imgs.join("b.png"), b"\x89PNG garbage").unwrap();
    let results = dir.join("out");
    let out = kestrel(&["infer", "-m", p(&model), p(&imgs), "-o", p(&results)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("b.png") && stderr.contains("cannot read the image"),
        "{stderr}"
    );
    assert!(
        results.join("a.json").exists(),
        "the readable image is still processed"
    );
    let out = kestrel(&["infer", "-m", p(&model), p(&dir.join("nothing-here"))]);
    assert_user_error(&out, &["nothing-here", "no such file or folder"]);
}

#[test]
fn build_an_engine_file_and_run_it() {
    let dir = scratch("build");
    let model = dir.join("t.onnx");
    export_small(&model, true);
    let engine = dir.join("t.engine");
    let out = kestrel(&[
        "build",
        "--onnx",
        p(&model),
        "--backend",
        "cpu",
        "--precision",
        "fp32",
        "--batch",
        "1:2:4",
        "-o",
        p(&engine),
    ]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cpu backend, fp32, batch 1:2:4"));
    let out = kestrel(&[
        "bench",
        "-m",
        p(&engine),
        "--batch",
        "4",
        "--warmup",
        "0",
        "--duration",
        "0.05",
        "--min-iterations",
        "1",
    ]);
    assert_success(&out);
    // Batch 8 is outside the engine's recorded profile.
    let out = kestrel(&[
        "bench",
        "-m",
        p(&engine),
        "--batch",
        "8",
        "--warmup",
        "0",
        "--duration",
        "0.05",
    ]);
    assert_user_error(&out, &["outside the engine's profile 1:2:4"]);
    if let Some(reason) = kestrel_runtime::cuda::unavailable_reason() {
        let out = kestrel(&[
            "build",
            "--onnx",
            p(&model),
            "--backend",
            "cuda",
            "-o",
            p(&dir.join("g.engine")),
        ]);
        assert_user_error(&out, &["cuda backend", &reason]);
    }
}

#[test]
fn quantize_calibrates_and_writes_a_qdq_model() {
    let dir = scratch("quantize");
    let model = dir.join("t.onnx");
    // A fixed batch of 1: calibration must not depend on a dynamic batch.
    export_small(&model, false);
    let data = dir.join("synth");
    let out = kestrel(&[
        "synth",
        "-o",
        p(&data),
        "--images",
        "4",
        "--seed",
        "5",
        "--imgsz",
        "64",
    ]);
    assert_success(&out);
    let images = data.join("images");
    let qdq = dir.join("t.qdq.onnx");
    let out = kestrel(&[
        "quantize",
        "--onnx",
        p(&model),
        "--calibrate",
        p(&images),
        "--images",
        "3",
        "-o",
        p(&qdq),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_success(&out);
    // gelan-t's 186 convolutions read 169 distinct tensors; all but the DFL's fixed projection
    // (input from its softmax) get one pair each.
    assert!(
        stdout.contains("168 Q/DQ pairs") && stdout.contains("on 3 images"),
        "{stdout}"
    );
    let inspect = kestrel(&["inspect", p(&qdq)]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("Q/DQ pairs:  168"), "{text}");
    assert!(text.contains("kestrel.quantization ptq-max"), "{text}");
    // The CPU backend runs the result.
    let results = dir.join("out");
    let out = kestrel(&[
        "infer",
        "-m",
        p(&qdq),
        p(&images),
        "-o",
        p(&results),
        "--no-pictures",
    ]);
    assert_success(&out);
    // Quantizing the quantized model again is refused.
    let out = kestrel(&[
        "quantize",
        "--onnx",
        p(&qdq),
        "--calibrate",
        p(&images),
        "-o",
        p(&dir.join("twice.onnx")),
    ]);
    assert_user_error(&out, &["t.qdq.onnx", "already has Q/DQ"]);
    // Histogram calibration: the method is recorded; an unknown one is named.
    let hist = dir.join("t.p.onnx");
    let out = kestrel(&[
        "quantize",
        "--onnx",
        p(&model),
        "--calibrate",
        p(&images),
        "--images",
        "2",
        "--calibrator",
        "histogram",
        "--method",
        "percentile",
        "--percentile",
        "99.9",
        "-o",
        p(&hist),
    ]);
    assert_success(&out);
    let inspect = kestrel(&["inspect", p(&hist)]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("kestrel.quantization ptq-histogram-99.9"),
        "{text}"
    );
    let out = kestrel(&[
        "quantize",
        "--onnx",
        p(&model),
        "--calibrate",
        p(&images),
        "--calibrator",
        "histogram",
        "--method",
        "kl",
        "-o",
        p(&dir.join("kl.onnx")),
    ]);
    assert_user_error(&out, &["method 'kl'", "mse, percentile or entropy"]);
    // --model exports first, with export's options.
    let out = kestrel(&[
        "quantize",
        "--model",
        "gelan-t",
        "--imgsz",
        "64",
        "--classes",
        "2",
        "--calibrate",
        p(&images),
        "--images",
        "1",
        "-o",
        p(&dir.join("m.qdq.onnx")),
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("on 1 image "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn quantize_errors_name_the_problem() {
    let dir = scratch("quantize-errors");
    let model = dir.join("t.onnx");
    export_small(&model, false);
    let output = dir.join("q.onnx");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("create folder");
    let quantize = |model: &Path, images: &Path| {
        kestrel(&[
            "quantize",
            "--onnx",
            p(model),
            "--calibrate",
            p(images),
            "-o",
            p(&output),
        ])
    };
    assert_user_error(&quantize(&model, &empty), &["empty", "no images"]);

    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).expect("create folder");
    image::RgbImage::new(40, 30)
        .save(imgs.join("a.png"))
        .expect("save image");
    std::fs::write(imgs.join("b.png"), b"\x89PNG garbage").expect("write file");
    assert_user_error(
        &quantize(&model, &imgs),
        &["b.png", "cannot read the image"],
    );

    let identity = dir.join("identity.onnx");
    model_with_input(
        &identity,
        vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(64), Dim::Fixed(64)],
    );
    assert_user_error(
        &quantize(&identity, &imgs),
        &["identity.onnx", "no convolution"],
    );
    assert!(!output.exists(), "nothing is written on failure");
}

/// `kestrel pipeline` over a synthetic clip with the bundled model: one annotated frame and one
/// JSON line per input frame, with the detections `kestrel infer` finds on the same images.
#[cfg(feature = "gstreamer")]
#[test]
fn pipeline_over_a_synthetic_clip_matches_infer() {
    let dir = scratch("pipeline");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gelan-t-shapes.onnx");
    let clip = dir.join("clip");
    assert_success(&kestrel(&[
        "synth",
        "-o",
        p(&clip),
        "--images",
        "6",
        "--seed",
        "21",
        "--imgsz",
        "320",
        "--val-fraction",
        "1",
    ]));
    let frames = clip.join("images/val");
    let pattern = format!("{}/%06d.png", frames.display());
    let out = dir.join("out");
    let run = kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--input",
        &pattern,
        "-o",
        p(&out),
    ]);
    assert_success(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("6 frames") && stdout.contains("frames/s"),
        "{stdout}"
    );
    let pngs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, 6);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("detections.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    // The element's metrics, in Prometheus's text format.
    let prom = std::fs::read_to_string(out.join("metrics.prom")).unwrap();
    assert!(
        prom.contains("kestrel_gst_frames_total{element=\"infer\",stream=\"0\"} 6"),
        "{prom}"
    );
    assert!(
        prom.contains(
            "kestrel_gst_latency_seconds_bucket{element=\"infer\",stream=\"0\",le=\"+Inf\"} 6"
        ),
        "{prom}"
    );
    assert!(
        prom.contains("# HELP kestrel_gst_batch_fill_ratio"),
        "{prom}"
    );

    let infer_out = dir.join("infer");
    assert_success(&kestrel(&[
        "infer",
        "--model",
        p(&model),
        p(&frames),
        "-o",
        p(&infer_out),
    ]));
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["frame"], i as u64);
        let want: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(infer_out.join(format!("{i:06}.json"))).unwrap(),
        )
        .unwrap();
        let (got, want) = (
            line["detections"].as_array().unwrap(),
            want["detections"].as_array().unwrap(),
        );
        assert_eq!(got.len(), want.len(), "frame {i}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["class_id"], w["class_id"]);
            assert!(
                (g["confidence"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() < 1e-6
            );
        }
    }

    // An annotated video out, and that video back in: one JSON line per frame each time.
    let video_out = dir.join("video");
    assert_success(&kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--input",
        &pattern,
        "--video",
        "annotated.avi",
        "-o",
        p(&video_out),
    ]));
    let avi = video_out.join("annotated.avi");
    assert!(std::fs::metadata(&avi).unwrap().len() > 10_000);
    let again = dir.join("again");
    let run = kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--input",
        p(&avi),
        "-o",
        p(&again),
    ]);
    assert_success(&run);
    let lines = std::fs::read_to_string(again.join("detections.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6, "{lines}");
    assert!(
        lines.contains("\"label\""),
        "the decoded frames still show the shapes"
    );
    let bad_video = kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--video",
        "out.mp4",
        "-o",
        p(&again),
    ]);
    assert_user_error(&bad_video, &["--video out.mp4", ".avi"]);

    // Bad input is named, no panic.
    let missing = kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--input",
        "nowhere/%06d.png",
        "-o",
        p(&out),
    ]);
    assert_user_error(&missing, &["nowhere/000000.png", "does not exist"]);
    let backend = kestrel(&[
        "pipeline",
        "--model",
        p(&model),
        "--backend",
        "gpu",
        "-o",
        p(&out),
    ]);
    assert_user_error(&backend, &["--backend gpu"]);
}

#[test]
fn infer_writes_masks_of_a_segmentation_model() {
    // gelan-t-seg with random weights: low scores, so a low threshold keeps some detections;
    // each gets a COCO RLE covering the image and lying inside its box.
    let dir = scratch("seg-infer");
    let model = dir.join("seg.onnx");
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t-seg",
        "--imgsz",
        "96",
        "--classes",
        "3",
        "-o",
        p(&model),
    ]);
    assert_success(&out);
    let img = dir.join("x.png");
    image::RgbImage::from_fn(120, 70, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])
    })
    .save(&img)
    .unwrap();
    let results = dir.join("out");
    let out = kestrel(&[
        "infer",
        "-m",
        p(&model),
        "--conf",
        "0.001",
        "--max-det",
        "5",
        "-o",
        p(&results),
        p(&img),
    ]);
    assert_success(&out);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("x.json")).unwrap()).unwrap();
    let dets = json["detections"].as_array().unwrap();
    assert!(!dets.is_empty(), "no detections: {json}");
    for d in dets {
        let mask = &d["mask"];
        assert_eq!(mask["size"], serde_json::json!([70, 120]), "{d}");
        let counts: Vec<u64> = mask["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 70 * 120, "{d}");
        // Set pixels (odd runs) lie inside the box: x1 <= column < x2.
        let b: Vec<f64> = d["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut at = 0u64;
        for (k, &c) in counts.iter().enumerate() {
            if k % 2 == 1 && c > 0 {
                for i in [at, at + c - 1] {
                    let (col, row) = ((i / 70) as f64, (i % 70) as f64);
                    assert!(
                        col >= b[0].floor() && col < b[2].ceil(),
                        "{d}: column {col}"
                    );
                    assert!(row >= b[1].floor() && row < b[3].ceil(), "{d}: row {row}");
                }
            }
            at += c;
        }
    }
    assert!(results.join("x.png").is_file());
    // Without a GPU, the cuda backend says so.
    let out = kestrel(&["infer", "-m", p(&model), "--backend", "cuda", p(&img)]);
    assert_user_error(&out, &["cuda"]);
}

#[test]
fn val_scores_masks_of_a_segmentation_model() {
    // An untrained gelan-t-seg on a tiny synthetic set (YOLO-seg polygons): Box and Mask
    // metrics, each in [0, 1]; on box-only labels, boxes and a note that masks were skipped.
    let dir = scratch("seg-val");
    let model = dir.join("seg.onnx");
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t-seg",
        "--imgsz",
        "64",
        "--classes",
        "6",
        "--dynamic",
        "-o",
        p(&model),
    ]);
    assert_success(&out);
    let data = dir.join("synth");
    let out = kestrel(&[
        "synth",
        "-o",
        p(&data),
        "--images",
        "4",
        "--seed",
        "5",
        "--imgsz",
        "64",
        "--val-fraction",
        "0.5",
    ]);
    assert_success(&out);
    let yaml = data.join("data.yaml");
    let out = kestrel(&["val", "-m", p(&model), "--data", p(&yaml), "--json"]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["instances"].as_u64().unwrap() > 0, "{v}");
    for kind in ["box", "mask"] {
        for key in ["precision", "recall", "map50", "map50_95"] {
            let x = v[kind][key].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&x), "{kind}.{key} = {x}: {v}");
        }
    }
    assert_eq!(v["map50_95"], v["box"]["map50_95"]);
    let out = kestrel(&["val", "-m", p(&model), "--data", p(&yaml)]);
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("all   Box"))
            && table
                .lines()
                .any(|l| l.trim_start().starts_with("all  Mask")),
        "{table}"
    );

    // Box labels only: no mask metrics, and a note on stderr saying why.
    for entry in std::fs::read_dir(data.join("labels/val")).unwrap() {
        std::fs::write(entry.unwrap().path(), "0 0.5 0.5 0.3 0.3\n").unwrap();
    }
    let out = kestrel(&["val", "-m", p(&model), "--data", p(&yaml), "--json"]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("mask").is_none(), "{v}");
    assert!(v["box"]["map50_95"].as_f64().unwrap() >= 0.0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("masks were not evaluated") && stderr.contains("no masks"),
        "{stderr}"
    );
}

#[test]
fn end2end_export_runs_through_infer_and_val() {
    // The bundled demo model's checkpoint is not here; its ONNX is: export the same architecture
    // end to end from random weights for the CLI flow, and check the outputs and the refusals.
    let dir = scratch("end2end");
    let model = dir.join("e2e.onnx");
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--classes",
        "6",
        "--imgsz",
        "64",
        "--dynamic",
        "--end2end",
        "onnx",
        "--max-det",
        "20",
        "--conf",
        "0.001",
        "-o",
        p(&model),
    ]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("end-to-end (onnx)") && text.contains("20 detections"),
        "{text}"
    );
    let info = kestrel_exporter::onnx::read_model(&model).unwrap();
    let outputs: Vec<&str> = info
        .graph()
        .output
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(
        outputs,
        ["num_dets", "det_boxes", "det_scores", "det_classes"]
    );
    let data = dir.join("synth");
    assert_success(&kestrel(&[
        "synth",
        "-o",
        p(&data),
        "--images",
        "4",
        "--imgsz",
        "64",
        "--val-fraction",
        "1",
    ]));
    let val = kestrel(&[
        "val",
        "--model",
        p(&model),
        "--data",
        p(&data.join("data.yaml")),
        "--json",
    ]);
    assert_success(&val);
    let v: serde_json::Value = serde_json::from_slice(&val.stdout).unwrap();
    assert!(
        (0.0..=1.0).contains(&v["map50_95"].as_f64().unwrap()),
        "{v}"
    );
    let infer_out = dir.join("infer");
    assert_success(&kestrel(&[
        "infer",
        "--model",
        p(&model),
        "--conf",
        "0.001",
        "--no-pictures",
        "-o",
        p(&infer_out),
        p(&data.join("images/val/000000.png")),
    ]));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(infer_out.join("000000.json")).unwrap())
            .unwrap();
    assert!(record.to_string().contains("class_name"), "{record}");
    // An unknown flavour and a flavour the runtime cannot run: one-line errors naming the fix.
    let bad = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--imgsz",
        "64",
        "--end2end",
        "trt9",
        "-o",
        p(&dir.join("x.onnx")),
    ]);
    assert_user_error(&bad, &["trt9", "onnx", "efficient-nms-trt", "trt-inms"]);
    let trt = dir.join("trt.onnx");
    assert_success(&kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--classes",
        "6",
        "--imgsz",
        "64",
        "--dynamic",
        "--end2end",
        "efficient-nms-trt",
        "-o",
        p(&trt),
    ]));
    let refused = kestrel(&[
        "infer",
        "--model",
        p(&trt),
        p(&data.join("images/val/000000.png")),
    ]);
    assert_user_error(&refused, &["EfficientNMS_TRT", "--end2end onnx"]);
    // The DeepStream layout: the model, labels.txt and the nvinfer config side by side.
    let ds_dir = dir.join("deepstream");
    std::fs::create_dir_all(&ds_dir).unwrap();
    let ds = ds_dir.join("gelan-t-ds.onnx");
    let out = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--classes",
        "3",
        "--imgsz",
        "64",
        "--dynamic",
        "--deepstream",
        "--deepstream-precision",
        "int8",
        "-o",
        p(&ds),
    ]);
    assert_success(&out);
    let labels = std::fs::read_to_string(ds_dir.join("labels.txt")).unwrap();
    assert_eq!(labels, "class0\nclass1\nclass2\n");
    let config = std::fs::read_to_string(ds_dir.join("config_infer_primary_kestrel.txt")).unwrap();
    assert!(
        config.contains("onnx-file=gelan-t-ds.onnx") && config.contains("network-mode=1"),
        "{config}"
    );
    let both = kestrel(&[
        "export",
        "--model",
        "gelan-t",
        "--imgsz",
        "64",
        "--deepstream",
        "--end2end",
        "onnx",
        "-o",
        p(&ds_dir.join("x.onnx")),
    ]);
    assert_user_error(&both, &["--deepstream", "--end2end"]);
}

#[test]
fn doctor_reports_each_backend_with_reasons() {
    // This machine (CI) has no GPU and no TensorRT: cpu available, cuda and tensorrt not, each
    // with the reason and the fix; exit 0 either way (it is a report, not a check).
    let out = kestrel(&["doctor", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    let backends = report["backends"].as_array().expect("backends");
    let get = |name: &str| {
        backends
            .iter()
            .find(|b| b["backend"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    assert_eq!(get("cpu")["available"], true);
    let cuda = get("cuda");
    assert_eq!(cuda["available"], false, "{cuda}");
    assert!(
        cuda["reasons"].to_string().contains("libcuda.so.1"),
        "{cuda}"
    );
    assert_eq!(cuda["checks"]["NVIDIA driver"]["found"], false);
    let trt = get("tensorrt");
    assert_eq!(trt["available"], false, "{trt}");
    assert!(
        trt["verified"].as_str().unwrap_or("").contains("NEVER run"),
        "{trt}"
    );
    let reasons = trt["reasons"].to_string();
    if report["tensorrt_compiled"] == true {
        assert_eq!(trt["checks"]["libnvinfer"]["found"], false, "{trt}");
        let problem = trt["checks"]["libnvinfer"]["problem"].to_string();
        assert!(
            problem.contains("libnvinfer.so.11") && problem.contains("LD_LIBRARY_PATH"),
            "{trt}"
        );
    } else {
        assert!(reasons.contains("--features tensorrt"), "{trt}");
    }
    // The text form says the same.
    let out = kestrel(&["doctor"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu       available"), "{text}");
    assert!(text.contains("cuda      unavailable"), "{text}");
    assert!(text.contains("tensorrt  unavailable"), "{text}");
}

#[test]
fn tensorrt_backend_errors_name_the_fix() {
    let dir = scratch("tensorrt");
    let model = dir.join("t.onnx");
    export_small(&model, false);
    let img = dir.join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    // Without the feature: rebuild with it. With it, on this machine: libnvinfer is missing.
    let want: &[&str] = if cfg!(feature = "tensorrt") {
        &["tensorrt backend", "libnvinfer.so.11", "LD_LIBRARY_PATH"]
    } else {
        &["tensorrt", "--features tensorrt"]
    };
    let out = kestrel(&["infer", "-m", p(&model), p(&img), "--backend", "tensorrt"]);
    assert_user_error(&out, want);
    let out = kestrel(&["bench", "-m", p(&model), "--backend", "tensorrt"]);
    assert_user_error(&out, want);
    let engine = dir.join("t.engine");
    let out = kestrel(&[
        "build",
        "--onnx",
        p(&model),
        "--backend",
        "tensorrt",
        "--precision",
        "fp32",
        "--batch",
        "1:1:1",
        "-o",
        p(&engine),
    ]);
    assert_user_error(&out, want);
    assert!(!engine.exists());
}
