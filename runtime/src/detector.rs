//! A detector: an engine with its pre- and post-processing, from RGB images to detections in
//! the images' own pixels. Front ends (CLI, service, GStreamer) use this rather than engines.

use image::RgbImage;

use crate::detection::{BoxXyxy, Detection};
use crate::engine::{Engine, EngineInfo, StageTimes};
use crate::error::{Error, Result};
use crate::frame::{Frame, PixelFormat, YuvMatrix};
use crate::letterbox::{LetterboxParams, Letterboxer};
use crate::masks::{Bitmap, MaskDecoder, coefficients_at};
use crate::nms::{NmsConfig, Postprocessor};

/// Engine + letterbox + NMS with buffers reused across batches.
pub struct Detector {
    engine: Box<dyn Engine>,
    letterboxer: Letterboxer,
    postprocessor: Postprocessor,
    input: Vec<f32>,
    placements: Vec<LetterboxParams>,
    /// Letterbox, decode and NMS on the engine's device (the end-to-end path), not on the CPU.
    device_postprocessing: bool,
    /// RGB copies of raw frames for the CPU path of [`Detector::detect_frames`].
    rgb: Vec<RgbImage>,
    /// Batches of [`Detector::start_frames`] the engine has in flight.
    engine_in_flight: usize,
    /// Batches of [`Detector::start_frames`] detected here, waiting for `finish_frames`, and
    /// their spent buffers for reuse.
    pending: std::collections::VecDeque<Vec<Vec<Detection>>>,
    spare: Vec<Vec<Vec<Detection>>>,
    /// Mask decoding of segmentation models ([`Detector::detect_masks`]).
    mask_decoder: MaskDecoder,
    coefficients: Vec<f32>,
    boxes: Vec<BoxXyxy>,
    /// End-to-end segmentation models: the kept detections' mask probabilities.
    probabilities: Vec<f32>,
}

impl Detector {
    pub fn new(engine: Box<dyn Engine>) -> Self {
        Self {
            engine,
            letterboxer: Letterboxer::new(),
            postprocessor: Postprocessor::new(),
            input: Vec::new(),
            placements: Vec::new(),
            device_postprocessing: false,
            rgb: Vec::new(),
            engine_in_flight: 0,
            pending: std::collections::VecDeque::new(),
            spare: Vec::new(),
            mask_decoder: MaskDecoder::new(),
            coefficients: Vec::new(),
            boxes: Vec::new(),
            probabilities: Vec::new(),
        }
    }

    /// Letterbox, decode and NMS on the engine's device (`true`, the end-to-end path of GPU
    /// backends) or on the CPU (`false`, the default). Both give the same detections for the same
    /// engine output.
    pub fn set_device_postprocessing(&mut self, on: bool) {
        self.device_postprocessing = on;
    }

    pub fn info(&self) -> &EngineInfo {
        self.engine.info()
    }

    /// Where the last [`Detector::detect_frames`] that ran on the GPU spent its time.
    pub fn last_stage_times(&self) -> Option<StageTimes> {
        self.engine.last_stage_times()
    }

    /// Detect objects in raw frames (RGB, BGR, RGBA, BGRx, NV12 or I420, any pitch). With device
    /// post-processing on and a GPU engine, letterbox, inference and NMS all run on the GPU from
    /// the frames' own bytes; otherwise the frames are converted to RGB here and go through
    /// [`Detector::detect`]. Both give the same detections for the same engine.
    pub fn detect_frames(
        &mut self,
        frames: &[Frame],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        cfg.validate()?;
        if frames.is_empty() {
            out.clear();
            return Ok(());
        }
        if self.device_postprocessing
            && self
                .engine
                .detect_frames(frames, cfg, &mut self.placements, out)?
        {
            return Ok(());
        }
        if self.rgb.len() < frames.len() {
            self.rgb.resize_with(frames.len(), || RgbImage::new(1, 1));
        }
        for (f, img) in frames.iter().zip(self.rgb.iter_mut()) {
            f.to_rgb(img)?;
        }
        let rgb = std::mem::take(&mut self.rgb);
        let result = self.detect(&rgb[..frames.len()], cfg, out);
        self.rgb = rgb;
        result
    }

    /// [`Detector::detect_frames`] as a pipeline: start detecting `frames` and return; the
    /// detections come from [`Detector::finish_frames`], oldest batch first, with up to two
    /// batches in flight. On a GPU engine with device post-processing the next batch's upload,
    /// letterbox and inference overlap the previous batch's post-processing and the caller's
    /// work; elsewhere the detection runs here and its result waits for `finish_frames`. The
    /// frames may be dropped or reused when this returns.
    pub fn start_frames(&mut self, frames: &[Frame], cfg: &NmsConfig) -> Result<()> {
        cfg.validate()?;
        if self.pending.len() + self.engine_in_flight >= 2 {
            return Err(Error::InvalidArgument(
                "two batches are already in flight: finish_frames the oldest before starting \
                 another"
                    .into(),
            ));
        }
        if !frames.is_empty()
            && self.device_postprocessing
            && self.pending.is_empty()
            && self.engine.start_frames(frames, cfg)?
        {
            self.engine_in_flight += 1;
            return Ok(());
        }
        let mut out = self.spare.pop().unwrap_or_default();
        self.detect_frames(frames, cfg, &mut out)?;
        self.pending.push_back(out);
        Ok(())
    }

    /// Detections of the oldest batch given to [`Detector::start_frames`] (one `Vec` per frame);
    /// `Ok(false)` when none is in flight.
    pub fn finish_frames(&mut self, out: &mut Vec<Vec<Detection>>) -> Result<bool> {
        if self.engine_in_flight > 0 {
            self.engine_in_flight -= 1;
            return self.engine.finish_frames(&mut self.placements, out);
        }
        match self.pending.pop_front() {
            Some(mut ready) => {
                std::mem::swap(out, &mut ready);
                self.spare.push(ready);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Letterbox `images` into the input buffer, padding small batches up to the profile's
    /// minimum with the last image (their results are dropped); returns the batch to run.
    fn letterbox_batch<I: std::borrow::Borrow<RgbImage>>(&mut self, images: &[I]) -> Result<usize> {
        let info = self.engine.info();
        let (profile, per_image, [h, w]) = (info.profile, info.input_len(), info.input_hw);
        let n = images.len();
        let batch = n.max(profile.min);
        self.input.resize(batch * per_image, 0.0);
        self.placements.clear();
        for i in 0..batch {
            let img = images[i.min(n - 1)].borrow();
            let dst = &mut self.input[i * per_image..(i + 1) * per_image];
            let p = self.letterboxer.run(img, w as u32, h as u32, dst)?;
            self.placements.push(p);
        }
        Ok(batch)
    }

    /// Detect objects and their instance masks (segmentation models): as [`Detector::detect`],
    /// and `masks[i][k]` is the mask of `out[i][k]` at image i's resolution. With device
    /// post-processing on a GPU engine, NMS and mask decoding run there (masks come back as
    /// bitmaps); otherwise on the CPU.
    pub fn detect_masks<I: std::borrow::Borrow<RgbImage>>(
        &mut self,
        images: &[I],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        masks: &mut Vec<Vec<Bitmap>>,
    ) -> Result<()> {
        cfg.validate()?;
        if self.engine.info().end_to_end.is_some() {
            check_batch(images.len(), self.engine.info().profile.max)?;
            return self.detect_end_to_end(images, cfg, out, Some(masks));
        }
        let info = self.engine.info();
        let Some(shape) = info.prototypes else {
            return Err(Error::InvalidArgument(format!(
                "model {} detects boxes only (it has no mask prototypes); masks need a \
                 segmentation model such as gelan-c-seg",
                info.model_name
            )));
        };
        let (profile, per_out, channels) = (info.profile, info.output_len(), info.output_channels);
        let (num_classes, anchors, backend) = (info.num_classes, info.anchors, info.backend);
        let n = images.len();
        out.clear();
        masks.clear();
        if n == 0 {
            return Ok(());
        }
        check_batch(n, profile.max)?;
        let batch = self.letterbox_batch(images)?;
        if self.device_postprocessing
            && self.engine.run_and_detect_masks(
                &self.input,
                batch,
                &self.placements,
                cfg,
                out,
                masks,
            )?
        {
            out.truncate(n);
            masks.truncate(n);
            return Ok(());
        }
        let (output, prototypes) = self.engine.run_with_prototypes(&self.input, batch)?;
        let prototypes = prototypes.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the {backend} backend does not return mask prototypes; use --backend cpu"
            ))
        })?;
        out.resize_with(n, Vec::new);
        masks.resize_with(n, Vec::new);
        for i in 0..n {
            let head = &output[i * per_out..(i + 1) * per_out];
            let dets = &mut out[i];
            self.postprocessor
                .run(head, num_classes, anchors, &self.placements[i], cfg, dets)?;
            self.coefficients.clear();
            self.boxes.clear();
            for d in dets.iter() {
                coefficients_at(head, channels, anchors, d.anchor, &mut self.coefficients)?;
                self.boxes.push(d.bbox);
            }
            self.mask_decoder.decode(
                &prototypes[i * shape.len()..(i + 1) * shape.len()],
                shape,
                &self.placements[i],
                &self.boxes,
                &self.coefficients,
                &mut masks[i],
            )?;
        }
        Ok(())
    }

    /// Detect objects in a batch of images (at most the engine's maximum batch). `out[i]` receives
    /// the detections of `images[i]`, boxes in that image's pixels, best first. `images` holds
    /// references or the images themselves (a reused batch of frames needs no slice of references).
    pub fn detect<I: std::borrow::Borrow<RgbImage>>(
        &mut self,
        images: &[I],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        cfg.validate()?;
        // Scalars only: cloning the info (class names) would allocate on every batch.
        let info = self.engine.info();
        let (profile, per_out) = (info.profile, info.output_len());
        let (num_classes, anchors) = (info.num_classes, info.anchors);
        let n = images.len();
        if n == 0 {
            out.clear();
            return Ok(());
        }
        check_batch(n, profile.max)?;
        if self.engine.info().end_to_end.is_some() {
            return self.detect_end_to_end(images, cfg, out, None);
        }
        if self.device_postprocessing {
            // The whole detection on the device, letterbox included, from the RGB bytes.
            let frames: Vec<Frame> = images
                .iter()
                .map(|img| {
                    let img = img.borrow();
                    Frame {
                        format: PixelFormat::Rgb,
                        width: img.width() as usize,
                        height: img.height() as usize,
                        planes: [img.as_raw(), &[], &[]],
                        strides: [img.width() as usize * 3, 0, 0],
                        yuv: YuvMatrix::BT601,
                    }
                })
                .collect();
            if self
                .engine
                .detect_frames(&frames, cfg, &mut self.placements, out)?
            {
                return Ok(());
            }
        }
        let batch = self.letterbox_batch(images)?;
        if self.device_postprocessing {
            if !self
                .engine
                .run_and_detect(&self.input, batch, &self.placements, cfg, out)?
            {
                return Err(Error::InvalidArgument(format!(
                    "the {} backend has no device post-processing (end-to-end); run without it",
                    self.engine.info().backend
                )));
            }
            // Padding images' results are dropped.
            out.truncate(n);
            return Ok(());
        }
        let output = self.engine.run(&self.input, batch)?;
        out.resize_with(n, Vec::new);
        for (i, dets) in out.iter_mut().enumerate() {
            dets.clear();
            self.postprocessor.run(
                &output[i * per_out..(i + 1) * per_out],
                num_classes,
                anchors,
                &self.placements[i],
                cfg,
                dets,
            )?;
        }
        Ok(())
    }
}

impl Detector {
    /// The path of end-to-end models (NMS inside the graph): their rows mapped to each image's
    /// pixels. `cfg` still applies where it is stricter than the graph's own settings: its score
    /// threshold, class filter and detection limit. With `masks`, each detection's mask from the
    /// model's `det_masks` (an error for a detector).
    fn detect_end_to_end<I: std::borrow::Borrow<RgbImage>>(
        &mut self,
        images: &[I],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        mut masks: Option<&mut Vec<Vec<Bitmap>>>,
    ) -> Result<()> {
        let n = images.len();
        out.clear();
        if let Some(m) = masks.as_deref_mut() {
            m.clear();
        }
        if n == 0 {
            return Ok(());
        }
        let (k, shape) = match &self.engine.info().end_to_end {
            Some(e) => (e.max_detections, e.masks),
            None => return Err(Error::InvalidArgument("not an end-to-end model".into())),
        };
        if masks.is_some() && shape.is_none() {
            return Err(Error::InvalidArgument(format!(
                "model {} detects boxes only (it has no det_masks); masks need a segmentation \
                 model such as gelan-c-seg",
                self.engine.info().model_name
            )));
        }
        let batch = self.letterbox_batch(images)?;
        let r = self.engine.run_end_to_end(&self.input, batch)?;
        let cells = shape.map_or(0, |s| s.width * s.height);
        out.resize_with(n, Vec::new);
        for (i, dets) in out.iter_mut().enumerate() {
            let placement = &self.placements[i];
            let (w, h) = (placement.src_w as f32, placement.src_h as f32);
            let count = usize::try_from(r.num_dets[i]).unwrap_or(0).min(k);
            self.boxes.clear();
            self.probabilities.clear();
            for j in 0..count {
                let row = i * k + j;
                let (score, class) = (r.scores[row], r.classes[row]);
                let Ok(class_id) = usize::try_from(class) else {
                    continue;
                };
                if score <= cfg.conf_threshold
                    || cfg.classes.as_ref().is_some_and(|c| !c.contains(&class_id))
                {
                    continue;
                }
                let b = &r.boxes[row * 4..row * 4 + 4];
                let bbox = placement
                    .to_source(BoxXyxy::new(b[0], b[1], b[2], b[3]))
                    .clip(w, h);
                dets.push(Detection {
                    bbox,
                    score,
                    class_id,
                    // The row of the model's output: end-to-end models have no anchors here.
                    anchor: j,
                });
                if let Some(all) = r.masks {
                    self.boxes.push(bbox);
                    self.probabilities
                        .extend_from_slice(&all[row * cells..(row + 1) * cells]);
                }
                if dets.len() == cfg.max_detections {
                    break;
                }
            }
            if let (Some(m), Some(shape)) = (masks.as_deref_mut(), shape) {
                m.resize_with(n, Vec::new);
                self.mask_decoder.decode_probabilities(
                    &self.probabilities,
                    shape,
                    placement,
                    &self.boxes,
                    &mut m[i],
                )?;
            }
        }
        Ok(())
    }
}

/// `n` images fit an engine whose largest batch is `max`.
fn check_batch(n: usize, max: usize) -> Result<()> {
    if n > max {
        return Err(Error::Shape(format!(
            "{n} images exceed the engine's maximum batch of {max}"
        )));
    }
    Ok(())
}
