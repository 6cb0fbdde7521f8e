//! Static shape inference for the ONNX operators Kestrel's graphs use.
//!
//! The batch dimension may stay symbolic (`Dim::Symbol("batch")`); every other dimension is
//! computed. Used by the graph builder (each node's output shapes), by `inspect` (FLOPs) and by
//! engine builders (shapes per batch of a profile).

use std::collections::HashMap;
use std::fmt;

use crate::error::{Error, Result};
use crate::onnx::pb;

/// One tensor dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl Dim {
    /// The value, when fixed.
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            Dim::Symbol(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbol(s) => write!(f, "{s}"),
        }
    }
}

/// A shape written like `[batch, 3, 640, 640]`.
pub fn format_shape(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Shapes of every value of a graph, by name.
pub type ShapeMap = HashMap<String, Vec<Dim>>;

/// Constant integer tensors of a graph (initializers), for Reshape/Split/Slice arguments.
pub fn int_constants(graph: &pb::GraphProto) -> HashMap<String, Vec<i64>> {
    graph
        .initializer
        .iter()
        .filter_map(|t| t.to_i64().map(|v| (t.name.clone(), v)))
        .collect()
}

/// Constant float tensors of a graph that are small (Resize scales and the like).
fn small_float_constants(graph: &pb::GraphProto) -> HashMap<String, Vec<f32>> {
    graph
        .initializer
        .iter()
        .filter(|t| t.numel() <= 16)
        .filter_map(|t| t.to_f32().map(|v| (t.name.clone(), v)))
        .collect()
}

/// Infer the shape of every value of `graph`, starting from its declared inputs and initializers.
/// Nodes must be in topological order (ONNX requires it).
pub fn infer_graph(graph: &pb::GraphProto) -> Result<ShapeMap> {
    let mut shapes = ShapeMap::new();
    for t in &graph.initializer {
        shapes.insert(
            t.name.clone(),
            t.dims.iter().map(|&d| Dim::Fixed(d)).collect(),
        );
    }
    for input in &graph.input {
        if shapes.contains_key(&input.name) {
            continue;
        }
        let (_, dims) = input
            .tensor_shape()
            .ok_or_else(|| Error::Graph(format!("input '{}' has no tensor shape", input.name)))?;
        shapes.insert(input.name.clone(), dims);
    }
    let ints = int_constants(graph);
    let floats = small_float_constants(graph);
    for node in &graph.node {
        let outs = infer_node(node, &shapes, &ints, &floats)?;
        for (name, dims) in node.output.iter().zip(outs) {
            if !name.is_empty() {
                shapes.insert(name.clone(), dims);
            }
        }
    }
    Ok(shapes)
}

fn shape_of<'a>(node: &pb::NodeProto, shapes: &'a ShapeMap, i: usize) -> Result<&'a [Dim]> {
    let name = node.input.get(i).filter(|n| !n.is_empty()).ok_or_else(|| {
        Error::Graph(format!(
            "node '{}' ({}) lacks input {i}",
            node.name, node.op_type
        ))
    })?;
    shapes.get(name).map(|v| v.as_slice()).ok_or_else(|| {
        Error::Graph(format!(
            "node '{}' ({}) reads '{name}', which has no known shape",
            node.name, node.op_type
        ))
    })
}

fn fixed(node: &pb::NodeProto, d: &Dim) -> Result<i64> {
    d.fixed().ok_or_else(|| {
        Error::Graph(format!(
            "node '{}' ({}) needs a fixed dimension where the graph has '{d}'",
            node.name, node.op_type
        ))
    })
}

fn normalize_axis(node: &pb::NodeProto, axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(Error::Graph(format!(
            "node '{}' ({}) has axis {axis} outside a rank-{rank} tensor",
            node.name, node.op_type
        )));
    }
    Ok(a as usize)
}

/// Output spatial size of a convolution or pooling window.
fn window_out(input: i64, k: i64, stride: i64, pad_total: i64, dilation: i64, ceil: bool) -> i64 {
    let span = input + pad_total - dilation * (k - 1) - 1;
    if ceil {
        (span + stride - 1).div_euclid(stride) + 1
    } else {
        span.div_euclid(stride) + 1
    }
}

fn spatial_op(
    node: &pb::NodeProto,
    x: &[Dim],
    kernel: &[i64],
    out_channels: Dim,
) -> Result<Vec<Dim>> {
    if x.len() != 4 || kernel.len() != 2 {
        return Err(Error::Graph(format!(
            "node '{}' ({}) expects a 4-D NCHW input, got rank {}",
            node.name,
            node.op_type,
            x.len()
        )));
    }
    let strides = node
        .attr_ints("strides")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![1, 1]);
    let pads = node
        .attr_ints("pads")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![0; 4]);
    let dil = node
        .attr_ints("dilations")
        .map(<[i64]>::to_vec)
        .unwrap_or(vec![1, 1]);
    let ceil = node.attr_int("ceil_mode", 0) != 0;
    if let Some(p) = node.attr_string("auto_pad").filter(|p| p != "NOTSET") {
        return Err(Error::Graph(format!(
            "node '{}' uses auto_pad={p}; only explicit pads are supported",
            node.name
        )));
    }
    if strides.len() != 2 || pads.len() != 4 || dil.len() != 2 {
        return Err(Error::Graph(format!(
            "node '{}' ({}) has malformed strides/pads/dilations",
            node.name, node.op_type
        )));
    }
    let h = fixed(node, &x[2])?;
    let w = fixed(node, &x[3])?;
    let oh = window_out(h, kernel[0], strides[0], pads[0] + pads[2], dil[0], ceil);
    let ow = window_out(w, kernel[1], strides[1], pads[1] + pads[3], dil[1], ceil);
    if oh <= 0 || ow <= 0 {
        return Err(Error::Graph(format!(
            "node '{}' ({}) produces an empty {oh}x{ow} output from {h}x{w}",
            node.name, node.op_type
        )));
    }
    Ok(vec![
        x[0].clone(),
        out_channels,
        Dim::Fixed(oh),
        Dim::Fixed(ow),
    ])
}

fn broadcast(node: &pb::NodeProto, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        let d = match (da, db) {
            (Dim::Fixed(1), d) | (d, Dim::Fixed(1)) => d.clone(),
            (x, y) if x == y => x.clone(),
            _ => {
                return Err(Error::Graph(format!(
                    "node '{}' ({}) cannot broadcast {} with {}",
                    node.name,
                    node.op_type,
                    format_shape(a),
                    format_shape(b)
                )));
            }
        };
        out.push(d);
    }
    Ok(out)
}

/// Output shapes of one node.
pub fn infer_node(
    node: &pb::NodeProto,
    shapes: &ShapeMap,
    ints: &HashMap<String, Vec<i64>>,
    floats: &HashMap<String, Vec<f32>>,
) -> Result<Vec<Vec<Dim>>> {
    let const_ints = |i: usize| -> Result<Vec<i64>> {
        node.input
            .get(i)
            .and_then(|n| ints.get(n))
            .cloned()
            .ok_or_else(|| {
                Error::Graph(format!(
                    "node '{}' ({}) needs input {i} to be a constant INT64 initializer",
                    node.name, node.op_type
                ))
            })
    };
    let op = node.op_type.as_str();
    let out = match op {
        "Conv" => {
            let x = shape_of(node, shapes, 0)?;
            let w = shape_of(node, shapes, 1)?;
            if w.len() != 4 {
                return Err(Error::Graph(format!(
                    "Conv '{}' weight is not 4-D",
                    node.name
                )));
            }
            let kernel = [fixed(node, &w[2])?, fixed(node, &w[3])?];
            let group = node.attr_int("group", 1);
            let cin = fixed(node, &x[1])?;
            let wcin = fixed(node, &w[1])?;
            if cin != wcin * group {
                return Err(Error::Graph(format!(
                    "Conv '{}': input has {cin} channels but the weight expects {} ({} x group {group})",
                    node.name,
                    wcin * group,
                    wcin
                )));
            }
            vec![spatial_op(node, x, &kernel, w[0].clone())?]
        }
        "MaxPool" | "AveragePool" => {
            let x = shape_of(node, shapes, 0)?;
            let kernel = node
                .attr_ints("kernel_shape")
                .map(<[i64]>::to_vec)
                .ok_or_else(|| Error::Graph(format!("{op} '{}' has no kernel_shape", node.name)))?;
            vec![spatial_op(
                node,
                x,
                &kernel,
                x.get(1).cloned().unwrap_or(Dim::Fixed(0)),
            )?]
        }
        "Relu" | "Sigmoid" | "Softmax" | "Identity" | "Exp" | "Neg" | "Tanh" | "Cast"
        | "QuantizeLinear" | "DequantizeLinear" => vec![shape_of(node, shapes, 0)?.to_vec()],
        "Add" | "Sub" | "Mul" | "Div" => {
            let a = shape_of(node, shapes, 0)?;
            let b = shape_of(node, shapes, 1)?;
            vec![broadcast(node, a, b)?]
        }
        "Concat" => {
            let first = shape_of(node, shapes, 0)?.to_vec();
            let axis = normalize_axis(node, node.attr_int("axis", 0), first.len())?;
            let mut out = first;
            let mut total = fixed(node, &out[axis])?;
            for i in 1..node.input.len() {
                let s = shape_of(node, shapes, i)?;
                if s.len() != out.len() {
                    return Err(Error::Graph(format!(
                        "Concat '{}' joins tensors of different ranks",
                        node.name
                    )));
                }
                total += fixed(node, &s[axis])?;
            }
            out[axis] = Dim::Fixed(total);
            vec![out]
        }
        "Split" => {
            let x = shape_of(node, shapes, 0)?;
            let axis = normalize_axis(node, node.attr_int("axis", 0), x.len())?;
            let len = fixed(node, &x[axis])?;
            let sizes = if node.input.len() > 1 && !node.input[1].is_empty() {
                const_ints(1)?
            } else {
                let n = node.output.len() as i64;
                if n == 0 || len % n != 0 {
                    return Err(Error::Graph(format!(
                        "Split '{}' cannot split {len} into {n} equal parts",
                        node.name
                    )));
                }
                vec![len / n; n as usize]
            };
            if sizes.iter().sum::<i64>() != len || sizes.len() != node.output.len() {
                return Err(Error::Graph(format!(
                    "Split '{}' sizes {sizes:?} do not add up to {len}",
                    node.name
                )));
            }
            sizes
                .iter()
                .map(|&s| {
                    let mut o = x.to_vec();
                    o[axis] = Dim::Fixed(s);
                    o
                })
                .collect()
        }
        "Resize" => {
            let x = shape_of(node, shapes, 0)?;
            if let Some(scales) = node
                .input
                .get(2)
                .filter(|n| !n.is_empty())
                .and_then(|n| floats.get(n))
            {
                if scales.len() != x.len() {
                    return Err(Error::Graph(format!(
                        "Resize '{}' scales rank mismatch",
                        node.name
                    )));
                }
                let mut out = Vec::with_capacity(x.len());
                for (d, &s) in x.iter().zip(scales) {
                    out.push(if s == 1.0 {
                        d.clone()
                    } else {
                        Dim::Fixed((fixed(node, d)? as f64 * s as f64).floor() as i64)
                    });
                }
                vec![out]
            } else {
                let sizes = const_ints(3)?;
                vec![sizes.into_iter().map(Dim::Fixed).collect()]
            }
        }
        "Reshape" => {
            let x = shape_of(node, shapes, 0)?;
            let target = const_ints(1)?;
            vec![reshape(node, x, &target)?]
        }
        "Transpose" => {
            let x = shape_of(node, shapes, 0)?;
            let perm: Vec<usize> = match node.attr_ints("perm") {
                Some(p) => p.iter().map(|&v| v as usize).collect(),
                None => (0..x.len()).rev().collect(),
            };
            if perm.len() != x.len() || perm.iter().any(|&p| p >= x.len()) {
                return Err(Error::Graph(format!(
                    "Transpose '{}' has a bad perm",
                    node.name
                )));
            }
            vec![perm.iter().map(|&p| x[p].clone()).collect()]
        }
        "Slice" => {
            let x = shape_of(node, shapes, 0)?;
            let starts = const_ints(1)?;
            let ends = const_ints(2)?;
            let axes = if node.input.len() > 3 && !node.input[3].is_empty() {
                const_ints(3)?
            } else {
                (0..starts.len() as i64).collect()
            };
            let steps = if node.input.len() > 4 && !node.input[4].is_empty() {
                const_ints(4)?
            } else {
                vec![1; starts.len()]
            };
            let mut out = x.to_vec();
            for (((&s, &e), &a), &st) in starts.iter().zip(&ends).zip(&axes).zip(&steps) {
                let axis = normalize_axis(node, a, x.len())?;
                let len = fixed(node, &x[axis])?;
                if st != 1 {
                    return Err(Error::Graph(format!(
                        "Slice '{}' with step {st} is not supported",
                        node.name
                    )));
                }
                let clampi = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                out[axis] = Dim::Fixed((clampi(e) - clampi(s)).max(0));
            }
            vec![out]
        }
        _ => {
            return Err(Error::Graph(format!(
                "operator {op} (node '{}') is not supported by Kestrel's shape inference",
                node.name
            )));
        }
    };
    Ok(out)
}

fn reshape(node: &pb::NodeProto, x: &[Dim], target: &[i64]) -> Result<Vec<Dim>> {
    let mut out: Vec<Option<Dim>> = Vec::with_capacity(target.len());
    for (i, &t) in target.iter().enumerate() {
        out.push(match t {
            0 => Some(x.get(i).cloned().ok_or_else(|| {
                Error::Graph(format!(
                    "Reshape '{}' copies a dimension the input lacks",
                    node.name
                ))
            })?),
            -1 => None,
            v if v > 0 => Some(Dim::Fixed(v)),
            v => {
                return Err(Error::Graph(format!(
                    "Reshape '{}' has dimension {v}",
                    node.name
                )));
            }
        });
    }
    let unknown = out.iter().filter(|d| d.is_none()).count();
    if unknown > 1 {
        return Err(Error::Graph(format!(
            "Reshape '{}' has more than one -1",
            node.name
        )));
    }
    let mut in_syms: Vec<&String> = x
        .iter()
        .filter_map(|d| match d {
            Dim::Symbol(s) => Some(s),
            _ => None,
        })
        .collect();
    let mut out_syms: Vec<&String> = out
        .iter()
        .flatten()
        .filter_map(|d| match d {
            Dim::Symbol(s) => Some(s),
            _ => None,
        })
        .collect();
    in_syms.sort();
    out_syms.sort();
    // Checked: the dimensions come from the file, and their product can overflow an i64.
    let product = |dims: Vec<i64>| dims.into_iter().try_fold(1i64, i64::checked_mul);
    let (Some(in_fixed), Some(out_fixed)) = (
        product(x.iter().filter_map(Dim::fixed).collect()),
        product(out.iter().flatten().filter_map(Dim::fixed).collect()),
    ) else {
        return Err(Error::Graph(format!(
            "Reshape '{}' has more elements than a 64-bit count holds",
            node.name
        )));
    };
    if in_syms != out_syms {
        return Err(Error::Graph(format!(
            "Reshape '{}' moves a symbolic dimension; only batch-preserving reshapes are supported",
            node.name
        )));
    }
    if unknown == 1 {
        if out_fixed <= 0 || in_fixed < 0 || in_fixed % out_fixed != 0 {
            return Err(Error::Graph(format!(
                "Reshape '{}' cannot infer -1",
                node.name
            )));
        }
        let v = in_fixed / out_fixed;
        Ok(out
            .into_iter()
            .map(|d| d.unwrap_or(Dim::Fixed(v)))
            .collect())
    } else if in_fixed != out_fixed {
        Err(Error::Graph(format!(
            "Reshape '{}' changes the element count ({} to {})",
            node.name,
            format_shape(x),
            target.len()
        )))
    } else {
        Ok(out.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing (`fuzz/regressions/onnx_model/reshape-element-count-overflow`): a Reshape whose
    /// dimensions multiply past i64::MAX overflowed (a panic) instead of being refused.
    #[test]
    fn reshapes_of_overflowing_sizes_are_refused() {
        let node = pb::NodeProto {
            name: "r".into(),
            ..Default::default()
        };
        let x = [Dim::Fixed(1 << 40), Dim::Fixed(1 << 40)];
        let e = reshape(&node, &x, &[-1]).unwrap_err().to_string();
        assert!(e.contains("64-bit"), "{e}");
        let e = reshape(&node, &[Dim::Fixed(-4)], &[-1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot infer"), "{e}");
        assert_eq!(
            reshape(&node, &[Dim::Fixed(4), Dim::Fixed(6)], &[-1, 3]).unwrap(),
            vec![Dim::Fixed(8), Dim::Fixed(3)]
        );
    }

    #[test]
    fn window_sizes_match_pytorch() {
        // 3x3 stride 2 pad 1 on 639 (after a k2 s1 avgpool of 640) gives 320.
        assert_eq!(window_out(639, 3, 2, 2, 1, false), 320);
        assert_eq!(window_out(640, 3, 2, 2, 1, false), 320);
        assert_eq!(window_out(640, 2, 1, 0, 1, false), 639);
        assert_eq!(window_out(20, 5, 1, 4, 1, false), 20);
    }

    #[test]
    fn reshape_keeps_batch_symbol() {
        let node = pb::NodeProto {
            name: "r".into(),
            op_type: "Reshape".into(),
            ..Default::default()
        };
        let x = vec![
            Dim::Symbol("batch".into()),
            Dim::Fixed(64),
            Dim::Fixed(80),
            Dim::Fixed(80),
        ];
        let out = reshape(&node, &x, &[0, 64, -1]).unwrap();
        assert_eq!(
            out,
            vec![
                Dim::Symbol("batch".into()),
                Dim::Fixed(64),
                Dim::Fixed(6400)
            ]
        );
        assert!(reshape(&node, &x, &[-1, 64]).is_err());
    }
}
