//! Post-training quantization of a float model into a Q/DQ model: which activations get a
//! QuantizeLinear → DequantizeLinear pair, which of them must share one scale, and the rewrite from
//! calibrated ranges (amax, the largest |x| seen).
//!
//! TensorRT convention (DESIGN.md): symmetric INT8, zero point 0, scale = amax / 127; weights per
//! output channel (axis 0), activations per tensor; scales shared across a concat and its inputs, a
//! residual add and its inputs, a pool or resize and its input, a split and its input, so the
//! engine never has to requantize between them. This module is pure graph work; measuring the
//! ranges (running the float model on images) is `kestrel_runtime::calibrate`.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::onnx::pb;

/// Metadata key recording how a model was quantized.
pub const QUANTIZATION_KEY: &str = "kestrel.quantization";
/// [`QUANTIZATION_KEY`] value of post-training quantization with the max calibrator.
pub const PTQ_MAX: &str = "ptq-max";
/// Largest quantized magnitude: scale = amax / 127 (the range is symmetric, so -128 is never
/// produced from a calibrated value).
pub const QMAX: f32 = 127.0;
/// Smallest amax used for a scale: 2^-24, in the tensor's own units. pytorch-quantization (the
/// toolkit of TensorRT's Q/DQ workflow) treats any amax at or below this epsilon, the smallest
/// FP16 subnormal, as zero and quantizes the tensor to all zeros. Flooring the amax there keeps
/// that meaning: a tensor (or weight channel) calibrated as zero can carry at most ±2^-24 later,
/// one FP16 step, as good as zero, while the written scale stays positive, which ONNX and
/// TensorRT require (QuantizeLinear divides by it). onnxruntime's tool substitutes a scale of 1.0
/// instead, which would let a tensor that was zero during calibration carry values up to ±127.
pub const MIN_AMAX: f32 = 1.0 / 16_777_216.0;
/// First opset whose DequantizeLinear takes per-axis (per-channel) scales.
const MIN_OPSET: i64 = 13;

/// Initializers that are float32 4-D tensors: the convolution weights that can be quantized.
fn float_4d_initializers(graph: &pb::GraphProto) -> HashSet<&str> {
    graph
        .initializer
        .iter()
        .filter(|t| t.data_type == pb::data_type::FLOAT && t.dims.len() == 4)
        .map(|t| t.name.as_str())
        .collect()
}

/// Outputs of Softmax nodes. A convolution reading one is the DFL's expectation over the 16
/// distance bins: a fixed ramp 0..15, not a learned layer. Quantizing it would round the ramp
/// (scale 15/127: 1 becomes 0.945) and bend every box edge, so it stays in floating point, as
/// TensorRT QAT recipes for YOLO leave the head's decoding.
fn softmax_outputs(graph: &pb::GraphProto) -> HashSet<&str> {
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Softmax")
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect()
}

/// Choices of one quantization beyond the convention.
#[derive(Debug, Clone, Default)]
pub struct QuantizePolicy {
    /// Convolutions (node names) kept in floating point: no Q/DQ on their weight, and none on
    /// their input unless another quantized convolution reads it too.
    pub float_convs: HashSet<String>,
    /// The [`QUANTIZATION_KEY`] metadata value written (how the ranges were found); empty means
    /// [`PTQ_MAX`].
    pub method: String,
}

/// A default-domain Conv with a data input and a float 4-D initializer as its weight, other than
/// the DFL's fixed projection (input from a Softmax) and the convolutions the policy keeps float.
fn is_quantizable_conv(
    node: &pb::NodeProto,
    weights: &HashSet<&str>,
    softmax: &HashSet<&str>,
    policy: &QuantizePolicy,
) -> bool {
    node.op_type == "Conv"
        && (node.domain.is_empty() || node.domain == "ai.onnx")
        && node.input.len() >= 2
        && !node.input[0].is_empty()
        && weights.contains(node.input[1].as_str())
        && !softmax.contains(node.input[0].as_str())
        && !policy.float_convs.contains(&node.name)
}

/// The convolutions that run in INT8 under `policy`: (node name, input tensor), in graph order.
pub fn quantized_convs(model: &pb::ModelProto, policy: &QuantizePolicy) -> Vec<(String, String)> {
    let graph = model.graph();
    let weights = float_4d_initializers(graph);
    let softmax = softmax_outputs(graph);
    graph
        .node
        .iter()
        .filter(|n| is_quantizable_conv(n, &weights, &softmax, policy))
        .map(|n| (n.name.clone(), n.input[0].clone()))
        .collect()
}

/// The detection head's last convolutions (node names): those whose output is flattened by a
/// Reshape into the head's box and class maps. [`QuantizePolicy::float_convs`] candidates: their
/// outputs are the raw box distances and class logits. The DFL's projection is not one of them.
pub fn head_output_convs(model: &pb::ModelProto) -> Vec<String> {
    let graph = model.graph();
    let softmax = softmax_outputs(graph);
    let reshaped: HashSet<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Reshape")
        .filter_map(|n| n.input.first().map(String::as_str))
        .collect();
    graph
        .node
        .iter()
        .filter(|n| {
            n.op_type == "Conv"
                && !n
                    .input
                    .first()
                    .is_some_and(|x| softmax.contains(x.as_str()))
                && n.output.iter().any(|o| reshaped.contains(o.as_str()))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// The activation tensors that get a Q/DQ pair: input 0 of every Conv whose weight (input 1) is a
/// float32 initializer with 4 dims, each tensor once, in graph order.
pub fn quantization_points(model: &pb::ModelProto) -> Vec<String> {
    quantization_points_with(model, &QuantizePolicy::default())
}

/// [`quantization_points`] under `policy`.
pub fn quantization_points_with(model: &pb::ModelProto, policy: &QuantizePolicy) -> Vec<String> {
    let mut seen = HashSet::new();
    quantized_convs(model, policy)
        .into_iter()
        .map(|(_, x)| x)
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

/// Union-find over tensor names, remembering the order names were first seen.
#[derive(Default)]
struct UnionFind {
    index: HashMap<String, usize>,
    names: Vec<String>,
    parent: Vec<usize>,
}

impl UnionFind {
    fn id(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.names.len();
        self.index.insert(name.to_string(), i);
        self.names.push(name.to_string());
        self.parent.push(i);
        i
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: &str, b: &str) {
        let (a, b) = (self.id(a), self.id(b));
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // The older root wins, so a group's representative is its first tensor.
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.parent[hi] = lo;
        }
    }
}

/// Scale-sharing groups: every group that holds at least one quantization point, listing all the
/// activation tensors (initializers excluded) whose amax must be merged, in graph order. Groups
/// come in the order of their first quantization point; a point that shares with nothing is a
/// group of its own, so every point is in exactly one group.
pub fn sharing_groups(model: &pb::ModelProto) -> Vec<Vec<String>> {
    sharing_groups_with(model, &QuantizePolicy::default())
}

/// [`sharing_groups`] under `policy`.
pub fn sharing_groups_with(model: &pb::ModelProto, policy: &QuantizePolicy) -> Vec<Vec<String>> {
    let graph = model.graph();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    // Constants have no calibrated range and never reach an INT8 kernel, so they join no group.
    let is_activation = |s: &str| !s.is_empty() && !initializers.contains(s);
    let mut uf = UnionFind::default();
    for n in &graph.node {
        let first_output = n.output.first().map(String::as_str).unwrap_or("");
        let pairs: Vec<(&str, &str)> = match n.op_type.as_str() {
            // The output is the inputs side by side / summed: one scale covers all of them.
            "Concat" | "Add" => n.input.iter().map(|i| (first_output, i.as_str())).collect(),
            // Pools and resizes only move values around; later inputs (roi, scales) are constants.
            "MaxPool" | "AveragePool" | "Resize" => n
                .input
                .first()
                .map(|i| vec![(first_output, i.as_str())])
                .unwrap_or_default(),
            "Split" => match n.input.first() {
                Some(x) => n.output.iter().map(|o| (o.as_str(), x.as_str())).collect(),
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        for (a, b) in pairs {
            if is_activation(a) && is_activation(b) {
                uf.union(a, b);
            }
        }
    }
    let points = quantization_points_with(model, policy);
    let mut group_of_root: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for p in &points {
        let id = uf.id(p);
        let root = uf.find(id);
        group_of_root.entry(root).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
    }
    for i in 0..uf.names.len() {
        let root = uf.find(i);
        if let Some(&g) = group_of_root.get(&root) {
            groups[g].push(uf.names[i].clone());
        }
    }
    groups
}

/// The scale (unitless: input units per integer step) for a range `amax` ≥ 0.
fn scale_for(amax: f32) -> f32 {
    amax.max(MIN_AMAX) / QMAX
}

/// ONNX QuantizeLinear to int8 with zero point 0: x / scale rounded half to even, saturated.
fn quantize_value(x: f32, scale: f32) -> i8 {
    (x / scale).round_ties_even().clamp(-128.0, 127.0) as i8
}

/// Per-output-channel symmetric quantization of a `[Cout, ...]` weight: (int8 values, scales).
fn quantize_weight(w: &pb::TensorProto) -> Result<(Vec<i8>, Vec<f32>)> {
    let values = w.to_f32().ok_or_else(|| {
        Error::Quantization(format!(
            "weight '{}' has no inline float32 data (external or malformed); \
             re-export the model with the weights inside",
            w.name
        ))
    })?;
    let cout = w.dims.first().copied().unwrap_or(0).max(0) as usize;
    if cout == 0 || values.len() % cout != 0 {
        return Err(Error::Quantization(format!(
            "weight '{}' with dims {:?} has no output channels to quantize",
            w.name, w.dims
        )));
    }
    let per_channel = values.len() / cout;
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(cout);
    for (c, channel) in values.chunks_exact(per_channel).enumerate() {
        let amax = channel.iter().fold(0f32, |m, v| m.max(v.abs()));
        if channel.iter().any(|v| !v.is_finite()) {
            return Err(Error::Quantization(format!(
                "weight '{}' has non-finite values in output channel {c}; fix the weights",
                w.name
            )));
        }
        let scale = scale_for(amax);
        q.extend(channel.iter().map(|&v| quantize_value(v, scale)));
        scales.push(scale);
    }
    Ok((q, scales))
}

/// Names not used in the graph yet, derived from a base name.
struct Names {
    values: HashSet<String>,
    nodes: HashSet<String>,
}

impl Names {
    fn new(nodes: &[pb::NodeProto], inits: &[pb::TensorProto], graph: &pb::GraphProto) -> Self {
        let mut values: HashSet<String> = HashSet::new();
        for n in nodes {
            values.extend(n.input.iter().chain(&n.output).cloned());
        }
        values.extend(inits.iter().map(|t| t.name.clone()));
        values.extend(
            graph
                .input
                .iter()
                .chain(&graph.output)
                .chain(&graph.value_info)
                .map(|v| v.name.clone()),
        );
        let nodes = nodes.iter().map(|n| n.name.clone()).collect();
        Self { values, nodes }
    }

    fn fresh(set: &mut HashSet<String>, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while set.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        set.insert(name.clone());
        name
    }

    fn value(&mut self, base: &str) -> String {
        Self::fresh(&mut self.values, base)
    }

    fn node(&mut self, base: &str) -> String {
        Self::fresh(&mut self.nodes, base)
    }
}

/// Whether [`quantize_model`] can work on `model`, before any calibration is spent on it: opset 13
/// or later, not quantized already, and at least one convolution with float weights.
pub fn check_quantizable(model: &pb::ModelProto) -> Result<()> {
    let opset = model.opset().unwrap_or(0);
    if opset < MIN_OPSET {
        return Err(Error::Quantization(format!(
            "opset {opset}: per-channel DequantizeLinear needs opset {MIN_OPSET} or later; \
             re-export the model with opset 17"
        )));
    }
    let already = model
        .graph()
        .node
        .iter()
        .any(|n| n.op_type == "QuantizeLinear" || n.op_type == "DequantizeLinear");
    if already || model.metadata(QUANTIZATION_KEY).is_some() {
        return Err(Error::Quantization(
            "the model already has Q/DQ nodes; quantize the float model instead".into(),
        ));
    }
    if quantization_points(model).is_empty() {
        return Err(Error::Quantization(
            "the model has no convolution with float32 [Cout, Cin, kH, kW] weights to quantize"
                .into(),
        ));
    }
    Ok(())
}

/// A copy of `model` quantized from calibrated ranges: `amax` maps activation tensor names to the
/// largest |x| seen (in the tensor's units).
///
/// Every quantization point X (see [`quantization_points`]) gets one QuantizeLinear →
/// DequantizeLinear pair with scale = amax / 127, where amax is the largest entry among the tensors
/// sharing X's scale ([`sharing_groups`]), floored at [`MIN_AMAX`] so no scale is zero. The pair is
/// shared by all of X's convolutions; other consumers keep the float X. Every convolution weight W
/// `[Cout, Cin, kH, kW]` becomes the int8 initializer `<W>_quantized` with per-channel scales
/// max|W[c]| / 127 and a DequantizeLinear (axis 0) feeding the Conv; the float W is removed. Values
/// round half to even and saturate to [-128, 127]. Biases stay float. The opset is kept (13 or
/// later) and the metadata gains `kestrel.quantization = ptq-max`.
pub fn quantize_model(
    model: &pb::ModelProto,
    amax: &HashMap<String, f32>,
) -> Result<pb::ModelProto> {
    quantize_model_with(model, amax, &QuantizePolicy::default())
}

/// The scale of every quantization point under `policy` (input units per integer step): amax /
/// 127 with the amax merged over the point's sharing group, as [`quantize_model_with`] writes it.
pub fn activation_scales(
    model: &pb::ModelProto,
    amax: &HashMap<String, f32>,
    policy: &QuantizePolicy,
) -> Result<HashMap<String, f32>> {
    let points = quantization_points_with(model, policy);
    let point_set: HashSet<&str> = points.iter().map(String::as_str).collect();
    // One scale per sharing group, from the largest amax any member had.
    let mut act_scale: HashMap<String, f32> = HashMap::new();
    for group in sharing_groups_with(model, policy) {
        let mut merged: Option<f32> = None;
        for t in &group {
            if let Some(&a) = amax.get(t) {
                if !a.is_finite() || a < 0.0 {
                    return Err(Error::Quantization(format!(
                        "amax of '{t}' is {a}; the float model produced non-finite values \
                         during calibration, or the range is corrupt"
                    )));
                }
                merged = Some(merged.map_or(a, |m| m.max(a)));
            }
        }
        let group_points: Vec<&String> = group
            .iter()
            .filter(|t| point_set.contains(t.as_str()))
            .collect();
        let Some(merged) = merged else {
            let first = group_points.first().map(|s| s.as_str()).unwrap_or("?");
            return Err(Error::Quantization(format!(
                "no calibrated amax for '{first}' nor for any of the {} tensors sharing its scale; \
                 calibrate every tensor of sharing_groups()",
                group.len()
            )));
        };
        for p in group_points {
            act_scale.insert(p.clone(), scale_for(merged));
        }
    }
    Ok(act_scale)
}

/// [`quantize_model`] under `policy`: the convolutions it keeps float get no Q/DQ, and the
/// metadata records its method.
pub fn quantize_model_with(
    model: &pb::ModelProto,
    amax: &HashMap<String, f32>,
    policy: &QuantizePolicy,
) -> Result<pb::ModelProto> {
    check_quantizable(model)?;
    let points = quantization_points_with(model, policy);
    let point_set: HashSet<&str> = points.iter().map(String::as_str).collect();
    let act_scale = activation_scales(model, amax, policy)?;

    let mut out = model.clone();
    let graph = out
        .graph
        .as_mut()
        .ok_or_else(|| Error::Quantization("the model has no graph".into()))?;
    let old_nodes = std::mem::take(&mut graph.node);
    let old_inits = std::mem::take(&mut graph.initializer);
    let mut rw = Rewriter {
        names: Names::new(&old_nodes, &old_inits, graph),
        nodes: Vec::with_capacity(old_nodes.len() + 3 * points.len()),
        inits: Vec::new(),
        act_scale,
        act_dq: HashMap::new(),
        weight_dq: HashMap::new(),
    };
    let weights: HashMap<&str, &pb::TensorProto> = old_inits
        .iter()
        .filter(|t| t.data_type == pb::data_type::FLOAT && t.dims.len() == 4)
        .map(|t| (t.name.as_str(), t))
        .collect();
    let weight_names: HashSet<&str> = weights.keys().copied().collect();
    let softmax = softmax_outputs(model.graph());
    let produced: HashSet<&str> = old_nodes
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();

    // Each pair goes right after the node producing its tensor, each weight's DequantizeLinear
    // right before its first Conv: the graph stays topologically sorted. Points with no producing
    // node (the graph input) get their pair first.
    for p in points.iter().filter(|p| !produced.contains(p.as_str())) {
        rw.activation(p);
    }
    for node in &old_nodes {
        let mut node = node.clone();
        if is_quantizable_conv(&node, &weight_names, &softmax, policy) {
            // Only convolutions are rewired: they are what runs in INT8, and a Q/DQ pair in front
            // of anything else would only add rounding.
            node.input[1] = rw.weight(weights[node.input[1].as_str()])?;
            if let Some(dq) = rw.act_dq.get(&node.input[0]) {
                node.input[0] = dq.clone();
            }
        }
        let outputs = node.output.clone();
        rw.nodes.push(node);
        for o in outputs.iter().filter(|o| point_set.contains(o.as_str())) {
            rw.activation(o);
        }
    }

    // Float weights still used elsewhere (another op, a graph output) stay; the rest go.
    let still_used: HashSet<&str> = rw
        .nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(graph.output.iter().map(|o| o.name.as_str()))
        .collect();
    let replaced: HashSet<String> = rw
        .weight_dq
        .keys()
        .filter(|w| !still_used.contains(w.as_str()))
        .cloned()
        .collect();
    graph.node = rw.nodes;
    graph.initializer = old_inits
        .into_iter()
        .filter(|t| !replaced.contains(&t.name))
        .chain(rw.inits)
        .collect();
    // Old-style models list initializers as inputs too; a removed one must not become an input.
    graph.input.retain(|i| !replaced.contains(&i.name));

    let method = if policy.method.is_empty() {
        PTQ_MAX
    } else {
        policy.method.as_str()
    };
    match out
        .metadata_props
        .iter_mut()
        .find(|p| p.key == QUANTIZATION_KEY)
    {
        Some(p) => p.value = method.into(),
        None => out.metadata_props.push(pb::StringStringEntryProto {
            key: QUANTIZATION_KEY.into(),
            value: method.into(),
        }),
    }
    Ok(out)
}

/// The rewrite in progress: the new node list and initializers, and what was inserted so far.
struct Rewriter {
    names: Names,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    /// Scale of every quantization point.
    act_scale: HashMap<String, f32>,
    /// Activation X → the output of its DequantizeLinear.
    act_dq: HashMap<String, String>,
    /// Weight W → the output of its DequantizeLinear.
    weight_dq: HashMap<String, String>,
}

impl Rewriter {
    /// Append the Q/DQ pair of activation `x` (once; nothing for a tensor without a scale).
    fn activation(&mut self, x: &str) {
        if self.act_dq.contains_key(x) {
            return;
        }
        let Some(&scale) = self.act_scale.get(x) else {
            return;
        };
        let scale_name = self.names.value(&format!("{x}_scale"));
        let zero_name = self.names.value(&format!("{x}_zero_point"));
        let q_out = self.names.value(&format!("{x}_quantized"));
        let dq_out = self.names.value(&format!("{x}_dequantized"));
        self.inits
            .push(pb::TensorProto::from_f32(&scale_name, &[], &[scale]));
        self.inits
            .push(pb::TensorProto::from_i8(&zero_name, &[], &[0]));
        self.nodes.push(pb::NodeProto {
            input: vec![x.to_string(), scale_name.clone(), zero_name.clone()],
            output: vec![q_out.clone()],
            name: self.names.node(&format!("{x}_QuantizeLinear")),
            op_type: "QuantizeLinear".into(),
            ..Default::default()
        });
        self.nodes.push(pb::NodeProto {
            input: vec![q_out, scale_name, zero_name],
            output: vec![dq_out.clone()],
            name: self.names.node(&format!("{x}_DequantizeLinear")),
            op_type: "DequantizeLinear".into(),
            ..Default::default()
        });
        self.act_dq.insert(x.to_string(), dq_out);
    }

    /// The DequantizeLinear output standing for weight `w`, appending the int8 weight, its
    /// per-channel scales and zero points and the node the first time.
    fn weight(&mut self, w: &pb::TensorProto) -> Result<String> {
        if let Some(dq) = self.weight_dq.get(&w.name) {
            return Ok(dq.clone());
        }
        let (q, scales) = quantize_weight(w)?;
        let cout = scales.len();
        let name = &w.name;
        let q_name = self.names.value(&format!("{name}_quantized"));
        let scale_name = self.names.value(&format!("{name}_scale"));
        let zero_name = self.names.value(&format!("{name}_zero_point"));
        let dq_out = self.names.value(&format!("{name}_dequantized"));
        self.inits
            .push(pb::TensorProto::from_i8(&q_name, &w.dims, &q));
        self.inits.push(pb::TensorProto::from_f32(
            &scale_name,
            &[cout as i64],
            &scales,
        ));
        self.inits.push(pb::TensorProto::from_i8(
            &zero_name,
            &[cout as i64],
            &vec![0; cout],
        ));
        self.nodes.push(pb::NodeProto {
            input: vec![q_name, scale_name, zero_name],
            output: vec![dq_out.clone()],
            name: self.names.node(&format!("{name}_DequantizeLinear")),
            op_type: "DequantizeLinear".into(),
            attribute: vec![pb::AttributeProto::int("axis", 0)],
            ..Default::default()
        });
        self.weight_dq.insert(name.clone(), dq_out.clone());
        Ok(dq_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::GraphBuilder;
    use crate::shapes::Dim;
    use crate::{ExportOptions, ModelConfig, WeightSource, export, summarize};

    fn gelan_t() -> pb::ModelProto {
        let cfg = ModelConfig::new("gelan-t", 80, 64).expect("gelan-t config");
        export(
            &cfg,
            &mut WeightSource::Random { seed: 3 },
            &ExportOptions::dynamic(80),
        )
        .expect("export gelan-t")
    }

    /// amax 1 for every tensor of every group.
    fn unit_ranges(model: &pb::ModelProto) -> HashMap<String, f32> {
        sharing_groups(model)
            .into_iter()
            .flatten()
            .map(|t| (t, 1.0))
            .collect()
    }

    fn group_of<'a>(groups: &'a [Vec<String>], tensor: &str) -> &'a [String] {
        groups
            .iter()
            .find(|g| g.iter().any(|t| t == tensor))
            .unwrap_or_else(|| panic!("'{tensor}' is in no group"))
    }

    #[test]
    fn points_are_conv_inputs_once_each_in_graph_order() {
        let model = gelan_t();
        let points = quantization_points(&model);
        assert_eq!(points[0], "images");
        let unique: HashSet<&String> = points.iter().collect();
        assert_eq!(unique.len(), points.len());
        // The input of the SPPELAN's cv5 is its concat; the DFL's fixed conv (reading the
        // softmax) stays in floating point.
        assert!(points.iter().any(|p| p == "model.9.cat_out"));
        assert!(!points.iter().any(|p| p == "model.22.dfl.softmax_out"));
        let convs = model
            .graph()
            .node
            .iter()
            .filter(|n| n.op_type == "Conv")
            .count();
        assert!(points.len() <= convs && points.len() > convs / 2);
    }

    #[test]
    fn sppelan_concat_shares_with_its_pools_and_every_point_is_in_one_group() {
        let model = gelan_t();
        let groups = sharing_groups(&model);
        let spp = group_of(&groups, "model.9.cat_out");
        for t in [
            "model.9.cv1.act_out",
            "model.9.cv2_out",
            "model.9.cv3_out",
            "model.9.cv4_out",
        ] {
            assert!(
                spp.iter().any(|m| m == t),
                "{t} not with the concat: {spp:?}"
            );
        }
        // AConv: the average pool shares with the block output it smooths.
        let aconv = group_of(&groups, "model.3.avgpool_out");
        assert!(
            aconv.iter().any(|m| m == "model.2.cv4.act_out"),
            "{aconv:?}"
        );
        // The neck concat: the upsampled P5, what it upsamples, and the backbone's P4.
        let neck = group_of(&groups, "model.11.cat_out");
        for t in [
            "model.10.upsample_out",
            "model.9.cv5.act_out",
            "model.6.cv4.act_out",
        ] {
            assert!(neck.iter().any(|m| m == t), "{t}: {neck:?}");
        }
        // A residual add shares with both of its inputs.
        let add = group_of(&groups, "model.4.cv2.0.m.0.add_out");
        assert!(add.iter().any(|m| m == "model.4.cv2.0.m.0.cv2.act_out"));
        assert!(add.iter().any(|m| m == "model.4.cv2.0.cv1.act_out"));
        // No constant joins a group.
        let inits: HashSet<&str> = model
            .graph()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert!(groups.iter().flatten().all(|t| !inits.contains(t.as_str())));
        for p in quantization_points(&model) {
            let n = groups.iter().filter(|g| g.contains(&p)).count();
            assert_eq!(n, 1, "{p} is in {n} groups");
        }
        let members: Vec<&String> = groups.iter().flatten().collect();
        let unique: HashSet<&&String> = members.iter().collect();
        assert_eq!(unique.len(), members.len(), "a tensor in two groups");
    }

    /// Every node input is a graph input, an initializer or an earlier node's output.
    fn assert_topologically_sorted(graph: &pb::GraphProto) {
        let mut known: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
        known.extend(graph.initializer.iter().map(|t| t.name.as_str()));
        for n in &graph.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                assert!(
                    known.contains(i.as_str()),
                    "{} reads {i} before it exists",
                    n.name
                );
            }
            known.extend(n.output.iter().map(String::as_str));
        }
    }

    #[test]
    fn quantized_gelan_t_is_consistent() {
        let model = gelan_t();
        let points = quantization_points(&model);
        let q = quantize_model(&model, &unit_ranges(&model)).expect("quantize");
        let graph = q.graph();
        assert_topologically_sorted(graph);
        let names: HashSet<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), graph.node.len(), "node names are not unique");
        let outputs: Vec<&String> = graph.node.iter().flat_map(|n| &n.output).collect();
        let unique: HashSet<&&String> = outputs.iter().collect();
        assert_eq!(unique.len(), outputs.len(), "a tensor has two producers");

        let before = summarize(&model);
        let after = summarize(&q);
        assert_eq!(after.qdq_pairs, points.len());
        assert_eq!(after.params, before.params);
        assert_eq!(after.flops, before.flops);
        assert_eq!(after.opset, Some(17));
        assert_eq!(q.metadata(QUANTIZATION_KEY), Some(PTQ_MAX));
        assert_eq!(q.metadata("model"), Some("gelan-t"));
        // Every conv but the DFL's projection is quantized.
        let convs = graph.node.iter().filter(|n| n.op_type == "Conv").count();
        assert_eq!(
            after.ops.get("DequantizeLinear"),
            Some(&(points.len() + convs - 1))
        );

        // Every conv reads a dequantized input and weight, except the DFL's fixed projection,
        // the only float 4-D weight left.
        let dq_outputs: HashSet<&str> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .map(|n| n.output[0].as_str())
            .collect();
        for n in graph.node.iter().filter(|n| n.op_type == "Conv") {
            let dfl = n.name.ends_with(".dfl.conv");
            assert_eq!(dq_outputs.contains(n.input[0].as_str()), !dfl, "{}", n.name);
            assert_eq!(dq_outputs.contains(n.input[1].as_str()), !dfl, "{}", n.name);
        }
        let float_weights: Vec<&str> = float_4d_initializers(graph).into_iter().collect();
        assert_eq!(float_weights, ["model.22.dfl.conv.weight"]);
        let w = graph
            .initializer
            .iter()
            .find(|t| t.name == "model.0.conv.weight_quantized")
            .expect("int8 weight of the first conv");
        assert_eq!(w.data_type, pb::data_type::INT8);
        assert_eq!(w.dims, vec![16, 3, 3, 3]);
        // The first pair quantizes the image with the unit range: scale 1/127.
        let scale = graph
            .initializer
            .iter()
            .find(|t| t.name == "images_scale")
            .and_then(|t| t.to_f32())
            .expect("images_scale");
        assert_eq!(scale, vec![1.0 / 127.0]);
        // A second run on the quantized model is refused rather than doubling the pairs.
        let err = quantize_model(&q, &unit_ranges(&model)).expect_err("quantized twice");
        assert!(err.to_string().contains("already has Q/DQ"), "{err}");
    }

    /// The scale of every activation Q/DQ pair of a quantized model: quantized tensor → scale.
    fn pair_scales(q: &pb::ModelProto) -> HashMap<String, f32> {
        let graph = q.graph();
        let scalar = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .and_then(|t| t.to_f32())
                .and_then(|v| (v.len() == 1).then(|| v[0]))
        };
        graph
            .node
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear")
            .map(|n| {
                let s =
                    scalar(&n.input[1]).unwrap_or_else(|| panic!("{}: no scalar scale", n.name));
                (n.input[0].clone(), s)
            })
            .collect()
    }

    #[test]
    fn every_concat_add_and_pool_of_quantized_gelan_c_shares_one_scale() {
        let cfg = ModelConfig::new("gelan-c", 80, 64).expect("gelan-c config");
        let model = export(
            &cfg,
            &mut WeightSource::Random { seed: 5 },
            &ExportOptions::dynamic(80),
        )
        .expect("export gelan-c");
        // A different range for every tensor, one of them zero: equal scales can only come from
        // the sharing rules, and no scale may be zero.
        let mut ranges: HashMap<String, f32> = sharing_groups(&model)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| (t, 0.5 + (i % 97) as f32 * 0.37))
            .collect();
        ranges.insert("images".into(), 0.0);
        let q = quantize_model(&model, &ranges).expect("quantize");
        let scales = pair_scales(&q);
        assert_eq!(scales.len(), quantization_points(&model).len());
        assert!(
            scales.values().all(|&s| s > 0.0 && s.is_finite()),
            "a zero scale"
        );
        let mut checked = 0;
        for n in q.graph().node.iter().filter(|n| {
            matches!(
                n.op_type.as_str(),
                "Concat" | "Add" | "MaxPool" | "AveragePool" | "Resize" | "Split"
            )
        }) {
            let mut seen: Vec<f32> = n
                .input
                .iter()
                .take(if n.op_type == "Concat" || n.op_type == "Add" {
                    usize::MAX
                } else {
                    1
                })
                .chain(&n.output)
                .filter_map(|t| scales.get(t).copied())
                .collect();
            seen.dedup();
            assert!(
                seen.len() <= 1,
                "{} ({}): scales {seen:?}",
                n.name,
                n.op_type
            );
            checked += usize::from(!seen.is_empty());
        }
        assert!(checked > 40, "only {checked} groups carried pairs");
        // Weight scales are positive too, channel by channel.
        for t in q
            .graph()
            .initializer
            .iter()
            .filter(|t| t.name.ends_with("weight_scale"))
        {
            let v = t.to_f32().expect("weight scales");
            assert!(v.iter().all(|&s| s > 0.0), "{}: a zero scale", t.name);
        }
    }

    #[test]
    fn a_policy_keeps_the_head_outputs_float_and_names_its_method() {
        let model = gelan_t();
        let head = head_output_convs(&model);
        // Three levels, a box and a class convolution each.
        assert_eq!(head.len(), 6, "{head:?}");
        assert!(
            head.iter().all(|n| n.starts_with("model.22.cv")),
            "{head:?}"
        );
        let policy = QuantizePolicy {
            float_convs: head.iter().cloned().collect(),
            method: "qat-test".into(),
        };
        let convs = quantized_convs(&model, &policy);
        assert_eq!(
            convs.len(),
            quantized_convs(&model, &QuantizePolicy::default()).len() - 6
        );
        let q = quantize_model_with(&model, &unit_ranges(&model), &policy).expect("quantize");
        assert_eq!(q.metadata(QUANTIZATION_KEY), Some("qat-test"));
        let dq_outputs: HashSet<&str> = q
            .graph()
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .map(|n| n.output[0].as_str())
            .collect();
        for n in q.graph().node.iter().filter(|n| head.contains(&n.name)) {
            assert!(
                !dq_outputs.contains(n.input[1].as_str()),
                "{} weight quantized",
                n.name
            );
        }
    }

    #[test]
    fn a_group_takes_its_largest_amax_and_a_missing_one_is_named() {
        let model = gelan_t();
        let groups = sharing_groups(&model);
        let mut ranges = unit_ranges(&model);
        // One pool of the SPPELAN saw a larger range: the concat's scale follows it.
        ranges.insert("model.9.cv3_out".into(), 5.0);
        ranges.remove("model.9.cat_out");
        let q = quantize_model(&model, &ranges).expect("quantize");
        let scale = q
            .graph()
            .initializer
            .iter()
            .find(|t| t.name == "model.9.cat_out_scale")
            .and_then(|t| t.to_f32())
            .expect("scale of the SPPELAN concat");
        assert_eq!(scale, vec![5.0 / 127.0]);

        let spp = group_of(&groups, "model.9.cat_out");
        for t in spp {
            ranges.remove(t);
        }
        let err = quantize_model(&model, &ranges)
            .expect_err("no amax for the SPPELAN")
            .to_string();
        assert!(err.contains("'model.9.cat_out'"), "{err}");

        let mut ranges = unit_ranges(&model);
        ranges.insert("images".into(), f32::NAN);
        let err = quantize_model(&model, &ranges)
            .expect_err("NaN amax")
            .to_string();
        assert!(err.contains("'images'") && err.contains("NaN"), "{err}");
    }

    /// One 1x1 convolution with hand-picked weights: the weight arithmetic, the zero-range floors,
    /// and a model without convolutions.
    fn one_conv(weights: &[f32], cout: usize, cin: usize) -> pb::ModelProto {
        let mut b = GraphBuilder::new();
        let x = b.input(
            "x",
            vec![
                Dim::Fixed(1),
                Dim::Fixed(cin as i64),
                Dim::Fixed(2),
                Dim::Fixed(2),
            ],
        );
        let w = b.const_f32("w", &[cout as i64, cin as i64, 1, 1], weights);
        let bias = b.const_f32("b", &[cout as i64], &vec![0.5; cout]);
        let y = b
            .node1(
                "Conv",
                "conv",
                &[&x, &w, &bias],
                vec![pb::AttributeProto::ints("kernel_shape", &[1, 1])],
            )
            .expect("conv");
        b.output(&y, pb::data_type::FLOAT, "");
        b.finish_model("one")
    }

    fn init<'a>(model: &'a pb::ModelProto, name: &str) -> &'a pb::TensorProto {
        model
            .graph()
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"))
    }

    #[test]
    fn weights_round_half_to_even_per_channel() {
        // Channel 0 has max 127 (scale exactly 1): the halves show the rounding. Channel 1 is all
        // zeros: its scale is the floor, not 0.
        let model = one_conv(&[127.0, 2.5, -2.5, 3.5, 0.0, 0.0, 0.0, 0.0], 2, 4);
        let ranges = HashMap::from([("x".to_string(), 0.0f32)]);
        let q = quantize_model(&model, &ranges).expect("quantize");
        let w = init(&q, "w_quantized");
        let values: Vec<i8> = w.raw_data.iter().map(|&b| b as i8).collect();
        assert_eq!(values, vec![127, 2, -2, 4, 0, 0, 0, 0]);
        assert_eq!(
            init(&q, "w_scale").to_f32(),
            Some(vec![1.0, MIN_AMAX / QMAX])
        );
        let zp = init(&q, "w_zero_point");
        assert_eq!(
            (zp.data_type, zp.dims.clone()),
            (pb::data_type::INT8, vec![2])
        );
        // A zero activation range still gives a positive scale.
        let s = init(&q, "x_scale").to_f32().expect("x_scale");
        assert!(s[0] > 0.0);
        assert!(q.graph().initializer.iter().all(|t| t.name != "w"));
        assert!(init(&q, "b").to_f32().is_some(), "biases stay float");
        let dq = q
            .graph()
            .node
            .iter()
            .find(|n| n.name == "w_DequantizeLinear")
            .expect("weight DequantizeLinear");
        assert_eq!(dq.attr_int("axis", -1), 0);
        assert_eq!(quantize_value(1000.0, 1.0), 127);
        assert_eq!(quantize_value(-1000.0, 1.0), -128);
    }

    #[test]
    fn a_model_without_convolutions_is_refused() {
        let mut b = GraphBuilder::new();
        let x = b.input("x", vec![Dim::Fixed(1), Dim::Fixed(3)]);
        let y = b.node1("Relu", "relu", &[&x], vec![]).expect("relu");
        b.output(&y, pb::data_type::FLOAT, "");
        let model = b.finish_model("relu");
        assert!(quantization_points(&model).is_empty());
        let err = quantize_model(&model, &HashMap::new())
            .expect_err("nothing to quantize")
            .to_string();
        assert!(err.contains("no convolution"), "{err}");
        let mut old = one_conv(&[1.0; 4], 1, 4);
        old.opset_import[0].version = 11;
        let err = quantize_model(&old, &HashMap::from([("x".to_string(), 1.0)]))
            .expect_err("opset 11")
            .to_string();
        assert!(err.contains("opset 11"), "{err}");
    }
}
