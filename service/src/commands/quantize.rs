//! `kestrel quantize`: post-training quantization of a float model to a Q/DQ ONNX model, with
//! activation ranges calibrated on a folder of images.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kestrel_exporter::quantize::{
    QuantizePolicy, check_quantizable, quantize_model_with, sharing_groups,
};
use kestrel_exporter::{onnx, summarize};
use kestrel_runtime::calibrate::{CalibrationMethod, activation_ranges};
use kestrel_runtime::dataset::load_rgb;

use super::export::ModelArgs;
use crate::util::{check_model_file, collect_images, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The float ONNX model to quantize (from `kestrel export`).
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    onnx: Option<PathBuf>,
    /// Calibration images: a folder (searched recursively for PNG/JPEG files) or one image.
    #[arg(long)]
    calibrate: PathBuf,
    /// Calibrate on the first N images, sorted by path.
    #[arg(long, default_value_t = 64)]
    images: usize,
    /// max (the largest |x| seen) or histogram.
    #[arg(long, default_value = "max")]
    calibrator: String,
    /// For --calibrator histogram: mse, percentile or entropy.
    #[arg(long, default_value = "mse")]
    method: String,
    /// The percentile of --method percentile.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Output Q/DQ ONNX file.
    #[arg(long, short = 'o')]
    output: PathBuf,
    // Last: the heading applies to every argument after it.
    /// Instead of --onnx: export this model first, with the same options as `kestrel export`.
    #[command(flatten, next_help_heading = "Export options (instead of --onnx)")]
    export: Option<ModelArgs>,
}

pub fn run(a: Args) -> Result<()> {
    if a.images == 0 {
        bail!("--images 0: give at least 1");
    }
    let method = CalibrationMethod::parse(&a.calibrator, &a.method, a.percentile)?;
    let (model, source) = match (&a.onnx, &a.export) {
        (Some(path), _) => {
            check_model_file(path)?;
            (onnx::read_model(path)?, path.clone())
        }
        (None, Some(spec)) => {
            let (_, model) = spec.build()?;
            (model, PathBuf::from(format!("{}.onnx", spec.model)))
        }
        (None, None) => bail!("give the float model with --onnx FILE or --model NAME"),
    };
    // Before any image is read: calibration is the slow part.
    check_quantizable(&model).with_context(|| source.display().to_string())?;
    let images: Vec<PathBuf> = collect_images(std::slice::from_ref(&a.calibrate))?
        .into_iter()
        .take(a.images)
        .collect();

    // Every tensor sharing a scale with a quantization point is measured: the group takes the
    // largest range any of them reaches.
    let tensors: Vec<String> = sharing_groups(&model).into_iter().flatten().collect();
    let bytes = onnx::encode_model(&model);
    let bar = progress(images.len() as u64, "calibrate");
    let amax = activation_ranges(
        &bytes,
        &source,
        &tensors,
        images.iter().map(|p| load_rgb(p)),
        method,
        |done| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    let amax = amax.context("calibration failed")?;

    let label = format!("ptq-{}", method.label());
    let policy = QuantizePolicy {
        method: label.clone(),
        ..QuantizePolicy::default()
    };
    let quantized = quantize_model_with(&model, &amax, &policy)
        .with_context(|| source.display().to_string())?;
    onnx::write_model(&quantized, &a.output)?;
    let summary = summarize(&quantized);
    // Each activation pair has one DequantizeLinear; the rest dequantize weights.
    let weights = summary.ops.get("DequantizeLinear").copied().unwrap_or(0) - summary.qdq_pairs;
    println!(
        "wrote {} ({} Q/DQ pairs, {weights} int8 per-channel convolution weights, {label} \
         calibration on {} image{} from {})",
        a.output.display(),
        summary.qdq_pairs,
        images.len(),
        if images.len() == 1 { "" } else { "s" },
        a.calibrate.display()
    );
    Ok(())
}
