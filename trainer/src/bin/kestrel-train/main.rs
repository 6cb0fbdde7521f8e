//! `kestrel-train`: train GELAN models, fuse them to the deployment form, export them to ONNX.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kestrel_exporter::weights::save_safetensors;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightFile, WeightSource, export, write_model};
use kestrel_runtime::dataset::Split;
use kestrel_runtime::eval::EvalSummary;
use kestrel_runtime::nms::NmsConfig;
use kestrel_trainer::Gelan;
use kestrel_trainer::data::{Loader, Source, open_source};
use kestrel_trainer::eval::{Evaluation, Network, evaluate_masks};
use kestrel_trainer::plot::{Series, curves, pr_curves};
use kestrel_trainer::train::{TrainConfig, Trainer};
use tch::{Device, nn};

mod qat;

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
        /// gelan-t, gelan-s, gelan-m, gelan-c or gelan-e; gelan-t-seg, gelan-s-seg or gelan-c-seg
        /// for instance segmentation (trained on YOLO-seg polygons or COCO segmentations).
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
        /// Validate every N epochs (and after the last); 0: only after the last.
        #[arg(long, default_value_t = 1)]
        val_interval: usize,
        /// Skip images that cannot be used (missing, corrupt, bad label lines) with a warning,
        /// instead of stopping; they are counted in the run summary.
        #[arg(long)]
        skip_bad: bool,
        /// Keep decoded training images in memory (width × height × 3 bytes each; synthetic
        /// scenes are always kept).
        #[arg(long)]
        cache: bool,
        /// Mixed precision on CUDA: the network under FP16 autocast, the loss in FP32, a dynamic
        /// loss scale (default FP32, with TF32 convolutions).
        #[arg(long)]
        amp: bool,
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
        /// Also draw the precision-recall curves at IoU 0.50 to this PNG.
        #[arg(long)]
        pr_plot: Option<PathBuf>,
    },
    /// Import weights trained with the original YOLOv9 code (a state dict saved as safetensors by
    /// scripts/py/yolov9_to_safetensors.py): a GELAN checkpoint as is, a YOLOv9 dual-branch one
    /// (yolov9-c …) reparameterized to its GELAN (gelan-c …). Writes OUTPUT.safetensors and
    /// OUTPUT.json, a checkpoint the other commands take (val, export, fuse).
    Import {
        #[arg(long)]
        weights: PathBuf,
        /// The GELAN model the weights are for (yolov9-c → gelan-c, yolov9-e → gelan-e, …).
        #[arg(long)]
        model: String,
        /// Network input size the checkpoint will be evaluated and exported at.
        #[arg(long, default_value_t = 640)]
        imgsz: usize,
        /// Class names, one per line (default: class0, class1, …).
        #[arg(long)]
        names: Option<PathBuf>,
        /// Output path (without extension, or ending in .safetensors).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Redraw a run's losses.png and map.png from the history in its last checkpoint (for runs
    /// made on a machine without fonts, whose plots have no labels).
    Plots {
        /// The run folder (PROJECT/NAME).
        run: PathBuf,
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
    /// Quantization: PTQ calibration, QAT fine-tuning, sensitivity analysis, evaluation of
    /// quantized models (the options of YOLOv9's qat.py).
    Qat {
        #[command(subcommand)]
        command: qat::QatCommand,
    },
    /// Fuse a training checkpoint and export it to ONNX (dynamic batch, FP32); or copy a
    /// quantized model (`qat_best_….onnx`) after checking it, Q/DQ pairs as trained.
    Export {
        /// A training checkpoint (.safetensors), or a Q/DQ ONNX model written by `qat quantize`.
        #[arg(long)]
        weights: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Append NMS to the graph: onnx (standard operators: onnxruntime, Kestrel's CPU
        /// backend), efficient-nms-trt (TensorRT 10's plugin, detectors only) or trt-inms
        /// (TensorRT 11's INMS layer); outputs num_dets, det_boxes, det_scores, det_classes (and
        /// det_masks for segmentation models).
        #[arg(long, value_name = "FLAVOUR")]
        end2end: Option<String>,
        /// End-to-end: detections kept per image (K).
        #[arg(long, default_value_t = 100)]
        max_det: usize,
        /// End-to-end: NMS IoU threshold.
        #[arg(long, default_value_t = 0.45)]
        iou: f32,
        /// End-to-end: score threshold.
        #[arg(long, default_value_t = 0.25)]
        conf: f32,
    },
}

/// `model` with NMS appended when an end-to-end flavour is given (`--end2end`).
fn with_end2end(
    model: kestrel_exporter::pb::ModelProto,
    flavour: Option<&str>,
    max_detections: usize,
    iou_threshold: f32,
    score_threshold: f32,
) -> Result<kestrel_exporter::pb::ModelProto> {
    use kestrel_exporter::end2end::{EndToEnd, NmsFlavour, append_nms};
    let Some(flavour) = flavour else {
        return Ok(model);
    };
    let opts = EndToEnd {
        flavour: NmsFlavour::parse(flavour)?,
        max_detections,
        iou_threshold,
        score_threshold,
    };
    let model = append_nms(model, &opts)?;
    println!(
        "end-to-end ({flavour}): NMS inside, at most {max_detections} detections per image, IoU \
         {iou_threshold}, score {score_threshold}"
    );
    Ok(model)
}

pub(crate) fn parse_device(s: &str) -> Result<Device> {
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

pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
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

/// The class names recorded next to a checkpoint, when it has them for every class.
fn checkpoint_names(weights: &Path, classes: usize) -> Option<Vec<String>> {
    let name = weights.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".ema.safetensors")
        .or_else(|| name.strip_suffix(".safetensors"))?;
    let text = std::fs::read_to_string(weights.with_file_name(format!("{stem}.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let names: Vec<String> = serde_json::from_value(v["names"].clone()).ok()?;
    (names.len() == classes).then_some(names)
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
            val_interval,
            skip_bad,
            cache,
            amp,
        } => {
            let device = parse_device(&device)?;
            tch::manual_seed(seed as i64);
            let started = std::time::Instant::now();
            let mut bad = Vec::new();
            let source = open_source(&data, imgsz, Split::Train, skip_bad.then_some(&mut bad))?;
            let val = open_source(&data, imgsz, Split::Val, skip_bad.then_some(&mut bad))?;
            for e in &bad {
                eprintln!("warning: skipping a bad image: {e}");
            }
            let bad: Vec<String> = bad.iter().map(ToString::to_string).collect();
            let cfg = ModelConfig::new(&model, source.num_classes(), imgsz as usize)?;
            let mut loader = Loader::new(source, imgsz, batch_size, seed)?;
            // Segmentation models train on masks too.
            loader.masks = cfg.spec.mask_coefficients().is_some();
            if cache {
                loader.cache_images();
            }
            if skip_bad {
                loader.skip_bad_images();
            }
            let config = TrainConfig {
                epochs,
                lr0,
                cosine,
                amp,
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
                ("names", serde_json::json!(class_names(loader.source()))),
                ("data", serde_json::json!(data)),
                ("batch_size", serde_json::json!(batch_size)),
                ("seed", serde_json::json!(seed)),
            ] {
                trainer.run_info.insert(k.into(), v);
            }
            // Per-epoch history for the plots: kept in the checkpoint's JSON, so a resumed run
            // keeps it.
            let mut history: Vec<EpochRecord> = if resume {
                std::fs::read_to_string(dir.join("last.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| serde_json::from_value(v["history"].clone()).ok())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut best = history
                .iter()
                .filter_map(EpochRecord::fitness)
                .fold(f64::NEG_INFINITY, f64::max);
            let run_dir = project.join(&name);
            let mut closing = loader.clone();
            closing.mosaic = 0.0;
            if trainer.mixed_precision() {
                eprintln!("mixed precision: FP16 autocast, dynamic loss scale");
            }
            let mut last_eval = None;
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
                    let seg = if r.masks > 0.0 {
                        format!(" seg {:.3}", r.masks)
                    } else {
                        String::new()
                    };
                    pb.set_message(format!(
                        "box {:.3}{seg} cls {:.3} dfl {:.3} lr {:.2e}",
                        r.boxes, r.classes, r.dfl, r.lr
                    ));
                    pb.inc(1);
                })?;
                pb.finish();
                if summary.skipped_steps > 0 {
                    eprintln!(
                        "  {} steps skipped for FP16 gradient overflow; loss scale now {}",
                        summary.skipped_steps,
                        trainer.loss_scale().scale
                    );
                }
                let mut record = EpochRecord {
                    epoch: e + 1,
                    boxes: summary.boxes,
                    classes: summary.classes,
                    dfl: summary.dfl,
                    masks: loader.masks.then_some(summary.masks),
                    images_per_s: summary.images_per_s,
                    metrics: None,
                    mask_metrics: None,
                };
                let due = e + 1 == epochs || (val_interval > 0 && (e + 1) % val_interval == 0);
                if due {
                    let m = validate(
                        trainer.eval_model(),
                        &val,
                        batch_size,
                        device,
                        &NmsConfig::evaluation(),
                        "val",
                    )?;
                    record.metrics = Some(four(&m.boxes));
                    record.mask_metrics = m.masks.as_ref().map(four);
                    last_eval = Some(m);
                }
                eprintln!("epoch {}: {record}", e + 1);
                let improved = record.fitness().is_some_and(|f| f > best);
                history.push(record);
                trainer
                    .run_info
                    .insert("history".into(), serde_json::json!(history));
                trainer.save(&dir, "last")?;
                if improved {
                    best = record.fitness().unwrap_or(best);
                    trainer.save(&dir, "best")?;
                }
                write_history(&run_dir, &history)?;
            }
            let last = match last_eval {
                Some(m) => m,
                None => validate(
                    trainer.eval_model(),
                    &val,
                    batch_size,
                    device,
                    &NmsConfig::evaluation(),
                    "val",
                )?,
            };
            plot_pr(&run_dir.join("pr.png"), &last.boxes, &class_names(&val))?;
            let out = dir.join("fused.safetensors");
            save_safetensors(&out, &trainer.eval_model().fuse()?)?;
            let which = if trainer.config.ema { "EMA" } else { "trained" };
            println!(
                "wrote {} (deployment form of the {which} weights of the last epoch)",
                out.display()
            );
            let skipped_loading = loader.skipped();
            let summary = serde_json::json!({
                "model": model,
                "data": data,
                "epochs": epochs,
                "imgsz": imgsz,
                "batch_size": batch_size,
                "device": format!("{device:?}"),
                "mixed_precision": trainer.mixed_precision(),
                "wall_s": started.elapsed().as_secs_f64(),
                "final": metrics_json(&last.boxes),
                "final_masks": last.masks.as_ref().map(metrics_json),
                "best_fitness": best,
                "skipped_images": bad.len() + skipped_loading.len(),
                "skipped": bad.iter().cloned().chain(skipped_loading.into_values()).collect::<Vec<_>>(),
            });
            let path = run_dir.join("summary.json");
            std::fs::write(&path, format!("{summary:#}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            let skipped = summary["skipped_images"].as_u64().unwrap_or(0);
            if skipped > 0 {
                println!(
                    "{skipped} bad images skipped (listed in {})",
                    path.display()
                );
            }
            println!(
                "run summary {}; plots losses.png, map.png, pr.png in {}",
                path.display(),
                run_dir.display()
            );
        }
        Command::Val {
            weights,
            data,
            batch_size,
            device,
            pr_plot,
        } => {
            let device = parse_device(&device)?;
            let cfg = checkpoint_config(&weights)?;
            let mut vs = nn::VarStore::new(device);
            let model = Gelan::new(&vs.root(), &cfg)?;
            vs.load(&weights).with_context(|| {
                format!("{}: not a {} checkpoint", weights.display(), cfg.spec.name)
            })?;
            let source = open_source(&data, cfg.imgsz[0] as u32, Split::Val, None)?;
            let summary = validate(
                &model,
                &source,
                batch_size,
                device,
                &NmsConfig::evaluation(),
                "val",
            )?;
            if let Some(path) = pr_plot {
                plot_pr(&path, &summary.boxes, &class_names(&source))?;
                println!("wrote {}", path.display());
            }
        }
        Command::Import {
            weights,
            model,
            imgsz,
            names,
            output,
        } => {
            let tensors = kestrel_trainer::import::read_checkpoint(&weights)?;
            let classes = kestrel_trainer::import::checkpoint_classes(&tensors)?;
            let cfg = ModelConfig::new(&model, classes, imgsz)?;
            let mut vs = nn::VarStore::new(Device::Cpu);
            let gelan = Gelan::new(&vs.root(), &cfg)?;
            let head = cfg.spec.layers.len() - 1;
            let report = kestrel_trainer::import::import_weights(&mut vs, &tensors, head)
                .with_context(|| format!("importing {} as {model}", weights.display()))?;
            let names: Vec<String> = match names {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let names = kestrel_runtime::labels::parse_class_names(&text);
                    if names.len() != classes {
                        bail!(
                            "{} has {} names, the checkpoint {classes} classes",
                            path.display(),
                            names.len()
                        );
                    }
                    names
                }
                None => (0..classes).map(|i| format!("class{i}")).collect(),
            };
            let stem = output.with_extension("");
            let out = stem.with_extension("safetensors");
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            vs.save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            let json = serde_json::json!({
                "model": model,
                "classes": classes,
                "imgsz": imgsz,
                "names": names,
                "imported_from": weights.display().to_string(),
                "layout": format!("{:?}", report.layout),
                "epoch": 0,
                "iteration": 0,
                "ema_updates": 0,
            });
            let json_path = stem.with_extension("json");
            std::fs::write(&json_path, format!("{json:#}\n"))
                .with_context(|| format!("writing {}", json_path.display()))?;
            drop(gelan);
            println!(
                "imported {} ({:?} layout, {classes} classes): {} tensors loaded, {} unused \
                 (auxiliary branch, counters); wrote {} and {}",
                weights.display(),
                report.layout,
                report.loaded,
                report.unused,
                out.display(),
                json_path.display()
            );
        }
        Command::Plots { run } => {
            let json = run.join("weights/last.json");
            let text = std::fs::read_to_string(&json).with_context(|| {
                format!("reading {} (the run's last checkpoint)", json.display())
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", json.display()))?;
            let history: Vec<EpochRecord> = serde_json::from_value(v["history"].clone())
                .with_context(|| format!("{}: no per-epoch \"history\"", json.display()))?;
            write_history(&run, &history)?;
            println!(
                "wrote {} epochs to results.csv, losses.png and map.png in {}",
                history.len(),
                run.display()
            );
        }
        Command::Fuse { weights, output } => {
            let (_, tensors) = fused(&weights)?;
            save_safetensors(&output, &tensors)?;
            println!("wrote {} ({} tensors)", output.display(), tensors.len());
        }
        Command::Qat { command } => qat::run(command)?,
        Command::Export {
            weights,
            output,
            end2end,
            max_det,
            iou,
            conf,
        } if weights.extension().is_some_and(|e| e == "onnx") => {
            let model = kestrel_exporter::read_model(&weights)?;
            let network = kestrel_trainer::quant::OnnxNetwork::new(&model, Device::Cpu)
                .with_context(|| weights.display().to_string())?;
            if !network.net.is_quantized() {
                bail!(
                    "{} is a float ONNX model, already exported; quantize it with \
                     `kestrel-train qat quantize --weights {}`",
                    weights.display(),
                    weights.display()
                );
            }
            let model = with_end2end(model, end2end.as_deref(), max_det, iou, conf)?;
            write_model(&model, &output)?;
            let s = kestrel_exporter::summarize(&model);
            println!(
                "wrote {} ({}, {} Q/DQ pairs, {})",
                output.display(),
                network.config.spec.name,
                s.qdq_pairs,
                model
                    .metadata(kestrel_exporter::quantize::QUANTIZATION_KEY)
                    .unwrap_or("quantized")
            );
        }
        Command::Export {
            weights,
            output,
            end2end,
            max_det,
            iou,
            conf,
        } => {
            let (cfg, tensors) = fused(&weights)?;
            let tmp = output.with_extension("fused.safetensors");
            save_safetensors(&tmp, &tensors)?;
            let mut source = WeightSource::File(WeightFile::load(&tmp)?);
            let mut options = ExportOptions::dynamic(cfg.num_classes);
            if let Some(names) = checkpoint_names(&weights, cfg.num_classes) {
                options.class_names = names;
            }
            let onnx = export(&cfg, &mut source, &options)?;
            let onnx = with_end2end(onnx, end2end.as_deref(), max_det, iou, conf)?;
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

/// Evaluate and print P, R, mAP50 and mAP50-95 like `kestrel val`, under the heading `what`.
pub(crate) fn validate(
    model: &dyn Network,
    source: &Source,
    batch_size: usize,
    device: Device,
    nms: &NmsConfig,
    what: &str,
) -> Result<Evaluation> {
    let pb = bar(source.len() as u64, what);
    let masks = model.config().spec.mask_coefficients().is_some();
    let summary = evaluate_masks(model, source, batch_size, device, nms, masks, |n| {
        pb.inc(n as u64)
    })?;
    pb.finish_and_clear();
    let b = &summary.boxes;
    println!(
        "{what}: {} images, {} instances: P {:.4} R {:.4} mAP50 {:.4} mAP50-95 {:.4}",
        b.images, b.instances, b.precision, b.recall, b.ap50, b.ap
    );
    match &summary.masks {
        Some(m) => println!(
            "{what} masks: P {:.4} R {:.4} mAP50 {:.4} mAP50-95 {:.4}",
            m.precision, m.recall, m.ap50, m.ap
        ),
        None if masks => println!("{what} masks: not evaluated (the data has no outlines)"),
        None => {}
    }
    Ok(summary)
}

/// P, R, mAP50, mAP50-95.
fn four(m: &EvalSummary) -> [f64; 4] {
    [m.precision, m.recall, m.ap50, m.ap]
}

/// P, R, mAP50 and mAP50-95 as JSON.
fn metrics_json(m: &EvalSummary) -> serde_json::Value {
    serde_json::json!({"precision": m.precision, "recall": m.recall, "map50": m.ap50,
                       "map50_95": m.ap})
}

/// One epoch of a run: mean weighted loss terms, throughput, and the validation metrics when
/// measured (P, R, mAP50, mAP50-95).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct EpochRecord {
    epoch: usize,
    #[serde(rename = "box")]
    boxes: f64,
    #[serde(rename = "cls")]
    classes: f64,
    dfl: f64,
    /// The mask term of a segmentation model.
    #[serde(default, rename = "seg", skip_serializing_if = "Option::is_none")]
    masks: Option<f64>,
    images_per_s: f64,
    metrics: Option<[f64; 4]>,
    /// Mask P, R, mAP50, mAP50-95 of a segmentation model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mask_metrics: Option<[f64; 4]>,
}

impl EpochRecord {
    /// YOLOv9's fitness, which picks `best`: 0.1 · mAP50 + 0.9 · mAP50-95, of the boxes plus,
    /// for segmentation, of the masks.
    fn fitness(&self) -> Option<f64> {
        let f = |m: [f64; 4]| 0.1 * m[2] + 0.9 * m[3];
        self.metrics
            .map(|m| f(m) + self.mask_metrics.map_or(0.0, f))
    }
}

impl std::fmt::Display for EpochRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "box {:.4} ", self.boxes)?;
        if let Some(m) = self.masks {
            write!(f, "seg {m:.4} ")?;
        }
        write!(
            f,
            "cls {:.4} dfl {:.4}, {:.1} images/s",
            self.classes, self.dfl, self.images_per_s
        )?;
        if let Some([p, r, m50, m]) = self.metrics {
            write!(f, "; val P {p:.4} R {r:.4} mAP50 {m50:.4} mAP50-95 {m:.4}")?;
        }
        if let Some([p, r, m50, m]) = self.mask_metrics {
            write!(
                f,
                "; masks P {p:.4} R {r:.4} mAP50 {m50:.4} mAP50-95 {m:.4}"
            )?;
        }
        Ok(())
    }
}

/// `results.csv` and the loss and mAP plots of a run.
fn write_history(run_dir: &Path, history: &[EpochRecord]) -> Result<()> {
    let seg = history.iter().any(|r| r.masks.is_some());
    let mut csv = String::from("epoch,box,cls,dfl,images_per_s,precision,recall,map50,map50_95");
    if seg {
        csv += ",seg,mask_precision,mask_recall,mask_map50,mask_map50_95";
    }
    csv.push('\n');
    let cells = |m: Option<[f64; 4]>| {
        m.map_or_else(
            || ",,,".to_string(),
            |m| format!("{:.5},{:.5},{:.5},{:.5}", m[0], m[1], m[2], m[3]),
        )
    };
    for r in history {
        csv += &format!(
            "{},{:.5},{:.5},{:.5},{:.1},{}",
            r.epoch,
            r.boxes,
            r.classes,
            r.dfl,
            r.images_per_s,
            cells(r.metrics)
        );
        if seg {
            csv += &format!(
                ",{:.5},{}",
                r.masks.unwrap_or(f64::NAN),
                cells(r.mask_metrics)
            );
        }
        csv.push('\n');
    }
    let path = run_dir.join("results.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    plot_losses(&run_dir.join("losses.png"), history)?;
    // Epochs without validation are gaps (NaN) in the mAP curves.
    let metric = |k: usize| -> Vec<f64> {
        history
            .iter()
            .map(|r| r.metrics.map_or(f64::NAN, |m| m[k]))
            .collect()
    };
    let (m50, m) = (metric(2), metric(3));
    let mask_metric = |k: usize| -> Vec<f64> {
        history
            .iter()
            .map(|r| r.mask_metrics.map_or(f64::NAN, |m| m[k]))
            .collect()
    };
    let (k50, k) = (mask_metric(2), mask_metric(3));
    let mut series = vec![
        Series {
            name: "mAP50",
            values: &m50,
            colour: [38, 139, 210],
        },
        Series {
            name: "mAP50-95",
            values: &m,
            colour: [220, 50, 47],
        },
    ];
    if history.iter().any(|r| r.mask_metrics.is_some()) {
        series.push(Series {
            name: "mask mAP50",
            values: &k50,
            colour: [42, 161, 152],
        });
        series.push(Series {
            name: "mask mAP50-95",
            values: &k,
            colour: [211, 54, 130],
        });
    }
    curves(
        &run_dir.join("map.png"),
        "validation mAP (EMA weights)",
        &series,
    )?;
    Ok(())
}

/// The class names of a source: the data YAML's, or the synthetic shapes'.
fn class_names(source: &Source) -> Vec<String> {
    match source {
        Source::Dataset(d) => d.names.clone(),
        Source::Synthetic { .. } => kestrel_runtime::synth::CLASS_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

/// Precision-recall curves at IoU 0.50, per class and their mean.
fn plot_pr(path: &Path, summary: &EvalSummary, names: &[String]) -> Result<()> {
    let labels: Vec<String> = summary
        .per_class
        .iter()
        .map(|c| {
            let name = names.get(c.class_id).map_or("?", String::as_str);
            format!("{name} {:.3}", c.ap50)
        })
        .collect();
    let points = summary.per_class.first().map_or(0, |c| c.pr50.len());
    let mean: Vec<f64> = (0..points)
        .map(|r| {
            summary.per_class.iter().map(|c| c.pr50[r]).sum::<f64>()
                / summary.per_class.len().max(1) as f64
        })
        .collect();
    let mean_label = format!("all classes {:.3} mAP50", summary.ap50);
    let mut series: Vec<Series> = summary
        .per_class
        .iter()
        .zip(&labels)
        .map(|(c, label)| Series {
            name: label,
            values: &c.pr50,
            colour: kestrel_runtime::labels::class_colour(c.class_id),
        })
        .collect();
    series.push(Series {
        name: &mean_label,
        values: &mean,
        colour: [0, 0, 0],
    });
    pr_curves(path, "precision-recall at IoU 0.50", &series)?;
    Ok(())
}

/// The loss terms per epoch as a PNG.
fn plot_losses(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let column = |f: fn(&EpochRecord) -> f64| history.iter().map(f).collect::<Vec<f64>>();
    let (b, c, d) = (
        column(|r| r.boxes),
        column(|r| r.classes),
        column(|r| r.dfl),
    );
    let seg = column(|r| r.masks.unwrap_or(f64::NAN));
    let mut series = vec![
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
    ];
    if history.iter().any(|r| r.masks.is_some()) {
        series.push(Series {
            name: "seg (mask BCE)",
            values: &seg,
            colour: [211, 54, 130],
        });
    }
    curves(path, "training losses (weighted, per image)", &series)?;
    Ok(())
}
