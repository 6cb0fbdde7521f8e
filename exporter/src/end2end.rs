//! End-to-end models: a pass that appends non-maximum suppression (and, for segmentation models,
//! each detection's mask) to an exported graph, so the model returns final detections:
//!
//! - `num_dets [B, 1]` int32: detections per image;
//! - `det_boxes [B, K, 4]` float32: x1, y1, x2, y2 in input pixels;
//! - `det_scores [B, K]` float32;
//! - `det_classes [B, K]` int32;
//! - `det_masks [B, K, H/4, W/4]` float32 (segmentation models): each detection's mask
//!   probability at prototype resolution, zero beyond [`MASK_MARGIN`] cells around its box:
//!   upsample, then crop to the box (YOLOv9's `process_mask_native`), as Kestrel's detector does.
//!
//! Rows past `num_dets` hold zeros (classes −1; masks are zero as their boxes are). Three flavours of the NMS step ([`NmsFlavour`]):
//! standard ONNX operators for onnxruntime and Kestrel's CPU backend, TensorRT 10's
//! `EfficientNMS_TRT` plugin node, and the standard graph laid out for TensorRT 11's ONNX parser,
//! which maps `NonMaxSuppression` onto its INMS layer. The pass works on any exported model with
//! Kestrel's `output0` (and `output1`), float or Q/DQ, like a tract model pass: it reads the
//! graph, appends the tail and rewrites the outputs and metadata.

use crate::error::{Error, Result};
use crate::onnx::pb;
use crate::shapes::Dim;

/// How the NMS step is expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NmsFlavour {
    /// `NonMaxSuppression`, `TopK`, `GatherND`: runs in onnxruntime and Kestrel's CPU backend.
    Onnx,
    /// One `EfficientNMS_TRT` node (domain `TRT`), the plugin TensorRT 10 ships. Detectors only:
    /// the plugin returns no detection indices to gather masks with.
    EfficientNmsTrt,
    /// The standard graph for TensorRT 11's ONNX parser, which builds an INMS layer from
    /// `NonMaxSuppression` (no plugin): thresholds and K as initializers, int32 indices.
    TensorRtInms,
}

impl NmsFlavour {
    /// The name used on the command line and in the model metadata.
    pub fn label(self) -> &'static str {
        match self {
            NmsFlavour::Onnx => "onnx",
            NmsFlavour::EfficientNmsTrt => "efficient-nms-trt",
            NmsFlavour::TensorRtInms => "trt-inms",
        }
    }

    /// Parse [`NmsFlavour::label`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "onnx" => Ok(NmsFlavour::Onnx),
            "efficient-nms-trt" | "trt10" => Ok(NmsFlavour::EfficientNmsTrt),
            "trt-inms" | "trt11" => Ok(NmsFlavour::TensorRtInms),
            other => Err(Error::InvalidConfig(format!(
                "end-to-end flavour '{other}': give onnx (onnxruntime, Kestrel's CPU backend), \
                 efficient-nms-trt (TensorRT 10's EfficientNMS_TRT plugin) or trt-inms \
                 (TensorRT 11's INMS layer)"
            ))),
        }
    }
}

/// Settings of the appended NMS, recorded in the model's metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndToEnd {
    pub flavour: NmsFlavour,
    /// K: detections kept per image.
    pub max_detections: usize,
    /// A box is suppressed by a kept box of its class with IoU above this (0–1).
    pub iou_threshold: f32,
    /// Candidates need a score above this (0–1).
    pub score_threshold: f32,
}

impl Default for EndToEnd {
    /// YOLOv9's end-to-end export: K 100, IoU 0.45, score 0.25.
    fn default() -> Self {
        Self {
            flavour: NmsFlavour::Onnx,
            max_detections: 100,
            iou_threshold: 0.45,
            score_threshold: 0.25,
        }
    }
}

/// Cells kept around each box in `det_masks`: bilinear upsampling reads up to 1.5 cells beyond a
/// box's edge, so with 2 the upsampled mask, cropped to the box, equals the plain model's.
pub const MASK_MARGIN: f32 = 2.0;

/// Metadata key holding the flavour of an end-to-end model (absent on plain models).
pub const END2END_KEY: &str = "end2end";
/// Output names of end-to-end models, in order.
pub const END2END_OUTPUTS: [&str; 5] = [
    "num_dets",
    "det_boxes",
    "det_scores",
    "det_classes",
    "det_masks",
];

/// Appends nodes and initializers to a graph without shape inference (the tail's shapes are
/// data-dependent: NMS decides how many boxes there are).
pub(crate) struct Tail<'a> {
    pub(crate) graph: &'a mut pb::GraphProto,
    pub(crate) counter: usize,
}

impl<'a> Tail<'a> {
    pub(crate) fn new(graph: &'a mut pb::GraphProto, prefix_counter: usize) -> Self {
        Self {
            graph,
            counter: prefix_counter,
        }
    }

    pub(crate) fn name(&mut self, base: &str) -> String {
        self.counter += 1;
        format!("end2end.{base}.{}", self.counter)
    }

    pub(crate) fn node(
        &mut self,
        op: &str,
        base: &str,
        inputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
        outputs: usize,
    ) -> Vec<String> {
        let name = self.name(base);
        let outs: Vec<String> = (0..outputs).map(|k| format!("{name}_out{k}")).collect();
        self.graph.node.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name,
            op_type: op.into(),
            attribute: attributes,
            ..Default::default()
        });
        outs
    }

    pub(crate) fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
    ) -> String {
        let base = op.to_lowercase();
        self.node(op, &base, inputs, attributes, 1).remove(0)
    }

    pub(crate) fn ints(&mut self, base: &str, values: &[i64]) -> String {
        let name = self.name(base);
        self.graph.initializer.push(pb::TensorProto::from_i64(
            &name,
            &[values.len() as i64],
            values,
        ));
        name
    }

    pub(crate) fn floats(&mut self, base: &str, dims: &[i64], values: &[f32]) -> String {
        let name = self.name(base);
        self.graph
            .initializer
            .push(pb::TensorProto::from_f32(&name, dims, values));
        name
    }

    /// `x[..., start:end]` on `axis`.
    pub(crate) fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let s = self.ints("start", &[start]);
        let e = self.ints("end", &[end]);
        let a = self.ints("axis", &[axis]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    pub(crate) fn cast(&mut self, x: &str, to: i32) -> String {
        self.op(
            "Cast",
            &[x],
            vec![pb::AttributeProto::int("to", i64::from(to))],
        )
    }

    pub(crate) fn unsqueeze(&mut self, x: &str, axis: i64) -> String {
        let a = self.ints("axes", &[axis]);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    pub(crate) fn squeeze(&mut self, x: &str, axis: i64) -> String {
        let a = self.ints("axes", &[axis]);
        self.op("Squeeze", &[x, &a], vec![])
    }

    pub(crate) fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op(
            "Transpose",
            &[x],
            vec![pb::AttributeProto::ints("perm", perm)],
        )
    }

    pub(crate) fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.op("Concat", xs, vec![pb::AttributeProto::int("axis", axis)])
    }

    /// Rename `value` (the output of the last node) to `name`; returns `name`.
    pub(crate) fn rename_last(&mut self, value: &str, name: &str) -> String {
        if let Some(n) = self.graph.node.last_mut() {
            for o in n.output.iter_mut().filter(|o| *o == value) {
                *o = name.to_string();
            }
        }
        name.to_string()
    }
}

/// The shape of graph output `name`.
pub(crate) fn output_dims(graph: &pb::GraphProto, name: &str) -> Option<Vec<Dim>> {
    graph
        .output
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| o.tensor_shape())
        .map(|(_, d)| d)
}

/// Append NMS (and masks) to `model`, an exported detector or segmentation model with
/// `output0 [B, 4 + nc (+ 32), A]` (and `output1 [B, 32, H/4, W/4]`); see the module docs.
pub fn append_nms(mut model: pb::ModelProto, opts: &EndToEnd) -> Result<pb::ModelProto> {
    if model.metadata(END2END_KEY).is_some() {
        return Err(Error::InvalidConfig(
            "the model is already end-to-end (it has NMS inside); start from the plain export"
                .into(),
        ));
    }
    if opts.max_detections == 0 {
        return Err(Error::InvalidConfig(
            "end-to-end: K (detections per image) must be at least 1".into(),
        ));
    }
    for (what, v) in [
        ("IoU threshold", opts.iou_threshold),
        ("score threshold", opts.score_threshold),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(Error::InvalidConfig(format!(
                "end-to-end: the {what} {v} is outside [0, 1]"
            )));
        }
    }
    let nc: usize = model
        .metadata("num_classes")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::InvalidConfig(
                "the model has no num_classes metadata; end-to-end export works on models \
                 Kestrel exported"
                    .into(),
            )
        })?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::InvalidConfig("the model has no graph".into()))?;
    let head = output_dims(graph, crate::OUTPUT_NAME).ok_or_else(|| {
        Error::InvalidConfig("the model has no output0 [batch, 4 + classes, anchors]".into())
    })?;
    let channels = head.get(1).and_then(Dim::fixed).unwrap_or(0) as usize;
    let prototypes = output_dims(graph, crate::export::PROTOTYPES_NAME);
    let nm = channels.saturating_sub(4 + nc);
    if head.len() != 3 || channels < 4 + nc || (prototypes.is_some() != (nm > 0)) {
        return Err(Error::InvalidConfig(format!(
            "output0 {head:?} does not fit a {nc}-class detector or segmentation model"
        )));
    }
    if prototypes.is_some() && opts.flavour == NmsFlavour::EfficientNmsTrt {
        return Err(Error::InvalidConfig(
            "EfficientNMS_TRT returns no detection indices, so the masks of a segmentation \
             model cannot be gathered after it; use --end2end onnx or --end2end trt-inms"
                .into(),
        ));
    }
    let batch = head.first().cloned().unwrap_or(Dim::Symbol("batch".into()));
    let k = opts.max_detections as i64;
    graph
        .output
        .retain(|o| o.name != crate::OUTPUT_NAME && o.name != crate::export::PROTOTYPES_NAME);
    let mut t = Tail { graph, counter: 0 };
    let out0 = crate::OUTPUT_NAME;

    // Boxes [B, A, 4] as corners, scores [B, nc, A] (NonMaxSuppression's layouts).
    let xywh = t.slice(out0, 1, 0, 4);
    let xywh = t.transpose(&xywh, &[0, 2, 1]);
    let centre = t.slice(&xywh, 2, 0, 2);
    let size = t.slice(&xywh, 2, 2, 4);
    let half = t.floats("half", &[], &[0.5]);
    let half_size = t.op("Mul", &[&size, &half], vec![]);
    let top_left = t.op("Sub", &[&centre, &half_size], vec![]);
    let bottom_right = t.op("Add", &[&centre, &half_size], vec![]);
    let boxes = t.concat(&[&top_left, &bottom_right], 2);
    let scores = t.slice(out0, 1, 4, 4 + nc as i64);

    if opts.flavour == NmsFlavour::EfficientNmsTrt {
        // The plugin takes scores [B, A, nc] and does the rest.
        let scores_t = t.transpose(&scores, &[0, 2, 1]);
        t.node(
            "EfficientNMS_TRT",
            "efficient_nms",
            &[&boxes, &scores_t],
            vec![
                pb::AttributeProto::int("background_class", -1),
                // 0: boxes are corners (x1, y1, x2, y2).
                pb::AttributeProto::int("box_coding", 0),
                pb::AttributeProto::float("iou_threshold", opts.iou_threshold),
                pb::AttributeProto::int("max_output_boxes", k),
                pb::AttributeProto::string("plugin_version", "1"),
                // 0: the scores are already sigmoid probabilities.
                pb::AttributeProto::int("score_activation", 0),
                pb::AttributeProto::float("score_threshold", opts.score_threshold),
                pb::AttributeProto::int("class_agnostic", 0),
            ],
            4,
        );
        if let Some(n) = t.graph.node.last_mut() {
            n.domain = "TRT".into();
            n.output = END2END_OUTPUTS[..4].iter().map(|s| s.to_string()).collect();
        }
    } else {
        let max_per_class = t.ints("max_output_boxes_per_class", &[k]);
        let iou = t.floats("iou_threshold", &[1], &[opts.iou_threshold]);
        let score = t.floats("score_threshold", &[1], &[opts.score_threshold]);
        // [N, 3]: (image, class, anchor) of each kept box.
        let selected = t.op(
            "NonMaxSuppression",
            &[&boxes, &scores, &max_per_class, &iou, &score],
            vec![pb::AttributeProto::int("center_point_box", 0)],
        );
        let selected = if opts.flavour == NmsFlavour::TensorRtInms {
            // TensorRT's INMS layer produces int32 indices; make the graph say so explicitly.
            let s32 = t.cast(&selected, pb::data_type::INT32);
            t.cast(&s32, pb::data_type::INT64)
        } else {
            selected
        };
        let column = |t: &mut Tail, c: i64| {
            let idx = t.ints("column", &[c]);
            let g = t.op(
                "Gather",
                &[&selected, &idx],
                vec![pb::AttributeProto::int("axis", 1)],
            );
            t.squeeze(&g, 1)
        };
        let image = column(&mut t, 0);
        let class = column(&mut t, 1);
        let anchor = column(&mut t, 2);
        let kept_scores = t.op("GatherND", &[&scores, &selected], vec![]);
        let image_col = t.unsqueeze(&image, 1);
        let anchor_col = t.unsqueeze(&anchor, 1);
        let image_anchor = t.concat(&[&image_col, &anchor_col], 1);
        let kept_boxes = t.op("GatherND", &[&boxes, &image_anchor], vec![]);

        // Per image, the K best of the kept boxes: a [B, N + K] table of scores (−1 where a box
        // belongs to another image, K padding columns), TopK, then gathers from the padded
        // per-box arrays.
        let shape = t.op("Shape", &[out0], vec![]);
        let zero = t.ints("zero", &[0]);
        let batch_size = t.op("Gather", &[&shape, &zero], vec![]);
        let batch_scalar = t.squeeze(&batch_size, 0);
        let zero_s = t.name("zero_scalar");
        t.graph
            .initializer
            .push(pb::TensorProto::from_i64(&zero_s, &[], &[0]));
        let one_s = t.name("one_scalar");
        t.graph
            .initializer
            .push(pb::TensorProto::from_i64(&one_s, &[], &[1]));
        let images = t.op("Range", &[&zero_s, &batch_scalar, &one_s], vec![]);
        let images_col = t.unsqueeze(&images, 1);
        let image_row = t.unsqueeze(&image, 0);
        let mine = t.op("Equal", &[&images_col, &image_row], vec![]);
        let score_row = t.unsqueeze(&kept_scores, 0);
        let minus_one = t.floats("minus_one", &[], &[-1.0]);
        let table = t.op("Where", &[&mine, &score_row, &minus_one], vec![]);
        let k_ints = t.ints("k", &[k]);
        let pad_shape = t.concat(&[&batch_size, &k_ints], 0);
        let pad = t.op(
            "ConstantOfShape",
            &[&pad_shape],
            vec![pb::AttributeProto {
                name: "value".into(),
                r#type: pb::AttributeType::Tensor as i32,
                t: Some(pb::TensorProto::from_f32("value", &[1], &[-1.0])),
                ..Default::default()
            }],
        );
        let table = t.concat(&[&table, &pad], 1);
        let top = t.node(
            "TopK",
            "topk",
            &[&table, &k_ints],
            vec![
                pb::AttributeProto::int("axis", 1),
                pb::AttributeProto::int("largest", 1),
                pb::AttributeProto::int("sorted", 1),
            ],
            2,
        );
        let (top_scores, top_index) = (&top[0], &top[1]);
        let threshold = t.floats("valid_above", &[], &[-0.5]);
        let valid = t.op("Greater", &[top_scores, &threshold], vec![]);
        // num_dets [B, 1].
        let valid_i = t.cast(&valid, pb::data_type::INT32);
        let axes1 = t.ints("axes", &[1]);
        let count = t.op(
            "ReduceSum",
            &[&valid_i, &axes1],
            vec![pb::AttributeProto::int("keepdims", 1)],
        );
        let _ = t.rename_last(&count, END2END_OUTPUTS[0]);
        // Padded per-box arrays: N rows then K rows of padding.
        let pad_rows = |t: &mut Tail, x: &str, row: &[i64], fill_f32: Option<f32>| -> String {
            let mut dims = vec![k];
            dims.extend_from_slice(row);
            let n: i64 = dims.iter().product();
            let fill = match fill_f32 {
                Some(v) => t.floats("pad", &dims, &vec![v; n as usize]),
                None => {
                    let name = t.name("pad");
                    t.graph.initializer.push(pb::TensorProto::from_i64(
                        &name,
                        &dims,
                        &vec![-1; n as usize],
                    ));
                    name
                }
            };
            t.concat(&[x, &fill], 0)
        };
        let boxes_p = pad_rows(&mut t, &kept_boxes, &[4], Some(0.0));
        let det_boxes = t.op("Gather", &[&boxes_p, top_index], vec![]);
        let valid_col = t.unsqueeze(&valid, 2);
        let zero_f = t.floats("zero_f", &[], &[0.0]);
        let det_boxes = t.op("Where", &[&valid_col, &det_boxes, &zero_f], vec![]);
        let det_boxes = t.rename_last(&det_boxes, END2END_OUTPUTS[1]);
        let det_scores = t.op("Where", &[&valid, top_scores, &zero_f], vec![]);
        let _ = t.rename_last(&det_scores, END2END_OUTPUTS[2]);
        // TopK may pick another image's row where this image has fewer than K: mark those -1.
        let class_p = pad_rows(&mut t, &class, &[], None);
        let det_classes = t.op("Gather", &[&class_p, top_index], vec![]);
        let minus_one_i = t.ints("minus_one_i", &[-1]);
        let det_classes = t.op("Where", &[&valid, &det_classes, &minus_one_i], vec![]);
        let det_classes = t.cast(&det_classes, pb::data_type::INT32);
        let _ = t.rename_last(&det_classes, END2END_OUTPUTS[3]);

        if let Some(pdims) = &prototypes {
            let (Some(ph), Some(pw)) = (
                pdims.get(2).and_then(Dim::fixed),
                pdims.get(3).and_then(Dim::fixed),
            ) else {
                return Err(Error::InvalidConfig(format!(
                    "output1 {pdims:?} is not [batch, 32, H/4, W/4] with a fixed size"
                )));
            };
            let input_hw = t
                .graph
                .input
                .first()
                .and_then(|i| i.tensor_shape())
                .map(|(_, d)| d)
                .and_then(|d| Some([d.get(2)?.fixed()?, d.get(3)?.fixed()?]))
                .ok_or_else(|| {
                    Error::InvalidConfig("the image input has no fixed height and width".into())
                })?;
            let nm_i = nm as i64;
            // Coefficients [B, A, nm] → kept [N, nm] → padded, gathered [B, K, nm].
            let coef = t.slice(out0, 1, 4 + nc as i64, channels as i64);
            let coef = t.transpose(&coef, &[0, 2, 1]);
            let kept_coef = t.op("GatherND", &[&coef, &image_anchor], vec![]);
            let coef_p = pad_rows(&mut t, &kept_coef, &[nm_i], Some(0.0));
            let det_coef = t.op("Gather", &[&coef_p, top_index], vec![]);
            // [B, K, nm] x [B, nm, h·w] → sigmoid → [B, K, h, w].
            let flat_shape = t.ints("proto_shape", &[0, nm_i, ph * pw]);
            let protos = t.op(
                "Reshape",
                &[crate::export::PROTOTYPES_NAME, &flat_shape],
                vec![],
            );
            let logits = t.op("MatMul", &[&det_coef, &protos], vec![]);
            let probs = t.op("Sigmoid", &[&logits], vec![]);
            let mask_shape = t.ints("mask_shape", &[0, k, ph, pw]);
            let probs = t.op("Reshape", &[&probs, &mask_shape], vec![]);
            // crop_mask: cells (c, r) with x1 <= c < x2 and y1 <= r < y2, boxes in cells.
            let to_cells = t.floats(
                "to_cells",
                &[4],
                &[
                    pw as f32 / input_hw[1] as f32,
                    ph as f32 / input_hw[0] as f32,
                    pw as f32 / input_hw[1] as f32,
                    ph as f32 / input_hw[0] as f32,
                ],
            );
            let cells = t.op("Mul", &[&det_boxes, &to_cells], vec![]);
            let edge = |t: &mut Tail, c: i64| {
                let e = t.slice(&cells, 2, c, c + 1);
                t.unsqueeze(&e, 3)
            };
            let (x1, y1, x2, y2) = (
                edge(&mut t, 0),
                edge(&mut t, 1),
                edge(&mut t, 2),
                edge(&mut t, 3),
            );
            let cols = t.floats(
                "cols",
                &[1, 1, 1, pw],
                &(0..pw).map(|v| v as f32).collect::<Vec<_>>(),
            );
            let rows = t.floats(
                "rows",
                &[1, 1, ph, 1],
                &(0..ph).map(|v| v as f32).collect::<Vec<_>>(),
            );
            // Kept: cells within MASK_MARGIN cells of the box, so that sampling the map at the
            // source resolution, then cropping to the box there (what Kestrel's decoder does, as
            // YOLOv9's process_mask_native), sees exactly the cells the plain model gives.
            let margin = t.floats("margin", &[], &[MASK_MARGIN]);
            let x1 = t.op("Sub", &[&x1, &margin], vec![]);
            let y1 = t.op("Sub", &[&y1, &margin], vec![]);
            let x2 = t.op("Add", &[&x2, &margin], vec![]);
            let y2 = t.op("Add", &[&y2, &margin], vec![]);
            let right_of = t.op("GreaterOrEqual", &[&cols, &x1], vec![]);
            let left_of = t.op("Less", &[&cols, &x2], vec![]);
            let below = t.op("GreaterOrEqual", &[&rows, &y1], vec![]);
            let above = t.op("Less", &[&rows, &y2], vec![]);
            let in_x = t.op("And", &[&right_of, &left_of], vec![]);
            let in_y = t.op("And", &[&below, &above], vec![]);
            let inside = t.op("And", &[&in_x, &in_y], vec![]);
            // Padding rows have zero boxes, whose margin covers the corner cells: keep only the
            // detections' rows, so masks past num_dets are zero as documented.
            let valid_rows = t.unsqueeze(&valid, 2);
            let valid_rows = t.unsqueeze(&valid_rows, 3);
            let inside = t.op("And", &[&inside, &valid_rows], vec![]);
            let masks = t.op("Where", &[&inside, &probs, &zero_f], vec![]);
            let _ = t.rename_last(&masks, END2END_OUTPUTS[4]);
        }
    }

    let kd = Dim::Fixed(k);
    let mut outputs = vec![
        (
            END2END_OUTPUTS[0],
            pb::data_type::INT32,
            vec![batch.clone(), Dim::Fixed(1)],
            "detections per image",
        ),
        (
            END2END_OUTPUTS[1],
            pb::data_type::FLOAT,
            vec![batch.clone(), kd.clone(), Dim::Fixed(4)],
            "x1, y1, x2, y2 in input pixels; zeros past num_dets",
        ),
        (
            END2END_OUTPUTS[2],
            pb::data_type::FLOAT,
            vec![batch.clone(), kd.clone()],
            "scores; zeros past num_dets",
        ),
        (
            END2END_OUTPUTS[3],
            pb::data_type::INT32,
            vec![batch.clone(), kd.clone()],
            "class ids; -1 past num_dets",
        ),
    ];
    if let Some(p) = &prototypes {
        let mut dims = vec![batch.clone(), kd.clone()];
        dims.extend(p.iter().skip(2).cloned());
        outputs.push((
            END2END_OUTPUTS[4],
            pb::data_type::FLOAT,
            dims,
            "mask probabilities at prototype resolution, zero beyond 2 cells around the box: \
             upsample, then crop to the box",
        ));
    }
    for (name, elem, dims, doc) in outputs {
        let mut vi = pb::ValueInfoProto::tensor(name, elem, &dims);
        vi.doc_string = doc.into();
        t.graph.output.push(vi);
    }
    if opts.flavour == NmsFlavour::EfficientNmsTrt {
        model.opset_import.push(pb::OperatorSetIdProto {
            domain: "TRT".into(),
            version: 1,
        });
    }
    let meta = |k: &str, v: String| pb::StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    model.metadata_props.extend([
        meta(END2END_KEY, opts.flavour.label().into()),
        meta("end2end_max_detections", opts.max_detections.to_string()),
        meta("end2end_iou_threshold", opts.iou_threshold.to_string()),
        meta("end2end_score_threshold", opts.score_threshold.to_string()),
    ]);
    model.doc_string.push_str(&format!(
        " End-to-end ({}): outputs num_dets [batch, 1] int32, det_boxes [batch, {k}, 4] (x1, y1, \
         x2, y2 in input pixels), det_scores [batch, {k}], det_classes [batch, {k}] int32{}; NMS \
         per class at IoU {} above score {}.",
        opts.flavour.label(),
        if prototypes.is_some() {
            ", det_masks [batch, K, H/4, W/4] (mask probabilities, zero beyond 2 cells around \
             the box: upsample, then crop to the box)"
        } else {
            ""
        },
        opts.iou_threshold,
        opts.score_threshold
    ));
    Ok(model)
}

/// Metadata keys [`append_nms`] adds.
const END2END_METADATA: [&str; 4] = [
    END2END_KEY,
    "end2end_max_detections",
    "end2end_iou_threshold",
    "end2end_score_threshold",
];

/// The plain model inside an end-to-end one (the inverse of [`append_nms`]): the nodes that
/// `output0` (and a segmentation model's `output1`) depend on, those values as the graph outputs
/// again (shapes inferred), and the end-to-end metadata removed. Backends that run decode and NMS
/// themselves (the cuda backend) run this part and apply the recorded thresholds and K.
pub fn plain_part(model: &pb::ModelProto) -> Result<pb::ModelProto> {
    if model.metadata(END2END_KEY).is_none() {
        return Err(Error::InvalidConfig(
            "the model is not end-to-end (no NMS inside); it is already the plain model".into(),
        ));
    }
    let mut model = model.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::InvalidConfig("the model has no graph".into()))?;
    let produced: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let heads: Vec<&str> = [crate::OUTPUT_NAME, crate::export::PROTOTYPES_NAME]
        .into_iter()
        .filter(|name| produced.contains(name))
        .collect();
    if !heads.contains(&crate::OUTPUT_NAME) {
        return Err(Error::InvalidConfig(
            "the end-to-end model has no output0 inside; export it again with Kestrel".into(),
        ));
    }
    // Walk back from the heads: a node is kept when one of its outputs is needed.
    let mut needed: std::collections::HashSet<String> =
        heads.iter().map(|s| s.to_string()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (k, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[k] = true;
            needed.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    let heads: Vec<String> = heads.into_iter().map(str::to_string).collect();
    let mut k = 0;
    graph.node.retain(|_| {
        k += 1;
        keep[k - 1]
    });
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    let shapes = crate::shapes::infer_graph(graph)?;
    graph.output.clear();
    for name in &heads {
        let dims = shapes.get(name).ok_or_else(|| {
            Error::Graph(format!("no shape inferred for '{name}' of the plain part"))
        })?;
        graph
            .output
            .push(pb::ValueInfoProto::tensor(name, pb::data_type::FLOAT, dims));
    }
    model
        .metadata_props
        .retain(|p| !END2END_METADATA.contains(&p.key.as_str()));
    model.opset_import.retain(|o| o.domain != "TRT");
    if let Some(at) = model.doc_string.find(" End-to-end (") {
        model.doc_string.truncate(at);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExportOptions, ModelConfig, WeightSource, export};

    fn dims(v: &pb::ValueInfoProto) -> (String, Vec<Dim>) {
        let (_, d) = v.tensor_shape().expect("tensor shape");
        (v.name.clone(), d)
    }

    /// `plain_part(append_nms(m))` is `m` again: the same nodes, initializers, outputs (names
    /// and shapes) and metadata, for detectors and segmentation models and every flavour that
    /// keeps the plain graph inside.
    #[test]
    fn the_plain_part_of_an_end_to_end_model_is_the_plain_model() {
        for name in ["gelan-t", "gelan-t-seg"] {
            let cfg = ModelConfig::new(name, 3, 64).expect("config");
            let plain = export(
                &cfg,
                &mut WeightSource::Random { seed: 3 },
                &ExportOptions::dynamic(3),
            )
            .expect("export");
            for flavour in [NmsFlavour::Onnx, NmsFlavour::TensorRtInms] {
                let opts = EndToEnd {
                    flavour,
                    ..Default::default()
                };
                let e2e = append_nms(plain.clone(), &opts).expect("append");
                let back = plain_part(&e2e).expect("plain part");
                let (g, h) = (plain.graph(), back.graph());
                assert_eq!(g.node, h.node, "{name} {flavour:?}: nodes");
                assert_eq!(g.initializer, h.initializer, "{name} {flavour:?}");
                assert_eq!(
                    g.output.iter().map(dims).collect::<Vec<_>>(),
                    h.output.iter().map(dims).collect::<Vec<_>>(),
                    "{name} {flavour:?}: outputs"
                );
                assert_eq!(plain.metadata_props, back.metadata_props);
                assert_eq!(plain.doc_string, back.doc_string);
            }
            let e = plain_part(&plain).expect_err("plain").to_string();
            assert!(e.contains("not end-to-end"), "{e}");
        }
    }
}
