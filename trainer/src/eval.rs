//! Evaluation of a network under training with YOLOv9's validation settings, through the
//! runtime's own letterbox, post-processing (decode, multi-label NMS) and COCO evaluator: the
//! same path `kestrel val` takes for the exported ONNX, so the two agree.

use kestrel_runtime::Detection;
use kestrel_runtime::eval::{EvalSummary, Evaluator};
use kestrel_runtime::letterbox::Letterboxer;
use kestrel_runtime::nms::{NmsConfig, Postprocessor};
use tch::{Device, Tensor};

use kestrel_exporter::ModelConfig;

use crate::data::Source;
use crate::error::{Error, Result};
use crate::model::Gelan;

/// A detector network evaluation can run: its configuration and `output0` for a batch.
pub trait Network {
    /// The model (classes, input size, anchors).
    fn config(&self) -> &ModelConfig;
    /// `output0` `[B, 4 + nc, anchors]` of images `[B, 3, H, W]` in [0, 1], without gradients.
    fn infer(&self, images: &Tensor) -> Result<Tensor>;
}

impl Network for Gelan {
    fn config(&self) -> &ModelConfig {
        Gelan::config(self)
    }

    fn infer(&self, images: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.forward_t(images, false))
    }
}

/// Detections of `model` (evaluation mode) on `images`, boxes in each image's pixels: the
/// runtime's letterbox and post-processing around the tch forward pass.
pub struct TchDetector {
    letterbox: Letterboxer,
    post: Postprocessor,
    pixels: Vec<f32>,
}

impl Default for TchDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl TchDetector {
    pub fn new() -> Self {
        Self {
            letterbox: Letterboxer::new(),
            post: Postprocessor::new(),
            pixels: Vec::new(),
        }
    }

    /// `out[i]` receives the detections of `images[i]`.
    pub fn detect(
        &mut self,
        model: &dyn Network,
        images: &[&image::RgbImage],
        device: Device,
        nms: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        let cfg = model.config();
        let [h, w] = cfg.imgsz;
        let (nc, anchors) = (cfg.num_classes, cfg.num_anchors());
        let plane = 3 * h * w;
        self.pixels.resize(images.len() * plane, 0.0);
        let mut placed = Vec::with_capacity(images.len());
        for (k, img) in images.iter().enumerate() {
            let p = self
                .letterbox
                .run(
                    img,
                    w as u32,
                    h as u32,
                    &mut self.pixels[k * plane..(k + 1) * plane],
                )
                .map_err(Error::Runtime)?;
            placed.push(p);
        }
        let batch = Tensor::from_slice(&self.pixels)
            .view([images.len() as i64, 3, h as i64, w as i64])
            .to_device(device);
        let y = model.infer(&batch)?;
        let y = Vec::<f32>::try_from(y.to_device(Device::Cpu).flatten(0, -1))?;
        let per = (4 + nc) * anchors;
        out.resize_with(images.len(), Vec::new);
        for (k, p) in placed.iter().enumerate() {
            out[k].clear();
            self.post
                .run(&y[k * per..(k + 1) * per], nc, anchors, p, nms, &mut out[k])
                .map_err(Error::Runtime)?;
        }
        Ok(())
    }
}

/// mAP and friends of `model` (evaluation mode) on every image of `source`, `batch` at a time.
pub fn evaluate(
    model: &dyn Network,
    source: &Source,
    batch: usize,
    device: Device,
    nms: &NmsConfig,
    mut progress: impl FnMut(usize),
) -> Result<EvalSummary> {
    nms.validate().map_err(Error::Runtime)?;
    let cfg = model.config();
    if source.num_classes() != cfg.num_classes {
        return Err(Error::Data(format!(
            "the model has {} classes, the data {}",
            cfg.num_classes,
            source.num_classes()
        )));
    }
    let mut evaluator = Evaluator::new(cfg.num_classes);
    let mut detector = TchDetector::new();
    let mut results = Vec::new();
    let indices: Vec<usize> = (0..source.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        // Decoding (or rendering) images is the slow part on a GPU: one thread per image.
        let samples = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| scope.spawn(move || source.load(i)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Data("an image loader thread panicked".into()))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let images: Vec<&image::RgbImage> = samples.iter().map(|(img, _)| img).collect();
        detector.detect(model, &images, device, nms, &mut results)?;
        for ((_, gts), dets) in samples.iter().zip(&results) {
            evaluator.add_image(gts, dets).map_err(Error::Runtime)?;
        }
        progress(chunk.len());
    }
    Ok(evaluator.summarize())
}
