//! `kestrel synth`: the synthetic shapes dataset.

use std::path::PathBuf;

use anyhow::Result;
use kestrel_runtime::synth::{SynthConfig, generate};

use crate::util::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder (must not already hold images/ or labels/).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Number of images (train + val).
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 640)]
    imgsz: u32,
    /// Fraction of the images in the val split.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f32,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = SynthConfig {
        images: a.images,
        width: a.imgsz,
        height: a.imgsz,
        seed: a.seed,
        val_fraction: a.val_fraction,
        ..SynthConfig::default()
    };
    let bar = progress(a.images as u64, "synth");
    let summary = generate(&cfg, &a.output, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {} train images ({} objects) and {} val images ({} objects); data file {}",
        summary.train_images,
        summary.train_objects,
        summary.val_images,
        summary.val_objects,
        summary.data_yaml.display()
    );
    Ok(())
}
