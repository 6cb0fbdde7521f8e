//! `kestrel inspect`: what a model file is.

use std::path::PathBuf;

use anyhow::Result;
use kestrel_exporter::{onnx, summarize};

use crate::util::check_model_file;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX file.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    check_model_file(&a.model)?;
    let model = onnx::read_model(&a.model)?;
    let summary = summarize(&model);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("model:       {}", a.model.display());
        print!("{summary}");
    }
    Ok(())
}
