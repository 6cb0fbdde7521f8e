//! `kestrel bench`: engine latency and throughput, in the manner of trtexec.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kestrel_exporter::{onnx, summarize};
use kestrel_runtime::Detection;
use kestrel_runtime::engine::{BatchProfile, LayerTime, StageTimes};
use kestrel_runtime::frame::{Frame, PixelFormat, YuvMatrix};
use kestrel_runtime::nms::NmsConfig;
use serde::Serialize;

use crate::util::{EngineArgs, check_model_file, cpu_description, utc_now};

/// Layers listed by `--profile` after the per-kind summary.
const SLOWEST_LAYERS: usize = 15;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Batch sizes to measure, comma separated (e.g. 1,4).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Seconds of warm-up per batch size (at least one run).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds of measurement per batch size.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Fewest timed runs per batch size, whatever the duration.
    #[arg(long, default_value_t = 10)]
    min_iterations: usize,
    /// Print where device time goes, by layer kind (GPU backends).
    #[arg(long)]
    profile: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --end-to-end: size of the synthetic camera frames, WIDTHxHEIGHT pixels.
    #[arg(long, default_value = "1920x1080")]
    frame_size: String,
    /// With --end-to-end: pixel format of the synthetic camera frames.
    #[arg(long, value_enum, default_value_t = FrameFormat::Nv12)]
    frame_format: FrameFormat,
}

/// Camera frame layouts `--end-to-end` can start from.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FrameFormat {
    Rgb,
    Bgr,
    Rgba,
    Bgrx,
    Nv12,
    I420,
}

impl FrameFormat {
    fn pixel_format(self) -> PixelFormat {
        match self {
            Self::Rgb => PixelFormat::Rgb,
            Self::Bgr => PixelFormat::Bgr,
            Self::Rgba => PixelFormat::Rgba,
            Self::Bgrx => PixelFormat::Bgrx,
            Self::Nv12 => PixelFormat::Nv12,
            Self::I420 => PixelFormat::I420,
        }
    }
}

fn parse_frame_size(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((w, h)) if w >= 2 && h >= 2 && w <= 16384 && h <= 16384 => Ok((w, h)),
        _ => bail!(
            "--frame-size {s:?}: give the frame size as WIDTHxHEIGHT pixels, 2 to 16384 each, \
             e.g. 1920x1080"
        ),
    }
}

/// Planes of a synthetic frame (gradients, so the letterbox does real work), tightly pitched.
fn synthetic_planes(format: PixelFormat, w: usize, h: usize) -> ([Vec<u8>; 3], [usize; 3]) {
    let mut planes: [Vec<u8>; 3] = Default::default();
    let mut strides = [0; 3];
    for (i, (plane, stride)) in planes.iter_mut().zip(&mut strides).enumerate() {
        if i >= format.planes() {
            break;
        }
        *stride = format.row_bytes(i, w);
        *plane = (0..format.rows(i, h) * *stride)
            .map(|k| ((k % *stride) ^ (k / *stride) ^ (i * 85)) as u8)
            .collect();
    }
    (planes, strides)
}

/// Latency statistics in milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    min: f64,
    max: f64,
    mean: f64,
    median: f64,
    p90: f64,
    p95: f64,
    p99: f64,
}

#[derive(Debug, Serialize)]
struct BatchResult {
    batch: usize,
    iterations: usize,
    /// Time of one engine run (host input to host output), milliseconds.
    latency_ms: Latency,
    /// Device compute time of one run without transfers (GPU backends), milliseconds.
    compute_ms: Option<Latency>,
    /// Images per second from the median compute time (GPU backends).
    compute_images_per_s: Option<f64>,
    /// With `--end-to-end`: camera frames in host memory to detections on the host, by stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    end_to_end: Option<EndToEnd>,
    /// Model FLOPs per second of median compute time, in TFLOP/s (GPU backends).
    achieved_tflops: Option<f64>,
    /// Engine runs per second.
    throughput_qps: f64,
    /// Images per second (runs × batch).
    images_per_s: f64,
}

/// A batch from raw frames to detections, by stage (wall-clock milliseconds).
#[derive(Debug, Serialize)]
struct EndToEnd {
    /// Size and pixel format of the frames.
    frames: String,
    /// Frames to the engine's input: upload, colour conversion, letterbox.
    pre_ms: Latency,
    /// The engine run.
    infer_ms: Latency,
    /// Decode, NMS and the detections to the host.
    post_ms: Latency,
    /// The whole batch.
    total_ms: Latency,
    /// Images per second from the median total.
    images_per_s: f64,
    /// Images per second with two batches in flight (`start_frames`/`finish_frames`).
    pipelined_images_per_s: f64,
}

/// The value at quantile `q` (0–1) of sorted `v`, nearest rank.
fn percentile(v: &[f64], q: f64) -> f64 {
    let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

fn stats(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    Latency {
        min: ms[0],
        max: ms[n - 1],
        mean: ms.iter().sum::<f64>() / n as f64,
        median,
        p90: percentile(&ms, 0.90),
        p95: percentile(&ms, 0.95),
        p99: percentile(&ms, 0.99),
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1, e.g. --batch 1,4");
    }
    if !(a.duration > 0.0) || a.warmup < 0.0 {
        bail!("--duration must be positive and --warmup not negative (seconds)");
    }
    check_model_file(&a.engine.model)?;
    if a.engine.end_to_end && a.engine.backend != "cuda" {
        bail!("--end-to-end times the GPU decode and NMS: it needs --backend cuda");
    }
    let (fw, fh) = parse_frame_size(&a.frame_size)?;
    let max = *a.batch.iter().max().unwrap_or(&1);
    let min = *a.batch.iter().min().unwrap_or(&1);
    let options = a.engine.build_options(BatchProfile {
        min,
        opt: a.batch[0],
        max,
    })?;
    let built = Instant::now();
    let mut engine = a.engine.engine(&options)?;
    let build_s = built.elapsed().as_secs_f64();
    let info = engine.info().clone();
    // Parameters and FLOPs of the source model (an engine file embeds it).
    let summary = match onnx::read_model(&a.engine.model) {
        Ok(m) => Some(summarize(&m)),
        Err(_) => None,
    };
    println!(
        "model {} ({}), backend {}, precision {}, input {}x{}, built in {build_s:.2} s",
        a.engine.model.display(),
        info.model_name,
        info.backend,
        info.precision,
        info.input_hw[0],
        info.input_hw[1]
    );
    let mut results = Vec::new();
    for &batch in &a.batch {
        // Mid-grey input: the timing of these graphs does not depend on the pixel values.
        let input = vec![0.5f32; batch * info.input_len()];
        let warm_until = Instant::now() + Duration::from_secs_f64(a.warmup);
        loop {
            engine.run(&input, batch).context("warm-up run failed")?;
            if Instant::now() >= warm_until {
                break;
            }
        }
        let mut ms = Vec::new();
        let start = Instant::now();
        let deadline = Duration::from_secs_f64(a.duration);
        while ms.len() < a.min_iterations || start.elapsed() < deadline {
            let t = Instant::now();
            engine.run(&input, batch)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let wall = start.elapsed().as_secs_f64();
        let iterations = ms.len();
        let latency = stats(ms);
        // Device compute alone (no transfers), where the backend has a device.
        let compute = engine
            .time_compute(batch, iterations.max(a.min_iterations))?
            .map(stats);
        // Achieved rate: the model's FLOPs (2 x MACs of its convolutions) per second of compute.
        let flops_per_image = summary.as_ref().and_then(|s| s.flops);
        let achieved_tflops = match (&compute, flops_per_image) {
            (Some(c), Some(f)) => Some(f * batch as f64 / (c.median * 1e-3) / 1e12),
            _ => None,
        };
        if let Some(c) = &compute {
            println!(
                "batch {batch:>3}: GPU compute (no transfers) min {:.3} ms, mean {:.3} ms, median {:.3} ms, p99 {:.3} ms | {:.1} images/s{}",
                c.min,
                c.mean,
                c.median,
                c.p99,
                batch as f64 * 1e3 / c.median,
                achieved_tflops
                    .map(|t| format!(", {t:.1} TFLOP/s achieved"))
                    .unwrap_or_default()
            );
        }
        let qps = iterations as f64 / wall;
        println!(
            "batch {batch:>3}: {iterations} runs | latency min {:.2} ms, mean {:.2} ms, median {:.2} ms, p99 {:.2} ms, max {:.2} ms | throughput {:.2} qps, {:.2} images/s",
            latency.min,
            latency.mean,
            latency.median,
            latency.p99,
            latency.max,
            qps,
            qps * batch as f64
        );
        if a.profile {
            if let Some(layers) = engine.profile_layers(batch)? {
                let total: f64 = layers.iter().map(|l| l.ms).sum();
                let mut by_kind: Vec<(String, f64, usize)> = Vec::new();
                for l in &layers {
                    match by_kind.iter_mut().find(|(k, _, _)| *k == l.kind) {
                        Some(e) => {
                            e.1 += l.ms;
                            e.2 += 1;
                        }
                        None => by_kind.push((l.kind.clone(), l.ms, 1)),
                    }
                }
                by_kind.sort_by(|a, b| b.1.total_cmp(&a.1));
                let timing = if layers.iter().all(|l| l.in_graph) {
                    "each layer timed as a CUDA graph of its launches"
                } else {
                    "some layers by eager launches"
                };
                println!("batch {batch:>3}: layer profile ({timing}, {total:.3} ms in all):");
                for (kind, ms, n) in by_kind {
                    println!(
                        "    {kind:<36} {n:>4} x  {ms:>8.3} ms  {:>5.1} %",
                        100.0 * ms / total
                    );
                }
                let mut slowest: Vec<&LayerTime> = layers.iter().collect();
                slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
                println!("batch {batch:>3}: slowest layers (achieved rate where counted):");
                for l in slowest.iter().take(SLOWEST_LAYERS) {
                    let rate = if l.ops > 0.0 && l.ms > 0.0 {
                        format!("{:>7.1} T(FL)OP/s", l.ops / (l.ms * 1e-3) / 1e12)
                    } else {
                        String::new()
                    };
                    println!("    {:>8.3} ms  {:<16} {rate}  {}", l.ms, l.kind, l.layer);
                }
            }
        }
        let end_to_end = if a.engine.end_to_end {
            let format = a.frame_format.pixel_format();
            let (planes, strides) = synthetic_planes(format, fw, fh);
            let frame = Frame {
                format,
                width: fw,
                height: fh,
                planes: [&planes[0], &planes[1], &planes[2]],
                strides,
                yuv: YuvMatrix::BT709,
            };
            let frames = vec![frame; batch];
            let cfg = NmsConfig::display();
            let (mut dets, mut placements) = (Vec::new(), Vec::new());
            let mut run = |dets: &mut Vec<Vec<Detection>>| -> Result<StageTimes> {
                if !engine.detect_frames(&frames, &cfg, &mut placements, dets)? {
                    bail!(
                        "the {} backend has no GPU pre- and post-processing",
                        info.backend
                    );
                }
                engine
                    .last_stage_times()
                    .context("the engine did not report its stage times")
            };
            run(&mut dets).context("end-to-end warm-up failed")?;
            let (mut total, mut pre, mut infer, mut post) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let start = Instant::now();
            while total.len() < a.min_iterations || start.elapsed() < deadline {
                let t = Instant::now();
                let stages = run(&mut dets)?;
                total.push(t.elapsed().as_secs_f64() * 1e3);
                pre.push(stages.pre_ms);
                infer.push(stages.infer_ms);
                post.push(stages.post_ms);
            }
            // Pipelined: two batches in flight, the next one's upload, letterbox and engine
            // overlapping the previous one's post-processing.
            let mut pipelined = 0usize;
            let start = Instant::now();
            if !engine.start_frames(&frames, &cfg)? {
                bail!(
                    "the {} backend has no pipelined frames-to-detections",
                    info.backend
                );
            }
            while pipelined < a.min_iterations || start.elapsed() < deadline {
                engine.start_frames(&frames, &cfg)?;
                if !engine.finish_frames(&mut placements, &mut dets)? {
                    bail!("the engine lost a batch in flight");
                }
                pipelined += 1;
            }
            if !engine.finish_frames(&mut placements, &mut dets)? {
                bail!("the engine lost a batch in flight");
            }
            let pipelined_images_per_s =
                (pipelined + 1) as f64 * batch as f64 / start.elapsed().as_secs_f64();
            let per_s = |l: &Latency| batch as f64 * 1e3 / l.median;
            let total_ms = stats(total);
            let e2e = EndToEnd {
                pipelined_images_per_s,
                frames: format!("{fw}x{fh} {:?}", a.frame_format).to_lowercase(),
                pre_ms: stats(pre),
                infer_ms: stats(infer),
                post_ms: stats(post),
                images_per_s: per_s(&total_ms),
                total_ms,
            };
            println!(
                "batch {batch:>3}: end to end from {} frames (GPU letterbox, engine, GPU decode/NMS at display thresholds, detections on the host): median {:.2} ms = pre {:.2} + infer {:.2} + post {:.2} | {:.2} images/s (pre alone {:.0}, infer alone {:.0}, post alone {:.0} images/s) | pipelined, two batches in flight: {:.2} images/s",
                e2e.frames,
                e2e.total_ms.median,
                e2e.pre_ms.median,
                e2e.infer_ms.median,
                e2e.post_ms.median,
                e2e.images_per_s,
                per_s(&e2e.pre_ms),
                per_s(&e2e.infer_ms),
                per_s(&e2e.post_ms),
                e2e.pipelined_images_per_s,
            );
            Some(e2e)
        } else {
            None
        };
        results.push(BatchResult {
            batch,
            iterations,
            end_to_end,
            compute_images_per_s: compute.as_ref().map(|c| batch as f64 * 1e3 / c.median),
            achieved_tflops,
            compute_ms: compute,
            latency_ms: latency,
            throughput_qps: qps,
            images_per_s: qps * batch as f64,
        });
    }
    if let Some(path) = &a.json {
        let (cpu, cores) = cpu_description();
        let record = serde_json::json!({
            "tool": "kestrel bench",
            "version": env!("CARGO_PKG_VERSION"),
            "date": utc_now(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "machine": { "cpu": cpu, "cores": cores, "gpu": engine.device_name() },
            "model": {
                "path": a.engine.model.display().to_string(),
                "name": info.model_name,
                "input": info.input_hw,
                "params": summary.as_ref().map(|s| s.params),
                "gflops": summary.as_ref().and_then(|s| s.flops).map(|f| f / 1e9),
            },
            "backend": info.backend.name(),
            "precision": info.precision.name(),
            "build_s": build_s,
            "timing": "wall-clock time of Engine::run (input and output on the host), after warm-up",
            "results": results,
        });
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&record)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let s = stats((1..=100).map(f64::from).collect());
        assert_eq!((s.min, s.max, s.median, s.p99), (1.0, 100.0, 50.5, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }
}
