//! Looking inside a model when INT8 is slower or less accurate than expected: which convolutions
//! are quantized, which Q/DQ scales are shared and which operators break the sharing rules (each
//! break is a requantization in an engine), and a picture of the graph coloured by precision.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::onnx::pb;

/// How a convolution runs in an INT8 engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvPrecision {
    /// Its input and weight come through Q/DQ pairs: an INT8 convolution.
    Int8,
    /// No Q/DQ on its input or weight: it stays in floating point (FP16 in an engine).
    Float,
}

/// One convolution of the graph.
#[derive(Debug, Clone, Serialize)]
pub struct ConvView {
    pub name: String,
    /// The top-level layer (`model.N`) it belongs to, if any.
    pub layer: Option<usize>,
    pub precision: ConvPrecision,
    /// Weight elements (its size in the picture).
    pub weights: u64,
    /// A consumer convolution runs at the other precision: the engine converts between them.
    pub precision_boundary: bool,
}

/// Tensors quantized with one scale.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleGroup {
    pub scale: f32,
    /// The float tensors quantized with this scale.
    pub tensors: Vec<String>,
}

/// An operator whose quantized inputs and output do not share one scale, against TensorRT's
/// rules (concatenations, residual adds, pools, resizes and splits keep one scale): an engine must
/// requantize there.
#[derive(Debug, Clone, Serialize)]
pub struct SharingBreak {
    pub node: String,
    pub op: String,
    /// (tensor, scale) of each quantized input and output of the node.
    pub scales: Vec<(String, f32)>,
}

/// What [`qdq_report`] finds.
#[derive(Debug, Clone, Serialize)]
pub struct QdqReport {
    pub convs: Vec<ConvView>,
    pub int8_convs: usize,
    pub float_convs: usize,
    /// Groups of tensors with the same scale, largest first.
    pub scale_groups: Vec<ScaleGroup>,
    pub sharing_breaks: Vec<SharingBreak>,
}

/// The scale of each tensor quantized by a QuantizeLinear with a scalar scale (per-tensor
/// activations), keyed by the float tensor.
fn activation_scales(graph: &pb::GraphProto) -> HashMap<String, f32> {
    let scalar: HashMap<&str, f32> = graph
        .initializer
        .iter()
        .filter_map(|t| {
            let v = t.to_f32()?;
            (v.len() == 1).then(|| (t.name.as_str(), v[0]))
        })
        .collect();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear")
        .filter_map(|n| {
            let s = scalar.get(n.input.get(1)?.as_str())?;
            Some((n.input.first()?.clone(), *s))
        })
        .collect()
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.")?
        .split(['.', '/', '_'])
        .next()?
        .parse()
        .ok()
}

/// Which convolutions are INT8, the scale groups, and where the sharing rules break.
pub fn qdq_report(model: &pb::ModelProto) -> QdqReport {
    let graph = model.graph();
    let producer: HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let dequantized = |t: &str| {
        producer
            .get(t)
            .is_some_and(|n| n.op_type == "DequantizeLinear")
    };
    let weight_size: HashMap<&str, u64> = graph
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dims.iter().product::<i64>().max(0) as u64,
            )
        })
        .collect();
    // A DQ'd weight's size is its int8 initializer's.
    let size_of = |t: &str| -> u64 {
        if let Some(&s) = weight_size.get(t) {
            return s;
        }
        producer
            .get(t)
            .and_then(|n| n.input.first())
            .and_then(|w| weight_size.get(w.as_str()))
            .copied()
            .unwrap_or(0)
    };
    let mut convs: Vec<ConvView> = Vec::new();
    let mut precision_of_output: HashMap<&str, ConvPrecision> = HashMap::new();
    for n in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let (Some(x), Some(w)) = (n.input.first(), n.input.get(1)) else {
            continue;
        };
        let precision = if dequantized(x) && dequantized(w) {
            ConvPrecision::Int8
        } else {
            ConvPrecision::Float
        };
        if let Some(o) = n.output.first() {
            precision_of_output.insert(o.as_str(), precision);
        }
        convs.push(ConvView {
            name: n.name.clone(),
            layer: layer_of(&n.name),
            precision,
            weights: size_of(w),
            precision_boundary: false,
        });
    }
    // Follow each convolution's output through non-convolutions (Q/DQ, activations, concats …)
    // to the next convolutions; a different precision there is a boundary.
    let mut consumers: HashMap<&str, Vec<&pb::NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    for (k, n) in graph
        .node
        .iter()
        .filter(|n| n.op_type == "Conv" && n.input.len() >= 2)
        .enumerate()
    {
        let Some(out) = n.output.first() else {
            continue;
        };
        let mine = convs[k].precision;
        let mut frontier = vec![out.as_str()];
        let mut seen = std::collections::HashSet::new();
        let mut boundary = false;
        while let Some(t) = frontier.pop() {
            if !seen.insert(t) || seen.len() > 64 {
                continue;
            }
            for c in consumers.get(t).map(Vec::as_slice).unwrap_or_default() {
                if c.op_type == "Conv" {
                    let theirs = c
                        .output
                        .first()
                        .and_then(|o| precision_of_output.get(o.as_str()));
                    boundary |= theirs.is_some_and(|&p| p != mine);
                } else {
                    frontier.extend(c.output.iter().map(String::as_str));
                }
            }
        }
        convs[k].precision_boundary = boundary;
    }
    let scales = activation_scales(graph);
    let mut by_scale: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (t, s) in &scales {
        by_scale.entry(s.to_bits()).or_default().push(t.clone());
    }
    let mut scale_groups: Vec<ScaleGroup> = by_scale
        .into_iter()
        .map(|(bits, mut tensors)| {
            tensors.sort();
            ScaleGroup {
                scale: f32::from_bits(bits),
                tensors,
            }
        })
        .collect();
    scale_groups.sort_by(|a, b| {
        b.tensors
            .len()
            .cmp(&a.tensors.len())
            .then(a.tensors.cmp(&b.tensors))
    });
    // The float tensor a DQ output stands for (x → Q → DQ → x_dq): look through the pair.
    let source_of = |t: &str| -> String {
        producer
            .get(t)
            .filter(|n| n.op_type == "DequantizeLinear")
            .and_then(|dq| dq.input.first())
            .and_then(|q| producer.get(q.as_str()))
            .filter(|q| q.op_type == "QuantizeLinear")
            .and_then(|q| q.input.first())
            .cloned()
            .unwrap_or_else(|| t.to_string())
    };
    let mut sharing_breaks = Vec::new();
    for n in &graph.node {
        let all_inputs = matches!(n.op_type.as_str(), "Concat" | "Add");
        let first_only = matches!(
            n.op_type.as_str(),
            "MaxPool" | "AveragePool" | "Resize" | "Split"
        );
        if !all_inputs && !first_only {
            continue;
        }
        let inputs = n.input.iter().take(if all_inputs { usize::MAX } else { 1 });
        let mut found: Vec<(String, f32)> = inputs
            .chain(&n.output)
            .filter_map(|t| {
                let src = source_of(t);
                scales.get(&src).map(|&s| (src, s))
            })
            .collect();
        found.dedup_by(|a, b| a.0 == b.0);
        if found.windows(2).any(|w| w[0].1 != w[1].1) {
            sharing_breaks.push(SharingBreak {
                node: n.name.clone(),
                op: n.op_type.clone(),
                scales: found,
            });
        }
    }
    let int8_convs = convs
        .iter()
        .filter(|c| c.precision == ConvPrecision::Int8)
        .count();
    QdqReport {
        float_convs: convs.len() - int8_convs,
        int8_convs,
        convs,
        scale_groups,
        sharing_breaks,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Fill colours: INT8 green, floating point orange; a precision boundary gets a red outline.
const INT8_FILL: &str = "#2aa198";
const FLOAT_FILL: &str = "#cb4b16";
const BOUNDARY_STROKE: &str = "#dc322f";

/// An SVG picture of the model's convolutions, one row per top-level layer (`model.N`) in graph
/// order, each convolution a box coloured by precision, its width growing with the log of its
/// weight count; convolutions whose output meets the other precision are outlined in red (a
/// conversion in the engine). Hovering a box shows its name (`<title>`).
pub fn graph_svg(model: &pb::ModelProto, title: &str) -> String {
    let report = qdq_report(model);
    let mut rows: Vec<(String, Vec<&ConvView>)> = Vec::new();
    for c in &report.convs {
        let label = c
            .layer
            .map_or_else(|| "other".to_string(), |l| format!("model.{l}"));
        match rows.last_mut() {
            Some((l, v)) if *l == label => v.push(c),
            _ => rows.push((label, vec![c])),
        }
    }
    let (row_h, left, top) = (22.0, 90.0, 56.0);
    let width_of = |c: &ConvView| 6.0 + 3.0 * ((c.weights as f64) + 1.0).log2();
    let content_w = rows
        .iter()
        .map(|(_, v)| v.iter().map(|c| width_of(c) + 3.0).sum::<f64>())
        .fold(0.0, f64::max);
    let (w, h) = (
        left + content_w + 20.0,
        top + rows.len() as f64 * row_h + 20.0,
    );
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="14">{t}</text>
<text x="10" y="38"><tspan fill="{INT8_FILL}">■ INT8 ({i})</tspan>  <tspan fill="{FLOAT_FILL}">■ float ({f})</tspan>  <tspan fill="{BOUNDARY_STROKE}">□ precision boundary</tspan>  · {b} scale-sharing breaks</text>
"#,
        t = escape(title),
        i = report.int8_convs,
        f = report.float_convs,
        b = report.sharing_breaks.len(),
    );
    for (r, (label, convs)) in rows.iter().enumerate() {
        let y = top + r as f64 * row_h;
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}">{}</text>"#,
            y + 14.0,
            escape(label)
        );
        let mut x = left;
        for c in convs {
            let bw = width_of(c);
            let (fill, class) = match c.precision {
                ConvPrecision::Int8 => (INT8_FILL, "int8"),
                ConvPrecision::Float => (FLOAT_FILL, "float"),
            };
            let stroke = if c.precision_boundary {
                format!(r#" stroke="{BOUNDARY_STROKE}" stroke-width="2""#)
            } else {
                String::new()
            };
            let _ = writeln!(
                svg,
                r#"<rect class="conv {class}" x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{hh:.1}" fill="{fill}"{stroke}><title>{n} ({class}, {wts} weights)</title></rect>"#,
                hh = row_h - 6.0,
                n = escape(&c.name),
                wts = c.weights,
            );
            x += bw + 3.0;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// One engine layer's share of a profiled run, for [`profile_svg`].
#[derive(Debug, Clone, PartialEq)]
pub struct TimedLayer {
    /// What the layer does (`conv int8 (cuDNN fused)`, `pool`, …).
    pub kind: String,
    /// The tensor it writes, with its shape.
    pub name: String,
    /// Device time, milliseconds.
    pub ms: f64,
}

/// The class of a timed layer: INT8 where its kind says so, floating point for the other
/// convolutions, `other` for the rest (copies, pools, quantization, …).
fn timed_class(kind: &str) -> (&'static str, &'static str) {
    if kind.contains("int8") {
        ("int8", INT8_FILL)
    } else if kind.contains("conv") {
        ("float", FLOAT_FILL)
    } else {
        ("other", "#93a1a1")
    }
}

/// An SVG of an engine's layers in execution order, one bar each, its length the layer's time:
/// where the time goes, and which precision spends it.
pub fn profile_svg(layers: &[TimedLayer], title: &str) -> String {
    let total: f64 = layers.iter().map(|l| l.ms).sum();
    let longest = layers.iter().map(|l| l.ms).fold(0.0, f64::max).max(1e-9);
    let (row_h, left, top, bar_w) = (12.0, 10.0, 56.0, 600.0);
    let (w, h) = (
        left + bar_w + 320.0,
        top + layers.len() as f64 * row_h + 20.0,
    );
    let mut svg = String::new();
    let share = |class: &str| -> f64 {
        layers
            .iter()
            .filter(|l| timed_class(&l.kind).0 == class)
            .map(|l| l.ms)
            .sum()
    };
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="10">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="14">{t}</text>
<text x="10" y="38" font-size="11">{total:.3} ms in {n} layers: <tspan fill="{INT8_FILL}">INT8 {i:.3} ms</tspan>, <tspan fill="{FLOAT_FILL}">float convolutions {f:.3} ms</tspan>, other {o:.3} ms</text>
"#,
        t = escape(title),
        n = layers.len(),
        i = share("int8"),
        f = share("float"),
        o = share("other"),
    );
    for (k, l) in layers.iter().enumerate() {
        let y = top + k as f64 * row_h;
        let (class, fill) = timed_class(&l.kind);
        let bw = (bar_w * l.ms / longest).max(1.0);
        let _ = writeln!(
            svg,
            r#"<rect class="layer {class}" x="{left:.1}" y="{y:.1}" width="{bw:.1}" height="{hh:.1}" fill="{fill}"><title>{name}: {kind}, {ms:.4} ms</title></rect><text x="{tx:.1}" y="{ty:.1}">{ms:.3} ms {kind}</text>"#,
            hh = row_h - 2.0,
            name = escape(&l.name),
            kind = escape(&l.kind),
            ms = l.ms,
            tx = left + bw + 4.0,
            ty = y + row_h - 3.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}
