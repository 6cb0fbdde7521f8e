//! `kestrel serve` over real HTTP on loopback, with the bundled demo model on the CPU backend.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kestrel_runtime::nms::NmsConfig;

#[test]
fn kserve_endpoints_metadata_infer_json_and_binary() {
    let server = Server::model_server(&["--max-queue-delay-us", "0"]);
    let a = &server.addr;
    assert_eq!(get(a, "/v2/health/live").0, 200);
    assert_eq!(get(a, "/v2/health/ready").0, 200);
    let (s, meta) = get(a, "/v2");
    assert_eq!(s, 200);
    assert_eq!(meta["name"], "kestrel");
    let (s, m) = get(a, "/v2/models/gelan-t-shapes");
    assert_eq!(s, 200, "{m}");
    assert_eq!(
        m["inputs"][0]["shape"],
        serde_json::json!([-1, 3, 320, 320])
    );
    assert_eq!(m["outputs"][0]["shape"], serde_json::json!([-1, 10, 2100]));
    assert_eq!(get(a, "/v2/models/gelan-t-shapes/versions/1").0, 200);
    assert_eq!(get(a, "/v2/models/gelan-t-shapes/ready").0, 200);
    assert_eq!(get(a, "/v2/models/gelan-t-shapes/versions/1/ready").0, 200);
    let (s, c) = get(a, "/v2/models/gelan-t-shapes/config");
    assert_eq!(s, 200);
    assert_eq!(c["max_batch_size"], 8);
    assert_eq!(c["class_names"][0], "circle");
    // Errors: JSON bodies with the right status.
    let (s, e) = get(a, "/v2/models/nope");
    assert_eq!(s, 404);
    assert!(
        e["error"].as_str().unwrap().contains("no model nope"),
        "{e}"
    );
    assert_eq!(get(a, "/v2/models/gelan-t-shapes/versions/7").0, 404);
    assert_eq!(get(a, "/v2/models/gelan-t-shapes/versions/x").0, 400);
    assert_eq!(get(a, "/v2/models/..gelan/ready").0, 400);

    let (img, _) = png_of(41, 400, 300);
    let input = letterboxed(&img);
    let want = reference_output(&input);
    // JSON tensors.
    let request = serde_json::json!({
        "id": "r1",
        "inputs": [{"name": "images", "shape": [1, 3, 320, 320], "datatype": "FP32", "data": input}],
    });
    let (s, _, body) = http(
        a,
        "POST",
        "/v2/models/gelan-t-shapes/infer",
        &[("Content-Type", "application/json")],
        request.to_string().as_bytes(),
    );
    let r = json(&body);
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["id"], "r1");
    assert_eq!(r["outputs"][0]["shape"], serde_json::json!([1, 10, 2100]));
    let got: Vec<f32> = r["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert!(
        max_abs_diff(&got, &want) < 1e-3,
        "JSON infer differs from the CPU engine"
    );

    // The binary tensor data extension, both ways.
    let header = serde_json::json!({
        "inputs": [{"name": "images", "shape": [1, 3, 320, 320], "datatype": "FP32",
                    "parameters": {"binary_data_size": input.len() * 4}}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(input.iter().flat_map(|v| v.to_le_bytes()));
    let (s, headers, out) = http(
        a,
        "POST",
        "/v2/models/gelan-t-shapes/versions/1/infer",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &header.len().to_string()),
        ],
        &body,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
    let n: usize = headers
        .iter()
        .find(|(k, _)| k == "inference-header-content-length")
        .unwrap()
        .1
        .parse()
        .unwrap();
    let meta = json(&out[..n]);
    assert_eq!(
        meta["outputs"][0]["parameters"]["binary_data_size"],
        2100 * 10 * 4
    );
    let got: Vec<f32> = out[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(max_abs_diff(&got, &want) < 1e-3);

    // Malformed requests are named.
    for (body, expect) in [
        ("{", "not valid JSON"),
        (
            r#"{"inputs":[{"name":"x","shape":[1,3,320,320],"datatype":"FP32","data":[]}]}"#,
            "the model's input is images",
        ),
        (
            r#"{"inputs":[{"name":"images","shape":[1,3,64,64],"datatype":"FP32","data":[]}]}"#,
            "[batch, 3, 320, 320]",
        ),
        (
            r#"{"inputs":[{"name":"images","shape":[1,3,320,320],"datatype":"FP32","data":[1,2]}]}"#,
            "holds 2 values",
        ),
    ] {
        let (s, _, b) = http(
            a,
            "POST",
            "/v2/models/gelan-t-shapes/infer",
            &[],
            body.as_bytes(),
        );
        assert_eq!(s, 400, "{body}");
        let e = json(&b);
        assert!(e["error"].as_str().unwrap().contains(expect), "{e}");
    }
}

#[test]
fn the_image_endpoint_matches_kestrel_infer_and_refuses_bad_images() {
    let server = Server::model_server(&[
        "--max-body-bytes",
        "2000000",
        "--max-image-pixels",
        "200000",
    ]);
    let a = &server.addr;
    let (img, png) = png_of(42, 401, 299);
    let (s, _, body) = http(a, "POST", "/v1/models/gelan-t-shapes/detect", &[], &png);
    let r = json(&body);
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (r["width"].as_u64(), r["height"].as_u64()),
        (Some(401), Some(299))
    );
    let mut detector = kestrel_runtime::Detector::new(cpu_engine());
    let mut want = Vec::new();
    detector
        .detect(&[&img], &NmsConfig::display(), &mut want)
        .unwrap();
    let got = r["detections"].as_array().unwrap();
    assert!(!want[0].is_empty());
    assert_eq!(got.len(), want[0].len());
    for (g, w) in got.iter().zip(&want[0]) {
        assert_eq!(g["class_id"].as_u64().unwrap() as usize, w.class_id);
        assert!((g["confidence"].as_f64().unwrap() - f64::from(w.score)).abs() < 1e-4);
        assert!((g["box_xyxy"][0].as_f64().unwrap() - f64::from(w.bbox.x1)).abs() < 1e-2);
    }
    // Thresholds from the query.
    let (s, _, body) = http(
        a,
        "POST",
        "/v1/models/gelan-t-shapes/detect?conf=0.99&max_det=1",
        &[],
        &png,
    );
    assert_eq!(s, 200);
    assert!(json(&body)["detections"].as_array().unwrap().len() <= 1);
    let (s, _, body) = http(
        a,
        "POST",
        "/v1/models/gelan-t-shapes/detect?conf=7",
        &[],
        &png,
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&body));
    post_expecting_error(
        a,
        "/v1/models/gelan-t-shapes/detect?conf=abc",
        &png,
        400,
        "query parameters",
    );

    // Not an image; an image too large (by its header); a body too large.
    let detect = "/v1/models/gelan-t-shapes/detect";
    post_expecting_error(a, detect, b"hello", 400, "not a PNG");
    let (_, big) = png_of(1, 600, 400);
    post_expecting_error(a, detect, &big, 413, "pixels");
    post_expecting_error(a, detect, &vec![0u8; 3_000_000], 413, "--max-body-bytes");
    let (s, _, _) = http(a, "POST", "/v1/models/nope/detect", &[], &png);
    assert_eq!(s, 404);
    // Names that are not models do not become metric series of their own.
    let (_, _, text) = http(a, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains("model=\"nope\""), "{text}");
    assert!(text.contains("model=\"_unknown\""), "{text}");

    // A form upload (multipart/form-data) gives the same detections as the raw body.
    let mut form = b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
    form.extend_from_slice(&png);
    form.extend_from_slice(b"\r\n--b0undary--\r\n");
    let (s, _, body) = http(
        a,
        "POST",
        "/v1/models/gelan-t-shapes/detect",
        &[("Content-Type", "multipart/form-data; boundary=b0undary")],
        &form,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["detections"], r["detections"]);
    // Masks need a segmentation model.
    post_expecting_error(
        a,
        "/v1/models/gelan-t-shapes/detect?masks=rle",
        &png,
        400,
        "boxes only",
    );
}

/// A preferred batch size runs as soon as it is reached: a lone request does not wait out a long
/// queue delay.
#[test]
fn preferred_batch_sizes_skip_the_delay() {
    let (_, png) = png_of(47, 320, 240);
    let timed = |extra: &[&str]| {
        let mut args = vec!["--max-queue-delay-us", "1500000"];
        args.extend_from_slice(extra);
        let server = Server::model_server(&args);
        let t0 = std::time::Instant::now();
        let (s, _, _) = http(
            &server.addr,
            "POST",
            "/v1/models/gelan-t-shapes/detect",
            &[],
            &png,
        );
        assert_eq!(s, 200);
        t0.elapsed()
    };
    let waited = timed(&[]);
    let preferred = timed(&["--preferred-batch-sizes", "1,4"]);
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert!(preferred < Duration::from_millis(1000), "{preferred:?}");

    // A request's own timeout, shorter than the delay: 504 with the reason.
    let server = Server::model_server(&["--max-queue-delay-us", "1500000"]);
    post_expecting_error(
        &server.addr,
        "/v1/models/gelan-t-shapes/detect?timeout_ms=200",
        &png,
        504,
        "timeout",
    );
}

#[test]
fn concurrent_requests_are_batched_and_a_full_queue_says_retry() {
    let server = Server::model_server(&["--max-queue-delay-us", "5000"]);
    let a = server.addr.clone();
    let (_, png) = png_of(43, 320, 240);
    for t in detect_concurrently(&a, "gelan-t-shapes", &png, 16) {
        assert_eq!(t.join().unwrap().0, 200);
    }
    let (_, _, text) = http(&a, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(text).unwrap();
    let batches = sample(&text, "kestrel_batch_size_count{model=\"gelan-t-shapes\"} ").unwrap();
    let images = sample(&text, "kestrel_batch_size_sum{model=\"gelan-t-shapes\"} ").unwrap();
    assert_eq!(images, 16.0, "{text}");
    assert!(
        batches < 16.0,
        "16 concurrent requests ran as {batches} batches"
    );
    for name in [
        "kestrel_requests_total{",
        "kestrel_request_duration_seconds_bucket{",
        "kestrel_queue_duration_seconds_bucket{",
        "kestrel_inference_duration_seconds_bucket{",
        "kestrel_preprocess_duration_seconds_bucket{",
        "kestrel_postprocess_duration_seconds_bucket{",
        "# HELP kestrel_in_flight_requests",
        "kestrel_engine_loads_total{source=\"onnx\"} 1",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    drop(server);

    // One request at a time, one waiting: the others are told to come back.
    let server = Server::model_server(&["--max-batch-size", "1", "--max-queue-size", "1"]);
    let a = server.addr.clone();
    let results: Vec<(u16, bool)> = detect_concurrently(&a, "gelan-t-shapes", &png, 8)
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(results.contains(&(503, true)), "{results:?}");
    assert!(results.iter().any(|r| r.0 == 200), "{results:?}");
}

#[test]
fn unload_and_sigterm_complete_the_requests_in_flight() {
    let dir = std::env::temp_dir().join(format!("kestrel-serve-repo-{}", std::process::id()));
    let version = dir.join("shapes/1");
    std::fs::create_dir_all(&version).unwrap();
    std::fs::copy(model(), version.join("model.onnx")).unwrap();
    std::fs::write(
        dir.join("shapes/config.json"),
        r#"{"max_batch_size": 4, "max_queue_delay_us": 400000}"#,
    )
    .unwrap();
    let mut server = Server::start(&[
        "--repository",
        dir.to_str().unwrap(),
        "--control-token",
        "s3cret",
    ]);
    let a = server.addr.clone();
    let (s, index) = {
        let (s, _, b) = http(
            &a,
            "POST",
            "/v2/repository/index",
            &[("Authorization", "Bearer s3cret")],
            b"",
        );
        (s, json(&b))
    };
    assert_eq!(s, 200);
    assert_eq!(index[0]["name"], "shapes");
    assert_eq!(index[0]["state"], "READY");
    // The control endpoints need the token.
    assert_eq!(http(&a, "POST", "/v2/repository/index", &[], b"").0, 401);
    assert_eq!(
        http(
            &a,
            "POST",
            "/v2/repository/models/..%2F..%2Fetc/load",
            &[("Authorization", "Bearer s3cret")],
            b""
        )
        .0,
        400
    );

    let (_, png) = png_of(44, 320, 240);
    let send = |n: usize| detect_concurrently(&a, "shapes", &png, n);
    // Three requests sit in the batcher (400 ms delay) when the unload comes: they complete.
    let waiting = send(3);
    std::thread::sleep(Duration::from_millis(150));
    let (s, _, b) = http(
        &a,
        "POST",
        "/v2/repository/models/shapes/unload",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    for t in waiting {
        assert_eq!(t.join().unwrap().0, 200);
    }
    let (s, e) = get(&a, "/v2/models/shapes/ready");
    assert_eq!(s, 503, "{e}");
    // Load it again without a restart.
    let (s, _, _) = http(
        &a,
        "POST",
        "/v2/repository/models/shapes/load",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(s, 200);
    assert_eq!(get(&a, "/v2/models/shapes/ready").0, 200);

    // SIGTERM while requests wait: they complete, then the server exits cleanly.
    let waiting = send(3);
    std::thread::sleep(Duration::from_millis(150));
    let status = server.terminate();
    for t in waiting {
        assert_eq!(t.join().unwrap().0, 200);
    }
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Triton's official Python client (tritonclient[http], in the project's venv) checks readiness,
/// reads the model metadata and runs inference with binary and JSON tensors.
#[test]
fn tritons_python_client_talks_to_kestrel_serve() {
    let server = Server::model_server(&[]);
    let (img, _) = png_of(45, 360, 280);
    let input = letterboxed(&img);
    let want = reference_output(&input);
    let dir = std::env::temp_dir().join(format!("kestrel-triton-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, v: &[f32]| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        )
        .unwrap();
        p
    };
    let (inp, reference) = (write("input.f32", &input), write("ref.f32", &want));
    let report = kestrel_tests::run_python(
        "triton_client_check.py",
        &[
            &server.addr,
            "gelan-t-shapes",
            inp.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    let r = json(report.as_bytes());
    assert_eq!(r["server_live"], true, "{r}");
    assert_eq!(r["server_ready"], true, "{r}");
    assert_eq!(r["model_ready"], true, "{r}");
    assert_eq!(r["input_shape"], serde_json::json!([-1, 3, 320, 320]));
    for mode in ["binary", "json"] {
        assert!(r["max_abs_diff"][mode].as_f64().unwrap() < 1e-3, "{r}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `promtool check metrics` (Debian's prometheus package) accepts /metrics.
#[test]
fn promtool_accepts_the_metrics() {
    let server = Server::model_server(&[]);
    let (_, png) = png_of(46, 320, 240);
    assert_eq!(
        http(
            &server.addr,
            "POST",
            "/v1/models/gelan-t-shapes/detect",
            &[],
            &png
        )
        .0,
        200
    );
    let (_, _, text) = http(&server.addr, "GET", "/metrics", &[], b"");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is missing ({e}): run `bash scripts/setup.sh` (apt package prometheus)"
            )
        });
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&text)
    );
}

/// Two engine instances of one model serve concurrent requests between them.
#[test]
fn several_instances_share_a_models_queue() {
    let server = Server::model_server(&["--instance-count", "2", "--max-batch-size", "1"]);
    let (_, png) = png_of(48, 320, 240);
    for t in detect_concurrently(&server.addr, "gelan-t-shapes", &png, 6) {
        assert_eq!(t.join().unwrap().0, 200);
    }
    let (_, _, text) = http(&server.addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(text).unwrap();
    assert_eq!(
        sample(&text, "kestrel_engine_loads_total{source=\"onnx\"} "),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kestrel_batch_size_sum{model=\"gelan-t-shapes\"} "),
        Some(6.0)
    );
}

/// Instances counted per engine (the spread the multi-GPU placement relies on), and placements
/// that cannot work named per model while the others load: a GPU for the cpu backend, instances
/// that disagree with instance_count.
#[test]
fn instances_are_counted_per_engine_and_bad_placements_are_named() {
    let dir = kestrel_tests::scratch_dir("serve-instances");
    let ok = dir.join("ok");
    std::fs::create_dir_all(ok.join("1")).unwrap();
    std::fs::copy(model(), ok.join("1/model.onnx")).unwrap();
    std::fs::write(
        ok.join("config.json"),
        r#"{"instances": [{"gpu": 0}, {"gpu": 0}], "max_batch_size": 1}"#,
    )
    .unwrap();
    for (name, config) in [
        ("on-gpu1", r#"{"instances": [{"gpu": 0}, {"gpu": 1}]}"#),
        (
            "disagree",
            r#"{"instance_count": 3, "instances": [{"gpu": 0}]}"#,
        ),
    ] {
        std::fs::create_dir_all(dir.join(name).join("1")).unwrap();
        std::fs::copy(model(), dir.join(name).join("1/model.onnx")).unwrap();
        std::fs::write(dir.join(name).join("config.json"), config).unwrap();
    }
    let server = Server::start(&["--repository", dir.to_str().unwrap()]);
    let (_, png) = png_of(49, 320, 240);
    for t in detect_concurrently(&server.addr, "ok", &png, 6) {
        assert_eq!(t.join().unwrap().0, 200);
    }
    let (_, _, text) = http(&server.addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(text).unwrap();
    let per_instance: f64 = (0..2)
        .filter_map(|i| {
            sample(
                &text,
                &format!(
                    "kestrel_instance_batches_total{{model=\"ok\",instance=\"{i}\",gpu=\"0\"}} "
                ),
            )
        })
        .sum();
    assert_eq!(per_instance, 6.0, "{text}");
    let (status, _, index) = http(&server.addr, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(status, 200);
    let index = String::from_utf8(index).unwrap();
    assert!(index.contains("cpu backend runs on the CPU"), "{index}");
    assert!(
        index.contains("instance_count 3 and 1 instances disagree"),
        "{index}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// A segmentation model answers `masks=rle` with a COCO RLE per detection, the same masks
/// `kestrel infer` writes for the image.
#[test]
fn the_image_endpoint_returns_masks_of_a_segmentation_model() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-seg");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("seg.onnx");
    let status = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args([
            "export",
            "--model",
            "gelan-t-seg",
            "--imgsz",
            "96",
            "--classes",
            "3",
            "--dynamic",
        ])
        .arg("-o")
        .arg(&model)
        .status()
        .unwrap();
    assert!(status.success());
    let (img, png) = png_of(5, 120, 70);
    img.save(dir.join("x.png")).unwrap();
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let (s, _, body) = http(
        &server.addr,
        "POST",
        "/v1/models/seg/detect?masks=rle&conf=0.001&max_det=5",
        &[],
        &png,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let r = json(&body);
    let dets = r["detections"].as_array().unwrap();
    assert!(!dets.is_empty(), "{r}");
    // The CLI on the same image and thresholds.
    let out = dir.join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args([
            "infer",
            "--conf",
            "0.001",
            "--max-det",
            "5",
            "--no-pictures",
            "-m",
        ])
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .arg(dir.join("x.png"))
        .status()
        .unwrap();
    assert!(status.success());
    let cli = json(&std::fs::read(out.join("x.json")).unwrap());
    let cli_dets = cli["detections"].as_array().unwrap();
    assert_eq!(dets.len(), cli_dets.len());
    for (d, c) in dets.iter().zip(cli_dets) {
        assert_eq!(d["mask_rle"], c["mask"], "{d}");
        assert_eq!(d["mask_rle"]["size"], serde_json::json!([70, 120]));
    }
    // Without masks=rle, no masks.
    let (_, _, body) = http(&server.addr, "POST", "/v1/models/seg/detect", &[], &png);
    assert!(json(&body)["detections"][0].get("mask_rle").is_none());

    // KServe v2: the prototypes are a second output tensor, equal to the CPU engine's.
    let a = &server.addr;
    let (s, m) = get(a, "/v2/models/seg");
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["outputs"][1]["name"], "output1");
    assert_eq!(
        m["outputs"][1]["shape"],
        serde_json::json!([-1, 32, 24, 24])
    );
    assert_eq!(
        get(a, "/v2/models/seg/config").1["output"][1]["dims"],
        serde_json::json!([32, 24, 24])
    );
    let mut rng = 9u64;
    let input: Vec<f32> = (0..3 * 96 * 96)
        .map(|_| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            (rng >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let options = kestrel_runtime::engine::BuildOptions {
        profile: kestrel_runtime::engine::BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
        ..Default::default()
    };
    let mut engine = kestrel_runtime::engine::build_engine(&model, &options).unwrap();
    let (out0, protos) = engine.run_with_prototypes(&input, 1).unwrap();
    let (out0, protos) = (out0.to_vec(), protos.unwrap().to_vec());
    let infer = |outputs: serde_json::Value| {
        let request = serde_json::json!({
            "inputs": [{"name": "images", "shape": [1, 3, 96, 96], "datatype": "FP32", "data": input}],
            "outputs": outputs,
        });
        let (s, _, body) = http(
            a,
            "POST",
            "/v2/models/seg/infer",
            &[("Content-Type", "application/json")],
            request.to_string().as_bytes(),
        );
        (s, json(&body))
    };
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (s, r) = infer(serde_json::json!([]));
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["outputs"][1]["shape"], serde_json::json!([1, 32, 24, 24]));
    assert!(max_abs_diff(&floats(&r["outputs"][0]["data"]), &out0) < 1e-4);
    assert!(max_abs_diff(&floats(&r["outputs"][1]["data"]), &protos) < 1e-4);
    let (s, r) = infer(serde_json::json!([{"name": "output1"}]));
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(r["outputs"][0]["name"], "output1");
    let (s, r) = infer(serde_json::json!([{"name": "masks"}]));
    assert_eq!(s, 400);
    assert!(
        r["error"].as_str().unwrap().contains("output0, output1"),
        "{r}"
    );
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// `--config deploy/kestrel.toml` (the example the container, the unit and the Kubernetes base
/// use): its settings reach the model, flags override it (--repository, --listen, --backend,
/// --precision, --max-queue-size, --control-token-file), its JSON log lines parse, and the token from the file
/// guards the control endpoints.
#[test]
fn the_example_config_serves_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("kestrel-config-repo-{}", std::process::id()));
    let version = dir.join("models/shapes/1");
    std::fs::create_dir_all(&version).unwrap();
    std::fs::copy(model(), version.join("model.onnx")).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["serve", "--config"])
        .arg(deploy("kestrel.toml"))
        // The file asks for the cuda backend at fp16; this machine has no GPU.
        .args(["--backend", "cpu", "--precision", "fp32"])
        .args(["--listen", "127.0.0.1:0", "--max-queue-size", "5"])
        .arg("--repository")
        .arg(dir.join("models"))
        .arg("--control-token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut server = Server {
        child,
        addr: line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string(),
    };
    let a = server.addr.clone();
    let (s, c) = get(&a, "/v2/models/shapes/config");
    assert_eq!(s, 200);
    assert_eq!(c["backend"], "cpu");
    // From the file (the built-in default is 8).
    assert_eq!(c["max_batch_size"], 4);
    assert_eq!(c["dynamic_batching"]["max_queue_delay_microseconds"], 2000);
    // The flag over the file's 64.
    assert_eq!(
        c["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
        5
    );
    assert_eq!(http(&a, "POST", "/v2/repository/index", &[], b"").0, 401);
    let auth = [("Authorization", "Bearer t0ken")];
    assert_eq!(http(&a, "POST", "/v2/repository/index", &auth, b"").0, 200);
    assert!(server.terminate().success());
    let mut err = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect();
    let msgs: Vec<&str> = lines.iter().filter_map(|l| l["msg"].as_str()).collect();
    assert!(msgs.contains(&"loaded model shapes"), "{err}");
    assert!(msgs.contains(&"stopped"), "{err}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["ts"].is_f64())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Mistakes in a config file end `kestrel serve` at once with one line naming the problem and
/// the fix: an unknown key (with its line), an address that is not one, a token file missing.
#[test]
fn config_mistakes_are_named() {
    let dir = std::env::temp_dir().join(format!("kestrel-config-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "max_batch_size = 4\nmax_batch = 4\n",
            &["unknown field `max_batch`", "line 2", "deploy/kestrel.toml"][..],
        ),
        (
            "listen = \"8000\"\n",
            &["listen = \"8000\" is not an address", "IP:PORT"][..],
        ),
        (
            "repository = \".\"\ncontrol_token_file = \"no-such-token\"\n",
            &["no-such-token: cannot read it", "create it"][..],
        ),
        (
            "log_format = \"xml\"\n",
            &["unknown variant `xml`", "log_format"][..],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let f = dir.join(format!("c{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
            .args(["serve", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        for n in *needles {
            assert!(err.contains(n), "{text}: {n:?} not in {err}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
