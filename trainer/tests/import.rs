//! Importing YOLOv9 state dicts: a GELAN checkpoint (names as they are, FP16 widened, counters
//! ignored) and a YOLOv9 dual-branch checkpoint (main branch shifted by the Silence layer, head
//! from DualDDetect's cv4/cv5, auxiliary branch dropped) give a model computing exactly what the
//! source did; a checkpoint of another size is refused naming the tensor.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kestrel_exporter::ModelConfig;
use kestrel_trainer::Gelan;
use kestrel_trainer::import::{Layout, import_weights, read_checkpoint};
use tch::{Device, Kind, Tensor, nn};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kestrel-import-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model with every variable random (BatchNorm statistics included), as after training.
fn trained(cfg: &ModelConfig, seed: i64) -> (nn::VarStore, Gelan) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gelan::new(&vs.root(), cfg).unwrap();
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let r = Tensor::rand(t.size(), (Kind::Float, Device::Cpu));
            let fill = if name.ends_with("running_var") || name.ends_with("bn.weight") {
                r * 0.5 + 0.75
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                (r - 0.5) * 0.2
            } else {
                (r - 0.5) * 0.1
            };
            t.copy_(&fill);
        }
    });
    (vs, model)
}

/// YOLOv9's extras in a state dict: BatchNorm counters and the DFL projection.
fn with_yolov9_extras(tensors: &mut Vec<(String, Tensor)>, head: usize) {
    let counters: Vec<String> = tensors
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".running_mean").map(String::from))
        .collect();
    for bn in counters {
        tensors.push((format!("{bn}.num_batches_tracked"), Tensor::from(1234i64)));
    }
    tensors.push((
        format!("model.{head}.dfl.conv.weight"),
        Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 16, 1, 1]),
    ));
}

fn write(path: &Path, tensors: &[(String, Tensor)]) {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, path).unwrap();
}

fn forward(model: &Gelan, imgsz: i64) -> Tensor {
    tch::manual_seed(7);
    let x = Tensor::rand([1, 3, imgsz, imgsz], (Kind::Float, Device::Cpu));
    model.forward_t(&x, false).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn a_gelan_state_dict_loads_as_is_and_fp16_is_widened() {
    let dir = temp("gelan");
    let cfg = ModelConfig::new("gelan-t", 4, 64).unwrap();
    let head = cfg.spec.layers.len() - 1;
    let (vs, source) = trained(&cfg, 1);
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    with_yolov9_extras(&mut tensors, head);
    let path = dir.join("gelan-t.safetensors");
    write(&path, &tensors);

    let mut target_vs = nn::VarStore::new(Device::Cpu);
    let target = Gelan::new(&target_vs.root(), &cfg).unwrap();
    let report = import_weights(&mut target_vs, &read_checkpoint(&path).unwrap(), head).unwrap();
    assert_eq!(report.layout, Layout::Gelan);
    assert_eq!(report.loaded, vs.variables().len());
    assert!(
        report.unused > 0,
        "counters and the DFL projection are not used"
    );
    let d = max_diff(&forward(&source, 64), &forward(&target, 64));
    // Same weights; only the CPU kernels' thread split can reorder sums.
    assert!(d < 1e-4, "{d}");

    // Half-precision checkpoints (YOLOv9 saves its models in FP16) are widened on the way in.
    let half: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = if t.is_floating_point() {
                t.to_kind(Kind::Half)
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    write(&path, &half);
    import_weights(&mut target_vs, &read_checkpoint(&path).unwrap(), head).unwrap();
    let d = max_diff(&forward(&source, 64), &forward(&target, 64));
    assert!(d > 0.0 && d < 0.05, "{d}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_yolov9_dual_branch_state_dict_is_reparameterized_to_gelan() {
    let dir = temp("dual");
    // gelan-c is yolov9-c without its auxiliary branch.
    let cfg = ModelConfig::new("gelan-c", 3, 64).unwrap();
    let head = cfg.spec.layers.len() - 1;
    assert_eq!(head, 22);
    let (vs, source) = trained(&cfg, 2);
    // yolov9-c's names: Silence at 0, the main branch at 1..=22, the auxiliary branch at 23..=37
    // and DualDDetect at 38 (cv2/cv3 auxiliary, cv4/cv5 main).
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in vs.variables() {
        let rest = name.strip_prefix("model.").unwrap();
        let (layer, rest) = rest.split_once('.').unwrap();
        let layer: usize = layer.parse().unwrap();
        let renamed = if layer < head {
            format!("model.{}.{rest}", layer + 1)
        } else if let Some(r) = rest.strip_prefix("cv2.") {
            // The auxiliary head has the same shapes but other values.
            tensors.push((format!("model.38.{rest}"), t.detach() * 3.0));
            format!("model.38.cv4.{r}")
        } else if let Some(r) = rest.strip_prefix("cv3.") {
            tensors.push((format!("model.38.{rest}"), t.detach() - 1.0));
            format!("model.38.cv5.{r}")
        } else {
            panic!("unexpected variable {name}");
        };
        tensors.push((renamed, t.detach()));
    }
    for k in 23..38 {
        tensors.push((
            format!("model.{k}.conv.weight"),
            Tensor::ones([8, 8, 1, 1], (Kind::Float, Device::Cpu)),
        ));
    }
    with_yolov9_extras(&mut tensors, 38);
    tensors.push((
        "model.38.dfl2.conv.weight".into(),
        Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 16, 1, 1]),
    ));
    let path = dir.join("yolov9-c.safetensors");
    write(&path, &tensors);

    let mut target_vs = nn::VarStore::new(Device::Cpu);
    let target = Gelan::new(&target_vs.root(), &cfg).unwrap();
    let report = import_weights(&mut target_vs, &read_checkpoint(&path).unwrap(), head).unwrap();
    assert_eq!(report.layout, Layout::Dual { shift: 1, head: 38 });
    assert_eq!(report.loaded, vs.variables().len());
    let d = max_diff(&forward(&source, 64), &forward(&target, 64));
    // Same weights; only the CPU kernels' thread split can reorder sums.
    assert!(d < 1e-4, "{d}");

    // The CLI: import, then the checkpoint exports like a trained one.
    let out = dir.join("imported");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    };
    let (ok, log) = run(&[
        "import",
        "--weights",
        path.to_str().unwrap(),
        "--model",
        "gelan-c",
        "--imgsz",
        "64",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok && log.contains("Dual { shift: 1, head: 38 }"), "{log}");
    let onnx = dir.join("imported.onnx");
    let (ok, log) = run(&[
        "export",
        "--weights",
        out.with_extension("safetensors").to_str().unwrap(),
        "-o",
        onnx.to_str().unwrap(),
    ]);
    assert!(ok && log.contains("gelan-c, 3 classes, 64x64"), "{log}");

    // The wrong model size is refused, naming a tensor and both shapes.
    let (ok, log) = run(&[
        "import",
        "--weights",
        path.to_str().unwrap(),
        "--model",
        "gelan-s",
        "-o",
        dir.join("wrong").to_str().unwrap(),
    ]);
    assert!(!ok, "{log}");
    assert!(
        log.contains("does not fit this model") && log.contains("the model needs"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
