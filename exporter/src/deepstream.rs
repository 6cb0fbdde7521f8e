//! The DeepStream layout: one output `[B, A, 6]` (x1, y1, x2, y2 in input pixels, best class
//! score, best class index as a float), the layout the widely used DeepStream-Yolo parser library
//! reads (`NvDsInferParseYolo`), plus the `labels.txt` and the nvinfer configuration file that go
//! with it. Like [`crate::end2end`], a pass over an exported detector.

use crate::end2end::{Tail, output_dims};
use crate::error::{Error, Result};
use crate::onnx::pb;
use crate::shapes::Dim;

/// Output name of the DeepStream layout.
pub const DEEPSTREAM_OUTPUT: &str = "output";
/// Metadata key marking a DeepStream-layout model.
pub const DEEPSTREAM_KEY: &str = "deepstream";
/// The parser function of the DeepStream-Yolo library that reads this layout.
pub const PARSER_FUNCTION: &str = "NvDsInferParseYolo";
/// Where DeepStream-Yolo builds that library (relative to the config file).
pub const PARSER_LIBRARY: &str = "nvdsinfer_custom_impl_Yolo/libnvdsinfer_custom_impl_Yolo.so";

/// Replace a detector's `output0 [B, 4 + nc, A]` by `output [B, A, 6]`.
pub fn append_deepstream_output(mut model: pb::ModelProto) -> Result<pb::ModelProto> {
    if model.metadata(crate::end2end::END2END_KEY).is_some()
        || model.metadata(DEEPSTREAM_KEY).is_some()
    {
        return Err(Error::InvalidConfig(
            "the model is end-to-end or DeepStream-layout already; start from the plain export"
                .into(),
        ));
    }
    let nc: usize = model
        .metadata("num_classes")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::InvalidConfig(
                "the model has no num_classes metadata; the DeepStream layout works on models \
                 Kestrel exported"
                    .into(),
            )
        })?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::InvalidConfig("the model has no graph".into()))?;
    if graph.output.len() != 1 {
        return Err(Error::InvalidConfig(
            "the DeepStream layout covers detectors (one output); a segmentation model has \
             prototypes too: export it plain or with --end2end onnx"
                .into(),
        ));
    }
    let head = output_dims(graph, crate::OUTPUT_NAME).ok_or_else(|| {
        Error::InvalidConfig("the model has no output0 [batch, 4 + classes, anchors]".into())
    })?;
    let (Some(channels), Some(anchors)) = (
        head.get(1).and_then(Dim::fixed),
        head.get(2).and_then(Dim::fixed),
    ) else {
        return Err(Error::InvalidConfig(format!(
            "output0 {head:?} is not [batch, 4 + classes, anchors]"
        )));
    };
    if channels as usize != 4 + nc {
        return Err(Error::InvalidConfig(format!(
            "output0 has {channels} rows for {nc} classes; expected {}",
            4 + nc
        )));
    }
    let batch = head.first().cloned().unwrap_or(Dim::Symbol("batch".into()));
    graph.output.clear();
    let mut t = Tail::new(graph, 0);
    let out0 = crate::OUTPUT_NAME;
    // [B, 4, A] xywh → corners, [B, nc, A] scores → best score and its class, all [B, ·, A].
    let centre = t.slice(out0, 1, 0, 2);
    let size = t.slice(out0, 1, 2, 4);
    let half = t.floats("half", &[], &[0.5]);
    let half_size = t.op("Mul", &[&size, &half], vec![]);
    let top_left = t.op("Sub", &[&centre, &half_size], vec![]);
    let bottom_right = t.op("Add", &[&centre, &half_size], vec![]);
    let scores = t.slice(out0, 1, 4, 4 + nc as i64);
    // Opset 17's ReduceMax takes its axes as an attribute (an input only from opset 18).
    let best = t.op(
        "ReduceMax",
        &[&scores],
        vec![
            pb::AttributeProto::ints("axes", &[1]),
            pb::AttributeProto::int("keepdims", 1),
        ],
    );
    let class = t.op(
        "ArgMax",
        &[&scores],
        vec![
            pb::AttributeProto::int("axis", 1),
            pb::AttributeProto::int("keepdims", 1),
        ],
    );
    let class = t.cast(&class, pb::data_type::FLOAT);
    let rows = t.concat(&[&top_left, &bottom_right, &best, &class], 1);
    let out = t.transpose(&rows, &[0, 2, 1]);
    let _ = t.rename_last(&out, DEEPSTREAM_OUTPUT);
    let mut vi = pb::ValueInfoProto::tensor(
        DEEPSTREAM_OUTPUT,
        pb::data_type::FLOAT,
        &[batch, Dim::Fixed(anchors), Dim::Fixed(6)],
    );
    vi.doc_string = "per anchor: x1, y1, x2, y2 in input pixels, best class score, best class \
                     index (float); DeepStream-Yolo's layout, before NMS"
        .into();
    t.graph.output.push(vi);
    model.metadata_props.push(pb::StringStringEntryProto {
        key: DEEPSTREAM_KEY.into(),
        value: "[batch, anchors, 6]: x1, y1, x2, y2, score, class".into(),
    });
    model.doc_string.push_str(
        " DeepStream layout: output 'output' [batch, anchors, 6] = x1, y1, x2, y2 (input pixels), \
         best class score, best class index.",
    );
    Ok(model)
}

/// What the nvinfer configuration records.
#[derive(Debug, Clone, PartialEq)]
pub struct NvinferConfig {
    /// The ONNX file name, relative to the config file.
    pub onnx_file: String,
    /// The labels file name, relative to the config file.
    pub labels_file: String,
    pub num_classes: usize,
    /// Frames per batch DeepStream builds the engine for.
    pub batch_size: usize,
    /// `fp32`, `fp16` or `int8` (an INT8 engine needs a Q/DQ model: no calibration table).
    pub precision: String,
    /// NMS IoU threshold and the score threshold before clustering.
    pub iou_threshold: f32,
    pub score_threshold: f32,
    /// Detections kept per frame after NMS.
    pub top_k: usize,
}

/// The nvinfer configuration file (GLib key-file format) for a DeepStream-layout model, each key
/// explained in a comment.
pub fn nvinfer_config(c: &NvinferConfig) -> Result<String> {
    let mode = match c.precision.as_str() {
        "fp32" => 0,
        "int8" => 1,
        "fp16" => 2,
        other => {
            return Err(Error::InvalidConfig(format!(
                "DeepStream precision '{other}': give fp32, fp16 or int8"
            )));
        }
    };
    if c.batch_size == 0 || c.top_k == 0 {
        return Err(Error::InvalidConfig(
            "DeepStream batch size and top-k must be at least 1".into(),
        ));
    }
    let engine = format!(
        "{}_b{}_gpu0_{}.engine",
        c.onnx_file.trim_end_matches(".onnx"),
        c.batch_size,
        c.precision
    );
    Ok(format!(
        "# nvinfer configuration for a Kestrel export in DeepStream layout (kestrel export --deepstream).
# Use it as the config-file-path of an nvinfer element (primary detector).

[property]
# The GPU to run on.
gpu-id=0
# Pixels are scaled by this before inference: 1/255, as the model takes RGB in [0, 1].
net-scale-factor=0.0039215697906911373
# 0: RGB input (the model's channel order).
model-color-format=0
# The ONNX model; DeepStream builds a TensorRT engine from it on the first run.
onnx-file={onnx}
# Where DeepStream writes (and later reuses) that engine.
model-engine-file={engine}
# One class name per line, in class-index order.
labelfile-path={labels}
# Frames per batch the engine is built for (the model has a dynamic batch).
batch-size={batch}
# Precision of the engine: 0 FP32, 1 INT8 (a Q/DQ model: no calibration table needed), 2 FP16.
network-mode={mode}
# Classes the model detects.
num-detected-classes={nc}
# Infer on every frame (N: skip N frames between inferences).
interval=0
# The id downstream elements use to find this detector's metadata.
gie-unique-id=1
# 1: primary detector, on whole frames.
process-mode=1
# 0: detector.
network-type=0
# 2: NMS clustering (the model's output is before NMS).
cluster-mode=2
# Letterbox like the model was trained: keep the aspect ratio...
maintain-aspect-ratio=1
# ...and pad both sides equally (centred), as Kestrel's and YOLO's letterbox do.
symmetric-padding=1
# The output parser of the DeepStream-Yolo library, which reads [batch, anchors, 6].
parse-bbox-func-name={parser}
# That library, built from DeepStream-Yolo's sources (not shipped by Kestrel).
custom-lib-path={library}

[class-attrs-all]
# NMS IoU threshold.
nms-iou-threshold={iou}
# Boxes below this score are dropped before NMS.
pre-cluster-threshold={score}
# Detections kept per frame after NMS.
topk={topk}
",
        onnx = c.onnx_file,
        engine = engine,
        labels = c.labels_file,
        batch = c.batch_size,
        mode = mode,
        nc = c.num_classes,
        parser = PARSER_FUNCTION,
        library = PARSER_LIBRARY,
        iou = c.iou_threshold,
        score = c.score_threshold,
        topk = c.top_k,
    ))
}
