//! What each fuzz target does with one input: feed it to the real parser and assert what must
//! hold of the result. A panic (a failed assertion included) is a finding.
//!
//! Shared, unchanged, by the fuzz targets (`fuzz/fuzz_targets/*.rs`, through `kestrel_fuzz`) and
//! by the regression test of the normal suite (`tests/tests/fuzz_regressions.rs` includes this
//! file), which replays every committed seed and every input that once crashed a target. So it
//! uses only crates both have: `kestrel-exporter`, `kestrel-runtime`, `serde_json`, `image`.

use std::path::Path;

use kestrel_exporter::onnx::{decode_model, encode_model};
use kestrel_runtime::dataset::{
    Dataset, ImageBytesError, MaskOverlap, Sample, decode_image_bytes, parse_yolo_labels,
    parse_yolo_labels_with_segments,
};
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision};
use kestrel_runtime::engine_file::{BuildEnvironment, EngineFile, sha256_hex};
use kestrel_runtime::kserve::{InferRequest, ModelSignature, TensorEncoding, parse_infer_request};
use kestrel_runtime::masks::Rle;
use kestrel_runtime::model_config::{MAX_BATCH_SIZE, MAX_INSTANCES, ModelConfig};

/// Largest graph (nodes) the ONNX target runs the graph passes on: the micro GELAN seeds have
/// 650–1200 nodes.
pub const ONNX_MAX_NODES: usize = 2000;
/// Largest graph (nodes) the ONNX target hands to tract: building a plan is by far the slowest
/// step (25–35 s for a micro GELAN seed under the sanitizer, against 0.3 s for the small seeds),
/// so only small graphs are built and run.
pub const ONNX_MAX_BUILD_NODES: usize = 64;
/// Largest input (H × W pixels) the ONNX target builds and runs an engine for.
pub const ONNX_MAX_PIXELS: usize = 64 * 64;
/// The pixel limit the image target decodes with (the service's `--max-image-pixels`).
pub const IMAGE_MAX_PIXELS: u64 = 512 * 512;
/// Side of the letterboxed engine input the image target fills, pixels.
pub const IMAGE_INPUT_SIDE: u32 = 32;
/// Most pixels (width × height) of an image whose instance masks the label targets rasterise.
pub const MASK_MAX_PIXELS: u64 = 128 * 128;

/// The model the KServe target parses requests for: a 4 × 4 input keeps JSON tensors short.
pub const KSERVE_OUTPUTS: &[&str] = &["output0", "output1"];

/// [`kserve_request`]'s model.
pub fn kserve_model() -> ModelSignature<'static> {
    ModelSignature {
        input_name: "images",
        input_hw: [4, 4],
        max_batch_size: 4,
        output_names: KSERVE_OUTPUTS,
    }
}

/// ONNX bytes: protobuf decoding, then what `kestrel infer`/`serve` do with a model on the cpu
/// backend (the model checks of `describe_model`, tract's parsing and optimisation, one run), the
/// graph passes of `kestrel inspect` (shape inference, parameter and FLOP counts, the Q/DQ
/// report) and the cuda backend's lowering to an execution plan (pure Rust, no GPU needed).
pub fn onnx_model(data: &[u8]) {
    let path = Path::new("fuzz.onnx");
    let Ok(model) = decode_model(data, path) else {
        return;
    };
    // Re-encoding is stable: what we write, we read back to the same bytes.
    let bytes = encode_model(&model);
    let again = decode_model(&bytes, path).expect("a re-encoded model decodes");
    assert_eq!(encode_model(&again), bytes, "protobuf round trip");

    let graph = model.graph();
    if graph.node.len() > ONNX_MAX_NODES {
        return;
    }
    let _ = kestrel_exporter::shapes::infer_graph(graph);
    let _ = kestrel_exporter::inspect::summarize(&model);
    let _ = kestrel_exporter::graph_view::qdq_report(&model);
    for int8 in [false, true] {
        let _ = kestrel_runtime::cuda::plan::lower(&model, int8);
    }

    let options = BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile::fixed(1),
        ..BuildOptions::default()
    };
    let Ok(info) = kestrel_runtime::engine::describe_model(&model, path, &options) else {
        return;
    };
    let [h, w] = info.input_hw;
    assert!(
        h > 0 && w > 0,
        "a described model has a non-empty input: {h}x{w}"
    );
    if h.saturating_mul(w) > ONNX_MAX_PIXELS || graph.node.len() > ONNX_MAX_BUILD_NODES {
        return;
    }
    let Ok(mut engine) = kestrel_runtime::engine::build_engine_from_bytes(data, path, &options)
    else {
        return;
    };
    let input = vec![0.5f32; info.input_len()];
    if info.end_to_end.is_some() {
        let _ = engine.run_end_to_end(&input, 1);
    } else if let Ok(out) = engine.run(&input, 1) {
        assert_eq!(out.len(), info.output_len(), "output0 of one image");
    }
}

/// Engine-file bytes. When the first byte is odd the trailing SHA-256 of the rest is recomputed
/// first, so that mutations reach the sections and the JSON header behind the checksum. A file
/// that decodes encodes back to one that decodes equal.
pub fn engine_file(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let sum = sha256_bytes(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum);
    }
    let path = Path::new("fuzz.engine");
    let Ok(file) = EngineFile::decode(&bytes, path) else {
        return;
    };
    assert_eq!(sha256_hex(&file.onnx), file.header.onnx_sha256);
    let encoded = file.encode();
    let back = EngineFile::decode(&encoded, path).expect("a re-encoded engine file decodes");
    assert_eq!(back, file, "engine file round trip");
    let _ = file.header.cache_key();
    let _ = file.header.mismatch(&cpu_environment());
}

/// The environment the cpu backend builds in (what `engine::build_environment` says for it).
pub fn cpu_environment() -> BuildEnvironment {
    BuildEnvironment {
        backend_versions: [("tract".to_string(), "0.23.9".to_string())].into(),
        device: "cpu".into(),
        compute_capability: None,
    }
}

/// SHA-256 of `bytes` as bytes (from the runtime's hex, to need no hashing crate here).
fn sha256_bytes(bytes: &[u8]) -> [u8; 32] {
    let hex = sha256_hex(bytes);
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}

/// An image request body: decoding with the service's pixel limit, then the letterbox the
/// service runs on the decoded image.
pub fn image_decode(data: &[u8]) {
    match decode_image_bytes(data, IMAGE_MAX_PIXELS) {
        Ok(image) => {
            let (w, h) = image.dimensions();
            assert!(u64::from(w) * u64::from(h) <= IMAGE_MAX_PIXELS, "{w}x{h}");
            let side = IMAGE_INPUT_SIDE;
            let mut input = vec![0f32; 3 * (side * side) as usize];
            let _ =
                kestrel_runtime::letterbox::Letterboxer::new().run(&image, side, side, &mut input);
            assert!(
                input.iter().all(|v| (0.0..=1.0).contains(v)),
                "letterbox values"
            );
        }
        Err(ImageBytesError::TooManyPixels {
            width,
            height,
            max_pixels,
        }) => assert!(u64::from(width) * u64::from(height) > max_pixels),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// A KServe v2 infer request: `J` then a JSON body, or `B`, the
/// `Inference-Header-Content-Length` value, a newline, then the body. A request that parses has
/// as many values as its shape says, and encodes back to itself.
pub fn kserve_request(data: &[u8]) {
    let model = kserve_model();
    let (header, body) = match data.split_first() {
        Some((b'J', body)) => (None, body),
        Some((b'B', rest)) => {
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                return;
            };
            (Some(&rest[..nl]), &rest[nl + 1..])
        }
        _ => return,
    };
    let request = match parse_infer_request(body, header, &model) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!((1..=model.max_batch_size).contains(&request.images));
    assert_eq!(
        request.input.len(),
        request.images * model.values_per_image()
    );
    assert!(
        request
            .outputs
            .iter()
            .all(|o| model.output_names.contains(&o.as_str()))
    );
    let same = |a: &InferRequest, b: &InferRequest| {
        a.id == b.id
            && a.images == b.images
            && a.outputs == b.outputs
            && a.binary_output == b.binary_output
            && a.timeout == b.timeout
            && a.input.len() == b.input.len()
            && a.input
                .iter()
                .zip(&b.input)
                .all(|(x, y)| x.to_bits() == y.to_bits())
    };
    let round_trip = |encoding: TensorEncoding| {
        let e = request.encode(&model, encoding);
        let header = e.header_length.map(|n| n.to_string());
        parse_infer_request(&e.body, header.as_deref().map(str::as_bytes), &model)
            .unwrap_or_else(|err| panic!("{encoding:?} re-encoding does not parse: {err}"))
    };
    assert!(
        same(&round_trip(TensorEncoding::Binary), &request),
        "binary round trip"
    );
    if request.input.iter().all(|v| v.is_finite()) {
        let back = round_trip(TensorEncoding::Json);
        // JSON has one zero: -0.0 may come back as 0.0.
        let zero = |v: &mut InferRequest| v.input.iter_mut().for_each(|x| *x += 0.0);
        let (mut a, mut b) = (back, request.clone());
        zero(&mut a);
        zero(&mut b);
        assert!(same(&a, &b), "JSON round trip");
    }
}

/// A model folder's `config.json` of `kestrel serve`'s repository ([`ModelConfig::from_json`]):
/// a config that parses holds only values the service can run (1–16 engine placements, batch
/// sizes in range, thresholds in [0, 1]), names a labels file inside its model's folder, and
/// encodes back to JSON that parses to the same config.
pub fn repository_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match ModelConfig::from_json(text) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error without a message");
            return;
        }
    };
    let placements = config
        .placements()
        .unwrap_or_else(|e| panic!("a config that parses has placements: {e}"));
    assert!((1..=MAX_INSTANCES).contains(&placements.len()));
    assert!((1..=MAX_BATCH_SIZE).contains(&config.max_batch_size));
    assert!(
        config
            .preferred_batch_sizes
            .iter()
            .all(|&p| (1..=config.max_batch_size).contains(&p))
    );
    assert!(config.max_queue_size >= 1 && config.max_detections >= 1);
    for t in [config.conf_threshold, config.iou_threshold] {
        assert!((0.0..=1.0).contains(&t), "threshold {t}");
    }
    if let Some(labels) = &config.labels {
        let folder = Path::new("/repository/model");
        let joined = folder.join(labels);
        assert!(
            joined.starts_with(folder),
            "labels {labels:?} leave the folder"
        );
        assert!(
            joined
                .components()
                .all(|c| !matches!(c, std::path::Component::ParentDir)),
            "labels {labels:?} hold '..'"
        );
    }
    let json = serde_json::to_string(&config).expect("a config encodes");
    let back = ModelConfig::from_json(&json)
        .unwrap_or_else(|e| panic!("the re-encoded config {json} does not parse: {e}"));
    assert_eq!(back, config, "JSON round trip");
}

/// A YOLO label file: bytes 0–1 and 2–3 are the image width and height (little-endian, pixels),
/// byte 4 the class count, the rest the text. Boxes lie in the image, classes in range, one
/// segment entry per box; small images get their paint-order instance masks.
pub fn yolo_labels(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let width = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let height = u32::from(u16::from_le_bytes([data[2], data[3]]));
    let num_classes = usize::from(data[4]);
    let Ok(text) = std::str::from_utf8(&data[5..]) else {
        return;
    };
    let path = Path::new("fuzz.txt");
    let parsed = parse_yolo_labels_with_segments(text, path, width, height, num_classes);
    let boxes_only = parse_yolo_labels(text, path, width, height, num_classes);
    let (objects, segments) = match parsed {
        Ok(p) => p,
        Err(e) => {
            assert!(boxes_only.is_err(), "both parsers agree on errors");
            assert!(e.to_string().starts_with("fuzz.txt:"), "{e}");
            return;
        }
    };
    assert_eq!(
        boxes_only.ok().as_ref(),
        Some(&objects),
        "both parsers agree"
    );
    assert_eq!(objects.len(), segments.len());
    let (w, h) = (width as f32, height as f32);
    for o in &objects {
        assert!(o.class_id < num_classes);
        let b = o.bbox;
        assert!(
            0.0 <= b.x1 && b.x1 <= b.x2 && b.x2 <= w && 0.0 <= b.y1 && b.y1 <= b.y2 && b.y2 <= h,
            "box {b:?} outside {w}x{h}"
        );
    }
    if u64::from(width) * u64::from(height) <= MASK_MAX_PIXELS {
        let sample = Sample {
            image: "fuzz.png".into(),
            image_id: 1,
            width,
            height,
            objects,
            segments,
        };
        check_masks(&sample, MaskOverlap::PaintOrder);
    }
}

/// The instance masks of a small sample, when it has them: one per object, each covering the
/// image exactly.
fn check_masks(sample: &Sample, overlap: MaskOverlap) {
    if let Ok(Some(masks)) = sample.instance_masks(overlap) {
        assert_eq!(masks.len(), sample.objects.len());
        let pixels = u64::from(sample.width) * u64::from(sample.height);
        for m in &masks {
            let total: u64 = m.counts.iter().map(|&c| u64::from(c)).sum();
            assert_eq!(total, pixels, "an RLE covers its image");
        }
    }
}

/// A COCO instances json (input starting with `{`), or else a compressed COCO RLE string: bytes
/// 0 and 1 are the mask's height and width (pixels), the rest the string. A json that loads has
/// its instance masks rasterised (small images); a string that decodes covers its mask and
/// re-encodes to a string that decodes equal.
pub fn coco_json(data: &[u8]) {
    if data.first() == Some(&b'{') {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let loaded = Dataset::from_coco_json_text(text, Path::new("fuzz.json"), Path::new("img"));
        let dataset = match loaded {
            Ok(d) => d,
            Err(e) => {
                assert!(e.to_string().starts_with("fuzz.json"), "{e}");
                return;
            }
        };
        assert_eq!(dataset.names.len(), dataset.category_ids.len());
        for s in &dataset.samples {
            assert_eq!(s.objects.len(), s.segments.len());
            assert!(s.objects.iter().all(|o| o.class_id < dataset.names.len()));
            if u64::from(s.width) * u64::from(s.height) <= MASK_MAX_PIXELS {
                check_masks(s, MaskOverlap::Independent);
                check_masks(s, MaskOverlap::PaintOrder);
            }
        }
        return;
    }
    if data.len() < 2 {
        return;
    }
    let (h, w) = (usize::from(data[0]), usize::from(data[1]));
    let Ok(text) = std::str::from_utf8(&data[2..]) else {
        return;
    };
    let Ok(rle) = Rle::from_coco_string(h, w, text) else {
        return;
    };
    let total: u64 = rle.counts.iter().map(|&c| u64::from(c)).sum();
    assert_eq!(total, (h * w) as u64, "the runs cover the mask");
    let again = Rle::from_coco_string(h, w, &rle.to_coco_string())
        .expect("a re-encoded RLE string decodes");
    assert_eq!(again, rle, "RLE string round trip");
    if let Ok(bitmap) = rle.decode() {
        assert_eq!(bitmap.area() as u64, rle.area());
        assert_eq!(Rle::encode(&bitmap).decode().ok(), Some(bitmap));
    }
}
