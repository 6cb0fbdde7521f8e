//! The layers of a cuda engine, listed without a GPU: the engine's plan is the lowering of its
//! ONNX ([`super::plan::lower`], pure), so each step's fused source nodes, precision in and out
//! and shape per batch bucket follow from the model; the algorithm each step ran with per bucket
//! comes from the layer choices an engine file records ([`crate::engine::Engine::layer_choices`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use kestrel_exporter::onnx::pb;
use serde::Serialize;

use super::plan::{EnginePlan, Layout, Step, lower};
use crate::engine::Precision;
use crate::error::Result;

/// One step of a cuda engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRow {
    /// Position in execution order.
    pub index: usize,
    /// What it does ("conv int8", "pool", "NHWC to row-major", ...).
    pub kind: &'static str,
    /// The ONNX tensor it writes.
    pub output: String,
    /// The ONNX nodes it carries out, `name (OpType)`: several where the engine fused them
    /// (a convolution with its Q/DQ, activation and residual add); none for a step the engine
    /// inserted (a layout conversion or a quantization).
    pub sources: Vec<String>,
    /// Precision of what it reads (its first tensor input) and writes: int8, fp16 or fp32.
    pub precision_in: &'static str,
    pub precision_out: &'static str,
    /// Output shape per batch bucket (batch size → dims).
    pub shapes: BTreeMap<usize, Vec<usize>>,
    /// How it ran per bucket, from the engine file's layer choices: the cuDNN algorithm of a
    /// floating-point convolution, the tile of an INT8 one, or the cuDNN fused-graph plan; empty
    /// for steps with one kernel.
    pub algorithms: BTreeMap<usize, String>,
}

/// The ONNX tensor behind a plan value: the engine's own copies carry a suffix.
fn onnx_name(value: &str) -> &str {
    let mut name = value;
    while let Some(base) = [".int8", ".nhwc", ".rowmajor"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
    {
        name = base;
    }
    name
}

fn precision_of(layout: Layout, half: bool) -> &'static str {
    match layout {
        Layout::NhwcInt8 => "int8",
        Layout::Nhwc if half => "fp16",
        _ => "fp32",
    }
}

/// The rows of a cuda engine of `model` at `precision` with batch `buckets`; `choices`: the
/// engine file's recorded layer choices (`Value::Null` when there are none).
pub fn engine_layers(
    model: &pb::ModelProto,
    precision: Precision,
    buckets: &[usize],
    choices: &serde_json::Value,
) -> Result<Vec<LayerRow>> {
    let int8 = matches!(precision, Precision::Int8 | Precision::Best);
    let half = precision != Precision::Fp32;
    let mut plan = lower(model, int8)?;
    if half && super::stem_wanted((!choices.is_null()).then_some(choices)) {
        plan.fuse_stem();
    }
    let sources = fused_sources(model.graph(), &plan);
    let algorithms = recorded_algorithms(&plan, buckets, choices);
    Ok(plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let y = step.output();
            let x = step
                .inputs()
                .into_iter()
                .find(|&v| plan.values[v].constant.is_none())
                .unwrap_or(y);
            LayerRow {
                index: i,
                kind: step.kind(),
                output: onnx_name(&plan.values[y].name).to_string(),
                sources: sources[i].clone(),
                precision_in: precision_of(plan.values[x].layout, half),
                precision_out: precision_of(plan.values[y].layout, half),
                shapes: buckets
                    .iter()
                    .map(|&b| (b, plan.values[y].shape(b)))
                    .collect(),
                algorithms: algorithms.get(&i).cloned().unwrap_or_default(),
            }
        })
        .collect())
}

/// Per step, the ONNX nodes between its inputs and its output: walking back from the output's
/// producer through tensors the plan does not hold (what fusion removed), stopping at the step's
/// inputs, at every tensor another step writes, at initializers and at graph inputs.
fn fused_sources(graph: &pb::GraphProto, plan: &EnginePlan) -> Vec<Vec<String>> {
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.output.iter().map(move |o| (o.as_str(), k)))
        .collect();
    // Values some step reads or writes (fused passes leave their former intermediates unused).
    let held: HashSet<&str> = plan
        .steps
        .iter()
        .flat_map(|s| s.inputs().into_iter().chain([s.output()]))
        .chain([plan.input])
        .map(|v| onnx_name(&plan.values[v].name))
        .collect();
    let constants: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    plan.steps
        .iter()
        .map(|step| {
            let inputs: HashSet<&str> = step
                .inputs()
                .into_iter()
                .map(|v| onnx_name(&plan.values[v].name))
                .collect();
            let out = onnx_name(&plan.values[step.output()].name);
            let mut found: Vec<usize> = Vec::new();
            let mut stack = vec![out];
            let mut seen = HashSet::new();
            while let Some(t) = stack.pop() {
                if !seen.insert(t) || inputs.contains(t) || constants.contains(t) {
                    continue;
                }
                if t != out && held.contains(t) {
                    continue;
                }
                let Some(&k) = producer.get(t) else {
                    continue;
                };
                if !found.contains(&k) {
                    found.push(k);
                }
                stack.extend(graph.node[k].input.iter().map(String::as_str));
            }
            // A step whose output is one of its inputs under another layout was inserted.
            if inputs.contains(out) {
                found.clear();
            }
            found.sort_unstable();
            found
                .into_iter()
                .map(|k| {
                    let n = &graph.node[k];
                    format!("{} ({})", n.name, n.op_type)
                })
                .collect()
        })
        .collect()
}

/// Step → bucket → the recorded choice: `conv_algorithms` lists the cuDNN algorithm of every
/// floating-point convolution and `int8_tiles` the tile of every INT8 one, per bucket in plan
/// order; `fused_convolutions` maps the steps that ran as a cuDNN fused graph to its plan.
fn recorded_algorithms(
    plan: &EnginePlan,
    buckets: &[usize],
    choices: &serde_json::Value,
) -> HashMap<usize, BTreeMap<usize, String>> {
    let mut out: HashMap<usize, BTreeMap<usize, String>> = HashMap::new();
    for &b in buckets {
        let list = |key: &str| -> Vec<serde_json::Value> {
            choices[key][b.to_string()]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let (algos, tiles) = (list("conv_algorithms"), list("int8_tiles"));
        let fused = &choices["fused_convolutions"][b.to_string()];
        let (mut float_k, mut int8_k) = (0, 0);
        for (i, step) in plan.steps.iter().enumerate() {
            let Step::Conv { int8, .. } = step else {
                continue;
            };
            let recorded = if int8.is_some() {
                int8_k += 1;
                tiles
                    .get(int8_k - 1)
                    .and_then(|t| t.as_str())
                    .map(|t| format!("int8 tile {t}"))
            } else {
                float_k += 1;
                algos
                    .get(float_k - 1)
                    .and_then(serde_json::Value::as_u64)
                    .map(|a| format!("cuDNN algorithm {a}"))
            };
            let chosen = match fused[i.to_string()].as_str() {
                Some(label) => Some(format!("cuDNN fused graph: {label}")),
                None => recorded,
            };
            if let Some(c) = chosen {
                out.entry(i).or_default().insert(b, c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_suffixes_map_back_to_onnx_tensors() {
        assert_eq!(onnx_name("model.2.cv1.act.nhwc.int8"), "model.2.cv1.act");
        assert_eq!(onnx_name("output0.rowmajor"), "output0");
        assert_eq!(onnx_name("images"), "images");
    }
}
