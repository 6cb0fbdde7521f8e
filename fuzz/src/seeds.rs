//! The seed corpora, made by Kestrel's own code: models from the exporter (a GELAN at an eighth
//! of gelan-t's widths, its Q/DQ and end-to-end forms, small hand-built detectors), engine files
//! from the runtime's container writer, images of synthetic scenes in PNG, JPEG and BMP, KServe
//! requests from the runtime's encoder, and the YOLO labels, COCO json and RLE strings that
//! `kestrel synth` writes. `bash scripts/fuzz-corpus.sh` writes them to `fuzz/seeds/` (through
//! the ignored test `write_fuzz_seeds` of `tests/tests/fuzz_regressions.rs`, which compiles this
//! file in the normal workspace build); every file is small, so a mutation runs in milliseconds.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use kestrel_exporter::builder::GraphBuilder;
use kestrel_exporter::end2end::{EndToEnd, append_nms};
use kestrel_exporter::onnx::{encode_model, pb};
use kestrel_exporter::quantize::{quantization_points, quantize_model};
use kestrel_exporter::shapes::Dim;
use kestrel_exporter::spec::Block;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export};
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision};
use kestrel_runtime::engine_file::{EngineFile, EngineHeader, sha256_hex};
use kestrel_runtime::kserve::{InferRequest, TensorEncoding};
use kestrel_runtime::synth::{SynthConfig, generate, image_seed, render_scene, scene_masks};

/// One seed: the target's folder name, a file name, the bytes.
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed of every target.
pub fn all() -> Result<Vec<Seed>, String> {
    let mut out = Vec::new();
    let models = onnx_models()?;
    for (name, bytes) in &models {
        out.push(("onnx_model", format!("{name}.onnx"), bytes.clone()));
    }
    let tiny = &models
        .iter()
        .find(|(n, _)| *n == "tiny_reshape")
        .ok_or("no tiny model")?
        .1;
    out.extend(engine_files(tiny));
    out.extend(images()?);
    out.extend(kserve_requests());
    out.extend(labels()?);
    out.extend(repository_configs()?);
    Ok(out)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// gelan-t's layer list with every width divided by 8 (kept a multiple of 4, the splits of the
/// ELAN blocks need even widths): the same graph, a tiny fraction of the weights.
fn micro_gelan(num_classes: usize, imgsz: usize) -> Result<ModelConfig, String> {
    let mut cfg = ModelConfig::new("gelan-t", num_classes, imgsz).map_err(err)?;
    let s = |c: &mut usize| *c = (*c / 8).max(4).div_ceil(4) * 4;
    for layer in &mut cfg.spec.layers {
        match &mut layer.block {
            Block::Conv { c2, .. } | Block::ADown { c2 } | Block::AConv { c2 } => s(c2),
            Block::Elan1 { c2, c3, c4 } | Block::RepNcspElan4 { c2, c3, c4, .. } => {
                s(c2);
                s(c3);
                s(c4);
            }
            Block::SppElan { c2, c3 } => {
                s(c2);
                s(c3);
            }
            Block::CbLinear { c2s } => c2s.iter_mut().for_each(s),
            _ => {}
        }
    }
    cfg.spec.name = "gelan-micro".into();
    cfg.validate().map_err(err)?;
    Ok(cfg)
}

/// The ONNX seeds: the micro GELAN (float, Q/DQ, end-to-end) at 32 × 32 and small hand-built
/// detectors that tract builds in microseconds.
pub fn onnx_models() -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let cfg = micro_gelan(2, 32)?;
    let opts = ExportOptions {
        batch: Some(1),
        class_names: vec!["a".into(), "b".into()],
    };
    let model = export(&cfg, &mut WeightSource::Random { seed: 1 }, &opts).map_err(err)?;
    let amax: HashMap<String, f32> = quantization_points(&model)
        .into_iter()
        .map(|p| (p, 4.0))
        .collect();
    let qdq = quantize_model(&model, &amax).map_err(err)?;
    let e2e = append_nms(
        model.clone(),
        &EndToEnd {
            max_detections: 5,
            ..EndToEnd::default()
        },
    )
    .map_err(err)?;
    Ok(vec![
        ("gelan_micro", encode_model(&model)),
        ("gelan_micro_qdq", encode_model(&qdq)),
        ("gelan_micro_end2end", encode_model(&e2e)),
        ("tiny_reshape", tiny_reshape()),
        ("tiny_ops", tiny_ops()),
        ("tiny_conv", tiny_conv()),
    ])
}

fn image_input(b: &mut GraphBuilder, side: i64) -> String {
    b.input(
        "images",
        vec![
            Dim::Fixed(1),
            Dim::Fixed(3),
            Dim::Fixed(side),
            Dim::Fixed(side),
        ],
    )
}

/// images `[1, 3, 4, 4]` reshaped to output0 `[1, 6, 8]` (2 classes, 8 anchors).
fn tiny_reshape() -> Vec<u8> {
    encode_model(&kestrel_exporter::builder::tiny_detector().expect("tiny detector"))
}

/// Relu, Neg, Concat and Reshape to output0 `[1, 9, 16]`.
fn tiny_ops() -> Vec<u8> {
    let mut b = GraphBuilder::new();
    let x = image_input(&mut b, 4);
    let r = b.node1("Relu", "relu", &[&x], vec![]).expect("relu");
    let n = b.node1("Neg", "neg", &[&r], vec![]).expect("neg");
    let c = b
        .node1(
            "Concat",
            "cat",
            &[&r, &n, &n],
            vec![pb::AttributeProto::int("axis", 1)],
        )
        .expect("concat");
    let shape = b.const_i64("shape", &[1, 9, 16]);
    let y = b
        .node1("Reshape", "flatten", &[&c, &shape], vec![])
        .expect("reshape");
    b.rename_last_output(&y, "output0");
    b.output("output0", pb::data_type::FLOAT, "");
    encode_model(&b.finish_model("tiny"))
}

/// A 1 × 1 convolution to 6 channels, Sigmoid, Reshape to output0 `[1, 6, 64]`.
fn tiny_conv() -> Vec<u8> {
    let mut b = GraphBuilder::new();
    let x = image_input(&mut b, 8);
    let weights: Vec<f32> = (0..18).map(|i| i as f32 / 18.0 - 0.5).collect();
    let w = b.const_f32("w", &[6, 3, 1, 1], &weights);
    let bias = b.const_f32("b", &[6], &[0.1; 6]);
    let c = b
        .node1(
            "Conv",
            "conv",
            &[&x, &w, &bias],
            vec![pb::AttributeProto::ints("kernel_shape", &[1, 1])],
        )
        .expect("conv");
    let s = b.node1("Sigmoid", "sig", &[&c], vec![]).expect("sigmoid");
    let shape = b.const_i64("shape", &[1, 6, 64]);
    let y = b
        .node1("Reshape", "flatten", &[&s, &shape], vec![])
        .expect("reshape");
    b.rename_last_output(&y, "output0");
    b.output("output0", pb::data_type::FLOAT, "");
    encode_model(&b.finish_model("tiny"))
}

/// Engine files around `onnx` (the first byte is the target's mode: 1 = fix the checksum).
fn engine_files(onnx: &[u8]) -> Vec<Seed> {
    let options = BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 4,
        },
        ..BuildOptions::default()
    };
    let env = crate::checks::cpu_environment();
    let cpu = EngineFile {
        header: EngineHeader::new(onnx, &options, &env),
        onnx: onnx.to_vec(),
        plan: Vec::new(),
    };
    let mut cuda = cpu.clone();
    cuda.header.backend = "cuda".into();
    cuda.header.device = "NVIDIA H100 80GB HBM3".into();
    cuda.header.compute_capability = Some((9, 0));
    cuda.header.backend_versions = [
        ("cudnn".to_string(), "9.14.0".to_string()),
        ("driver".to_string(), "13000".to_string()),
    ]
    .into();
    cuda.header.layer_choices = serde_json::json!({"conv": {"algo": 1, "fused": false}});
    cuda.plan = b"a serialized plan".to_vec();
    let with_mode = |mode: u8, bytes: Vec<u8>| {
        let mut v = vec![mode];
        v.extend(bytes);
        v
    };
    // Version 1: no plan section; its checksum is fixed by the target (mode 1).
    let mut v1 = cpu.encode();
    let body = v1.len() - 32 - 8;
    v1.truncate(body);
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&[0; 32]);
    vec![
        (
            "engine_file",
            "cpu.engine".into(),
            with_mode(1, cpu.encode()),
        ),
        (
            "engine_file",
            "cpu_exact.engine".into(),
            with_mode(0, cpu.encode()),
        ),
        (
            "engine_file",
            "cuda.engine".into(),
            with_mode(1, cuda.encode()),
        ),
        ("engine_file", "v1.engine".into(), with_mode(1, v1)),
    ]
}

/// Synthetic scenes in every accepted format, and a PNG header of 20000 × 20000 pixels.
fn images() -> Result<Vec<Seed>, String> {
    use image::{DynamicImage, ImageFormat};
    let (scene, _) = render_scene(image_seed(7, 0), 24, 16);
    let rgb = DynamicImage::ImageRgb8(scene);
    let encode = |img: &DynamicImage, format: ImageFormat| -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .map_err(err)?;
        Ok(bytes)
    };
    let mut out = vec![
        (
            "image_decode",
            "scene.png".into(),
            encode(&rgb, ImageFormat::Png)?,
        ),
        (
            "image_decode",
            "scene.jpg".into(),
            encode(&rgb, ImageFormat::Jpeg)?,
        ),
        (
            "image_decode",
            "scene.bmp".into(),
            encode(&rgb, ImageFormat::Bmp)?,
        ),
        (
            "image_decode",
            "scene_rgba.png".into(),
            encode(&DynamicImage::ImageRgba8(rgb.to_rgba8()), ImageFormat::Png)?,
        ),
        (
            "image_decode",
            "scene_gray16.png".into(),
            encode(
                &DynamicImage::ImageLuma16(rgb.to_luma16()),
                ImageFormat::Png,
            )?,
        ),
        (
            "image_decode",
            "scene_gray.jpg".into(),
            encode(&DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Jpeg)?,
        ),
    ];
    // A decompression bomb's header: a 1 × 1 PNG whose IHDR is rewritten to 20000 × 20000.
    let mut bomb = encode(
        &DynamicImage::ImageRgb8(image::RgbImage::new(1, 1)),
        ImageFormat::Png,
    )?;
    bomb[16..20].copy_from_slice(&20000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    out.push(("image_decode", "bomb_header.png".into(), bomb));
    Ok(out)
}

/// CRC-32 (IEEE) of PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// KServe requests for the target's model (`J` + JSON body; `B` + header length + newline +
/// body), written by [`InferRequest::encode`].
fn kserve_requests() -> Vec<Seed> {
    let model = crate::checks::kserve_model();
    let per = model.values_per_image();
    let request = |images: usize| InferRequest {
        id: None,
        images,
        input: (0..images * per).map(|i| (i % 7) as f32 * 0.125).collect(),
        outputs: Vec::new(),
        binary_output: false,
        timeout: None,
    };
    let full = InferRequest {
        id: Some("req-1".into()),
        outputs: vec!["output0".into()],
        binary_output: true,
        timeout: Some(Duration::from_micros(250_000)),
        ..request(2)
    };
    let wire = |r: &InferRequest, encoding: TensorEncoding| {
        let e = r.encode(&model, encoding);
        match e.header_length {
            None => [b"J".as_slice(), &e.body].concat(),
            Some(n) => [format!("B{n}\n").as_bytes(), &e.body].concat(),
        }
    };
    vec![
        (
            "kserve_request",
            "json_1.req".into(),
            wire(&request(1), TensorEncoding::Json),
        ),
        (
            "kserve_request",
            "json_full.req".into(),
            wire(&full, TensorEncoding::Json),
        ),
        (
            "kserve_request",
            "binary_1.req".into(),
            wire(&request(1), TensorEncoding::Binary),
        ),
        (
            "kserve_request",
            "binary_full.req".into(),
            wire(&full, TensorEncoding::Binary),
        ),
    ]
}

/// Model folders' `config.json` files: the defaults as the runtime writes them, the forms the
/// docs show (GPU placement, preferred batch sizes, a labels file, detection defaults), and
/// refused ones (a labels path out of the folder, disagreeing placements).
fn repository_configs() -> Result<Vec<Seed>, String> {
    use kestrel_runtime::model_config::{InstanceConfig, ModelConfig};
    let full = ModelConfig {
        backend: "cuda".into(),
        precision: "int8".into(),
        max_batch_size: 16,
        max_queue_delay_us: 500,
        max_queue_size: 128,
        preferred_batch_sizes: vec![4, 8],
        instance_count: 2,
        instances: vec![InstanceConfig { gpu: 0 }, InstanceConfig { gpu: 1 }],
        conf_threshold: 0.4,
        iou_threshold: 0.6,
        max_detections: 100,
        labels: Some("meta/labels.txt".into()),
    };
    let pretty = |c: &ModelConfig| serde_json::to_vec_pretty(c).map_err(err);
    let seed = |name: &str, bytes: Vec<u8>| ("repository_config", format!("{name}.json"), bytes);
    Ok(vec![
        seed("defaults", pretty(&ModelConfig::default())?),
        seed("full", pretty(&full)?),
        seed("empty", b"{}".to_vec()),
        seed(
            "cpu_batching",
            br#"{"backend": "cpu", "max_batch_size": 4, "max_queue_delay_us": 0}"#.to_vec(),
        ),
        seed(
            "labels_outside",
            br#"{"labels": "../other/labels.txt", "instance_count": 3}"#.to_vec(),
        ),
        seed(
            "placements_disagree",
            br#"{"instance_count": 3, "instances": [{"gpu": 0}, {"gpu": 1}]}"#.to_vec(),
        ),
    ])
}

/// YOLO labels and COCO json of a small `kestrel synth` dataset, and COCO RLE strings of its
/// scenes' masks.
fn labels() -> Result<Vec<Seed>, String> {
    let dir = std::env::temp_dir().join(format!("kestrel-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = SynthConfig {
        images: 4,
        width: 48,
        height: 32,
        seed: 3,
        val_fraction: 0.5,
        min_objects: 1,
        max_objects: 3,
    };
    generate(&cfg, &dir, &mut |_, _| {}).map_err(err)?;
    let mut out = Vec::new();
    let prefix = {
        let mut p = (cfg.width as u16).to_le_bytes().to_vec();
        p.extend((cfg.height as u16).to_le_bytes());
        p.push(kestrel_runtime::synth::CLASS_NAMES.len() as u8);
        p
    };
    for split in ["train", "val"] {
        let labels = dir.join("labels").join(split);
        let mut files: Vec<_> = std::fs::read_dir(&labels)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read(&f).map_err(err)?;
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = format!("{split}_{}", name.unwrap_or_default());
            out.push(("yolo_labels", name, [prefix.clone(), text].concat()));
        }
        let json = dir
            .join("annotations")
            .join(format!("instances_{split}.json"));
        out.push((
            "coco_json",
            format!("instances_{split}.json"),
            std::fs::read(&json).map_err(err)?,
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Hand-written label lines: a box, a polygon, blank lines, an integral float class.
    out.push((
        "yolo_labels",
        "mixed.txt".into(),
        [
            &[40, 0, 30, 0, 3][..],
            b"0 0.5 0.5 0.2 0.4\n\n2.0 0.1 0.1 0.9 0.1 0.5 0.9\n1 1.0002 0 0 0 0.5 0.5\n",
        ]
        .concat(),
    ));
    // RLE strings (height, width, then pycocotools' compressed counts) of scene masks.
    for (k, (w, h)) in [(20usize, 12usize), (31, 17)].into_iter().enumerate() {
        let (_, objects) = render_scene(image_seed(11, k), w as u32, h as u32);
        for (i, rle) in scene_masks(&objects, w, h).map_err(err)?.iter().enumerate() {
            let bytes = [&[h as u8, w as u8][..], rle.to_coco_string().as_bytes()].concat();
            out.push(("coco_json", format!("rle_{k}_{i}.txt"), bytes));
        }
    }
    Ok(out)
}

/// Write every seed under `root/<target>/` (the folders are emptied first), and a SHA-256 list
/// of them; returns the number of files and bytes written.
pub fn write_all(root: &Path) -> Result<(usize, usize), String> {
    let seeds = all()?;
    let mut targets: Vec<&str> = seeds.iter().map(|s| s.0).collect();
    targets.sort_unstable();
    targets.dedup();
    for t in &targets {
        let d = root.join(t);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(err)?;
    }
    let mut bytes = 0;
    let mut list = String::new();
    for (target, name, data) in &seeds {
        std::fs::write(root.join(target).join(name), data).map_err(err)?;
        bytes += data.len();
        list.push_str(&format!("{}  {target}/{name}\n", sha256_hex(data)));
    }
    std::fs::write(root.join("SHA256SUMS"), list).map_err(err)?;
    Ok((seeds.len(), bytes))
}
