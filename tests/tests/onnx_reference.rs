//! Exported models against the ONNX reference tools: the checker accepts every size, and the CPU
//! backend computes what onnxruntime computes.

use std::path::Path;

use kestrel_exporter::weights::{SplitMix64, WeightFile, save_safetensors};
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, inspect, onnx};
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_tests::{run_python, scratch_dir};

fn export_to(name: &str, nc: usize, imgsz: usize, path: &Path) {
    let cfg = ModelConfig::new(name, nc, imgsz).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 1 },
        &ExportOptions::dynamic(nc),
    )
    .unwrap();
    onnx::write_model(&model, path).unwrap();
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_size_passes_the_onnx_checker() {
    let dir = scratch_dir("checker");
    let mut paths = Vec::new();
    let names = kestrel_exporter::spec::MODEL_NAMES
        .iter()
        .chain(&kestrel_exporter::spec::SEG_MODEL_NAMES);
    for name in names {
        let p = dir.join(format!("{name}.onnx"));
        export_to(name, 80, 640, &p);
        paths.push(p.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let out = run_python("check_onnx.py", &args);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        8,
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn compare_with_onnxruntime(name: &str) {
    let dir = scratch_dir(&format!("ort-{name}"));
    let model_path = dir.join(format!("{name}.onnx"));
    let nc = 80;
    export_to(name, nc, 640, &model_path);
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        ..Default::default()
    };
    let mut engine = build_engine(&model_path, &options).unwrap();
    let per_image = engine.info().input_len();
    let mut rng = SplitMix64::new(42);
    let input: Vec<f32> = (0..2 * per_image).map(|_| rng.next_f32()).collect();
    let (ours, prototypes) = engine.run_with_prototypes(&input, 2).unwrap();
    let (ours, prototypes) = (ours.to_vec(), prototypes.map(<[f32]>::to_vec));
    let in_path = dir.join("input.f32");
    let out_path = dir.join("ours.f32");
    let protos_path = dir.join("ours-prototypes.f32");
    write_f32(&in_path, &input);
    write_f32(&out_path, &ours);
    let nc_text = nc.to_string();
    let mut args = vec![
        model_path.to_str().unwrap(),
        in_path.to_str().unwrap(),
        "2,3,640,640",
        out_path.to_str().unwrap(),
        &nc_text,
    ];
    if let Some(p) = &prototypes {
        write_f32(&protos_path, p);
        args.extend(["--prototypes", protos_path.to_str().unwrap()]);
    }
    let report = run_python("ort_compare.py", &args);
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    println!("{name}: {v}");
    let seg = name.ends_with("-seg");
    let rows = if seg { 84 + 32 } else { 84 };
    assert_eq!(v["shape"], serde_json::json!([2, rows, 8400]));
    if seg {
        assert_eq!(
            v["output_shapes"]["output1"],
            serde_json::json!([2, 32, 160, 160]),
            "{name}: prototypes"
        );
        for key in ["rel_l2_masks", "rel_l2_prototypes"] {
            let e = v[key].as_f64().unwrap();
            assert!(e < 1e-4, "{name}: {key} = {e}");
        }
    }
    for key in ["rel_l2", "rel_l2_boxes"] {
        let e = v[key].as_f64().unwrap();
        assert!(e < 1e-4, "{name}: {key} = {e}");
    }
    // Class scores are probabilities near 1e-5 in these random-weight models, where tract's and
    // onnxruntime's Sigmoid approximations differ by about 1e-3 relative (1e-7 absolute); so they
    // are held to an absolute bound, 100 times finer than any useful score threshold (1e-3).
    let e = v["max_abs_scores"].as_f64().unwrap();
    assert!(e < 1e-5, "{name}: max_abs_scores = {e}");
    // Batch 1 on the second image gives that image's rows of the batch-2 run.
    let single = engine.run(&input[per_image..], 1).unwrap().to_vec();
    let len = engine.info().output_len();
    let diff = single
        .iter()
        .zip(&ours[len..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "{name}: batch 1 vs batch 2 differ by {diff}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gelan_t_cpu_matches_onnxruntime() {
    compare_with_onnxruntime("gelan-t");
}

#[test]
fn gelan_s_cpu_matches_onnxruntime() {
    compare_with_onnxruntime("gelan-s");
}

#[test]
fn gelan_t_seg_cpu_matches_onnxruntime() {
    // Both outputs through the CPU backend: output0 (detection rows and mask coefficients) and
    // the prototypes.
    compare_with_onnxruntime("gelan-t-seg");
}

/// Weights written with `--save-weights` load back by name and give the identical model.
#[test]
fn safetensors_weights_round_trip() {
    let dir = scratch_dir("weights");
    let cfg = ModelConfig::new("gelan-t", 6, 320).unwrap();
    let opts = ExportOptions::dynamic(6);
    let random = export(&cfg, &mut WeightSource::Random { seed: 9 }, &opts).unwrap();
    let w = dir.join("w.safetensors");
    save_safetensors(&w, &inspect::conv_parameters(&random)).unwrap();
    let file = WeightFile::load(&w).unwrap();
    let loaded = export(&cfg, &mut WeightSource::File(file), &opts).unwrap();
    assert_eq!(onnx::encode_model(&random), onnx::encode_model(&loaded));
    // The same file does not fit another class count: the message names the tensor.
    let cfg80 = ModelConfig::new("gelan-t", 80, 320).unwrap();
    let err = export(
        &cfg80,
        &mut WeightSource::File(WeightFile::load(&w).unwrap()),
        &ExportOptions::dynamic(80),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.22.cv3.0.") && err.contains("--classes"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
