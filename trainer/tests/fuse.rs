//! The training-form network (BatchNorm, RepConvN branches) against the ONNX the exporter writes
//! from its fused weights, run by the CPU backend and by onnxruntime: one check of the
//! architecture mirror, the BatchNorm folding, the RepConvN merge and the weight names at once.
#![allow(clippy::unwrap_used)]

use kestrel_exporter::weights::save_safetensors;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightFile, WeightSource, export, write_model};
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
use kestrel_trainer::Gelan;
use tch::{Device, Kind, Tensor, nn};

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Give every BatchNorm non-trivial statistics and affine parameters, as after training, so the
/// folding is really exercised (fresh ones are the identity).
fn randomize_batch_norms(vs: &nn::VarStore) {
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let size = t.size();
            let fill = if name.ends_with("bn.running_var") {
                Tensor::rand(&size, (Kind::Float, Device::Cpu)) * 0.5 + 0.75
            } else if name.ends_with("bn.running_mean") || name.ends_with("bn.bias") {
                (Tensor::rand(&size, (Kind::Float, Device::Cpu)) - 0.5) * 0.2
            } else if name.ends_with("bn.weight") {
                Tensor::rand(&size, (Kind::Float, Device::Cpu)) * 0.5 + 0.75
            } else {
                continue;
            };
            t.copy_(&fill);
        }
    });
}

fn training_form_matches_exported_fused_form(name: &str) {
    let imgsz = 128;
    let cfg = ModelConfig::new(name, 3, imgsz).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gelan::new(&vs.root(), &cfg).unwrap();
    randomize_batch_norms(&vs);

    let batch = 2;
    tch::manual_seed(3);
    let images = Tensor::rand(
        [batch, 3, imgsz as i64, imgsz as i64],
        (Kind::Float, Device::Cpu),
    );
    let out = model.forward_outputs_t(&images, false, false).unwrap();
    let a = cfg.num_anchors() as i64;
    let nm = cfg.spec.mask_coefficients().unwrap_or(0) as i64;
    assert_eq!(out.head.size(), vec![batch, 4 + 3 + nm, a]);
    let ours = Vec::<f32>::try_from(out.head.flatten(0, -1)).unwrap();
    let our_prototypes = out.prototypes.map(|p| {
        let q = imgsz as i64 / 4;
        assert_eq!(p.size(), vec![batch, nm, q, q]);
        Vec::<f32>::try_from(p.flatten(0, -1)).unwrap()
    });

    let dir = std::env::temp_dir().join(format!(
        "kestrel-trainer-fuse-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("fused.safetensors");
    save_safetensors(&weights, &model.fuse().unwrap()).unwrap();
    // Every fused tensor must be used by the exporter and every exporter weight must exist.
    let mut source = WeightSource::File(WeightFile::load(&weights).unwrap());
    let onnx = export(&cfg, &mut source, &ExportOptions::dynamic(3)).unwrap();
    let path = dir.join("fused.onnx");
    write_model(&onnx, &path).unwrap();

    let options = BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 1,
            opt: batch as usize,
            max: batch as usize,
        },
        device: 0,
    };
    let mut engine = build_engine(&path, &options).unwrap();
    let input = Vec::<f32>::try_from(images.flatten(0, -1)).unwrap();
    let (exported, exported_prototypes) =
        engine.run_with_prototypes(&input, batch as usize).unwrap();
    assert_eq!(exported.len(), ours.len());
    let e = rel_l2(&ours, exported);
    println!("{name}: training form (tch) vs fused ONNX (cpu backend): rel L2 {e:.2e}");
    assert!(e < 1e-4, "{name}: {e}");
    match (&our_prototypes, exported_prototypes) {
        (Some(ours), Some(theirs)) => {
            let e = rel_l2(ours, theirs);
            println!("{name}: prototypes, tch vs cpu backend: rel L2 {e:.2e}");
            assert!(e < 1e-4, "{name} prototypes: {e}");
        }
        (None, None) => {}
        (o, t) => panic!("prototypes: tch {} vs engine {}", o.is_some(), t.is_some()),
    }

    // And against onnxruntime, a reference nobody here wrote.
    let write_f32 = |path: &std::path::Path, v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
    };
    let (in_path, ours_path) = (dir.join("input.f32"), dir.join("tch.f32"));
    write_f32(&in_path, &input);
    write_f32(&ours_path, &ours);
    let report = kestrel_tests::run_python(
        "ort_compare.py",
        &[
            path.to_str().unwrap(),
            in_path.to_str().unwrap(),
            &format!("{batch},3,{imgsz},{imgsz}"),
            ours_path.to_str().unwrap(),
            "3",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    println!("{name}: training form (tch) vs fused ONNX (onnxruntime): {v}");
    let mut keys = vec!["rel_l2", "rel_l2_boxes", "rel_l2_scores"];
    if nm > 0 {
        keys.push("rel_l2_masks");
    }
    for key in keys {
        let e = v[key].as_f64().unwrap();
        assert!(e < 1e-4, "{name}: {key} = {e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gelan_t_training_form_matches_its_fused_export() {
    training_form_matches_exported_fused_form("gelan-t");
}

#[test]
fn gelan_c_training_form_matches_its_fused_export() {
    training_form_matches_exported_fused_form("gelan-c");
}

#[test]
fn gelan_t_seg_training_form_matches_its_fused_export() {
    training_form_matches_exported_fused_form("gelan-t-seg");
}
