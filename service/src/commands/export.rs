//! `kestrel export`: a GELAN model to ONNX.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kestrel_exporter::deepstream::{NvinferConfig, append_deepstream_output, nvinfer_config};
use kestrel_exporter::end2end::{END2END_KEY, EndToEnd, NmsFlavour, append_nms};
use kestrel_exporter::weights::save_safetensors;
use kestrel_exporter::{
    Activation, ExportOptions, ModelConfig, WeightFile, WeightSource, export, inspect, onnx, pb,
};

/// Which GELAN model to build, with which weights and shapes (shared with `kestrel quantize`).
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Architecture: gelan-t, gelan-s, gelan-m, gelan-c or gelan-e (detection); gelan-c-seg,
    /// gelan-t-seg or gelan-s-seg (instance segmentation: mask coefficients and prototypes).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Weights (safetensors, names as YOLOv9's fused state dict; see --list-weights).
    /// Without it, weights are seeded random: the model runs but detects nothing useful.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of classes.
    #[arg(long, default_value_t = 80)]
    pub classes: usize,
    /// Class names, one per line (default: class0, class1, ...).
    #[arg(long)]
    pub names: Option<PathBuf>,
    /// Input size in pixels (square, a multiple of 32).
    #[arg(long, default_value_t = 640)]
    pub imgsz: usize,
    /// Dynamic batch dimension (otherwise the batch is fixed to --batch).
    #[arg(long)]
    pub dynamic: bool,
    /// Fixed batch size when not --dynamic.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Use ReLU instead of SiLU after every convolution.
    #[arg(long)]
    pub relu: bool,
}

impl ModelArgs {
    /// The model's configuration and its float ONNX graph.
    pub fn build(&self) -> Result<(ModelConfig, pb::ModelProto)> {
        let mut cfg = ModelConfig::new(&self.model, self.classes, self.imgsz)?;
        if self.relu {
            cfg.activation = Activation::Relu;
        }
        let class_names = match &self.names {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read the class names", path.display()))?;
                let names = kestrel_runtime::labels::parse_class_names(&text);
                if names.len() != self.classes {
                    bail!(
                        "{}: {} class names for --classes {}; give one name per line for each class",
                        path.display(),
                        names.len(),
                        self.classes
                    );
                }
                names
            }
            None => (0..self.classes).map(|i| format!("class{i}")).collect(),
        };
        let options = ExportOptions {
            batch: if self.dynamic { None } else { Some(self.batch) },
            class_names,
        };
        let mut source = match &self.weights {
            Some(path) => {
                if !path.exists() {
                    bail!("{}: weights file not found", path.display());
                }
                WeightSource::File(WeightFile::load(path)?)
            }
            None => WeightSource::Random { seed: self.seed },
        };
        let model = export(&cfg, &mut source, &options)?;
        Ok((cfg, model))
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    spec: ModelArgs,
    /// Also write the model's weights to this safetensors file.
    #[arg(long)]
    save_weights: Option<PathBuf>,
    /// Print the weight names and shapes the model expects, and exit.
    #[arg(long)]
    list_weights: bool,
    /// Output ONNX file.
    #[arg(long, short = 'o', required_unless_present = "list_weights")]
    output: Option<PathBuf>,
    #[command(flatten)]
    end2end: End2EndArgs,
}

/// End-to-end export: NMS (and masks) inside the graph.
#[derive(Debug, clap::Args)]
pub struct End2EndArgs {
    /// Append NMS to the graph: onnx (standard operators: onnxruntime, Kestrel's CPU backend),
    /// efficient-nms-trt (TensorRT 10's EfficientNMS_TRT plugin, detectors only) or trt-inms
    /// (TensorRT 11's INMS layer). Outputs num_dets, det_boxes, det_scores, det_classes (and
    /// det_masks for segmentation models).
    #[arg(long, value_name = "FLAVOUR")]
    pub end2end: Option<String>,
    /// DeepStream layout: one output [batch, anchors, 6] (x1, y1, x2, y2, score, class) for the
    /// DeepStream-Yolo parser, plus labels.txt and config_infer_primary_kestrel.txt next to the
    /// model (detectors only).
    #[arg(long)]
    pub deepstream: bool,
    /// DeepStream: the precision of the engine nvinfer builds (fp32, fp16 or int8).
    #[arg(long, default_value = "fp16")]
    pub deepstream_precision: String,
    /// End-to-end and DeepStream: detections kept per image (K; DeepStream's topk).
    #[arg(long, default_value_t = 100)]
    pub max_det: usize,
    /// End-to-end and DeepStream: NMS IoU threshold.
    #[arg(long, default_value_t = 0.45)]
    pub iou: f32,
    /// End-to-end and DeepStream: score threshold.
    #[arg(long, default_value_t = 0.25)]
    pub conf: f32,
}

impl End2EndArgs {
    /// `model` with NMS appended when `--end2end` was given.
    pub fn apply(&self, model: pb::ModelProto) -> Result<pb::ModelProto> {
        if self.deepstream {
            if self.end2end.is_some() {
                bail!("--deepstream and --end2end are two layouts of the output; give one of them");
            }
            return Ok(append_deepstream_output(model)?);
        }
        let Some(flavour) = &self.end2end else {
            return Ok(model);
        };
        let opts = EndToEnd {
            flavour: NmsFlavour::parse(flavour)?,
            max_detections: self.max_det,
            iou_threshold: self.iou,
            score_threshold: self.conf,
        };
        Ok(append_nms(model, &opts)?)
    }
}

/// `labels.txt` and `config_infer_primary_kestrel.txt` beside the DeepStream-layout `output`.
fn write_deepstream_files(
    a: &Args,
    model: &pb::ModelProto,
    output: &std::path::Path,
) -> Result<()> {
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let names: Vec<String> = model
        .metadata("names")
        .and_then(|n| serde_json::from_str(n).ok())
        .unwrap_or_default();
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, names.join("\n") + "\n")
        .with_context(|| format!("writing {}", labels.display()))?;
    let onnx_file = output
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    let config = nvinfer_config(&NvinferConfig {
        onnx_file,
        labels_file: "labels.txt".into(),
        num_classes: names.len(),
        batch_size: a.spec.batch,
        precision: a.end2end.deepstream_precision.clone(),
        iou_threshold: a.end2end.iou,
        score_threshold: a.end2end.conf,
        top_k: a.end2end.max_det,
    })?;
    let path = dir.join("config_infer_primary_kestrel.txt");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "DeepStream layout: {} and {} written beside the model",
        labels.display(),
        path.display()
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let (cfg, model) = a.spec.build()?;
    let params = inspect::conv_parameters(&model);
    if a.list_weights {
        for (name, t) in &params {
            println!("{name} {:?}", t.shape);
        }
        return Ok(());
    }
    let Some(output) = &a.output else {
        bail!("give the output file with -o FILE.onnx");
    };
    let model = a.end2end.apply(model)?;
    if a.end2end.deepstream {
        write_deepstream_files(&a, &model, output)?;
    }
    onnx::write_model(&model, output)?;
    if let Some(path) = &a.save_weights {
        save_safetensors(path, &params)?;
    }
    let summary = inspect::summarize(&model);
    println!(
        "wrote {} ({}, {} classes, {}x{}, batch {}, {:.3}M parameters, {:.2} GFLOPs{})",
        output.display(),
        cfg.spec.name,
        cfg.num_classes,
        cfg.imgsz[0],
        cfg.imgsz[1],
        if a.spec.dynamic {
            "dynamic".to_string()
        } else {
            a.spec.batch.to_string()
        },
        summary.params as f64 / 1e6,
        summary.flops.unwrap_or(0.0) / 1e9,
        if a.spec.weights.is_none() {
            ", random untrained weights"
        } else {
            ""
        }
    );
    if let Some(flavour) = model.metadata(END2END_KEY) {
        println!(
            "end-to-end ({flavour}): NMS inside, at most {} detections per image, IoU {}, score {}",
            a.end2end.max_det, a.end2end.iou, a.end2end.conf
        );
    }
    Ok(())
}
