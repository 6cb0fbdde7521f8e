//! Quantization in the trainer, on the deployment graph ([`crate::graph`]): post-training
//! calibration (max, or histograms with MSE, percentile or entropy), quantization-aware
//! fine-tuning against the float model as teacher, per-layer sensitivity, and export to the Q/DQ
//! ONNX the engines run.
//!
//! Placement is the exporter's (`kestrel_exporter::quantize`): a quantizer on the input and the
//! weight of every convolution, one scale per sharing group (a Concat and its inputs, both inputs
//! of a residual Add and the bottleneck input they share, a pool or upsample and its input, a
//! Split and its input), so the engine runs each group in INT8 without requantizing. The
//! tensors in a group get no quantizer of their own: their values are already on the grid of the
//! convolution that reads them.

use std::collections::HashMap;
use std::path::Path;

use kestrel_exporter::onnx::pb;
use kestrel_exporter::quantize::{
    QuantizePolicy, activation_scales, check_quantizable, head_output_convs, quantize_model_with,
    quantized_convs, sharing_groups_with,
};
use kestrel_exporter::{Activation, ModelConfig, ModelSpec};
use kestrel_runtime::calibrate::{AbsHistogram, CalibrationMethod};
use kestrel_runtime::eval::EvalSummary;
use kestrel_runtime::nms::NmsConfig;
use tch::{Device, Kind, Reduction, Tensor, nn, nn::OptimizerConfig};

use crate::data::{Batch, Source};
use crate::error::{Error, Result};
use crate::eval::{Network, evaluate};
use crate::graph::{ConvQuantizer, GraphNet, layer_of, learned_amax};
use crate::loss::{AssignerConfig, LossWeights, detection_loss};

/// An ONNX detector (float or Q/DQ) as a tch network, with the model configuration from its
/// metadata.
pub struct OnnxNetwork {
    pub config: ModelConfig,
    /// Class names from the metadata (`class0`, … when it has none).
    pub names: Vec<String>,
    pub net: GraphNet,
    vs: nn::VarStore,
}

/// The model configuration Kestrel's exporter records in the metadata.
fn config_from_metadata(model: &pb::ModelProto) -> Result<ModelConfig> {
    let missing = |key: &str| {
        Error::Quantization(format!(
            "the model has no '{key}' metadata: it was not exported by Kestrel; export it with \
             `kestrel-train export` or `kestrel export`"
        ))
    };
    let name = model.metadata("model").ok_or_else(|| missing("model"))?;
    let classes: usize = model
        .metadata("num_classes")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("num_classes"))?;
    let imgsz: [usize; 2] = model
        .metadata("imgsz")
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| missing("imgsz"))?;
    let activation = match model.metadata("activation") {
        Some("relu") => Activation::Relu,
        _ => Activation::Silu,
    };
    let config = ModelConfig {
        spec: ModelSpec::by_name(name)?,
        num_classes: classes,
        imgsz,
        activation,
    };
    config.validate()?;
    Ok(config)
}

impl OnnxNetwork {
    /// Load `model` on `device`.
    pub fn new(model: &pb::ModelProto, device: Device) -> Result<Self> {
        let config = config_from_metadata(model)?;
        let names = model
            .metadata("names")
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .filter(|n| n.len() == config.num_classes)
            .unwrap_or_else(|| {
                (0..config.num_classes)
                    .map(|i| format!("class{i}"))
                    .collect()
            });
        let vs = nn::VarStore::new(device);
        let net = GraphNet::new(model, &vs.root())?;
        Ok(Self {
            config,
            names,
            net,
            vs,
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

impl Network for OnnxNetwork {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn infer(&self, images: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.net.forward(images))
    }

    fn infer_outputs(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        tch::no_grad(|| self.net.forward_outputs_observed(images, |_, _| Ok(())))
    }
}

/// Read an ONNX file for quantization, with clear errors for the files users confuse it with.
pub fn read_float_model(path: &Path) -> Result<pb::ModelProto> {
    let name = path.to_string_lossy();
    if name.ends_with(".safetensors") {
        return Err(Error::Quantization(format!(
            "{name}: a training checkpoint (unfused: BatchNorm and RepConvN branches separate); \
             quantization works on the deployment form. Run `kestrel-train export --weights \
             {name} -o model.onnx` first and quantize model.onnx"
        )));
    }
    let model = kestrel_exporter::read_model(path)?;
    if model
        .graph()
        .node
        .iter()
        .any(|n| n.op_type == "BatchNormalization")
    {
        return Err(Error::Quantization(format!(
            "{name} has BatchNormalization nodes (an unfused model); export the fused model with \
             `kestrel-train export` and quantize that"
        )));
    }
    check_quantizable(&model).map_err(|e| {
        Error::Quantization(format!(
            "{name}: {e}. Quantization starts from the float model it was made from"
        ))
    })?;
    Ok(model)
}

/// Batches for calibration from `source`: letterboxed images without augmentation (no mosaic,
/// flips, zoom, shift or colour jitter), `batch_size` at a time, at most `batches` of them, in a
/// seeded order.
pub fn calibration_batches(
    source: Source,
    imgsz: u32,
    batch_size: usize,
    batches: usize,
    seed: u64,
) -> Result<impl Iterator<Item = Result<Tensor>>> {
    if source.is_empty() {
        return Err(Error::Data(
            "no calibration images: the dataset split is empty; check the data YAML's train: \
             entry"
                .into(),
        ));
    }
    let mut loader = crate::data::Loader::new(source, imgsz, batch_size, seed)?;
    loader.flip = 0.0;
    loader.scale = 0.0;
    loader.translate = 0.0;
    loader.hsv = [0.0; 3];
    loader.mosaic = 0.0;
    let n = loader.batches_per_epoch().min(batches);
    Ok((0..n).map(move |b| loader.batch(0, b).map(|batch| batch.images)))
}

/// A float model with fake quantizers: the student of QAT, the subject of calibration and
/// sensitivity analysis.
pub struct QuantModel {
    /// The float model it came from (structure, metadata, constants).
    float: pb::ModelProto,
    policy: QuantizePolicy,
    /// Calibrated range (amax) of every tensor of every sharing group; empty before calibration.
    amax: HashMap<String, f32>,
    /// With learned ranges ([`QuantModel::learn_ranges`]): per sharing group that feeds a
    /// quantized convolution, its members and the trainable ln(scale) they share.
    learned: Vec<(Vec<String>, Tensor)>,
    pub network: OnnxNetwork,
}

impl QuantModel {
    /// Prepare `float` for quantization on `device`; `keep_head_float` leaves the detection head's
    /// last convolutions (box distances and class logits) in floating point.
    pub fn new(float: pb::ModelProto, device: Device, keep_head_float: bool) -> Result<Self> {
        check_quantizable(&float)?;
        let network = OnnxNetwork::new(&float, device)?;
        let policy = QuantizePolicy {
            float_convs: if keep_head_float {
                head_output_convs(&float).into_iter().collect()
            } else {
                Default::default()
            },
            method: String::new(),
        };
        Ok(Self {
            float,
            policy,
            amax: HashMap::new(),
            learned: Vec::new(),
            network,
        })
    }

    /// Keep every convolution of the top-level layers `layers` (`model.N`) in floating point (call
    /// before calibrating).
    pub fn keep_layers_float(&mut self, layers: &[usize]) -> Result<()> {
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        for layer in layers {
            let convs: Vec<String> = quantized_convs(&self.float, &self.policy)
                .into_iter()
                .map(|(conv, _)| conv)
                .filter(|conv| layer_of(conv) == Some(layer))
                .collect();
            if convs.is_empty() {
                let mut quantized: Vec<usize> = quantized_convs(&self.float, &self.policy)
                    .iter()
                    .filter_map(|(conv, _)| layer_of(conv))
                    .collect();
                quantized.sort_unstable();
                quantized.dedup();
                return Err(Error::Quantization(format!(
                    "layer {layer} has no quantized convolution to keep in floating point; \
                     layers with convolutions: {quantized:?}"
                )));
            }
            self.policy.float_convs.extend(convs);
        }
        if !self.amax.is_empty() {
            let amax = std::mem::take(&mut self.amax);
            let method = self.policy.method.clone();
            self.set_ranges(amax, &method)?;
        }
        Ok(())
    }

    /// The tensors calibration measures: every member of every sharing group.
    pub fn calibration_tensors(&self) -> Vec<String> {
        sharing_groups_with(&self.float, &self.policy)
            .into_iter()
            .flatten()
            .collect()
    }

    /// Calibrate on `batches` (`[B, 3, H, W]` in [0, 1]) with quantization off, then switch the
    /// quantizers on with the ranges `method` picks. Returns the number of images seen.
    pub fn calibrate(
        &mut self,
        batches: impl IntoIterator<Item = Result<Tensor>>,
        method: CalibrationMethod,
        mut progress: impl FnMut(usize),
    ) -> Result<usize> {
        let tensors = self.calibration_tensors();
        let mut slot: HashMap<usize, usize> = HashMap::new();
        for (k, t) in tensors.iter().enumerate() {
            let id = self.network.net.value_id(t).ok_or_else(|| {
                Error::Quantization(format!("tensor '{t}' is not computed by the graph"))
            })?;
            slot.insert(id, k);
        }
        let mut histograms = vec![AbsHistogram::new(); tensors.len()];
        let device = self.network.device();
        let mut images = 0;
        self.network.net.quantize = false;
        let result = (|| -> Result<()> {
            for batch in batches {
                let batch = batch?.to_device(device);
                let n = batch.size()[0] as usize;
                let _output = tch::no_grad(|| {
                    self.network.net.forward_observed(&batch, |id, t| {
                        let Some(&k) = slot.get(&id) else {
                            return Ok(());
                        };
                        let abs = t.abs().flatten(0, -1);
                        let m = abs.max().double_value(&[]) as f32;
                        if !m.is_finite() {
                            return Err(Error::Quantization(format!(
                                "tensor '{}' has non-finite values on calibration batch {}: the \
                                 float model overflows there, so it cannot be calibrated",
                                tensors[k],
                                images / n.max(1) + 1
                            )));
                        }
                        let h = &mut histograms[k];
                        let (width, bins) = h.grow(m);
                        if method.needs_histogram() && width > 0.0 {
                            let idx = (abs / width)
                                .floor()
                                .clamp(0.0, (bins - 1) as f64)
                                .to_kind(Kind::Int64);
                            let counts = idx
                                .bincount(None::<Tensor>, bins as i64)
                                .to_kind(Kind::Double)
                                .to_device(Device::Cpu);
                            h.add_counts(&Vec::<f64>::try_from(counts)?)
                                .map_err(Error::Runtime)?;
                        }
                        Ok(())
                    })
                })?;
                images += n;
                progress(n);
            }
            Ok(())
        })();
        self.network.net.quantize = true;
        result?;
        if images == 0 {
            return Err(Error::Data(
                "no calibration images: the dataset split is empty; check the data YAML's train: \
                 entry"
                    .into(),
            ));
        }
        let amax = tensors
            .iter()
            .zip(&histograms)
            .map(|(t, h)| (t.clone(), h.amax(method)))
            .collect();
        self.set_ranges(amax, &method.label())?;
        Ok(images)
    }

    /// Use the ranges `amax` (tensor → largest |x| covered) for the quantizers; `method` names how
    /// they were found (recorded in exported models).
    pub fn set_ranges(&mut self, amax: HashMap<String, f32>, method: &str) -> Result<()> {
        let scales = activation_scales(&self.float, &amax, &self.policy)?;
        let mut quantizers = HashMap::new();
        for (conv, input) in quantized_convs(&self.float, &self.policy) {
            let scale = scales.get(&input).copied().ok_or_else(|| {
                Error::Quantization(format!("no scale for '{input}', the input of '{conv}'"))
            })?;
            quantizers.insert(
                conv,
                ConvQuantizer {
                    input_scale: f64::from(scale),
                },
            );
        }
        self.network.net.set_quantizers(&quantizers)?;
        self.learned.clear();
        self.amax = amax;
        self.policy.method = method.to_string();
        Ok(())
    }

    /// The calibrated ranges (empty before calibration).
    pub fn ranges(&self) -> &HashMap<String, f32> {
        &self.amax
    }

    /// Make the input scales trainable from here on: one variable (ln of the scale, in optimizer
    /// group [`LEARNED_SCALE_GROUP`]) per sharing group that feeds a quantized convolution,
    /// starting at the calibrated scale. An optimizer built afterwards on the model's variables
    /// trains them; [`QuantModel::current_ranges`] and the export read them back. Calibrating again
    /// returns to fixed scales.
    pub fn learn_ranges(&mut self) -> Result<()> {
        if self.amax.is_empty() {
            return Err(Error::Quantization(
                "the model is not calibrated yet; calibrate before learning its ranges".into(),
            ));
        }
        let scales = activation_scales(&self.float, &self.current_ranges()?, &self.policy)?;
        let convs = quantized_convs(&self.float, &self.policy);
        let root = self.network.vs.root().set_group(LEARNED_SCALE_GROUP);
        let mut by_conv = HashMap::new();
        let mut learned = Vec::new();
        for (g, group) in sharing_groups_with(&self.float, &self.policy)
            .into_iter()
            .enumerate()
        {
            let readers: Vec<&(String, String)> =
                convs.iter().filter(|(_, i)| group.contains(i)).collect();
            let Some((_, input)) = readers.first() else {
                continue;
            };
            let scale = scales.get(input).copied().ok_or_else(|| {
                Error::Quantization(format!("no scale for '{input}', a quantized input"))
            })?;
            let log_scale = root.var(
                &format!("log_input_scale{g}"),
                &[],
                nn::Init::Const(f64::from(scale).ln()),
            );
            for (conv, _) in readers {
                by_conv.insert(conv.clone(), log_scale.shallow_clone());
            }
            learned.push((group, log_scale));
        }
        self.network.net.set_learned_scales(&by_conv)?;
        self.learned = learned;
        Ok(())
    }

    /// The ranges the quantizers use now: the calibrated ones, with the learned scales (if any)
    /// as every member's amax (127 · scale).
    pub fn current_ranges(&self) -> Result<HashMap<String, f32>> {
        let mut amax = self.amax.clone();
        for (group, log_scale) in &self.learned {
            let range = learned_amax(log_scale).double_value(&[]) as f32;
            if !range.is_finite() {
                return Err(Error::Quantization(format!(
                    "the learned scale of '{}' is not finite; lower --scale-lr",
                    group.first().map(String::as_str).unwrap_or("?")
                )));
            }
            for t in group {
                amax.insert(t.clone(), range);
            }
        }
        Ok(amax)
    }

    /// The Q/DQ ONNX of the current weights and ranges, `method` recorded in its metadata
    /// (`kestrel.quantization`).
    pub fn export(&self, method: &str) -> Result<pb::ModelProto> {
        if self.amax.is_empty() {
            return Err(Error::Quantization(
                "the model is not calibrated yet; calibrate before exporting".into(),
            ));
        }
        let mut float = self.float.clone();
        let current: HashMap<&str, &Tensor> = self.network.net.parameters().collect();
        if let Some(graph) = float.graph.as_mut() {
            for init in graph.initializer.iter_mut() {
                if let Some(t) = current.get(init.name.as_str()) {
                    let values =
                        Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).flatten(0, -1))?;
                    *init = pb::TensorProto::from_f32(&init.name, &init.dims, &values);
                }
            }
        }
        let policy = QuantizePolicy {
            method: method.to_string(),
            ..self.policy.clone()
        };
        Ok(quantize_model_with(
            &float,
            &self.current_ranges()?,
            &policy,
        )?)
    }

    /// Evaluate on `source` with the quantizers on, except in `float_layers`.
    pub fn evaluate(
        &self,
        source: &Source,
        batch: usize,
        nms: &NmsConfig,
        progress: impl FnMut(usize),
    ) -> Result<EvalSummary> {
        let device = self.network.device();
        evaluate(&self.network, source, batch, device, nms, progress)
    }
}

/// The optimizer group of learned input scales (the weights are in group 0), so they get their
/// own learning rate.
pub const LEARNED_SCALE_GROUP: usize = 1;

/// The seed recipe's learning rate for QAT epoch `epoch` (0-based): `base` (1e-6 in the recipe),
/// ten times that in epoch 6.
pub fn qat_learning_rate(epoch: usize, base: f64) -> f64 {
    if epoch == 6 { 10.0 * base } else { base }
}

/// What QAT supervises and how.
#[derive(Debug, Clone)]
pub struct QatConfig {
    /// Supervise every `supervision_stride`-th top-level layer (and the last before the head).
    pub supervision_stride: usize,
    /// Also supervise the head: the maps of its last convolutions (box-distance and class logits
    /// per level), rather than `output0`, whose pixel-unit boxes would drown the scores in the
    /// squared error.
    pub supervise_head: bool,
    /// Weight of YOLOv9's detection loss on the ground truth, added to the distillation loss
    /// (0: off, the recipe).
    pub detection_loss: f64,
    /// Learn the activation ranges too (LSQ-style), at this Adam learning rate on ln(scale)
    /// (0: off, the recipe's fixed calibrated ranges).
    pub scale_lr: f64,
}

impl Default for QatConfig {
    fn default() -> Self {
        Self {
            supervision_stride: 1,
            supervise_head: false,
            detection_loss: 0.0,
            scale_lr: 0.0,
        }
    }
}

/// The head's raw output for the detection loss: its last convolutions' maps as (box
/// distributions, class logits) per level, in level order.
struct HeadTaps {
    levels: Vec<(usize, usize)>,
    anchors: Tensor,
    strides: Tensor,
    weight: f64,
}

/// Quantization-aware fine-tuning: the student (fake-quantized) learns to reproduce the float
/// teacher's outputs of the supervised layers (sum of mean squared errors), with Adam.
pub struct Qat {
    teacher: OnnxNetwork,
    optimizer: nn::Optimizer,
    /// Value ids of the supervised tensors (the same in student and teacher: one graph).
    supervised: Vec<usize>,
    head: Option<HeadTaps>,
    scale_lr: f64,
}

impl Qat {
    /// Set up QAT of `student` (calibrated) with the float model it came from as teacher; with
    /// `config.scale_lr` > 0 its input scales become trainable ([`QuantModel::learn_ranges`]).
    pub fn new(student: &mut QuantModel, config: &QatConfig) -> Result<Self> {
        if student.ranges().is_empty() {
            return Err(Error::Quantization(
                "QAT starts from a calibrated model; calibrate first".into(),
            ));
        }
        if config.supervision_stride == 0 {
            return Err(Error::Quantization(
                "supervision stride 0: give 1 or more".into(),
            ));
        }
        let mut teacher = OnnxNetwork::new(&student.float, student.network.device())?;
        teacher.vs.freeze();
        teacher.net.quantize = false;
        let layers = student.network.net.layer_outputs();
        if layers.len() < 2 {
            return Err(Error::Quantization(
                "the graph has no top-level layers (model.N) to supervise".into(),
            ));
        }
        // The last layer is the head; the one before it is always supervised.
        let body = &layers[..layers.len() - 1];
        let mut supervised: Vec<usize> = body
            .iter()
            .step_by(config.supervision_stride)
            .map(|&(_, v)| v)
            .collect();
        if let Some(&(_, last)) = body.last()
            && !supervised.contains(&last)
        {
            supervised.push(last);
        }
        // A segmentation head's prototype branch ends in no body layer: supervise its output.
        if let Some(prototypes) = student.network.net.prototypes_value() {
            supervised.push(prototypes);
        }
        if config.supervise_head {
            let head = head_output_convs(&student.float);
            if head.is_empty() {
                return Err(Error::Quantization(
                    "the model has no detection-head convolutions to supervise".into(),
                ));
            }
            for conv in head {
                let v = student.network.net.node_output(&conv).ok_or_else(|| {
                    Error::Quantization(format!("head convolution '{conv}' is not in the graph"))
                })?;
                supervised.push(v);
            }
        }
        let head = if config.detection_loss > 0.0 {
            Some(head_taps(student, config.detection_loss)?)
        } else if config.detection_loss < 0.0 || !config.detection_loss.is_finite() {
            return Err(Error::Quantization(format!(
                "detection-loss weight {}: give 0 (off) or a positive weight",
                config.detection_loss
            )));
        } else {
            None
        };
        if !(config.scale_lr.is_finite() && config.scale_lr >= 0.0) {
            return Err(Error::Quantization(format!(
                "scale learning rate {}: give 0 (fixed calibrated ranges) or a positive rate",
                config.scale_lr
            )));
        }
        if config.scale_lr > 0.0 {
            student.learn_ranges()?;
        }
        let optimizer = nn::Adam::default().build(&student.network.vs, 1e-6)?;
        Ok(Self {
            teacher,
            optimizer,
            supervised,
            head,
            scale_lr: config.scale_lr,
        })
    }

    /// Names of the supervised tensors.
    pub fn supervised<'a>(&self, student: &'a QuantModel) -> Vec<&'a str> {
        self.supervised
            .iter()
            .map(|&v| student.network.net.value_name(v))
            .collect()
    }

    /// One step on `batch` at learning rate `lr`; returns the loss.
    pub fn step(&mut self, student: &QuantModel, batch: Batch, lr: f64) -> Result<f64> {
        let batch = batch.to_device(student.network.device());
        let images = &batch.images;
        let head_ids: Vec<usize> = self
            .head
            .iter()
            .flat_map(|h| h.levels.iter().flat_map(|&(b, c)| [b, c]))
            .collect();
        let collect = |net: &GraphNet, ids: &[usize]| -> Result<Vec<Tensor>> {
            let mut taken: Vec<Option<Tensor>> = ids.iter().map(|_| None).collect();
            let _output = net.forward_observed(images, |id, t| {
                for (k, &s) in ids.iter().enumerate() {
                    if s == id {
                        taken[k] = Some(t.shallow_clone());
                    }
                }
                Ok(())
            })?;
            taken
                .into_iter()
                .map(|t| {
                    t.ok_or_else(|| {
                        Error::Quantization("a supervised layer was not computed".into())
                    })
                })
                .collect()
        };
        let targets = tch::no_grad(|| collect(&self.teacher.net, &self.supervised))?;
        let wanted: Vec<usize> = self.supervised.iter().chain(&head_ids).copied().collect();
        let outputs = collect(&student.network.net, &wanted)?;
        let mut loss = Tensor::zeros([], (Kind::Float, images.device()));
        for (o, t) in outputs.iter().zip(&targets) {
            loss += o.mse_loss(t, Reduction::Mean);
        }
        if let Some(head) = &self.head {
            let maps = &outputs[self.supervised.len()..];
            let per_level: Vec<Tensor> = maps
                .chunks(2)
                .map(|pair| Tensor::cat(&[&pair[0], &pair[1]], 1).flatten(2, 3))
                .collect();
            let raw = Tensor::cat(&per_level, 2);
            let terms = detection_loss(
                &raw,
                &head.anchors,
                &head.strides,
                &batch.classes,
                &batch.boxes,
                &batch.valid,
                &LossWeights::default(),
                &AssignerConfig::default(),
            )?;
            loss += terms.total * head.weight;
        }
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::Quantization(format!(
                "the QAT loss is {value}; lower the learning rate or recalibrate"
            )));
        }
        self.optimizer.set_lr(lr);
        if self.scale_lr > 0.0 {
            self.optimizer
                .set_lr_group(LEARNED_SCALE_GROUP, self.scale_lr);
        }
        self.optimizer.zero_grad();
        loss.backward();
        self.optimizer.step();
        Ok(value)
    }
}

/// The head's (box, class) convolution pairs of `student`, checked against the layout the
/// detection loss reads: per level, 4 · reg_max box channels then one channel per class.
fn head_taps(student: &QuantModel, weight: f64) -> Result<HeadTaps> {
    // A segmentation head's mask-coefficient convolutions (`cv4`) are not the loss's.
    let convs: Vec<String> = head_output_convs(&student.float)
        .into_iter()
        .filter(|c| !c.contains(".cv4."))
        .collect();
    let config = student.network.config();
    let reg = 4 * kestrel_exporter::spec::REG_MAX as i64;
    let channels = |conv: &str| -> Option<i64> {
        let node = student.float.graph().node.iter().find(|n| n.name == conv)?;
        let w = student
            .float
            .graph()
            .initializer
            .iter()
            .find(|t| Some(&t.name) == node.input.get(1))?;
        w.dims.first().copied()
    };
    let mut levels = Vec::new();
    for pair in convs.chunks(2) {
        let [b, c] = pair else {
            return Err(Error::Quantization(
                "the detection head's convolutions do not come in (box, class) pairs".into(),
            ));
        };
        if channels(b) != Some(reg) || channels(c) != Some(config.num_classes as i64) {
            return Err(Error::Quantization(format!(
                "head convolutions '{b}' and '{c}' are not the box ({reg} channels) and class \
                 ({} channels) maps of one level",
                config.num_classes
            )));
        }
        let id = |conv: &str| {
            student.network.net.node_output(conv).ok_or_else(|| {
                Error::Quantization(format!("head convolution '{conv}' is not in the graph"))
            })
        };
        levels.push((id(b)?, id(c)?));
    }
    if levels.is_empty() {
        return Err(Error::Quantization(
            "the model has no detection head for the detection loss".into(),
        ));
    }
    let (anchors, strides) = crate::model::anchor_points(config, student.network.device());
    Ok(HeadTaps {
        levels,
        anchors,
        strides,
        weight,
    })
}

/// One row of the sensitivity analysis.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerSensitivity {
    /// Top-level layer index (`model.N`).
    pub layer: usize,
    /// The layer's block type in the model spec.
    pub block: String,
    /// mAP@.50:.95 and mAP@.50 with only this layer in floating point.
    pub ap: f64,
    pub ap50: f64,
}

/// For every layer owning quantizers, that layer in floating point and the rest quantized:
/// evaluation on `source`, ranked best first (the layers whose quantization costs the most).
pub fn sensitivity(
    model: &mut QuantModel,
    source: &Source,
    batch: usize,
    nms: &NmsConfig,
    mut progress: impl FnMut(usize, &LayerSensitivity),
) -> Result<Vec<LayerSensitivity>> {
    let layers = model.network.net.quantized_layers();
    let mut rows = Vec::with_capacity(layers.len());
    for (k, layer) in layers.into_iter().enumerate() {
        model.network.net.float_layers = [layer].into_iter().collect();
        let summary = model.evaluate(source, batch, nms, |_| {});
        model.network.net.float_layers.clear();
        let summary = summary?;
        let block = model
            .network
            .config
            .spec
            .layers
            .get(layer)
            .map(|l| {
                let debug = format!("{:?}", l.block);
                debug
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let row = LayerSensitivity {
            layer,
            block,
            ap: summary.ap,
            ap50: summary.ap50,
        };
        progress(k + 1, &row);
        rows.push(row);
    }
    rows.sort_by(|a, b| b.ap.total_cmp(&a.ap).then(a.layer.cmp(&b.layer)));
    Ok(rows)
}
