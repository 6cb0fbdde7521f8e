//! `kestrel val`: mAP of a model on a labelled dataset.

use std::path::PathBuf;

use anyhow::{Result, bail};
use kestrel_runtime::dataset::{Dataset, Split, load_rgb};
use kestrel_runtime::eval::Evaluator;
use kestrel_runtime::nms::NmsConfig;

use crate::util::{EngineArgs, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// The dataset's YOLO data YAML (names, train/val image folders).
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
    let mut evaluator = Evaluator::new(data.num_classes());
    let bar = progress(data.samples.len() as u64, "val");
    let mut results = Vec::new();
    for chunk in data.samples.chunks(a.batch) {
        let images = chunk
            .iter()
            .map(|s| load_rgb(&s.image))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&image::RgbImage> = images.iter().collect();
        detector.detect(&refs, &cfg, &mut results)?;
        for (sample, dets) in chunk.iter().zip(&results) {
            evaluator.add_image(&sample.objects, dets)?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let summary = evaluator.summarize();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
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
            }))?
        );
    } else {
        print!("{}", summary.table(&data.names));
    }
    Ok(())
}
