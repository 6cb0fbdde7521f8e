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

use crate::engine::{Engine, EngineInfo, Precision};
use crate::error::{Error, Result};

/// An optimized tract plan, shared by the engine and its state.
pub(crate) type Plan = Arc<TypedRunnableModel>;

/// An engine on tract.
pub struct CpuEngine {
    info: EngineInfo,
    /// The batch-1 plan (kept alive for its state) and its reusable state.
    _plan: Plan,
    state: TypedSimpleState,
    output: Vec<f32>,
    /// Segmentation models' `output1` of the last run.
    prototypes: Vec<f32>,
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
        })
    }
}

impl Engine for CpuEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]> {
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
        let [h, w] = self.info.input_hw;
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
            let first = outputs
                .first()
                .ok_or_else(|| backend_error("the model produced no output"))?;
            let view = first.try_as_plain_ram().map_err(backend_error)?;
            let values = view.as_slice::<f32>().map_err(backend_error)?;
            if values.len() != out_len {
                return Err(backend_error(format!(
                    "output has {} values, expected {out_len} per image",
                    values.len()
                )));
            }
            self.output.extend_from_slice(values);
            if proto_len > 0 {
                let protos = outputs
                    .get(1)
                    .ok_or_else(|| backend_error("the model produced no prototypes"))?;
                let view = protos.try_as_plain_ram().map_err(backend_error)?;
                let values = view.as_slice::<f32>().map_err(backend_error)?;
                if values.len() != proto_len {
                    return Err(backend_error(format!(
                        "prototypes have {} values, expected {proto_len} per image",
                        values.len()
                    )));
                }
                self.prototypes.extend_from_slice(values);
            }
        }
        Ok(&self.output)
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
