//! Instance-mask ground truth against pycocotools: compressed RLE strings, polygon rasterisation,
//! and mask AP on the synthetic dataset's COCO json (visible masks as compressed RLE) read back
//! through `Dataset::from_coco_json`.

use kestrel_runtime::Detection;
use kestrel_runtime::dataset::Dataset;
use kestrel_runtime::eval::Evaluator;
use kestrel_runtime::masks::{Bitmap, Rle};
use kestrel_runtime::segments::Segmentation;
use kestrel_runtime::synth::{SynthConfig, generate, image_seed, render_scene};
use kestrel_tests::{Rng, mask_box, run_python, scratch_dir};
use serde_json::{Value, json};

/// A mask of a few random ellipses (centre, radii in pixels), or noise, of a `w` × `h` image.
fn random_mask(rng: &mut Rng, w: usize, h: usize) -> Bitmap {
    let mut data = vec![0u8; w * h];
    if rng.chance(0.2) {
        let density = rng.f32();
        data.iter_mut()
            .for_each(|v| *v = u8::from(rng.f32() < density));
    } else {
        for _ in 0..1 + rng.below(3) {
            let (cx, cy) = (rng.range(0.0, w as f32), rng.range(0.0, h as f32));
            let (rx, ry) = (
                rng.range(0.5, w as f32 / 2.0),
                rng.range(0.5, h as f32 / 2.0),
            );
            for (i, v) in data.iter_mut().enumerate() {
                let (x, y) = ((i % w) as f32 + 0.5, (i / w) as f32 + 0.5);
                if ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0 {
                    *v = 1;
                }
            }
        }
    }
    Bitmap {
        width: w,
        height: h,
        data,
    }
}

#[test]
fn compressed_rle_strings_match_pycocotools() {
    let dir = scratch_dir("coco_masks_rle");
    let mut rng = Rng(17);
    let mut masks = Vec::new();
    for k in 0..40 {
        let (w, h) = match k {
            0 => (7, 5),
            1 => (300, 200), // long runs: counts of several characters
            _ => (1 + rng.below(80), 1 + rng.below(60)),
        };
        let mut m = random_mask(&mut rng, w, h);
        match k {
            2 => m.data.fill(0),
            3 => m.data.fill(1),
            _ => {}
        }
        masks.push(m);
    }
    let items: Vec<Value> = masks
        .iter()
        .map(|m| {
            json!({"size": [m.height, m.width], "mask": m.data,
                   "counts": Rle::encode(m).to_coco_string()})
        })
        .collect();
    let input = dir.join("rle.json");
    std::fs::write(&input, Value::Array(items).to_string()).unwrap();
    let out = run_python("coco_masks.py", &["rle", input.to_str().unwrap()]);
    let py: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(py.len(), masks.len());
    for (k, (m, theirs)) in masks.iter().zip(&py).enumerate() {
        let ours = Rle::encode(m);
        let text = theirs["counts"].as_str().unwrap();
        // Encoding: the same string; decoding: pycocotools reads ours back to the same pixels,
        // and we read theirs to the same runs.
        assert_eq!(
            ours.to_coco_string(),
            text,
            "mask {k} ({}x{})",
            m.width,
            m.height
        );
        let decoded: Vec<u8> = theirs["decoded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            decoded, m.data,
            "mask {k}: pycocotools decodes our string differently"
        );
        assert_eq!(theirs["area"].as_u64().unwrap(), ours.area(), "mask {k}");
        assert_eq!(
            Rle::from_coco_string(m.height, m.width, text).unwrap(),
            ours,
            "mask {k}"
        );
    }
}

#[test]
fn polygon_rasterisation_matches_pycocotools() {
    // The synthetic scenes' polygons (whole shapes, clipped to the image), rasterised here at
    // pixel centres and by pycocotools' frPyObjects (its own sub-pixel edge rule).
    let dir = scratch_dir("coco_masks_polygons");
    let (w, h) = (320usize, 240usize);
    let mut polygons = Vec::new();
    for seed in 0..12 {
        let (_, objects) = render_scene(image_seed(31, seed), w as u32, h as u32);
        polygons.extend(objects.into_iter().map(|o| o.polygon));
    }
    let items: Vec<Value> = polygons
        .iter()
        .map(|p| {
            let flat: Vec<f64> = p
                .iter()
                .flat_map(|v| [f64::from(v[0]), f64::from(v[1])])
                .collect();
            json!({"size": [h, w], "polygons": [flat]})
        })
        .collect();
    let input = dir.join("polygons.json");
    std::fs::write(&input, Value::Array(items).to_string()).unwrap();
    let out = run_python("coco_masks.py", &["polygons", input.to_str().unwrap()]);
    let py: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(py.len(), polygons.len());
    let (mut sum, mut n, mut worst) = (0.0f64, 0usize, 1.0f64);
    for (k, (p, theirs)) in polygons.iter().zip(&py).enumerate() {
        let ours = Segmentation::Polygons(vec![p.clone()])
            .to_rle(w, h)
            .unwrap();
        let theirs = Rle::from_coco_string(h, w, theirs["counts"].as_str().unwrap()).unwrap();
        if ours.area() < 100 {
            continue;
        }
        let iou = ours.iou(&theirs, false).unwrap();
        assert!(
            iou >= 0.9,
            "polygon {k}: IoU {iou} (ours {} px, pycocotools {} px)",
            ours.area(),
            theirs.area()
        );
        sum += iou;
        n += 1;
        worst = worst.min(iou);
    }
    assert!(n > 50, "only {n} polygons of 100 px or more");
    eprintln!(
        "polygon rasterisation vs pycocotools frPyObjects: {n} objects of >= 100 px, mean IoU \
         {:.4}, lowest {worst:.4}",
        sum / n as f64
    );
}

/// `m` moved by `(dx, dy)` pixels (what leaves the image is lost).
fn shifted(m: &Bitmap, dx: i64, dy: i64) -> Bitmap {
    let (w, h) = (m.width as i64, m.height as i64);
    let mut data = vec![0u8; m.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = (x - dx, y - dy);
            if (0..w).contains(&sx) && (0..h).contains(&sy) {
                data[(y * w + x) as usize] = m.data[(sy * w + sx) as usize];
            }
        }
    }
    Bitmap {
        width: m.width,
        height: m.height,
        data,
    }
}

/// `m` grown (`grow`) or shrunk by one pixel in the 4-neighbourhood.
fn morph(m: &Bitmap, grow: bool) -> Bitmap {
    let (w, h) = (m.width, m.height);
    let at = |x: i64, y: i64| -> u8 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            0
        } else {
            m.data[y as usize * w + x as usize]
        }
    };
    let data = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            let around = [
                at(x, y),
                at(x - 1, y),
                at(x + 1, y),
                at(x, y - 1),
                at(x, y + 1),
            ];
            if grow {
                u8::from(around.contains(&1))
            } else {
                u8::from(around.iter().all(|&v| v == 1))
            }
        })
        .collect();
    Bitmap {
        width: w,
        height: h,
        data,
    }
}

#[test]
fn synthetic_mask_ap_matches_pycocotools() {
    // The synthetic COCO json (visible masks as compressed RLE) read by our loader and by
    // pycocotools; detections are the ground-truth masks moved, grown or shrunk, sometimes
    // duplicated or given the wrong class, plus false positives, with tied scores.
    let dir = scratch_dir("coco_masks_ap");
    let cfg = SynthConfig {
        images: 24,
        width: 160,
        height: 128,
        seed: 4,
        val_fraction: 0.0,
        ..SynthConfig::default()
    };
    generate(&cfg, &dir, &mut |_, _| {}).unwrap();
    let gt_json = dir.join("annotations/instances_train.json");
    let ds = Dataset::from_coco_json(&gt_json, &dir.join("images/train")).unwrap();
    assert!(ds.has_masks());
    let nc = ds.num_classes();
    let mut rng = Rng(8);
    let mut ev = Evaluator::new(nc);
    let mut results = Vec::new();
    for sample in &ds.samples {
        let gt_masks = sample.instance_masks(ds.mask_overlap).unwrap().unwrap();
        for (g, m) in sample.objects.iter().zip(&gt_masks) {
            assert_eq!(g.area, m.area() as f32, "COCO area is the visible mask's");
        }
        let (w, h) = (sample.width as usize, sample.height as usize);
        let mut dets: Vec<(Bitmap, usize, f32)> = Vec::new();
        for (g, m) in sample.objects.iter().zip(&gt_masks) {
            if rng.chance(0.15) {
                continue; // missed
            }
            let m = m.decode().unwrap();
            let copies = 1 + usize::from(rng.chance(0.2));
            for _ in 0..copies {
                let mut d = shifted(&m, rng.below(5) as i64 - 2, rng.below(5) as i64 - 2);
                if rng.chance(0.3) {
                    d = morph(&d, rng.chance(0.5));
                }
                let class_id = if rng.chance(0.1) {
                    rng.below(nc)
                } else {
                    g.class_id
                };
                let score = if rng.chance(0.3) {
                    (rng.range(0.2, 1.0) * 10.0).round() / 10.0
                } else {
                    rng.range(0.05, 1.0)
                };
                dets.push((d, class_id, score));
            }
        }
        for _ in 0..rng.below(3) {
            dets.push((
                random_mask(&mut rng, w, h),
                rng.below(nc),
                rng.range(0.0, 0.6),
            ));
        }
        let (mut det_list, mut det_masks) = (Vec::new(), Vec::new());
        for (m, class_id, score) in dets {
            if m.area() == 0 {
                continue;
            }
            let rle = Rle::encode(&m);
            let b = mask_box(&m);
            // No `bbox`: with one, pycocotools' loadRes takes its box branch and gives the
            // detection the box's area for the area ranges; without, the mask's, as ours.
            results.push(json!({
                "image_id": sample.image_id,
                "category_id": ds.category_ids[class_id],
                "segmentation": {"size": [rle.height, rle.width], "counts": rle.counts},
                "score": score,
            }));
            det_list.push(Detection {
                bbox: b,
                score,
                class_id,
                anchor: 0,
            });
            det_masks.push(rle);
        }
        ev.add_image_masks(&sample.objects, &gt_masks, &det_list, &det_masks)
            .unwrap();
    }
    let dt_json = dir.join("dets.json");
    std::fs::write(&dt_json, Value::Array(results).to_string()).unwrap();
    let out = run_python(
        "coco_eval.py",
        &[
            gt_json.to_str().unwrap(),
            dt_json.to_str().unwrap(),
            "--segm",
        ],
    );
    let py: Value = serde_json::from_str(out.trim()).unwrap();
    let ours = ev.summarize();
    let mine = ours.coco_stats();
    let theirs: Vec<f64> = py["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    eprintln!(
        "synthetic segm: {} images, {} instances; mAP50-95 ours {:.6} pycocotools {:.6}",
        ours.images, ours.instances, mine[0], theirs[0]
    );
    assert!(
        (mine[0] - theirs[0]).abs() <= 0.002,
        "mAP50-95 ours {} vs pycocotools {}",
        mine[0],
        theirs[0]
    );
    let worst = mine
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    eprintln!("synthetic segm: largest difference over the 12 COCO stats {worst:.1e}");
    for (k, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 0.002,
            "stat {k}: ours {a} vs pycocotools {b}"
        );
    }
    // Hard enough that agreement means something.
    assert!(ours.ap > 0.2 && ours.ap < 0.95, "AP {}", ours.ap);
}
