//! `kestrel-train qat …`: post-training calibration, QAT fine-tuning, sensitivity analysis and
//! evaluation of quantized models, with the options of the original YOLOv9 `qat.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kestrel_exporter::quantize::QUANTIZATION_KEY;
use kestrel_exporter::{read_model, write_model};
use kestrel_runtime::calibrate::CalibrationMethod;
use kestrel_runtime::dataset::Split;
use kestrel_runtime::eval::EvalSummary;
use kestrel_runtime::nms::NmsConfig;
use kestrel_trainer::data::{Loader, Source, open_source};
use kestrel_trainer::eval::{Evaluation, Network};
use kestrel_trainer::plot::{Series, curves_zoomed};
use kestrel_trainer::quant::{
    OnnxNetwork, Qat, QatConfig, QuantModel, calibration_batches, qat_learning_rate,
    read_float_model, sensitivity,
};

use crate::{bar, parse_device, validate};

#[derive(Subcommand)]
pub enum QatCommand {
    /// Calibrate a float ONNX model (PTQ), then fine-tune it with quantization in the loop (QAT),
    /// the float model as teacher. Writes PROJECT/NAME/ptq_ap_{AP}_{NAME}.onnx,
    /// qat_ep_{E}_ap_{AP}_{NAME}.onnx per epoch, qat_best_{NAME}.onnx (Q/DQ ONNX, ready for
    /// `kestrel build`), report.json and qat.png.
    Quantize(QuantizeArgs),
    /// Sensitivity analysis: calibrate, then evaluate with one layer at a time in floating point;
    /// writes PROJECT/NAME/sensitive.json and prints the ten layers whose quantization costs the
    /// most.
    Sensitive(SensitiveArgs),
    /// mAP of a Q/DQ ONNX model (as QAT trained it: fake-quantized in tch).
    Eval(EvalArgs),
}

/// The model, data and device every `qat` command takes.
#[derive(Args)]
pub struct Common {
    /// The float ONNX model (deployment form, from `kestrel-train export` or `kestrel export`).
    #[arg(long)]
    weights: PathBuf,
    /// A YOLO data YAML, or synthetic[:SEED[:COUNT]].
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Network input size in pixels; must be the model's.
    #[arg(long)]
    imgsz: Option<u32>,
    #[arg(long, default_value = "runs/qat")]
    project: PathBuf,
    #[arg(long, default_value = "exp")]
    name: String,
    /// Write into PROJECT/NAME even if it exists.
    #[arg(long)]
    exist_ok: bool,
    #[arg(long, default_value_t = 57)]
    seed: u64,
}

/// How ranges are calibrated.
#[derive(Args)]
pub struct Calibration {
    /// max or histogram.
    #[arg(long, default_value = "histogram")]
    calibrator: String,
    /// For histograms: mse, percentile or entropy.
    #[arg(long, default_value = "mse")]
    method: String,
    /// The percentile of `--method percentile`.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Calibration batches (from the training split, not augmented).
    #[arg(long, default_value_t = 26)]
    calib_batches: usize,
    #[arg(long, default_value_t = 10)]
    calib_batch_size: usize,
    /// Keep the detection head's last convolutions (box distances, class logits) in floating
    /// point.
    #[arg(long)]
    keep_head_float: bool,
    /// Keep these top-level layers (`model.N`, comma-separated: `2,15`) in floating point, as the
    /// sensitivity analysis suggests; the engine runs them in FP16.
    #[arg(long, value_delimiter = ',')]
    float_layers: Vec<usize>,
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    calibration: Calibration,
    /// QAT iterations (batches) per epoch.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// QAT epochs (the learning rate is 1e-6, except 1e-5 in epoch 6).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Base learning rate of Adam (the recipe: 1e-6, and ten times it in epoch 6).
    #[arg(long, default_value_t = 1e-6, allow_negative_numbers = true)]
    lr: f64,
    /// Supervise every N-th top-level layer (and the last before the head).
    #[arg(long, default_value_t = 1)]
    supervision_stride: usize,
    /// Also supervise the head's raw maps (box distributions and class logits per level).
    #[arg(long)]
    supervise_head: bool,
    /// Add YOLOv9's detection loss on the ground truth with this weight (0: off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    detection_loss: f64,
    /// Learn the activation ranges as well (LSQ-style: each sharing group's input scale is
    /// trained from its calibrated value), at this Adam learning rate on ln(scale); 0 keeps the
    /// calibrated ranges fixed, as the recipe does.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    scale_lr: f64,
    /// Skip evaluating the float model first.
    #[arg(long)]
    no_eval_origin: bool,
    /// Skip evaluating the calibrated model before QAT.
    #[arg(long)]
    no_eval_ptq: bool,
}

#[derive(Args)]
pub struct SensitiveArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    calibration: Calibration,
    /// Evaluate on the first N validation images only.
    #[arg(long)]
    num_image: Option<usize>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// A Q/DQ ONNX model (qat_best_….onnx, ptq_….onnx, or `kestrel quantize` output).
    #[arg(long)]
    weights: PathBuf,
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.001)]
    conf_thres: f32,
    #[arg(long, default_value_t = 0.7)]
    iou_thres: f32,
}

pub fn run(command: QatCommand) -> Result<()> {
    match command {
        QatCommand::Quantize(args) => quantize(args),
        QatCommand::Sensitive(args) => sensitive(args),
        QatCommand::Eval(args) => eval(args),
    }
}

/// AP, AP50, precision and recall as the report writes them.
/// What picks the best QAT epoch: box mAP50-95, plus mask mAP50-95 for segmentation.
fn fitness(e: &Evaluation) -> f64 {
    e.boxes.ap + e.masks.as_ref().map_or(0.0, |m| m.ap)
}

fn metrics(e: &Evaluation) -> serde_json::Value {
    let four = |s: &EvalSummary| {
        serde_json::json!({"ap": s.ap, "ap50": s.ap50, "precision": s.precision,
                           "recall": s.recall})
    };
    let mut v = four(&e.boxes);
    if let Some(m) = &e.masks {
        v["mask"] = four(m);
    }
    v
}

/// The model, its data (class count checked) and the run folder.
struct Setup {
    model: QuantModel,
    train: Source,
    val: Source,
    run_dir: PathBuf,
    device: tch::Device,
    method: CalibrationMethod,
}

fn setup(common: &Common, calibration: &Calibration) -> Result<Setup> {
    let method = CalibrationMethod::parse(
        &calibration.calibrator,
        &calibration.method,
        calibration.percentile,
    )?;
    let device = parse_device(&common.device)?;
    if common.batch_size == 0 || calibration.calib_batch_size == 0 {
        bail!("batch size 0: give at least 1");
    }
    let float = read_float_model(&common.weights)?;
    let mut model = QuantModel::new(float, device, calibration.keep_head_float)
        .with_context(|| common.weights.display().to_string())?;
    model.keep_layers_float(&calibration.float_layers)?;
    let cfg = model.network.config().clone();
    let imgsz = cfg.imgsz[0] as u32;
    if cfg.imgsz[0] != cfg.imgsz[1] {
        bail!(
            "the model's input is {:?}; the trainer's data is square",
            cfg.imgsz
        );
    }
    if let Some(asked) = common.imgsz
        && asked != imgsz
    {
        bail!(
            "--imgsz {asked}, but {} takes {imgsz}x{imgsz} input; give --imgsz {imgsz} or \
             re-export the model at {asked}",
            common.weights.display()
        );
    }
    let train = open_source(&common.data, imgsz, Split::Train, None)?;
    let val = open_source(&common.data, imgsz, Split::Val, None)?;
    for (split, source) in [("training", &train), ("validation", &val)] {
        if source.num_classes() != cfg.num_classes {
            bail!(
                "the model has {} classes, the {split} data {}: quantize with the data the model \
                 was trained on",
                cfg.num_classes,
                source.num_classes()
            );
        }
    }
    let run_dir = common.project.join(&common.name);
    if run_dir.exists() && !common.exist_ok {
        bail!(
            "{} exists; give another --name, or --exist-ok to write into it",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    Ok(Setup {
        model,
        train,
        val,
        run_dir,
        device,
        method,
    })
}

fn calibrate(s: &mut Setup, calibration: &Calibration, seed: u64) -> Result<()> {
    let batches = calibration_batches(
        s.train.clone(),
        s.model.network.config().imgsz[0] as u32,
        calibration.calib_batch_size,
        calibration.calib_batches,
        seed,
    )?;
    let images = (calibration.calib_batches * calibration.calib_batch_size).min(s.train.len());
    let pb = bar(images as u64, &format!("calibrate ({})", s.method.label()));
    let seen = s.model.calibrate(batches, s.method, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    println!(
        "calibrated {} tensors on {seen} images ({})",
        s.model.ranges().len(),
        s.method.label()
    );
    Ok(())
}

fn write_qdq(model: &QuantModel, method: &str, path: &Path) -> Result<()> {
    write_model(&model.export(method)?, path)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let QuantizeArgs {
        common,
        calibration,
        iters,
        epochs,
        lr: base_lr,
        supervision_stride,
        supervise_head,
        detection_loss,
        scale_lr,
        no_eval_origin,
        no_eval_ptq,
    } = args;
    let mut s = setup(&common, &calibration)?;
    let nms = NmsConfig::evaluation();
    let (batch, device, name) = (common.batch_size, s.device, common.name.clone());
    let mut report = serde_json::Map::new();
    report.insert("weights".into(), serde_json::json!(common.weights));
    report.insert("data".into(), serde_json::json!(common.data));
    report.insert("calibration".into(), serde_json::json!(s.method.label()));
    report.insert("lr".into(), serde_json::json!(base_lr));
    report.insert("supervise_head".into(), serde_json::json!(supervise_head));
    report.insert("detection_loss".into(), serde_json::json!(detection_loss));
    report.insert("scale_lr".into(), serde_json::json!(scale_lr));
    report.insert(
        "keep_head_float".into(),
        serde_json::json!(calibration.keep_head_float),
    );
    report.insert(
        "float_layers".into(),
        serde_json::json!(calibration.float_layers),
    );
    let origin = if no_eval_origin {
        None
    } else {
        s.model.network.net.quantize = false;
        let r = validate(&s.model.network, &s.val, batch, device, &nms, "origin");
        s.model.network.net.quantize = true;
        Some(r?)
    };
    report.insert("origin".into(), origin.as_ref().map(metrics).into());

    calibrate(&mut s, &calibration, common.seed)?;
    let ptq_method = format!("ptq-{}", s.method.label());
    let ptq = if no_eval_ptq {
        None
    } else {
        Some(validate(
            &s.model.network,
            &s.val,
            batch,
            device,
            &nms,
            "ptq",
        )?)
    };
    let ptq_name = match &ptq {
        Some(m) => format!("ptq_ap_{:.4}_{name}.onnx", m.boxes.ap),
        None => format!("ptq_{name}.onnx"),
    };
    write_qdq(&s.model, &ptq_method, &s.run_dir.join(ptq_name))?;
    report.insert("ptq".into(), ptq.as_ref().map(metrics).into());

    let config = QatConfig {
        supervision_stride,
        supervise_head,
        detection_loss,
        scale_lr,
    };
    let mut qat = Qat::new(&mut s.model, &config)?;
    let imgsz = s.model.network.config().imgsz[0] as u32;
    let loader = Loader::new(s.train.clone(), imgsz, batch, common.seed)?;
    let per_epoch = loader.batches_per_epoch();
    let mut epochs_report = Vec::new();
    let mut best: Option<(usize, Evaluation)> = None;
    let mut curve = Vec::new();
    let qat_method = format!("qat-{}", s.method.label());
    for epoch in 0..epochs {
        let lr = qat_learning_rate(epoch, base_lr);
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr {base_lr}: give a positive learning rate");
        }
        let pb = bar(iters as u64, &format!("qat {}/{epochs}", epoch + 1));
        let started = std::time::Instant::now();
        let mut loss_sum = 0.0;
        let steps =
            (epoch * iters..(epoch + 1) * iters).map(|step| (step / per_epoch, step % per_epoch));
        loader.for_each_batch(steps, |batch| -> Result<()> {
            let loss = qat.step(&s.model, batch, lr)?;
            loss_sum += loss;
            pb.set_message(format!("loss {loss:.5} lr {lr:.0e}"));
            pb.inc(1);
            Ok(())
        })?;
        pb.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let mean_loss = loss_sum / iters.max(1) as f64;
        println!(
            "qat epoch {}: {iters} iterations in {seconds:.1} s ({:.1} images/s), mean loss \
             {mean_loss:.5}, lr {lr:.1e}",
            epoch + 1,
            (iters * batch) as f64 / seconds.max(1e-9)
        );
        let m = validate(
            &s.model.network,
            &s.val,
            batch,
            device,
            &nms,
            &format!("qat epoch {}", epoch + 1),
        )?;
        write_qdq(
            &s.model,
            &qat_method,
            &s.run_dir
                .join(format!("qat_ep_{epoch}_ap_{:.4}_{name}.onnx", m.boxes.ap)),
        )?;
        if best.as_ref().is_none_or(|(_, b)| fitness(&m) > fitness(b)) {
            write_qdq(
                &s.model,
                &qat_method,
                &s.run_dir.join(format!("qat_best_{name}.onnx")),
            )?;
            best = Some((epoch, m.clone()));
        }
        curve.push(m.boxes.ap);
        let mut row = metrics(&m);
        row["epoch"] = serde_json::json!(epoch);
        row["loss"] = serde_json::json!(mean_loss);
        row["lr"] = serde_json::json!(lr);
        epochs_report.push(row);
    }
    report.insert("qat".into(), serde_json::json!(epochs_report));
    report.insert(
        "best".into(),
        best.as_ref()
            .map(|(e, m)| {
                let mut v = metrics(m);
                v["epoch"] = serde_json::json!(e);
                v
            })
            .into(),
    );
    report.insert(
        "supervised".into(),
        serde_json::json!(qat.supervised(&s.model)),
    );
    let path = s.run_dir.join("report.json");
    std::fs::write(&path, format!("{:#}\n", serde_json::Value::Object(report)))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    if !curve.is_empty() {
        let flat = |v: Option<f64>| vec![v.unwrap_or(f64::NAN); curve.len()];
        let (o, p) = (
            flat(origin.as_ref().map(|m| m.boxes.ap)),
            flat(ptq.as_ref().map(|m| m.boxes.ap)),
        );
        curves_zoomed(
            &s.run_dir.join("qat.png"),
            "mAP50-95 per QAT epoch",
            &[
                Series {
                    name: "QAT",
                    values: &curve,
                    colour: [220, 50, 47],
                },
                Series {
                    name: "origin (float)",
                    values: &o,
                    colour: [0, 0, 0],
                },
                Series {
                    name: "PTQ",
                    values: &p,
                    colour: [38, 139, 210],
                },
            ],
        )?;
    }
    Ok(())
}

fn sensitive(args: SensitiveArgs) -> Result<()> {
    let SensitiveArgs {
        common,
        calibration,
        num_image,
    } = args;
    let mut s = setup(&common, &calibration)?;
    let val = match num_image {
        Some(0) => bail!("--num-image 0: give at least 1"),
        Some(n) => s.val.clone().first(n),
        None => s.val.clone(),
    };
    calibrate(&mut s, &calibration, common.seed)?;
    let nms = NmsConfig::evaluation();
    let all = validate(
        &s.model.network,
        &val,
        common.batch_size,
        s.device,
        &nms,
        "all layers quantized",
    )?;
    let layers = s.model.network.net.quantized_layers().len();
    let pb = bar(layers as u64, "layers");
    let rows = sensitivity(&mut s.model, &val, common.batch_size, &nms, |_, row| {
        pb.set_message(format!("model.{} float: mAP50-95 {:.4}", row.layer, row.ap));
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    let path = s.run_dir.join("sensitive.json");
    let json = serde_json::json!({
        "weights": common.weights,
        "calibration": s.method.label(),
        "images": val.len(),
        "all_quantized": metrics(&all),
        "layers": rows,
    });
    std::fs::write(&path, format!("{json:#}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("layers whose quantization costs the most (mAP50-95 with only that layer float):");
    println!(
        "{:>5}  {:<12} {:>9} {:>9} {:>8}",
        "layer", "block", "mAP50-95", "mAP50", "gain"
    );
    for r in rows.iter().take(10) {
        println!(
            "{:>5}  {:<12} {:>9.4} {:>9.4} {:>+8.4}",
            r.layer,
            r.block,
            r.ap,
            r.ap50,
            r.ap - all.boxes.ap
        );
    }
    println!("wrote {}", path.display());
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let model = read_model(&args.weights)?;
    let network =
        OnnxNetwork::new(&model, device).with_context(|| args.weights.display().to_string())?;
    if !network.net.is_quantized() {
        bail!(
            "{} has no quantizers (a float model): evaluate it with `kestrel-train val` or \
             `kestrel val`, or quantize it with `kestrel-train qat quantize`",
            args.weights.display()
        );
    }
    let imgsz = network.config().imgsz[0] as u32;
    let val = open_source(&args.data, imgsz, Split::Val, None)?;
    if val.num_classes() != network.config().num_classes {
        bail!(
            "the model has {} classes, the data {}",
            network.config().num_classes,
            val.num_classes()
        );
    }
    let nms = NmsConfig {
        conf_threshold: args.conf_thres,
        iou_threshold: args.iou_thres,
        ..NmsConfig::evaluation()
    };
    let how = model
        .metadata(QUANTIZATION_KEY)
        .unwrap_or("Q/DQ")
        .to_string();
    validate(&network, &val, args.batch_size, device, &nms, &how)?;
    Ok(())
}
