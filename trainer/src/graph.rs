//! A detector's ONNX graph executed with tch: the deployment form (fused convolutions with bias,
//! as the exporter writes it, or a Q/DQ model) as a differentiable network.
//!
//! Quantization-aware training works on this form, not on the training form of [`crate::Gelan`],
//! so the quantizers sit exactly where the exported Q/DQ model has its QuantizeLinear /
//! DequantizeLinear pairs (`kestrel_exporter::quantize` decides both), and what is trained is what
//! is deployed: the fake-quantized forward pass here and onnxruntime on the exported model compute
//! the same function.

use std::collections::HashMap;

use kestrel_exporter::onnx::pb;
use kestrel_exporter::quantize::{MIN_AMAX, QMAX};
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Error, Result};

/// One operand of a node: a value computed by the graph, or a constant (an initializer).
#[derive(Debug)]
enum Operand {
    Value(usize),
    Param(usize),
    Const(Tensor),
}

/// The operators Kestrel's exporter writes (and the Q/DQ pairs its quantizer adds).
#[derive(Debug)]
enum Op {
    Conv {
        stride: [i64; 2],
        padding: [i64; 2],
        dilation: [i64; 2],
        groups: i64,
    },
    MaxPool {
        kernel: [i64; 2],
        stride: [i64; 2],
        padding: [i64; 2],
        ceil: bool,
    },
    AveragePool {
        kernel: [i64; 2],
        stride: [i64; 2],
        padding: [i64; 2],
        ceil: bool,
        count_include_pad: bool,
    },
    /// Nearest-neighbour upsampling by integer factors (asymmetric coordinates, floor).
    Resize {
        scale: [i64; 2],
    },
    Concat {
        axis: i64,
    },
    Split {
        axis: i64,
        sizes: Vec<i64>,
    },
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
        steps: Vec<i64>,
    },
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<i64>,
    },
    Softmax {
        axis: i64,
    },
    Add,
    Sub,
    Mul,
    Div,
    Sigmoid,
    Relu,
    /// QuantizeLinear to int8 with a scalar scale and zero point 0 (values kept as floats).
    Quantize {
        scale: f64,
    },
    /// DequantizeLinear of an activation with a scalar scale and zero point 0.
    Dequantize {
        scale: f64,
    },
}

#[derive(Debug)]
struct Node {
    name: String,
    op: Op,
    inputs: Vec<Operand>,
    outputs: Vec<usize>,
    /// The top-level layer (`model.N.…`) the node belongs to.
    layer: Option<usize>,
}

/// Fake quantization of one convolution: its input per tensor with `input_scale`, its weight per
/// output channel (scale max|w| / 127, recomputed every pass, as the exporter does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvQuantizer {
    /// Input units per integer step.
    pub input_scale: f64,
}

/// The graph of a detector as tch operations.
#[derive(Debug)]
pub struct GraphNet {
    nodes: Vec<Node>,
    value_names: Vec<String>,
    value_index: HashMap<String, usize>,
    /// Float initializers used as convolution weights and biases: the trainable parameters.
    params: Vec<Tensor>,
    param_names: Vec<String>,
    input: usize,
    output: usize,
    /// A segmentation model's second output, the prototypes (`output1`).
    prototypes: Option<usize>,
    /// Per node index (convolutions only): its fake quantizer.
    quantizers: HashMap<usize, ConvQuantizer>,
    /// Per node index (quantized convolutions): a trainable natural log of the input scale that
    /// replaces the quantizer's fixed one (QAT with learned ranges). The convolutions of one
    /// sharing group hold the same tensor, so they keep one scale.
    learned_log_scales: HashMap<usize, Tensor>,
    /// Quantization on or off as a whole (the teacher of QAT runs with it off).
    pub quantize: bool,
    /// Layers whose quantizers are off (sensitivity analysis).
    pub float_layers: std::collections::HashSet<usize>,
}

/// The top-level layer of a node named `model.N.…` (or `model.N`).
pub fn layer_of(node_name: &str) -> Option<usize> {
    let rest = node_name.strip_prefix("model.")?;
    rest.split('.').next()?.parse().ok()
}

fn unsupported(node: &pb::NodeProto, what: &str) -> Error {
    Error::Quantization(format!(
        "node '{}' ({}): {what}; the trainer runs the graphs Kestrel's exporter writes \
         (export the model with `kestrel-train export` or `kestrel export`)",
        node.name, node.op_type
    ))
}

fn pair(node: &pb::NodeProto, name: &str, default: [i64; 2]) -> Result<[i64; 2]> {
    match node.attr_ints(name) {
        None => Ok(default),
        Some([a, b]) => Ok([*a, *b]),
        Some(v) => Err(unsupported(node, &format!("{name} {v:?} is not 2-D"))),
    }
}

/// `pads` [top, left, bottom, right] as symmetric [h, w] padding.
fn symmetric_pads(node: &pb::NodeProto) -> Result<[i64; 2]> {
    match node.attr_ints("pads") {
        None => Ok([0, 0]),
        Some([t, l, b, r]) if t == b && l == r => Ok([*t, *l]),
        Some(v) => Err(unsupported(node, &format!("asymmetric pads {v:?}"))),
    }
}

impl GraphNet {
    /// Load `model` on `device`. Convolution weights and biases become variables of `vs` (so an
    /// optimizer built on it trains them); every other initializer is a constant. Int8 weights
    /// behind a DequantizeLinear (a Q/DQ model) become float constants holding the dequantized
    /// values.
    pub fn new(model: &pb::ModelProto, vs: &nn::Path) -> Result<Self> {
        let device = vs.device();
        let graph = model.graph();
        let inits: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut net = GraphNet {
            nodes: Vec::with_capacity(graph.node.len()),
            value_names: Vec::new(),
            value_index: HashMap::new(),
            params: Vec::new(),
            param_names: Vec::new(),
            input: 0,
            output: 0,
            prototypes: None,
            quantizers: HashMap::new(),
            learned_log_scales: HashMap::new(),
            quantize: true,
            float_layers: Default::default(),
        };
        let input = graph
            .input
            .iter()
            .find(|i| !inits.contains_key(i.name.as_str()))
            .ok_or_else(|| Error::Quantization("the model has no image input".into()))?;
        net.input = net.value(&input.name);
        let mut param_of: HashMap<String, usize> = HashMap::new();
        // Int8 weights dequantized at load: DequantizeLinear output name → float tensor.
        let mut folded: HashMap<String, Tensor> = HashMap::new();
        for node in &graph.node {
            let float = |name: &str| -> Result<Tensor> {
                let t = inits
                    .get(name)
                    .ok_or_else(|| unsupported(node, &format!("'{name}' is not a constant")))?;
                let v = t
                    .to_f32()
                    .ok_or_else(|| unsupported(node, &format!("'{name}' is not float32")))?;
                let dims: Vec<i64> = t.dims.clone();
                Ok(Tensor::from_slice(&v)
                    .view(dims.as_slice())
                    .to_device(device))
            };
            let ints = |name: &str| -> Result<Vec<i64>> {
                inits
                    .get(name)
                    .and_then(|t| t.to_i64())
                    .ok_or_else(|| unsupported(node, &format!("'{name}' is not an int64 constant")))
            };
            let scalar = |name: &str| -> Result<f64> {
                let t = float(name)?;
                if t.numel() != 1 {
                    return Err(unsupported(node, "per-axis activation scale"));
                }
                Ok(t.double_value(&[]))
            };
            let op = match node.op_type.as_str() {
                "Conv" => {
                    if node.attr_ints("auto_pad").is_some()
                        || node.attr_string("auto_pad").is_some_and(|s| s != "NOTSET")
                    {
                        return Err(unsupported(node, "auto_pad"));
                    }
                    Op::Conv {
                        stride: pair(node, "strides", [1, 1])?,
                        padding: symmetric_pads(node)?,
                        dilation: pair(node, "dilations", [1, 1])?,
                        groups: node.attr_int("group", 1),
                    }
                }
                "MaxPool" => Op::MaxPool {
                    kernel: pair(node, "kernel_shape", [1, 1])?,
                    stride: pair(node, "strides", [1, 1])?,
                    padding: symmetric_pads(node)?,
                    ceil: node.attr_int("ceil_mode", 0) != 0,
                },
                "AveragePool" => Op::AveragePool {
                    kernel: pair(node, "kernel_shape", [1, 1])?,
                    stride: pair(node, "strides", [1, 1])?,
                    padding: symmetric_pads(node)?,
                    ceil: node.attr_int("ceil_mode", 0) != 0,
                    count_include_pad: node.attr_int("count_include_pad", 0) != 0,
                },
                "Resize" => {
                    let mode = node.attr_string("mode").unwrap_or_default();
                    let scales = node
                        .input
                        .get(2)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| unsupported(node, "no scales input"))?;
                    let s = Vec::<f32>::try_from(float(scales)?.to_device(Device::Cpu))?;
                    let int = |v: f32| (v >= 1.0 && v.fract() == 0.0).then_some(v as i64);
                    match (mode.as_str(), s.as_slice()) {
                        ("nearest", [1.0, 1.0, h, w]) => match (int(*h), int(*w)) {
                            (Some(h), Some(w)) => Op::Resize { scale: [h, w] },
                            _ => return Err(unsupported(node, "a non-integer scale")),
                        },
                        _ => return Err(unsupported(node, "only nearest spatial upsampling")),
                    }
                }
                "Concat" => Op::Concat {
                    axis: node.attr_int("axis", 0),
                },
                "Split" => {
                    let sizes = match node.input.get(1).filter(|s| !s.is_empty()) {
                        Some(s) => ints(s)?,
                        None => node
                            .attr_ints("split")
                            .map(<[i64]>::to_vec)
                            .ok_or_else(|| unsupported(node, "no split sizes"))?,
                    };
                    Op::Split {
                        axis: node.attr_int("axis", 0),
                        sizes,
                    }
                }
                "Slice" => {
                    let starts = ints(&node.input[1])?;
                    let ends = ints(&node.input[2])?;
                    let axes = match node.input.get(3).filter(|s| !s.is_empty()) {
                        Some(a) => ints(a)?,
                        None => (0..starts.len() as i64).collect(),
                    };
                    let steps = match node.input.get(4).filter(|s| !s.is_empty()) {
                        Some(s) => ints(s)?,
                        None => vec![1; starts.len()],
                    };
                    Op::Slice {
                        starts,
                        ends,
                        axes,
                        steps,
                    }
                }
                "Reshape" => Op::Reshape {
                    shape: ints(&node.input[1])?,
                },
                "Transpose" => Op::Transpose {
                    perm: node
                        .attr_ints("perm")
                        .map(<[i64]>::to_vec)
                        .ok_or_else(|| unsupported(node, "no perm"))?,
                },
                "Softmax" => Op::Softmax {
                    axis: node.attr_int("axis", -1),
                },
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                "Div" => Op::Div,
                "Sigmoid" => Op::Sigmoid,
                "Relu" => Op::Relu,
                "QuantizeLinear" => Op::Quantize {
                    scale: scalar(&node.input[1])?,
                },
                "DequantizeLinear" => {
                    if let Some(w) = inits.get(node.input[0].as_str()) {
                        // An int8 weight: fold to floats now, per axis.
                        let q = w
                            .to_i8()
                            .ok_or_else(|| unsupported(node, "a weight that is not int8"))?;
                        let q: Vec<f32> = q.into_iter().map(f32::from).collect();
                        let dims: Vec<i64> = w.dims.clone();
                        let scale = float(&node.input[1])?;
                        let axis = node.attr_int("axis", 1);
                        let mut shape = vec![1i64; dims.len()];
                        if scale.numel() > 1 {
                            let a = if axis < 0 {
                                axis + dims.len() as i64
                            } else {
                                axis
                            };
                            shape[a as usize] = scale.numel() as i64;
                        }
                        let values = Tensor::from_slice(&q)
                            .view(dims.as_slice())
                            .to_device(device)
                            * scale.view(shape.as_slice());
                        for o in &node.output {
                            folded.insert(o.clone(), values.shallow_clone());
                        }
                        continue;
                    }
                    Op::Dequantize {
                        scale: scalar(&node.input[1])?,
                    }
                }
                other => {
                    return Err(unsupported(
                        node,
                        &format!("operator {other} is not supported"),
                    ));
                }
            };
            let data_inputs: &[String] = match op {
                Op::Split { .. } | Op::Reshape { .. } | Op::Resize { .. } => &node.input[..1],
                Op::Slice { .. } => &node.input[..1],
                Op::Quantize { .. } | Op::Dequantize { .. } => &node.input[..1],
                _ => &node.input,
            };
            let is_conv = matches!(op, Op::Conv { .. });
            let mut inputs = Vec::with_capacity(data_inputs.len());
            for (k, name) in data_inputs.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                let operand = if let Some(t) = folded.get(name) {
                    Operand::Const(t.shallow_clone())
                } else if inits.contains_key(name.as_str()) {
                    if is_conv && k > 0 {
                        let p = match param_of.get(name) {
                            Some(&p) => p,
                            None => {
                                let init = float(name)?;
                                let p = net.params.len();
                                net.params.push(vs.var_copy(&format!("p{p}"), &init));
                                net.param_names.push(name.clone());
                                param_of.insert(name.clone(), p);
                                p
                            }
                        };
                        Operand::Param(p)
                    } else {
                        Operand::Const(float(name)?)
                    }
                } else {
                    let id = net.value_index.get(name.as_str()).copied().ok_or_else(|| {
                        unsupported(node, &format!("input '{name}' is not computed before it"))
                    })?;
                    Operand::Value(id)
                };
                inputs.push(operand);
            }
            let outputs = node.output.iter().map(|o| net.value(o)).collect();
            net.nodes.push(Node {
                name: node.name.clone(),
                op,
                inputs,
                outputs,
                layer: layer_of(&node.name),
            });
        }
        let output = graph
            .output
            .first()
            .ok_or_else(|| Error::Quantization("the model has no output".into()))?;
        net.output = *net.value_index.get(&output.name).ok_or_else(|| {
            Error::Quantization(format!("output '{}' is not computed", output.name))
        })?;
        if let Some(second) = graph.output.get(1) {
            net.prototypes = Some(*net.value_index.get(&second.name).ok_or_else(|| {
                Error::Quantization(format!("output '{}' is not computed", second.name))
            })?);
        }
        Ok(net)
    }

    fn value(&mut self, name: &str) -> usize {
        if let Some(&i) = self.value_index.get(name) {
            return i;
        }
        let i = self.value_names.len();
        self.value_names.push(name.to_string());
        self.value_index.insert(name.to_string(), i);
        i
    }

    /// The id of the value called `name`.
    pub fn value_id(&self, name: &str) -> Option<usize> {
        self.value_index.get(name).copied()
    }

    /// The first output of the node called `name`.
    pub fn node_output(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.outputs.first().copied())
    }

    /// The name of value `id`.
    pub fn value_name(&self, id: usize) -> &str {
        &self.value_names[id]
    }

    /// The trainable parameters (convolution weights and biases) with their initializer names.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.param_names
            .iter()
            .map(String::as_str)
            .zip(self.params.iter())
    }

    /// The top-level layers (`model.N`) in graph order, each with the value it produces last
    /// (its output).
    pub fn layer_outputs(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for n in &self.nodes {
            let (Some(layer), Some(&o)) = (n.layer, n.outputs.first()) else {
                continue;
            };
            match out.iter_mut().find(|(l, _)| *l == layer) {
                Some(entry) => entry.1 = o,
                None => out.push((layer, o)),
            }
        }
        out
    }

    /// Fake-quantize the convolutions named in `quantizers` (node name → quantizer); every other
    /// convolution stays in floating point. Replaces earlier quantizers.
    pub fn set_quantizers(&mut self, quantizers: &HashMap<String, ConvQuantizer>) -> Result<()> {
        self.quantizers.clear();
        self.learned_log_scales.clear();
        for (k, node) in self.nodes.iter().enumerate() {
            if let Some(q) = quantizers.get(&node.name) {
                if !matches!(node.op, Op::Conv { .. }) {
                    return Err(Error::Quantization(format!(
                        "'{}' is not a convolution; only convolutions get quantizers",
                        node.name
                    )));
                }
                if !(q.input_scale.is_finite() && q.input_scale > 0.0) {
                    return Err(Error::Quantization(format!(
                        "'{}': input scale {} (must be positive and finite)",
                        node.name, q.input_scale
                    )));
                }
                self.quantizers.insert(k, *q);
            }
        }
        if self.quantizers.len() != quantizers.len() {
            let missing: Vec<&String> = quantizers
                .keys()
                .filter(|n| !self.nodes.iter().any(|node| &node.name == *n))
                .collect();
            return Err(Error::Quantization(format!(
                "quantizers for convolutions the graph does not have: {missing:?}"
            )));
        }
        Ok(())
    }

    /// Learn the input ranges of the convolutions in `log_scales` (node name → scalar tensor
    /// holding ln(scale), usually a trainable variable): their quantizers use exp of it, floored
    /// at the exporter's smallest scale, instead of the fixed scale. Each must already have a
    /// quantizer. Replaces earlier learned scales.
    pub fn set_learned_scales(&mut self, log_scales: &HashMap<String, Tensor>) -> Result<()> {
        let mut learned = HashMap::new();
        for (name, t) in log_scales {
            let k = self
                .nodes
                .iter()
                .position(|n| &n.name == name)
                .filter(|k| self.quantizers.contains_key(k))
                .ok_or_else(|| {
                    Error::Quantization(format!(
                        "'{name}' is not a quantized convolution; set its quantizer first"
                    ))
                })?;
            if t.numel() != 1 {
                return Err(Error::Quantization(format!(
                    "the learned scale of '{name}' has {} elements; it is one number",
                    t.numel()
                )));
            }
            learned.insert(k, t.shallow_clone());
        }
        self.learned_log_scales = learned;
        Ok(())
    }

    /// Whether any convolution has a fake quantizer, or the graph holds Q/DQ pairs.
    pub fn is_quantized(&self) -> bool {
        !self.quantizers.is_empty()
            || self
                .nodes
                .iter()
                .any(|n| matches!(n.op, Op::Quantize { .. } | Op::Dequantize { .. }))
    }

    /// The top-level layers that own quantizers, in graph order.
    pub fn quantized_layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = Vec::new();
        for (k, n) in self.nodes.iter().enumerate() {
            if let (Some(l), true) = (n.layer, self.quantizers.contains_key(&k))
                && !layers.contains(&l)
            {
                layers.push(l);
            }
        }
        layers
    }

    /// `output0` of a batch `[B, 3, H, W]`, calling `observe(value id, tensor)` for every value as
    /// it is computed (calibration and QAT supervision read them there).
    pub fn forward_observed(
        &self,
        images: &Tensor,
        observe: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        Ok(self.forward_outputs_observed(images, observe)?.0)
    }

    /// Both outputs (`output0`, and a segmentation model's prototypes `output1`), observed as
    /// in [`GraphNet::forward_observed`].
    pub fn forward_outputs_observed(
        &self,
        images: &Tensor,
        mut observe: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut values: Vec<Option<Tensor>> = (0..self.value_names.len()).map(|_| None).collect();
        values[self.input] = Some(images.shallow_clone());
        observe(self.input, images)?;
        for (k, node) in self.nodes.iter().enumerate() {
            let mut args = Vec::with_capacity(node.inputs.len());
            for operand in &node.inputs {
                args.push(match operand {
                    Operand::Value(id) => values[*id]
                        .as_ref()
                        .map(Tensor::shallow_clone)
                        .ok_or_else(|| {
                            Error::Quantization(format!(
                                "'{}' read before it is computed",
                                self.value_names[*id]
                            ))
                        })?,
                    Operand::Param(p) => self.params[*p].shallow_clone(),
                    Operand::Const(t) => t.shallow_clone(),
                });
            }
            let quantizer = self.quantizers.get(&k).filter(|_| {
                self.quantize && !node.layer.is_some_and(|l| self.float_layers.contains(&l))
            });
            let learned = quantizer.and(self.learned_log_scales.get(&k));
            let results = self
                .apply(node, args, quantizer, learned)
                .map_err(|e| match e {
                    // libtorch appends its C++ stack to the message; the first line says it.
                    Error::Torch(t) => Error::Quantization(format!(
                        "node '{}': {}",
                        node.name,
                        t.to_string().lines().next().unwrap_or_default()
                    )),
                    other => other,
                })?;
            for (&id, t) in node.outputs.iter().zip(results) {
                observe(id, &t)?;
                values[id] = Some(t);
            }
        }
        let prototypes = match self.prototypes {
            Some(id) => Some(values[id].take().ok_or_else(|| {
                Error::Quantization("the prototypes output was not computed".into())
            })?),
            None => None,
        };
        let head = values[self.output]
            .take()
            .ok_or_else(|| Error::Quantization("the output was not computed".into()))?;
        Ok((head, prototypes))
    }

    /// The value id of a segmentation model's prototypes (its second output).
    pub fn prototypes_value(&self) -> Option<usize> {
        self.prototypes
    }

    /// `output0` of a batch `[B, 3, H, W]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_observed(images, |_, _| Ok(()))
    }

    fn apply(
        &self,
        node: &Node,
        mut args: Vec<Tensor>,
        quantizer: Option<&ConvQuantizer>,
        learned_log_scale: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let arity = |n: usize| -> Result<()> {
            if args.len() < n {
                return Err(Error::Quantization(format!(
                    "node '{}' has {} inputs, needs {n}",
                    node.name,
                    args.len()
                )));
            }
            Ok(())
        };
        let binary = |args: &[Tensor], f: fn(&Tensor, &Tensor) -> Tensor| -> Result<Vec<Tensor>> {
            arity(2)?;
            Ok(vec![f(&args[0], &args[1])])
        };
        arity(1)?;
        Ok(match &node.op {
            Op::Conv {
                stride,
                padding,
                dilation,
                groups,
            } => {
                arity(2)?;
                let mut args = args.into_iter();
                let (Some(mut x), Some(mut w)) = (args.next(), args.next()) else {
                    return Err(Error::Quantization(format!(
                        "'{}' has no weight",
                        node.name
                    )));
                };
                let bias = args.next();
                if let Some(q) = quantizer {
                    x = match learned_log_scale {
                        Some(log_scale) => {
                            fake_quantize_learned(&x, &(learned_amax(log_scale) / f64::from(QMAX)))
                        }
                        None => fake_quantize(&x, q.input_scale),
                    };
                    w = fake_quantize_per_channel(&w);
                }
                vec![x.f_conv2d(&w, bias.as_ref(), stride, padding, dilation, *groups)?]
            }
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil,
            } => vec![args[0].f_max_pool2d(kernel, stride, padding, [1, 1], *ceil)?],
            Op::AveragePool {
                kernel,
                stride,
                padding,
                ceil,
                count_include_pad,
            } => vec![args[0].f_avg_pool2d(
                kernel,
                stride,
                padding,
                *ceil,
                *count_include_pad,
                None::<i64>,
            )?],
            Op::Resize { scale } => {
                let size = args[0].size();
                let (h, w) = (size[2] * scale[0], size[3] * scale[1]);
                vec![args[0].f_upsample_nearest2d(
                    [h, w],
                    Some(scale[0] as f64),
                    Some(scale[1] as f64),
                )?]
            }
            Op::Concat { axis } => vec![Tensor::f_cat(&args, *axis)?],
            Op::Split { axis, sizes } => args[0].f_split_with_sizes(sizes, *axis)?,
            Op::Slice {
                starts,
                ends,
                axes,
                steps,
            } => {
                let mut x = args.swap_remove(0);
                for (((&s, &e), &a), &step) in starts.iter().zip(ends).zip(axes).zip(steps) {
                    let rank = x.dim() as i64;
                    let axis = if a < 0 { a + rank } else { a };
                    let len = x.size()[axis as usize];
                    let clampi = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                    x = x.f_slice(axis, Some(clampi(s)), Some(clampi(e)), step)?;
                }
                vec![x]
            }
            Op::Reshape { shape } => {
                let size = args[0].size();
                let dims: Vec<i64> = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if d == 0 { size[i] } else { d })
                    .collect();
                vec![args[0].f_reshape(dims.as_slice())?]
            }
            Op::Transpose { perm } => vec![args[0].f_permute(perm.as_slice())?],
            Op::Softmax { axis } => vec![args[0].f_softmax(*axis, Kind::Float)?],
            Op::Add => binary(&args, |a, b| a + b)?,
            Op::Sub => binary(&args, |a, b| a - b)?,
            Op::Mul => binary(&args, |a, b| a * b)?,
            Op::Div => binary(&args, |a, b| a / b)?,
            Op::Sigmoid => vec![args[0].sigmoid()],
            Op::Relu => vec![args[0].relu()],
            Op::Quantize { scale } => vec![(&args[0] / *scale).round().clamp(-128.0, 127.0)],
            Op::Dequantize { scale } => vec![&args[0] * *scale],
        })
    }
}

/// Symmetric INT8 fake quantization with `scale` (units per step): round(x / scale) saturated to
/// [-128, 127], times the scale, as ONNX QuantizeLinear → DequantizeLinear computes it. The
/// gradient passes straight through where |x| ≤ 127 · scale (the calibrated amax) and is zero
/// outside, where the value saturated.
pub fn fake_quantize(x: &Tensor, scale: f64) -> Tensor {
    let amax = 127.0 * scale;
    let q = (x.detach() / scale).round().clamp(-128.0, 127.0) * scale;
    let clipped = x.clamp(-amax, amax);
    &clipped + (q - &clipped).detach()
}

/// The range (127 · scale, floored at the exporter's smallest amax) a learned ln(scale) stands
/// for. The exporter writes scale = amax / 127 in float32; quantizers divide this same float32
/// amax by 127, so the scale they train with is bit-identical to the exported one (a scale one ulp
/// off flips codes at rounding boundaries, and the flips grow layer by layer).
pub fn learned_amax(log_scale: &Tensor) -> Tensor {
    (log_scale.exp() * f64::from(QMAX)).clamp_min(f64::from(MIN_AMAX))
}

/// [`fake_quantize`] with a trainable `scale` (a scalar tensor), as in LSQ (Esser et al., 2020):
/// the same values, the same masked straight-through gradient for `x`, and for the scale the
/// gradient round(x/s) − x/s inside the range and the saturation bound (−128 or 127) outside,
/// so the range moves to where it costs the loss least.
pub fn fake_quantize_learned(x: &Tensor, scale: &Tensor) -> Tensor {
    let v = (x / scale).clamp(-128.0, 127.0);
    let rounded = &v + (v.round() - &v).detach();
    rounded * scale
}

/// Per-output-channel (axis 0) symmetric INT8 fake quantization of a weight `[Cout, …]`, with
/// scale max|w[c]| / 127 floored at the exporter's smallest amax, so the exported int8 weights are
/// exactly these. Every weight is inside its channel's range, so the gradient passes unchanged.
pub fn fake_quantize_per_channel(w: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..w.dim() as i64).collect();
    let amax = w
        .detach()
        .abs()
        .amax(dims.as_slice(), true)
        .clamp_min(MIN_AMAX as f64);
    let scale = amax / QMAX as f64;
    let q = (w.detach() / &scale).round().clamp(-128.0, 127.0) * scale;
    w + (q - w.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantize_matches_a_hand_computed_reference() {
        // scale 0.1: amax 12.7. 0.05 is a tie and rounds to even (0); 0.15 rounds to 0.2 (2 is
        // even); -20 saturates to -128 steps, 20 to 127.
        let x = Tensor::from_slice(&[0.05f32, 0.15, 0.26, -0.34, 12.66, 20.0, -20.0, 0.0])
            .set_requires_grad(true);
        let y = fake_quantize(&x, 0.1);
        let got = Vec::<f32>::try_from(&y).expect("values");
        let want = [0.0f32, 0.2, 0.3, -0.3, 12.7, 12.7, -12.8, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
        }
        y.sum(Kind::Float).backward();
        let grad = Vec::<f32>::try_from(x.grad()).expect("grad");
        assert_eq!(grad, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn learned_scale_quantizes_alike_and_gets_the_lsq_gradient() {
        // The values and x's gradient are those of the fixed-scale quantizer; the scale's
        // gradient is Σ (round(x/s) − x/s) inside the range plus the bound hit outside:
        // 0.05 → 0 − 0.5; 0.15 → 2 − 1.5; 0.26 → 3 − 2.6; −0.34 → −3 + 3.4; 12.66 → 127 − 126.6;
        // 20 → 127; −20 → −128; 0 → 0.
        let xs = [0.05f32, 0.15, 0.26, -0.34, 12.66, 20.0, -20.0, 0.0];
        let x = Tensor::from_slice(&xs).set_requires_grad(true);
        let scale = Tensor::from_slice(&[0.1f32])
            .squeeze()
            .set_requires_grad(true);
        let y = fake_quantize_learned(&x, &scale);
        let fixed = fake_quantize(&x.detach(), 0.1);
        let got = Vec::<f32>::try_from(&y).expect("values");
        let want = Vec::<f32>::try_from(&fixed).expect("values");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
        }
        y.sum(Kind::Float).backward();
        let grad = Vec::<f32>::try_from(x.grad()).expect("grad");
        assert_eq!(grad, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        let want_scale_grad = -0.5 + 0.5 + 0.4 + 0.4 + 0.4 + 127.0 - 128.0 + 0.0;
        let got_scale_grad = scale.grad().double_value(&[]);
        assert!(
            (got_scale_grad - want_scale_grad).abs() < 1e-4,
            "{got_scale_grad} != {want_scale_grad}"
        );
    }

    #[test]
    fn weights_quantize_per_output_channel() {
        // Channel 0: max 1.27 → scale 0.01; channel 1: max 0.254 → scale 0.002.
        let w = Tensor::from_slice(&[1.27f32, 0.333, -0.0051, 0.254, -0.1, 0.0009])
            .view([2, 3, 1, 1])
            .set_requires_grad(true);
        let y = fake_quantize_per_channel(&w);
        let got = Vec::<f32>::try_from(y.flatten(0, -1)).expect("values");
        let want = [1.27f32, 0.33, -0.01, 0.254, -0.1, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
        }
        y.sum(Kind::Float).backward();
        assert_eq!(
            Vec::<f32>::try_from(w.grad().flatten(0, -1)).expect("grad"),
            [1.0; 6]
        );
    }

    #[test]
    fn a_quantized_convolution_matches_hand_computed_integers() {
        // One 1x1 conv, 2 inputs → 1 output: x = [0.26, -0.5] at input scale 0.1 → [3, -5]
        // steps; w = [0.5, -0.25] → scale 0.5/127, w_q = [127, -64] steps (-63.5 rounds to even).
        let model = one_conv_model();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut net = GraphNet::new(&model, &vs.root()).expect("graph");
        let q = HashMap::from([("conv".to_string(), ConvQuantizer { input_scale: 0.1 })]);
        net.set_quantizers(&q).expect("quantizers");
        let x = Tensor::from_slice(&[0.26f32, -0.5]).view([1, 2, 1, 1]);
        let y = net
            .forward(&x)
            .expect("forward")
            .double_value(&[0, 0, 0, 0]);
        let want = 0.1 * (0.5 / 127.0) * (3.0 * 127.0 + (-5.0) * (-64.0)) + 0.125;
        assert!((y - want).abs() < 1e-6, "{y} != {want}");
        net.quantize = false;
        let y = net
            .forward(&x)
            .expect("forward")
            .double_value(&[0, 0, 0, 0]);
        assert!((y - (0.26 * 0.5 + 0.5 * 0.25 + 0.125)).abs() < 1e-6);
    }

    fn one_conv_model() -> pb::ModelProto {
        use kestrel_exporter::builder::GraphBuilder;
        use kestrel_exporter::shapes::Dim;
        let mut b = GraphBuilder::new();
        let x = b.input(
            "images",
            vec![Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(1), Dim::Fixed(1)],
        );
        let w = b.const_f32("w", &[1, 2, 1, 1], &[0.5, -0.25]);
        let bias = b.const_f32("b", &[1], &[0.125]);
        let y = b
            .node1(
                "Conv",
                "conv",
                &[&x, &w, &bias],
                vec![pb::AttributeProto::ints("kernel_shape", &[1, 1])],
            )
            .expect("conv");
        b.output(&y, pb::data_type::FLOAT, "");
        b.finish_model("one-conv")
    }
}
