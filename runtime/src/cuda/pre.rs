//! Letterboxing on the GPU: a batch of raw frames ([`crate::frame::Frame`]: RGB, BGR, RGBA, BGRx,
//! NV12, I420, any size and pitch) to the engine's NCHW float32 input in one launch, computing
//! exactly what the CPU reference computes ([`crate::frame::Frame::to_rgb`] then
//! [`crate::letterbox::Letterboxer`]). Kernel in `pre.cu`, compiled by NVRTC.
//!
//! The frames' bytes go to the GPU as they are (3 or 1.5 bytes a pixel instead of the 12 of the
//! float input); the sampling taps are computed on the host with the CPU's own function.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};
use rayon::prelude::*;

use super::device::{
    self, Arg, DeviceBuffer, Event, Growing, GrowingPinned, Kernels, PinnedBuffer, Stream,
    cuda_error, launch,
};
use crate::error::{Error, Result};
use crate::frame::{Frame, PixelFormat, YuvMatrix};
use crate::letterbox::{InputLayout, InputTensor, InputType, LetterboxParams, axis_taps};

/// Source of the letterbox kernel.
pub const PRE_KERNEL_SOURCE: &str = include_str!("pre.cu");
/// Kernel entry points of `pre.cu`.
pub const PRE_KERNEL_NAMES: [&str; 1] = ["letterbox_frames"];
/// Ints per frame descriptor (`FRAME_INTS` in `pre.cu`).
const FRAME_INTS: usize = 12;
/// Bytes one core copies at a time when staging pageable planes.
const STAGING_CHUNK: usize = 64 * 1024;
/// Groups the staging of a batch is cut into, each uploaded while the next is copied.
const STAGING_GROUPS: usize = 4;

/// Where one plane of a batch goes: its bytes at `at` of the staging area and the device buffer.
#[derive(Debug, Clone, Copy)]
struct PlaneCopy {
    frame: usize,
    plane: usize,
    at: usize,
    len: usize,
    /// Already in pinned memory: uploaded from where it is, not staged.
    pinned: bool,
}

/// Copy into `dst` (staging bytes from `a`) the pageable plane bytes that belong there.
fn stage_chunk(frames: &[Frame], copies: &[PlaneCopy], a: usize, dst: &mut [u8]) {
    let b = a + dst.len();
    let first = copies.partition_point(|c| c.at + c.len <= a);
    for c in copies[first..].iter().take_while(|c| c.at < b) {
        if c.pinned {
            continue;
        }
        let (from, to) = (c.at.max(a), (c.at + c.len).min(b));
        dst[from - a..to - a]
            .copy_from_slice(&frames[c.frame].planes[c.plane][from - c.at..to - c.at]);
    }
}

/// Upload staging bytes `a..b` to the same offsets of `data`.
fn upload_staged(
    data: dsys::CUdeviceptr,
    staging: &[u8],
    a: usize,
    b: usize,
    stream: dsys::CUstream,
) -> Result<()> {
    // SAFETY: the device buffer and the pinned staging both hold the batch's bytes; the staging
    // is not rewritten before the `uploaded` event recorded after this copy is waited for.
    unsafe { drv::memcpy_htod_async(data + a as u64, &staging[a..b], stream) }
        .map_err(|e| cuda_error("uploading frames", e))
}

/// Compile `pre.cu` to PTX, without fused multiply-add (no GPU needed; CI checks the source).
pub fn compile_pre_kernels(arch: Option<&'static str>) -> Result<String> {
    device::compile_exact(PRE_KERNEL_SOURCE, "kestrel_pre.cu", arch)
}

/// Page-locked host memory for camera frames: frames whose planes lie here reach the GPU with no
/// staging copy (a decoder writing into it saves a pass over every frame).
pub struct PinnedFrameMemory {
    buffer: PinnedBuffer,
    /// Last, so the memory is freed in it.
    _ctx: Arc<CudaContext>,
}

// SAFETY: host memory owned by this value alone.
unsafe impl Send for PinnedFrameMemory {}

impl PinnedFrameMemory {
    /// `bytes` of pinned memory for GPU `ordinal`.
    pub fn new(ordinal: usize, bytes: usize) -> Result<Self> {
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        Ok(Self {
            buffer: PinnedBuffer::new(bytes)?,
            _ctx: ctx,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        self.buffer.as_bytes()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buffer.as_bytes_mut()
    }
}

impl Drop for PinnedFrameMemory {
    fn drop(&mut self) {
        let _ = self._ctx.bind_to_thread();
    }
}

/// Device memory for camera frames (where a decoder on the GPU would leave them), for
/// [`DeviceFrame`]s: filled from the host here, addressed by byte offset.
pub struct DeviceFrameMemory {
    buffer: DeviceBuffer,
    /// Last, so the memory is freed in it.
    ctx: Arc<CudaContext>,
}

// SAFETY: device memory owned by this value alone, used with the context bound.
unsafe impl Send for DeviceFrameMemory {}

impl DeviceFrameMemory {
    /// `bytes` of device memory on GPU `ordinal`.
    pub fn new(ordinal: usize, bytes: usize) -> Result<Self> {
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        Ok(Self {
            buffer: DeviceBuffer::new(bytes)?,
            ctx,
        })
    }

    /// Copy `bytes` from host memory to `offset` bytes into this memory.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.buffer.bytes)
        {
            return Err(Error::InvalidArgument(format!(
                "{} bytes at offset {offset} do not fit in {} bytes of frame memory",
                bytes.len(),
                self.buffer.bytes
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        // SAFETY: the range lies inside the allocation (checked above); synchronous copy.
        unsafe { drv::memcpy_htod_sync(self.buffer.ptr + offset as u64, bytes) }
            .map_err(|e| cuda_error("writing frame memory", e))
    }

    /// Device address `offset` bytes into this memory.
    pub fn address(&self, offset: usize) -> dsys::CUdeviceptr {
        self.buffer.ptr + offset as u64
    }
}

impl Drop for DeviceFrameMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

/// A raw frame already in this GPU's memory (e.g. a hardware decoder's output): as
/// [`Frame`], with each plane's device address instead of a host slice (unused planes 0).
#[derive(Debug, Clone, Copy)]
pub struct DeviceFrame {
    pub format: PixelFormat,
    /// Size in pixels.
    pub width: usize,
    pub height: usize,
    /// Device address of each plane's first row.
    pub planes: [dsys::CUdeviceptr; 3],
    /// Row pitch of each plane, in bytes.
    pub strides: [usize; 3],
    pub yuv: YuvMatrix,
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
    /// Pinned copies of the frames' planes, for fast uploads.
    staging: GrowingPinned,
    /// The planes of the current batch, in device order.
    copies: Vec<PlaneCopy>,
    planes_host: Vec<i64>,
    descriptors_host: Vec<i32>,
    yuv_host: Vec<f32>,
    taps_host: Vec<u32>,
    xs: Vec<(u32, u32, f32)>,
    ys: Vec<(u32, u32, f32)>,
    /// Recorded after each batch's uploads, and after its kernel.
    uploaded: Event,
    done: Event,
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
            staging: GrowingPinned::default(),
            copies: Vec::new(),
            planes_host: Vec::new(),
            descriptors_host: Vec::new(),
            yuv_host: Vec::new(),
            taps_host: Vec::new(),
            xs: Vec::new(),
            ys: Vec::new(),
            uploaded: Event::ordering()?,
            done: Event::ordering()?,
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
        self.run_device_as(frames, dst_w, dst_h, InputTensor::NCHW_F32, out, placements)
    }

    /// [`GpuLetterboxer::run_device`] into an input of any layout and element type (`tensor`),
    /// e.g. an FP16 NHWC or an INT8 input of a TensorRT engine.
    pub fn run_device_as(
        &mut self,
        frames: &[Frame],
        dst_w: u32,
        dst_h: u32,
        tensor: InputTensor,
        out: dsys::CUdeviceptr,
        placements: &mut Vec<LetterboxParams>,
    ) -> Result<()> {
        self.enqueue_device(frames, dst_w, dst_h, tensor, out, placements, None)?;
        self.stream.synchronize()
    }

    /// [`GpuLetterboxer::run_device`] without waiting for the GPU: the kernel starts after
    /// `after` (e.g. the engine has read its previous input) and [`GpuLetterboxer::done`] marks
    /// its end. Returns once the frames are no longer needed: pageable ones are staged, pinned
    /// ones uploaded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue_device(
        &mut self,
        frames: &[Frame],
        dst_w: u32,
        dst_h: u32,
        tensor: InputTensor,
        out: dsys::CUdeviceptr,
        placements: &mut Vec<LetterboxParams>,
        after: Option<&Event>,
    ) -> Result<()> {
        placements.clear();
        tensor.validate()?;
        if frames.is_empty() {
            return Ok(());
        }
        let mut staged = 0usize;
        self.clear_tables();
        for (k, f) in frames.iter().enumerate() {
            f.validate()
                .map_err(|e| Error::InvalidArgument(format!("frame {k}: {e}")))?;
            // Only the bytes the frame covers travel: (rows - 1) pitches and one row per plane.
            let need = f.format.plane_bytes(f.width, f.height, f.strides)?;
            for (i, &len) in need.iter().enumerate() {
                // Offsets into the upload area for now; its address is added below.
                self.planes_host.push(staged as i64);
                if i < f.format.planes() {
                    self.copies.push(PlaneCopy {
                        frame: k,
                        plane: i,
                        at: staged,
                        len,
                        pinned: false,
                    });
                    staged += len;
                }
            }
            let p = self.describe(
                k, f.format, f.width, f.height, f.strides, f.yuv, dst_w, dst_h,
            )?;
            placements.push(p);
        }
        self.bind()?;
        // The previous batch's uploads read the staging area and the device buffers.
        self.uploaded.synchronize()?;
        let data = self.data.at_least(staged)?;
        for p in &mut self.planes_host {
            *p += data as i64;
        }
        let staging = self.staging.at_least(staged)?;
        let s = self.stream.0;
        // Planes in pinned memory go straight to the device. The others are copied into pinned
        // staging (laid out as on the device) by all cores, in a few groups, each group's upload
        // overlapping the copy of the next.
        for c in self.copies.iter_mut() {
            c.pinned = device::is_pinned(&frames[c.frame].planes[c.plane][..c.len]);
            if c.pinned {
                let plane = &frames[c.frame].planes[c.plane][..c.len];
                // SAFETY: `data` holds `staged` bytes and the plane lies inside; the frame is
                // borrowed for this call, which waits for its upload before returning.
                unsafe { drv::memcpy_htod_async(data + c.at as u64, plane, s) }
                    .map_err(|e| cuda_error("uploading frames", e))?;
            }
        }
        let group = staged.div_ceil(STAGING_GROUPS).max(1);
        let copies = &self.copies;
        for g0 in (0..staged).step_by(group) {
            let g1 = (g0 + group).min(staged);
            staging[g0..g1]
                .par_chunks_mut(STAGING_CHUNK)
                .enumerate()
                .for_each(|(n, dst)| {
                    let a = g0 + n * STAGING_CHUNK;
                    stage_chunk(frames, copies, a, dst);
                });
            // Upload what the group staged, one copy per contiguous run.
            let mut run: Option<(usize, usize)> = None;
            let first = copies.partition_point(|c| c.at + c.len <= g0);
            for c in copies[first..].iter().take_while(|c| c.at < g1) {
                if c.pinned {
                    continue;
                }
                let (a, b) = (c.at.max(g0), (c.at + c.len).min(g1));
                run = match run {
                    Some((ra, rb)) if rb == a => Some((ra, b)),
                    Some((ra, rb)) => {
                        upload_staged(data, staging, ra, rb, s)?;
                        Some((a, b))
                    }
                    None => Some((a, b)),
                };
            }
            if let Some((ra, rb)) = run {
                upload_staged(data, staging, ra, rb, s)?;
            }
        }
        self.uploaded.record(&self.stream)?;
        if self.copies.iter().any(|c| c.pinned) {
            // The caller's pinned frames are borrowed only for this call.
            self.uploaded.synchronize()?;
        }
        self.launch_kernel(frames.len(), dst_w, dst_h, tensor, out, after)
    }

    /// Letterbox frames already in this GPU's memory (e.g. a hardware decoder's output) into
    /// `out` (an input of `tensor`'s layout and type); nothing is copied from the host but the
    /// sampling tables. Each plane's allocation is checked to hold the bytes the frame needs.
    /// Returns when `out` is written.
    pub fn run_device_frames(
        &mut self,
        frames: &[DeviceFrame],
        dst_w: u32,
        dst_h: u32,
        tensor: InputTensor,
        out: dsys::CUdeviceptr,
        placements: &mut Vec<LetterboxParams>,
    ) -> Result<()> {
        placements.clear();
        tensor.validate()?;
        if frames.is_empty() {
            return Ok(());
        }
        self.bind()?;
        self.clear_tables();
        for (k, f) in frames.iter().enumerate() {
            let need = f
                .format
                .plane_bytes(f.width, f.height, f.strides)
                .map_err(|e| Error::InvalidArgument(format!("frame {k}: {e}")))?;
            for (i, (&ptr, &need)) in f.planes.iter().zip(&need).enumerate() {
                if i < f.format.planes() {
                    match device::allocation_after(ptr, self.ctx.ordinal()) {
                        Some(room) if room >= need => {}
                        Some(room) => {
                            return Err(Error::InvalidArgument(format!(
                                "frame {k}: plane {i} at {ptr:#x} has {room} bytes of device \
                                 memory from there, needs {need}"
                            )));
                        }
                        None => {
                            return Err(Error::InvalidArgument(format!(
                                "frame {k}: plane {i} at {ptr:#x} is not device memory of \
                                 this GPU (give host frames to run_device instead)"
                            )));
                        }
                    }
                }
                self.planes_host.push(ptr as i64);
            }
            let p = self.describe(
                k, f.format, f.width, f.height, f.strides, f.yuv, dst_w, dst_h,
            )?;
            placements.push(p);
        }
        self.launch_kernel(frames.len(), dst_w, dst_h, tensor, out, None)?;
        self.stream.synchronize()
    }

    fn clear_tables(&mut self) {
        self.copies.clear();
        self.planes_host.clear();
        self.descriptors_host.clear();
        self.yuv_host.clear();
        self.taps_host.clear();
    }

    /// Append frame `k`'s descriptor, colorimetry and sampling taps; returns its placement.
    #[allow(clippy::too_many_arguments)]
    fn describe(
        &mut self,
        k: usize,
        format: PixelFormat,
        width: usize,
        height: usize,
        strides: [usize; 3],
        yuv: YuvMatrix,
        dst_w: u32,
        dst_h: u32,
    ) -> Result<LetterboxParams> {
        let int = |v: usize| -> Result<i32> {
            i32::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!("frame {k}: {v} exceeds the kernel's 32-bit sizes"))
            })
        };
        let p = LetterboxParams::new(int(width)? as u32, int(height)? as u32, dst_w, dst_h)?;
        axis_taps(p.src_w, p.new_w, &mut self.xs);
        axis_taps(p.src_h, p.new_h, &mut self.ys);
        let x_off = self.taps_host.len() / 3;
        let y_off = x_off + self.xs.len();
        for &(i0, i1, w) in self.xs.iter().chain(&self.ys) {
            self.taps_host.extend_from_slice(&[i0, i1, w.to_bits()]);
        }
        self.descriptors_host.extend_from_slice(&[
            format.code(),
            int(width)?,
            int(height)?,
            int(strides[0])?,
            int(strides[1])?,
            int(strides[2])?,
            p.new_w as i32,
            p.new_h as i32,
            p.left as i32,
            p.top as i32,
            int(x_off)?,
            int(y_off)?,
        ]);
        self.yuv_host
            .extend_from_slice(&[yuv.kr, yuv.kb, if yuv.full_range { 1.0 } else { 0.0 }]);
        Ok(p)
    }

    /// Upload the tables of the `frames` described, then (after `after`) the kernel; records
    /// [`GpuLetterboxer::done`].
    fn launch_kernel(
        &mut self,
        frames: usize,
        dst_w: u32,
        dst_h: u32,
        tensor: InputTensor,
        out: dsys::CUdeviceptr,
        after: Option<&Event>,
    ) -> Result<()> {
        debug_assert_eq!(self.descriptors_host.len(), frames * FRAME_INTS);
        let s = self.stream.0;
        let planes = self.planes.at_least(self.planes_host.len() * 8)?;
        let descriptors = self.descriptors.at_least(self.descriptors_host.len() * 4)?;
        let yuv = self.yuv.at_least(self.yuv_host.len() * 4)?;
        let taps = self.taps.at_least(self.taps_host.len() * 4)?;
        // SAFETY: each buffer was just sized to hold its host array; these arrays are pageable,
        // and an asynchronous copy from pageable memory has taken its bytes when it returns.
        unsafe {
            drv::memcpy_htod_async(planes, &self.planes_host[..], s)
                .and_then(|_| drv::memcpy_htod_async(descriptors, &self.descriptors_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(yuv, &self.yuv_host[..], s))
                .and_then(|_| drv::memcpy_htod_async(taps, &self.taps_host[..], s))
                .map_err(|e| cuda_error("uploading frames", e))?;
        }
        if let Some(event) = after {
            event.wait_on(&self.stream)?;
        }
        launch(
            self.function,
            s,
            frames * dst_w as usize * dst_h as usize,
            &[
                Arg::Ptr(planes),
                Arg::Ptr(descriptors),
                Arg::Ptr(yuv),
                Arg::Ptr(taps),
                Arg::Ptr(out),
                Arg::I32(frames as i32),
                Arg::I32(dst_w as i32),
                Arg::I32(dst_h as i32),
                Arg::I32(match tensor.layout {
                    InputLayout::Nchw => 0,
                    InputLayout::Nhwc => 1,
                }),
                Arg::I32(match tensor.dtype {
                    InputType::F32 => 0,
                    InputType::F16 => 1,
                    InputType::Int8 { .. } => 2,
                }),
                Arg::F32(match tensor.dtype {
                    InputType::Int8 { scale } => scale,
                    _ => 1.0,
                }),
            ],
        )?;
        self.done.record(&self.stream)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))
    }

    /// Recorded when the last [`GpuLetterboxer::enqueue_device`] has written its output.
    pub(crate) fn done(&self) -> &Event {
        &self.done
    }

    /// This letterboxer's own device buffer for `frames` inputs of `dst_w` x `dst_h` (the area
    /// [`GpuLetterboxer::run`] downloads from), for [`GpuLetterboxer::run_device`] where no
    /// engine input is at hand.
    pub fn device_output(
        &mut self,
        frames: usize,
        dst_w: u32,
        dst_h: u32,
    ) -> Result<dsys::CUdeviceptr> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        self.output
            .at_least(frames * 3 * dst_w as usize * dst_h as usize * 4)
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
        let dev = self.device_output(frames.len(), dst_w, dst_h)?;
        self.run_device(frames, dst_w, dst_h, dev, placements)?;
        self.download_output(frames.len(), dst_w, dst_h, out)
    }

    /// Copy `frames` float32 NCHW inputs from this letterboxer's own device buffer
    /// ([`GpuLetterboxer::device_output`]) into `out`.
    pub fn download_output(
        &mut self,
        frames: usize,
        dst_w: u32,
        dst_h: u32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let n = frames * 3 * dst_w as usize * dst_h as usize;
        let dev = self.device_output(frames, dst_w, dst_h)?;
        out.resize(n, 0.0);
        // SAFETY: the device buffer holds at least n floats; synchronised below.
        unsafe { drv::memcpy_dtoh_async(&mut out[..], dev, self.stream.0) }
            .map_err(|e| cuda_error("downloading the letterboxed batch", e))?;
        self.stream.synchronize()
    }

    /// [`GpuLetterboxer::run_device_as`] into host memory: `out` receives the input's bytes
    /// (little-endian elements, as [`InputTensor::encode`] writes them).
    pub fn run_as(
        &mut self,
        frames: &[Frame],
        dst_w: u32,
        dst_h: u32,
        tensor: InputTensor,
        out: &mut Vec<u8>,
        placements: &mut Vec<LetterboxParams>,
    ) -> Result<()> {
        let n = frames.len() * 3 * dst_w as usize * dst_h as usize * tensor.element_bytes();
        let dev = self.device_output(frames.len(), dst_w, dst_h)?;
        self.run_device_as(frames, dst_w, dst_h, tensor, dev, placements)?;
        out.resize(n, 0);
        // SAFETY: the device buffer holds the batch's float32 size, at least n bytes, written;
        // synchronised below.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{PixelFormat, YuvMatrix};

    #[test]
    fn staging_chunks_gather_the_pageable_planes_in_device_order() {
        // Two NV12 frames (Y and UV planes), the second's Y plane "pinned": staged bytes are the
        // planes back to back, the pinned one left untouched, whatever the chunk boundaries.
        let (w, h) = (6, 4);
        let planes: Vec<Vec<u8>> = (0..4u8)
            .map(|p| {
                (0..if p % 2 == 0 { w * h } else { w * h / 2 })
                    .map(|i| p * 50 + i as u8)
                    .collect()
            })
            .collect();
        let nv12 = |y, uv| Frame {
            format: PixelFormat::Nv12,
            width: w,
            height: h,
            planes: [y, uv, &[]],
            strides: [w, w, 0],
            yuv: YuvMatrix::BT601,
        };
        let frames = [
            nv12(&planes[0][..], &planes[1][..]),
            nv12(&planes[2][..], &planes[3][..]),
        ];
        let mut copies = Vec::new();
        let mut at = 0;
        for (k, f) in frames.iter().enumerate() {
            for i in 0..2 {
                let len = f.planes[i].len();
                copies.push(PlaneCopy {
                    frame: k,
                    plane: i,
                    at,
                    len,
                    pinned: k == 1 && i == 0,
                });
                at += len;
            }
        }
        for chunk in [1, 5, 7, 24, 1000] {
            let mut staging = vec![0xEEu8; at];
            for (n, dst) in staging.chunks_mut(chunk).enumerate() {
                stage_chunk(&frames, &copies, n * chunk, dst);
            }
            let mut expected = Vec::new();
            for (p, plane) in planes.iter().enumerate() {
                if p == 2 {
                    expected.extend(std::iter::repeat_n(0xEE, plane.len()));
                } else {
                    expected.extend_from_slice(plane);
                }
            }
            assert_eq!(staging, expected, "chunks of {chunk}");
        }
    }
}
