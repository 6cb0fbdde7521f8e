//! `kestrel infer`: detections (and instance masks of segmentation models) for images, as
//! annotated PNGs and JSON.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kestrel_runtime::dataset::load_rgb;
use kestrel_runtime::masks::Rle;
use kestrel_runtime::nms::NmsConfig;
use serde::Serialize;

use crate::draw::Annotator;
use crate::util::{EngineArgs, collect_images, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Images or folders of images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder for <image>.png and <image>.json.
    #[arg(long, short = 'o', default_value = "out")]
    output: PathBuf,
    /// Confidence threshold.
    #[arg(long = "conf", default_value_t = 0.25)]
    conf: f32,
    /// NMS IoU threshold.
    #[arg(long = "iou", default_value_t = 0.45)]
    iou: f32,
    /// Most detections per image.
    #[arg(long, default_value_t = 300)]
    max_det: usize,
    /// Images per engine batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Write JSON only, no annotated pictures.
    #[arg(long)]
    no_pictures: bool,
}

#[derive(Serialize)]
struct JsonDetection<'a> {
    class_id: usize,
    class_name: &'a str,
    score: f32,
    /// x1, y1, x2, y2 in the image's pixels.
    #[serde(rename = "box")]
    bbox: [f32; 4],
    /// Segmentation models: the instance mask as COCO RLE (`{"size": [h, w], "counts": [...]}`,
    /// column-major runs starting with background).
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<JsonRle>,
}

#[derive(Serialize)]
struct JsonRle {
    size: [usize; 2],
    counts: Vec<u32>,
}

#[derive(Serialize)]
struct JsonImage<'a> {
    image: String,
    width: u32,
    height: u32,
    model: &'a str,
    detections: Vec<JsonDetection<'a>>,
}

/// `out/<stem>` made unique among the images of this run.
fn output_stem(image: &Path, used: &mut HashSet<String>) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut candidate = stem.clone();
    let mut i = 1;
    while !used.insert(candidate.clone()) {
        candidate = format!("{stem}_{i}");
        i += 1;
    }
    candidate
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch 0: give at least 1");
    }
    let images = collect_images(&a.inputs)?;
    let mut detector = a.engine.detector(a.batch)?;
    let info = detector.info().clone();
    let cfg = NmsConfig {
        conf_threshold: a.conf,
        iou_threshold: a.iou,
        max_detections: a.max_det,
        ..NmsConfig::display()
    };
    cfg.validate()?;
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("{}: cannot create the output folder", a.output.display()))?;
    let annotator = (!a.no_pictures).then(Annotator::new);
    let bar = progress(images.len() as u64, "infer");
    let mut used = HashSet::new();
    let mut failures = Vec::new();
    let mut results = Vec::new();
    // Segmentation models: masks too (decoded on the CPU).
    let segmentation = info.prototypes.is_some();
    let mut masks = Vec::new();
    let mut total = 0usize;
    for chunk in images.chunks(a.batch) {
        let mut loaded = Vec::with_capacity(chunk.len());
        for path in chunk {
            match load_rgb(path) {
                Ok(img) => loaded.push((path, img)),
                Err(e) => {
                    bar.suspend(|| eprintln!("error: {e}"));
                    failures.push(path.clone());
                }
            }
        }
        let refs: Vec<&image::RgbImage> = loaded.iter().map(|(_, img)| img).collect();
        if segmentation {
            detector.detect_masks(&refs, &cfg, &mut results, &mut masks)?;
        } else {
            detector.detect(&refs, &cfg, &mut results)?;
        }
        for (k, ((path, mut img), dets)) in loaded.into_iter().zip(&results).enumerate() {
            let image_masks = masks.get(k).map(Vec::as_slice).unwrap_or_default();
            let stem = output_stem(path, &mut used);
            let record = JsonImage {
                image: path.display().to_string(),
                width: img.width(),
                height: img.height(),
                model: &info.model_name,
                detections: dets
                    .iter()
                    .enumerate()
                    .map(|(j, d)| JsonDetection {
                        class_id: d.class_id,
                        class_name: info
                            .class_names
                            .get(d.class_id)
                            .map(String::as_str)
                            .unwrap_or("?"),
                        score: d.score,
                        bbox: [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2],
                        mask: image_masks.get(j).map(|m| {
                            let rle = Rle::encode(m);
                            JsonRle {
                                size: [rle.height, rle.width],
                                counts: rle.counts,
                            }
                        }),
                    })
                    .collect(),
            };
            let json_path = a.output.join(format!("{stem}.json"));
            std::fs::write(&json_path, serde_json::to_string_pretty(&record)?)
                .with_context(|| format!("{}: cannot write", json_path.display()))?;
            if let Some(annotator) = &annotator {
                annotator.draw_masks(&mut img, dets, image_masks);
                annotator.draw(&mut img, dets, &info.class_names);
                let png = a.output.join(format!("{stem}.png"));
                img.save(&png)
                    .with_context(|| format!("{}: cannot write", png.display()))?;
            }
            total += dets.len();
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let done = images.len() - failures.len();
    println!(
        "{done} images, {total} detections (conf > {}, IoU {}), written to {}",
        a.conf,
        a.iou,
        a.output.display()
    );
    if !failures.is_empty() {
        bail!(
            "{} of {} images could not be read (listed above); fix or remove them and run again",
            failures.len(),
            images.len()
        );
    }
    Ok(())
}
