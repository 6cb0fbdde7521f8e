//! `kestrel soak`: bounded soak runs that prove memory stays flat under long load. Each run
//! samples resident memory (and, on a GPU, device memory) once a sample interval, ignores a
//! warm-up, and fails when memory grew after it by more than a bound, or when anything failed that
//! was not an expected failure. It writes `soak.json` (samples, counts, verdict) and `soak.png`
//! (memory over time) into the output folder.
//!
//! - `kestrel soak serve`: `kestrel serve` on loopback under a mix of valid and invalid requests,
//!   with a second model loaded and unloaded during the load.
//! - `kestrel soak engine`: an engine running batches in a loop (cpu or cuda).
//! - `kestrel soak pipeline`: the GStreamer element on a long synthetic stream with caps changes
//!   and flushes.

mod engine;
#[cfg(feature = "gstreamer")]
mod pipeline;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, clap::Subcommand)]
enum Target {
    /// `kestrel serve` on loopback: valid and invalid requests from several clients, a second
    /// model loaded and unloaded during the load; the server's resident memory sampled.
    Serve(serve::Args),
    /// An engine (cpu or cuda) running batches of synthetic scenes in a loop; resident memory
    /// and, on a GPU, device memory sampled.
    Engine(engine::Args),
    /// kestrelinfer on a long synthetic stream with caps changes and flushes; resident memory
    /// sampled.
    #[cfg(feature = "gstreamer")]
    Pipeline(pipeline::Args),
}

pub fn run(a: Args) -> Result<()> {
    match a.target {
        Target::Serve(a) => serve::run(a),
        Target::Engine(a) => engine::run(a),
        #[cfg(feature = "gstreamer")]
        Target::Pipeline(a) => pipeline::run(a),
    }
}

/// What every soak run takes.
#[derive(Debug, Clone, clap::Args)]
struct Common {
    /// Seconds to run at most (the run also ends at its own count: --requests, --frames,
    /// --batches).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Seconds at the start left out of the growth check (allocator pools, caches and lazily
    /// built state settle there).
    #[arg(long, default_value_t = 30)]
    warmup_s: u64,
    /// Largest growth of resident memory after the warm-up, in MB (10^6 bytes): the median of
    /// the last tenth of the samples minus the median of the first tenth after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    max_growth_mb: f64,
    /// Milliseconds between memory samples.
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
    /// Output folder for soak.json and soak.png.
    #[arg(long, short = 'o', default_value = "soak")]
    out: PathBuf,
}

impl Common {
    fn check(&self) -> Result<()> {
        if self.seconds == 0 || self.sample_ms == 0 {
            bail!("--seconds and --sample-ms must be at least 1");
        }
        if self.warmup_s >= self.seconds {
            bail!(
                "--warmup-s {} leaves nothing to check in a {} s run; make it shorter than \
                 --seconds",
                self.warmup_s,
                self.seconds
            );
        }
        if self.max_growth_mb.is_nan() || self.max_growth_mb < 0.0 {
            bail!("--max-growth-mb must be 0 or more");
        }
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating the output folder {}", self.out.display()))?;
        Ok(())
    }
}

/// One memory sample.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    /// Seconds since the run started.
    t_s: f64,
    /// Resident memory of the process under test, MB (10^6 bytes).
    rss_mb: f64,
    /// GPU memory in use (every process on the GPU), MB; absent off the GPU.
    device_mb: Option<f64>,
}

/// Resident memory of process `pid` in MB, from /proc (Linux).
fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (the soak runs on Linux)"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024.0 / 1e6)
}

/// Samples memory on its own thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Sample>>>>,
}

impl Sampler {
    /// Sample process `pid` every `every`; `device` reads the GPU's memory in use (bytes).
    fn start(
        pid: u32,
        every: Duration,
        device: Option<Box<dyn Fn() -> Result<u64> + Send>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut next = start;
            while !flag.load(Ordering::Relaxed) {
                let device_mb = match &device {
                    Some(read) => Some(read()? as f64 / 1e6),
                    None => None,
                };
                samples.push(Sample {
                    t_s: start.elapsed().as_secs_f64(),
                    rss_mb: rss_mb(pid)?,
                    device_mb,
                });
                next += every;
                // Short sleeps, so that stopping does not wait a whole interval.
                while !flag.load(Ordering::Relaxed) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20).min(every));
                }
            }
            Ok(samples)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(samples)) => samples,
            _ => bail!("the memory sampler stopped unexpectedly"),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Growth of one memory series after the warm-up.
#[derive(Debug, Clone, Serialize)]
struct Growth {
    /// Median of the first tenth of the samples after the warm-up, MB.
    start_mb: f64,
    /// Median of the last tenth of the samples, MB.
    end_mb: f64,
    /// `end_mb - start_mb`.
    growth_mb: f64,
    /// Largest sample after the warm-up, MB.
    peak_mb: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The growth of `series` over the samples taken after `warmup_s`; `None` with fewer than 2.
fn growth(samples: &[Sample], warmup_s: f64, series: fn(&Sample) -> Option<f64>) -> Option<Growth> {
    let after: Vec<f64> = samples
        .iter()
        .filter(|s| s.t_s >= warmup_s)
        .filter_map(series)
        .collect();
    if after.len() < 2 {
        return None;
    }
    let tenth = (after.len() / 10).max(1);
    let start_mb = median(&mut after[..tenth].to_vec());
    let end_mb = median(&mut after[after.len() - tenth..].to_vec());
    Some(Growth {
        start_mb,
        end_mb,
        growth_mb: end_mb - start_mb,
        peak_mb: after.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// A finished run: the figures, the verdict, the files.
#[derive(Debug, Serialize)]
struct Report<C: Serialize> {
    /// serve, engine or pipeline.
    target: &'static str,
    date: String,
    command: String,
    host_cpu: String,
    device: String,
    seconds: f64,
    warmup_s: u64,
    max_growth_mb: f64,
    /// What the run did: requests or frames by kind, and the failures.
    counts: C,
    rss: Option<Growth>,
    device_memory: Option<Growth>,
    /// Problems found; empty when the run passed.
    failures: Vec<String>,
    passed: bool,
    samples: Vec<Sample>,
}

/// Judge `samples` (growth bounds), write soak.json and soak.png, print the summary; an error
/// when the run failed. `failures` holds what the run itself found (unexpected errors).
fn finish<C: Serialize>(
    target: &'static str,
    common: &Common,
    device: String,
    elapsed: Duration,
    counts: C,
    mut failures: Vec<String>,
    samples: Vec<Sample>,
) -> Result<()> {
    let warmup = common.warmup_s as f64;
    let rss = growth(&samples, warmup, |s| Some(s.rss_mb));
    let device_memory = growth(&samples, warmup, |s| s.device_mb);
    match &rss {
        Some(g) if g.growth_mb > common.max_growth_mb => failures.push(format!(
            "resident memory grew {:.1} MB after the warm-up ({:.1} → {:.1} MB); the bound is \
             {} MB",
            g.growth_mb, g.start_mb, g.end_mb, common.max_growth_mb
        )),
        Some(_) => {}
        None => failures.push(format!(
            "fewer than 2 memory samples after the {} s warm-up: run longer (--seconds) or \
             sample more often (--sample-ms)",
            common.warmup_s
        )),
    }
    // Device memory is held to the same bound (an engine allocates everything up front).
    if let Some(g) = &device_memory
        && g.growth_mb.abs() > common.max_growth_mb
    {
        failures.push(format!(
            "GPU memory changed by {:.1} MB after the warm-up ({:.1} → {:.1} MB); the bound is \
             {} MB",
            g.growth_mb, g.start_mb, g.end_mb, common.max_growth_mb
        ));
    }
    let report = Report {
        target,
        date: crate::util::utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host_cpu: crate::util::cpu_description().0,
        device,
        seconds: elapsed.as_secs_f64(),
        warmup_s: common.warmup_s,
        max_growth_mb: common.max_growth_mb,
        counts,
        rss,
        device_memory,
        passed: failures.is_empty(),
        failures,
        samples,
    };
    let json_path = common.out.join("soak.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = common.out.join("soak.png");
    plot(&png_path, &report)?;
    println!(
        "soak {target}: {:.0} s, {} samples",
        report.seconds,
        report.samples.len()
    );
    for (what, g) in [("resident", &report.rss), ("GPU", &report.device_memory)] {
        if let Some(g) = g {
            println!(
                "  {what} memory after the warm-up: {:.1} → {:.1} MB ({:+.2} MB, peak {:.1} MB)",
                g.start_mb, g.end_mb, g.growth_mb, g.peak_mb
            );
        }
    }
    println!("  wrote {} and {}", json_path.display(), png_path.display());
    if report.passed {
        println!("  passed (bound {} MB)", common.max_growth_mb);
        Ok(())
    } else {
        bail!("soak {target} failed:\n  {}", report.failures.join("\n  "))
    }
}

/// Memory over time as a PNG: resident memory, and GPU memory where sampled.
fn plot<C: Serialize>(path: &Path, r: &Report<C>) -> Result<()> {
    use kestrel_runtime::plot::{Series, curves_labelled};
    let rss: Vec<f64> = r.samples.iter().map(|s| s.rss_mb).collect();
    let device: Vec<f64> = r
        .samples
        .iter()
        .map(|s| s.device_mb.unwrap_or(f64::NAN))
        .collect();
    let mut series = vec![Series {
        name: "resident MB",
        values: &rss,
        colour: [38, 139, 210],
    }];
    if r.samples.iter().any(|s| s.device_mb.is_some()) {
        series.push(Series {
            name: "GPU MB",
            values: &device,
            colour: [133, 153, 0],
        });
    }
    curves_labelled(
        path,
        &format!("soak {}: memory", r.target),
        &series,
        &format!("{:.0} s", r.seconds),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> Vec<Sample> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| Sample {
                t_s: i as f64,
                rss_mb: v,
                device_mb: None,
            })
            .collect()
    }

    #[test]
    fn growth_compares_the_first_and_last_tenth_after_the_warm_up() {
        // Warm-up spike (ignored), a flat run with one spike, then a steady climb.
        let mut v = vec![500.0; 10];
        v.extend(std::iter::repeat_n(100.0, 50));
        v[30] = 400.0;
        v.extend((0..50).map(|i| 100.0 + f64::from(i)));
        let g = growth(&samples(&v), 10.0, |s| Some(s.rss_mb)).expect("growth");
        assert_eq!(g.start_mb, 100.0);
        // Last 10 of 100 samples after the warm-up: 140..149, median 145.
        assert_eq!(g.end_mb, 145.0);
        assert_eq!(g.growth_mb, 45.0);
        assert_eq!(g.peak_mb, 400.0);
        let flat = growth(&samples(&[1.0; 5]), 10.0, |s| Some(s.rss_mb));
        assert!(flat.is_none(), "no samples after the warm-up");
    }
}
