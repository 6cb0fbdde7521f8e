//! Helpers shared by the subcommands.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kestrel_runtime::Detector;
use kestrel_runtime::dataset::IMAGE_EXTENSIONS;
use kestrel_runtime::engine::{
    Backend, BatchProfile, BuildOptions, Engine, EngineSource, Precision, open_engine,
};
use kestrel_runtime::engine_file::{CacheOutcome, EngineCache};

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{what} {{bar:40.cyan/blue}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
    )) {
        bar.set_style(style);
    }
    bar
}

/// Whether a path has an image extension Kestrel reads.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files named by `inputs`: files as given, folders searched recursively, sorted.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = out.len();
            walk(input, &mut out, 0)?;
            if out.len() == before {
                bail!(
                    "{}: no images in this folder (looked for {})",
                    input.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > 16 {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out, depth + 1)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Engine options shared by infer, val and bench.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// The model: an ONNX file (from `kestrel export`).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Backend to run on: cpu, cuda or tensorrt (builds with `--features tensorrt`).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Precision: fp32 (cpu, cuda) or fp16 (cuda).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// GPU to run on (CUDA device number, 0 = the first), for the cuda and tensorrt backends.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Build GPU engines from the ONNX every time instead of using the engine cache
    /// ($KESTREL_CACHE_DIR, default ~/.cache/kestrel/engines).
    #[arg(long)]
    pub no_cache: bool,
    /// Letterbox, decode and NMS on the GPU (the cuda backend's end-to-end path); the CPU does
    /// them otherwise.
    #[arg(long)]
    pub end_to_end: bool,
}

impl EngineArgs {
    /// Build a detector with batches of up to `max_batch` images.
    pub fn detector(&self, max_batch: usize) -> Result<Detector> {
        let options = self.build_options(BatchProfile {
            min: 1,
            opt: max_batch,
            max: max_batch,
        })?;
        if self.end_to_end && options.backend != Backend::Cuda {
            bail!(
                "--end-to-end decodes and runs NMS on the GPU: it needs --backend cuda (this is {})",
                options.backend
            );
        }
        let mut detector = Detector::new(self.engine(&options)?);
        detector.set_device_postprocessing(self.end_to_end);
        Ok(detector)
    }

    /// Open the model (ONNX or engine file) as an engine; GPU engines go through the engine cache.
    pub fn engine(&self, options: &BuildOptions) -> Result<Box<dyn Engine>> {
        check_model_file(&self.model)?;
        let cache =
            (options.backend != Backend::Cpu && !self.no_cache).then(EngineCache::default_location);
        let (engine, source) = open_engine(&self.model, options, cache.as_ref())?;
        match source {
            EngineSource::Onnx | EngineSource::EngineFile => {}
            EngineSource::RebuiltFromEngineFile { reason } => {
                eprintln!(
                    "note: {} was rebuilt from its embedded model: {reason}",
                    self.model.display()
                )
            }
            EngineSource::Cache(CacheOutcome::Hit) => {
                let dir = cache
                    .map(|c| c.dir.display().to_string())
                    .unwrap_or_default();
                eprintln!("note: engine from the cache ({dir})")
            }
            EngineSource::Cache(CacheOutcome::Built { reason }) => {
                eprintln!("note: engine built and cached ({reason})")
            }
        }
        Ok(engine)
    }

    pub fn build_options(&self, profile: BatchProfile) -> Result<BuildOptions> {
        let backend: Backend = self.backend.parse()?;
        let precision: Precision = self.precision.parse()?;
        Ok(BuildOptions {
            backend,
            precision,
            profile,
            device: self.gpu,
        })
    }
}

/// A friendly error for a model path that is missing or is not a file.
pub fn check_model_file(path: &Path) -> Result<()> {
    if !path.exists() {
        bail!(
            "{}: model file not found; export one with `kestrel export --model gelan-t -o {}`",
            path.display(),
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{}: is a folder; give the ONNX file", path.display());
    }
    Ok(())
}

/// Today's date and time in UTC, ISO 8601 (for benchmark records).
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The CPU's model name and the number of cores, for benchmark records.
pub fn cpu_description() -> (String, usize) {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (name, cores)
}
