//! Export variants. End-to-end models (`kestrel export --end2end`): NMS and masks inside the
//! graph. Every flavour passes the ONNX checker; the standard-operator flavour runs in
//! onnxruntime and in the CPU backend with the detections of the plain model plus Kestrel's CPU
//! NMS; the TensorRT flavours are checked node by node (TensorRT cannot run here). The DeepStream
//! layout (`--deepstream`) decodes to the plain model's detections.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kestrel_exporter::end2end::{END2END_OUTPUTS, EndToEnd, NmsFlavour, append_nms};
use kestrel_exporter::onnx::{self, pb};
use kestrel_runtime::Detector;
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_runtime::nms::NmsConfig;
use kestrel_tests::{run_python, scratch_dir, workspace_root};

fn bundled(name: &str) -> PathBuf {
    workspace_root().join("models").join(name)
}

fn end_to_end(plain: &Path, flavour: NmsFlavour, out: &Path) -> pb::ModelProto {
    let model = onnx::read_model(plain).unwrap();
    let opts = EndToEnd {
        flavour,
        ..Default::default()
    };
    let e2e = append_nms(model, &opts).unwrap();
    onnx::write_model(&e2e, out).unwrap();
    e2e
}

/// What the plain model + Kestrel's CPU NMS gives with the graph's settings: every class above
/// the score threshold is a candidate (ONNX's NonMaxSuppression works per class), IoU 0.45, 100
/// detections.
fn graph_settings() -> NmsConfig {
    NmsConfig {
        conf_threshold: 0.25,
        iou_threshold: 0.45,
        max_detections: 100,
        max_candidates: 1_000_000,
        multi_label: true,
        agnostic: false,
        classes: None,
    }
}

fn scenes(n: usize) -> Vec<image::RgbImage> {
    (0..n)
        .map(|i| {
            kestrel_runtime::synth::render_scene(
                kestrel_runtime::synth::image_seed(77, i),
                320,
                320,
            )
            .0
        })
        .collect()
}

/// CPU engines for batches of 1 or 2 images.
fn options() -> BuildOptions {
    BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        ..Default::default()
    }
}

fn detector(path: &Path) -> Detector {
    Detector::new(build_engine(path, &options()).unwrap())
}

#[test]
fn every_flavour_passes_the_onnx_checker_and_has_the_documented_outputs() {
    let dir = scratch_dir("e2e-checker");
    let mut paths = Vec::new();
    for (model, seg) in [
        ("gelan-t-shapes.onnx", false),
        ("gelan-t-seg-shapes.onnx", true),
    ] {
        for flavour in [
            NmsFlavour::Onnx,
            NmsFlavour::EfficientNmsTrt,
            NmsFlavour::TensorRtInms,
        ] {
            let out = dir.join(format!(
                "{}-{}.onnx",
                model.trim_end_matches(".onnx"),
                flavour.label()
            ));
            if seg && flavour == NmsFlavour::EfficientNmsTrt {
                let e = append_nms(
                    onnx::read_model(&bundled(model)).unwrap(),
                    &EndToEnd {
                        flavour,
                        ..Default::default()
                    },
                )
                .unwrap_err()
                .to_string();
                assert!(
                    e.contains("no detection indices") && e.contains("--end2end onnx"),
                    "{e}"
                );
                continue;
            }
            let e2e = end_to_end(&bundled(model), flavour, &out);
            let graph = e2e.graph();
            let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
            let want = if seg {
                &END2END_OUTPUTS[..]
            } else {
                &END2END_OUTPUTS[..4]
            };
            assert_eq!(names, want, "{flavour:?}");
            let types: Vec<i32> = graph
                .output
                .iter()
                .map(|o| o.tensor_shape().unwrap().0)
                .collect();
            assert_eq!(
                types[..4],
                [
                    pb::data_type::INT32,
                    pb::data_type::FLOAT,
                    pb::data_type::FLOAT,
                    pb::data_type::INT32
                ]
            );
            assert_eq!(e2e.metadata("end2end"), Some(flavour.label()));
            assert_eq!(e2e.metadata("end2end_max_detections"), Some("100"));
            let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
            match flavour {
                NmsFlavour::EfficientNmsTrt => {
                    let nms: Vec<&pb::NodeProto> = graph
                        .node
                        .iter()
                        .filter(|n| n.op_type == "EfficientNMS_TRT")
                        .collect();
                    assert_eq!(nms.len(), 1);
                    let n = nms[0];
                    assert_eq!(n.domain, "TRT");
                    assert_eq!(n.output, END2END_OUTPUTS[..4].to_vec());
                    assert_eq!(n.attr_int("max_output_boxes", 0), 100);
                    assert_eq!(n.attr_int("box_coding", -1), 0);
                    assert_eq!(n.attr_int("background_class", 0), -1);
                    assert_eq!(n.attr_int("score_activation", -1), 0);
                    assert_eq!(n.attr_string("plugin_version").as_deref(), Some("1"));
                    let f = |k: &str| n.attr(k).map(|a| a.f).unwrap();
                    assert_eq!((f("iou_threshold"), f("score_threshold")), (0.45, 0.25));
                    assert!(e2e.opset_import.iter().any(|o| o.domain == "TRT"));
                    assert!(!ops.contains(&"NonMaxSuppression"));
                }
                NmsFlavour::TensorRtInms | NmsFlavour::Onnx => {
                    assert_eq!(ops.iter().filter(|o| **o == "NonMaxSuppression").count(), 1);
                    let nms = graph
                        .node
                        .iter()
                        .find(|n| n.op_type == "NonMaxSuppression")
                        .unwrap();
                    // Thresholds and K are initializers (TensorRT's INMS needs them constant).
                    let inits: Vec<&str> =
                        graph.initializer.iter().map(|t| t.name.as_str()).collect();
                    for input in &nms.input[2..5] {
                        assert!(
                            inits.contains(&input.as_str()),
                            "{input} is not an initializer"
                        );
                    }
                    assert!(ops.contains(&"TopK") && !ops.contains(&"EfficientNMS_TRT"));
                    let casts_to_i32 = graph.node.iter().filter(|n| {
                        n.op_type == "Cast"
                            && n.attr_int("to", 0) == i64::from(pb::data_type::INT32)
                            && n.input.first() == nms.output.first()
                    });
                    assert_eq!(
                        casts_to_i32.count(),
                        usize::from(flavour == NmsFlavour::TensorRtInms)
                    );
                }
            }
            paths.push(out.to_string_lossy().into_owned());
        }
    }
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let report = run_python("check_onnx.py", &args);
    assert_eq!(
        report.lines().filter(|l| l.starts_with("ok ")).count(),
        5,
        "{report}"
    );
    // A model that is end-to-end already is refused.
    let again = onnx::read_model(Path::new(&paths[0])).unwrap();
    let e = append_nms(again, &EndToEnd::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already end-to-end"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The same detections: count, classes, boxes (IoU > 0.999) and scores within `score_tol`.
fn close_detections(
    a: &[kestrel_runtime::Detection],
    b: &[kestrel_runtime::Detection],
    score_tol: f32,
    what: &str,
) {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: {} vs {} detections",
        a.len(),
        b.len()
    );
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.class_id, y.class_id, "{what}: {x:?} vs {y:?}");
        assert!(
            (x.score - y.score).abs() < score_tol,
            "{what}: {x:?} vs {y:?}"
        );
        assert!(x.bbox.iou(&y.bbox) > 0.999, "{what}: {x:?} vs {y:?}");
    }
}

/// `want` and `got` find the same detections (see [`close_detections`], scores within
/// `score_tol`) on `images` in pairs,
/// and with `seg` masks overlapping by IoU ≥ 0.99. Returns the number of detections.
fn same_detections(
    want: &mut Detector,
    got: &mut Detector,
    images: &[image::RgbImage],
    cfg: &NmsConfig,
    seg: bool,
    score_tol: f32,
    what: &str,
) -> usize {
    let mut total = 0;
    for pair in images.chunks(2) {
        let (mut w, mut g) = (Vec::new(), Vec::new());
        if seg {
            let (mut wm, mut gm) = (Vec::new(), Vec::new());
            want.detect_masks(pair, cfg, &mut w, &mut wm).unwrap();
            got.detect_masks(pair, cfg, &mut g, &mut gm).unwrap();
            for (image_w, image_g) in wm.iter().zip(&gm) {
                for (a, b) in image_w.iter().zip(image_g) {
                    let iou = a.iou(b).unwrap();
                    assert!(iou >= 0.99, "{what}: mask IoU {iou}");
                }
            }
        } else {
            want.detect(pair, cfg, &mut w).unwrap();
            got.detect(pair, cfg, &mut g).unwrap();
        }
        for (a, b) in w.iter().zip(&g) {
            close_detections(a, b, score_tol, what);
            total += a.len();
        }
    }
    total
}

#[test]
fn the_onnx_flavour_gives_the_plain_models_detections_on_the_cpu_backend_and_in_onnxruntime() {
    let dir = scratch_dir("e2e-run");
    let images = scenes(4);
    for (model, seg) in [
        ("gelan-t-shapes.onnx", false),
        ("gelan-t-seg-shapes.onnx", true),
    ] {
        let plain_path = bundled(model);
        let e2e_path = dir.join(model);
        end_to_end(&plain_path, NmsFlavour::Onnx, &e2e_path);
        let (mut plain, mut e2e) = (detector(&plain_path), detector(&e2e_path));
        let cfg = graph_settings();
        // The same maps (computed inside the graph), sampled and cropped alike.
        let total = same_detections(&mut plain, &mut e2e, &images, &cfg, seg, 1e-4, model);
        println!("{model}: {total} detections on 4 scenes, identical end to end");
        assert!(
            total > 10,
            "{model}: the scenes should have objects ({total})"
        );

        // onnxruntime on the same letterboxed input (the scenes are the model's size).
        let input: Vec<f32> = images[..2]
            .iter()
            .flat_map(|img| {
                let mut planes = vec![0f32; 3 * 320 * 320];
                for (i, p) in img.pixels().enumerate() {
                    for c in 0..3 {
                        planes[c * 320 * 320 + i] = f32::from(p[c]) / 255.0;
                    }
                }
                planes
            })
            .collect();
        let in_path = dir.join("input.f32");
        let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&in_path, bytes).unwrap();
        let report = run_python(
            "ort_end2end.py",
            &[
                e2e_path.to_str().unwrap(),
                in_path.to_str().unwrap(),
                "2,3,320,320",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
        let mut want = Vec::new();
        plain.detect(&images[..2], &cfg, &mut want).unwrap();
        let nums: Vec<i64> = v["num_dets"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(v["det_boxes"]["shape"], serde_json::json!([2, 100, 4]));
        if seg {
            assert_eq!(v["det_masks"]["shape"], serde_json::json!([2, 100, 80, 80]));
        }
        let f = |k: &str| -> Vec<f64> {
            v[k]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (boxes, scores, classes) = (f("det_boxes"), f("det_scores"), f("det_classes"));
        for (i, w) in want.iter().enumerate() {
            assert_eq!(
                nums[i] as usize,
                w.len(),
                "{model}: onnxruntime num_dets of image {i}"
            );
            for (j, d) in w.iter().enumerate() {
                let row = i * 100 + j;
                assert_eq!(classes[row] as usize, d.class_id, "{model} row {row}");
                assert!(
                    (scores[row] - f64::from(d.score)).abs() < 1e-4,
                    "{model} row {row}"
                );
                let b = [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2];
                // The graph's boxes are in input pixels, unclipped; the detector clips to the image.
                for c in 0..4 {
                    let theirs = boxes[row * 4 + c].clamp(0.0, 320.0);
                    assert!(
                        (theirs - f64::from(b[c])).abs() < 1e-2,
                        "{model} row {row}: {theirs} vs {}",
                        b[c]
                    );
                }
            }
            // Padding rows: zero scores, class -1.
            for j in w.len()..100 {
                assert_eq!((scores[i * 100 + j], classes[i * 100 + j]), (0.0, -1.0));
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn end_to_end_models_refuse_what_they_cannot_do() {
    let dir = scratch_dir("e2e-refuse");
    let path = dir.join("trt10.onnx");
    end_to_end(
        &bundled("gelan-t-shapes.onnx"),
        NmsFlavour::EfficientNmsTrt,
        &path,
    );
    let e = build_engine(&path, &BuildOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("EfficientNMS_TRT") && e.contains("--end2end onnx"),
        "{e}"
    );
    let onnx_path = dir.join("e2e.onnx");
    end_to_end(
        &bundled("gelan-t-shapes.onnx"),
        NmsFlavour::Onnx,
        &onnx_path,
    );
    let trt = BuildOptions {
        backend: kestrel_runtime::engine::Backend::Tensorrt,
        ..Default::default()
    };
    let e = build_engine(&onnx_path, &trt).err().unwrap().to_string();
    assert!(
        e.contains("cpu and cuda backends") && e.contains("without --end2end"),
        "{e}"
    );
    // The raw run is refused with the reason; masks of a detector too.
    let mut engine = build_engine(&onnx_path, &BuildOptions::default()).unwrap();
    let e = engine
        .run(&vec![0.5; 3 * 320 * 320], 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("end-to-end"), "{e}");
    let mut d = Detector::new(engine);
    let (mut out, mut masks) = (Vec::new(), Vec::new());
    let e = d
        .detect_masks(&scenes(1), &NmsConfig::display(), &mut out, &mut masks)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no det_masks"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The scenes as the model's input (they are its size: the letterbox is the identity).
fn as_input(images: &[image::RgbImage]) -> Vec<f32> {
    images
        .iter()
        .flat_map(|img| {
            let plane = (img.width() * img.height()) as usize;
            let mut planes = vec![0f32; 3 * plane];
            for (i, p) in img.pixels().enumerate() {
                for c in 0..3 {
                    planes[c * plane + i] = f32::from(p[c]) / 255.0;
                }
            }
            planes
        })
        .collect()
}

#[test]
fn the_deepstream_layout_decodes_to_the_plain_models_detections() {
    use kestrel_exporter::deepstream::{DEEPSTREAM_OUTPUT, append_deepstream_output};
    use kestrel_runtime::BoxXyxy;
    use kestrel_runtime::nms::{Candidate, nms};
    let dir = scratch_dir("deepstream");
    let plain_path = bundled("gelan-t-shapes.onnx");
    let ds = append_deepstream_output(onnx::read_model(&plain_path).unwrap()).unwrap();
    let ds_path = dir.join("ds.onnx");
    onnx::write_model(&ds, &ds_path).unwrap();
    let report = run_python("check_onnx.py", &[ds_path.to_str().unwrap()]);
    assert!(report.starts_with("ok "), "{report}");
    let outputs: Vec<&str> = ds.graph().output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs, [DEEPSTREAM_OUTPUT]);
    // A segmentation model is refused with the alternatives.
    let e =
        append_deepstream_output(onnx::read_model(&bundled("gelan-t-seg-shapes.onnx")).unwrap())
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("detectors") && e.contains("--end2end onnx"),
        "{e}"
    );

    let images = scenes(3);
    let input = as_input(&images);
    let (in_path, out_path) = (dir.join("input.f32"), dir.join("ds.f32"));
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&in_path, bytes).unwrap();
    let report = run_python(
        "ort_run.py",
        &[
            ds_path.to_str().unwrap(),
            in_path.to_str().unwrap(),
            "3,3,320,320",
            DEEPSTREAM_OUTPUT,
            out_path.to_str().unwrap(),
        ],
    );
    let anchors = 2100;
    assert!(report.contains(&format!("[3, {anchors}, 6]")), "{report}");
    let raw: Vec<f32> = std::fs::read(&out_path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let cfg = NmsConfig::display();
    let mut plain = detector(&plain_path);
    let (mut cands, mut kept) = (Vec::new(), Vec::new());
    let mut total = 0;
    for (i, img) in images.iter().enumerate() {
        // What DeepStream-Yolo's parser does: one candidate per anchor above the threshold.
        cands.clear();
        for a in 0..anchors {
            let r = &raw[(i * anchors + a) * 6..(i * anchors + a + 1) * 6];
            if r[4] > cfg.conf_threshold {
                cands.push(Candidate {
                    bbox: BoxXyxy::new(r[0], r[1], r[2], r[3]),
                    score: r[4],
                    class_id: r[5] as usize,
                    anchor: a,
                });
            }
        }
        nms(&mut cands, &cfg, &mut kept);
        let mut want = Vec::new();
        plain
            .detect(std::slice::from_ref(img), &cfg, &mut want)
            .unwrap();
        assert_eq!(kept.len(), want[0].len(), "image {i}");
        for (k, w) in kept.iter().zip(&want[0]) {
            assert_eq!(k.class_id, w.class_id);
            assert!((k.score - w.score).abs() < 1e-4, "{k:?} vs {w:?}");
            assert!(
                k.bbox.clip(320.0, 320.0).iou(&w.bbox) > 0.999,
                "{k:?} vs {w:?}"
            );
        }
        total += kept.len();
    }
    println!("DeepStream layout: {total} detections on 3 scenes, as the plain model's");
    assert!(total > 5, "{total}");
    let _ = std::fs::remove_dir_all(dir);
}

/// End-to-end outputs of a batch, owned.
#[derive(Debug)]
struct Rows {
    num_dets: Vec<i32>,
    boxes: Vec<f32>,
    scores: Vec<f32>,
    classes: Vec<i32>,
    masks: Option<Vec<f32>>,
}

impl Rows {
    fn of(o: kestrel_runtime::engine::EndToEndOutputs<'_>) -> Self {
        Self {
            num_dets: o.num_dets.to_vec(),
            boxes: o.boxes.to_vec(),
            scores: o.scores.to_vec(),
            classes: o.classes.to_vec(),
            masks: o.masks.map(<[f32]>::to_vec),
        }
    }

    /// The same detections: counts and classes equal, boxes within `box_px` input pixels,
    /// scores within `score`, mask probabilities within `mask`. Returns the detection count.
    fn assert_close(&self, want: &Self, box_px: f32, score: f32, mask: f32, what: &str) -> usize {
        let max_diff = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len(), "{what}: lengths");
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert_eq!(self.num_dets, want.num_dets, "{what}: num_dets");
        assert_eq!(self.classes, want.classes, "{what}: det_classes");
        let (db, ds) = (
            max_diff(&self.boxes, &want.boxes),
            max_diff(&self.scores, &want.scores),
        );
        assert!(db < box_px, "{what}: det_boxes differ by {db} px");
        assert!(ds < score, "{what}: det_scores differ by {ds}");
        match (&self.masks, &want.masks) {
            (Some(a), Some(b)) => {
                let dm = max_diff(a, b);
                assert!(dm < mask, "{what}: det_masks differ by {dm}");
                println!("{what}: boxes {db:.1e} px, scores {ds:.1e}, masks {dm:.1e} apart");
            }
            (None, None) => println!("{what}: boxes {db:.1e} px, scores {ds:.1e} apart"),
            _ => panic!("{what}: det_masks on one side only"),
        }
        self.num_dets.iter().map(|&n| n as usize).sum()
    }
}

/// What an engine running an end-to-end model's plain part returns for it: Kestrel's CPU NMS
/// with the graph's settings on `head` (and `prototypes`), assembled as the graph's tail does.
fn assembled(
    info: &kestrel_runtime::engine::EngineInfo,
    e2e: &kestrel_runtime::engine::EndToEndInfo,
    head: &[f32],
    prototypes: Option<&[f32]>,
    batch: usize,
) -> Rows {
    use kestrel_runtime::end_to_end::{EndToEndBuffers, ImageHead, graph_nms};
    use kestrel_runtime::nms::{decode_candidates, nms};
    let cfg = graph_nms(e2e);
    let len = info.output_len();
    let mut buffers = EndToEndBuffers::new();
    let (mut candidates, mut kept) = (Vec::new(), Vec::new());
    for i in 0..batch {
        let image = &head[i * len..(i + 1) * len];
        decode_candidates(image, info.num_classes, info.anchors, &cfg, &mut candidates).unwrap();
        nms(&mut candidates, &cfg, &mut kept);
        let dets: Vec<kestrel_runtime::Detection> = kept
            .iter()
            .map(|c| kestrel_runtime::Detection {
                bbox: c.bbox,
                score: c.score,
                class_id: c.class_id,
                anchor: c.anchor,
            })
            .collect();
        let image_head = info.prototypes.zip(prototypes).map(|(shape, p)| ImageHead {
            head: image,
            channels: info.output_channels,
            anchors: info.anchors,
            prototypes: &p[i * shape.len()..(i + 1) * shape.len()],
            shape,
            input_hw: info.input_hw,
        });
        buffers
            .push_image(e2e.max_detections, &dets, image_head.as_ref())
            .unwrap();
    }
    Rows::of(buffers.outputs(prototypes.is_some()))
}

/// The cuda backend runs an end-to-end model as its plain part plus Kestrel's NMS and a host
/// assembly of the outputs (`kestrel_runtime::end_to_end`). That assembly, computed here on the
/// CPU from the plain part's outputs, equals the graph's own outputs (tract running the tail).
#[test]
fn kestrels_nms_on_the_plain_part_gives_the_graphs_outputs() {
    use kestrel_exporter::end2end::plain_part;
    let dir = scratch_dir("e2e-assembled");
    let images = scenes(4);
    for model in ["gelan-t-shapes.onnx", "gelan-t-seg-shapes.onnx"] {
        let e2e_path = dir.join(model);
        let e2e_model = end_to_end(&bundled(model), NmsFlavour::Onnx, &e2e_path);
        let plain_path = dir.join(format!("plain-{model}"));
        onnx::write_model(&plain_part(&e2e_model).unwrap(), &plain_path).unwrap();
        let options = options();
        let mut graph = build_engine(&e2e_path, &options).unwrap();
        let e2e = graph.info().end_to_end.clone().unwrap();
        let mut plain = build_engine(&plain_path, &options).unwrap();
        let info = plain.info().clone();
        let mut n = 0;
        for pair in images.chunks(2) {
            let input = as_input(pair);
            let want = Rows::of(graph.run_end_to_end(&input, 2).unwrap());
            let (head, prototypes) = plain.run_with_prototypes(&input, 2).unwrap();
            let got = assembled(&info, &e2e, head, prototypes, 2);
            n += got.assert_close(&want, 1e-3, 1e-5, 1e-4, model);
        }
        assert!(n > 10, "{model}: the scenes should have objects ({n})");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The standard-operator flavour on the cuda backend: the same outputs as the plain part's head
/// (from a cuda engine of the plain model) through Kestrel's CPU NMS, and the same detections as
/// the cpu backend running the graph.
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_onnx_flavour_runs_on_the_cuda_backend() {
    use kestrel_exporter::end2end::plain_part;
    use kestrel_runtime::engine::{Backend, Precision};
    let dir = scratch_dir("e2e-cuda");
    let images = scenes(4);
    let cuda = BuildOptions {
        backend: Backend::Cuda,
        precision: Precision::Fp32,
        ..options()
    };
    for (model, seg) in [
        ("gelan-t-shapes.onnx", false),
        ("gelan-t-seg-shapes.onnx", true),
    ] {
        let e2e_path = dir.join(model);
        let e2e_model = end_to_end(&bundled(model), NmsFlavour::Onnx, &e2e_path);
        let plain_path = dir.join(format!("plain-{model}"));
        onnx::write_model(&plain_part(&e2e_model).unwrap(), &plain_path).unwrap();
        let mut engine = build_engine(&e2e_path, &cuda).unwrap();
        let e2e = engine.info().end_to_end.clone().unwrap();
        assert_eq!(e2e.masks.is_some(), seg);
        // The raw head is not what an end-to-end model returns.
        let e = engine
            .run(&as_input(&images[..2]), 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("end-to-end"), "{e}");
        let mut plain = build_engine(&plain_path, &cuda).unwrap();
        let info = plain.info().clone();
        let mut n = 0;
        for pair in images.chunks(2) {
            let input = as_input(pair);
            let got = Rows::of(engine.run_end_to_end(&input, 2).unwrap());
            let (head, prototypes) = plain.run_with_prototypes(&input, 2).unwrap();
            let want = assembled(&info, &e2e, head, prototypes, 2);
            n += got.assert_close(&want, 1e-3, 1e-6, 1e-5, &format!("{model} cuda"));
        }
        // As many as the CPU check above finds in the same 4 scenes.
        assert!(n > 10, "{model}: the scenes should have objects ({n})");

        // Through the detector (with device post-processing asked for, which end-to-end
        // models do not take): the cpu backend's detections of the graph.
        let mut on_gpu = Detector::new(engine);
        on_gpu.set_device_postprocessing(true);
        let mut on_cpu = detector(&e2e_path);
        let what = format!("{model}: cuda vs cpu");
        same_detections(
            &mut on_cpu,
            &mut on_gpu,
            &images,
            &NmsConfig::display(),
            seg,
            // The fp32 cuda engine's bound against the cpu backend (cuda_engine.rs: scores
            // within 1e-3 relative L2): cuDNN's convolutions sum in another order.
            1e-3,
            &what,
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
