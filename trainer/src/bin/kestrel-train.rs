//! `kestrel-train`: train GELAN models, fuse them to the deployment form, export them to ONNX.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kestrel_exporter::weights::save_safetensors;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightFile, WeightSource, export, write_model};
use kestrel_runtime::dataset::Split;
use kestrel_runtime::nms::NmsConfig;
use kestrel_trainer::Gelan;
use kestrel_trainer::data::{Loader, Source, open_source};
use kestrel_trainer::eval::evaluate;
use kestrel_trainer::plot::{Series, curves};
use kestrel_trainer::train::{TrainConfig, Trainer};
use tch::{Device, nn};

#[derive(Parser)]
#[command(
    name = "kestrel-train",
    version,
    about = "Train, fuse and export GELAN / YOLOv9 models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model; checkpoints go to PROJECT/NAME/weights (last.*, each epoch).
    Train {
        /// gelan-t, gelan-s, gelan-m, gelan-c or gelan-e.
        #[arg(long, default_value = "gelan-t")]
        model: String,
        /// A YOLO data YAML, or synthetic[:SEED[:COUNT]] for Kestrel's synthetic scenes.
        #[arg(long, default_value = "synthetic")]
        data: String,
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        /// Network input size in pixels (a multiple of 32).
        #[arg(long, default_value_t = 640)]
        imgsz: u32,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "runs/train")]
        project: PathBuf,
        #[arg(long, default_value = "exp")]
        name: String,
        /// Continue from PROJECT/NAME/weights/last.*.
        #[arg(long)]
        resume: bool,
        /// Seed of the initialisation and of the data order and augmentation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Initial learning rate.
        #[arg(long, default_value_t = 0.01)]
        lr0: f64,
        /// Cosine instead of linear learning-rate decay.
        #[arg(long)]
        cosine: bool,
        /// Train the last N epochs without mosaics (YOLOv9's close-mosaic).
        #[arg(long, default_value_t = 15)]
        close_mosaic: usize,
    },
    /// mAP of a training checkpoint on a validation split (YOLOv9's settings: conf 0.001,
    /// IoU 0.7, 300 detections, multi-label), through the runtime's post-processing and evaluator.
    Val {
        #[arg(long)]
        weights: PathBuf,
        /// A YOLO data YAML (its val split), or synthetic[:SEED[:COUNT]] (the matching
        /// validation scenes).
        #[arg(long, default_value = "synthetic")]
        data: String,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Fold BatchNorm and merge RepConvN: training checkpoint → deployment safetensors.
    Fuse {
        /// A training checkpoint (`last.safetensors` or `last.ema.safetensors`); the model, classes
        /// and input size come from the `.json` written next to it.
        #[arg(long)]
        weights: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Fuse a training checkpoint and export it to ONNX (dynamic batch, FP32).
    Export {
        #[arg(long)]
        weights: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(n) = s
                .strip_prefix("cuda:")
                .or(if s == "cuda" { Some("0") } else { None })
            else {
                bail!("unknown device '{s}': use cpu or cuda:N");
            };
            let n: usize = n
                .parse()
                .with_context(|| format!("'{s}': the GPU index is not a number"))?;
            if !tch::Cuda::is_available() {
                bail!(
                    "{s} asked for, but libtorch sees no CUDA device: this needs an NVIDIA GPU and \
                     driver, and a kestrel-train built with `--features cuda`; or use --device cpu"
                );
            }
            if n >= tch::Cuda::device_count() as usize {
                bail!("{s}: there are {} CUDA devices", tch::Cuda::device_count());
            }
            Ok(Device::Cuda(n))
        }
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{what} {{bar:30.cyan/blue}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta_precise}}]"
    )) {
        bar.set_style(style);
    }
    bar
}

/// The model configuration recorded next to a checkpoint (`{stem}.json`).
fn checkpoint_config(weights: &Path) -> Result<ModelConfig> {
    let name = weights
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".ema.safetensors")
        .or_else(|| name.strip_suffix(".safetensors"))
        .with_context(|| format!("{}: expected a .safetensors checkpoint", weights.display()))?;
    let json = weights.with_file_name(format!("{stem}.json"));
    let text = std::fs::read_to_string(&json).with_context(|| {
        format!(
            "reading {} (written next to every checkpoint)",
            json.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", json.display()))?;
    let model = v["model"]
        .as_str()
        .with_context(|| format!("{}: no \"model\"", json.display()))?;
    let classes = v["classes"]
        .as_u64()
        .with_context(|| format!("{}: no \"classes\"", json.display()))?;
    let imgsz = v["imgsz"]
        .as_u64()
        .with_context(|| format!("{}: no \"imgsz\"", json.display()))?;
    Ok(ModelConfig::new(model, classes as usize, imgsz as usize)?)
}

/// Load a training checkpoint and fuse it.
fn fused(
    weights: &Path,
) -> Result<(
    ModelConfig,
    std::collections::BTreeMap<String, kestrel_exporter::weights::Tensor>,
)> {
    let cfg = checkpoint_config(weights)?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Gelan::new(&vs.root(), &cfg)?;
    vs.load(weights)
        .with_context(|| format!("{}: not a {} checkpoint", weights.display(), cfg.spec.name))?;
    Ok((cfg, model.fuse()?))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train {
            model,
            data,
            epochs,
            imgsz,
            batch_size,
            device,
            project,
            name,
            resume,
            seed,
            lr0,
            cosine,
            close_mosaic,
        } => {
            let device = parse_device(&device)?;
            tch::manual_seed(seed as i64);
            let source = open_source(&data, imgsz, Split::Train)?;
            let cfg = ModelConfig::new(&model, source.num_classes(), imgsz as usize)?;
            let loader = Loader::new(source, imgsz, batch_size, seed)?;
            let config = TrainConfig {
                epochs,
                lr0,
                cosine,
                ..Default::default()
            };
            let mut trainer = Trainer::new(&cfg, config, batch_size, device)?;
            let dir = project.join(&name).join("weights");
            if resume {
                trainer.resume(&dir, "last")?;
                eprintln!(
                    "resuming {} at epoch {}",
                    dir.display(),
                    trainer.state.epoch
                );
            }
            for (k, v) in [
                ("data", serde_json::json!(data)),
                ("batch_size", serde_json::json!(batch_size)),
                ("seed", serde_json::json!(seed)),
            ] {
                trainer.run_info.insert(k.into(), v);
            }
            // Loss history for the plot: kept in the checkpoint's JSON, so a resumed run keeps it.
            let mut history: Vec<[f64; 3]> = if resume {
                std::fs::read_to_string(dir.join("last.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| serde_json::from_value(v["history"].clone()).ok())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut closing = loader.clone();
            closing.mosaic = 0.0;
            while trainer.state.epoch < epochs {
                let e = trainer.state.epoch;
                let loader = if e + close_mosaic >= epochs {
                    &closing
                } else {
                    &loader
                };
                let pb = bar(
                    loader.batches_per_epoch() as u64,
                    &format!("epoch {}/{epochs}", e + 1),
                );
                let summary = trainer.train_epoch(loader, |r| {
                    pb.set_message(format!(
                        "box {:.3} cls {:.3} dfl {:.3} lr {:.2e}",
                        r.boxes, r.classes, r.dfl, r.lr
                    ));
                    pb.inc(1);
                })?;
                pb.finish();
                eprintln!(
                    "epoch {}: box {:.4} cls {:.4} dfl {:.4}, {:.1} images/s",
                    e + 1,
                    summary.boxes,
                    summary.classes,
                    summary.dfl,
                    summary.images_per_s
                );
                history.push([summary.boxes, summary.classes, summary.dfl]);
                trainer
                    .run_info
                    .insert("history".into(), serde_json::json!(history));
                trainer.save(&dir, "last")?;
                plot_losses(&project.join(&name).join("losses.png"), &history)?;
            }
            let val = open_source(&data, imgsz, Split::Val)?;
            validate(trainer.eval_model(), &val, batch_size, device)?;
            let out = dir.join("fused.safetensors");
            save_safetensors(&out, &trainer.eval_model().fuse()?)?;
            let which = if trainer.config.ema { "EMA" } else { "trained" };
            println!(
                "wrote {} (deployment form of the {which} weights)",
                out.display()
            );
        }
        Command::Val {
            weights,
            data,
            batch_size,
            device,
        } => {
            let device = parse_device(&device)?;
            let cfg = checkpoint_config(&weights)?;
            let mut vs = nn::VarStore::new(device);
            let model = Gelan::new(&vs.root(), &cfg)?;
            vs.load(&weights).with_context(|| {
                format!("{}: not a {} checkpoint", weights.display(), cfg.spec.name)
            })?;
            let source = open_source(&data, cfg.imgsz[0] as u32, Split::Val)?;
            validate(&model, &source, batch_size, device)?;
        }
        Command::Fuse { weights, output } => {
            let (_, tensors) = fused(&weights)?;
            save_safetensors(&output, &tensors)?;
            println!("wrote {} ({} tensors)", output.display(), tensors.len());
        }
        Command::Export { weights, output } => {
            let (cfg, tensors) = fused(&weights)?;
            let tmp = output.with_extension("fused.safetensors");
            save_safetensors(&tmp, &tensors)?;
            let mut source = WeightSource::File(WeightFile::load(&tmp)?);
            let onnx = export(&cfg, &mut source, &ExportOptions::dynamic(cfg.num_classes))?;
            write_model(&onnx, &output)?;
            let _ = std::fs::remove_file(&tmp);
            println!(
                "wrote {} ({}, {} classes, {}x{})",
                output.display(),
                cfg.spec.name,
                cfg.num_classes,
                cfg.imgsz[0],
                cfg.imgsz[1]
            );
        }
    }
    Ok(())
}

/// Evaluate and print P, R, mAP50 and mAP50-95 like `kestrel val`.
fn validate(model: &Gelan, source: &Source, batch_size: usize, device: Device) -> Result<()> {
    let pb = bar(source.len() as u64, "val");
    let summary = evaluate(
        model,
        source,
        batch_size,
        device,
        &NmsConfig::evaluation(),
        |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    println!(
        "val: {} images, {} instances: P {:.4} R {:.4} mAP50 {:.4} mAP50-95 {:.4}",
        summary.images,
        summary.instances,
        summary.precision,
        summary.recall,
        summary.ap50,
        summary.ap
    );
    Ok(())
}

/// The loss terms per epoch as a PNG.
fn plot_losses(path: &Path, history: &[[f64; 3]]) -> Result<()> {
    let column = |k: usize| history.iter().map(|h| h[k]).collect::<Vec<f64>>();
    let (b, c, d) = (column(0), column(1), column(2));
    curves(
        path,
        "training losses (weighted, per image)",
        &[
            Series {
                name: "box (CIoU)",
                values: &b,
                colour: [220, 50, 47],
            },
            Series {
                name: "cls (BCE)",
                values: &c,
                colour: [38, 139, 210],
            },
            Series {
                name: "dfl",
                values: &d,
                colour: [133, 153, 0],
            },
        ],
    )?;
    Ok(())
}
