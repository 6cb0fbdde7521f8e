//! A small graph builder: adds nodes and initializers, names them uniquely, and keeps every
//! value's shape (through [`crate::shapes`]) so callers can read channel counts as they go.

use std::collections::HashMap;

use crate::error::Result;
use crate::onnx::pb;
use crate::shapes::{self, Dim, ShapeMap};

/// Builds one ONNX graph.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    shapes: ShapeMap,
    ints: HashMap<String, Vec<i64>>,
    floats: HashMap<String, Vec<f32>>,
    used_names: HashMap<String, usize>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A name not used yet, derived from `base`.
    pub fn unique(&mut self, base: &str) -> String {
        let n = self.used_names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}_{}", *n - 1)
        }
    }

    /// Declare a float32 graph input.
    pub fn input(&mut self, name: &str, dims: Vec<Dim>) -> String {
        self.inputs.push(pb::ValueInfoProto::tensor(
            name,
            pb::data_type::FLOAT,
            &dims,
        ));
        self.shapes.insert(name.to_string(), dims);
        name.to_string()
    }

    /// Declare `value` (already produced) as a graph output with its inferred shape.
    pub fn output(&mut self, value: &str, elem_type: i32, doc: &str) {
        let dims = self.shapes.get(value).cloned().unwrap_or_default();
        let mut vi = pb::ValueInfoProto::tensor(value, elem_type, &dims);
        vi.doc_string = doc.to_string();
        self.outputs.push(vi);
    }

    /// Add a float32 initializer; returns its name (made unique).
    pub fn const_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let name = self.unique(name);
        self.shapes
            .insert(name.clone(), dims.iter().map(|&d| Dim::Fixed(d)).collect());
        if values.len() <= 16 {
            self.floats.insert(name.clone(), values.to_vec());
        }
        self.initializers
            .push(pb::TensorProto::from_f32(&name, dims, values));
        name
    }

    /// Add an int8 initializer (quantized weights, zero points); returns its name (made unique).
    pub fn const_i8(&mut self, name: &str, dims: &[i64], values: &[i8]) -> String {
        let name = self.unique(name);
        self.shapes
            .insert(name.clone(), dims.iter().map(|&d| Dim::Fixed(d)).collect());
        self.initializers
            .push(pb::TensorProto::from_i8(&name, dims, values));
        name
    }

    /// Add an int64 initializer; returns its name (made unique).
    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        let name = self.unique(name);
        let dims = [values.len() as i64];
        self.shapes
            .insert(name.clone(), vec![Dim::Fixed(values.len() as i64)]);
        self.ints.insert(name.clone(), values.to_vec());
        self.initializers
            .push(pb::TensorProto::from_i64(&name, &dims, values));
        name
    }

    /// Add a node with `n_outputs` outputs named after `name`; returns the output names.
    pub fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
        n_outputs: usize,
    ) -> Result<Vec<String>> {
        let name = self.unique(name);
        let outputs: Vec<String> = if n_outputs == 1 {
            vec![format!("{name}_out")]
        } else {
            (0..n_outputs).map(|i| format!("{name}_out{i}")).collect()
        };
        let node = pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name,
            op_type: op_type.into(),
            attribute: attributes,
            ..Default::default()
        };
        let out_shapes = shapes::infer_node(&node, &self.shapes, &self.ints, &self.floats)?;
        for (o, s) in outputs.iter().zip(out_shapes) {
            self.shapes.insert(o.clone(), s);
        }
        self.nodes.push(node);
        Ok(outputs)
    }

    /// A single-output node.
    pub fn node1(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
    ) -> Result<String> {
        let mut outs = self.node(op_type, name, inputs, attributes, 1)?;
        Ok(outs.remove(0))
    }

    /// Rename `old`, an output of the last node added, to `new` (graph outputs get stable names).
    pub fn rename_last_output(&mut self, old: &str, new: &str) {
        if let Some(n) = self.nodes.last_mut() {
            for o in n.output.iter_mut().filter(|o| o.as_str() == old) {
                *o = new.to_string();
            }
        }
        if let Some(s) = self.shapes.remove(old) {
            self.shapes.insert(new.to_string(), s);
        }
    }

    /// Set the doc string of the last node added.
    pub fn doc_last(&mut self, doc: &str) {
        if let Some(n) = self.nodes.last_mut() {
            n.doc_string = doc.to_string();
        }
    }

    /// The shape of a value.
    pub fn shape(&self, value: &str) -> Option<&[Dim]> {
        self.shapes.get(value).map(Vec::as_slice)
    }

    /// The channel count (dimension 1) of a value, when fixed.
    pub fn channels(&self, value: &str) -> Option<usize> {
        self.shape(value)?.get(1)?.fixed().map(|c| c as usize)
    }

    /// The graph as a model with Kestrel's IR version and opset (default domain), no metadata:
    /// what tests and tools that build small graphs need.
    pub fn finish_model(self, name: &str) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: crate::export::IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: crate::export::OPSET,
            }],
            graph: Some(self.finish(name, "")),
            ..Default::default()
        }
    }

    /// Finish: the graph proto.
    pub fn finish(self, name: &str, doc: &str) -> pb::GraphProto {
        pb::GraphProto {
            node: self.nodes,
            name: name.into(),
            initializer: self.initializers,
            doc_string: doc.into(),
            input: self.inputs,
            output: self.outputs,
            value_info: Vec::new(),
        }
    }
}

/// The smallest detector: images `[1, 3, 4, 4]` reshaped to output0 `[1, 6, 8]` (4 box values and
/// 2 class scores for each of 8 anchors), for tests and fuzz seeds that need a model any backend
/// loads in milliseconds.
pub fn tiny_detector() -> Result<pb::ModelProto> {
    let mut b = GraphBuilder::new();
    let x = b.input(
        "images",
        vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(4)],
    );
    let shape = b.const_i64("shape", &[1, 6, 8]);
    let y = b.node1("Reshape", "head", &[&x, &shape], vec![])?;
    b.rename_last_output(&y, "output0");
    b.output("output0", pb::data_type::FLOAT, "");
    Ok(b.finish_model("tiny"))
}
