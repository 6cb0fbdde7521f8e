//! What a model is: inputs, outputs, operator histogram, Q/DQ pairs, parameters and FLOPs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::error::Result;
use crate::onnx::pb;
use crate::shapes::{self, Dim, format_shape};
use crate::weights::Tensor;

/// A graph input or output.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    pub name: String,
    /// ONNX element type name (FLOAT, INT8, …).
    pub elem_type: String,
    /// Dimensions; symbolic ones by name.
    pub shape: Vec<String>,
}

/// The facts `kestrel inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub producer: String,
    pub ir_version: i64,
    pub opset: Option<i64>,
    pub inputs: Vec<TensorSummary>,
    pub outputs: Vec<TensorSummary>,
    /// Operator type → node count.
    pub ops: BTreeMap<String, usize>,
    /// QuantizeLinear nodes whose output feeds a DequantizeLinear.
    pub qdq_pairs: usize,
    /// Learned parameters: elements of the initializers that are convolution weights and biases.
    pub params: u64,
    /// Floating-point operations for one image, 2 × multiply-accumulates of the convolutions,
    /// as the YOLO tools count them; `None` when shape inference could not follow the graph.
    pub flops: Option<f64>,
    /// Why FLOPs are unknown, when they are.
    pub flops_note: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

fn elem_type_name(t: i32) -> &'static str {
    match t {
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        6 => "INT32",
        7 => "INT64",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        _ => "OTHER",
    }
}

fn summarize_value(v: &pb::ValueInfoProto) -> TensorSummary {
    let (t, dims) = v.tensor_shape().unwrap_or((0, Vec::new()));
    TensorSummary {
        name: v.name.clone(),
        elem_type: elem_type_name(t).into(),
        shape: dims.iter().map(|d| d.to_string()).collect(),
    }
}

/// Initializers used as convolution weights or biases (directly or through a DequantizeLinear).
fn conv_parameter_names(graph: &pb::GraphProto) -> HashSet<String> {
    let dq_source: HashMap<&str, &str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter_map(|n| Some((n.output.first()?.as_str(), n.input.first()?.as_str())))
        .collect();
    let mut names = HashSet::new();
    for n in graph.node.iter().filter(|n| n.op_type == "Conv") {
        for input in n.input.iter().skip(1).filter(|i| !i.is_empty()) {
            let src = dq_source
                .get(input.as_str())
                .copied()
                .unwrap_or(input.as_str());
            names.insert(src.to_string());
        }
    }
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    names.retain(|n| inits.contains(n.as_str()));
    names
}

/// Parameter count: elements of the convolution weight and bias initializers.
pub fn count_params(graph: &pb::GraphProto) -> u64 {
    let names = conv_parameter_names(graph);
    graph
        .initializer
        .iter()
        .filter(|t| names.contains(&t.name))
        .map(|t| t.numel() as u64)
        .sum()
}

/// FLOPs for one image: Σ over convolutions of 2 × output elements × (C_in / groups) × kH × kW.
pub fn count_flops(graph: &pb::GraphProto) -> Result<f64> {
    let shapes = shapes::infer_graph(graph)?;
    let mut macs = 0f64;
    for n in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let out = n.output.first().and_then(|o| shapes.get(o));
        let w = n.input.get(1).and_then(|w| shapes.get(w));
        if let (Some(out), Some(w)) = (out, w) {
            let per_image: f64 = out
                .iter()
                .skip(1)
                .map(|d| d.fixed().unwrap_or(1) as f64)
                .product();
            let k: f64 = w
                .iter()
                .skip(1)
                .map(|d| d.fixed().unwrap_or(1) as f64)
                .product();
            macs += per_image * k;
        }
    }
    Ok(2.0 * macs)
}

/// Summarize a model.
pub fn summarize(model: &pb::ModelProto) -> ModelSummary {
    let graph = model.graph();
    let init_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut ops = BTreeMap::new();
    for n in &graph.node {
        *ops.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    let dq_inputs: HashSet<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter_map(|n| n.input.first().map(String::as_str))
        .collect();
    let qdq_pairs = graph
        .node
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear")
        .filter(|n| n.output.iter().any(|o| dq_inputs.contains(o.as_str())))
        .count();
    let (flops, flops_note) = match count_flops(graph) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e.to_string())),
    };
    ModelSummary {
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        ir_version: model.ir_version,
        opset: model.opset(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !init_names.contains(i.name.as_str()))
            .map(summarize_value)
            .collect(),
        outputs: graph.output.iter().map(summarize_value).collect(),
        ops,
        qdq_pairs,
        params: count_params(graph),
        flops,
        flops_note,
        metadata: model
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
    }
}

/// The convolution weights and biases of a model, by name (what `--save-weights` writes).
pub fn conv_parameters(model: &pb::ModelProto) -> BTreeMap<String, Tensor> {
    let graph = model.graph();
    let names = conv_parameter_names(graph);
    graph
        .initializer
        .iter()
        .filter(|t| names.contains(&t.name))
        .filter_map(|t| {
            Some((
                t.name.clone(),
                Tensor {
                    shape: t.dims.iter().map(|&d| d as usize).collect(),
                    values: t.to_f32()?,
                },
            ))
        })
        .collect()
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |t: &TensorSummary| {
            let dims: Vec<Dim> = t
                .shape
                .iter()
                .map(|s| {
                    s.parse()
                        .map(Dim::Fixed)
                        .unwrap_or_else(|_| Dim::Symbol(s.clone()))
                })
                .collect();
            format!("{:<10} {:<8} {}", t.name, t.elem_type, format_shape(&dims))
        };
        writeln!(f, "producer:    {}", self.producer)?;
        writeln!(
            f,
            "format:      ONNX IR {}, opset {}",
            self.ir_version,
            self.opset
                .map(|o| o.to_string())
                .unwrap_or_else(|| "?".into())
        )?;
        for (k, v) in &self.metadata {
            // Long values (class lists) are cut for the terminal; --json has them whole.
            let shown: String = v.chars().take(100).collect();
            let more = if shown.len() < v.len() { " ..." } else { "" };
            writeln!(f, "meta {k:<7} {shown}{more}")?;
        }
        writeln!(f, "inputs:")?;
        for t in &self.inputs {
            writeln!(f, "  {}", show(t))?;
        }
        writeln!(f, "outputs:")?;
        for t in &self.outputs {
            writeln!(f, "  {}", show(t))?;
        }
        let total: usize = self.ops.values().sum();
        writeln!(f, "operators:   {total} nodes")?;
        for (op, n) in &self.ops {
            writeln!(f, "  {op:<20} {n}")?;
        }
        writeln!(f, "Q/DQ pairs:  {}", self.qdq_pairs)?;
        writeln!(
            f,
            "parameters:  {} ({:.3}M)",
            self.params,
            self.params as f64 / 1e6
        )?;
        match (self.flops, &self.flops_note) {
            (Some(fl), _) => writeln!(f, "GFLOPs:      {:.2} per image", fl / 1e9),
            (None, Some(note)) => writeln!(f, "GFLOPs:      unknown ({note})"),
            (None, None) => writeln!(f, "GFLOPs:      unknown"),
        }
    }
}
