//! Our COCO evaluator against pycocotools' COCOeval on the same ground truth and detections, and the
//! synthetic dataset's two label formats (YOLO txt and COCO json) against each other.
//!
//! The detections are made to hit every corner of COCOeval: jittered true positives, duplicates,
//! confused classes, false positives, missed objects, tied scores, tiny boxes, crowd regions (with
//! detections inside them), images without objects or without detections, a class with detections
//! but no ground truth, more than 100 detections in an image, and mask-like areas that differ from
//! the box areas (so the area ranges of objects and detections disagree).

use std::path::Path;

use kestrel_runtime::dataset::{Dataset, Split};
use kestrel_runtime::eval::Evaluator;
use kestrel_runtime::masks::{Bitmap, Rle};
use kestrel_runtime::synth::{SynthConfig, generate};
use kestrel_runtime::{BoxXyxy, Detection, GroundTruth};
use kestrel_tests::{Rng, mask_box, run_python, scratch_dir};
use serde_json::{Value, json};

/// Non-contiguous COCO category ids, to exercise the id ↔ class mapping.
const CATEGORY_IDS: [u64; 5] = [1, 3, 7, 8, 12];
/// Category 12 only ever gets false positives: COCOeval must leave it out of the mean.
const FP_ONLY_CLASS: usize = 4;

struct GtObject {
    bbox: BoxXyxy,
    class_id: usize,
    area: f32,
    crowd: bool,
}

/// Box of size drawn log-uniformly in [lo, hi] px, somewhere in a `w` × `h` image.
fn random_box(rng: &mut Rng, w: f32, h: f32, lo: f32, hi: f32) -> BoxXyxy {
    let bw = rng.range(lo.ln(), hi.ln()).exp().min(w);
    let bh = (bw * rng.range(0.5, 2.0)).clamp(1.0, h);
    let x1 = rng.range(0.0, w - bw);
    let y1 = rng.range(0.0, h - bh);
    BoxXyxy::new(x1, y1, x1 + bw, y1 + bh)
}

/// Each corner moved by up to `frac` of the box size.
fn jitter(rng: &mut Rng, b: &BoxXyxy, frac: f32) -> BoxXyxy {
    let (bw, bh) = (b.width(), b.height());
    let x1 = b.x1 + rng.range(-frac, frac) * bw;
    let y1 = b.y1 + rng.range(-frac, frac) * bh;
    let x2 = (b.x2 + rng.range(-frac, frac) * bw).max(x1 + 0.5);
    let y2 = (b.y2 + rng.range(-frac, frac) * bh).max(y1 + 0.5);
    BoxXyxy::new(x1, y1, x2, y2)
}

/// Scores on a coarse grid sometimes, so that ties occur within and across images.
fn score(rng: &mut Rng, lo: f32, hi: f32) -> f32 {
    let s = rng.range(lo, hi);
    if rng.chance(0.3) {
        (s * 20.0).round() / 20.0
    } else {
        s
    }
}

fn xywh(b: &BoxXyxy) -> [f64; 4] {
    // Width and height in f64 from the f32 corners: exact, so x + w gives back x2 on both sides.
    let (x1, y1) = (f64::from(b.x1), f64::from(b.y1));
    [x1, y1, f64::from(b.x2) - x1, f64::from(b.y2) - y1]
}

/// Write `gt.json` and `dets.json` for one seed; return the detections per image (in image order).
fn make_case(seed: u64, dir: &Path) -> Vec<Vec<Detection>> {
    let mut rng = Rng(seed);
    let n_images = 60;
    let nc = CATEGORY_IDS.len();
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    let mut results = Vec::new();
    let mut dets_per_image = Vec::new();

    for i in 0..n_images {
        let image_id = i as u64 + 1;
        let (wi, hi) = (200 + rng.below(1200) as u32, 150 + rng.below(850) as u32);
        images.push(
            json!({"id": image_id, "file_name": format!("{i}.jpg"), "width": wi, "height": hi}),
        );
        let (w, h) = (wi as f32, hi as f32);

        let mut gts = Vec::new();
        if !rng.chance(0.1) {
            for _ in 0..1 + rng.below(15) {
                let crowd = rng.chance(0.05);
                let bbox = if rng.chance(0.15) {
                    random_box(&mut rng, w, h, 2.0, 10.0) // tiny
                } else if crowd {
                    random_box(&mut rng, w, h, 80.0, 500.0)
                } else {
                    random_box(&mut rng, w, h, 8.0, 600.0)
                };
                // Mask-like areas: COCO's area is the segment's, smaller than the box.
                let area = if rng.chance(0.3) {
                    bbox.area()
                } else {
                    bbox.area() * rng.range(0.4, 1.0)
                };
                let class_id = rng.below(nc - 1); // never FP_ONLY_CLASS
                gts.push(GtObject {
                    bbox,
                    class_id,
                    area,
                    crowd,
                });
            }
        }

        let mut dets = Vec::new();
        let no_dets = rng.chance(0.1);
        for g in &gts {
            if g.crowd {
                // Detections inside a crowd region: ignored by COCOeval, not false positives.
                for _ in 0..rng.below(4) {
                    let b = &g.bbox;
                    let (cw, ch) = (
                        b.width() * rng.range(0.1, 0.4),
                        b.height() * rng.range(0.1, 0.4),
                    );
                    let x = rng.range(b.x1, b.x2 - cw);
                    let y = rng.range(b.y1, b.y2 - ch);
                    dets.push(Detection {
                        bbox: BoxXyxy::new(x, y, x + cw, y + ch),
                        score: score(&mut rng, 0.1, 1.0),
                        class_id: g.class_id,
                        anchor: 0,
                    });
                }
                continue;
            }
            if rng.chance(0.15) {
                continue; // missed
            }
            let class_id = if rng.chance(0.08) {
                rng.below(nc)
            } else {
                g.class_id
            };
            let s = score(&mut rng, 0.05, 1.0);
            let spread = rng.range(0.0, 0.25);
            dets.push(Detection {
                bbox: jitter(&mut rng, &g.bbox, spread),
                score: s,
                class_id,
                anchor: 0,
            });
            if rng.chance(0.2) {
                // A duplicate, sometimes with exactly the same score.
                let s2 = if rng.chance(0.3) {
                    s
                } else {
                    score(&mut rng, 0.0, s)
                };
                dets.push(Detection {
                    bbox: jitter(&mut rng, &g.bbox, 0.3),
                    score: s2,
                    class_id,
                    anchor: 0,
                });
            }
        }
        let n_fp = if i == 7 { 150 } else { rng.below(6) }; // image 7: more than maxDets
        for _ in 0..n_fp {
            let bbox = if rng.chance(0.2) {
                random_box(&mut rng, w, h, 1.5, 8.0)
            } else {
                random_box(&mut rng, w, h, 5.0, 500.0)
            };
            dets.push(Detection {
                bbox,
                score: score(&mut rng, 0.0, 0.7),
                class_id: rng.below(nc),
                anchor: 0,
            });
        }
        if rng.chance(0.5) {
            dets.push(Detection {
                bbox: random_box(&mut rng, w, h, 10.0, 200.0),
                score: score(&mut rng, 0.0, 1.0),
                class_id: FP_ONLY_CLASS,
                anchor: 0,
            });
        }
        if no_dets {
            dets.clear();
        }

        for g in &gts {
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": image_id,
                "category_id": CATEGORY_IDS[g.class_id],
                "bbox": xywh(&g.bbox),
                "area": f64::from(g.area),
                "iscrowd": u8::from(g.crowd),
            }));
        }
        for d in &dets {
            results.push(json!({
                "image_id": image_id,
                "category_id": CATEGORY_IDS[d.class_id],
                "bbox": xywh(&d.bbox),
                "score": f64::from(d.score),
            }));
        }
        dets_per_image.push(dets);
    }

    let categories: Vec<Value> = CATEGORY_IDS
        .iter()
        .map(|&id| json!({"id": id, "name": format!("cat{id}")}))
        .collect();
    let gt = json!({"images": images, "annotations": annotations, "categories": categories});
    std::fs::write(dir.join("gt.json"), gt.to_string()).unwrap();
    std::fs::write(dir.join("dets.json"), Value::Array(results).to_string()).unwrap();
    dets_per_image
}

fn compare_with_pycocotools(seed: u64) {
    let dir = scratch_dir(&format!("coco_eval_{seed}"));
    let dets = make_case(seed, &dir);

    // Ground truth goes through our COCO loader, so the category mapping is tested too.
    let ds = Dataset::from_coco_json(&dir.join("gt.json"), &dir).unwrap();
    assert_eq!(ds.category_ids, CATEGORY_IDS);
    assert_eq!(ds.samples.len(), dets.len());
    let mut ev = Evaluator::new(ds.num_classes());
    for (sample, d) in ds.samples.iter().zip(&dets) {
        ev.add_image(&sample.objects, d).unwrap();
    }
    let ours = ev.summarize();

    let gt_path = dir.join("gt.json");
    let dt_path = dir.join("dets.json");
    let out = run_python(
        "coco_eval.py",
        &[gt_path.to_str().unwrap(), dt_path.to_str().unwrap()],
    );
    let py: Value = serde_json::from_str(out.trim()).unwrap();
    let stats: Vec<f64> = py["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();

    let names = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];
    let mine = ours.coco_stats();
    eprintln!(
        "seed {seed}: {} images, {} instances",
        ours.images, ours.instances
    );
    for (k, name) in names.iter().enumerate() {
        eprintln!(
            "seed {seed}: {name:>5} ours {:.6} pycocotools {:.6} diff {:.1e}",
            mine[k],
            stats[k],
            (mine[k] - stats[k]).abs()
        );
    }
    for (k, name) in names.iter().enumerate() {
        assert!(
            (mine[k] - stats[k]).abs() < 0.002,
            "seed {seed}: {name} ours {} vs pycocotools {}",
            mine[k],
            stats[k]
        );
    }
    // Per class too, and the false-positive-only category must be absent from both.
    for c in &ours.per_class {
        let id = CATEGORY_IDS[c.class_id].to_string();
        let theirs = py["per_class_ap"][&id].as_f64().unwrap();
        assert!(
            (c.ap - theirs).abs() < 0.002,
            "seed {seed}: class {id} AP ours {} vs pycocotools {theirs}",
            c.ap
        );
    }
    assert!(ours.per_class.iter().all(|c| c.class_id != FP_ONLY_CLASS));
    assert_eq!(
        py["per_class_ap"][CATEGORY_IDS[FP_ONLY_CLASS].to_string()],
        -1.0
    );
    // The data must be hard enough that agreement means something.
    assert!(ours.ap > 0.05 && ours.ap < 0.95, "AP {}", ours.ap);
    eprintln!("{}", ours.table(&ds.names));
}

#[test]
fn matches_pycocotools_seed_1() {
    compare_with_pycocotools(1);
}

#[test]
fn matches_pycocotools_seed_2() {
    compare_with_pycocotools(2);
}

#[test]
fn matches_pycocotools_seed_3() {
    compare_with_pycocotools(3);
}

#[test]
fn synthetic_yolo_labels_match_coco_json() {
    let dir = scratch_dir("synth_formats");
    let cfg = SynthConfig {
        images: 12,
        width: 333,
        height: 250,
        seed: 99,
        val_fraction: 0.25,
        ..SynthConfig::default()
    };
    let summary = generate(&cfg, &dir, &mut |_, _| {}).unwrap();
    assert_eq!(summary.train_images + summary.val_images, 12);

    for (split, name) in [(Split::Train, "train"), (Split::Val, "val")] {
        let yolo = Dataset::from_yolo_yaml(&summary.data_yaml, split).unwrap();
        let coco = Dataset::from_coco_json(
            &dir.join(format!("annotations/instances_{name}.json")),
            &dir.join(format!("images/{name}")),
        )
        .unwrap();
        assert_eq!(yolo.names, coco.names);
        assert_eq!(yolo.samples.len(), coco.samples.len());
        let mut objects = 0;
        for (y, c) in yolo.samples.iter().zip(&coco.samples) {
            assert_eq!(
                y.image.canonicalize().unwrap(),
                c.image.canonicalize().unwrap()
            );
            assert_eq!((y.width, y.height), (c.width, c.height));
            assert_eq!(y.objects.len(), c.objects.len(), "{}", y.image.display());
            for (a, b) in y.objects.iter().zip(&c.objects) {
                assert_eq!(a.class_id, b.class_id);
                for (u, v) in [
                    (a.bbox.x1, b.bbox.x1),
                    (a.bbox.y1, b.bbox.y1),
                    (a.bbox.x2, b.bbox.x2),
                    (a.bbox.y2, b.bbox.y2),
                ] {
                    assert!(
                        (u - v).abs() < 0.01,
                        "{}: YOLO {:?} vs COCO {:?}",
                        y.image.display(),
                        a.bbox,
                        b.bbox
                    );
                }
                // COCO's area is the visible mask's pixels, whose centres lie inside the box.
                let (bw, bh) = (b.bbox.width().ceil(), b.bbox.height().ceil());
                assert!(b.area <= (bw + 1.0) * (bh + 1.0));
            }
            objects += y.objects.len();
        }
        let expected = match split {
            Split::Train => summary.train_objects,
            Split::Val => summary.val_objects,
        };
        assert_eq!(objects, expected);
    }
}

/// An ellipse mask of a `w` × `h` image (centre and radii in pixels).
fn ellipse(w: usize, h: usize, cx: f32, cy: f32, rx: f32, ry: f32) -> Bitmap {
    let data = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f32 + 0.5, (i / w) as f32 + 0.5);
            u8::from(((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0)
        })
        .collect();
    Bitmap {
        width: w,
        height: h,
        data,
    }
}

fn rle_json(r: &Rle) -> Value {
    json!({"size": [r.height, r.width], "counts": r.counts})
}

/// Mask AP (`segm`) of random ellipses against pycocotools: jittered true positives,
/// duplicates, false positives, tied scores, crowd regions, images without objects.
fn compare_masks_with_pycocotools(seed: u64) {
    let dir = scratch_dir(&format!("coco_segm_{seed}"));
    let mut rng = Rng(seed);
    let classes = 3;
    let (mut images, mut annotations, mut results) = (Vec::new(), Vec::new(), Vec::new());
    let mut ev = Evaluator::new(classes);
    for image_id in 1..=14u64 {
        let (w, h) = (40 + rng.below(90), 30 + rng.below(70));
        images.push(json!({"id": image_id, "width": w, "height": h, "file_name": format!("{image_id}.png")}));
        let random_ellipse = |rng: &mut Rng| {
            let (rx, ry) = (
                rng.range(2.0, w as f32 / 3.0),
                rng.range(2.0, h as f32 / 3.0),
            );
            (rng.range(0.0, w as f32), rng.range(0.0, h as f32), rx, ry)
        };
        let (mut gts, mut gt_masks, mut dets, mut det_masks) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rng.below(7) {
            let (cx, cy, rx, ry) = random_ellipse(&mut rng);
            let m = ellipse(w, h, cx, cy, rx, ry);
            if m.area() == 0 {
                continue;
            }
            let (class_id, crowd) = (rng.below(classes), rng.chance(0.1));
            let b = mask_box(&m);
            let rle = Rle::encode(&m);
            annotations.push(json!({
                "id": annotations.len() + 1, "image_id": image_id, "category_id": class_id + 1,
                "segmentation": rle_json(&rle), "area": m.area(), "iscrowd": u8::from(crowd),
                "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1],
            }));
            gts.push(GroundTruth {
                bbox: b,
                class_id,
                area: m.area() as f32,
                iscrowd: crowd,
            });
            gt_masks.push(rle);
            // Found (jittered), sometimes twice, sometimes with the wrong class.
            for _ in 0..usize::from(rng.chance(0.85)) + usize::from(rng.chance(0.2)) {
                let d = ellipse(
                    w,
                    h,
                    cx + rng.range(-0.3, 0.3) * rx,
                    cy + rng.range(-0.3, 0.3) * ry,
                    rx * rng.range(0.8, 1.2),
                    ry * rng.range(0.8, 1.2),
                );
                let c = if rng.chance(0.1) {
                    rng.below(classes)
                } else {
                    class_id
                };
                dets.push((d, c, (rng.range(0.3, 1.0) * 20.0).round() / 20.0));
            }
        }
        for _ in 0..rng.below(4) {
            let (cx, cy, rx, ry) = random_ellipse(&mut rng);
            dets.push((
                ellipse(w, h, cx, cy, rx, ry),
                rng.below(classes),
                rng.range(0.05, 0.6),
            ));
        }
        let mut det_list = Vec::new();
        for (m, class_id, score) in dets {
            if m.area() == 0 {
                continue;
            }
            let rle = Rle::encode(&m);
            results.push(json!({
                "image_id": image_id, "category_id": class_id + 1,
                "segmentation": rle_json(&rle), "score": score,
            }));
            det_list.push(Detection {
                bbox: mask_box(&m),
                score,
                class_id,
                anchor: 0,
            });
            det_masks.push(rle);
        }
        ev.add_image_masks(&gts, &gt_masks, &det_list, &det_masks)
            .unwrap();
    }
    let categories: Vec<Value> = (1..=classes)
        .map(|id| json!({"id": id, "name": format!("c{id}")}))
        .collect();
    let gt = json!({"images": images, "annotations": annotations, "categories": categories});
    std::fs::write(dir.join("gt.json"), gt.to_string()).unwrap();
    std::fs::write(dir.join("dets.json"), Value::Array(results).to_string()).unwrap();
    let out = run_python(
        "coco_eval.py",
        &[
            dir.join("gt.json").to_str().unwrap(),
            dir.join("dets.json").to_str().unwrap(),
            "--segm",
        ],
    );
    let py: Value = serde_json::from_str(out.trim()).unwrap();
    let mine = ev.summarize().coco_stats();
    for (k, v) in py["stats"].as_array().unwrap().iter().enumerate() {
        let theirs = v.as_f64().unwrap();
        eprintln!(
            "segm seed {seed}: stat {k} ours {:.6} pycocotools {theirs:.6}",
            mine[k]
        );
        assert!(
            (mine[k] - theirs).abs() < 0.002,
            "segm seed {seed}: stat {k} ours {} vs pycocotools {theirs}",
            mine[k]
        );
    }
}

#[test]
fn mask_ap_matches_pycocotools_seed_1() {
    compare_masks_with_pycocotools(1);
}

#[test]
fn mask_ap_matches_pycocotools_seed_2() {
    compare_masks_with_pycocotools(2);
}
