//! `kestrel soak engine`: an engine running detection batches of synthetic scenes in a loop, with
//! resident memory and (cuda) device memory sampled.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kestrel_runtime::engine::{Backend, BatchProfile};
use kestrel_runtime::nms::NmsConfig;
use serde::Serialize;

use super::{Common, Sampler, finish};
use crate::util::EngineArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    common: Common,
    /// Stop after this many batches (the run also stops at --seconds).
    #[arg(long)]
    batches: Option<u64>,
    /// Images per batch; the run cycles through batches of 1 to this size, so every batch
    /// bucket of the engine is used.
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    batches: u64,
    images: u64,
    detections: u64,
}

pub fn run(a: Args) -> Result<()> {
    a.common.check()?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let options = a.engine.build_options(BatchProfile {
        min: 1,
        opt: a.batch,
        max: a.batch,
    })?;
    let engine = a.engine.engine(&options)?;
    let info = engine.info();
    let [h, w] = info.input_hw;
    let backend = info.backend;
    let device = engine
        .device_name()
        .unwrap_or_else(|| format!("{backend} backend"));
    let mut detector = kestrel_runtime::Detector::new(engine);
    detector.set_device_postprocessing(a.engine.end_to_end);
    // Scenes of three sizes, so the letterbox pads differently from batch to batch.
    let sizes = [
        (w as u32, h as u32),
        (w as u32 * 3 / 2, h as u32),
        (w as u32 / 2, h as u32 * 2),
    ];
    let scenes: Vec<image::RgbImage> = (0..a.batch * sizes.len())
        .map(|i| {
            let (sw, sh) = sizes[i % sizes.len()];
            kestrel_runtime::synth::render_scene(kestrel_runtime::synth::image_seed(91, i), sw, sh)
                .0
        })
        .collect();
    let gpu = a.engine.gpu;
    let device_memory: Option<Box<dyn Fn() -> Result<u64> + Send>> = match backend {
        Backend::Cpu => None,
        _ => Some(Box::new(move || {
            Ok(kestrel_runtime::cuda::memory_info(gpu)?.0)
        })),
    };
    let sampler = Sampler::start(
        std::process::id(),
        Duration::from_millis(a.common.sample_ms),
        device_memory,
    );
    let cfg = NmsConfig::display();
    let (start, limit) = (Instant::now(), Duration::from_secs(a.common.seconds));
    let mut counts = Counts::default();
    let mut out = Vec::new();
    let progress = crate::util::progress(a.common.seconds, "seconds");
    let mut failures = Vec::new();
    while start.elapsed() < limit && a.batches.is_none_or(|n| counts.batches < n) {
        let n = (counts.batches as usize % a.batch) + 1;
        let first = (counts.batches as usize * a.batch) % scenes.len();
        let batch: Vec<&image::RgbImage> = (0..n)
            .map(|k| &scenes[(first + k) % scenes.len()])
            .collect();
        if let Err(e) = detector.detect(&batch, &cfg, &mut out) {
            failures.push(format!("batch {} of {n} images: {e}", counts.batches));
            break;
        }
        counts.batches += 1;
        counts.images += n as u64;
        counts.detections += out.iter().map(|d| d.len() as u64).sum::<u64>();
        progress.set_position(start.elapsed().as_secs());
    }
    progress.finish_and_clear();
    let samples = sampler.finish()?;
    finish(
        "engine",
        &a.common,
        device,
        start.elapsed(),
        counts,
        failures,
        samples,
    )
}
