//! Letterboxing on the GPU: a batch of raw frames ([`crate::frame::Frame`]: RGB, BGR, RGBA, BGRx,
//! NV12, I420, any size and pitch) to the engine's NCHW float32 input in one launch, computing
//! exactly what the CPU reference computes ([`crate::frame::Frame::to_rgb`] then
//! [`crate::letterbox::Letterboxer`]). Kernel in `pre.cu`, compiled by NVRTC.
//!
//! The frames' bytes go to the GPU as they are (3 or 1.5 bytes a pixel instead of the 12 of the
//! float input); the sampling taps are computed on the host with the CPU's own function.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};

use super::device::{self, Arg, Growing, Kernels, Stream, cuda_error, launch};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::letterbox::{LetterboxParams, axis_taps};

/// Source of the letterbox kernel.
pub const PRE_KERNEL_SOURCE: &str = include_str!("pre.cu");
/// Kernel entry points of `pre.cu`.
pub const PRE_KERNEL_NAMES: [&str; 1] = ["letterbox_frames"];
/// Ints per frame descriptor (`FRAME_INTS` in `pre.cu`).
const FRAME_INTS: usize = 12;

/// Compile `pre.cu` to PTX, without fused multiply-add (no GPU needed; CI checks the source).
pub fn compile_pre_kernels(arch: Option<&'static str>) -> Result<String> {
    device::compile_exact(PRE_KERNEL_SOURCE, "kestrel_pre.cu", arch)
}

/// Letterboxes batches of raw frames on the GPU. Buffers grow to the largest batch seen and are
/// reused: once warm, a call allocates nothing.
pub struct GpuLetterboxer {
    _kernels: Kernels,
    function: dsys::CUfunction,
    stream: Stream,
    data: Growing,
    planes: Growing,
    descriptors: Growing,
    yuv: Growing,
    taps: Growing,
    output: Growing,
    staging: Vec<u8>,
    planes_host: Vec<i64>,
    descriptors_host: Vec<i32>,
    yuv_host: Vec<f32>,
    taps_host: Vec<u32>,
    xs: Vec<(u32, u32, f32)>,
    ys: Vec<(u32, u32, f32)>,
    /// Last, so it is released after everything above is freed in it.
    ctx: Arc<CudaContext>,
}

// SAFETY: every handle is owned and used only through `&mut self` with the context bound first.
unsafe impl Send for GpuLetterboxer {}

impl GpuLetterboxer {
    /// Set up on GPU `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let kernels = Kernels::load(&compile_pre_kernels(Some(device::device_arch(&ctx)?))?)?;
        Ok(Self {
            function: kernels.function(PRE_KERNEL_NAMES[0])?,
            _kernels: kernels,
            stream: Stream::new()?,
            data: Growing::default(),
            planes: Growing::default(),
            descriptors: Growing::default(),
            yuv: Growing::default(),
            taps: Growing::default(),
            output: Growing::default(),
            staging: Vec::new(),
            planes_host: Vec::new(),
            descriptors_host: Vec::new(),
            yuv_host: Vec::new(),
            taps_host: Vec::new(),
            xs: Vec::new(),
            ys: Vec::new(),
            ctx,
        })
    }

    /// Letterbox `frames` into `out` on this GPU: `[frames.len(), 3, dst_h, dst_w]` float32 (an
    /// engine's input buffer, at least that large). `placements` receives each frame's
    /// placement, for mapping boxes back. Returns when `out` is written.
    pub fn run_device(
        &mut self,
        frames: &[Frame],
        dst_w: u32,
        dst_h: u32,
        out: dsys::CUdeviceptr,
        placements: &mut Vec<LetterboxParams>,
    ) -> Result<()> {
        placements.clear();
        if frames.is_empty() {
            return Ok(());
        }
        self.staging.clear();
        self.planes_host.clear();
        self.descriptors_host.clear();
        self.yuv_host.clear();
        self.taps_host.clear();
        for (k, f) in frames.iter().enumerate() {
            f.validate()
                .map_err(|e| Error::InvalidArgument(format!("frame {k}: {e}")))?;
            let p = LetterboxParams::new(f.width as u32, f.height as u32, dst_w, dst_h)?;
            // Only the bytes the frame covers travel: (rows - 1) pitches and one row per plane.
            for i in 0..3 {
                if i < f.format.planes() {
                    let rows = f.format.rows(i, f.height);
                    let len = (rows - 1) * f.strides[i] + f.format.row_bytes(i, f.width);
                    self.planes_host.push(self.staging.len() as i64);
                    self.staging.extend_from_slice(&f.planes[i][..len]);
                } else {
                    self.planes_host.push(0);
                }
            }
            axis_taps(p.src_w, p.new_w, &mut self.xs);
            axis_taps(p.src_h, p.new_h, &mut self.ys);
            let x_off = self.taps_host.len() / 3;
            let y_off = x_off + self.xs.len();
            for &(i0, i1, w) in self.xs.iter().chain(&self.ys) {
                self.taps_host.extend_from_slice(&[i0, i1, w.to_bits()]);
            }
            let int = |v: usize| -> Result<i32> {
                i32::try_from(v).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "frame {k}: {v} exceeds the kernel's 32-bit sizes"
                    ))
                })
            };
            self.descriptors_host.extend_from_slice(&[
                f.format.code(),
                int(f.width)?,
                int(f.height)?,
                int(f.strides[0])?,
                int(f.strides[1])?,
                int(f.strides[2])?,
                p.new_w as i32,
                p.new_h as i32,
                p.left as i32,
                p.top as i32,
                int(x_off)?,
                int(y_off)?,
            ]);
            self.yuv_host.extend_from_slice(&[
                f.yuv.kr,
                f.yuv.kb,
                if f.yuv.full_range { 1.0 } else { 0.0 },
            ]);
            placements.push(p);
        }
        debug_assert_eq!(self.descriptors_host.len(), frames.len() * FRAME_INTS);
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let data = self.data.at_least(self.staging.len())?;
        let planes = self.planes.at_least(self.planes_host.len() * 8)?;
        let descriptors = self.descriptors.at_least(self.descriptors_host.len() * 4)?;
        let yuv = self.yuv.at_least(self.yuv_host.len() * 4)?;
        let taps = self.taps.at_least(self.taps_host.len() * 4)?;
        let s = self.stream.0;
        // SAFETY: each buffer was just sized to hold its host array; the host arrays are not
        // touched until the stream is synchronised below.
        unsafe {
            drv::memcpy_htod_async(data, &self.staging[..], s)
                .and_then(|_| drv::memcpy_htod_async(planes, &self.planes_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(descriptors, &self.descriptors_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(yuv, &self.yuv_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(taps, &self.taps_host[..], s))
                .map_err(|e| cuda_error("uploading frames", e))?;
        }
        launch(
            self.function,
            s,
            frames.len() * dst_w as usize * dst_h as usize,
            &[
                Arg::Ptr(data),
                Arg::Ptr(planes),
                Arg::Ptr(descriptors),
                Arg::Ptr(yuv),
                Arg::Ptr(taps),
                Arg::Ptr(out),
                Arg::I32(frames.len() as i32),
                Arg::I32(dst_w as i32),
                Arg::I32(dst_h as i32),
            ],
        )?;
        self.stream.synchronize()
    }

    /// [`GpuLetterboxer::run_device`] into host memory: `out` receives the NCHW input.
    pub fn run(
        &mut self,
        frames: &[Frame],
        dst_w: u32,
        dst_h: u32,
        out: &mut Vec<f32>,
        placements: &mut Vec<LetterboxParams>,
    ) -> Result<()> {
        let n = frames.len() * 3 * dst_w as usize * dst_h as usize;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let dev = self.output.at_least(n * 4)?;
        self.run_device(frames, dst_w, dst_h, dev, placements)?;
        out.resize(n, 0.0);
        // SAFETY: the device buffer holds n floats, written; synchronised below.
        unsafe { drv::memcpy_dtoh_async(&mut out[..], dev, self.stream.0) }
            .map_err(|e| cuda_error("downloading the letterboxed batch", e))?;
        self.stream.synchronize()
    }
}

impl Drop for GpuLetterboxer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}
