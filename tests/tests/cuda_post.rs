//! GPU decoding + NMS (`cuda::post`) against the CPU reference (`nms::Postprocessor`): identical
//! kept sets, order, boxes and scores on random and adversarial heads (GPU machine), and a clear
//! error where there is no GPU.

use kestrel_exporter::weights::SplitMix64 as Rng;
use kestrel_runtime::Detection;
use kestrel_runtime::cuda::post::{GpuPostprocessor, HeadElement};
use kestrel_runtime::half::{f16_bits_to_f32, f32_to_f16_bits};
use kestrel_runtime::letterbox::LetterboxParams;
use kestrel_runtime::nms::{NmsConfig, Postprocessor};

/// A raw head `[batch, 4 + nc, anchors]`: boxes on a coarse grid (so many overlap and tie), scores
/// skewed low with coarse steps (so many tie exactly).
fn random_head(rng: &mut Rng, batch: usize, nc: usize, anchors: usize, coarse: bool) -> Vec<f32> {
    let ch = 4 + nc;
    let mut out = vec![0f32; batch * ch * anchors];
    for b in 0..batch {
        let o = &mut out[b * ch * anchors..(b + 1) * ch * anchors];
        for a in 0..anchors {
            let q = |v: f32| if coarse { (v * 16.0).floor() / 16.0 } else { v };
            o[a] = q(rng.next_f32()) * 640.0;
            o[anchors + a] = q(rng.next_f32()) * 640.0;
            o[2 * anchors + a] = q(rng.next_f32()) * 160.0;
            o[3 * anchors + a] = q(rng.next_f32()) * 160.0;
            for c in 0..nc {
                let s = rng.next_f32().powi(6);
                o[(4 + c) * anchors + a] = if coarse { (s * 64.0).round() / 64.0 } else { s };
            }
        }
    }
    out
}

fn cpu_reference(
    head: &[f32],
    batch: usize,
    nc: usize,
    anchors: usize,
    letterboxes: &[LetterboxParams],
    cfg: &NmsConfig,
) -> Vec<Vec<Detection>> {
    let ch = 4 + nc;
    let mut post = Postprocessor::new();
    (0..batch)
        .map(|b| {
            let mut dets = Vec::new();
            post.run(
                &head[b * ch * anchors..(b + 1) * ch * anchors],
                nc,
                anchors,
                &letterboxes[b],
                cfg,
                &mut dets,
            )
            .expect("CPU post-processing");
            dets
        })
        .collect()
}

/// Same detections in the same order, every field bit-identical (−0 and +0 aside).
fn assert_identical(gpu: &[Vec<Detection>], cpu: &[Vec<Detection>], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: images");
    for (b, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(
            g.len(),
            c.len(),
            "{what}: image {b} keeps {} vs {}",
            g.len(),
            c.len()
        );
        for (k, (x, y)) in g.iter().zip(c).enumerate() {
            assert_eq!(x, y, "{what}: image {b}, detection {k}");
        }
    }
}

fn letterboxes(batch: usize) -> Vec<LetterboxParams> {
    // Different frame sizes per image, odd ones included.
    let sizes = [(1920, 1080), (640, 640), (1279, 721), (333, 999)];
    (0..batch)
        .map(|b| {
            let (w, h) = sizes[b % sizes.len()];
            LetterboxParams::new(w, h, 640, 640).expect("letterbox")
        })
        .collect()
}

#[test]
fn without_a_gpu_the_error_says_so() {
    if kestrel_runtime::cuda::unavailable_reason().is_none() {
        return; // a GPU machine: the other tests cover it
    }
    let err = GpuPostprocessor::new(0, 1, 80, 84, 8400)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains("cuda"), "{err}");
}

#[test]
fn bad_arguments_are_named() {
    let err = GpuPostprocessor::new(0, 1, 80, 40, 8400)
        .err()
        .expect("too few rows")
        .to_string();
    assert!(err.contains("84"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_nms_equals_the_cpu_reference_on_random_heads() {
    let mut rng = Rng::new(7);
    let (batch, nc, anchors) = (4, 80, 2100);
    let mut gpu = GpuPostprocessor::new(0, batch, nc, 4 + nc, anchors).expect("GPU post");
    let lb = letterboxes(batch);
    let mut out = Vec::new();
    for coarse in [false, true] {
        let head = random_head(&mut rng, batch, nc, anchors, coarse);
        let configs = [
            ("evaluation", NmsConfig::evaluation()),
            ("display", NmsConfig::display()),
            (
                "agnostic",
                NmsConfig {
                    agnostic: true,
                    ..NmsConfig::evaluation()
                },
            ),
            (
                "class filter, cap 500",
                NmsConfig {
                    classes: Some(vec![0, 3, 79]),
                    max_candidates: 500,
                    max_detections: 50,
                    ..NmsConfig::evaluation()
                },
            ),
            (
                "iou 0, conf 0.5",
                NmsConfig {
                    iou_threshold: 0.0,
                    conf_threshold: 0.5,
                    ..NmsConfig::display()
                },
            ),
        ];
        for (name, cfg) in configs {
            gpu.run(&head, batch, &lb, &cfg, &mut out).expect("GPU run");
            let cpu = cpu_reference(&head, batch, nc, anchors, &lb, &cfg);
            let what = format!("{name} (coarse {coarse})");
            assert_identical(&out, &cpu, &what);
            println!(
                "{what}: kept {:?}",
                out.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
    }
    // An FP16 head, read as it is: the CPU reference on the same values widened to float32.
    for coarse in [false, true] {
        let head = random_head(&mut rng, batch, nc, anchors, coarse);
        let bits: Vec<u16> = head.iter().map(|&v| f32_to_f16_bits(v)).collect();
        let widened: Vec<f32> = bits.iter().map(|&h| f16_bits_to_f32(h)).collect();
        let ptr = gpu.upload_half(&bits, batch).expect("upload FP16");
        for cfg in [NmsConfig::evaluation(), NmsConfig::display()] {
            gpu.run_device_as(ptr, HeadElement::F16, batch, &lb, &cfg, &mut out)
                .expect("GPU run on FP16");
            let cpu = cpu_reference(&widened, batch, nc, anchors, &lb, &cfg);
            assert_identical(&out, &cpu, &format!("FP16 head (coarse {coarse})"));
        }
    }
    // A smaller batch through the same buffers.
    let head = random_head(&mut rng, 1, nc, anchors, true);
    let cfg = NmsConfig::evaluation();
    gpu.run(&head, 1, &lb[..1], &cfg, &mut out)
        .expect("batch 1");
    assert_identical(
        &out,
        &cpu_reference(&head, 1, nc, anchors, &lb, &cfg),
        "batch 1",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_nms_equals_the_cpu_reference_on_adversarial_heads() {
    let lb = letterboxes(2);
    let mut out = Vec::new();
    let check = |head: &[f32],
                 nc: usize,
                 anchors: usize,
                 cfg: &NmsConfig,
                 what: &str,
                 out: &mut Vec<Vec<Detection>>| {
        let mut gpu = GpuPostprocessor::new(0, 2, nc, 4 + nc, anchors).expect("GPU post");
        gpu.run(head, 2, &lb, cfg, out).expect(what);
        assert_identical(out, &cpu_reference(head, 2, nc, anchors, &lb, cfg), what);
        println!(
            "{what}: kept {:?}",
            out.iter().map(Vec::len).collect::<Vec<_>>()
        );
    };
    let eval = NmsConfig::evaluation();
    let mut rng = Rng::new(11);

    // Every candidate identical: one box, one score, every anchor and class.
    let (nc, anchors) = (80, 8400);
    let mut head = vec![0f32; 2 * (4 + nc) * anchors];
    for b in 0..2 {
        let o = &mut head[b * (4 + nc) * anchors..(b + 1) * (4 + nc) * anchors];
        for a in 0..anchors {
            o[a] = 320.0;
            o[anchors + a] = 320.0;
            o[2 * anchors + a] = 50.0;
            o[3 * anchors + a] = 50.0;
        }
        o[4 * anchors..].fill(0.5);
    }
    // 672,000 candidates per image, capped at 30,000 (the sort sees them all).
    check(
        &head,
        nc,
        anchors,
        &eval,
        "all identical, 672k candidates",
        &mut out,
    );
    assert_eq!(out[0].len(), 80, "one per class");
    check(
        &head,
        nc,
        anchors,
        &NmsConfig {
            agnostic: true,
            ..eval.clone()
        },
        "all identical, agnostic",
        &mut out,
    );
    assert_eq!(out[0].len(), 1);

    // Zero-area boxes (never suppress each other: IoU is NaN) and non-finite values.
    let (nc, anchors) = (3, 1000);
    let mut head = random_head(&mut rng, 2, nc, anchors, true);
    for b in 0..2 {
        let o = &mut head[b * (4 + nc) * anchors..(b + 1) * (4 + nc) * anchors];
        for a in (0..anchors).step_by(3) {
            o[2 * anchors + a] = 0.0;
            o[3 * anchors + a] = 0.0;
        }
        for a in (1..anchors).step_by(7) {
            o[4 * anchors + a] = f32::NAN;
            o[5 * anchors + a] = f32::INFINITY;
            o[6 * anchors + a] = f32::NEG_INFINITY;
        }
        for a in (2..anchors).step_by(11) {
            o[a] = f32::NAN;
        }
        for a in (5..anchors).step_by(13) {
            o[2 * anchors + a] = f32::INFINITY;
        }
    }
    check(
        &head,
        nc,
        anchors,
        &eval,
        "zero-area and non-finite",
        &mut out,
    );
    check(
        &head,
        nc,
        anchors,
        &NmsConfig::display(),
        "zero-area and non-finite, best class",
        &mut out,
    );
    assert!(out.iter().flatten().all(|d| d.score.is_finite()));

    // No candidate over the threshold.
    let head: Vec<f32> = random_head(&mut rng, 2, nc, anchors, false)
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if (i / anchors) % (4 + nc) >= 4 {
                v * 0.001
            } else {
                v
            }
        })
        .collect();
    check(
        &head,
        nc,
        anchors,
        &NmsConfig {
            conf_threshold: 0.01,
            ..eval.clone()
        },
        "nothing over the threshold",
        &mut out,
    );
    assert!(out.iter().all(Vec::is_empty));

    // One class only; 300 classes.
    let head = random_head(&mut rng, 2, 1, 8400, true);
    check(&head, 1, 8400, &eval, "one class", &mut out);
    let head = random_head(&mut rng, 2, 300, 2100, true);
    check(&head, 300, 2100, &eval, "300 classes", &mut out);
    check(
        &head,
        300,
        2100,
        &NmsConfig::display(),
        "300 classes, best class",
        &mut out,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_nms_against_the_torchvision_peer_at_batch_8_640_80_classes() {
    // The same head for both, already on the GPU; both bring the kept detections to the host.
    // Prints the JSON record for bench/results (the GPU machine returns it in the test log).
    let (batch, nc, anchors) = (8, 80, 8400);
    let mut rng = Rng::new(5);
    let head = random_head(&mut rng, batch, nc, anchors, false);
    let dir = kestrel_tests::scratch_dir("gpu-nms-bench");
    let path = dir.join("head.f32");
    let bytes: Vec<u8> = head.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&path, bytes).expect("write head");
    let lb = letterboxes(batch);
    let mut gpu = GpuPostprocessor::new(0, batch, nc, 4 + nc, anchors).expect("GPU post");
    let ptr = gpu.upload(&head, batch).expect("upload");
    let mut out = Vec::new();
    let mut ours = serde_json::Map::new();
    for (name, cfg) in [
        ("evaluation", NmsConfig::evaluation()),
        ("display", NmsConfig::display()),
    ] {
        gpu.run_device(ptr, batch, &lb, &cfg, &mut out)
            .expect("warm-up");
        assert_identical(
            &out,
            &cpu_reference(&head, batch, nc, anchors, &lb, &cfg),
            name,
        );
        let ms = kestrel_tests::median_ms(20, || {
            gpu.run_device(ptr, batch, &lb, &cfg, &mut out)
                .expect("run");
        });
        ours.insert(
            name.into(),
            serde_json::json!({"ms_per_batch": ms, "kept": out.iter().map(Vec::len).collect::<Vec<_>>()}),
        );
    }
    let script = kestrel_tests::workspace_root().join("bench/peers/torch_nms_peer.py");
    let peer = std::process::Command::new(kestrel_tests::python())
        .arg(&script)
        .args([path.to_str().expect("path"), "8", "80", "8400"])
        .output()
        .expect("start the peer");
    assert!(
        peer.status.success(),
        "peer failed:\n{}",
        String::from_utf8_lossy(&peer.stderr)
    );
    let peer: serde_json::Value = serde_json::from_slice(&peer.stdout).expect("the peer's JSON");
    let ratio = |name: &str| {
        peer[name]["ms_per_batch"].as_f64().unwrap_or(f64::NAN)
            / ours[name]["ms_per_batch"].as_f64().unwrap_or(f64::NAN)
    };
    let record = serde_json::json!({
        "what": "decode + NMS of a raw head [8, 84, 8400] (random scores, 80 classes) on the GPU, kept detections to the host",
        "kestrel": ours,
        "peer": peer,
        "speedup_evaluation": ratio("evaluation"),
        "speedup_display": ratio("display"),
        "speedup_evaluation_vs_offset_nms": peer["evaluation_offset_nms"]["ms_per_batch"].as_f64().unwrap_or(f64::NAN)
            / ours["evaluation"]["ms_per_batch"].as_f64().unwrap_or(f64::NAN),
        "speedup_display_vs_offset_nms": peer["display_offset_nms"]["ms_per_batch"].as_f64().unwrap_or(f64::NAN)
            / ours["display"]["ms_per_batch"].as_f64().unwrap_or(f64::NAN),
    });
    println!("BENCH {record}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn end_to_end_detector_on_the_demo_model_matches_the_cpu() {
    use kestrel_runtime::Detector;
    use kestrel_runtime::engine::{Backend, Precision, build_engine};
    use kestrel_runtime::synth::{image_seed, render_scene_with};
    use kestrel_tests::small_batches as options;
    let model = kestrel_tests::workspace_root().join("models/gelan-t-shapes.onnx");
    // One engine for both post-processing paths, so they see the same output.
    let mut gpu = Detector::new(
        build_engine(&model, &options(Backend::Cuda, Precision::Fp32)).expect("cuda"),
    );
    let mut cpu =
        Detector::new(build_engine(&model, &options(Backend::Cpu, Precision::Fp32)).expect("cpu"));
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let (mut matched, mut total) = (0, 0);
    // Scenes of odd sizes, three to a batch (the profile pads nothing; sizes differ per image).
    for chunk in 0..8 {
        let scenes: Vec<_> = (0..3)
            .map(|i| {
                let k = chunk * 3 + i;
                render_scene_with(
                    image_seed(99, k),
                    320 + 37 * i as u32,
                    320 - 23 * i as u32,
                    1..=12,
                )
                .0
            })
            .collect();
        for cfg in [NmsConfig::evaluation(), NmsConfig::display()] {
            gpu.set_device_postprocessing(true);
            gpu.detect(&scenes, &cfg, &mut a).expect("end to end");
            gpu.set_device_postprocessing(false);
            gpu.detect(&scenes, &cfg, &mut b).expect("cuda, CPU post");
            // The same engine output: the GPU post-processing equals the CPU's exactly.
            assert_identical(&a, &b, "end to end vs CPU post-processing");
            cpu.detect(&scenes, &cfg, &mut c).expect("cpu");
            // Against the CPU backend (a different engine): the display detections match.
            if !cfg.multi_label {
                for (g, r) in a.iter().zip(&c) {
                    total += r.len();
                    matched += r
                        .iter()
                        .filter(|d| {
                            g.iter().any(|e| {
                                e.class_id == d.class_id
                                    && e.bbox.iou(&d.bbox) >= 0.95
                                    && (e.score - d.score).abs() <= 0.01
                            })
                        })
                        .count();
                }
            }
        }
    }
    println!("display detections of the CPU backend matched on the GPU: {matched}/{total}");
    assert!(total > 50 && matched == total, "{matched}/{total}");
}
