//! Calibration for post-training quantization: run the float model on images, letterboxed exactly
//! as inference feeds them, and record the largest |x| (amax) each requested activation reaches,
//! TensorRT's max calibrator. The ranges go to `kestrel_exporter::quantize::quantize_model`.
//!
//! Runs on the CPU backend's tract plan for one image, with the requested tensors as the plan's
//! outputs.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use image::RgbImage;
use kestrel_exporter::onnx::decode_model;
use kestrel_exporter::shapes::Dim;
use tract_onnx::prelude::*;

use crate::cpu::{Plan, backend_error, batch1_plan};
use crate::engine::{BatchProfile, BuildOptions, describe_model};
use crate::error::{Error, Result};
use crate::letterbox::Letterboxer;

/// Collects the amax of activation tensors over calibration images.
pub struct Calibrator {
    /// The plan (kept alive for its state) and its reusable state.
    _plan: Plan,
    state: TypedSimpleState,
    tensors: Vec<String>,
    /// Largest |x| so far, per entry of `tensors`.
    amax: Vec<f32>,
    input_hw: [usize; 2],
    images: usize,
    letterboxer: Letterboxer,
    input: Vec<f32>,
}

impl Calibrator {
    /// Load the float ONNX model (`path` names it in messages) and prepare to measure `tensors`
    /// (ONNX tensor names; duplicates are measured once). The model must take one image input
    /// `[batch, 3, H, W]` like every Kestrel detector.
    pub fn new(model_bytes: &[u8], path: &Path, tensors: &[String]) -> Result<Self> {
        let mut seen = HashSet::new();
        let tensors: Vec<String> = tensors
            .iter()
            .filter(|t| seen.insert(t.as_str()))
            .cloned()
            .collect();
        if tensors.is_empty() {
            return Err(Error::InvalidArgument(
                "no tensors to calibrate; the model has nothing to quantize".into(),
            ));
        }
        let model = decode_model(model_bytes, path).map_err(|e| Error::Model {
            path: path.to_path_buf(),
            message: e.to_string().replace(&format!("{}: ", path.display()), ""),
        })?;
        // A fixed-batch export is fine here: the plan is always built for one image.
        let batch = model
            .graph()
            .input
            .first()
            .and_then(|i| i.tensor_shape())
            .and_then(|(_, dims)| match dims.first() {
                Some(Dim::Fixed(b)) if *b > 0 => Some(*b as usize),
                _ => None,
            })
            .unwrap_or(1);
        let options = BuildOptions {
            profile: BatchProfile::fixed(batch),
            ..BuildOptions::default()
        };
        let info = describe_model(&model, path, &options)?;
        let plan = batch1_plan(model_bytes, path, info.input_hw, Some(&tensors))?;
        let state = plan.spawn().map_err(backend_error)?;
        Ok(Self {
            _plan: plan,
            state,
            amax: vec![0.0; tensors.len()],
            tensors,
            input_hw: info.input_hw,
            images: 0,
            letterboxer: Letterboxer::new(),
            input: Vec::new(),
        })
    }

    /// Model input height and width in pixels.
    pub fn input_hw(&self) -> [usize; 2] {
        self.input_hw
    }

    /// Images measured so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Measure one image given as the engine input: `3 × H × W` float32, RGB planes in [0, 1].
    pub fn add_input(&mut self, input: &[f32]) -> Result<()> {
        let [h, w] = self.input_hw;
        if input.len() != 3 * h * w {
            return Err(Error::Shape(format!(
                "{} input values; one image needs 3x{h}x{w} = {}",
                input.len(),
                3 * h * w
            )));
        }
        let tensor = Tensor::from_shape(&[1, 3, h, w], input).map_err(backend_error)?;
        let outputs = self
            .state
            .run(tvec!(tensor.into_tvalue()))
            .map_err(backend_error)?;
        for ((name, amax), value) in self.tensors.iter().zip(&mut self.amax).zip(&outputs) {
            let view = value.try_as_plain_ram().map_err(backend_error)?;
            let values = view
                .as_slice::<f32>()
                .map_err(|e| backend_error(format!("tensor '{name}' is not float32 ({e})")))?;
            let mut finite = true;
            let mut m = *amax;
            for v in values {
                finite &= v.is_finite();
                m = m.max(v.abs());
            }
            if !finite {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{name}' has non-finite values on calibration image {}: the float \
                     model overflows on it, so it cannot be quantized from these ranges",
                    self.images + 1
                )));
            }
            *amax = m;
        }
        self.images += 1;
        Ok(())
    }

    /// Letterbox `image` to the model input as inference does (centred, fill 114) and measure it.
    pub fn add_image(&mut self, image: &RgbImage) -> Result<()> {
        let [h, w] = self.input_hw;
        self.input.resize(3 * h * w, 0.0);
        self.letterboxer
            .run(image, w as u32, h as u32, &mut self.input)?;
        let input = std::mem::take(&mut self.input);
        let result = self.add_input(&input);
        self.input = input;
        result
    }

    /// Largest |x| per tensor over the images so far (0 for every tensor before any image).
    pub fn amax(&self) -> HashMap<String, f32> {
        self.tensors
            .iter()
            .cloned()
            .zip(self.amax.iter().copied())
            .collect()
    }
}

/// Largest |x| of each of `tensors` over `images`, run through the float ONNX model
/// (`model_bytes`; `path` names it in messages). `progress` gets the count of images done after
/// each one. The first image that fails to load or run stops the calibration with its error.
pub fn activation_amax(
    model_bytes: &[u8],
    path: &Path,
    tensors: &[String],
    images: impl IntoIterator<Item = Result<RgbImage>>,
    mut progress: impl FnMut(usize),
) -> Result<HashMap<String, f32>> {
    let mut calibrator = Calibrator::new(model_bytes, path, tensors)?;
    for image in images {
        calibrator.add_image(&image?)?;
        progress(calibrator.images());
    }
    if calibrator.images() == 0 {
        return Err(Error::InvalidArgument(
            "no calibration images; give at least one".into(),
        ));
    }
    Ok(calibrator.amax())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_exporter::builder::GraphBuilder;
    use kestrel_exporter::onnx::{encode_model, pb};

    /// images [1,3,4,4] → Relu → r; Neg(r) → n; output0 = Reshape(Concat(r, n, n)) [1, 9, 16].
    fn tiny_model() -> Vec<u8> {
        let mut b = GraphBuilder::new();
        let x = b.input(
            "images",
            vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(4)],
        );
        let r = b.node1("Relu", "relu", &[&x], vec![]).expect("relu");
        let n = b.node1("Neg", "neg", &[&r], vec![]).expect("neg");
        let c = b
            .node1(
                "Concat",
                "cat",
                &[&r, &n, &n],
                vec![pb::AttributeProto::int("axis", 1)],
            )
            .expect("concat");
        let shape = b.const_i64("shape", &[1, 9, 16]);
        let y = b
            .node1("Reshape", "flatten", &[&c, &shape], vec![])
            .expect("reshape");
        b.rename_last_output(&y, "output0");
        b.output("output0", pb::data_type::FLOAT, "");
        encode_model(&b.finish_model("tiny"))
    }

    #[test]
    fn max_abs_over_images_per_tensor() {
        let bytes = tiny_model();
        let path = Path::new("tiny.onnx");
        let tensors: Vec<String> = ["images", "relu_out", "neg_out", "relu_out"]
            .map(String::from)
            .to_vec();
        let mut c = Calibrator::new(&bytes, path, &tensors).expect("calibrator");
        assert_eq!(c.input_hw(), [4, 4]);
        let mut a = vec![0.1f32; 48];
        a[5] = -0.9;
        a[40] = 0.4;
        let mut b = vec![0.2f32; 48];
        b[7] = 0.7;
        c.add_input(&a).expect("image a");
        c.add_input(&b).expect("image b");
        let amax = c.amax();
        assert_eq!(amax.len(), 3);
        assert_eq!(amax["images"], 0.9);
        assert_eq!(amax["relu_out"], 0.7);
        assert_eq!(amax["neg_out"], 0.7);
        assert_eq!(c.images(), 2);
        assert!(c.add_input(&a[..10]).is_err());
    }

    #[test]
    fn images_are_letterboxed_and_errors_name_the_problem() {
        let bytes = tiny_model();
        let path = Path::new("tiny.onnx");
        let tensors = vec!["images".to_string()];
        // A white 8x4 image letterboxed into 4x4: white rows and grey (114) padding, so amax 1.
        let white = RgbImage::from_pixel(8, 4, image::Rgb([255, 255, 255]));
        let mut done = Vec::new();
        let amax = activation_amax(&bytes, path, &tensors, [Ok(white)], |n| done.push(n))
            .expect("calibrate");
        assert_eq!(amax["images"], 1.0);
        assert_eq!(done, vec![1]);
        let err = activation_amax(&bytes, path, &tensors, std::iter::empty(), |_| {})
            .expect_err("no images")
            .to_string();
        assert!(err.contains("no calibration images"), "{err}");
        let err = Calibrator::new(&bytes, path, &["nope".to_string()])
            .err()
            .expect("unknown tensor")
            .to_string();
        assert!(err.contains("tiny.onnx") && err.contains("'nope'"), "{err}");
    }
}
