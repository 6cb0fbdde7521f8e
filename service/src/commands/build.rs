//! `kestrel build`: an engine file for a backend, precision and batch profile.

use std::path::PathBuf;

use anyhow::Result;
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine_file};

use crate::util::check_model_file;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX model.
    #[arg(long)]
    onnx: PathBuf,
    /// Backend: cpu, cuda or tensorrt (builds with `--features tensorrt`).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// Precision: fp32, fp16, int8 (a Q/DQ model) or best (cuda).
    #[arg(long, default_value = "fp16")]
    precision: String,
    /// Batch profile MIN:OPT:MAX (or N for 1:N:N).
    #[arg(long, default_value = "1:8:32")]
    batch: String,
    /// GPU to build on (CUDA device number, 0 = the first): its kind is recorded in the file.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Output engine file.
    #[arg(long, short = 'o')]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    check_model_file(&a.onnx)?;
    let profile: BatchProfile = a.batch.parse()?;
    let options = BuildOptions {
        backend: a.backend.parse()?,
        precision: a.precision.parse()?,
        profile,
        device: a.gpu,
    };
    let header = build_engine_file(&a.onnx, &options, &a.output)?;
    println!(
        "wrote {} ({} backend, {}, batch {}, device {}, ONNX sha256 {})",
        a.output.display(),
        header.backend,
        header.precision,
        profile,
        header.device,
        &header.onnx_sha256[..16]
    );
    Ok(())
}
