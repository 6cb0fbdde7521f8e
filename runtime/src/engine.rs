//! The engine abstraction every backend implements: build an engine from ONNX for a backend,
//! precision and batch profile; run batches.
//!
//! Front ends (CLI, service, GStreamer) only see [`Engine`] and [`EngineInfo`], never a backend type.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use kestrel_exporter::onnx::{decode_model, pb};
use kestrel_exporter::shapes::Dim;

use crate::detection::Detection;
use crate::engine_file::{
    BuildEnvironment, CacheOutcome, EngineCache, EngineFile, EngineHeader, is_engine_file,
};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::letterbox::LetterboxParams;
use crate::masks::{Bitmap, MASK_COEFFICIENTS, PrototypeShape};
use crate::nms::NmsConfig;

/// Where an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// tract-onnx on the CPU: the embedded default, needs nothing installed.
    Cpu,
    /// Kestrel's own GPU engine (cuDNN + NVRTC kernels, CUDA graphs); needs an NVIDIA GPU.
    Cuda,
    /// TensorRT 11 (cargo feature `tensorrt`; needs libnvinfer at run time).
    Tensorrt,
}

/// The error for the `tensorrt` backend in a build without the `tensorrt` feature.
#[cfg(not(feature = "tensorrt"))]
pub fn tensorrt_not_compiled() -> Error {
    Error::InvalidArgument(
        "backend 'tensorrt' is not compiled into this build; rebuild with `--features tensorrt` \
         (e.g. `cargo build --release -p kestrel-service --features tensorrt`), or use --backend \
         cuda or cpu"
            .into(),
    )
}

impl Backend {
    /// Backends compiled into this build.
    #[cfg(not(feature = "tensorrt"))]
    pub const AVAILABLE: &[Backend] = &[Backend::Cpu, Backend::Cuda];
    /// Backends compiled into this build.
    #[cfg(feature = "tensorrt")]
    pub const AVAILABLE: &[Backend] = &[Backend::Cpu, Backend::Cuda, Backend::Tensorrt];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Tensorrt => "tensorrt",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            #[cfg(feature = "tensorrt")]
            "tensorrt" => Ok(Backend::Tensorrt),
            #[cfg(not(feature = "tensorrt"))]
            "tensorrt" => Err(tensorrt_not_compiled()),
            _ => Err(Error::InvalidArgument(format!(
                "unknown backend '{s}'; available backends: cpu, cuda, tensorrt"
            ))),
        }
    }
}

/// Numeric precision an engine is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    /// INT8 where the graph has Q/DQ, FP16 elsewhere.
    Best,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Best => "best",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            "int8" => Ok(Precision::Int8),
            "best" => Ok(Precision::Best),
            _ => Err(Error::InvalidArgument(format!(
                "unknown precision '{s}'; give fp32, fp16, int8 or best"
            ))),
        }
    }
}

/// The batch sizes an engine accepts: `min ≤ opt ≤ max` images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchProfile {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

impl BatchProfile {
    /// Exactly `n` images.
    pub fn fixed(n: usize) -> Self {
        Self {
            min: n,
            opt: n,
            max: n,
        }
    }

    /// Whether `n` images fit the profile.
    pub fn contains(&self, n: usize) -> bool {
        (self.min..=self.max).contains(&n)
    }
}

impl fmt::Display for BatchProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.min, self.opt, self.max)
    }
}

impl FromStr for BatchProfile {
    type Err = Error;
    /// `N` (1:N:N) or `MIN:OPT:MAX`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "batch profile '{s}' is not N or MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (e.g. 1:8:32)"
            ))
        };
        let parts: Vec<usize> = s
            .split(':')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        let p = match parts.as_slice() {
            [n] => Self {
                min: 1,
                opt: *n,
                max: *n,
            },
            [a, b, c] => Self {
                min: *a,
                opt: *b,
                max: *c,
            },
            _ => return Err(bad()),
        };
        if p.min == 0 || p.min > p.opt || p.opt > p.max {
            return Err(bad());
        }
        Ok(p)
    }
}

/// How to build an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    pub backend: Backend,
    pub precision: Precision,
    pub profile: BatchProfile,
    /// The GPU the engine runs on (CUDA device ordinal, 0 = the first) for the `cuda` and
    /// `tensorrt` backends; the `cpu` backend takes 0 only.
    pub device: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Cpu,
            precision: Precision::Fp32,
            profile: BatchProfile {
                min: 1,
                opt: 1,
                max: 32,
            },
            device: 0,
        }
    }
}

/// What a caller needs to know about a built engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    /// Model name from the ONNX metadata (or the file stem).
    pub model_name: String,
    pub backend: Backend,
    pub precision: Precision,
    pub profile: BatchProfile,
    pub input_name: String,
    /// Input height and width in pixels.
    pub input_hw: [usize; 2],
    pub output_name: String,
    /// Rows of `output0`: 4 + classes (+ mask coefficients).
    pub output_channels: usize,
    /// Columns of `output0`.
    pub anchors: usize,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    /// Segmentation models: the shape of each image's prototypes (`output1`); the last
    /// [`crate::masks::MASK_COEFFICIENTS`] rows of `output0` are then mask coefficients.
    pub prototypes: Option<PrototypeShape>,
    /// Segmentation models: the name of the prototype output (empty for detectors).
    pub prototypes_name: String,
    /// End-to-end models (NMS inside the graph, `kestrel export --end2end`): what they return.
    /// `output0` and the prototypes are then internal; run them with [`Engine::run_end_to_end`].
    pub end_to_end: Option<EndToEndInfo>,
}

/// The outputs of an end-to-end model: `num_dets [B, 1]`, `det_boxes [B, K, 4]`,
/// `det_scores [B, K]`, `det_classes [B, K]` and, for segmentation models,
/// `det_masks [B, K, h, w]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndToEndInfo {
    /// How the NMS is expressed (`onnx`, `efficient-nms-trt`, `trt-inms`).
    pub flavour: String,
    /// K: detection rows per image.
    pub max_detections: usize,
    /// The thresholds baked into the graph (IoU, score).
    pub iou_threshold: f32,
    pub score_threshold: f32,
    /// Segmentation models: the mask maps' size in cells (prototype resolution).
    pub masks: Option<PrototypeShape>,
}

/// What an end-to-end model returned for a batch of B images, row-major, K rows per image;
/// rows past an image's `num_dets` are padding.
#[derive(Debug, Clone, Copy)]
pub struct EndToEndOutputs<'a> {
    /// `[B]` detections per image.
    pub num_dets: &'a [i32],
    /// `[B, K, 4]` x1, y1, x2, y2 in input pixels.
    pub boxes: &'a [f32],
    /// `[B, K]`.
    pub scores: &'a [f32],
    /// `[B, K]`.
    pub classes: &'a [i32],
    /// `[B, K, h, w]` mask probabilities at prototype resolution, zero outside each box.
    pub masks: Option<&'a [f32]>,
}

impl EngineInfo {
    /// Values of one image's input (3 × H × W).
    pub fn input_len(&self) -> usize {
        3 * self.input_hw[0] * self.input_hw[1]
    }

    /// Values of one image's `output0` (channels × anchors).
    pub fn output_len(&self) -> usize {
        self.output_channels * self.anchors
    }
}

/// One layer's share of a profiled run.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTime {
    /// What the layer does ("conv int8", "pool", ...).
    pub kind: String,
    /// The tensor it writes and its shape at the profiled batch.
    pub layer: String,
    /// Device time in milliseconds.
    pub ms: f64,
    /// Arithmetic it performs (2 x multiply-adds for convolutions; 0 where not counted).
    pub ops: f64,
    /// How it was timed: as a CUDA graph of its launches (`true`, the way the engine runs), or
    /// by launching it from the host (`false`, where it could not be captured: that adds each
    /// launch's latency to the layer).
    pub in_graph: bool,
}

/// A built engine. `run` takes `batch` letterboxed images, NCHW float32 in [0, 1], and returns
/// `output0` for them, `[batch, channels, anchors]` row-major. The returned slice lives in the
/// engine's own buffer until the next call.
pub trait Engine: Send {
    fn info(&self) -> &EngineInfo;
    fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]>;

    /// Device compute time of `iterations` runs of a batch of `batch` (milliseconds each), with no
    /// host transfers, as trtexec's `--noDataTransfers` measures it; `None` where the backend has no
    /// separate device (the CPU).
    fn time_compute(&mut self, batch: usize, iterations: usize) -> Result<Option<Vec<f64>>> {
        let _ = (batch, iterations);
        Ok(None)
    }

    /// Device time per layer for one run of a batch of `batch`, in execution order; `None`
    /// where the backend cannot measure it.
    fn profile_layers(&mut self, batch: usize) -> Result<Option<Vec<LayerTime>>> {
        let _ = batch;
        Ok(None)
    }

    /// The builder's per-layer choices, recorded in engine files (backend-specific JSON).
    fn layer_choices(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// [`Engine::run`], also returning a segmentation model's prototypes, `[batch, 32, height,
    /// width]` (see [`EngineInfo::prototypes`]); `None` for detectors and for backends that do
    /// not return them.
    fn run_with_prototypes(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<(&[f32], Option<&[f32]>)> {
        Ok((self.run(input, batch)?, None))
    }

    /// The accelerator the engine runs on (GPU name), if any.
    fn device_name(&self) -> Option<String> {
        None
    }

    /// The backend's serialized engine, stored in engine files beside the ONNX (a TensorRT
    /// plan); `None` for backends that rebuild from the ONNX.
    fn serialized_plan(&self) -> Option<&[u8]> {
        None
    }

    /// Run an end-to-end model (see [`EngineInfo::end_to_end`]) on a batch.
    fn run_end_to_end(&mut self, input: &[f32], batch: usize) -> Result<EndToEndOutputs<'_>> {
        let _ = (input, batch);
        Err(Error::InvalidArgument(format!(
            "the {} backend does not run end-to-end models (NMS inside the graph); use \
             --backend cpu, or export without --end2end",
            self.info().backend
        )))
    }

    /// Run a batch and decode + NMS its output on the engine's device with `cfg` (the
    /// end-to-end path): `out[i]` receives image i's detections in its source pixels through
    /// `placements[i]`, exactly what the CPU post-processing of [`Engine::run`]'s output gives.
    /// `Ok(false)` where the backend has no device post-processing; `out` is then untouched.
    fn run_and_detect(
        &mut self,
        input: &[f32],
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        let _ = (input, batch, placements, cfg, out);
        Ok(false)
    }

    /// [`Engine::run_and_detect`] for segmentation models, with the masks decoded on the
    /// engine's device too: `masks[i][k]` is the bitmap of `out[i][k]` at image i's source size.
    /// `Ok(false)` where the backend cannot; nothing is written then.
    fn run_and_detect_masks(
        &mut self,
        input: &[f32],
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        masks: &mut Vec<Vec<Bitmap>>,
    ) -> Result<bool> {
        let _ = (input, batch, placements, cfg, out, masks);
        Ok(false)
    }

    /// The whole detection on the engine's device: letterbox the raw `frames` into the input,
    /// run, decode + NMS with `cfg`. `placements[i]` and `out[i]` receive frame i's placement
    /// and detections (source pixels). `Ok(false)` where the backend cannot; nothing is written
    /// then.
    fn detect_frames(
        &mut self,
        frames: &[Frame],
        cfg: &NmsConfig,
        placements: &mut Vec<LetterboxParams>,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        let _ = (frames, cfg, placements, out);
        Ok(false)
    }

    /// [`Engine::detect_frames`] as a pipeline: start the whole detection of `frames` (thresholds
    /// `cfg`) and return without waiting for the GPU; [`Engine::finish_frames`] gives the
    /// detections, oldest batch first. Up to two batches may be in flight, so the next batch's
    /// upload, letterbox and engine run overlap the previous batch's post-processing and the
    /// host's work. The frames may be dropped or reused when this returns. `Ok(false)` where the
    /// backend cannot; nothing is started then.
    fn start_frames(&mut self, frames: &[Frame], cfg: &NmsConfig) -> Result<bool> {
        let _ = (frames, cfg);
        Ok(false)
    }

    /// Wait for the oldest batch of [`Engine::start_frames`] and write its placements and
    /// detections (as [`Engine::detect_frames`] does); `Ok(false)` when none is in flight.
    fn finish_frames(
        &mut self,
        placements: &mut Vec<LetterboxParams>,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        let _ = (placements, out);
        Ok(false)
    }

    /// Where the last successful [`Engine::detect_frames`] spent its time; `None` where the
    /// backend does not run it.
    fn last_stage_times(&self) -> Option<StageTimes> {
        None
    }
}

/// Wall-clock milliseconds of the stages of one batch from frames to detections.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// Frames to the engine's input (upload, colour conversion, letterbox), milliseconds.
    pub pre_ms: f64,
    /// The engine run, milliseconds.
    pub infer_ms: f64,
    /// Decode, NMS and the detections to the host, milliseconds.
    pub post_ms: f64,
}

/// The model facts the runtime reads from an ONNX file before handing it to a backend: checks that
/// the model is a detector Kestrel understands, with a message naming the problem otherwise.
pub fn describe_model(
    model: &pb::ModelProto,
    path: &Path,
    options: &BuildOptions,
) -> Result<EngineInfo> {
    let err = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    let graph = model.graph();
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(err(format!(
            "the model has {} inputs; Kestrel runs detectors with one image input [batch, 3, H, W]",
            inputs.len()
        )));
    };
    let (elem, dims) = input
        .tensor_shape()
        .ok_or_else(|| err(format!("input '{}' has no tensor shape", input.name)))?;
    if elem != pb::data_type::FLOAT {
        return Err(err(format!(
            "input '{}' is not float32; export the model with a float32 image input",
            input.name
        )));
    }
    if dims.len() != 4 {
        return Err(err(format!(
            "input '{}' has rank {} but an image input must be [batch, 3, H, W]",
            input.name,
            dims.len()
        )));
    }
    if dims[1] != Dim::Fixed(3) {
        return Err(err(format!(
            "input '{}' has {} channels but Kestrel feeds RGB images (3 channels)",
            input.name, dims[1]
        )));
    }
    let (Some(h), Some(w)) = (dims[2].fixed(), dims[3].fixed()) else {
        return Err(err(format!(
            "input '{}' has a dynamic height or width; export with a fixed --imgsz",
            input.name
        )));
    };
    if let Dim::Fixed(b) = dims[0] {
        let b = b as usize;
        if options.profile.min != b || options.profile.max != b {
            return Err(err(format!(
                "the model has a fixed batch of {b}; build with --batch {b}:{b}:{b} or export with --dynamic"
            )));
        }
    }
    if let Some(flavour) = model.metadata(kestrel_exporter::end2end::END2END_KEY) {
        return describe_end_to_end(model, path, options, flavour, &input.name, [h, w]);
    }
    let output = graph
        .output
        .first()
        .ok_or_else(|| err("the model has no outputs".into()))?;
    let (_, odims) = output
        .tensor_shape()
        .ok_or_else(|| err(format!("output '{}' has no tensor shape", output.name)))?;
    let (Some(channels), Some(anchors)) = (
        odims.get(1).and_then(Dim::fixed),
        odims.get(2).and_then(Dim::fixed),
    ) else {
        return Err(err(format!(
            "output '{}' is not [batch, 4 + classes, anchors]; export a YOLOv9/GELAN detector",
            output.name
        )));
    };
    if odims.len() != 3 || channels < 5 {
        return Err(err(format!(
            "output '{}' is not [batch, 4 + classes, anchors]; export a YOLOv9/GELAN detector",
            output.name
        )));
    }
    let num_classes = metadata_classes(model).unwrap_or(channels as usize - 4);
    if num_classes + 4 > channels as usize {
        return Err(err(format!(
            "metadata says {num_classes} classes but output '{}' has only {channels} rows",
            output.name
        )));
    }
    let class_names = class_names(model, num_classes);
    let prototypes =
        prototype_output(graph, channels as usize, num_classes, [h, w]).map_err(err)?;
    let model_name = model
        .metadata("model")
        .map(str::to_string)
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    Ok(EngineInfo {
        model_name,
        backend: options.backend,
        precision: options.precision,
        profile: options.profile,
        input_name: input.name.clone(),
        input_hw: [h as usize, w as usize],
        output_name: output.name.clone(),
        output_channels: channels as usize,
        anchors: anchors as usize,
        num_classes,
        class_names,
        prototypes,
        prototypes_name: if prototypes.is_some() {
            graph
                .output
                .get(1)
                .map(|o| o.name.clone())
                .unwrap_or_default()
        } else {
            String::new()
        },
        end_to_end: None,
    })
}

/// The class names of the model's `names` metadata (JSON list).
fn metadata_names(model: &pb::ModelProto) -> Option<Vec<String>> {
    model
        .metadata("names")
        .and_then(|n| serde_json::from_str(n).ok())
}

/// The class count of the model's metadata: `num_classes`, else the length of `names`.
fn metadata_classes(model: &pb::ModelProto) -> Option<usize> {
    model
        .metadata("num_classes")
        .and_then(|n| n.parse().ok())
        .or(metadata_names(model).as_ref().map(Vec::len))
}

/// The metadata's `num_classes` names, or `class0`, `class1`, … where they are missing or do not
/// fit.
fn class_names(model: &pb::ModelProto, num_classes: usize) -> Vec<String> {
    metadata_names(model)
        .filter(|n| n.len() == num_classes)
        .unwrap_or_else(|| (0..num_classes).map(|i| format!("class{i}")).collect())
}

/// [`describe_model`] for an end-to-end model (`kestrel export --end2end`): its outputs checked
/// against the layout the exporter writes.
fn describe_end_to_end(
    model: &pb::ModelProto,
    path: &Path,
    options: &BuildOptions,
    flavour: &str,
    input_name: &str,
    [h, w]: [i64; 2],
) -> Result<EngineInfo> {
    use kestrel_exporter::end2end::END2END_OUTPUTS;
    let err = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    if flavour == "efficient-nms-trt" {
        return Err(err(
            "this end-to-end model uses TensorRT 10's EfficientNMS_TRT plugin, which only \
             TensorRT runs; export with --end2end onnx for Kestrel's backends and onnxruntime"
                .into(),
        ));
    }
    if options.backend == Backend::Tensorrt {
        return Err(err(format!(
            "an end-to-end model (NMS inside, flavour {flavour}) runs on the cpu and cuda \
             backends; for --backend tensorrt export without --end2end: the engine runs decode \
             and NMS on the GPU itself, with thresholds per call"
        )));
    }
    let graph = model.graph();
    let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let with_masks = names.len() == 5;
    if names.len() < 4 || names[..] != END2END_OUTPUTS[..names.len()] {
        return Err(err(format!(
            "end-to-end outputs {names:?}; expected {:?} (and det_masks for segmentation)",
            &END2END_OUTPUTS[..4]
        )));
    }
    let fixed = |k: usize, d: usize| -> Option<usize> {
        graph.output[k]
            .tensor_shape()
            .and_then(|(_, dims)| dims.get(d).and_then(Dim::fixed))
            .map(|v| v as usize)
    };
    let k = fixed(1, 1).ok_or_else(|| err("det_boxes has no fixed K".into()))?;
    let masks = if with_masks {
        let (Some(mh), Some(mw)) = (fixed(4, 2), fixed(4, 3)) else {
            return Err(err(
                "det_masks is not [batch, K, h, w] with a fixed size".into()
            ));
        };
        Some(PrototypeShape {
            width: mw,
            height: mh,
        })
    } else {
        None
    };
    let meta_f32 = |key: &str| model.metadata(key).and_then(|v| v.parse::<f32>().ok());
    let num_classes =
        metadata_classes(model).ok_or_else(|| err("no num_classes metadata".into()))?;
    let class_names = class_names(model, num_classes);
    Ok(EngineInfo {
        model_name: model
            .metadata("model")
            .map(str::to_string)
            .unwrap_or_else(|| "model".into()),
        backend: options.backend,
        precision: options.precision,
        profile: options.profile,
        input_name: input_name.to_string(),
        input_hw: [h as usize, w as usize],
        output_name: END2END_OUTPUTS[1].to_string(),
        output_channels: 4 + num_classes,
        anchors: 0,
        num_classes,
        class_names,
        prototypes: None,
        prototypes_name: String::new(),
        end_to_end: Some(EndToEndInfo {
            flavour: flavour.to_string(),
            max_detections: k,
            iou_threshold: meta_f32("end2end_iou_threshold").unwrap_or(f32::NAN),
            score_threshold: meta_f32("end2end_score_threshold").unwrap_or(f32::NAN),
            masks,
        }),
    })
}

/// A segmentation model's prototype output (`output1` `[batch, 32, H/4, W/4]`), checked against
/// `output0`'s rows; `None` for a detector (a single output).
fn prototype_output(
    graph: &pb::GraphProto,
    channels: usize,
    num_classes: usize,
    [h, w]: [i64; 2],
) -> std::result::Result<Option<PrototypeShape>, String> {
    let Some(output) = graph.output.get(1) else {
        return Ok(None);
    };
    let dims = output
        .tensor_shape()
        .map(|(_, d)| d)
        .ok_or_else(|| format!("output '{}' has no tensor shape", output.name))?;
    let fixed: Vec<Option<i64>> = dims.iter().map(Dim::fixed).collect();
    match fixed[..] {
        [_, Some(m), Some(ph), Some(pw)]
            if m as usize == MASK_COEFFICIENTS && ph > 0 && pw > 0 && ph <= h && pw <= w =>
        {
            if channels != 4 + num_classes + MASK_COEFFICIENTS {
                return Err(format!(
                    "output0 has {channels} rows; a segmentation model with {num_classes} \
                     classes has {} (4 box, the classes, {MASK_COEFFICIENTS} mask coefficients)",
                    4 + num_classes + MASK_COEFFICIENTS
                ));
            }
            Ok(Some(PrototypeShape {
                width: pw as usize,
                height: ph as usize,
            }))
        }
        _ => Err(format!(
            "second output '{}' is not mask prototypes [batch, {MASK_COEFFICIENTS}, H/4, W/4]; \
             export a YOLOv9/GELAN detector (one output) or segmentation model",
            output.name
        )),
    }
}

/// Build an engine from ONNX bytes. `path` names the model in messages.
pub fn build_engine_from_bytes(
    bytes: &[u8],
    path: &Path,
    options: &BuildOptions,
) -> Result<Box<dyn Engine>> {
    build_replaying(bytes, path, options, None)
}

/// [`build_engine_from_bytes`], replaying what an engine file made in this environment recorded
/// (`recorded`: its header's `layer_choices`, its serialized plan) instead of timing them again:
/// the same plans, so the same results as when the file was built, and a faster load.
fn build_replaying(
    bytes: &[u8],
    path: &Path,
    options: &BuildOptions,
    recorded: Option<&EngineFile>,
) -> Result<Box<dyn Engine>> {
    let model = decode_model(bytes, path).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: e.to_string().replace(&format!("{}: ", path.display()), ""),
    })?;
    let info = describe_model(&model, path, options)?;
    match options.backend {
        Backend::Cpu if options.device != 0 => Err(Error::InvalidArgument(format!(
            "GPU {} was asked for, but the cpu backend runs on the CPU; use --backend cuda \
             (or tensorrt) to place the engine on a GPU, or leave the GPU at 0",
            options.device
        ))),
        Backend::Cpu => Ok(Box::new(crate::cpu::CpuEngine::new(bytes, info, path)?)),
        // An end-to-end model: the GPU runs its plain part, then Kestrel's decode and NMS with
        // the graph's settings (crate::end_to_end).
        Backend::Cuda if info.end_to_end.is_some() => {
            let plain =
                kestrel_exporter::end2end::plain_part(&model).map_err(|e| Error::Model {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            let plain_info = describe_model(&plain, path, options)?;
            Ok(Box::new(
                crate::cuda::CudaEngine::new(
                    &plain,
                    plain_info,
                    path,
                    recorded.map(|f| &f.header.layer_choices),
                    options.device,
                )?
                .with_end_to_end(info)?,
            ))
        }
        Backend::Cuda => Ok(Box::new(crate::cuda::CudaEngine::new(
            &model,
            info,
            path,
            recorded.map(|f| &f.header.layer_choices),
            options.device,
        )?)),
        #[cfg(feature = "tensorrt")]
        Backend::Tensorrt => Ok(Box::new(crate::tensorrt::TensorrtEngine::new(
            &model,
            bytes,
            info,
            path,
            recorded.map(|f| f.plan.as_slice()),
            options.device,
        )?)),
        #[cfg(not(feature = "tensorrt"))]
        Backend::Tensorrt => Err(tensorrt_not_compiled()),
    }
}

/// Build an engine from an ONNX file, or load a Kestrel engine file (whose header then decides the
/// backend, precision and batch profile).
pub fn build_engine(path: &Path, options: &BuildOptions) -> Result<Box<dyn Engine>> {
    open_engine(path, options, None).map(|(engine, _)| engine)
}

/// The environment engines are built in here, for `backend` on GPU `device` (0 for the cpu
/// backend): library versions and device.
pub fn build_environment(backend: Backend, device: usize) -> Result<BuildEnvironment> {
    match backend {
        Backend::Cpu => Ok(BuildEnvironment {
            backend_versions: [("tract".to_string(), "0.23.9".to_string())].into(),
            device: "cpu".into(),
            compute_capability: None,
        }),
        Backend::Cuda => crate::cuda::build_environment(device),
        #[cfg(feature = "tensorrt")]
        Backend::Tensorrt => crate::tensorrt::build_environment(device),
        #[cfg(not(feature = "tensorrt"))]
        Backend::Tensorrt => Err(tensorrt_not_compiled()),
    }
}

/// How [`open_engine`] got its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineSource {
    /// Built from the ONNX file, no cache involved.
    Onnx,
    /// Loaded from the engine file given.
    EngineFile,
    /// Rebuilt from the ONNX inside the engine file given, which did not fit this machine.
    RebuiltFromEngineFile { reason: String },
    /// From the engine cache.
    Cache(CacheOutcome),
}

/// The options an engine file was built with, placed on GPU `device`.
fn options_from_header(header: &EngineHeader, path: &Path, device: usize) -> Result<BuildOptions> {
    let bad = |reason: String| Error::EngineFile {
        path: path.to_path_buf(),
        reason,
    };
    let [min, opt, max] = header.profile;
    Ok(BuildOptions {
        backend: header
            .backend
            .parse()
            .map_err(|e: Error| bad(e.to_string()))?,
        precision: header
            .precision
            .parse()
            .map_err(|e: Error| bad(e.to_string()))?,
        profile: BatchProfile { min, opt, max },
        device,
    })
}

/// Open `path` — an ONNX model (built with `options`, through `cache` when given) or a Kestrel
/// engine file — and say how the engine was obtained.
pub fn open_engine(
    path: &Path,
    options: &BuildOptions,
    cache: Option<&EngineCache>,
) -> Result<(Box<dyn Engine>, EngineSource)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if is_engine_file(&bytes) {
        let file = EngineFile::decode(&bytes, path)?;
        // The file decides how the engine is built; the caller, which GPU runs it.
        let options = options_from_header(&file.header, path, options.device)?;
        let env = build_environment(options.backend, options.device)?;
        // Choices are replayed only where they were made: same libraries, same kind of GPU.
        let (source, recorded) = match file.header.mismatch(&env) {
            None => (EngineSource::EngineFile, Some(&file)),
            Some(reason) => (EngineSource::RebuiltFromEngineFile { reason }, None),
        };
        return Ok((
            build_replaying(&file.onnx, path, &options, recorded)?,
            source,
        ));
    }
    let Some(cache) = cache else {
        return Ok((
            build_engine_from_bytes(&bytes, path, options)?,
            EngineSource::Onnx,
        ));
    };
    let env = build_environment(options.backend, options.device)?;
    let wanted = EngineHeader::new(&bytes, options, &env);
    match cache.lookup(&wanted, &env) {
        Ok(file) => {
            let engine = build_replaying(&file.onnx, path, options, Some(&file))?;
            Ok((engine, EngineSource::Cache(CacheOutcome::Hit)))
        }
        Err(reason) => {
            let engine = build_engine_from_bytes(&bytes, path, options)?;
            let mut header = wanted;
            header.layer_choices = engine.layer_choices();
            let stored = EngineFile {
                header: header.clone(),
                onnx: bytes,
                plan: engine.serialized_plan().unwrap_or_default().to_vec(),
            }
            .write(&cache.path_for(&header));
            // The cache only saves build time: an engine that cannot be stored (disk full,
            // file-size limit, read-only cache folder) is still used, and the outcome says why it
            // was not stored. The write is atomic, so no partial file is left in the cache.
            let reason = match stored {
                Ok(()) => reason,
                Err(e) => format!("{reason}; not stored in the cache: {e}"),
            };
            Ok((engine, EngineSource::Cache(CacheOutcome::Built { reason })))
        }
    }
}

/// Build an engine from an ONNX file and write it as an engine file at `output`.
pub fn build_engine_file(
    onnx_path: &Path,
    options: &BuildOptions,
    output: &Path,
) -> Result<EngineHeader> {
    let bytes = std::fs::read(onnx_path).map_err(|e| Error::io(onnx_path, e))?;
    if is_engine_file(&bytes) {
        return Err(Error::InvalidArgument(format!(
            "{} is already an engine file; give the ONNX model it was built from",
            onnx_path.display()
        )));
    }
    let env = build_environment(options.backend, options.device)?;
    let engine = build_engine_from_bytes(&bytes, onnx_path, options)?;
    let mut header = EngineHeader::new(&bytes, options, &env);
    header.layer_choices = engine.layer_choices();
    EngineFile {
        header: header.clone(),
        onnx: bytes,
        plan: engine.serialized_plan().unwrap_or_default().to_vec(),
    }
    .write(output)?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        assert_eq!(
            "1:8:32".parse::<BatchProfile>().unwrap(),
            BatchProfile {
                min: 1,
                opt: 8,
                max: 32
            }
        );
        assert_eq!(
            "4".parse::<BatchProfile>().unwrap(),
            BatchProfile {
                min: 1,
                opt: 4,
                max: 4
            }
        );
        for bad in ["0", "8:4:16", "1:2", "x", ""] {
            assert!(bad.parse::<BatchProfile>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_names() {
        assert_eq!("cpu".parse::<Backend>().unwrap(), Backend::Cpu);
        assert_eq!("cuda".parse::<Backend>().unwrap(), Backend::Cuda);
        #[cfg(not(feature = "tensorrt"))]
        {
            let e = "tensorrt".parse::<Backend>().unwrap_err().to_string();
            assert!(e.contains("rebuild with `--features tensorrt`"), "{e}");
            assert!(!Backend::AVAILABLE.contains(&Backend::Tensorrt));
        }
        #[cfg(feature = "tensorrt")]
        {
            assert_eq!("tensorrt".parse::<Backend>().unwrap(), Backend::Tensorrt);
            assert!(Backend::AVAILABLE.contains(&Backend::Tensorrt));
        }
        assert_eq!(Backend::Tensorrt.name(), "tensorrt");
        assert!("tpu".parse::<Backend>().is_err());
    }
}
