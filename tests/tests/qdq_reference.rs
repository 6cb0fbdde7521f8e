//! Post-training quantization end to end: gelan-t calibrated on synthetic scenes and quantized to
//! Q/DQ passes the ONNX checker, onnxruntime and the CPU backend compute the same Q/DQ model, and
//! the quantized model stays close to the float one.

use std::collections::HashMap;
use std::path::Path;

use kestrel_exporter::quantize::{quantization_points, quantize_model, sharing_groups};
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx, summarize};
use kestrel_runtime::calibrate::activation_amax;
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_runtime::letterbox::Letterboxer;
use kestrel_runtime::synth::{image_seed, render_scene};
use kestrel_tests::{run_python, scratch_dir};

const NC: usize = 80;
const IMGSZ: usize = 320;

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write f32 file");
}

/// ‖a − b‖ / ‖b‖ over the rows `rows` of `[batch, 4 + NC, anchors]` outputs.
fn rel_l2(a: &[f32], b: &[f32], anchors: usize, rows: std::ops::Range<usize>) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (ra, rb) in a
        .chunks_exact(anchors)
        .zip(b.chunks_exact(anchors))
        .enumerate()
        .filter(|(i, _)| rows.contains(&(i % (4 + NC))))
        .map(|(_, r)| r)
    {
        for (x, y) in ra.iter().zip(rb) {
            num += f64::from(x - y).powi(2);
            den += f64::from(*y).powi(2);
        }
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn ptq_gelan_t_matches_onnxruntime_and_stays_close_to_float() {
    let dir = scratch_dir("qdq-reference");
    let cfg = ModelConfig::new("gelan-t", NC, IMGSZ).expect("config");
    let float = export(
        &cfg,
        &mut WeightSource::Random { seed: 1 },
        &ExportOptions::dynamic(NC),
    )
    .expect("export");
    let float_path = dir.join("gelan-t.onnx");
    onnx::write_model(&float, &float_path).expect("write float model");

    // Calibrate on four synthetic scenes of another aspect ratio (the letterbox pads them).
    let tensors: Vec<String> = sharing_groups(&float).into_iter().flatten().collect();
    let calibration = (0..4).map(|i| Ok(render_scene(image_seed(7, i), 400, 300).0));
    let bytes = onnx::encode_model(&float);
    let amax =
        activation_amax(&bytes, &float_path, &tensors, calibration, |_| {}).expect("calibrate");
    assert_eq!(amax.len(), tensors.len());
    let qdq = quantize_model(&float, &amax).expect("quantize");
    let qdq_path = dir.join("gelan-t.qdq.onnx");
    onnx::write_model(&qdq, &qdq_path).expect("write Q/DQ model");
    let pairs = summarize(&qdq).qdq_pairs;
    assert_eq!(pairs, quantization_points(&float).len());

    let checked = run_python("check_onnx.py", &[qdq_path.to_str().expect("utf-8 path")]);
    assert!(checked.starts_with("ok "), "{checked}");

    // Two scenes the calibration did not see.
    let per_image = 3 * IMGSZ * IMGSZ;
    let mut input = vec![0f32; 2 * per_image];
    let mut letterbox = Letterboxer::new();
    for (i, chunk) in input.chunks_exact_mut(per_image).enumerate() {
        let (image, _) = render_scene(image_seed(8, i), 360, 360);
        letterbox
            .run(&image, IMGSZ as u32, IMGSZ as u32, chunk)
            .expect("letterbox");
    }
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        ..Default::default()
    };
    let mut q_engine = build_engine(&qdq_path, &options).expect("cpu engine for Q/DQ");
    let anchors = q_engine.info().anchors;
    let ours = q_engine.run(&input, 2).expect("run Q/DQ").to_vec();
    let mut f_engine = build_engine(&float_path, &options).expect("cpu engine for float");
    let reference = f_engine.run(&input, 2).expect("run float").to_vec();

    let in_path = dir.join("input.f32");
    let out_path = dir.join("ours.f32");
    write_f32(&in_path, &input);
    write_f32(&out_path, &ours);
    let report = run_python(
        "ort_compare.py",
        &[
            qdq_path.to_str().expect("utf-8 path"),
            in_path.to_str().expect("utf-8 path"),
            &format!("2,3,{IMGSZ},{IMGSZ}"),
            out_path.to_str().expect("utf-8 path"),
            &NC.to_string(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).expect("ort_compare JSON");
    println!("{pairs} Q/DQ pairs; cpu backend vs onnxruntime on the Q/DQ model: {v}");
    let vs_ort = v["rel_l2"].as_f64().expect("rel_l2");
    assert!(vs_ort < 3e-2, "cpu vs onnxruntime: rel L2 {vs_ort}");

    let all = rel_l2(&ours, &reference, anchors, 0..4 + NC);
    let wh = rel_l2(&ours, &reference, anchors, 2..4);
    let scores = rel_l2(&ours, &reference, anchors, 4..4 + NC);
    println!("Q/DQ vs float: rel L2 output0 {all:.2e}, box w/h {wh:.2e}, scores {scores:.2e}");
    // Measured 8e-6 (w/h 1.1e-5, scores 1.0e-3; the DFL's projection stays float). A random
    // network's outputs hardly depend on its features, so the bounds are tight: with every range
    // 10x too small (saturation) output0 moves by 1.3e-3, 160x more.
    assert!(all < 1e-4, "Q/DQ vs float: rel L2 of output0 {all}");
    assert!(wh < 1e-4, "Q/DQ vs float: rel L2 of box w/h {wh}");

    // The control: ranges 10x too small saturate, and the comparison sees it.
    let small: HashMap<String, f32> = amax.iter().map(|(t, a)| (t.clone(), a / 10.0)).collect();
    let saturated_path = dir.join("saturated.qdq.onnx");
    let saturated = quantize_model(&float, &small).expect("quantize with small ranges");
    onnx::write_model(&saturated, &saturated_path).expect("write saturated model");
    let mut s_engine = build_engine(&saturated_path, &options).expect("cpu engine, saturated");
    let saturated_out = s_engine.run(&input, 2).expect("run saturated").to_vec();
    let bad = rel_l2(&saturated_out, &reference, anchors, 0..4 + NC);
    let bad_wh = rel_l2(&saturated_out, &reference, anchors, 2..4);
    let bad_scores = rel_l2(&saturated_out, &reference, anchors, 4..4 + NC);
    println!(
        "ranges / 10 (saturating): rel L2 output0 {bad:.2e}, box w/h {bad_wh:.2e}, scores {bad_scores:.2e}"
    );
    assert!(bad > 5e-4, "saturating ranges went unnoticed: rel L2 {bad}");
    let _ = std::fs::remove_dir_all(dir);
}
