//! `kestrel val`: mAP of a model on a labelled dataset; for a segmentation model on a dataset
//! with instance masks (YOLO-seg polygon labels), mask mAP too, as YOLOv9's segmentation val.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Result, bail};
use kestrel_runtime::dataset::{Dataset, Split, load_rgb};
use kestrel_runtime::eval::{EvalSummary, Evaluator};
use kestrel_runtime::masks::Rle;
use kestrel_runtime::nms::NmsConfig;

use crate::util::{EngineArgs, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// The dataset's YOLO data YAML (names, train/val image folders). With a segmentation model
    /// and YOLO-seg polygon labels for every object, masks are scored too (later label lines lie
    /// on top of earlier ones).
    #[arg(long)]
    data: PathBuf,
    /// Which split to evaluate.
    #[arg(long, default_value = "val", value_parser = ["train", "val"])]
    split: String,
    /// Confidence threshold (YOLOv9's validation uses 0.001).
    #[arg(long = "conf", default_value_t = 0.001)]
    conf: f32,
    /// NMS IoU threshold (YOLOv9's validation uses 0.7).
    #[arg(long = "iou", default_value_t = 0.7)]
    iou: f32,
    /// Most detections per image.
    #[arg(long, default_value_t = 300)]
    max_det: usize,
    /// Images per engine batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch 0: give at least 1");
    }
    let split = if a.split == "train" {
        Split::Train
    } else {
        Split::Val
    };
    let data = Dataset::from_yolo_yaml(&a.data, split)?;
    let mut detector = a.engine.detector(a.batch)?;
    let info = detector.info().clone();
    if info.num_classes != data.num_classes() {
        bail!(
            "the model has {} classes but {} names {}; evaluate with a model trained for this dataset",
            info.num_classes,
            a.data.display(),
            data.num_classes()
        );
    }
    let cfg = NmsConfig {
        conf_threshold: a.conf,
        iou_threshold: a.iou,
        max_detections: a.max_det,
        ..NmsConfig::evaluation()
    };
    cfg.validate()?;
    // Masks are scored when the model makes them and every object has one to compare with.
    let segmentation = info.prototypes.is_some();
    let with_masks = segmentation && data.has_masks();
    if segmentation && !with_masks {
        eprintln!("note: {}", no_masks_reason(&data));
    }
    let mut evaluator = Evaluator::new(data.num_classes());
    let mut mask_evaluator = with_masks.then(|| Evaluator::new(data.num_classes()));
    let bar = progress(data.samples.len() as u64, "val");
    let mut results = Vec::new();
    let mut masks = Vec::new();
    for chunk in data.samples.chunks(a.batch) {
        let images = chunk
            .iter()
            .map(|s| load_rgb(&s.image))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&image::RgbImage> = images.iter().collect();
        if with_masks {
            detector.detect_masks(&refs, &cfg, &mut results, &mut masks)?;
        } else {
            detector.detect(&refs, &cfg, &mut results)?;
        }
        for (k, (sample, dets)) in chunk.iter().zip(&results).enumerate() {
            evaluator.add_image(&sample.objects, dets)?;
            if let Some(ev) = mask_evaluator.as_mut() {
                let Some(gt_masks) = sample.instance_masks(data.mask_overlap)? else {
                    bail!("{}: an object without a mask", sample.image.display());
                };
                // The area ranges of mask AP read the objects' mask areas (YOLO labels carry
                // box areas).
                let mut objects = sample.objects.clone();
                for (o, m) in objects.iter_mut().zip(&gt_masks) {
                    o.area = m.area() as f32;
                }
                let det_masks: Vec<Rle> = masks
                    .get(k)
                    .map(|ms| ms.iter().map(Rle::encode).collect())
                    .unwrap_or_default();
                ev.add_image_masks(&objects, &gt_masks, dets, &det_masks)?;
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let summary = evaluator.summarize();
    let mask_summary = mask_evaluator.map(|ev| ev.summarize());
    if a.json {
        let mut out = serde_json::json!({
            "model": a.engine.model.display().to_string(),
            "data": a.data.display().to_string(),
            "split": a.split,
            "images": summary.images,
            "instances": summary.instances,
            "precision": summary.precision,
            "recall": summary.recall,
            "map50": summary.ap50,
            "map50_95": summary.ap,
            "coco_stats": summary.coco_stats(),
            "box": metrics_json(&summary),
        });
        if let Some(m) = &mask_summary {
            out["mask"] = metrics_json(m);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if let Some(m) = &mask_summary {
        print!("{}", box_mask_table(&summary, m, &data.names));
    } else {
        print!("{}", summary.table(&data.names));
    }
    Ok(())
}

/// Why a segmentation model's masks were not scored on `data`, in one line.
fn no_masks_reason(data: &Dataset) -> String {
    let missing = data.objects_without_masks();
    if data.num_objects() == 0 {
        "masks were not evaluated: the dataset has no labelled objects".into()
    } else if missing == data.num_objects() {
        "masks were not evaluated: the dataset has no masks (its labels are boxes; YOLO-seg \
         polygon lines `class x1 y1 x2 y2 ...` give masks)"
            .into()
    } else {
        format!(
            "masks were not evaluated: {missing} of {} objects have a box but no polygon; mask \
             metrics need a polygon for every object",
            data.num_objects()
        )
    }
}

/// One evaluation's headline numbers for `--json`.
fn metrics_json(s: &EvalSummary) -> serde_json::Value {
    serde_json::json!({
        "precision": s.precision,
        "recall": s.recall,
        "map50": s.ap50,
        "map50_95": s.ap,
        "coco_stats": s.coco_stats(),
    })
}

/// YOLOv9's segmentation val table: per class (after `all`), a `Box` row and a `Mask` row with
/// P, R, mAP50 and mAP50-95.
fn box_mask_table<S: AsRef<str>>(boxes: &EvalSummary, masks: &EvalSummary, names: &[S]) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "{:>22}{:>6}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
        "Class", "", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"
    );
    let mut row = |class: &str, kind: &str, images: usize, instances: usize, v: [f64; 4]| {
        let _ = writeln!(
            s,
            "{class:>22}{kind:>6}{images:>11}{instances:>11}{:>11.3}{:>11.3}{:>11.3}{:>11.3}",
            v[0], v[1], v[2], v[3]
        );
    };
    for (kind, e) in [("Box", boxes), ("Mask", masks)] {
        row(
            "all",
            kind,
            e.images,
            e.instances,
            [e.precision, e.recall, e.ap50.max(0.0), e.ap.max(0.0)],
        );
    }
    // Both evaluations saw the same objects, so they list the same classes.
    for (b, m) in boxes.per_class.iter().zip(&masks.per_class) {
        let name = names
            .get(b.class_id)
            .map_or_else(|| b.class_id.to_string(), |n| n.as_ref().to_string());
        for (kind, c) in [("Box", b), ("Mask", m)] {
            row(
                &name,
                kind,
                c.images,
                c.instances,
                [c.precision, c.recall, c.ap50, c.ap],
            );
        }
    }
    s
}
