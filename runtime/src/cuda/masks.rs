//! Instance masks on the GPU: for the kept detections of a batch, coefficients × prototypes (a
//! batched GEMM), sigmoid, bilinear sampling at each source pixel, crop to the box, threshold 0.5,
//! computing what the CPU reference ([`crate::masks::MaskDecoder`]) computes. Masks come out as
//! full-frame bitmaps left on the device (or downloaded), or as COCO run-length encodings
//! computed on the GPU so only the runs come back. Kernels in `masks.cu`, compiled by NVRTC.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};

use super::device::{self, Arg, Growing, Kernels, Stream, cuda_error, launch, launch_grid};
use crate::detection::BoxXyxy;
use crate::error::{Error, Result};
use crate::letterbox::LetterboxParams;
use crate::masks::{
    Bitmap, MASK_COEFFICIENTS, PrototypeShape, Rle, box_pixel_range, check_mask_inputs,
    mask_axis_taps,
};

/// Source of the mask kernels.
pub const MASK_KERNEL_SOURCE: &str = include_str!("masks.cu");
/// Kernel entry points of `masks.cu`.
pub const MASK_KERNEL_NAMES: [&str; 5] = [
    "mask_cells",
    "mask_bitmaps",
    "mask_rle",
    "mask_pack",
    "mask_gather",
];
/// Ints per detection descriptor (`DET_INTS` in `masks.cu`).
const DET_INTS: usize = 9;
/// Threads of a run-length block (`RLE_THREADS` in `masks.cu`).
const RLE_THREADS: u32 = 256;

/// Compile `masks.cu` to PTX, without fused multiply-add (no GPU needed; CI checks the source).
pub fn compile_mask_kernels(arch: Option<&'static str>) -> Result<String> {
    device::compile_exact(MASK_KERNEL_SOURCE, "kestrel_masks.cu", arch)
}

/// The detections of a batch whose masks to decode, and where their prototypes are.
#[derive(Debug, Clone, Copy)]
pub struct MaskBatch<'a> {
    /// Device address of the batch's prototypes: `[images, 32, height, width]` float32 (the
    /// engine's `output1`, or [`GpuMaskDecoder::upload_prototypes`]).
    pub prototypes: dsys::CUdeviceptr,
    /// Shape of one image's prototype maps.
    pub shape: PrototypeShape,
    /// Each image's letterbox placement (its source size is the masks' size).
    pub letterboxes: &'a [LetterboxParams],
    /// Per detection, the image (index into `letterboxes`) it belongs to.
    pub images: &'a [usize],
    /// Per detection, its box in source pixels.
    pub boxes: &'a [BoxXyxy],
    /// Each detection's 32 mask coefficients.
    pub coefficients: MaskCoefficients<'a>,
}

/// Where the detections' mask coefficients are.
#[derive(Debug, Clone, Copy)]
pub enum MaskCoefficients<'a> {
    /// In host memory, 32 per detection.
    Host(&'a [f32]),
    /// In a raw head on the device (`[images, channels, anchors]` float32, the coefficients in
    /// its last 32 rows, e.g. an engine's `output0`): each detection's anchor.
    Head {
        head: dsys::CUdeviceptr,
        channels: usize,
        anchors: usize,
        anchor_of: &'a [usize],
    },
}

/// Decodes instance masks of batches on the GPU. Buffers grow to the largest batch seen and are
/// reused: once warm, a call allocates nothing on the device.
pub struct GpuMaskDecoder {
    _kernels: Kernels,
    functions: [dsys::CUfunction; 5],
    stream: Stream,
    prototypes: Growing,
    dets: Growing,
    coefficients: Growing,
    taps: Growing,
    cells: Growing,
    offsets: Growing,
    capacity: Growing,
    counts: Growing,
    bitmaps: Growing,
    runs: Growing,
    packed_offsets: Growing,
    packed: Growing,
    sources: Growing,
    dets_host: Vec<i32>,
    sources_host: Vec<i32>,
    taps_host: Vec<u32>,
    offsets_host: Vec<i64>,
    capacity_host: Vec<u32>,
    counts_host: Vec<u32>,
    packed_host: Vec<u32>,
    axis: Vec<(u32, u32, f32)>,
    /// Per image, where its x and y taps start.
    tap_offsets: Vec<(i32, i32)>,
    /// Last, so it is released after everything above is freed in it.
    ctx: Arc<CudaContext>,
}

// SAFETY: every handle is owned and used only through `&mut self` with the context bound first.
unsafe impl Send for GpuMaskDecoder {}

impl GpuMaskDecoder {
    /// Set up on GPU `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let kernels = Kernels::load(&compile_mask_kernels(Some(device::device_arch(&ctx)?))?)?;
        let functions = [
            kernels.function(MASK_KERNEL_NAMES[0])?,
            kernels.function(MASK_KERNEL_NAMES[1])?,
            kernels.function(MASK_KERNEL_NAMES[2])?,
            kernels.function(MASK_KERNEL_NAMES[3])?,
            kernels.function(MASK_KERNEL_NAMES[4])?,
        ];
        Ok(Self {
            _kernels: kernels,
            functions,
            stream: Stream::new()?,
            prototypes: Growing::default(),
            dets: Growing::default(),
            coefficients: Growing::default(),
            taps: Growing::default(),
            cells: Growing::default(),
            offsets: Growing::default(),
            capacity: Growing::default(),
            counts: Growing::default(),
            bitmaps: Growing::default(),
            runs: Growing::default(),
            packed_offsets: Growing::default(),
            packed: Growing::default(),
            sources: Growing::default(),
            dets_host: Vec::new(),
            sources_host: Vec::new(),
            taps_host: Vec::new(),
            offsets_host: Vec::new(),
            capacity_host: Vec::new(),
            counts_host: Vec::new(),
            packed_host: Vec::new(),
            axis: Vec::new(),
            tap_offsets: Vec::new(),
            ctx,
        })
    }

    /// Copy prototypes from host memory (`[images, 32, height, width]` float32) to this
    /// decoder's device buffer; returns its address for [`MaskBatch::prototypes`].
    pub fn upload_prototypes(&mut self, prototypes: &[f32]) -> Result<dsys::CUdeviceptr> {
        self.bind()?;
        let ptr = self
            .prototypes
            .at_least(std::mem::size_of_val(prototypes))?;
        // SAFETY: the buffer holds the slice; the copy is synchronised before returning.
        unsafe { drv::memcpy_htod_async(ptr, prototypes, self.stream.0) }
            .map_err(|e| cuda_error("uploading prototypes", e))?;
        self.stream.synchronize()?;
        Ok(ptr)
    }

    /// The masks of `batch` as full-frame bitmaps on the device, one after another (each
    /// `height * width` bytes at a 4-byte-aligned offset, [`GpuMaskDecoder::bitmap_offsets`]).
    /// Returns the device address when they are written.
    pub fn bitmaps_device(&mut self, batch: &MaskBatch<'_>) -> Result<dsys::CUdeviceptr> {
        self.prepare(batch, Layout::Bitmaps)?;
        let n = batch.boxes.len();
        if n == 0 {
            return self.bitmaps.at_least(1);
        }
        let total = self.offsets_host[n];
        let out = self.bitmaps.at_least(total as usize)?;
        let widest = self.largest_frame(n).div_ceil(4);
        let blocks = widest.div_ceil(256).clamp(1, 65_535) as u32;
        launch_grid(
            self.functions[1],
            self.stream.0,
            (blocks, n as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(self.cells_ptr()?),
                Arg::I32(batch.shape.width as i32 * batch.shape.height as i32),
                Arg::I32(batch.shape.width as i32),
                Arg::Ptr(self.dets.at_least(0)?),
                Arg::Ptr(self.taps.at_least(0)?),
                Arg::Ptr(self.offsets.at_least(0)?),
                Arg::Ptr(out),
            ],
        )?;
        self.stream.synchronize()?;
        Ok(out)
    }

    /// Byte offsets of each detection's bitmap from the last [`GpuMaskDecoder::bitmaps_device`]
    /// (one more entry than detections: the end).
    pub fn bitmap_offsets(&self) -> &[i64] {
        &self.offsets_host
    }

    /// The masks of `batch` as bitmaps in host memory, one per detection in `out` (reused).
    pub fn bitmaps(&mut self, batch: &MaskBatch<'_>, out: &mut Vec<Bitmap>) -> Result<()> {
        let dev = self.bitmaps_device(batch)?;
        out.resize_with(batch.boxes.len(), Bitmap::default);
        for (d, mask) in out.iter_mut().enumerate() {
            let l = &batch.letterboxes[batch.images[d]];
            mask.width = l.src_w as usize;
            mask.height = l.src_h as usize;
            mask.data.resize(mask.width * mask.height, 0);
            if mask.data.is_empty() {
                continue;
            }
            // SAFETY: the detection's bitmap lies at its offset with exactly these bytes; the
            // copy completes before the next iteration (synchronised).
            unsafe {
                drv::memcpy_dtoh_async(
                    &mut mask.data[..],
                    dev + self.offsets_host[d] as u64,
                    self.stream.0,
                )
            }
            .map_err(|e| cuda_error("downloading masks", e))?;
        }
        self.stream.synchronize()
    }

    /// The masks of `batch` as COCO run-length encodings computed on the GPU, one per detection
    /// in `out` (reused); only the runs are copied back.
    pub fn rle(&mut self, batch: &MaskBatch<'_>, out: &mut Vec<Rle>) -> Result<()> {
        self.prepare(batch, Layout::Runs)?;
        let n = batch.boxes.len();
        out.resize_with(n, Rle::default);
        if n == 0 {
            return Ok(());
        }
        let s = self.stream.0;
        let runs = self.runs.at_least(self.offsets_host[n] as usize * 4)?;
        let counts = self.counts.at_least(n * 4)?;
        let plane = batch.shape.width as i32 * batch.shape.height as i32;
        launch_grid(
            self.functions[2],
            s,
            (n as u32, 1, 1),
            RLE_THREADS,
            0,
            &[
                Arg::Ptr(self.cells_ptr()?),
                Arg::I32(plane),
                Arg::I32(batch.shape.width as i32),
                Arg::Ptr(self.dets.at_least(0)?),
                Arg::Ptr(self.taps.at_least(0)?),
                Arg::Ptr(self.offsets.at_least(0)?),
                Arg::Ptr(self.capacity.at_least(0)?),
                Arg::Ptr(runs),
                Arg::Ptr(counts),
            ],
        )?;
        self.counts_host.resize(n, 0);
        // SAFETY: counts holds n u32s; synchronised before reading.
        unsafe { drv::memcpy_dtoh_async(&mut self.counts_host[..], counts, s) }
            .map_err(|e| cuda_error("reading run counts", e))?;
        self.stream.synchronize()?;
        // Pack the runs of all detections back to back, so one copy brings them home.
        // (The device keeps the bounded layout's offsets, which the packing reads.)
        self.offsets_host.clear();
        let mut total = 0i64;
        for (d, &c) in self.counts_host.iter().enumerate() {
            if c == u32::MAX {
                return Err(cuda_error(
                    "run-length encoding",
                    format!("detection {d}'s runs overflowed their bound (a Kestrel bug)"),
                ));
            }
            self.offsets_host.push(total);
            total += i64::from(c);
        }
        self.offsets_host.push(total);
        let packed_offsets = self.packed_offsets.at_least((n + 1) * 8)?;
        let packed = self.packed.at_least(total as usize * 4)?;
        // SAFETY: sized above; the host array is untouched until the synchronisation below.
        unsafe { drv::memcpy_htod_async(packed_offsets, &self.offsets_host[..], s) }
            .map_err(|e| cuda_error("uploading run offsets", e))?;
        launch(
            self.functions[3],
            s,
            total as usize,
            &[
                Arg::Ptr(runs),
                Arg::Ptr(self.offsets.at_least(0)?),
                Arg::Ptr(packed_offsets),
                Arg::I32(n as i32),
                Arg::Ptr(packed),
            ],
        )?;
        self.packed_host.resize(total as usize, 0);
        // SAFETY: packed holds total u32s; synchronised before reading.
        unsafe { drv::memcpy_dtoh_async(&mut self.packed_host[..], packed, s) }
            .map_err(|e| cuda_error("downloading runs", e))?;
        self.stream.synchronize()?;
        for (d, rle) in out.iter_mut().enumerate() {
            let l = &batch.letterboxes[batch.images[d]];
            rle.width = l.src_w as usize;
            rle.height = l.src_h as usize;
            rle.counts.clear();
            rle.counts.extend_from_slice(
                &self.packed_host[self.offsets_host[d] as usize..self.offsets_host[d + 1] as usize],
            );
        }
        Ok(())
    }

    /// Validate `batch`, upload its descriptors, taps and coefficients, lay out the outputs and
    /// run the GEMM + sigmoid into the prototype-resolution masks.
    fn prepare(&mut self, batch: &MaskBatch<'_>, layout: Layout) -> Result<()> {
        let n = batch.boxes.len();
        let given = match batch.coefficients {
            MaskCoefficients::Host(c) => c.len(),
            MaskCoefficients::Head {
                channels,
                anchors,
                anchor_of,
                ..
            } => {
                if channels < MASK_COEFFICIENTS {
                    return Err(Error::Shape(format!(
                        "a head of {channels} rows has no {MASK_COEFFICIENTS} mask coefficient rows"
                    )));
                }
                if let Some(a) = anchor_of.iter().find(|&&a| a >= anchors) {
                    return Err(Error::InvalidArgument(format!(
                        "anchor {a} of a head with {anchors} anchors"
                    )));
                }
                anchor_of.len() * MASK_COEFFICIENTS
            }
        };
        check_mask_inputs(batch.shape.len(), batch.shape, n, given)?;
        if batch.images.len() != n {
            return Err(Error::InvalidArgument(format!(
                "{} image indices for {n} detections",
                batch.images.len()
            )));
        }
        let plane = batch.shape.width * batch.shape.height;
        if plane > i32::MAX as usize / MASK_COEFFICIENTS || n > 65_535 {
            return Err(Error::InvalidArgument(format!(
                "{n} detections with {plane}-cell prototype maps exceed the GPU mask kernels' \
                 limits (65535 detections, 2^31 values)"
            )));
        }
        self.dets_host.clear();
        self.taps_host.clear();
        self.offsets_host.clear();
        self.capacity_host.clear();
        // Taps per image, then each detection's descriptor and output room.
        self.tap_offsets.clear();
        for l in batch.letterboxes {
            if l.src_w > i32::MAX as u32 / 2 || l.src_h > i32::MAX as u32 / 2 {
                return Err(Error::InvalidArgument(format!(
                    "a {}x{} frame exceeds the GPU mask kernels' 32-bit sizes",
                    l.src_w, l.src_h
                )));
            }
            let x_off = self.taps_host.len() / 3;
            mask_axis_taps(
                l.src_w,
                l.new_w,
                l.left,
                l.dst_w,
                batch.shape.width as u32,
                &mut self.axis,
            );
            push_taps(&mut self.taps_host, &self.axis);
            let y_off = self.taps_host.len() / 3;
            mask_axis_taps(
                l.src_h,
                l.new_h,
                l.top,
                l.dst_h,
                batch.shape.height as u32,
                &mut self.axis,
            );
            push_taps(&mut self.taps_host, &self.axis);
            self.tap_offsets.push((x_off as i32, y_off as i32));
        }
        let mut offset = 0i64;
        for (d, (&image, b)) in batch.images.iter().zip(batch.boxes).enumerate() {
            let l = batch.letterboxes.get(image).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "detection {d} belongs to image {image}; the batch has {} images",
                    batch.letterboxes.len()
                ))
            })?;
            let (w, h) = (l.src_w as usize, l.src_h as usize);
            let [x0, y0, x1, y1] = box_pixel_range(b, w, h);
            let (xo, yo) = self.tap_offsets[image];
            self.dets_host.extend_from_slice(&[
                image as i32,
                w as i32,
                h as i32,
                x0 as i32,
                x1 as i32,
                y0 as i32,
                y1 as i32,
                xo,
                yo,
            ]);
            self.offsets_host.push(offset);
            match layout {
                Layout::Bitmaps => offset += (w * h).next_multiple_of(4) as i64,
                Layout::Runs => {
                    // Changes happen only in the box's columns and the one after, at row 0 and
                    // in the box's rows and the one after: at most one per such position.
                    let room = if x1 > x0 && y1 > y0 {
                        ((x1 + 1).min(w) - x0) * (1 + (y1 + 1).min(h) - y0) + 1
                    } else {
                        1
                    };
                    let room = u32::try_from(room).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "detection {d}: a {w}x{h} mask exceeds the run-length kernel's sizes"
                        ))
                    })?;
                    self.capacity_host.push(room);
                    offset += i64::from(room);
                }
            }
        }
        self.offsets_host.push(offset);
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream.0;
        let dets = self.dets.at_least(self.dets_host.len() * 4)?;
        let taps = self.taps.at_least(self.taps_host.len() * 4)?;
        let offsets = self.offsets.at_least(self.offsets_host.len() * 8)?;
        let coefficients = self.coefficients.at_least(n * MASK_COEFFICIENTS * 4)?;
        let capacity = self
            .capacity
            .at_least(self.capacity_host.len().max(1) * 4)?;
        let cells = self.cells.at_least(n * plane * 4)?;
        // SAFETY: each buffer was just sized for its host array; the host arrays are not touched
        // until the stream is synchronised (every public entry point synchronises).
        unsafe {
            drv::memcpy_htod_async(dets, &self.dets_host[..], s)
                .and_then(|_| drv::memcpy_htod_async(taps, &self.taps_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(offsets, &self.offsets_host[..], s))
                .map_err(|e| cuda_error("uploading mask inputs", e))?;
            if !self.capacity_host.is_empty() {
                drv::memcpy_htod_async(capacity, &self.capacity_host[..], s)
                    .map_err(|e| cuda_error("uploading mask inputs", e))?;
            }
        }
        match batch.coefficients {
            MaskCoefficients::Host(c) => {
                // SAFETY: sized for n detections' coefficients (checked above); the slice is
                // borrowed for this call, which synchronises before returning.
                unsafe { drv::memcpy_htod_async(coefficients, c, s) }
                    .map_err(|e| cuda_error("uploading mask coefficients", e))?;
            }
            MaskCoefficients::Head {
                head,
                channels,
                anchors,
                anchor_of,
            } => {
                self.sources_host.clear();
                for (&image, &anchor) in batch.images.iter().zip(anchor_of) {
                    self.sources_host
                        .extend_from_slice(&[image as i32, anchor as i32]);
                }
                let sources = self.sources.at_least(self.sources_host.len() * 4)?;
                // SAFETY: sized just above; a pageable source is taken when the call returns.
                unsafe { drv::memcpy_htod_async(sources, &self.sources_host[..], s) }
                    .map_err(|e| cuda_error("uploading mask inputs", e))?;
                launch(
                    self.functions[4],
                    s,
                    n * MASK_COEFFICIENTS,
                    &[
                        Arg::Ptr(head),
                        Arg::I32(channels as i32),
                        Arg::I32(anchors as i32),
                        Arg::I32((channels - MASK_COEFFICIENTS) as i32),
                        Arg::Ptr(sources),
                        Arg::I32(n as i32),
                        Arg::Ptr(coefficients),
                    ],
                )?;
            }
        }
        launch(
            self.functions[0],
            s,
            n * plane,
            &[
                Arg::Ptr(batch.prototypes),
                Arg::I32(plane as i32),
                Arg::Ptr(dets),
                Arg::Ptr(coefficients),
                Arg::I32(n as i32),
                Arg::Ptr(cells),
            ],
        )?;
        // Every public entry point synchronises before returning, so the borrowed coefficients
        // outlive their copy.
        Ok(())
    }

    fn cells_ptr(&mut self) -> Result<dsys::CUdeviceptr> {
        self.cells.at_least(0)
    }

    /// Pixels of the largest frame among the first `n` detections.
    fn largest_frame(&self, n: usize) -> usize {
        self.dets_host
            .chunks_exact(DET_INTS)
            .take(n)
            .map(|d| d[1] as usize * d[2] as usize)
            .max()
            .unwrap_or(0)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))
    }
}

impl Drop for GpuMaskDecoder {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

/// What [`GpuMaskDecoder::prepare`] lays out room for.
#[derive(Clone, Copy)]
enum Layout {
    Bitmaps,
    Runs,
}

fn push_taps(out: &mut Vec<u32>, taps: &[(u32, u32, f32)]) {
    for &(i0, i1, w) in taps {
        out.extend_from_slice(&[i0, i1, w.to_bits()]);
    }
}
