//! `kestrel inspect`: what a model or engine file is, which of its convolutions are quantized,
//! where its Q/DQ scales break the sharing rules, and a picture of it coloured by precision; for
//! an engine on a GPU, where its time goes layer by layer (`--profile`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use kestrel_exporter::graph_view::{TimedLayer, graph_svg, profile_svg, qdq_report};
use kestrel_exporter::{onnx, summarize};
use kestrel_runtime::cuda::layers::{LayerRow, engine_layers};
use kestrel_runtime::engine::{BuildOptions, Precision, open_engine};
use kestrel_runtime::engine_file::{EngineFile, is_engine_file};

use crate::util::check_model_file;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX file, or an engine file from `kestrel build`.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also report the quantization: INT8 and float convolutions, scale groups, and the
    /// operators whose inputs and output do not share one scale (requantizations in an engine).
    #[arg(long)]
    qdq: bool,
    /// Draw the convolutions layer by layer, coloured by precision, to this SVG file; with
    /// --profile, the engine's layers sized by their time.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Engine files on a GPU backend: time every layer of a batch (inside a CUDA graph replay) and compare
    /// the sum with the engine's measured latency.
    #[arg(long)]
    profile: bool,
    /// The batch --profile times.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// List the layers of a cuda engine (no GPU needed): each step's fused ONNX nodes, precision
    /// in and out, output shape per batch bucket, and for engine files the algorithm it ran with
    /// per bucket. For an ONNX file, the engine `kestrel build --backend cuda --precision P
    /// --batch 1:N:N` would make, with --layers-precision and --batch as N.
    #[arg(long)]
    layers: bool,
    /// The precision --layers assumes for an ONNX file: fp32, fp16, int8 or best.
    #[arg(long, default_value = "best")]
    layers_precision: String,
}

/// The rows `--layers` lists: for an engine file its own options and recorded choices.
fn layer_rows(
    a: &Args,
    model: &onnx::pb::ModelProto,
    engine_file: Option<&EngineFile>,
) -> Result<(Vec<LayerRow>, Precision, Vec<usize>)> {
    let (precision, buckets, choices) = match engine_file {
        Some(f) => {
            let h = &f.header;
            if h.backend != "cuda" {
                anyhow::bail!(
                    "--layers lists cuda engines; this is a {} engine ({})",
                    h.backend,
                    if h.backend == "cpu" {
                        "tract runs the ONNX graph as it is: see the summary"
                    } else {
                        "a TensorRT plan's layers need TensorRT's engine inspector, which does not \
                         run here"
                    }
                );
            }
            let precision: Precision = h.precision.parse()?;
            let buckets = kestrel_runtime::cuda::batch_buckets(h.profile[0], h.profile[2]);
            (precision, buckets, h.layer_choices.clone())
        }
        None => {
            let precision: Precision = a.layers_precision.parse()?;
            if a.batch == 0 {
                anyhow::bail!("--batch must be at least 1");
            }
            let buckets = kestrel_runtime::cuda::batch_buckets(1, a.batch);
            (precision, buckets, serde_json::Value::Null)
        }
    };
    let rows = engine_layers(model, precision, &buckets, &choices).with_context(|| {
        format!(
            "lowering {} for the cuda backend (the model must be one `kestrel build --backend \
             cuda` takes)",
            a.model.display()
        )
    })?;
    Ok((rows, precision, buckets))
}

/// An engine file's header, as `--json` prints it.
fn header_json(file: &EngineFile) -> serde_json::Value {
    let h = &file.header;
    serde_json::json!({
        "format_version": h.format_version,
        "kestrel_version": h.kestrel_version,
        "backend": h.backend,
        "backend_versions": h.backend_versions,
        "device": h.device,
        "compute_capability": h.compute_capability,
        "precision": h.precision,
        "profile": h.profile,
        "onnx_sha256": h.onnx_sha256,
        "plan_bytes": file.plan.len(),
        "layer_choices": h.layer_choices,
    })
}

pub fn run(a: Args) -> Result<()> {
    check_model_file(&a.model)?;
    let bytes =
        std::fs::read(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    let engine_file = if is_engine_file(&bytes) {
        Some(EngineFile::decode(&bytes, &a.model)?)
    } else {
        None
    };
    if a.profile && engine_file.is_none() {
        anyhow::bail!(
            "--profile times an engine: build one first with `kestrel build --onnx {} --backend \
             cuda -o model.engine`",
            a.model.display()
        );
    }
    let model = match &engine_file {
        Some(f) => onnx::decode_model(&f.onnx, &a.model)?,
        None => onnx::decode_model(&bytes, &a.model)?,
    };
    let summary = summarize(&model);
    let profile = if a.profile { Some(profile(&a)?) } else { None };
    let report = a.qdq.then(|| qdq_report(&model));
    let layers = if a.layers {
        Some(layer_rows(&a, &model, engine_file.as_ref())?)
    } else {
        None
    };
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Some(r) = &report {
            v["quantization"] = serde_json::to_value(r)?;
        }
        if let Some(f) = &engine_file {
            v["engine"] = header_json(f);
        }
        if let Some((rows, precision, buckets)) = &layers {
            v["layers"] = serde_json::json!({
                "precision": precision.to_string(),
                "buckets": buckets,
                "rows": rows,
            });
        }
        if let Some((layers, measured, in_graph)) = &profile {
            v["profile"] = serde_json::json!({
                "timing": timing_mode(*in_graph),
                "batch": a.batch,
                "layers": layers.iter().map(|l| serde_json::json!({
                    "kind": l.kind, "layer": l.name, "ms": l.ms})).collect::<Vec<_>>(),
                "sum_ms": layers.iter().map(|l| l.ms).sum::<f64>(),
                "measured_ms": measured,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model:       {}", a.model.display());
        if let Some(f) = &engine_file {
            let h = &f.header;
            println!(
                "engine:      {} backend, {} on {}{}, batch {}:{}:{}, built by kestrel {}",
                h.backend,
                h.precision,
                h.device,
                h.compute_capability
                    .map(|(a, b)| format!(" (compute capability {a}.{b})"))
                    .unwrap_or_default(),
                h.profile[0],
                h.profile[1],
                h.profile[2],
                h.kestrel_version
            );
            for (lib, version) in &h.backend_versions {
                println!("             {lib} {version}");
            }
            println!("             source ONNX sha256 {}", h.onnx_sha256);
        }
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
    if let (Some((rows, precision, buckets)), false) = (&layers, a.json) {
        print_layers(rows, *precision, buckets);
    }
    if let (Some((layers, measured, in_graph)), false) = (&profile, a.json) {
        let sum: f64 = layers.iter().map(|l| l.ms).sum();
        println!(
            "batch {}: {} layers, {sum:.3} ms in all ({})",
            a.batch,
            layers.len(),
            timing_mode(*in_graph)
        );
        for l in layers {
            println!("    {:>8.4} ms  {:<32} {}", l.ms, l.kind, l.name);
        }
        if let Some(m) = measured {
            println!(
                "measured latency {m:.3} ms (CUDA graph, median): the layers sum to {:.1} % of it",
                100.0 * sum / m
            );
        }
    }
    if let Some(path) = &a.svg {
        let title = format!(
            "{} ({})",
            a.model.display(),
            model.metadata("model").unwrap_or("model")
        );
        let svg = match &profile {
            Some((layers, _, _)) => profile_svg(layers, &title),
            None => graph_svg(&model, &title),
        };
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        if !a.json {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The engine's layers timed on its device, and its measured latency (median of 20 graph
/// replays, milliseconds).
fn profile(a: &Args) -> Result<(Vec<TimedLayer>, Option<f64>, bool)> {
    // Engine files carry their own options; these are ignored for them.
    let (mut engine, _) = open_engine(&a.model, &BuildOptions::default(), None)?;
    let info = engine.info();
    if a.batch == 0 || !info.profile.contains(a.batch) {
        anyhow::bail!(
            "--batch {}: the engine takes batches in {} (min:opt:max)",
            a.batch,
            info.profile
        );
    }
    let backend = info.backend;
    let Some(layers) = engine.profile_layers(a.batch)? else {
        anyhow::bail!(
            "the {backend} backend has no per-layer device timing; --profile needs an engine \
             built for --backend cuda"
        );
    };
    let measured = engine
        .time_compute(a.batch, 20)?
        .filter(|t| !t.is_empty())
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        });
    let in_graph = layers.iter().all(|l| l.in_graph);
    let layers = layers
        .into_iter()
        .map(|l| TimedLayer {
            kind: l.kind,
            name: l.layer,
            ms: l.ms,
        })
        .collect();
    Ok((layers, measured, in_graph))
}

/// How the layers were timed, for the report.
fn timing_mode(in_graph: bool) -> &'static str {
    if in_graph {
        "each layer timed as a CUDA graph of its launches"
    } else {
        "some layers could not be captured in a graph and were timed by eager launches, which \
         add their launch latency"
    }
}

/// One line per engine step: index, kind, precision in → out, output and its shape at the
/// largest bucket, fused ONNX nodes, and the algorithm per bucket where recorded.
fn print_layers(rows: &[LayerRow], precision: Precision, buckets: &[usize]) {
    let largest = buckets.last().copied().unwrap_or(1);
    println!(
        "cuda engine layers ({precision}, batch buckets {}): {} steps, {} fused from several \
         ONNX nodes, {} inserted by the engine (no ONNX node)",
        buckets
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        rows.len(),
        rows.iter().filter(|r| r.sources.len() > 1).count(),
        rows.iter().filter(|r| r.sources.is_empty()).count()
    );
    for r in rows {
        let shape = r.shapes.get(&largest).cloned().unwrap_or_default();
        let sources = if r.sources.is_empty() {
            "(inserted by the engine)".to_string()
        } else {
            r.sources.join(", ")
        };
        let algorithms = r
            .algorithms
            .iter()
            .map(|(b, a)| format!("b{b}: {a}"))
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "  {:>4}  {:<18} {:>4} -> {:<4}  {} {:?}  <- {}{}",
            r.index,
            r.kind,
            r.precision_in,
            r.precision_out,
            r.output,
            shape,
            sources,
            if algorithms.is_empty() {
                String::new()
            } else {
                format!("  [{algorithms}]")
            }
        );
    }
}
