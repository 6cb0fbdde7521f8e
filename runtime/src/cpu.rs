//! The `cpu` backend: tract-onnx runs the ONNX graph as it is (FP32; Q/DQ graphs run with their
//! quantization), one optimized plan per batch size, built on first use and kept.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::engine::{Engine, EngineInfo, Precision};
use crate::error::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

/// An engine on tract.
pub struct CpuEngine {
    info: EngineInfo,
    model: InferenceModel,
    /// Optimized plans and their states, by batch size.
    plans: HashMap<usize, (Plan, TypedSimpleState)>,
    output: Vec<f32>,
}

fn backend_error(e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cpu",
        message: format!("{e:#}"),
    }
}

impl CpuEngine {
    /// Parse the model and build the plan for the profile's `opt` batch.
    pub fn new(bytes: &[u8], info: EngineInfo, path: &Path) -> Result<Self> {
        if info.precision != Precision::Fp32 {
            return Err(Error::InvalidArgument(format!(
                "the cpu backend runs models in fp32 (Q/DQ models keep their int8 steps); \
                 use --precision fp32 instead of {}",
                info.precision
            )));
        }
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| Error::Model {
                path: path.to_path_buf(),
                message: format!("tract cannot load it: {e:#}"),
            })?;
        let opt = info.profile.opt;
        let mut engine = Self {
            info,
            model,
            plans: HashMap::new(),
            output: Vec::new(),
        };
        engine.plan(opt)?;
        Ok(engine)
    }

    fn plan(&mut self, batch: usize) -> Result<&mut (Plan, TypedSimpleState)> {
        if !self.plans.contains_key(&batch) {
            let [h, w] = self.info.input_hw;
            let fact = f32::fact([batch, 3, h, w]);
            let plan = self
                .model
                .clone()
                .with_input_fact(0, fact.into())
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(backend_error)?;
            let state = plan.spawn().map_err(backend_error)?;
            self.plans.insert(batch, (plan, state));
        }
        self.plans
            .get_mut(&batch)
            .ok_or_else(|| backend_error("plan cache lost an entry"))
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
        let tensor = Tensor::from_shape(&[batch, 3, h, w], input).map_err(backend_error)?;
        let out_len = batch * self.info.output_len();
        let (_, state) = self.plan(batch)?;
        let outputs = state
            .run(tvec!(tensor.into_tvalue()))
            .map_err(backend_error)?;
        let first = outputs
            .first()
            .ok_or_else(|| backend_error("the model produced no output"))?;
        let view = first.try_as_plain_ram().map_err(backend_error)?;
        let values = view.as_slice::<f32>().map_err(backend_error)?;
        if values.len() != out_len {
            return Err(backend_error(format!(
                "output has {} values, expected {out_len}",
                values.len()
            )));
        }
        self.output.clear();
        self.output.extend_from_slice(values);
        Ok(&self.output)
    }
}
