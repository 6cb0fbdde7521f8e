//! The `cpu` backend: tract-onnx runs the ONNX graph as it is (FP32; Q/DQ graphs run with their
//! quantization).
//!
//! A batch runs image by image through one plan optimized for batch 1: on our 2-core build machine
//! tract's batch-2 plan of gelan-t took 1.33 s against 0.45 s for batch 1, so batching on the CPU
//! only costs time.

use std::path::Path;
use std::sync::Arc;

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use crate::end_to_end::EndToEndBuffers;
use crate::engine::{EndToEndOutputs, Engine, EngineInfo, Precision};
use crate::error::{Error, Result};

/// An optimized tract plan, shared by the engine and its state.
pub(crate) type Plan = Arc<TypedRunnableModel>;

/// An engine on tract.
///
/// Run it on the thread that will drop it, or on threads that end: tract keeps per-run scratch
/// (matrix-multiply output stores, about 165 kB for gelan-t) in the thread-local storage of each
/// thread that runs the engine, and frees it only on the thread that drops the engine. A
/// long-lived thread that runs an engine later dropped elsewhere keeps that scratch until it
/// exits (`kestrel serve` warms models up on a thread of its own for this reason).
pub struct CpuEngine {
    info: EngineInfo,
    /// The batch-1 plan (kept alive for its state) and its reusable state.
    _plan: Plan,
    state: TypedSimpleState,
    output: Vec<f32>,
    /// Segmentation models' `output1` of the last run.
    prototypes: Vec<f32>,
    /// End-to-end models' outputs of the last run.
    end_to_end: EndToEndBuffers,
}

pub(crate) fn backend_error(e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cpu",
        message: format!("{e:#}"),
    }
}

/// Threads for matrix products: `$KESTREL_CPU_THREADS`, else every core.
pub fn cpu_threads() -> usize {
    std::env::var("KESTREL_CPU_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn run_options() -> RunOptions {
    let threads = cpu_threads();
    RunOptions {
        executor: (threads > 1).then(|| Executor::multithread(threads)),
        ..RunOptions::default()
    }
}

/// Refuse a model whose graph output is no value of the graph (not an input, initializer or
/// node output): tract 0.23.9's ONNX loader looks output names up unchecked and panics on such a
/// model (found by fuzzing: `fuzz/regressions/onnx_model/output-names-no-value`).
fn check_graph_outputs(bytes: &[u8], path: &Path) -> Result<()> {
    let model = kestrel_exporter::onnx::decode_model(bytes, path).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let graph = model.graph();
    let mut values: std::collections::HashSet<&str> = std::collections::HashSet::new();
    values.extend(graph.input.iter().map(|i| i.name.as_str()));
    values.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    for node in &graph.node {
        values.extend(node.input.iter().chain(&node.output).map(String::as_str));
    }
    // tract skips empty node input and output names, so an empty name is never a value.
    let missing = |name: &str| name.is_empty() || !values.contains(name);
    match graph.output.iter().find(|o| missing(&o.name)) {
        Some(o) => Err(Error::Model {
            path: path.to_path_buf(),
            message: format!(
                "graph output '{}' is not produced by any node, input or initializer",
                o.name
            ),
        }),
        None => Ok(()),
    }
}

/// Parse ONNX `bytes` with tract and build the optimized, multi-threaded plan for one image
/// `[1, 3, H, W]` (`input_hw` in pixels). `outputs`: ONNX tensor names to return instead of the
/// graph outputs (calibration reads intermediate activations this way; naming them as outputs is
/// also what keeps the optimizer from fusing them away). `path` names the model in messages.
pub(crate) fn batch1_plan(
    bytes: &[u8],
    path: &Path,
    input_hw: [usize; 2],
    outputs: Option<&[String]>,
) -> Result<Plan> {
    check_graph_outputs(bytes, path)?;
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| Error::Model {
            path: path.to_path_buf(),
            message: format!("tract cannot load it: {e:#}"),
        })?;
    if let Some(names) = outputs {
        if let Some(missing) = names.iter().find(|n| {
            model.find_outlet_label(n).is_none() && !model.nodes().iter().any(|m| &m.name == *n)
        }) {
            return Err(Error::Model {
                path: path.to_path_buf(),
                message: format!("the model has no tensor named '{missing}'"),
            });
        }
        model
            .select_outputs_by_name(names.iter().map(String::as_str))
            .map_err(backend_error)?;
    }
    let [h, w] = input_hw;
    model
        .with_input_fact(0, f32::fact([1, 3, h, w]).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable_with_options(&run_options()))
        .map_err(backend_error)
}

impl CpuEngine {
    /// Parse the model and build the optimized batch-1 plan.
    pub fn new(bytes: &[u8], info: EngineInfo, path: &Path) -> Result<Self> {
        if info.precision != Precision::Fp32 {
            return Err(Error::InvalidArgument(format!(
                "the cpu backend runs models in fp32 (Q/DQ models keep their int8 steps); \
                 use --precision fp32 instead of {}",
                info.precision
            )));
        }
        let plan = batch1_plan(bytes, path, info.input_hw, None)?;
        let state = plan.spawn().map_err(backend_error)?;
        Ok(Self {
            info,
            _plan: plan,
            state,
            output: Vec::new(),
            prototypes: Vec::new(),
            end_to_end: EndToEndBuffers::default(),
        })
    }
}

impl CpuEngine {
    fn check_input(&self, input: &[f32], batch: usize) -> Result<()> {
        if !self.info.profile.contains(batch) {
            return Err(Error::Shape(format!(
                "batch of {batch} images is outside the engine's profile {} (min:opt:max)",
                self.info.profile
            )));
        }
        let per_image = self.info.input_len();
        if input.len() != batch * per_image {
            return Err(Error::Shape(format!(
                "{} input values for a batch of {batch}; each image needs 3x{}x{} = {per_image}",
                input.len(),
                self.info.input_hw[0],
                self.info.input_hw[1]
            )));
        }
        Ok(())
    }
}

/// The values of output `k` of a run as `T`, checked to be `len` long.
fn output_values<T: tract_onnx::prelude::Datum + Copy>(
    outputs: &TVec<TValue>,
    k: usize,
    name: &str,
    len: usize,
    out: &mut Vec<T>,
) -> Result<()> {
    let t = outputs
        .get(k)
        .ok_or_else(|| backend_error(format!("the model produced no {name}")))?;
    let view = t.try_as_plain_ram().map_err(backend_error)?;
    let values = view.as_slice::<T>().map_err(backend_error)?;
    if values.len() != len {
        return Err(backend_error(format!(
            "{name} has {} values, expected {len} per image",
            values.len()
        )));
    }
    out.extend_from_slice(values);
    Ok(())
}

impl Engine for CpuEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]> {
        if self.info.end_to_end.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{} is an end-to-end model (NMS inside): it returns detections, not output0; \
                 run it through the detector (kestrel infer/val) or Engine::run_end_to_end",
                self.info.model_name
            )));
        }
        self.check_input(input, batch)?;
        let [h, w] = self.info.input_hw;
        let per_image = self.info.input_len();
        let out_len = self.info.output_len();
        let proto_len = self.info.prototypes.map_or(0, |p| p.len());
        self.output.clear();
        self.prototypes.clear();
        for image in input.chunks_exact(per_image) {
            let tensor = Tensor::from_shape(&[1, 3, h, w], image).map_err(backend_error)?;
            let outputs = self
                .state
                .run(tvec!(tensor.into_tvalue()))
                .map_err(backend_error)?;
            output_values(&outputs, 0, "output0", out_len, &mut self.output)?;
            if proto_len > 0 {
                output_values(&outputs, 1, "prototypes", proto_len, &mut self.prototypes)?;
            }
        }
        Ok(&self.output)
    }

    fn run_end_to_end(&mut self, input: &[f32], batch: usize) -> Result<EndToEndOutputs<'_>> {
        // Scalars only: the info's flavour string would allocate on every batch.
        let Some((k, masks)) = self
            .info
            .end_to_end
            .as_ref()
            .map(|e| (e.max_detections, e.masks))
        else {
            return Err(Error::InvalidArgument(format!(
                "{} is not an end-to-end model; export it with --end2end",
                self.info.model_name
            )));
        };
        self.check_input(input, batch)?;
        let [h, w] = self.info.input_hw;
        let b = &mut self.end_to_end;
        b.clear();
        for image in input.chunks_exact(self.info.input_len()) {
            let tensor = Tensor::from_shape(&[1, 3, h, w], image).map_err(backend_error)?;
            let outputs = self
                .state
                .run(tvec!(tensor.into_tvalue()))
                .map_err(backend_error)?;
            output_values(&outputs, 0, "num_dets", 1, &mut b.num_dets)?;
            output_values(&outputs, 1, "det_boxes", 4 * k, &mut b.boxes)?;
            output_values(&outputs, 2, "det_scores", k, &mut b.scores)?;
            output_values(&outputs, 3, "det_classes", k, &mut b.classes)?;
            if let Some(m) = masks {
                let cells = m.width * m.height;
                output_values(&outputs, 4, "det_masks", k * cells, &mut b.masks)?;
            }
        }
        Ok(b.outputs(masks.is_some()))
    }

    fn run_with_prototypes(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<(&[f32], Option<&[f32]>)> {
        self.run(input, batch)?;
        let prototypes = self.info.prototypes.map(|_| &self.prototypes[..]);
        Ok((&self.output, prototypes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_exporter::onnx::encode_model;

    /// Fuzzing (`fuzz/regressions/onnx_model/output-names-no-value`): a graph output that no node
    /// produces made tract panic while loading; it is refused with its name instead.
    #[test]
    fn outputs_that_are_no_value_are_refused() {
        let mut model = kestrel_exporter::builder::tiny_detector().expect("tiny detector");
        let path = Path::new("tiny.onnx");
        assert!(batch1_plan(&encode_model(&model), path, [4, 4], None).is_ok());
        if let Some(g) = model.graph.as_mut() {
            g.output[0].name = "nowhere".into();
        }
        let e = batch1_plan(&encode_model(&model), path, [4, 4], None)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("tiny.onnx") && e.contains("'nowhere'"), "{e}");
    }
}
