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
    /// |x| histograms per entry of `tensors`, for the histogram methods (empty for max).
    histograms: Vec<AbsHistogram>,
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
        Self::with_method(model_bytes, path, tensors, CalibrationMethod::Max)
    }

    /// [`Calibrator::new`] keeping what `method` needs (|x| histograms for all but max).
    pub fn with_method(
        model_bytes: &[u8],
        path: &Path,
        tensors: &[String],
        method: CalibrationMethod,
    ) -> Result<Self> {
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
            histograms: if method.needs_histogram() {
                vec![AbsHistogram::new(); tensors.len()]
            } else {
                Vec::new()
            },
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
        for (h, value) in self.histograms.iter_mut().zip(&outputs) {
            let view = value.try_as_plain_ram().map_err(backend_error)?;
            h.add(view.as_slice::<f32>().map_err(backend_error)?);
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

impl Calibrator {
    /// The range of each tensor by `method` (which must be the one the calibrator was made for,
    /// or max, which every calibrator keeps).
    pub fn ranges(&self, method: CalibrationMethod) -> Result<HashMap<String, f32>> {
        if !method.needs_histogram() {
            return Ok(self.amax());
        }
        if self.histograms.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: this calibrator kept no histograms; create it with that method",
                method.label()
            )));
        }
        Ok(self
            .tensors
            .iter()
            .cloned()
            .zip(self.histograms.iter().map(|h| h.amax(method)))
            .collect())
    }
}

/// The range `method` picks for each of `tensors` over `images`, run through the float ONNX
/// model (`model_bytes`; `path` names it in messages). `progress` gets the count of images done
/// after each one. The first image that fails to load or run stops the calibration.
pub fn activation_ranges(
    model_bytes: &[u8],
    path: &Path,
    tensors: &[String],
    images: impl IntoIterator<Item = Result<RgbImage>>,
    method: CalibrationMethod,
    mut progress: impl FnMut(usize),
) -> Result<HashMap<String, f32>> {
    let mut calibrator = Calibrator::with_method(model_bytes, path, tensors, method)?;
    for image in images {
        calibrator.add_image(&image?)?;
        progress(calibrator.images());
    }
    if calibrator.images() == 0 {
        return Err(Error::InvalidArgument(
            "no calibration images; give at least one".into(),
        ));
    }
    calibrator.ranges(method)
}

/// Largest |x| of each of `tensors` over `images`, run through the float ONNX model
/// (`model_bytes`; `path` names it in messages). `progress` gets the count of images done after
/// each one. The first image that fails to load or run stops the calibration with its error.
pub fn activation_amax(
    model_bytes: &[u8],
    path: &Path,
    tensors: &[String],
    images: impl IntoIterator<Item = Result<RgbImage>>,
    progress: impl FnMut(usize),
) -> Result<HashMap<String, f32>> {
    activation_ranges(
        model_bytes,
        path,
        tensors,
        images,
        CalibrationMethod::Max,
        progress,
    )
}

/// How a tensor's range (amax, the largest |x| its quantization covers) is chosen from what
/// calibration saw. TensorRT's and pytorch-quantization's calibrators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibrationMethod {
    /// The largest |x| seen.
    Max,
    /// From the |x| histogram: the amax whose quantization has the least mean squared error.
    Mse,
    /// From the |x| histogram: the amax below which this percentage (e.g. 99.99) of the values
    /// fall.
    Percentile(f64),
    /// From the |x| histogram: the amax whose quantized distribution is closest to the original
    /// in KL divergence (TensorRT's entropy calibrator).
    Entropy,
}

impl CalibrationMethod {
    /// From the command-line pair `--calibrator max|histogram` and `--method mse|percentile|
    /// entropy` (the method only for histograms), with the percentile for `percentile`.
    pub fn parse(calibrator: &str, method: &str, percentile: f64) -> Result<Self> {
        match (calibrator, method) {
            ("max", _) => Ok(Self::Max),
            ("histogram", "mse") => Ok(Self::Mse),
            ("histogram", "entropy") => Ok(Self::Entropy),
            ("histogram", "percentile") => {
                if !(percentile > 0.0 && percentile <= 100.0) {
                    return Err(Error::InvalidArgument(format!(
                        "percentile {percentile}: give a percentage in (0, 100], e.g. 99.99"
                    )));
                }
                Ok(Self::Percentile(percentile))
            }
            ("histogram", other) => Err(Error::InvalidArgument(format!(
                "calibration method '{other}': use mse, percentile or entropy"
            ))),
            (other, _) => Err(Error::InvalidArgument(format!(
                "calibrator '{other}': use max or histogram"
            ))),
        }
    }

    /// Whether the method needs histograms (every method but max).
    pub fn needs_histogram(&self) -> bool {
        !matches!(self, Self::Max)
    }

    /// A short name for metadata and reports: `max`, `histogram-mse`, `histogram-99.99`,
    /// `histogram-entropy`.
    pub fn label(&self) -> String {
        match self {
            Self::Max => "max".into(),
            Self::Mse => "histogram-mse".into(),
            Self::Percentile(p) => format!("histogram-{p}"),
            Self::Entropy => "histogram-entropy".into(),
        }
    }
}

/// Histogram of |x| over calibration batches, as pytorch-quantization's histogram calibrator
/// keeps it: [`AbsHistogram::BINS`] bins over [0, the first batch's max]; a later, larger value
/// adds bins of the same width, so earlier counts never move.
#[derive(Debug, Clone, Default)]
pub struct AbsHistogram {
    /// Bin width in the tensor's units (0 until a non-zero value arrives).
    width: f64,
    counts: Vec<f64>,
    /// Values counted before any range existed (all zeros); they join bin 0.
    zeros: f64,
    max: f32,
}

impl AbsHistogram {
    /// Bins over the first batch's range.
    pub const BINS: usize = 2048;
    /// Smallest candidate amax (in bins) for the MSE and entropy searches: below it the 127
    /// quantization steps would be finer than the histogram.
    const START_BIN: usize = 128;

    pub fn new() -> Self {
        Self::default()
    }

    /// The largest |x| seen.
    pub fn max(&self) -> f32 {
        self.max
    }

    /// Values counted.
    pub fn total(&self) -> f64 {
        self.zeros + self.counts.iter().sum::<f64>()
    }

    /// Make room for a batch whose largest |x| is `batch_max`, and return the binning to count it
    /// with: (bin width, number of bins). A value v goes to bin min(⌊v / width⌋, bins − 1). Width 0
    /// means no range yet: count every value into bin 0.
    pub fn grow(&mut self, batch_max: f32) -> (f64, usize) {
        if batch_max.is_finite() && batch_max > self.max {
            self.max = batch_max;
        }
        if self.width == 0.0 {
            if self.max > 0.0 {
                self.width = f64::from(self.max) / Self::BINS as f64;
                self.counts = vec![0.0; Self::BINS];
                self.counts[0] += std::mem::take(&mut self.zeros);
            } else {
                return (0.0, 1);
            }
        }
        let needed = (f64::from(self.max) / self.width).ceil() as usize;
        if needed > self.counts.len() {
            self.counts.resize(needed, 0.0);
        }
        (self.width, self.counts.len())
    }

    /// Add counts binned with the last [`AbsHistogram::grow`]'s binning (computed elsewhere, e.g.
    /// on a GPU).
    pub fn add_counts(&mut self, counts: &[f64]) -> Result<()> {
        if self.width == 0.0 {
            self.zeros += counts.iter().sum::<f64>();
            return Ok(());
        }
        if counts.len() != self.counts.len() {
            return Err(Error::Shape(format!(
                "{} histogram counts for {} bins",
                counts.len(),
                self.counts.len()
            )));
        }
        for (c, n) in self.counts.iter_mut().zip(counts) {
            *c += n;
        }
        Ok(())
    }

    /// Count `values` (their absolute values).
    pub fn add(&mut self, values: &[f32]) {
        let batch_max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (width, bins) = self.grow(batch_max);
        if width == 0.0 {
            self.zeros += values.len() as f64;
            return;
        }
        for v in values {
            let b = ((f64::from(v.abs()) / width) as usize).min(bins - 1);
            self.counts[b] += 1.0;
        }
    }

    /// The range `method` chooses (0 when nothing but zeros was seen).
    pub fn amax(&self, method: CalibrationMethod) -> f32 {
        if self.width == 0.0 || self.counts.is_empty() {
            return self.max;
        }
        let edge = |i: usize| (i as f64 * self.width) as f32;
        match method {
            CalibrationMethod::Max => self.max,
            CalibrationMethod::Percentile(p) => {
                let total = self.total();
                let mut cdf = 0.0;
                for (i, c) in self.counts.iter().enumerate() {
                    cdf += c;
                    if cdf / total >= p / 100.0 {
                        return edge(i + 1).min(self.max);
                    }
                }
                self.max
            }
            CalibrationMethod::Mse => {
                let bins = self.counts.len();
                let total = self.total();
                let mut best = (f64::INFINITY, self.max);
                for i in Self::START_BIN.min(bins - 1)..bins {
                    // Candidate amax at the centre of bin i; every bin's centre stands for its
                    // values, quantized with 127 steps up to amax and clipped above it.
                    let amax = (i as f64 + 0.5) * self.width;
                    let step = amax / 127.0;
                    let mut err = 0.0;
                    for (j, c) in self.counts.iter().enumerate().filter(|(_, c)| **c > 0.0) {
                        let x = (j as f64 + 0.5) * self.width;
                        let q = (x / step).round().min(127.0) * step;
                        err += c * (q - x) * (q - x);
                    }
                    let err = err / total;
                    if err < best.0 {
                        best = (err, amax as f32);
                    }
                }
                best.1
            }
            CalibrationMethod::Entropy => self.entropy_amax(),
        }
    }

    /// TensorRT's entropy calibration on the histogram: for each candidate cut i, the reference P
    /// is the first i bins with everything above folded into the last; Q is those bins merged
    /// into 128 levels and spread back over their non-empty bins; the cut with the least KL(P‖Q)
    /// wins (the largest one on ties), and its right edge is the amax.
    fn entropy_amax(&self) -> f32 {
        const LEVELS: usize = 128;
        let bins = &self.counts;
        let n = bins.len();
        let above: Vec<f64> = {
            let mut acc = vec![0.0; n + 1];
            for i in (0..n).rev() {
                acc[i] = acc[i + 1] + bins[i];
            }
            acc
        };
        let mut best = (f64::INFINITY, n);
        let mut level_sum = [0.0f64; LEVELS];
        let mut level_nonzero = [0usize; LEVELS];
        for i in Self::START_BIN.min(n)..=n {
            if i == 0 {
                continue;
            }
            level_sum.fill(0.0);
            level_nonzero.fill(0);
            let level = |j: usize| ((j * LEVELS) / i).min(LEVELS - 1);
            for (j, &c) in bins[..i].iter().enumerate() {
                if c > 0.0 {
                    level_sum[level(j)] += c;
                    level_nonzero[level(j)] += 1;
                }
            }
            let p_total: f64 = above[0];
            let q_total: f64 = level_sum.iter().sum();
            if p_total <= 0.0 || q_total <= 0.0 {
                continue;
            }
            let mut kl = 0.0;
            for j in 0..i {
                let mut p = bins[j];
                if j == i - 1 {
                    p += above[i];
                }
                if p <= 0.0 {
                    continue;
                }
                let q = if bins[j] > 0.0 {
                    level_sum[level(j)] / level_nonzero[level(j)] as f64
                } else {
                    0.0
                };
                if q <= 0.0 {
                    kl = f64::INFINITY;
                    break;
                }
                let (p, q) = (p / p_total, q / q_total);
                kl += p * (p / q).ln();
            }
            if kl <= best.0 {
                best = (kl, i);
            }
        }
        ((best.1 as f64 * self.width) as f32).min(self.max)
    }
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
    fn histograms_grow_at_a_fixed_bin_width() {
        let mut h = AbsHistogram::new();
        h.add(&[0.0, 0.0]);
        assert_eq!((h.total(), h.max()), (2.0, 0.0));
        h.add(&[1.0, -0.5]);
        assert_eq!(h.counts.len(), AbsHistogram::BINS);
        // The zeros joined bin 0; 1.0 is the top bin.
        assert_eq!(h.counts[0], 2.0);
        assert_eq!(h.counts[AbsHistogram::BINS - 1], 1.0);
        assert_eq!(h.counts[AbsHistogram::BINS / 2], 1.0);
        h.add(&[3.0]);
        assert_eq!(h.counts.len(), 3 * AbsHistogram::BINS);
        assert_eq!(h.counts[3 * AbsHistogram::BINS - 1], 1.0);
        assert_eq!((h.total(), h.max()), (5.0, 3.0));
        assert!(h.add_counts(&[1.0]).is_err());
    }

    #[test]
    fn histogram_methods_clip_outliers_and_max_keeps_them() {
        // 100 000 values spread over [0, 1] and one outlier at 50.
        let mut values: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        values.push(50.0);
        let mut h = AbsHistogram::new();
        h.add(&values);
        assert_eq!(h.amax(CalibrationMethod::Max), 50.0);
        let p = h.amax(CalibrationMethod::Percentile(99.9));
        assert!((0.99..1.05).contains(&p), "percentile 99.9: {p}");
        assert_eq!(h.amax(CalibrationMethod::Percentile(100.0)), 50.0);
        // MSE weighs an outlier's clipping error squared, so one at 50 would pull its amax far
        // out; one at 2 (clipping error 1 for one value in 100 001) is cheaper to clip.
        let mut values = values;
        values.pop();
        values.push(2.0);
        let mut h = AbsHistogram::new();
        h.add(&values);
        let mse = h.amax(CalibrationMethod::Mse);
        assert!((0.95..1.5).contains(&mse), "mse: {mse}");
        let entropy = h.amax(CalibrationMethod::Entropy);
        assert!((0.95..1.5).contains(&entropy), "entropy: {entropy}");
        // Only zeros: every method says 0 (the exporter floors it to a positive scale).
        let mut z = AbsHistogram::new();
        z.add(&[0.0; 10]);
        for m in [
            CalibrationMethod::Max,
            CalibrationMethod::Mse,
            CalibrationMethod::Entropy,
            CalibrationMethod::Percentile(99.99),
        ] {
            assert_eq!(z.amax(m), 0.0, "{m:?}");
        }
    }

    #[test]
    fn calibration_methods_parse_with_clear_errors() {
        assert_eq!(
            CalibrationMethod::parse("histogram", "percentile", 99.99).expect("p"),
            CalibrationMethod::Percentile(99.99)
        );
        assert_eq!(
            CalibrationMethod::parse("max", "mse", 0.0).expect("max"),
            CalibrationMethod::Max
        );
        for (c, m, p, want) in [
            ("minmax", "mse", 0.0, "calibrator 'minmax'"),
            ("histogram", "kl", 0.0, "method 'kl'"),
            ("histogram", "percentile", 120.0, "percentile 120"),
        ] {
            let err = CalibrationMethod::parse(c, m, p).expect_err(c).to_string();
            assert!(err.contains(want), "{err}");
        }
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
        assert!(c.ranges(CalibrationMethod::Mse).is_err());
        // With histograms: the 97th percentile of "images" (96 values: 93 at most 0.2, then 0.4,
        // 0.7 and 0.9) stops at the bin of 0.4; max keeps 0.9.
        let mut c =
            Calibrator::with_method(&bytes, path, &tensors, CalibrationMethod::Percentile(97.0))
                .expect("calibrator");
        c.add_input(&a).expect("image a");
        c.add_input(&b).expect("image b");
        let r = c
            .ranges(CalibrationMethod::Percentile(97.0))
            .expect("ranges");
        assert!(r["images"] < 0.7 && r["images"] >= 0.4, "{r:?}");
        assert_eq!(
            c.ranges(CalibrationMethod::Max).expect("max")["images"],
            0.9
        );
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
