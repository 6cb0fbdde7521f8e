//! `kestrel inspect`: what a model file is, which of its convolutions are quantized, where its
//! Q/DQ scales break the sharing rules, and a picture of it coloured by precision.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kestrel_exporter::graph_view::{graph_svg, qdq_report};
use kestrel_exporter::{onnx, summarize};

use crate::util::check_model_file;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX file.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also report the quantization: INT8 and float convolutions, scale groups, and the
    /// operators whose inputs and output do not share one scale (requantizations in an engine).
    #[arg(long)]
    qdq: bool,
    /// Draw the convolutions layer by layer, coloured by precision, to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    check_model_file(&a.model)?;
    let model = onnx::read_model(&a.model)?;
    let summary = summarize(&model);
    let report = a.qdq.then(|| qdq_report(&model));
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Some(r) = &report {
            v["quantization"] = serde_json::to_value(r)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model:       {}", a.model.display());
        print!("{summary}");
        if let Some(r) = &report {
            println!(
                "convolutions: {} INT8, {} float ({} at a precision boundary)",
                r.int8_convs,
                r.float_convs,
                r.convs.iter().filter(|c| c.precision_boundary).count()
            );
            println!(
                "activation scales: {} distinct over {} quantized tensors",
                r.scale_groups.len(),
                r.scale_groups
                    .iter()
                    .map(|g| g.tensors.len())
                    .sum::<usize>()
            );
            if r.sharing_breaks.is_empty() {
                println!(
                    "scale sharing: every concat, add, pool, resize and split keeps one scale"
                );
            }
            for b in &r.sharing_breaks {
                let scales: Vec<String> = b
                    .scales
                    .iter()
                    .map(|(t, s)| format!("{t} {s:.3e}"))
                    .collect();
                println!(
                    "scale sharing broken at {} ({}): {}",
                    b.node,
                    b.op,
                    scales.join(", ")
                );
            }
        }
    }
    if let Some(path) = &a.svg {
        let title = format!(
            "{} ({})",
            a.model.display(),
            model.metadata("model").unwrap_or("model")
        );
        std::fs::write(path, graph_svg(&model, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        if !a.json {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
