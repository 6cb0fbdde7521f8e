//! Evaluation of a network under training with YOLOv9's validation settings, through the
//! runtime's own letterbox, post-processing (decode, multi-label NMS) and COCO evaluator: the
//! same path `kestrel val` takes for the exported ONNX, so the two agree.

use kestrel_runtime::Detection;
use kestrel_runtime::eval::{EvalSummary, Evaluator};
use kestrel_runtime::letterbox::Letterboxer;
use kestrel_runtime::masks::{Bitmap, MaskDecoder, PrototypeShape, Rle, coefficients_at};
use kestrel_runtime::nms::{NmsConfig, Postprocessor};
use kestrel_runtime::segments::{Segmentation, paint_order_masks};
use tch::{Device, Tensor};

use kestrel_exporter::ModelConfig;

use crate::data::Source;
use crate::error::{Error, Result};
use crate::model::Gelan;

/// A detector network evaluation can run: its configuration and `output0` for a batch.
pub trait Network {
    /// The model (classes, input size, anchors).
    fn config(&self) -> &ModelConfig;
    /// `output0` `[B, 4 + nc (+ 32), anchors]` of images `[B, 3, H, W]` in [0, 1], without
    /// gradients.
    fn infer(&self, images: &Tensor) -> Result<Tensor>;
    /// `output0` and, for segmentation models, `output1` (`[B, 32, H/4, W/4]` prototypes).
    fn infer_outputs(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.infer(images)?, None))
    }
}

impl Network for Gelan {
    fn config(&self) -> &ModelConfig {
        Gelan::config(self)
    }

    fn infer(&self, images: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.forward_t(images, false))
    }

    fn infer_outputs(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let out = tch::no_grad(|| self.forward_outputs_t(images, false, false))?;
        Ok((out.head, out.prototypes))
    }
}

/// Box metrics and, for a segmentation model on data with masks, mask metrics.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub boxes: EvalSummary,
    pub masks: Option<EvalSummary>,
}

/// Detections of `model` (evaluation mode) on `images`, boxes in each image's pixels: the
/// runtime's letterbox and post-processing around the tch forward pass.
pub struct TchDetector {
    letterbox: Letterboxer,
    post: Postprocessor,
    pixels: Vec<f32>,
    decoder: MaskDecoder,
    coefficients: Vec<f32>,
    boxes: Vec<kestrel_runtime::BoxXyxy>,
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
            decoder: MaskDecoder::new(),
            coefficients: Vec::new(),
            boxes: Vec::new(),
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
        self.detect_masks(model, images, device, nms, out, None)
    }

    /// [`TchDetector::detect`], and with `masks` (a segmentation model) `masks[i][k]` is the
    /// mask of `out[i][k]` at image i's resolution, decoded by the runtime's CPU decoder.
    pub fn detect_masks(
        &mut self,
        model: &dyn Network,
        images: &[&image::RgbImage],
        device: Device,
        nms: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        mut masks: Option<&mut Vec<Vec<Bitmap>>>,
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
        let (y, prototypes) = if masks.is_some() {
            model.infer_outputs(&batch)?
        } else {
            (model.infer(&batch)?, None)
        };
        let channels = y.size().get(1).copied().unwrap_or(0) as usize;
        let y = Vec::<f32>::try_from(y.to_device(Device::Cpu).flatten(0, -1))?;
        let per = channels * anchors;
        if y.len() != images.len() * per || channels < 4 + nc {
            return Err(Error::Shape(format!(
                "the network returned {} values for {} images of {anchors} anchors and {nc} \
                 classes",
                y.len(),
                images.len()
            )));
        }
        let prototypes = match (&masks, prototypes) {
            (Some(_), Some(p)) => {
                let size = p.size();
                let shape = PrototypeShape {
                    width: size.get(3).copied().unwrap_or(0) as usize,
                    height: size.get(2).copied().unwrap_or(0) as usize,
                };
                Some((
                    Vec::<f32>::try_from(p.to_device(Device::Cpu).flatten(0, -1))?,
                    shape,
                ))
            }
            (Some(_), None) => {
                return Err(Error::Shape(
                    "masks asked of a network without mask prototypes (not a segmentation model)"
                        .into(),
                ));
            }
            (None, _) => None,
        };
        out.resize_with(images.len(), Vec::new);
        if let Some(m) = masks.as_deref_mut() {
            m.resize_with(images.len(), Vec::new);
        }
        for (k, p) in placed.iter().enumerate() {
            out[k].clear();
            let head = &y[k * per..(k + 1) * per];
            self.post
                .run(head, nc, anchors, p, nms, &mut out[k])
                .map_err(Error::Runtime)?;
            if let (Some(m), Some((protos, shape))) = (masks.as_deref_mut(), &prototypes) {
                self.coefficients.clear();
                self.boxes.clear();
                for d in &out[k] {
                    coefficients_at(head, channels, anchors, d.anchor, &mut self.coefficients)
                        .map_err(Error::Runtime)?;
                    self.boxes.push(d.bbox);
                }
                let plane = shape.len();
                let Some(image_protos) = protos.get(k * plane..(k + 1) * plane) else {
                    return Err(Error::Shape(format!(
                        "{} prototype values for {} images",
                        protos.len(),
                        images.len()
                    )));
                };
                self.decoder
                    .decode(
                        image_protos,
                        *shape,
                        p,
                        &self.boxes,
                        &self.coefficients,
                        &mut m[k],
                    )
                    .map_err(Error::Runtime)?;
            }
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
    progress: impl FnMut(usize),
) -> Result<EvalSummary> {
    Ok(evaluate_masks(model, source, batch, device, nms, false, progress)?.boxes)
}

/// The ground-truth masks of an image (`None` unless every object has an outline), at its
/// `width` × `height` pixels, by the source's overlap rule.
pub fn ground_truth_masks(
    source: &Source,
    segments: &[Option<Segmentation>],
    width: usize,
    height: usize,
) -> Result<Option<Vec<Rle>>> {
    let Some(segments) = segments
        .iter()
        .map(Option::as_ref)
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let masks = if source.paint_order() {
        paint_order_masks(&segments, width, height)
    } else {
        segments.iter().map(|s| s.to_rle(width, height)).collect()
    };
    masks.map(Some).map_err(Error::Runtime)
}

/// [`evaluate`], and with `masks` (a segmentation model) mask AP too, on the images whose
/// objects all have outlines (none: no mask metrics).
pub fn evaluate_masks(
    model: &dyn Network,
    source: &Source,
    batch: usize,
    device: Device,
    nms: &NmsConfig,
    masks: bool,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation> {
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
    let mut mask_evaluator = Evaluator::new(cfg.num_classes);
    let mut masked_images = 0usize;
    let mut detector = TchDetector::new();
    let mut results = Vec::new();
    let mut det_masks: Vec<Vec<Bitmap>> = Vec::new();
    let indices: Vec<usize> = (0..source.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        // Decoding (or rendering) images is the slow part on a GPU: one thread per image.
        let samples = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| scope.spawn(move || source.load_with_segments(i)))
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
        let images: Vec<&image::RgbImage> = samples.iter().map(|(img, _, _)| img).collect();
        let want = masks.then_some(&mut det_masks);
        detector.detect_masks(model, &images, device, nms, &mut results, want)?;
        for (k, ((img, gts, segments), dets)) in samples.iter().zip(&results).enumerate() {
            evaluator.add_image(gts, dets).map_err(Error::Runtime)?;
            if !masks {
                continue;
            }
            let (w, h) = (img.width() as usize, img.height() as usize);
            let Some(gt_masks) = ground_truth_masks(source, segments, w, h)? else {
                continue;
            };
            // The area ranges read each object's mask area, as pycocotools' segm does.
            let gts: Vec<_> = gts
                .iter()
                .zip(&gt_masks)
                .map(|(g, m)| kestrel_runtime::GroundTruth {
                    area: m.area() as f32,
                    ..*g
                })
                .collect();
            let dm: Vec<Rle> = det_masks[k].iter().map(Rle::encode).collect();
            mask_evaluator
                .add_image_masks(&gts, &gt_masks, dets, &dm)
                .map_err(Error::Runtime)?;
            masked_images += 1;
        }
        progress(chunk.len());
    }
    Ok(Evaluation {
        boxes: evaluator.summarize(),
        masks: (masked_images > 0).then(|| mask_evaluator.summarize()),
    })
}
