//! Post-processing on the GPU: YOLOv9 `output0` decoding, the per-image candidate cap and
//! class-aware greedy NMS for a whole batch, with the thresholds of each call, computing exactly
//! what the CPU reference ([`crate::nms::Postprocessor`]) computes: the same kept set in the same
//! order, the same boxes to the bit. Kernels in `post.cu`, compiled by NVRTC.
//!
//! Pipeline per call, on one stream: decode every (anchor, class) candidate above the confidence
//! threshold into per-image 64-bit sort keys (score descending, then anchor and class), bitonic-sort
//! each image's keys, then one block per image runs greedy NMS over the sorted candidates (capped
//! at `max_candidates`) and writes the kept boxes mapped to source pixels. Only the candidate
//! counts (to size the sort) and the kept detections come back to the host.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};

use super::device::{
    self, Arg, DeviceBuffer, Event, Kernels, Stream, cuda_error, launch, launch_grid,
};
use crate::detection::{BoxXyxy, Detection};
use crate::error::{Error, Result};
use crate::letterbox::LetterboxParams;
use crate::nms::NmsConfig;

/// Source of the post-processing kernels.
pub const POST_KERNEL_SOURCE: &str = include_str!("post.cu");

/// Kernel entry points of `post.cu`.
pub const POST_KERNEL_NAMES: [&str; 4] = [
    "decode_candidates",
    "bitonic_step",
    "bitonic_tile",
    "nms_greedy",
];

/// Threads of an NMS block (`NMS_CHUNK` in `post.cu`).
const NMS_THREADS: u32 = 256;
/// Keys one `bitonic_tile` block sorts in shared memory (2 × `SORT_TILE` in `post.cu`): the
/// shortest sort, so every sort can finish its small distances in tiles.
const SORT_TILE_KEYS: usize = 2048;

/// Compile `post.cu` to PTX, without fused multiply-add (no GPU needed; CI checks the source
/// with this).
pub fn compile_post_kernels(arch: Option<&'static str>) -> Result<String> {
    device::compile_exact(POST_KERNEL_SOURCE, "kestrel_post.cu", arch)
}

/// Element type of a raw head in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadElement {
    F32,
    /// IEEE half (an FP16 engine's output).
    F16,
}

/// Kept detections of a batch on the device: `[batch, max_det]` arrays.
struct KeptBuffers {
    max_det: usize,
    input_boxes: DeviceBuffer,
    boxes: DeviceBuffer,
    scores: DeviceBuffer,
    classes: DeviceBuffer,
    anchors: DeviceBuffer,
    count: DeviceBuffer,
}

impl KeptBuffers {
    fn new(batch: usize, max_det: usize) -> Result<Self> {
        let n = batch * max_det;
        Ok(Self {
            max_det,
            input_boxes: DeviceBuffer::new(n * 16)?,
            boxes: DeviceBuffer::new(n * 16)?,
            scores: DeviceBuffer::new(n * 4)?,
            classes: DeviceBuffer::new(n * 4)?,
            anchors: DeviceBuffer::new(n * 4)?,
            count: DeviceBuffer::new(batch * 4)?,
        })
    }
}

/// Host copies of the kept detections, reused across calls.
#[derive(Default)]
struct KeptHost {
    boxes: Vec<f32>,
    scores: Vec<f32>,
    classes: Vec<i32>,
    anchors: Vec<i32>,
    count: Vec<i32>,
}

/// Decoding and NMS of a model's raw head (`[batch, 4 + classes (+ extra), anchors]` float32) on
/// the GPU. Buffers are sized at construction for `max_batch` images and reused: after the first
/// call with a given `max_detections`, a call allocates nothing on the device.
pub struct GpuPostprocessor {
    /// The loaded module the functions belong to (kept alive with them).
    _kernels: Kernels,
    functions: [dsys::CUfunction; 4],
    stream: Stream,
    max_batch: usize,
    channels: usize,
    num_classes: usize,
    anchors: usize,
    /// Upload area for outputs given from host memory ([`GpuPostprocessor::run`]).
    output: DeviceBuffer,
    /// Per image, `stride` sort keys (a power of two ≥ every image's candidate count).
    keys: DeviceBuffer,
    stride: usize,
    counts: DeviceBuffer,
    allowed: DeviceBuffer,
    letterbox: DeviceBuffer,
    kept: Option<KeptBuffers>,
    allowed_host: Vec<u8>,
    letterbox_host: Vec<f32>,
    counts_host: Vec<u32>,
    host: KeptHost,
    /// Input-pixel placements for [`GpuPostprocessor::run_device_input_boxes`].
    identity: Vec<LetterboxParams>,
    /// Last, so it is released after every buffer, the stream and the module are freed in it.
    ctx: Arc<CudaContext>,
}

// SAFETY: every handle is owned and used only through `&mut self` with the context bound first.
unsafe impl Send for GpuPostprocessor {}

impl GpuPostprocessor {
    /// Set up for batches of up to `max_batch` images of a head with `num_classes` classes,
    /// `channels` rows (4 + classes, plus mask coefficients for segmentation) and `anchors`
    /// columns, on GPU `ordinal`.
    pub fn new(
        ordinal: usize,
        max_batch: usize,
        num_classes: usize,
        channels: usize,
        anchors: usize,
    ) -> Result<Self> {
        if max_batch == 0 || num_classes == 0 || anchors == 0 {
            return Err(Error::InvalidArgument(format!(
                "GPU post-processing needs at least one image, class and anchor (got batch \
                 {max_batch}, {num_classes} classes, {anchors} anchors)"
            )));
        }
        if channels < 4 + num_classes {
            return Err(Error::Shape(format!(
                "the head has {channels} rows; {num_classes} classes need at least {}",
                4 + num_classes
            )));
        }
        let capacity = anchors * num_classes;
        if capacity >= u32::MAX as usize {
            return Err(Error::Shape(format!(
                "{anchors} anchors x {num_classes} classes exceed the 32-bit candidate index of \
                 the GPU post-processing; use the CPU post-processing"
            )));
        }
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let kernels = Kernels::load(&compile_post_kernels(Some(device::device_arch(&ctx)?))?)?;
        let functions = [
            kernels.function(POST_KERNEL_NAMES[0])?,
            kernels.function(POST_KERNEL_NAMES[1])?,
            kernels.function(POST_KERNEL_NAMES[2])?,
            kernels.function(POST_KERNEL_NAMES[3])?,
        ];
        let stride = capacity.next_power_of_two().max(SORT_TILE_KEYS);
        Ok(Self {
            output: DeviceBuffer::new(max_batch * channels * anchors * 4)?,
            keys: DeviceBuffer::new(max_batch * stride * 8)?,
            stride,
            counts: DeviceBuffer::new(max_batch * 4)?,
            allowed: DeviceBuffer::new(num_classes)?,
            letterbox: DeviceBuffer::new(max_batch * 6 * 4)?,
            kept: None,
            allowed_host: vec![1; num_classes],
            letterbox_host: vec![0.0; max_batch * 6],
            counts_host: vec![0; max_batch],
            host: KeptHost::default(),
            identity: Vec::new(),
            stream: Stream::new()?,
            ctx,
            _kernels: kernels,
            functions,
            max_batch,
            channels,
            num_classes,
            anchors,
        })
    }

    /// Detections of `batch` images whose raw head is in host memory (`output`: `[batch,
    /// channels, anchors]` row-major): [`GpuPostprocessor::upload`], then
    /// [`GpuPostprocessor::run_device`].
    pub fn run(
        &mut self,
        output: &[f32],
        batch: usize,
        letterboxes: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        let ptr = self.upload(output, batch)?;
        self.run_device(ptr, batch, letterboxes, cfg, out)
    }

    /// Copy a raw head of `batch` images from host memory into this post-processor's device
    /// buffer (ordered before its next run); returns the device address for
    /// [`GpuPostprocessor::run_device`].
    pub fn upload(&mut self, output: &[f32], batch: usize) -> Result<dsys::CUdeviceptr> {
        self.upload_elements(output, batch)
    }

    /// [`GpuPostprocessor::upload`] of an FP16 head (IEEE half bits), for
    /// [`GpuPostprocessor::run_device_as`] with [`HeadElement::F16`].
    pub fn upload_half(&mut self, output: &[u16], batch: usize) -> Result<dsys::CUdeviceptr> {
        self.upload_elements(output, batch)
    }

    fn upload_elements<T: Copy>(
        &mut self,
        output: &[T],
        batch: usize,
    ) -> Result<dsys::CUdeviceptr> {
        let need = batch * self.channels * self.anchors;
        if output.len() != need {
            return Err(Error::Shape(format!(
                "the output holds {} values; {batch} images of {} x {} need {need}",
                output.len(),
                self.channels,
                self.anchors
            )));
        }
        self.check_batch(batch)?;
        self.bind()?;
        // SAFETY: the upload area holds max_batch images and batch <= max_batch; the copy is
        // synchronous with respect to `output` (synchronised below), so it may be dropped after.
        unsafe { drv::memcpy_htod_async(self.output.ptr, output, self.stream.0) }
            .map_err(|e| cuda_error("uploading the head output", e))?;
        self.stream.synchronize()?;
        Ok(self.output.ptr)
    }

    /// Detections of `batch` images whose raw head is at `output` on this GPU (`[batch,
    /// channels, anchors]` float32, e.g. an engine's output buffer), one `Vec` per image in `out`,
    /// boxes in source pixels of each image's `letterboxes` entry, clipped to it.
    pub fn run_device(
        &mut self,
        output: dsys::CUdeviceptr,
        batch: usize,
        letterboxes: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        self.run_device_as(output, HeadElement::F32, batch, letterboxes, cfg, out)
    }

    /// [`GpuPostprocessor::run_device`] for a head of either element type (an FP16 engine's
    /// output read as it is, without a conversion pass).
    pub fn run_device_as(
        &mut self,
        output: dsys::CUdeviceptr,
        element: HeadElement,
        batch: usize,
        letterboxes: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        self.decode_and_nms(output, element, batch, letterboxes, cfg, out, false)
    }

    /// [`GpuPostprocessor::run_device`] with the kept boxes as the head gives them, in input
    /// pixels and not clipped: what an end-to-end graph's NMS returns
    /// ([`crate::end_to_end`]).
    pub fn run_device_input_boxes(
        &mut self,
        output: dsys::CUdeviceptr,
        batch: usize,
        input_hw: [usize; 2],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        // Placements are uploaded (the kernel maps every kept box) but their boxes not read.
        self.identity.clear();
        self.identity
            .resize(batch, crate::end_to_end::input_placement(input_hw));
        let identity = std::mem::take(&mut self.identity);
        let result =
            self.decode_and_nms(output, HeadElement::F32, batch, &identity, cfg, out, true);
        self.identity = identity;
        result
    }

    /// Decode + NMS; `input_boxes`: return the kept boxes in input pixels, unclipped, instead of
    /// mapped to source pixels and clipped.
    #[allow(clippy::too_many_arguments)]
    fn decode_and_nms(
        &mut self,
        output: dsys::CUdeviceptr,
        element: HeadElement,
        batch: usize,
        letterboxes: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        input_boxes: bool,
    ) -> Result<()> {
        let half = Arg::I32(i32::from(element == HeadElement::F16));
        self.check_batch(batch)?;
        cfg.validate()?;
        if letterboxes.len() != batch {
            return Err(Error::InvalidArgument(format!(
                "{} letterbox placements for {batch} images",
                letterboxes.len()
            )));
        }
        self.allowed_host.fill(u8::from(cfg.classes.is_none()));
        for &c in cfg.classes.iter().flatten() {
            let slot = self.allowed_host.get_mut(c).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "class filter {c}: the model has {} classes (0–{})",
                    self.num_classes,
                    self.num_classes - 1
                ))
            })?;
            *slot = 1;
        }
        for (b, l) in letterboxes.iter().enumerate() {
            self.letterbox_host[b * 6..b * 6 + 6].copy_from_slice(&[
                l.left as f32,
                l.top as f32,
                l.scale_x(),
                l.scale_y(),
                l.src_w as f32,
                l.src_h as f32,
            ]);
        }
        let max_det = cfg.max_detections.min(self.anchors * self.num_classes);
        if self.kept.as_ref().is_none_or(|k| k.max_det < max_det) {
            self.kept = Some(KeptBuffers::new(self.max_batch, max_det)?);
        }
        self.bind()?;
        let s = self.stream.0;
        // SAFETY: every buffer was allocated with at least the bytes written or read here (sizes
        // from max_batch, stride, classes); host slices outlive the copies because the stream is
        // synchronised below before they are touched again.
        unsafe {
            drv::memcpy_htod_async(self.allowed.ptr, &self.allowed_host[..], s)
                .map_err(|e| cuda_error("uploading the class filter", e))?;
            drv::memcpy_htod_async(self.letterbox.ptr, &self.letterbox_host[..batch * 6], s)
                .map_err(|e| cuda_error("uploading the letterbox placements", e))?;
            drv::memset_d8_async(self.counts.ptr, 0, batch * 4, s)
                .map_err(|e| cuda_error("clearing candidate counts", e))?;
            drv::memset_d8_async(self.keys.ptr, 0xff, batch * self.stride * 8, s)
                .map_err(|e| cuda_error("clearing candidate keys", e))?;
        }
        let [decode, step, tile, nms] = self.functions;
        launch(
            decode,
            s,
            batch * self.anchors,
            &[
                Arg::Ptr(output),
                half,
                Arg::I32(batch as i32),
                Arg::I32(self.channels as i32),
                Arg::I32(self.num_classes as i32),
                Arg::I32(self.anchors as i32),
                Arg::F32(cfg.conf_threshold),
                Arg::I32(i32::from(cfg.multi_label)),
                Arg::Ptr(self.allowed.ptr),
                Arg::Ptr(self.keys.ptr),
                Arg::I64(self.stride as i64),
                Arg::Ptr(self.counts.ptr),
            ],
        )?;
        // The sort's length follows the largest candidate count of the batch.
        // SAFETY: counts holds batch u32s; synchronised before reading.
        unsafe { drv::memcpy_dtoh_async(&mut self.counts_host[..batch], self.counts.ptr, s) }
            .map_err(|e| cuda_error("reading candidate counts", e))?;
        self.stream.synchronize()?;
        let most = self.counts_host[..batch].iter().copied().max().unwrap_or(0) as usize;
        let len = most
            .min(self.stride)
            .next_power_of_two()
            .max(SORT_TILE_KEYS);
        let mut k = 2;
        while k <= len {
            let mut j = k / 2;
            while j > 0 {
                let args = [
                    Arg::Ptr(self.keys.ptr),
                    Arg::I64(self.stride as i64),
                    Arg::I32(batch as i32),
                    Arg::I64(len as i64),
                    Arg::I64(j as i64),
                    Arg::I64(k as i64),
                ];
                if j <= SORT_TILE_KEYS / 2 {
                    // The remaining distances of this block size, in shared memory.
                    let tiles = (batch * len / SORT_TILE_KEYS).min(65_535) as u32;
                    launch_grid(tile, s, (tiles, 1, 1), 256, 0, &args)?;
                    break;
                }
                launch(step, s, batch * len / 2, &args)?;
                j /= 2;
            }
            k *= 2;
        }
        let kept = self
            .kept
            .as_ref()
            .ok_or_else(|| cuda_error("post-processing", "no kept-detection buffers"))?;
        let slots = kept.max_det;
        launch_grid(
            nms,
            s,
            (batch as u32, 1, 1),
            NMS_THREADS,
            0,
            &[
                Arg::Ptr(output),
                half,
                Arg::I32(self.channels as i32),
                Arg::I32(self.num_classes as i32),
                Arg::I32(self.anchors as i32),
                Arg::Ptr(self.keys.ptr),
                Arg::I64(self.stride as i64),
                Arg::Ptr(self.counts.ptr),
                Arg::I32(cfg.max_candidates.min(i32::MAX as usize) as i32),
                Arg::F32(cfg.iou_threshold),
                Arg::I32(i32::from(cfg.agnostic)),
                Arg::I32(max_det as i32),
                Arg::I32(slots as i32),
                Arg::Ptr(self.letterbox.ptr),
                Arg::Ptr(kept.input_boxes.ptr),
                Arg::Ptr(kept.boxes.ptr),
                Arg::Ptr(kept.scores.ptr),
                Arg::Ptr(kept.classes.ptr),
                Arg::Ptr(kept.anchors.ptr),
                Arg::Ptr(kept.count.ptr),
            ],
        )?;
        let n = batch * slots;
        let h = &mut self.host;
        h.boxes.resize(n * 4, 0.0);
        h.scores.resize(n, 0.0);
        h.classes.resize(n, 0);
        h.anchors.resize(n, 0);
        h.count.resize(batch, 0);
        // SAFETY: each device array holds at least max_batch * slots entries (count: max_batch);
        // the host vectors were sized above and are not touched until the stream is synchronised.
        unsafe {
            let boxes = if input_boxes {
                kept.input_boxes.ptr
            } else {
                kept.boxes.ptr
            };
            drv::memcpy_dtoh_async(&mut h.boxes[..], boxes, s)
                .and_then(|_| drv::memcpy_dtoh_async(&mut h.scores[..], kept.scores.ptr, s))
                .and_then(|_| drv::memcpy_dtoh_async(&mut h.classes[..], kept.classes.ptr, s))
                .and_then(|_| drv::memcpy_dtoh_async(&mut h.anchors[..], kept.anchors.ptr, s))
                .and_then(|_| drv::memcpy_dtoh_async(&mut h.count[..], kept.count.ptr, s))
                .map_err(|e| cuda_error("reading the detections", e))?;
        }
        self.stream.synchronize()?;
        out.resize_with(batch, Vec::new);
        for (b, dets) in out.iter_mut().enumerate() {
            dets.clear();
            let count = (h.count[b].max(0) as usize).min(cfg.max_detections);
            for q in b * slots..b * slots + count {
                let v = &h.boxes[q * 4..q * 4 + 4];
                dets.push(Detection {
                    bbox: BoxXyxy::new(v[0], v[1], v[2], v[3]),
                    score: h.scores[q],
                    class_id: h.classes[q].max(0) as usize,
                    anchor: h.anchors[q].max(0) as usize,
                });
            }
        }
        Ok(())
    }

    /// Make this post-processor's next run wait for `event` (e.g. the head has been written).
    pub(crate) fn wait_for(&mut self, event: &Event) -> Result<()> {
        self.bind()?;
        event.wait_on(&self.stream)
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        if batch == 0 || batch > self.max_batch {
            return Err(Error::InvalidArgument(format!(
                "batch of {batch} images; this GPU post-processor takes 1 to {}",
                self.max_batch
            )));
        }
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))
    }
}

impl Drop for GpuPostprocessor {
    fn drop(&mut self) {
        // The buffers, the stream and the module free themselves after this, in the bound context.
        let _ = self.ctx.bind_to_thread();
    }
}
