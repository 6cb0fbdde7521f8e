//! The `cuda` backend: Kestrel's own GPU engine on cudarc (driver, NVRTC, cuDNN).
//!
//! Build: the ONNX is lowered to an [`plan::EnginePlan`] (NHWC trunk with Conv, bias, activation
//! and residual fused; Q/DQ pairs folded into INT8 convolutions; a row-major float32 tail), weights
//! are uploaded once in the trunk's precision, and for every batch bucket each convolution gets the
//! implementation that times fastest (cuDNN's legacy convolution plus Kestrel's epilogue kernel,
//! Kestrel's INT8 kernel, or a cuDNN fused graph, see [`fused`]). Each bucket's whole sequence of
//! launches is captured once as a CUDA graph on a non-default stream. Run: copy the batch into a
//! pinned buffer, upload, replay the bucket's graph, download, synchronise.
//!
//! Not done yet (see the README): concat elimination (concatenations are copies).
#![allow(unsafe_code)]

mod conv;
pub(crate) mod device;
mod fused;
pub mod layers;
pub mod masks;
pub mod plan;
pub mod post;
pub mod pre;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};
use kestrel_exporter::onnx::pb;

use crate::detection::Detection;
use crate::end_to_end::{EndToEndBuffers, ImageHead};
use crate::engine::{EndToEndOutputs, Engine, EngineInfo, LayerTime, Precision, StageTimes};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::letterbox::{InputTensor, LetterboxParams};
use crate::masks::Bitmap;
use crate::nms::NmsConfig;
use conv::{ConvPlan, ConvShape, Dnn};
use device::{
    Arg, DeviceBuffer, Event, GraphExec, Kernels, PinnedBuffer, Stream, cuda_error,
    f32_to_f16_bits, launch, launch_grid,
};
use fused::{FusedConvGraph, FusedConvPlan, FusedConvPointers, FusedConvSpec, Storage};
use masks::{GpuMaskDecoder, MaskBatch, MaskCoefficients};
use plan::{ConvGeometry, EnginePlan, Int8Conv, Layout, Step, ValueId};
use post::GpuPostprocessor;
use pre::GpuLetterboxer;

pub use device::{KERNEL_SOURCE, compile_kernels, device_count, unavailable_reason};

/// The build environment of GPU `ordinal`: its name and compute capability, cuDNN and driver
/// versions.
pub fn build_environment(ordinal: usize) -> Result<crate::engine_file::BuildEnvironment> {
    let ctx = device::context(ordinal)?;
    let device = ctx.name().map_err(|e| cuda_error("GPU name", e))?;
    let cc = ctx
        .compute_capability()
        .map_err(|e| cuda_error("compute capability", e))?;
    let mut driver = 0i32;
    // SAFETY: writes one int.
    unsafe { dsys::cuDriverGetVersion(&mut driver) }
        .result()
        .map_err(|e| cuda_error("driver version", e))?;
    let cudnn = cudarc::cudnn::result::get_version();
    Ok(crate::engine_file::BuildEnvironment {
        backend_versions: [
            ("cuda_driver".to_string(), driver.to_string()),
            ("cudnn".to_string(), cudnn.to_string()),
        ]
        .into(),
        device,
        compute_capability: Some(cc),
    })
}

/// GPU `ordinal`'s memory as the driver reports it: (bytes in use by every process, bytes in
/// total).
pub fn memory_info(ordinal: usize) -> Result<(u64, u64)> {
    let ctx = device::context(ordinal)?;
    ctx.bind_to_thread()
        .map_err(|e| cuda_error("binding the context", e))?;
    let (free, total) =
        drv::mem_get_info().map_err(|e| cuda_error("reading the GPU's memory use", e))?;
    Ok(((total - free.min(total)) as u64, total as u64))
}

/// Batch sizes with their own CUDA graph: powers of two within the profile, plus its maximum.
pub fn batch_buckets(min: usize, max: usize) -> Vec<usize> {
    let mut b: Vec<usize> = (0..usize::BITS)
        .map(|i| 1usize << i)
        .take_while(|&v| v < max)
        .filter(|&v| v >= min)
        .collect();
    b.push(max);
    b
}

/// The bucket a batch of `n` runs in: the smallest bucket that holds it.
pub fn bucket_for(buckets: &[usize], n: usize) -> Option<usize> {
    buckets.iter().copied().find(|&b| b >= n)
}

/// An engine on the GPU.
pub struct CudaEngine {
    // Field order is drop order: graphs and plans before the memory they point into.
    /// Decode + NMS on this GPU for the end-to-end path, set up on its first use.
    post: Option<GpuPostprocessor>,
    /// Letterbox of raw frames into the input, for the end-to-end path, set up on its first use.
    letterboxer: Option<GpuLetterboxer>,
    /// Stages of the last `detect_frames`.
    stage_times: Option<StageTimes>,
    /// Batches started by `start_frames` and not yet finished.
    pipeline: Option<FramePipeline>,
    /// Segmentation models: the GPU mask decoder and its per-batch lists.
    masks: Option<GpuMaskDecoder>,
    mask_jobs: MaskJobs,
    graphs: HashMap<usize, GraphExec>,
    conv_plans: HashMap<(usize, usize), ConvPlan>,
    /// Convolutions (step, bucket) that run as one cuDNN fused graph, where that timed faster.
    fused: HashMap<(usize, usize), FusedConvPlan>,
    /// `1 / output scale` per channel of each INT8 convolution that stores int8 (fused graphs).
    fused_out_scales: HashMap<usize, DeviceBuffer>,
    fused_workspace: DeviceBuffer,
    /// Concat inputs that live inside the concat's buffer (written there by their producer).
    views: HashMap<ValueId, ConcatView>,
    /// Steps with nothing to do: concat copies whose source is a view into the destination, and
    /// split copies whose pieces are views into the split tensor's buffer.
    skipped: std::collections::HashSet<usize>,
    /// How many of the `skipped` copies were split copies or the concat copies of split pieces
    /// ([`Self::eliminate_split_copies`]).
    split_copies_dropped: usize,
    meta: HashMap<(usize, usize), DeviceBuffer>,
    weights: HashMap<usize, DeviceBuffer>,
    /// Per-channel epilogue scale (input scale x filter scale) of each INT8 convolution step.
    int8_scales: HashMap<usize, DeviceBuffer>,
    constants: Vec<DeviceBuffer>,
    buffers: Vec<Option<DeviceBuffer>>,
    workspace: DeviceBuffer,
    pinned_in: PinnedBuffer,
    pinned_out: PinnedBuffer,
    /// Segmentation models: the prototypes' pinned download area and host copy.
    pinned_protos: PinnedBuffer,
    prototypes: Vec<f32>,
    functions: HashMap<&'static str, dsys::CUfunction>,
    _kernels: Kernels,
    dnn: Dnn,
    stream: Stream,
    ctx: Arc<CudaContext>,
    plan: EnginePlan,
    half: bool,
    buckets: Vec<usize>,
    info: EngineInfo,
    output: Vec<f32>,
    device_name: String,
    /// Streaming multiprocessors: the INT8 convolution sizes its tiles to keep them all busy.
    sm_count: usize,
    /// Whether the first convolution runs as one [`Step::StemConv`] (recorded in engine files,
    /// whose step indices depend on it).
    stem_fused: bool,
    /// `$KESTREL_INT8_TILE`, read once.
    forced_int8_tile: Option<(&'static str, usize, usize)>,
    /// Whether 3x3 INT8 convolutions of 32 and 64 channels run the thin kernel
    /// ([`thin_conv_enabled`], read once).
    thin_conv: bool,
    /// Blocks of each thin kernel that fit on one multiprocessor at once (its persistent grid
    /// is this times the multiprocessors).
    thin_blocks_per_sm: HashMap<&'static str, usize>,
    /// Whether 1x1 INT8 convolutions run Kestrel's 1x1 kernel ([`pointwise_conv_enabled`], read
    /// once).
    pointwise_conv: bool,
    /// INT8 pipeline depth the kernels were compiled with (sizes their shared memory).
    int8_stages: usize,
    /// The fused-convolution choices of the engine file this engine is loaded from, (step,
    /// bucket) → plan label (a step missing: it was not fused); replayed instead of timed.
    recorded_fused: Option<HashMap<(usize, usize), String>>,
    /// How the fused convolutions were chosen: "timed", or "replayed" from an engine file (with
    /// the layers that had to be timed again, if any).
    fused_selection: String,
    /// End-to-end models: what the caller sees and the graph's NMS (this engine runs the plain
    /// part).
    end_to_end: Option<EndToEndState>,
}

/// The end-to-end side of an engine running an end-to-end model's plain part.
struct EndToEndState {
    /// The end-to-end model's info ([`EngineInfo::end_to_end`] set), returned by `info()`.
    info: EngineInfo,
    /// The graph's NMS settings.
    nms: NmsConfig,
    kept: Vec<Vec<Detection>>,
    buffers: EndToEndBuffers,
}

// SAFETY: every handle inside is used only through `&mut self`, after binding the context to the
// calling thread.
unsafe impl Send for CudaEngine {}

const KERNEL_NAMES: [&str; 51] = [
    "nchw_f32_to_nhwc_f16",
    "nchw_f32_to_nhwc_f32",
    "nhwc_f16_to_nchw_f32",
    "nhwc_f32_to_nchw_f32",
    "bias_act_f16",
    "bias_act_f32",
    "bias_act_nchw_f32",
    "pool_nhwc_f16",
    "pool_nhwc_f32",
    "resize_nearest_nhwc_f16",
    "resize_nearest_nhwc_f32",
    "copy_axis_f16",
    "copy_axis_v16",
    "bias_act_v8_f16",
    "pool_v8_f16",
    "pool_v8_i8",
    "pool_v16_i8",
    "dfl_f32",
    "resize_nearest_v16",
    "copy_axis_f32",
    "copy_axis_i8",
    "unary_f16",
    "unary_f32",
    "binary_same_f16",
    "binary_same_f32",
    "binary_bcast_f32",
    "transpose_f32",
    "softmax_f32",
    "quantize_v8_f16_i8",
    "fake_quant_f16",
    "fake_quant_f32",
    "stem_conv_f16",
    "stem_conv_i8",
    "conv_int8_m128_n128",
    "conv_int8_m128_n64",
    "conv_int8_m64_n128",
    "conv_int8_m64_n64",
    "conv3x3_thin_c32_k32_i8",
    "conv3x3_thin_c32_k32_f16",
    "conv3x3_thin_c64_k64_i8",
    "conv3x3_thin_c64_k64_f16",
    "conv3x3_thin_c32_k64_i8",
    "conv3x3_thin_c32_k64_f16",
    "conv3x3_thin_c64_k32_i8",
    "conv3x3_thin_c64_k32_f16",
    "conv1x1_int8_m128_n64_i8",
    "conv1x1_int8_m128_n64_f16",
    "conv1x1_int8_m64_n64_i8",
    "conv1x1_int8_m64_n64_f16",
    "conv1x1_int8_m128_n32_i8",
    "conv1x1_int8_m128_n32_f16",
];

fn prod(v: &[usize]) -> usize {
    v.iter().product()
}

/// Bytes per shared-memory row of an INT8 tile (`I8_LDS` in `kernels.cu`).
const INT8_ROW_BYTES: usize = 80;

/// Dynamic shared memory of an INT8 convolution tile of `bm` pixels x `bn` channels with
/// `stages` reduction tiles in flight, in bytes.
/// Bytes per element of a value in `layout` (`half`: the trunk is FP16).
fn element_bytes(layout: Layout, half: bool) -> usize {
    match layout {
        Layout::NhwcInt8 => 1,
        Layout::Nhwc if half => 2,
        _ => 4,
    }
}

/// A value stored inside another's buffer: channels `channel_offset..` of each pixel row of
/// `channel_stride` channels (a concat input written where the concat wants it).
#[derive(Debug, Clone, Copy)]
struct ConcatView {
    buffer: ValueId,
    channel_offset: usize,
    channel_stride: usize,
}

/// Fused-convolution candidates timed per layer spec (cuDNN's heuristic order). Measured on an
/// H200 (gelan-c INT8, buckets 1-8): the first candidate builds in 14 s in all; three took 186 s
/// (the others compile at runtime) for 3% more images/s at batch 8.
/// `$KESTREL_FUSED_CANDIDATES` raises it for a slower, more thorough build.
const FUSED_CANDIDATES: usize = 1;
/// Workspace a fused convolution may use, in bytes.
const FUSED_WORKSPACE_LIMIT: usize = 64 << 20;

fn int8_shared_bytes(stages: usize, bm: usize, bn: usize) -> usize {
    stages * (bm + bn) * INT8_ROW_BYTES
}

/// Output rows per thread of the smoothing pool kernel (`POOL_ROWS` in `kernels.cu`).
const POOL_ROWS: usize = 4;

/// Whether a vector pooling kernel runs this pool as `pool_smooth` (`kernels.cu`), on the grid of
/// [`pool_smooth_grid`]: an average over 2 rows, stride 1 down the rows, with every tap inside the
/// NCHW input `dx` for the output `dy` (ADown's and AConv's smoothing). The kernel makes the same
/// test.
fn pool_smooths(
    max: bool,
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
    dx: &[usize],
    dy: &[usize],
) -> bool {
    !max && kernel[0] == 2
        && stride[0] == 1
        && pads[0] == 0
        && pads[1] == 0
        && dy[2] + 1 == dx[2]
        && dy[3] > 0
        && (dy[3] - 1) * stride[1] + kernel[1] <= dx[3]
}

/// The grid of `pool_smooth` (`kernels.cu`) with 256-thread blocks for NCHW output dims `dy`,
/// `per_vector` channels a vector: x covers an output row's columns and channel vectors, y the
/// images' strips of [`POOL_ROWS`] rows. Both stay within the launch limit of 65535 (the kernel
/// loops over what they leave).
fn pool_smooth_grid(dy: &[usize], per_vector: usize) -> (u32, u32) {
    let row_vectors = dy[3] * dy[1] / per_vector;
    let strips = dy[0] * dy[2].div_ceil(POOL_ROWS);
    let cap = |n: usize| n.clamp(1, 65_535) as u32;
    (cap(row_vectors.div_ceil(256)), cap(strips))
}

/// The INT8 convolution kernel for `m` output pixels and `k` output channels, and its tile
/// (pixels, channels): 128 x 64 where that still gives each of `sms` multiprocessors two blocks,
/// else 64 x 64. On an H200 at gelan-c batch 8, forcing one tile on every layer gave 7.51 ms
/// (128 x 64), 7.68 (64 x 64), 7.91 (64 x 128) and 9.56 (128 x 128): the wider tiles win only on
/// 3x3 layers of 256 channels (4 %), and lose more on the many 1x1 and thin layers.
pub fn int8_tile(m: usize, k: usize, sms: usize) -> (&'static str, usize, usize) {
    let (big, small) = (INT8_TILES[1], INT8_TILES[3]);
    if m.div_ceil(big.1) * k.div_ceil(big.2) >= 2 * sms {
        big
    } else {
        small
    }
}

/// `$KESTREL_INT8_TILE` (a kernel name of [`INT8_TILES`]) forces one tile on every INT8
/// convolution: a tuning experiment, like `KESTREL_CUDA_ALGO`.
fn forced_int8_tile() -> Option<(&'static str, usize, usize)> {
    let name = std::env::var("KESTREL_INT8_TILE").ok()?;
    INT8_TILES.iter().find(|t| t.0 == name).copied()
}

/// Whether FP16 and INT8 engines run the first convolution with Kestrel's one-pass stem kernel
/// on tensor cores ([`plan::EnginePlan::fuse_stem`]): yes unless `$KESTREL_STEM_CONV=0`. Checked
/// on an H200 against the unfused stem by `the_stem_kernel_matches_the_unfused_stem`; timed by
/// `bench/stem-conv.sh` (gelan-c, H200, batch 8): +3.2 % images/s in FP16, +5.0 % in INT8
/// (batch 1: +1.3 %, +0.8 %). Not cache-keyed (use `--no-cache`), like the other knobs.
pub(crate) fn stem_conv_enabled() -> bool {
    knob_on(&STEM_CONV, "KESTREL_STEM_CONV")
}

/// Whether to fuse the stem: as an engine file recorded it (its layer choices are per step, so
/// replaying them needs the same steps; files from before the stem kernel have none), else
/// [`stem_conv_enabled`].
pub(crate) fn stem_wanted(recorded: Option<&serde_json::Value>) -> bool {
    match recorded {
        Some(r) => r.get("stem_conv").and_then(serde_json::Value::as_bool) == Some(true),
        None => stem_conv_enabled(),
    }
}

thread_local! {
    // Overrides of the build knobs for the engines this thread builds (engines are built on the
    // calling thread), so that tests running side by side do not change each other's engines:
    // 0: the environment variable decides; 1: on; 2: off.
    static STEM_CONV: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    static THIN_CONV: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    static POINTWISE_CONV: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    static FUSED_CONV: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    static CONCAT_VIEWS: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Whether a build knob is on: this thread's override, else `$var` (on unless "0").
fn knob_on(over: &'static std::thread::LocalKey<std::cell::Cell<u8>>, var: &str) -> bool {
    match over.with(std::cell::Cell::get) {
        1 => true,
        2 => false,
        _ => std::env::var(var).ok().is_none_or(|v| v != "0"),
    }
}

fn set_knob(over: &'static std::thread::LocalKey<std::cell::Cell<u8>>, enabled: Option<bool>) {
    let code = match enabled {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    over.with(|c| c.set(code));
}

/// Whether engines write concat inputs and split pieces in place in the concat's buffer
/// (`eliminate_concat_copies`): yes unless `$KESTREL_CONCAT_VIEWS=0`.
pub(crate) fn concat_views_enabled() -> bool {
    knob_on(&CONCAT_VIEWS, "KESTREL_CONCAT_VIEWS")
}

/// Override `$KESTREL_CONCAT_VIEWS` for the engines the calling thread builds from now on
/// (`None`: the variable decides again). For tests that compare engines with and without copies.
pub fn set_concat_views(enabled: Option<bool>) {
    set_knob(&CONCAT_VIEWS, enabled);
}

/// Override `$KESTREL_STEM_CONV` for the engines the calling thread builds from now on (`None`:
/// the variable decides again). For tests and benchmarks that compare the two stems.
pub fn set_stem_conv(enabled: Option<bool>) {
    set_knob(&STEM_CONV, enabled);
}

/// INT8 convolution kernels and their tiles (pixels, channels), largest first.
const INT8_TILES: [(&str, usize, usize); 4] = [
    ("conv_int8_m128_n128", 128, 128),
    ("conv_int8_m128_n64", 128, 64),
    ("conv_int8_m64_n128", 64, 128),
    ("conv_int8_m64_n64", 64, 64),
];

/// One of Kestrel's thin 3x3 INT8 convolution kernels (`conv3x3_thin` in `kernels.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ThinKernel {
    name: &'static str,
    input_channels: usize,
    output_channels: usize,
    /// int8 output (requantized), else fp16.
    int8_out: bool,
}

const fn thin(
    name: &'static str,
    input_channels: usize,
    output_channels: usize,
    int8_out: bool,
) -> ThinKernel {
    ThinKernel {
        name,
        input_channels,
        output_channels,
        int8_out,
    }
}

/// The `THIN(...)` instances at the end of `kernels.cu`.
const THIN_KERNELS: [ThinKernel; 8] = [
    thin("conv3x3_thin_c32_k32_i8", 32, 32, true),
    thin("conv3x3_thin_c32_k32_f16", 32, 32, false),
    thin("conv3x3_thin_c32_k64_i8", 32, 64, true),
    thin("conv3x3_thin_c32_k64_f16", 32, 64, false),
    thin("conv3x3_thin_c64_k32_i8", 64, 32, true),
    thin("conv3x3_thin_c64_k32_f16", 64, 32, false),
    thin("conv3x3_thin_c64_k64_i8", 64, 64, true),
    thin("conv3x3_thin_c64_k64_f16", 64, 64, false),
];
/// Output rows and columns of a thin-kernel block's tile (`TH`, `THIN_TW` in `kernels.cu`); its
/// blocks have 128 threads.
const THIN_TILE: (usize, usize) = (8, 16);

impl ThinKernel {
    /// Dynamic shared memory, in bytes: two tile buffers (each the input tile with its halo, or
    /// the staged output, whichever is larger) and the filter, rows padded by 16 bytes (`2 *
    /// A_BYTES + COUT * WS` in `kernels.cu`).
    fn shared_bytes(&self) -> usize {
        let (rows, columns) = THIN_TILE;
        let halo = (rows + 2) * (columns + 2) * (self.input_channels + 16);
        let out_bytes = if self.int8_out { 1 } else { 2 };
        let staged = rows * columns * (self.output_channels * out_bytes + 16);
        2 * halo.max(staged) + self.output_channels * (9 * self.input_channels + 16)
    }
}

/// Whether `g` is a `k` x `k` convolution that keeps its input's size: padding (k - 1) / 2 on
/// every side, stride 1, no dilation, one group.
fn keeps_size(g: &ConvGeometry, k: usize) -> bool {
    g.kernel == [k, k]
        && g.pads == [(k - 1) / 2; 4]
        && g.stride == [1, 1]
        && g.dilation == [1, 1]
        && g.group == 1
}

/// The thin kernel for an INT8 convolution of `geometry` from `cin` to `cout` channels, if one
/// fits it: 3x3, padding 1, stride 1, no dilation or groups, 32 or 64 channels in and out.
fn thin_kernel(
    geometry: &ConvGeometry,
    cin: usize,
    cout: usize,
    int8_out: bool,
) -> Option<ThinKernel> {
    if !keeps_size(geometry, 3) {
        return None;
    }
    THIN_KERNELS
        .iter()
        .copied()
        .find(|t| t.input_channels == cin && t.output_channels == cout && t.int8_out == int8_out)
}

/// One of Kestrel's 1x1 INT8 convolution kernels (`conv1x1_int8` in `kernels.cu`): the implicit
/// GEMM without filter taps, its output staged for 16-byte stores. On an H200 at gelan-c batch 8
/// (bench/conv1x1-int8.sh) it takes 0.47-0.85x the implicit GEMM's time on every 1x1 shape, with
/// the same bits, and beats cuDNN's fused graph on the layers with short reductions; the engine
/// times the two per layer (bench/results/gpu-conv1x1-int8-h200-20261128T2333).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PointwiseKernel {
    name: &'static str,
    /// Output pixels and channels of a block's tile.
    tile: (usize, usize),
    /// Threads per block.
    threads: u32,
    /// Reduction tiles of 64 channels in flight.
    stages: usize,
    /// int8 output (requantized), else fp16.
    int8_out: bool,
}

impl PointwiseKernel {
    /// Dynamic shared memory, in bytes (the staged output reuses the reduction tiles).
    fn shared_bytes(&self) -> usize {
        int8_shared_bytes(self.stages, self.tile.0, self.tile.1)
    }
}

const fn pointwise(
    name: &'static str,
    tile: (usize, usize),
    threads: u32,
    stages: usize,
    int8_out: bool,
) -> PointwiseKernel {
    PointwiseKernel {
        name,
        tile,
        threads,
        stages,
        int8_out,
    }
}

/// The `CONV1X1(...)` instances in `kernels.cu`.
const POINTWISE_KERNELS: [PointwiseKernel; 6] = [
    pointwise("conv1x1_int8_m128_n64_i8", (128, 64), 256, 3, true),
    pointwise("conv1x1_int8_m128_n64_f16", (128, 64), 256, 3, false),
    pointwise("conv1x1_int8_m64_n64_i8", (64, 64), 128, 4, true),
    pointwise("conv1x1_int8_m64_n64_f16", (64, 64), 128, 4, false),
    pointwise("conv1x1_int8_m128_n32_i8", (128, 32), 128, 3, true),
    pointwise("conv1x1_int8_m128_n32_f16", (128, 32), 128, 3, false),
];

/// The 1x1 kernel for an INT8 convolution of `geometry` over `pixels` output pixels from `cin` to
/// `cout` channels, if one fits it: 1x1, stride 1, no padding, dilation or groups; `cin` a
/// multiple of 16, `cout` of 16 (int8 output) or 8 (fp16), so that every load and store is whole
/// 16-byte chunks. The tile, from the sweep on an H200 (bench/conv1x1-int8.sh): 128 x 32 for
/// 32 channels or fewer; 128 x 64 where that gives every multiprocessor two blocks; else 64 x 64.
fn pointwise_kernel(
    geometry: &ConvGeometry,
    pixels: usize,
    cin: usize,
    cout: usize,
    int8_out: bool,
    sms: usize,
) -> Option<PointwiseKernel> {
    if !keeps_size(geometry, 1)
        || !cin.is_multiple_of(16)
        || !cout.is_multiple_of(if int8_out { 16 } else { 8 })
        || pixels == 0
    {
        return None;
    }
    let tile = if cout <= 32 {
        (128, 32)
    } else if pixels.div_ceil(128) * cout.div_ceil(64) >= 2 * sms {
        (128, 64)
    } else {
        (64, 64)
    };
    POINTWISE_KERNELS
        .iter()
        .copied()
        .find(|k| k.tile == tile && k.int8_out == int8_out)
}

/// Whether INT8 engines run the 3x3 convolutions of 32 and 64 channels with Kestrel's thin
/// kernel where it times faster than cuDNN's fused graph: yes unless `$KESTREL_THIN_CONV=0`.
pub(crate) fn thin_conv_enabled() -> bool {
    knob_on(&THIN_CONV, "KESTREL_THIN_CONV")
}

/// Override `$KESTREL_FUSED_CONV` for the engines the calling thread builds from now on: `Some(false)`
/// keeps every convolution on its unfused path (Kestrel's INT8 kernels, or cuDNN's convolution
/// plus the epilogue), `Some(true)` times the fused graphs against it, `None` lets the variable
/// decide again. For tests that must run a particular kernel.
pub fn set_fused_conv(enabled: Option<bool>) {
    set_knob(&FUSED_CONV, enabled);
}

/// Override `$KESTREL_THIN_CONV` for the engines the calling thread builds from now on (`None`:
/// the variable decides again). For tests and benchmarks that compare the kernels.
pub fn set_thin_conv(enabled: Option<bool>) {
    set_knob(&THIN_CONV, enabled);
}

/// Whether INT8 engines run 1x1 convolutions with Kestrel's 1x1 kernel ([`PointwiseKernel`])
/// rather than the implicit GEMM, where cuDNN's fused graph does not time faster: yes unless
/// `$KESTREL_POINTWISE_CONV=0`.
pub(crate) fn pointwise_conv_enabled() -> bool {
    knob_on(&POINTWISE_CONV, "KESTREL_POINTWISE_CONV")
}

/// Override `$KESTREL_POINTWISE_CONV` for the engines the calling thread builds from now on
/// (`None`: the variable decides again). For tests and benchmarks that compare the kernels.
pub fn set_pointwise_conv(enabled: Option<bool>) {
    set_knob(&POINTWISE_CONV, enabled);
}

/// An OIHW (ONNX) filter with every value moved to `to(o, i, y, x)`.
fn reorder_oihw<T: Copy + Default>(
    values: &[T],
    dims: &[usize],
    to: impl Fn(usize, usize, usize, usize) -> usize,
) -> Vec<T> {
    let [k, cin, r, sdim] = [dims[0], dims[1], dims[2], dims[3]];
    let mut out = vec![T::default(); values.len()];
    for ko in 0..k {
        for ci in 0..cin {
            for y in 0..r {
                for x in 0..sdim {
                    out[to(ko, ci, y, x)] = values[((ko * cin + ci) * r + y) * sdim + x];
                }
            }
        }
    }
    out
}

/// A stem filter (OIHW, 3 input channels, 3x3) as the `stem_conv_*` kernels read it: per output
/// channel its 27 taps in OIHW order (the GEMM's reduction) and 5 zeros, as fp16 bits.
fn stem_filter_rows(values: &[f32], dims: &[usize]) -> Vec<u16> {
    const TAPS: usize = 27;
    const ROW: usize = 32;
    let k = dims[0];
    let mut rows = vec![0u16; k * ROW];
    for (ko, taps) in values.chunks_exact(TAPS).take(k).enumerate() {
        for (t, &v) in taps.iter().enumerate() {
            rows[ko * ROW + t] = f32_to_f16_bits(v);
        }
    }
    rows
}

/// OIHW (ONNX) filters to KRSC (channels-last filters).
fn oihw_to_krsc<T: Copy + Default>(values: &[T], dims: &[usize]) -> Vec<T> {
    let [cin, r, sdim] = [dims[1], dims[2], dims[3]];
    reorder_oihw(values, dims, |ko, ci, y, x| {
        ((ko * r + y) * sdim + x) * cin + ci
    })
}

/// The fused-convolution choices of an engine file's `layer_choices` (see
/// [`CudaEngine::layer_choices`]): (step, bucket) → plan label, for exactly `buckets`; `None` when
/// the record has none or was made for other buckets (then the build times again).
fn recorded_fused_choices(
    recorded: &serde_json::Value,
    buckets: &[usize],
) -> Option<HashMap<(usize, usize), String>> {
    let per_bucket = recorded.get("fused_convolutions")?.as_object()?;
    if per_bucket.len() != buckets.len() {
        return None;
    }
    let mut out = HashMap::new();
    for &b in buckets {
        for (step, label) in per_bucket.get(&b.to_string())?.as_object()? {
            out.insert((step.parse().ok()?, b), label.as_str()?.to_string());
        }
    }
    Some(out)
}

impl CudaEngine {
    /// Build an engine for `model` on GPU `ordinal`; `recorded`: the layer choices of the engine
    /// file it comes from (made by the same libraries on the same kind of GPU), replayed instead
    /// of timed.
    pub fn new(
        model: &pb::ModelProto,
        info: EngineInfo,
        _path: &Path,
        recorded: Option<&serde_json::Value>,
        ordinal: usize,
    ) -> Result<Self> {
        // fp32 is the debugging mode; int8 and best keep every non-INT8 layer in fp16.
        let half = info.precision != Precision::Fp32;
        let int8 = matches!(info.precision, Precision::Int8 | Precision::Best);
        let ctx = device::context(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_error("compute capability", e))?;
        let sm_count = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_error("multiprocessor count", e))?
            .max(1) as usize;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let int8_stages = device::int8_stages();
        let ptx = compile_kernels(Some(arch), int8_stages)?;
        let kernels = Kernels::load(&ptx)?;
        let mut functions = HashMap::new();
        for name in KERNEL_NAMES {
            functions.insert(name, kernels.function(name)?);
        }
        let thin = THIN_KERNELS.iter().map(|t| (t.name, t.shared_bytes()));
        let tiles = INT8_TILES
            .iter()
            .map(|&(name, bm, bn)| (name, int8_shared_bytes(int8_stages, bm, bn)));
        let pointwise = POINTWISE_KERNELS.iter().map(|k| (k.name, k.shared_bytes()));
        for (name, bytes) in tiles.chain(thin).chain(pointwise) {
            let bytes = bytes as i32;
            // SAFETY: a function of the loaded module; the attribute only raises its limit.
            unsafe {
                drv::function::set_function_attribute(
                    functions[name],
                    dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
            }
            .map_err(|e| cuda_error(&format!("shared memory of {name} ({bytes} bytes)"), e))?;
        }
        let mut thin_blocks_per_sm = HashMap::new();
        for t in THIN_KERNELS {
            // SAFETY: a function of the loaded module, with its shared memory limit raised above.
            let blocks = unsafe {
                drv::occupancy::max_active_block_per_multiprocessor(
                    functions[t.name],
                    128,
                    t.shared_bytes(),
                )
            }
            .map_err(|e| cuda_error(&format!("occupancy of {}", t.name), e))?;
            thin_blocks_per_sm.insert(t.name, blocks.max(1) as usize);
        }
        let mut plan = plan::lower(model, int8)?;
        let stem_fused = half && stem_wanted(recorded) && plan.fuse_stem();
        if info.precision == Precision::Int8 && plan.int8_convolutions() == 0 {
            return Err(Error::InvalidArgument(
                "precision int8 needs a Q/DQ model (QuantizeLinear/DequantizeLinear around the \
                 convolutions) and this one has no convolution the INT8 kernel can run: make one \
                 with `kestrel quantize --onnx MODEL --calibrate IMAGES_DIR`, or build with \
                 --precision fp16 (or best, which uses INT8 wherever a model allows it)"
                    .into(),
            ));
        }
        let stream = Stream::new()?;
        let dnn = Dnn::new(stream.0)?;
        let buckets = batch_buckets(info.profile.min, info.profile.max);
        let max_b = info.profile.max;

        // Memory: one buffer per stored value that a step reads or writes, sized for the largest
        // bucket (fused passes, the stem's and the DFL's, leave their former intermediates unused).
        let used: std::collections::HashSet<ValueId> = plan
            .steps
            .iter()
            .flat_map(|s| s.inputs().into_iter().chain([s.output()]))
            .chain([plan.input, plan.output])
            .chain(plan.prototypes)
            .map(|v| plan.storage_of(v))
            .collect();
        let mut buffers = Vec::with_capacity(plan.values.len());
        for (i, v) in plan.values.iter().enumerate() {
            if v.alias_of.is_some()
                || v.constant.is_some()
                || plan.storage_of(i) != i
                || !used.contains(&i)
            {
                buffers.push(None);
                continue;
            }
            buffers.push(Some(DeviceBuffer::new(
                v.numel(max_b) * element_bytes(v.layout, half),
            )?));
        }
        let constants = plan
            .constants
            .iter()
            .map(|c| DeviceBuffer::from_slice(&c.values))
            .collect::<Result<Vec<_>>>()?;
        // Trunk convolution weights in KRSC (channels-last filters) and the trunk's precision.
        let mut weights = HashMap::new();
        let mut int8_scales = HashMap::new();
        for (i, s) in plan.steps.iter().enumerate() {
            if let Step::Conv { int8: Some(q), .. } = s {
                let qw = &plan.quantized_weights[q.weight];
                weights.insert(
                    i,
                    DeviceBuffer::from_slice(&oihw_to_krsc(&qw.values, &qw.dims))?,
                );
                let scales: Vec<f32> = qw.scales.iter().map(|s| s * q.input_scale).collect();
                int8_scales.insert(i, DeviceBuffer::from_slice(&scales)?);
                continue;
            }
            if let Step::StemConv { weight, .. } = s {
                let c = &plan.constants[*weight];
                weights.insert(
                    i,
                    DeviceBuffer::from_slice(&stem_filter_rows(&c.values, &c.dims))?,
                );
                continue;
            }
            if let Step::Conv {
                weight,
                layout: Layout::Nhwc,
                ..
            } = s
            {
                let c = &plan.constants[*weight];
                let krsc = oihw_to_krsc(&c.values, &c.dims);
                let buf = if half {
                    let bits: Vec<u16> = krsc.iter().map(|&v| f32_to_f16_bits(v)).collect();
                    DeviceBuffer::from_slice(&bits)?
                } else {
                    DeviceBuffer::from_slice(&krsc)?
                };
                weights.insert(i, buf);
            }
        }
        let per_in = info.input_len();
        let per_out = info.output_len();
        let mut engine = Self {
            post: None,
            letterboxer: None,
            stage_times: None,
            pipeline: None,
            masks: None,
            mask_jobs: MaskJobs::default(),
            graphs: HashMap::new(),
            conv_plans: HashMap::new(),
            fused: HashMap::new(),
            fused_out_scales: HashMap::new(),
            fused_workspace: DeviceBuffer::new(0)?,
            views: HashMap::new(),
            skipped: std::collections::HashSet::new(),
            split_copies_dropped: 0,
            meta: HashMap::new(),
            weights,
            int8_scales,
            constants,
            buffers,
            workspace: DeviceBuffer::new(0)?,
            pinned_in: PinnedBuffer::new(max_b * per_in * 4)?,
            pinned_out: PinnedBuffer::new(max_b * per_out * 4)?,
            pinned_protos: PinnedBuffer::new(max_b * info.prototypes.map_or(0, |p| p.len()) * 4)?,
            prototypes: Vec::new(),
            functions,
            _kernels: kernels,
            dnn,
            stream,
            ctx,
            plan,
            half,
            buckets: buckets.clone(),
            info,
            output: Vec::new(),
            device_name,
            sm_count,
            stem_fused,
            forced_int8_tile: forced_int8_tile(),
            thin_conv: thin_conv_enabled(),
            thin_blocks_per_sm,
            pointwise_conv: pointwise_conv_enabled(),
            int8_stages,
            recorded_fused: recorded.and_then(|r| recorded_fused_choices(r, &buckets)),
            fused_selection: "timed".into(),
            end_to_end: None,
        };
        engine.prepare_buckets()?;
        engine.choose_fused_convolutions()?;
        engine.eliminate_concat_copies()?;
        let graphs_on = std::env::var("KESTREL_CUDA_GRAPHS")
            .map(|v| v != "0")
            .unwrap_or(true);
        for &b in &buckets {
            // Warm up eagerly (module and cuDNN lazy initialisation), then capture.
            engine.enqueue(b)?;
            engine.stream.synchronize()?;
            if graphs_on {
                let exec = engine.capture(b)?;
                engine.graphs.insert(b, exec);
            }
        }
        Ok(engine)
    }

    /// This engine (built on an end-to-end model's plain part) as the end-to-end model `info`
    /// describes: `run_end_to_end` returns its outputs, decode and NMS on this GPU with the
    /// graph's thresholds and K, masks assembled on the host ([`crate::end_to_end`]).
    pub fn with_end_to_end(mut self, info: EngineInfo) -> Result<Self> {
        let e = info.end_to_end.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!("{} is not an end-to-end model", info.model_name))
        })?;
        if e.masks.is_some() != self.info.prototypes.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: det_masks and the plain part's prototypes disagree",
                info.model_name
            )));
        }
        let nms = crate::end_to_end::graph_nms(e);
        nms.validate().map_err(|err| Error::Model {
            path: info.model_name.clone().into(),
            message: format!("its end-to-end settings: {err}"),
        })?;
        self.end_to_end = Some(EndToEndState {
            info,
            nms,
            kept: Vec::new(),
            buffers: EndToEndBuffers::new(),
        });
        Ok(self)
    }

    /// End-to-end models return detections, not `output0` (as the cpu backend says).
    fn refuse_end_to_end(&self) -> Result<()> {
        match &self.end_to_end {
            Some(e) => Err(Error::InvalidArgument(format!(
                "{} is an end-to-end model (NMS inside): it returns detections, not output0; \
                 run it through the detector (kestrel infer/val) or Engine::run_end_to_end",
                e.info.model_name
            ))),
            None => Ok(()),
        }
    }

    /// One batch of an end-to-end model into `e.buffers`.
    fn end_to_end_batch(
        &mut self,
        e: &mut EndToEndState,
        input: &[f32],
        batch: usize,
    ) -> Result<()> {
        // Segmentation models need the coefficients and prototypes on the host for the masks.
        let output_ptr = if self.info.prototypes.is_some() {
            self.run_downloading(input, batch, true)?;
            self.ptr(self.plan.output)?
        } else {
            let ptr = self.launch_batch(Some(input), batch)?;
            // The post-processor runs on its own stream: the engine's output must be complete.
            self.stream.synchronize()?;
            ptr
        };
        let input_hw = self.info.input_hw;
        self.post()?
            .run_device_input_boxes(output_ptr, batch, input_hw, &e.nms, &mut e.kept)?;
        e.buffers.clear();
        let (len, channels, anchors) = (
            self.info.output_len(),
            self.info.output_channels,
            self.info.anchors,
        );
        for (i, kept) in e.kept.iter().enumerate().take(batch) {
            let head = self.info.prototypes.map(|shape| ImageHead {
                head: &self.output[i * len..(i + 1) * len],
                channels,
                anchors,
                prototypes: &self.prototypes[i * shape.len()..(i + 1) * shape.len()],
                shape,
                input_hw,
            });
            e.buffers
                .push_image(e.nms.max_detections, kept, head.as_ref())?;
        }
        Ok(())
    }

    fn shape(&self, v: ValueId, b: usize) -> Vec<usize> {
        self.plan.values[v].shape(b)
    }

    /// Convolution plans and kernel metadata for every bucket; the shared workspace.
    fn prepare_buckets(&mut self) -> Result<()> {
        let mut workspace = 0;
        // cuDNN's heuristics by default: on an H200, timing every algorithm with
        // cudnnFindConvolutionForwardAlgorithmEx made gelan-c slower (b1 5.26 ms vs 2.21 ms, b8
        // 12.7 ms vs 9.0 ms). KESTREL_CUDA_ALGO=timed turns timing on for experiments.
        let timed = std::env::var("KESTREL_CUDA_ALGO").is_ok_and(|v| v == "timed");
        let scratch = if timed {
            Some(DeviceBuffer::new(conv::WORKSPACE_LIMIT)?)
        } else {
            None
        };
        for &b in &self.buckets.clone() {
            for (i, s) in self.plan.steps.iter().enumerate() {
                match s {
                    Step::Conv {
                        x,
                        y,
                        geometry,
                        layout,
                        int8: None,
                        ..
                    } => {
                        let xs = self.shape(*x, b);
                        let ys = self.shape(*y, b);
                        let shape = ConvShape {
                            x: [xs[0], xs[1], xs[2], xs[3]],
                            y: [ys[0], ys[1], ys[2], ys[3]],
                        };
                        let half = self.half && *layout == Layout::Nhwc;
                        let mut cp = ConvPlan::new(&self.dnn, shape, geometry, *layout, half)?;
                        if let Some(ws) = &scratch {
                            let w = match self.weights.get(&i) {
                                Some(w) => w.ptr,
                                None => match s {
                                    Step::Conv { weight, .. } => self.constants[*weight].ptr,
                                    _ => 0,
                                },
                            };
                            cp.choose_fastest(
                                &self.dnn,
                                self.ptr(*x)?,
                                w,
                                self.ptr(*y)?,
                                ws.ptr,
                                ws.bytes,
                            )?;
                        }
                        workspace = workspace.max(cp.workspace);
                        self.conv_plans.insert((i, b), cp);
                    }
                    Step::Binary { a, b: bb, y, .. } => {
                        let (sa, sb, sy) =
                            (self.shape(*a, b), self.shape(*bb, b), self.shape(*y, b));
                        if sa != sb || self.plan.values[*a].layout != self.plan.values[*bb].layout {
                            let meta = broadcast_meta(&sa, &sb, &sy);
                            self.meta.insert((i, b), DeviceBuffer::from_slice(&meta)?);
                        }
                    }
                    Step::Transpose { x, perm, .. } => {
                        let sx = self.shape(*x, b);
                        let meta = transpose_meta(&sx, perm);
                        self.meta.insert((i, b), DeviceBuffer::from_slice(&meta)?);
                    }
                    _ => {}
                }
            }
        }
        self.workspace = DeviceBuffer::new(workspace)?;
        Ok(())
    }

    /// Like TensorRT's tactic timing: for every convolution in the NHWC trunk and every bucket,
    /// describe it as one cuDNN fused graph (convolution, scale, bias, activation, residual,
    /// requantize), time the best engines cuDNN's heuristics offer against the step as the plan
    /// runs it otherwise (Kestrel's INT8 kernel, or cuDNN's convolution plus the epilogue kernel),
    /// and keep the faster. `$KESTREL_FUSED_CONV`: `auto` (default), `off`, or `force` (use a
    /// fused graph wherever one exists, for testing it).
    fn choose_fused_convolutions(&mut self) -> Result<()> {
        let mode = match FUSED_CONV.with(std::cell::Cell::get) {
            1 => "auto".into(),
            2 => "off".into(),
            _ => std::env::var("KESTREL_FUSED_CONV").unwrap_or_else(|_| "auto".into()),
        };
        let force = match mode.as_str() {
            "off" | "0" => return Ok(()),
            "force" => true,
            _ => false,
        };
        if !self.half {
            return Ok(());
        }
        self.fused_workspace = DeviceBuffer::new(FUSED_WORKSPACE_LIMIT)?;
        let started = std::time::Instant::now();
        let (mut tried, mut kept) = (0usize, 0usize);
        // Per distinct spec: the fastest fused plan (unbound) with its time and the current path's.
        let mut by_spec: HashMap<String, Option<(FusedConvPlan, f64, f64)>> = HashMap::new();
        let candidates = std::env::var("KESTREL_FUSED_CANDIDATES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(FUSED_CANDIDATES);
        let buckets = self.buckets.clone();
        let recorded = self.recorded_fused.take();
        let mut retimed = 0usize;
        for i in 0..self.plan.steps.len() {
            if self.fused_spec(i, buckets[0]).is_none() {
                continue;
            }
            if let Some(r) = &recorded
                && !r.contains_key(&(i, buckets[0]))
            {
                // The engine file's build kept this layer's current implementation.
                continue;
            }
            if let Step::Conv {
                y,
                int8:
                    Some(Int8Conv {
                        output_scale: Some(s),
                        ..
                    }),
                ..
            } = &self.plan.steps[i]
            {
                let inv = vec![1.0 / s; self.plan.values[*y].shape(1)[1]];
                self.fused_out_scales
                    .insert(i, DeviceBuffer::from_slice(&inv)?);
            }
            tried += 1;
            let pointers = self.fused_pointers(i)?;
            if let Some(r) = &recorded {
                match self.replay_fused(i, r, pointers)? {
                    Some(chosen) => {
                        kept += 1;
                        for (b, p) in chosen {
                            self.fused.insert((i, b), p);
                        }
                        continue;
                    }
                    // cuDNN here no longer offers that plan: time the layer as a build would.
                    None => retimed += 1,
                }
            }
            // One implementation for every bucket of a layer (decided on the sum of their times),
            // so a batch gives each image what it gets alone up to the bucket's own rounding.
            let (mut chosen, mut fused_ms, mut current_ms) = (Vec::new(), 0.0, 0.0);
            for &b in &buckets {
                let Some(spec) = self.fused_spec(i, b) else {
                    break;
                };
                let key = format!("{spec:?}");
                if !by_spec.contains_key(&key) {
                    let timed =
                        self.time_fused_candidates(i, b, spec, pointers, candidates, force)?;
                    by_spec.insert(key.clone(), timed);
                }
                let Some(Some((p, f, c))) = by_spec.get(&key) else {
                    break;
                };
                let mut p = p.share();
                p.bind(pointers)?;
                fused_ms += f;
                current_ms += c;
                chosen.push((b, p));
            }
            if chosen.len() == buckets.len() && fused_ms < current_ms {
                kept += 1;
                for (b, p) in chosen {
                    self.fused.insert((i, b), p);
                }
            }
        }
        if recorded.is_some() {
            self.fused_selection = if retimed == 0 {
                "replayed".into()
            } else {
                format!("replayed; {retimed} layers timed again (their recorded plan is gone)")
            };
        }
        if std::env::var_os("KESTREL_FUSED_CONV_LOG").is_some() {
            eprintln!(
                "fused convolutions ({}): {kept} of {tried} layers, {} distinct specs timed, \
                 {:.1} s",
                self.fused_selection,
                by_spec.len(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// The fused plans `recorded` names for step `i` in every bucket, built without timing and
    /// bound to the step's buffers; `None` when one of them cannot be built again here.
    fn replay_fused(
        &self,
        i: usize,
        recorded: &HashMap<(usize, usize), String>,
        pointers: FusedConvPointers,
    ) -> Result<Option<Vec<(usize, FusedConvPlan)>>> {
        let mut chosen = Vec::with_capacity(self.buckets.len());
        for &b in &self.buckets {
            let (Some(spec), Some(label)) = (self.fused_spec(i, b), recorded.get(&(i, b))) else {
                return Ok(None);
            };
            let Ok(graph) = FusedConvGraph::new(&self.dnn, spec) else {
                return Ok(None);
            };
            let Some(mut p) = std::sync::Arc::new(graph).plan_labelled(
                &self.dnn,
                label,
                FUSED_WORKSPACE_LIMIT,
            )?
            else {
                return Ok(None);
            };
            if p.bind(pointers).is_err() {
                return Ok(None);
            }
            chosen.push((b, p));
        }
        Ok(Some(chosen))
    }

    /// Build up to `candidates` fused plans for step `i` at bucket `b` and time them against the
    /// step's current implementation (skipped when `force`): the fastest plan (unbound), its time
    /// and the current time in milliseconds. `None` where cuDNN has no fused engine for the layer.
    fn time_fused_candidates(
        &self,
        i: usize,
        b: usize,
        spec: FusedConvSpec,
        pointers: FusedConvPointers,
        candidates: usize,
        force: bool,
    ) -> Result<Option<(FusedConvPlan, f64, f64)>> {
        let Ok(graph) = FusedConvGraph::new(&self.dnn, spec) else {
            return Ok(None);
        };
        let Ok(plans) =
            std::sync::Arc::new(graph).plans(&self.dnn, candidates, FUSED_WORKSPACE_LIMIT)
        else {
            return Ok(None);
        };
        let current = if force {
            f64::INFINITY
        } else {
            self.time_ms(|| self.enqueue_step(i, b))?
        };
        let mut best: Option<(f64, FusedConvPlan)> = None;
        for mut p in plans {
            if p.bind(pointers).is_err() {
                continue;
            }
            // An engine that fails to run is skipped like one that is slow.
            let Ok(ms) = self.time_ms(|| p.run(&self.dnn)) else {
                continue;
            };
            if best.as_ref().is_none_or(|(t, _)| ms < *t) {
                best = Some((ms, p));
            }
        }
        Ok(best.map(|(ms, p)| (p.share(), ms, current)))
    }

    /// The fused-graph description of convolution step `i` at batch `b`, with the channel strides
    /// of concat views; `None` for convolutions outside the NHWC trunk.
    fn fused_spec(&self, i: usize, b: usize) -> Option<FusedConvSpec> {
        let Step::Conv {
            x,
            y,
            bias,
            act,
            residual,
            geometry,
            layout,
            int8,
            ..
        } = &self.plan.steps[i]
        else {
            return None;
        };
        let input = match (int8, layout) {
            (Some(_), _) => Storage::Int8,
            (None, Layout::Nhwc) if self.half => Storage::Half,
            _ => return None,
        };
        let out_scale = int8.as_ref().and_then(|q| q.output_scale);
        let (xs, ys) = (self.shape(*x, b), self.shape(*y, b));
        Some(FusedConvSpec {
            shape: ConvShape {
                x: [xs[0], xs[1], xs[2], xs[3]],
                y: [ys[0], ys[1], ys[2], ys[3]],
            },
            x_channel_stride: self.views.get(x).map_or(xs[1], |v| v.channel_stride),
            y_channel_stride: self.views.get(y).map_or(ys[1], |v| v.channel_stride),
            geometry: *geometry,
            input,
            output: if out_scale.is_some() {
                Storage::Int8
            } else {
                Storage::Half
            },
            channel_scale: int8.is_some(),
            bias: bias.is_some(),
            act: *act,
            residual: residual.is_some(),
            output_scale: out_scale.is_some(),
        })
    }

    /// The buffers of convolution step `i` for its fused graph.
    fn fused_pointers(&self, i: usize) -> Result<FusedConvPointers> {
        let Step::Conv {
            x,
            y,
            bias,
            residual,
            ..
        } = &self.plan.steps[i]
        else {
            return Err(cuda_error(
                "executor",
                "fused pointers of a non-convolution",
            ));
        };
        Ok(FusedConvPointers {
            x: self.ptr(*x)?,
            w: self
                .weights
                .get(&i)
                .map(|w| w.ptr)
                .ok_or_else(|| cuda_error("executor", "missing trunk filter"))?,
            y: self.ptr(*y)?,
            scale: self.int8_scales.get(&i).map_or(0, |s| s.ptr),
            bias: bias.map_or(0, |c| self.constants[c].ptr),
            residual: self.ptr_or_null(*residual)?,
            output_scale: self.fused_out_scales.get(&i).map_or(0, |s| s.ptr),
            workspace: self.fused_workspace.ptr,
        })
    }

    /// Concatenation without copies: where a concat input is written by a fused convolution
    /// (or the thin INT8 kernel) and read only by the concat and by such convolutions (as their
    /// input), that convolution writes straight into its channel slice of the concat's buffer,
    /// its readers read the slice in place (cuDNN tensors, or the thin kernel's pixel strides,
    /// with the concat's channel stride), and the copy is dropped. Then the same for splits
    /// ([`Self::eliminate_split_copies`]). `$KESTREL_CONCAT_VIEWS=0` keeps every copy.
    fn eliminate_concat_copies(&mut self) -> Result<()> {
        if !concat_views_enabled() {
            return Ok(());
        }
        let (readers, writers) = self.readers_and_writers();
        let mut plans_by_spec: HashMap<String, FusedConvPlan> = HashMap::new();
        let mut made = 0usize;
        for c in 0..self.plan.steps.len() {
            let Step::CopyAxis {
                x: v,
                y: cat,
                axis: 1,
                in_offset: 0,
                out_offset,
                count,
            } = self.plan.steps[c]
            else {
                continue;
            };
            let Some(view) = self.concat_view(v, cat, out_offset, count) else {
                continue;
            };
            let Some(&[producer]) = writers.get(&v).map(Vec::as_slice) else {
                continue;
            };
            let others: Vec<usize> = readers
                .get(&v)
                .map(|r| r.iter().copied().filter(|&r| r != c).collect())
                .unwrap_or_default();
            if !self.writes_strided(producer, v)
                || !others.iter().all(|&r| self.reads_strided(r, v))
            {
                continue;
            }
            let layers: Vec<usize> = std::iter::once(producer).chain(others).collect();
            if self.place_views(&[(v, view)], &layers, &mut plans_by_spec) {
                self.skipped.insert(c);
                made += 1;
            }
        }
        self.split_copies_dropped =
            self.eliminate_split_copies(&readers, &writers, &mut plans_by_spec);
        if std::env::var_os("KESTREL_FUSED_CONV_LOG").is_some() {
            eprintln!(
                "concat copies written in place: {made}; split and concat copies of split pieces: {}",
                self.split_copies_dropped
            );
        }
        Ok(())
    }

    /// Splits without copies. GELAN's RepNCSPELAN4 splits its first convolution's output into
    /// channel halves and concatenates both halves, with later outputs, into one tensor: two
    /// split copies and two concat copies of the same bytes. Where a convolution's output is read
    /// only by split copies, and each piece only by one copy into the same concat (at the piece's
    /// offset from a common base) and by convolutions as their input, the convolution writes
    /// straight into the concat's buffer, the pieces are views of it, and all those copies are
    /// dropped. Returns the number of copies dropped.
    fn eliminate_split_copies(
        &mut self,
        readers: &HashMap<ValueId, Vec<usize>>,
        writers: &HashMap<ValueId, Vec<usize>>,
        plans_by_spec: &mut HashMap<String, FusedConvPlan>,
    ) -> usize {
        let mut dropped = 0;
        // In step order, so that builds decide alike.
        let mut sources: Vec<(&ValueId, &Vec<usize>)> = readers.iter().collect();
        sources.sort_by_key(|(_, r)| r.first().copied());
        for (&v, splits) in sources {
            let Some(&[producer]) = writers.get(&v).map(Vec::as_slice) else {
                continue;
            };
            if !self.writes_strided(producer, v) {
                continue;
            }
            // Every reader of `v` is a split copy: (step, piece, offset in `v`, channels).
            let pieces: Option<Vec<(usize, ValueId, usize, usize)>> = splits
                .iter()
                .map(|&s| match self.plan.steps[s] {
                    Step::CopyAxis {
                        x,
                        y,
                        axis: 1,
                        in_offset,
                        out_offset: 0,
                        count,
                    } if x == v && self.plan.values[y].alias_of.is_none() => {
                        Some((s, y, in_offset, count))
                    }
                    _ => None,
                })
                .collect();
            let Some(pieces) = pieces.filter(|p| !p.is_empty()) else {
                continue;
            };
            let channels = self.plan.values[v].dims.get(1).and_then(|d| d.fixed());
            let covered: usize = pieces.iter().map(|p| p.3).sum();
            if channels != Some(covered as i64) {
                continue;
            }
            // Each piece: one writer (its split), one concat copy into the common buffer, and
            // convolutions that read it as their input.
            let mut base: Option<(ValueId, usize)> = None;
            let mut views = Vec::new();
            let mut layers = vec![producer];
            let mut copies = Vec::new();
            let fits = pieces.iter().all(|&(split, piece, offset, count)| {
                if writers.get(&piece).map(Vec::as_slice) != Some(&[split][..]) {
                    return false;
                }
                let mut concat = None;
                for &r in readers.get(&piece).map(Vec::as_slice).unwrap_or(&[]) {
                    match self.plan.steps[r] {
                        Step::CopyAxis {
                            x,
                            y: cat,
                            axis: 1,
                            in_offset: 0,
                            out_offset,
                            count: n,
                        } if x == piece && concat.is_none() && n == count => {
                            concat = Some((r, cat, out_offset));
                        }
                        _ if self.reads_strided(r, piece) => layers.push(r),
                        _ => return false,
                    }
                }
                let Some((copy, cat, out_offset)) = concat else {
                    return false;
                };
                let Some(start) = out_offset.checked_sub(offset) else {
                    return false;
                };
                if *base.get_or_insert((cat, start)) != (cat, start) {
                    return false;
                }
                let Some(view) = self.concat_view(piece, cat, out_offset, count) else {
                    return false;
                };
                views.push((piece, view));
                copies.extend([split, copy]);
                true
            });
            let Some((cat, start)) = base.filter(|_| fits) else {
                continue;
            };
            let Some(view) = self.concat_view(v, cat, start, covered) else {
                continue;
            };
            views.push((v, view));
            if self.place_views(&views, &layers, plans_by_spec) {
                dropped += copies.len();
                self.skipped.extend(copies);
            }
        }
        dropped
    }

    /// The steps that read and write each stored value, by storage.
    fn readers_and_writers(&self) -> (HashMap<ValueId, Vec<usize>>, HashMap<ValueId, Vec<usize>>) {
        let mut readers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        let mut writers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, s) in self.plan.steps.iter().enumerate() {
            for v in s.inputs() {
                readers.entry(self.plan.storage_of(v)).or_default().push(i);
            }
            writers
                .entry(self.plan.storage_of(s.output()))
                .or_default()
                .push(i);
        }
        (readers, writers)
    }

    /// Whether step `i` runs as a fused cuDNN graph at every bucket, or on Kestrel's thin or 1x1
    /// INT8 kernels at every bucket: the implementations that take channel strides.
    fn strided_everywhere(&self, i: usize) -> bool {
        let fused = |b: &usize| self.fused.contains_key(&(i, *b));
        self.buckets.iter().all(fused)
            || self.buckets.iter().all(|b| {
                !fused(b)
                    && (self.thin_kernel_of(i, *b).is_some()
                        || self.pointwise_kernel_of(i, *b).is_some())
            })
    }

    /// Whether step `i` is a convolution that writes `v` and can write it with a channel stride.
    fn writes_strided(&self, i: usize, v: ValueId) -> bool {
        matches!(&self.plan.steps[i], Step::Conv { y, residual, .. }
            if *y == v && *residual != Some(v))
            && self.strided_everywhere(i)
    }

    /// Whether step `i` is a convolution that reads `v` only as its input, with a channel stride.
    fn reads_strided(&self, i: usize, v: ValueId) -> bool {
        matches!(&self.plan.steps[i], Step::Conv { x, residual, .. }
            if *x == v && *residual != Some(v))
            && self.strided_everywhere(i)
    }

    /// `v` (`count` channels) as channels `offset..` of `cat`'s buffer, if both are trunk tensors
    /// (int8 or fp16 NHWC) of one layout whose slices start and end on 16-byte boundaries, and
    /// neither is already a view, an alias, a constant or the plan's output.
    fn concat_view(
        &self,
        v: ValueId,
        cat: ValueId,
        offset: usize,
        count: usize,
    ) -> Option<ConcatView> {
        let values = &self.plan.values;
        let elem = element_bytes(values[v].layout, self.half);
        let channels = |id: ValueId| values[id].dims.get(1).and_then(|d| d.fixed());
        let (cv, ct) = (channels(v)?, channels(cat)?);
        let aliased = |id: ValueId| values.iter().any(|w| w.alias_of == Some(id));
        let fits = elem != 4
            && values[cat].layout == values[v].layout
            && count as i64 == cv
            && offset as i64 + cv <= ct
            && (offset * elem).is_multiple_of(16)
            && (ct as usize * elem).is_multiple_of(16)
            && v != self.plan.output
            && !aliased(v)
            && values[v].alias_of.is_none()
            && values[v].constant.is_none()
            && self.plan.storage_of(cat) == cat
            && !self.views.contains_key(&cat)
            && !self.views.contains_key(&v);
        fits.then_some(ConcatView {
            buffer: cat,
            channel_offset: offset,
            channel_stride: ct as usize,
        })
    }

    /// Puts `views` in place and rebuilds the fused plans of `layers` (the views' writers and
    /// readers) with the strided tensors, at every bucket; on any failure undoes it all and
    /// returns false.
    fn place_views(
        &mut self,
        views: &[(ValueId, ConcatView)],
        layers: &[usize],
        plans_by_spec: &mut HashMap<String, FusedConvPlan>,
    ) -> bool {
        for &(v, view) in views {
            self.views.insert(v, view);
        }
        let buckets = self.buckets.clone();
        let mut rebuilt = Vec::new();
        for &s in layers {
            if !buckets.iter().all(|b| self.fused.contains_key(&(s, *b))) {
                continue;
            }
            for &b in &buckets {
                match self.build_fused(s, b, plans_by_spec) {
                    Ok(p) => rebuilt.push(((s, b), p)),
                    Err(_) => {
                        for (v, _) in views {
                            self.views.remove(v);
                        }
                        return false;
                    }
                }
            }
        }
        for (key, p) in rebuilt {
            self.fused.insert(key, p);
        }
        true
    }

    /// The first fused plan cuDNN offers for step `i` at bucket `b` (shared by identical specs),
    /// bound to the step's buffers.
    fn build_fused(
        &self,
        i: usize,
        b: usize,
        by_spec: &mut HashMap<String, FusedConvPlan>,
    ) -> Result<FusedConvPlan> {
        let spec = self
            .fused_spec(i, b)
            .ok_or_else(|| cuda_error("executor", "not a trunk convolution"))?;
        let key = format!("{spec:?}");
        let mut p = match by_spec.get(&key) {
            Some(p) => p.share(),
            None => {
                let graph = FusedConvGraph::new(&self.dnn, spec)?;
                let p = std::sync::Arc::new(graph)
                    .plans(&self.dnn, 1, FUSED_WORKSPACE_LIMIT)?
                    .pop()
                    .ok_or_else(|| cuda_error("fused convolution", "no engine"))?;
                by_spec.insert(key, p.share());
                p
            }
        };
        p.bind(self.fused_pointers(i)?)?;
        Ok(p)
    }

    /// Device time of `enqueue` after one warm-up, in milliseconds: the mean of a few
    /// back-to-back runs, the lowest of three such rounds. Builds still choose differently on
    /// layers of a few microseconds: on an H200 one gelan-c build kept Kestrel's kernel on four
    /// 20x20 layers where cuDNN's fused graph, chosen by the next build, was 25 % faster
    /// (bench/results/gpu-thin-int8-h200-20261128T1930, int8-variants-final.json).
    fn time_ms(&self, enqueue: impl Fn() -> Result<()>) -> Result<f64> {
        const REPEATS: usize = 5;
        enqueue()?;
        self.stream.synchronize()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            best = best.min(self.event_ms(REPEATS, &enqueue)? / REPEATS as f64);
        }
        Ok(best)
    }

    /// Device time of `repeats` back-to-back calls of `enqueue` between two events, in
    /// milliseconds (all of them together).
    fn event_ms(&self, repeats: usize, enqueue: impl Fn() -> Result<()>) -> Result<f64> {
        let (start, end) = (Event::new()?, Event::new()?);
        // SAFETY: live events and stream.
        unsafe { drv::event::record(start.0, self.stream.0) }
            .map_err(|e| cuda_error("recording an event", e))?;
        for _ in 0..repeats {
            enqueue()?;
        }
        // SAFETY: as above.
        unsafe { drv::event::record(end.0, self.stream.0) }
            .map_err(|e| cuda_error("recording an event", e))?;
        self.stream.synchronize()?;
        start.elapsed_ms(&end)
    }

    fn ptr(&self, v: ValueId) -> Result<u64> {
        if let Some(view) = self.views.get(&v) {
            let elem = element_bytes(self.plan.values[v].layout, self.half);
            return Ok(self.ptr(view.buffer)? + (view.channel_offset * elem) as u64);
        }
        let v = self.plan.storage_of(v);
        if let Some(c) = self.plan.values[v].constant {
            return Ok(self.constants[c].ptr);
        }
        self.buffers[v].as_ref().map(|b| b.ptr).ok_or_else(|| {
            cuda_error(
                "executor",
                format!("value {} has no memory", self.plan.values[v].name),
            )
        })
    }

    /// The device address of an optional operand; null (0) when absent.
    fn ptr_or_null(&self, v: Option<ValueId>) -> Result<u64> {
        v.map_or(Ok(0), |v| self.ptr(v))
    }

    /// Step `i` at bucket `b` if it is an INT8 convolution that keeps its input's size (and its
    /// residual's), as Kestrel's thin and 1x1 kernels need, and no tile is forced on every layer:
    /// its geometry, input and output shapes, and whether it stores int8.
    fn same_size_int8_conv(
        &self,
        i: usize,
        b: usize,
    ) -> Option<(&ConvGeometry, Vec<usize>, Vec<usize>, bool)> {
        let Step::Conv {
            x,
            y,
            residual,
            geometry,
            int8: Some(q),
            ..
        } = &self.plan.steps[i]
        else {
            return None;
        };
        if self.forced_int8_tile.is_some() {
            return None;
        }
        let (dx, dy) = (self.shape(*x, b), self.shape(*y, b));
        if dx[2..] != dy[2..] || residual.is_some_and(|r| self.shape(r, b) != dy) {
            return None;
        }
        Some((geometry, dx, dy, q.output_scale.is_some()))
    }

    /// The thin kernel INT8 convolution step `i` runs at bucket `b` when not fused; `None` where
    /// it takes another kernel (see [`thin_kernel`]).
    fn thin_kernel_of(&self, i: usize, b: usize) -> Option<ThinKernel> {
        if !self.thin_conv {
            return None;
        }
        let (geometry, dx, dy, int8_out) = self.same_size_int8_conv(i, b)?;
        thin_kernel(geometry, dx[1], dy[1], int8_out)
    }

    /// The 1x1 kernel INT8 convolution step `i` runs at bucket `b` when not fused; `None` where
    /// it takes another kernel (see [`pointwise_kernel`]).
    fn pointwise_kernel_of(&self, i: usize, b: usize) -> Option<PointwiseKernel> {
        if !self.pointwise_conv {
            return None;
        }
        let (geometry, dx, dy, int8_out) = self.same_size_int8_conv(i, b)?;
        let pixels = dy[0] * dy[2] * dy[3];
        pointwise_kernel(geometry, pixels, dx[1], dy[1], int8_out, self.sm_count)
    }

    fn f(&self, name: &str) -> Result<dsys::CUfunction> {
        self.functions
            .get(name)
            .copied()
            .ok_or_else(|| cuda_error("executor", format!("kernel {name} not loaded")))
    }

    fn dt(&self, layout: Layout) -> &'static str {
        match layout {
            Layout::NhwcInt8 => "i8",
            Layout::Nhwc if self.half => "f16",
            _ => "f32",
        }
    }

    /// Enqueue every step for a batch of `b` on the stream.
    fn enqueue(&self, b: usize) -> Result<()> {
        for i in 0..self.plan.steps.len() {
            self.enqueue_step(i, b)?;
        }
        Ok(())
    }

    /// Enqueue step `i` for a batch of `b`.
    fn enqueue_step(&self, i: usize, b: usize) -> Result<()> {
        if self.skipped.contains(&i) {
            return Ok(());
        }
        if let Some(p) = self.fused.get(&(i, b)) {
            return p.run(&self.dnn);
        }
        let s = self.stream.0;
        let step = &self.plan.steps[i];
        match step {
            Step::InputToNhwc { x, y } | Step::ToRowMajor { x, y } => {
                let d = self.shape(*x, b);
                let name = if matches!(step, Step::InputToNhwc { .. }) {
                    format!("nchw_f32_to_nhwc_{}", self.dt(Layout::Nhwc))
                } else {
                    format!("nhwc_{}_to_nchw_f32", self.dt(Layout::Nhwc))
                };
                launch(
                    self.f(&name)?,
                    s,
                    prod(&d),
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(prod(&d) as i64),
                        Arg::I32(d[1] as i32),
                        Arg::I64((d[2] * d[3]) as i64),
                    ],
                )?;
            }
            Step::Conv {
                x,
                y,
                bias,
                act,
                residual,
                geometry,
                int8: Some(q),
                ..
            } => {
                let dx = self.shape(*x, b);
                let dy = self.shape(*y, b);
                let w = self
                    .weights
                    .get(&i)
                    .ok_or_else(|| cuda_error("executor", "missing int8 filter"))?;
                let scale = self
                    .int8_scales
                    .get(&i)
                    .ok_or_else(|| cuda_error("executor", "missing int8 scales"))?;
                let (k, m) = (dy[1], dy[0] * dy[2] * dy[3]);
                // Every INT8 kernel takes these first: input, filter, scales, bias, residual, output.
                let [px, pw, ps, pb, pr, py] = [
                    self.ptr(*x)?,
                    w.ptr,
                    scale.ptr,
                    bias.map_or(0, |c| self.constants[c].ptr),
                    self.ptr_or_null(*residual)?,
                    self.ptr(*y)?,
                ]
                .map(Arg::Ptr);
                // The thin and 1x1 kernels: name, blocks, threads, shared bytes and the three
                // sizes they take (images, rows, columns; or pixels, input and output channels).
                let special = if let Some(t) = self.thin_kernel_of(i, b) {
                    let (rows, columns) = THIN_TILE;
                    let tiles = dy[0] * dy[2].div_ceil(rows) * dy[3].div_ceil(columns);
                    // Persistent blocks: as many as fit on the GPU at once.
                    let resident =
                        self.sm_count * self.thin_blocks_per_sm.get(t.name).copied().unwrap_or(1);
                    let sizes = [dy[0], dy[2], dy[3]];
                    Some((t.name, tiles.min(resident), 128, t.shared_bytes(), sizes))
                } else {
                    self.pointwise_kernel_of(i, b).map(|t| {
                        let blocks = m.div_ceil(t.tile.0) * k.div_ceil(t.tile.1);
                        (t.name, blocks, t.threads, t.shared_bytes(), [m, dx[1], k])
                    })
                };
                if let Some((name, blocks, threads, shared, sizes)) = special {
                    // Both read and write channel slices of concat buffers (pixel strides).
                    let stride =
                        |v: ValueId, c: usize| self.views.get(&v).map_or(c, |w| w.channel_stride);
                    let [s0, s1, s2] = sizes.map(|v| Arg::I32(v as i32));
                    return launch_grid(
                        self.f(name)?,
                        s,
                        (blocks as u32, 1, 1),
                        threads,
                        shared as u32,
                        &[
                            px,
                            pw,
                            ps,
                            pb,
                            pr,
                            py,
                            s0,
                            s1,
                            s2,
                            Arg::I32(*act as i32),
                            Arg::F32(q.output_scale.unwrap_or(0.0)),
                            Arg::I32(stride(*x, dx[1]) as i32),
                            Arg::I32(stride(*y, k) as i32),
                        ],
                    );
                }
                let groups = geometry.group.max(1);
                let (name, bm, bn) = self
                    .forced_int8_tile
                    .unwrap_or_else(|| int8_tile(m, k, self.sm_count));
                let blocks = m.div_ceil(bm) * groups * (k / groups).div_ceil(bn);
                let f = self.f(name)?;
                let i32s = |v: usize| Arg::I32(v as i32);
                launch_grid(
                    f,
                    s,
                    (blocks as u32, 1, 1),
                    256,
                    int8_shared_bytes(self.int8_stages, bm, bn) as u32,
                    &[
                        px,
                        pw,
                        ps,
                        pb,
                        pr,
                        py,
                        i32s(dx[0]),
                        i32s(dx[2]),
                        i32s(dx[3]),
                        i32s(dx[1]),
                        i32s(dy[2]),
                        i32s(dy[3]),
                        i32s(k),
                        i32s(geometry.kernel[0]),
                        i32s(geometry.kernel[1]),
                        i32s(geometry.stride[0]),
                        i32s(geometry.stride[1]),
                        i32s(geometry.pads[0]),
                        i32s(geometry.pads[1]),
                        i32s(geometry.dilation[0]),
                        i32s(geometry.dilation[1]),
                        Arg::I32(*act as i32),
                        i32s(k),
                        i32s(0),
                        Arg::F32(q.output_scale.unwrap_or(0.0)),
                        Arg::I32(groups as i32),
                    ],
                )?;
            }
            Step::StemConv {
                x,
                y,
                bias,
                geometry: g,
                act,
                input_scale,
                output_scale,
                ..
            } => {
                let (dx, dy) = (self.shape(*x, b), self.shape(*y, b));
                let w = self
                    .weights
                    .get(&i)
                    .ok_or_else(|| cuda_error("executor", "missing stem filter"))?;
                let name = if output_scale.is_some() {
                    "stem_conv_i8"
                } else {
                    "stem_conv_f16"
                };
                // A block of 256 threads per 128 output pixels (`STEM_PIXELS` in kernels.cu),
                // which it indexes in 32 bits.
                let pixels = dy[0] * dy[2] * dy[3];
                if u32::try_from(pixels).is_err() {
                    return Err(cuda_error(
                        "executor",
                        format!("stem over {pixels} output pixels, more than 32-bit indices hold"),
                    ));
                }
                let blocks = pixels.div_ceil(128).max(1) as u32;
                let i32s = |v: usize| Arg::I32(v as i32);
                launch_grid(
                    self.f(name)?,
                    s,
                    (blocks, 1, 1),
                    256,
                    0,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(w.ptr),
                        Arg::Ptr(bias.map_or(0, |c| self.constants[c].ptr)),
                        Arg::Ptr(self.ptr(*y)?),
                        i32s(dx[0]),
                        i32s(dx[2]),
                        i32s(dx[3]),
                        i32s(dy[1]),
                        i32s(dy[2]),
                        i32s(dy[3]),
                        i32s(g.stride[0]),
                        i32s(g.stride[1]),
                        i32s(g.pads[0]),
                        i32s(g.pads[1]),
                        Arg::I32(*act as i32),
                        Arg::F32(input_scale.unwrap_or(0.0)),
                        Arg::F32(output_scale.unwrap_or(0.0)),
                    ],
                )?;
            }
            Step::Quantize { x, y, scale } => {
                let n = prod(&self.shape(*x, b));
                if !n.is_multiple_of(8) {
                    // The planner only quantizes tensors of whole 8-channel groups.
                    return Err(cuda_error(
                        "executor",
                        format!("quantizing {n} values, not a multiple of 8"),
                    ));
                }
                launch(
                    self.f("quantize_v8_f16_i8")?,
                    s,
                    n / 8,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64((n / 8) as i64),
                        Arg::F32(*scale),
                    ],
                )?;
            }
            Step::FakeQuant { x, y, scale } => {
                let n = prod(&self.shape(*x, b));
                let f = self.f(&format!(
                    "fake_quant_{}",
                    self.dt(self.plan.values[*x].layout)
                ))?;
                launch(
                    f,
                    s,
                    n,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(n as i64),
                        Arg::F32(*scale),
                    ],
                )?;
            }
            Step::Conv {
                x,
                y,
                weight,
                bias,
                act,
                residual,
                layout,
                ..
            } => {
                let cp = self
                    .conv_plans
                    .get(&(i, b))
                    .ok_or_else(|| cuda_error("executor", "missing convolution plan"))?;
                let w = match self.weights.get(&i) {
                    Some(w) => w.ptr,
                    None => self.constants[*weight].ptr,
                };
                let yp = self.ptr(*y)?;
                cp.run(
                    &self.dnn,
                    self.ptr(*x)?,
                    w,
                    yp,
                    self.workspace.ptr,
                    self.workspace.bytes,
                )?;
                let d = self.shape(*y, b);
                let bias_ptr = match bias {
                    Some(c) => self.constants[*c].ptr,
                    None => 0,
                };
                if bias.is_some() || *act != plan::Act::None || residual.is_some() {
                    if *layout == Layout::Nhwc {
                        let res = self.ptr_or_null(*residual)?;
                        // FP16 with whole 8-channel groups: 16-byte vectors per thread.
                        let v8 = self.half && d[1].is_multiple_of(8);
                        let (f, n) = if v8 {
                            (self.f("bias_act_v8_f16")?, prod(&d) / 8)
                        } else {
                            (
                                self.f(&format!("bias_act_{}", self.dt(Layout::Nhwc)))?,
                                prod(&d),
                            )
                        };
                        launch(
                            f,
                            s,
                            n,
                            &[
                                Arg::Ptr(yp),
                                Arg::Ptr(bias_ptr),
                                Arg::Ptr(res),
                                Arg::I64(n as i64),
                                Arg::I32(d[1] as i32),
                                Arg::I32(*act as i32),
                            ],
                        )?;
                    } else {
                        let f = self.f("bias_act_nchw_f32")?;
                        launch(
                            f,
                            s,
                            prod(&d),
                            &[
                                Arg::Ptr(yp),
                                Arg::Ptr(bias_ptr),
                                Arg::I64(prod(&d) as i64),
                                Arg::I32(d[1] as i32),
                                Arg::I64((d[2] * d[3]) as i64),
                                Arg::I32(*act as i32),
                            ],
                        )?;
                    }
                }
            }
            Step::Pool {
                x,
                y,
                max,
                kernel,
                stride,
                pads,
                count_include_pad,
            } => {
                let dx = self.shape(*x, b);
                let dy = self.shape(*y, b);
                // Whole channel vectors (16 or 8 int8 channels, 8 fp16 ones) a thread, or strips
                // of rows for the smoothing averages; the rest (fp32, fp16 channels not in
                // eights) one value a thread.
                let vector = if self.plan.values[*x].layout == Layout::NhwcInt8 {
                    // The planner quantizes only tensors of whole 8-channel groups.
                    if !dx[1].is_multiple_of(8) {
                        return Err(cuda_error(
                            "executor",
                            format!("int8 pooling over {} channels, not a multiple of 8", dx[1]),
                        ));
                    }
                    Some(if dx[1].is_multiple_of(16) {
                        ("pool_v16_i8", 16)
                    } else {
                        ("pool_v8_i8", 8)
                    })
                } else if self.half && dx[1].is_multiple_of(8) {
                    Some(("pool_v8_f16", 8))
                } else {
                    None
                };
                let i32s = |v: usize| Arg::I32(v as i32);
                let args = [
                    Arg::Ptr(self.ptr(*x)?),
                    Arg::Ptr(self.ptr(*y)?),
                    i32s(dx[0]),
                    i32s(dx[2]),
                    i32s(dx[3]),
                    i32s(dx[1]),
                    i32s(dy[2]),
                    i32s(dy[3]),
                    i32s(kernel[0]),
                    i32s(kernel[1]),
                    i32s(stride[0]),
                    i32s(stride[1]),
                    i32s(pads[0]),
                    i32s(pads[1]),
                    Arg::I32(if *max { 0 } else { 1 }),
                    Arg::I32(i32::from(*count_include_pad)),
                ];
                match vector {
                    Some((name, per_vector))
                        if pool_smooths(*max, *kernel, *stride, *pads, &dx, &dy) =>
                    {
                        let (x_blocks, y_blocks) = pool_smooth_grid(&dy, per_vector);
                        launch_grid(self.f(name)?, s, (x_blocks, y_blocks, 1), 256, 0, &args)?;
                    }
                    Some((name, per_vector)) => {
                        launch(self.f(name)?, s, prod(&dy) / per_vector, &args)?;
                    }
                    None => {
                        let f = self.f(&format!("pool_nhwc_{}", self.dt(Layout::Nhwc)))?;
                        launch(f, s, prod(&dy), &args)?;
                    }
                }
            }
            Step::ResizeNearest { x, y } => {
                let dx = self.shape(*x, b);
                let dy = self.shape(*y, b);
                // Whole 16-byte channel vectors move as vectors (int8 ones are planned only
                // with whole vectors: 16 channels).
                let int8 = self.plan.values[*x].layout == Layout::NhwcInt8;
                let per_vec = match (int8, self.half) {
                    (true, _) => 16,
                    (false, true) => 8,
                    (false, false) => 4,
                };
                if int8 && !dx[1].is_multiple_of(per_vec) {
                    return Err(cuda_error(
                        "executor",
                        format!("int8 resize over {} channels, not a multiple of 16", dx[1]),
                    ));
                }
                let (f, unit) = if dx[1].is_multiple_of(per_vec) {
                    (self.f("resize_nearest_v16")?, per_vec)
                } else {
                    (
                        self.f(&format!("resize_nearest_nhwc_{}", self.dt(Layout::Nhwc)))?,
                        1,
                    )
                };
                let i32s = |v: usize| Arg::I32(v as i32);
                launch(
                    f,
                    s,
                    prod(&dy) / unit,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        i32s(dx[0]),
                        i32s(dx[2]),
                        i32s(dx[3]),
                        i32s(dx[1] / unit),
                        i32s(dy[2]),
                        i32s(dy[3]),
                    ],
                )?;
            }
            Step::CopyAxis {
                x,
                y,
                axis,
                in_offset,
                out_offset,
                count,
            } => {
                let dx = self.shape(*x, b);
                let dy = self.shape(*y, b);
                let layout = self.plan.values[*x].layout;
                let (outer, inner, in_len, out_len) = if layout != Layout::RowMajor {
                    // Channels are innermost: every pixel copies a run of channels.
                    (dx[0] * dx[2] * dx[3], 1, dx[1], dy[1])
                } else {
                    (
                        prod(&dx[..*axis]),
                        prod(&dx[axis + 1..]),
                        dx[*axis],
                        dy[*axis],
                    )
                };
                // Channel runs that are whole 16-byte vectors move as vectors.
                let elem = match self.dt(layout) {
                    "i8" => 1,
                    "f16" => 2,
                    _ => 4,
                };
                let per_vec = 16 / elem;
                let vectorised = inner == 1
                    && [in_len, out_len, *in_offset, *out_offset, *count]
                        .iter()
                        .all(|v| v % per_vec == 0);
                let (f, unit) = if vectorised {
                    (self.f("copy_axis_v16")?, per_vec)
                } else {
                    (self.f(&format!("copy_axis_{}", self.dt(layout)))?, 1)
                };
                let i = |v: usize| Arg::I64((v / unit) as i64);
                launch(
                    f,
                    s,
                    outer * count / unit * inner,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(outer as i64),
                        i(in_len),
                        i(*in_offset),
                        i(out_len),
                        i(*out_offset),
                        i(*count),
                        Arg::I64(inner as i64),
                    ],
                )?;
            }
            Step::Unary { x, y, act } => {
                let n = prod(&self.shape(*y, b));
                let f = self.f(&format!("unary_{}", self.dt(self.plan.values[*x].layout)))?;
                launch(
                    f,
                    s,
                    n,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(n as i64),
                        Arg::I32(*act as i32),
                    ],
                )?;
            }
            Step::Binary { a, b: bb, y, op } => {
                let n = prod(&self.shape(*y, b));
                let args_ab = [
                    Arg::Ptr(self.ptr(*a)?),
                    Arg::Ptr(self.ptr(*bb)?),
                    Arg::Ptr(self.ptr(*y)?),
                    Arg::I64(n as i64),
                ];
                match self.meta.get(&(i, b)) {
                    Some(meta) => {
                        let f = self.f("binary_bcast_f32")?;
                        let mut args = args_ab.to_vec();
                        args.push(Arg::Ptr(meta.ptr));
                        args.push(Arg::I32(*op as i32));
                        launch(f, s, n, &args)?;
                    }
                    None => {
                        let f = self.f(&format!(
                            "binary_same_{}",
                            self.dt(self.plan.values[*y].layout)
                        ))?;
                        let mut args = args_ab.to_vec();
                        args.push(Arg::I32(*op as i32));
                        launch(f, s, n, &args)?;
                    }
                }
            }
            Step::Dfl { x, y, weight, bins } => {
                let d = self.shape(*x, b);
                let (rows, anchors) = (d[0] * d[1], d[3]);
                launch(
                    self.f("dfl_f32")?,
                    s,
                    rows * anchors,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.constants[*weight].ptr),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64((rows * anchors) as i64),
                        Arg::I32(*bins as i32),
                        Arg::I64(anchors as i64),
                    ],
                )?;
            }
            Step::Softmax { x, y, axis } => {
                let d = self.shape(*x, b);
                let (outer, len, inner) = (prod(&d[..*axis]), d[*axis], prod(&d[axis + 1..]));
                let f = self.f("softmax_f32")?;
                launch(
                    f,
                    s,
                    outer * inner,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(outer as i64),
                        Arg::I32(len as i32),
                        Arg::I64(inner as i64),
                    ],
                )?;
            }
            Step::Transpose { x, y, .. } => {
                let n = prod(&self.shape(*y, b));
                let meta = self
                    .meta
                    .get(&(i, b))
                    .ok_or_else(|| cuda_error("executor", "missing transpose metadata"))?;
                let f = self.f("transpose_f32")?;
                launch(
                    f,
                    s,
                    n,
                    &[
                        Arg::Ptr(self.ptr(*x)?),
                        Arg::Ptr(self.ptr(*y)?),
                        Arg::I64(n as i64),
                        Arg::Ptr(meta.ptr),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Device time of each step for a batch of `b`, in milliseconds: each step runs
    /// `PROFILE_REPEATS` times back to back (steps are idempotent) as one CUDA graph between two
    /// events, so the host's launch rate does not count, as in the engine's own graph replay.
    pub fn profile_steps(&self, b: usize) -> Result<Vec<LayerTime>> {
        const PROFILE_REPEATS: usize = 20;
        let (start, end) = (Event::new()?, Event::new()?);
        let mut out = Vec::with_capacity(self.plan.steps.len());
        for (i, step) in self.plan.steps.iter().enumerate() {
            // From a graph, as the engine runs; launched one by one only where the step cannot
            // be captured (the layer then carries its launch latency too).
            let (ms, in_graph) = match self.graph_step_ms(i, b, PROFILE_REPEATS, (&start, &end)) {
                Ok(ms) => (ms, true),
                Err(_) => (
                    self.event_ms(PROFILE_REPEATS, || self.enqueue_step(i, b))?
                        / PROFILE_REPEATS as f64,
                    false,
                ),
            };
            let kind = match step {
                _ if self.skipped.contains(&i) => "concat/split (written in place)",
                _ if self.fused.contains_key(&(i, b)) => match step {
                    Step::Conv { int8: Some(_), .. } => "conv int8 (cuDNN fused)",
                    _ => "conv fp16 (cuDNN fused)",
                },
                _ if self.thin_kernel_of(i, b).is_some() => "conv int8 (thin 3x3)",
                _ if self.pointwise_kernel_of(i, b).is_some() => "conv int8 (1x1)",
                _ => step.kind(),
            };
            let y = step.output();
            let ops = match step {
                Step::Conv { x, geometry, .. } => {
                    let cin = self.shape(*x, b)[1] / geometry.group.max(1);
                    let taps = geometry.kernel[0] * geometry.kernel[1];
                    2.0 * (self.plan.values[y].numel(b) * cin * taps) as f64
                }
                _ => 0.0,
            };
            out.push(LayerTime {
                kind: kind.to_string(),
                layer: format!("{} {:?}", self.plan.values[y].name, self.shape(y, b)),
                ms,
                ops,
                in_graph,
            });
        }
        Ok(out)
    }

    /// Milliseconds of step `i` of bucket `b` as a CUDA graph runs it: a graph of `repeats`
    /// back-to-back launches of that step alone, replayed once to load it and once between the
    /// two `events`. Launched from the host one by one instead, a small layer would be timed at
    /// the host's launch rate (gelan-c's layers then sum to about 1.25x the graph's latency at
    /// batch 1).
    fn graph_step_ms(
        &self,
        i: usize,
        b: usize,
        repeats: usize,
        (start, end): (&Event, &Event),
    ) -> Result<f64> {
        if self.skipped.contains(&i) {
            return Ok(0.0);
        }
        let exec = self.capture_launches(|| {
            for _ in 0..repeats {
                self.enqueue_step(i, b)?;
            }
            Ok(())
        })?;
        // SAFETY: a graph of this engine, on its stream (the first launch uploads it).
        unsafe { drv::graph::launch(exec.0, self.stream.0) }
            .map_err(|e| cuda_error("launching the CUDA graph", e))?;
        start.record(&self.stream)?;
        // SAFETY: as above.
        unsafe { drv::graph::launch(exec.0, self.stream.0) }
            .map_err(|e| cuda_error("launching the CUDA graph", e))?;
        end.record(&self.stream)?;
        self.stream.synchronize()?;
        Ok(start.elapsed_ms(&end)? / repeats as f64)
    }

    /// The bucket a timing run of `batch` images uses, with the context bound to this thread.
    fn prepare_timing(&self, batch: usize) -> Result<usize> {
        let bucket = bucket_for(&self.buckets, batch)
            .filter(|_| self.info.profile.contains(batch))
            .ok_or_else(|| {
                Error::Shape(format!(
                    "batch {batch} is outside the profile {}",
                    self.info.profile
                ))
            })?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        Ok(bucket)
    }

    /// Capture the bucket's launches as a CUDA graph.
    fn capture(&self, b: usize) -> Result<GraphExec> {
        self.capture_launches(|| self.enqueue(b))
    }

    /// Capture what `enqueue` launches on the engine's stream as a CUDA graph.
    fn capture_launches(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<GraphExec> {
        let s = self.stream.0;
        // SAFETY: a live stream not already capturing; the captured work only touches engine memory.
        unsafe {
            drv::stream::begin_capture(
                s,
                dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| cuda_error("starting graph capture", e))?;
        let enqueued = enqueue();
        // SAFETY: ends the capture begun above, whatever happened in between.
        let graph = unsafe { drv::stream::end_capture(s) };
        enqueued?;
        let graph = graph.map_err(|e| cuda_error("ending graph capture", e))?;
        // SAFETY: a graph returned by end_capture; destroyed after instantiation.
        let exec = unsafe { drv::graph::instantiate(graph, dsys::CUgraphInstantiate_flags(0)) };
        // SAFETY: the graph handle from above, destroyed once.
        let _ = unsafe { drv::graph::destroy(graph) };
        exec.map(GraphExec)
            .map_err(|e| cuda_error("instantiating the CUDA graph", e))
    }
}

/// `[rank, out dims, a strides, b strides]` for the broadcasting kernel (stride 0 on broadcast axes).
pub fn broadcast_meta(a: &[usize], b: &[usize], out: &[usize]) -> Vec<i64> {
    let rank = out.len();
    let strides = |s: &[usize]| -> Vec<i64> {
        let mut padded = vec![1usize; rank - s.len()];
        padded.extend_from_slice(s);
        let mut st = vec![0i64; rank];
        let mut acc = 1i64;
        for d in (0..rank).rev() {
            st[d] = if padded[d] == 1 && out[d] != 1 {
                0
            } else {
                acc
            };
            acc *= padded[d] as i64;
        }
        st
    };
    let mut meta = vec![rank as i64];
    meta.extend(out.iter().map(|&d| d as i64));
    meta.extend(strides(a));
    meta.extend(strides(b));
    meta
}

/// `[rank, out dims, input strides in output order]` for the transpose kernel.
pub fn transpose_meta(input: &[usize], perm: &[usize]) -> Vec<i64> {
    let rank = input.len();
    let mut in_strides = vec![1i64; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * input[d + 1] as i64;
    }
    let mut meta = vec![rank as i64];
    meta.extend(perm.iter().map(|&p| input[p] as i64));
    meta.extend(perm.iter().map(|&p| in_strides[p]));
    meta
}

impl CudaEngine {
    /// Upload a batch (`None`: the input is already in the engine's input buffer on the device)
    /// and enqueue the engine on its stream (not synchronised); returns the device address of
    /// the output.
    fn launch_batch(&mut self, input: Option<&[f32]>, batch: usize) -> Result<dsys::CUdeviceptr> {
        let per_in = self.info.input_len();
        if !self.info.profile.contains(batch) {
            return Err(Error::Shape(format!(
                "batch of {batch} images is outside the engine's profile {} (min:opt:max)",
                self.info.profile
            )));
        }
        let bucket =
            bucket_for(&self.buckets, batch).ok_or_else(|| cuda_error("executor", "no bucket"))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let s = self.stream.0;
        let output_ptr = self.ptr(self.plan.output)?;
        if let Some(input) = input {
            if input.len() != batch * per_in {
                return Err(Error::Shape(format!(
                    "{} input values for a batch of {batch}; each image needs {per_in}",
                    input.len()
                )));
            }
            self.pinned_in.as_f32_mut()[..input.len()].copy_from_slice(input);
            let input_ptr = self.ptr(self.plan.input)?;
            // SAFETY: pinned and device buffers hold max-batch data; the copy is ordered on the
            // stream before the engine, and the pinned input is not rewritten before the next
            // call, which comes after the caller synchronised this stream.
            unsafe {
                drv::memcpy_htod_async(input_ptr, &self.pinned_in.as_f32()[..input.len()], s)
            }
            .map_err(|e| cuda_error("uploading the batch", e))?;
        }
        match self.graphs.get(&bucket) {
            // SAFETY: a graph instantiated for this engine's memory.
            Some(g) => unsafe { drv::graph::launch(g.0, s) }
                .map_err(|e| cuda_error("launching the CUDA graph", e))?,
            None => self.enqueue(bucket)?,
        }
        Ok(output_ptr)
    }

    /// Run a batch from host input and copy `output0` into `self.output` and, with
    /// `prototypes` on a segmentation model, the prototypes into `self.prototypes`; returns
    /// whether the prototypes were copied.
    fn run_downloading(&mut self, input: &[f32], batch: usize, prototypes: bool) -> Result<bool> {
        let output_ptr = self.launch_batch(Some(input), batch)?;
        let protos = match (prototypes, self.plan.prototypes, self.info.prototypes) {
            (true, Some(value), Some(shape)) => Some((self.ptr(value)?, batch * shape.len())),
            _ => None,
        };
        let n_out = batch * self.info.output_len();
        let s = self.stream.0;
        // SAFETY: the pinned buffers hold max-batch outputs and prototypes and are not read
        // until the stream is synchronised; the device values hold the batch's results.
        unsafe {
            drv::memcpy_dtoh_async(&mut self.pinned_out.as_f32_mut()[..n_out], output_ptr, s)
                .and_then(|_| match protos {
                    Some((ptr, n)) => {
                        drv::memcpy_dtoh_async(&mut self.pinned_protos.as_f32_mut()[..n], ptr, s)
                    }
                    None => Ok(()),
                })
        }
        .map_err(|e| cuda_error("downloading the outputs", e))?;
        self.stream.synchronize()?;
        self.output.clear();
        self.output
            .extend_from_slice(&self.pinned_out.as_f32()[..n_out]);
        if let Some((_, n)) = protos {
            self.prototypes.clear();
            self.prototypes
                .extend_from_slice(&self.pinned_protos.as_f32()[..n]);
        }
        Ok(protos.is_some())
    }

    /// Decode + NMS of the output at `output_ptr` (complete) on this GPU.
    fn postprocess_on_device(
        &mut self,
        output_ptr: dsys::CUdeviceptr,
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<()> {
        self.post()?
            .run_device(output_ptr, batch, placements, cfg, out)
    }

    /// The GPU post-processor, set up on first use.
    fn post(&mut self) -> Result<&mut GpuPostprocessor> {
        if self.post.is_none() {
            let anchors = self.info.anchors;
            let channels = self.info.output_len() / anchors.max(1);
            self.post = Some(GpuPostprocessor::new(
                self.ctx.ordinal(),
                self.info.profile.max,
                self.info.num_classes,
                channels,
                anchors,
            )?);
        }
        self.post
            .as_mut()
            .ok_or_else(|| cuda_error("post-processing", "not set up"))
    }

    /// The GPU letterboxer, set up on first use.
    fn letterboxer(&mut self) -> Result<&mut GpuLetterboxer> {
        if self.letterboxer.is_none() {
            self.letterboxer = Some(GpuLetterboxer::new(self.ctx.ordinal())?);
        }
        self.letterboxer
            .as_mut()
            .ok_or_else(|| cuda_error("letterbox", "not set up"))
    }

    /// The number of frames checked against the profile, and the batch they run as (small
    /// batches are padded to the profile's minimum with the last frame).
    fn frames_batch(&self, frames: &[Frame]) -> Result<(usize, usize)> {
        let (n, profile) = (frames.len(), self.info.profile);
        if n == 0 || n > profile.max {
            return Err(Error::Shape(format!(
                "{n} frames; the engine takes batches of 1 to {}",
                profile.max
            )));
        }
        Ok((n, n.max(profile.min)))
    }

    /// Letterbox `frames` into the engine's input (after `after`), without waiting for the GPU.
    fn enqueue_letterbox(
        &mut self,
        frames: &[Frame],
        batch: usize,
        placements: &mut Vec<LetterboxParams>,
        after: Option<&Event>,
    ) -> Result<()> {
        let [h, w] = self.info.input_hw;
        let input_ptr = self.ptr(self.plan.input)?;
        let letterboxer = self.letterboxer()?;
        let padded;
        let frames = if batch > frames.len() {
            padded = {
                let mut v = frames.to_vec();
                v.resize(batch, frames[frames.len() - 1]);
                v
            };
            &padded[..]
        } else {
            frames
        };
        letterboxer.enqueue_device(
            frames,
            w as u32,
            h as u32,
            InputTensor::NCHW_F32,
            input_ptr,
            placements,
            after,
        )
    }

    /// [`Engine::start_frames`] with the pipeline taken out of `self`.
    fn start_in(&mut self, p: &mut FramePipeline, frames: &[Frame], cfg: &NmsConfig) -> Result<()> {
        if p.in_flight.len() == p.outputs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} batches are already in flight: finish_frames the oldest before starting another",
                p.in_flight.len()
            )));
        }
        cfg.validate()?;
        let (n, batch) = self.frames_batch(frames)?;
        let slot = p.next_slot;
        // The letterbox may overwrite the input once the previous batch's engine has read it;
        // the engine starts once the letterbox is done.
        self.enqueue_letterbox(frames, batch, &mut p.placements[slot], Some(&p.input_read))?;
        self.letterboxer()?;
        if let Some(l) = &self.letterboxer {
            l.done().wait_on(&self.stream)?;
        }
        let output_ptr = self.launch_batch(None, batch)?;
        p.input_read.record(&self.stream)?;
        // The head moves aside, so the next batch can run while this one is post-processed.
        let bytes = batch * self.info.output_len() * 4;
        // SAFETY: both buffers hold max-batch outputs; ordered after the engine on its stream,
        // and the held copy is not read before `held[slot]` (recorded next) is reached.
        unsafe { drv::memcpy_dtod_async(p.outputs[slot].ptr, output_ptr, bytes, self.stream.0) }
            .map_err(|e| cuda_error("holding the engine output", e))?;
        p.held[slot].record(&self.stream)?;
        match &mut p.cfg[slot] {
            Some(kept) => kept.clone_from(cfg),
            empty => *empty = Some(cfg.clone()),
        }
        p.in_flight.push_back((slot, n, batch));
        p.next_slot = (slot + 1) % p.outputs.len();
        Ok(())
    }

    /// [`Engine::finish_frames`] with the pipeline taken out of `self`.
    fn finish_in(
        &mut self,
        p: &mut FramePipeline,
        placements: &mut Vec<LetterboxParams>,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        let Some((slot, n, batch)) = p.in_flight.pop_front() else {
            return Ok(false);
        };
        let cfg = p.cfg[slot]
            .as_ref()
            .ok_or_else(|| cuda_error("pipeline", "no thresholds for the batch"))?;
        let post = self.post()?;
        post.wait_for(&p.held[slot])?;
        post.run_device(p.outputs[slot].ptr, batch, &p.placements[slot], cfg, out)?;
        out.truncate(n);
        placements.clear();
        placements.extend_from_slice(&p.placements[slot][..n]);
        Ok(true)
    }
}

/// The detections of a batch whose masks to decode, reused across batches.
#[derive(Default)]
struct MaskJobs {
    images: Vec<usize>,
    anchors: Vec<usize>,
    boxes: Vec<crate::detection::BoxXyxy>,
    bitmaps: Vec<Bitmap>,
}

impl MaskJobs {
    fn clear(&mut self) {
        self.images.clear();
        self.anchors.clear();
        self.boxes.clear();
    }
}

/// Frames-to-detections batches in flight: two slots, so one batch's letterbox and engine run
/// while the previous one is post-processed.
struct FramePipeline {
    /// Each slot's engine output, copied aside.
    outputs: [DeviceBuffer; 2],
    /// Recorded when the engine has read its input (the next letterbox may write it).
    input_read: Event,
    /// Recorded when each slot's output is held.
    held: [Event; 2],
    placements: [Vec<LetterboxParams>; 2],
    cfg: [Option<NmsConfig>; 2],
    /// (slot, frames, batch) of the batches in flight, oldest first.
    in_flight: std::collections::VecDeque<(usize, usize, usize)>,
    next_slot: usize,
}

impl FramePipeline {
    fn new(output_bytes: usize) -> Result<Self> {
        Ok(Self {
            outputs: [
                DeviceBuffer::new(output_bytes)?,
                DeviceBuffer::new(output_bytes)?,
            ],
            input_read: Event::ordering()?,
            held: [Event::ordering()?, Event::ordering()?],
            placements: [Vec::new(), Vec::new()],
            cfg: [None, None],
            in_flight: std::collections::VecDeque::with_capacity(2),
            next_slot: 0,
        })
    }
}

impl Engine for CudaEngine {
    fn info(&self) -> &EngineInfo {
        self.end_to_end.as_ref().map_or(&self.info, |e| &e.info)
    }

    fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]> {
        self.refuse_end_to_end()?;
        self.run_downloading(input, batch, false)?;
        Ok(&self.output)
    }

    fn run_end_to_end(&mut self, input: &[f32], batch: usize) -> Result<EndToEndOutputs<'_>> {
        let Some(mut e) = self.end_to_end.take() else {
            return Err(Error::InvalidArgument(format!(
                "{} is not an end-to-end model; export it with --end2end",
                self.info.model_name
            )));
        };
        let result = self.end_to_end_batch(&mut e, input, batch);
        let e = self.end_to_end.insert(e);
        result?;
        Ok(e.buffers.outputs(self.info.prototypes.is_some()))
    }

    fn run_with_prototypes(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<(&[f32], Option<&[f32]>)> {
        self.refuse_end_to_end()?;
        let protos = self.run_downloading(input, batch, true)?;
        Ok((&self.output, protos.then_some(&self.prototypes[..])))
    }

    fn run_and_detect_masks(
        &mut self,
        input: &[f32],
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
        masks: &mut Vec<Vec<Bitmap>>,
    ) -> Result<bool> {
        let (Some(value), Some(shape), None) =
            (self.plan.prototypes, self.info.prototypes, &self.end_to_end)
        else {
            return Ok(false);
        };
        let output_ptr = self.launch_batch(Some(input), batch)?;
        self.stream.synchronize()?;
        self.postprocess_on_device(output_ptr, batch, placements, cfg, out)?;
        let protos_ptr = self.ptr(value)?;
        let (channels, anchors) = (self.info.output_channels, self.info.anchors);
        let mut jobs = std::mem::take(&mut self.mask_jobs);
        jobs.clear();
        for (i, dets) in out.iter().enumerate() {
            for d in dets {
                jobs.images.push(i);
                jobs.anchors.push(d.anchor);
                jobs.boxes.push(d.bbox);
            }
        }
        if self.masks.is_none() {
            self.masks = Some(GpuMaskDecoder::new(self.ctx.ordinal())?);
        }
        let decoder = self
            .masks
            .as_mut()
            .ok_or_else(|| cuda_error("masks", "not set up"))?;
        let result = decoder.bitmaps(
            &MaskBatch {
                prototypes: protos_ptr,
                shape,
                letterboxes: &placements[..batch],
                images: &jobs.images,
                boxes: &jobs.boxes,
                coefficients: MaskCoefficients::Head {
                    head: output_ptr,
                    channels,
                    anchors,
                    anchor_of: &jobs.anchors,
                },
            },
            &mut jobs.bitmaps,
        );
        if result.is_ok() {
            masks.resize_with(out.len(), Vec::new);
            let mut flat = jobs.bitmaps.drain(..);
            for (dets, image_masks) in out.iter().zip(masks.iter_mut()) {
                image_masks.clear();
                image_masks.extend(flat.by_ref().take(dets.len()));
            }
        }
        self.mask_jobs = jobs;
        result.map(|()| true)
    }

    fn run_and_detect(
        &mut self,
        input: &[f32],
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        // End-to-end models go through run_end_to_end, with the graph's settings.
        if self.end_to_end.is_some() {
            return Ok(false);
        }
        let output_ptr = self.launch_batch(Some(input), batch)?;
        // The post-processor runs on its own stream: the engine's output must be complete.
        self.stream.synchronize()?;
        self.postprocess_on_device(output_ptr, batch, placements, cfg, out)?;
        Ok(true)
    }

    fn detect_frames(
        &mut self,
        frames: &[Frame],
        cfg: &NmsConfig,
        placements: &mut Vec<LetterboxParams>,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        if self.end_to_end.is_some() {
            return Ok(false);
        }
        if self
            .pipeline
            .as_ref()
            .is_some_and(|p| !p.in_flight.is_empty())
        {
            return Err(Error::InvalidArgument(
                "batches started with start_frames are in flight: finish_frames them first".into(),
            ));
        }
        let (n, batch) = self.frames_batch(frames)?;
        let start = std::time::Instant::now();
        self.enqueue_letterbox(frames, batch, placements, None)?;
        self.letterboxer()?.done().synchronize()?;
        let letterboxed = std::time::Instant::now();
        let output_ptr = self.launch_batch(None, batch)?;
        self.stream.synchronize()?;
        let inferred = std::time::Instant::now();
        let placements_now = std::mem::take(placements);
        let result = self.postprocess_on_device(output_ptr, batch, &placements_now, cfg, out);
        *placements = placements_now;
        result?;
        out.truncate(n);
        placements.truncate(n);
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        self.stage_times = Some(StageTimes {
            pre_ms: ms(start, letterboxed),
            infer_ms: ms(letterboxed, inferred),
            post_ms: ms(inferred, std::time::Instant::now()),
        });
        Ok(true)
    }

    fn last_stage_times(&self) -> Option<StageTimes> {
        self.stage_times
    }

    fn start_frames(&mut self, frames: &[Frame], cfg: &NmsConfig) -> Result<bool> {
        if self.end_to_end.is_some() {
            return Ok(false);
        }
        let mut p = match self.pipeline.take() {
            Some(p) => p,
            None => {
                self.ctx
                    .bind_to_thread()
                    .map_err(|e| cuda_error("binding the context", e))?;
                FramePipeline::new(self.info.profile.max * self.info.output_len() * 4)?
            }
        };
        let result = self.start_in(&mut p, frames, cfg);
        self.pipeline = Some(p);
        result.map(|()| true)
    }

    fn finish_frames(
        &mut self,
        placements: &mut Vec<LetterboxParams>,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        let Some(mut p) = self.pipeline.take() else {
            return Ok(false);
        };
        let result = self.finish_in(&mut p, placements, out);
        self.pipeline = Some(p);
        result
    }

    fn device_name(&self) -> Option<String> {
        Some(self.device_name.clone())
    }

    fn layer_choices(&self) -> serde_json::Value {
        // cuDNN algorithm of every floating-point convolution and the tile of every INT8 one, per
        // batch bucket, in plan order.
        let mut per_bucket = serde_json::Map::new();
        let mut int8_tiles = serde_json::Map::new();
        for &b in &self.buckets {
            let algos: Vec<u32> = (0..self.plan.steps.len())
                .filter_map(|i| self.conv_plans.get(&(i, b)).map(|p| p.algo as u32))
                .collect();
            per_bucket.insert(b.to_string(), serde_json::json!(algos));
            let tiles: Vec<&str> = self
                .plan
                .steps
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    Step::Conv {
                        y, int8: Some(_), ..
                    } => {
                        if let Some(t) = self.thin_kernel_of(i, b) {
                            return Some(t.name);
                        }
                        if let Some(t) = self.pointwise_kernel_of(i, b) {
                            return Some(t.name);
                        }
                        let d = self.shape(*y, b);
                        let tile = self
                            .forced_int8_tile
                            .unwrap_or_else(|| int8_tile(d[0] * d[2] * d[3], d[1], self.sm_count));
                        Some(tile.0)
                    }
                    _ => None,
                })
                .collect();
            int8_tiles.insert(b.to_string(), serde_json::json!(tiles));
        }
        let mut fused = serde_json::Map::new();
        for &b in &self.buckets {
            let chosen: serde_json::Map<String, serde_json::Value> = (0..self.plan.steps.len())
                .filter_map(|i| {
                    self.fused
                        .get(&(i, b))
                        .map(|p| (i.to_string(), serde_json::json!(p.label())))
                })
                .collect();
            fused.insert(b.to_string(), serde_json::Value::Object(chosen));
        }
        serde_json::json!({
            "conv_algorithms": per_bucket,
            "int8_tiles": int8_tiles,
            "fused_convolutions": fused,
            "fused_selection": self.fused_selection,
            "concat_copies_written_in_place": self.skipped.len(),
            "split_copies_dropped": self.split_copies_dropped,
            "stem_conv": self.stem_fused,
        })
    }

    fn profile_layers(&mut self, batch: usize) -> Result<Option<Vec<LayerTime>>> {
        let bucket = self.prepare_timing(batch)?;
        self.profile_steps(bucket).map(Some)
    }

    fn time_compute(&mut self, batch: usize, iterations: usize) -> Result<Option<Vec<f64>>> {
        let bucket = self.prepare_timing(batch)?;
        let s = self.stream.0;
        let mut events = Vec::with_capacity(2 * iterations);
        for _ in 0..2 * iterations {
            events.push(Event::new()?);
        }
        for pair in events.chunks(2) {
            // SAFETY: live events and stream; the graph belongs to this engine.
            unsafe { drv::event::record(pair[0].0, s) }
                .map_err(|e| cuda_error("recording an event", e))?;
            match self.graphs.get(&bucket) {
                // SAFETY: as above.
                Some(g) => unsafe { drv::graph::launch(g.0, s) }
                    .map_err(|e| cuda_error("launching the CUDA graph", e))?,
                None => self.enqueue(bucket)?,
            }
            // SAFETY: as above.
            unsafe { drv::event::record(pair[1].0, s) }
                .map_err(|e| cuda_error("recording an event", e))?;
        }
        self.stream.synchronize()?;
        let mut ms = Vec::with_capacity(iterations);
        for pair in events.chunks(2) {
            ms.push(pair[0].elapsed_ms(&pair[1])?);
        }
        Ok(Some(ms))
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        // Fields free device memory as they drop; make sure the context is current for that.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_fused_choices_are_read_for_the_same_buckets_only() {
        let recorded = serde_json::json!({
            "fused_convolutions": {
                "1": {"3": "CUDNN_HEUR_MODE_A #0 (0 B workspace)"},
                "2": {"3": "CUDNN_HEUR_MODE_A #1 (64 B workspace)"},
            },
            "fused_selection": "timed",
        });
        let got = recorded_fused_choices(&recorded, &[1, 2]).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&(3, 2)], "CUDNN_HEUR_MODE_A #1 (64 B workspace)");
        // Other buckets, no record, or a malformed one: time again.
        assert!(recorded_fused_choices(&recorded, &[1, 2, 4]).is_none());
        assert!(recorded_fused_choices(&recorded, &[1, 4]).is_none());
        assert!(recorded_fused_choices(&serde_json::Value::Null, &[1]).is_none());
        let bad = serde_json::json!({"fused_convolutions": {"1": {"x": "a"}}});
        assert!(recorded_fused_choices(&bad, &[1]).is_none());
        // A record where no layer was fused replays as "none fused".
        let none = serde_json::json!({"fused_convolutions": {"1": {}}});
        assert!(recorded_fused_choices(&none, &[1]).unwrap().is_empty());
    }

    #[test]
    fn only_two_row_stride_one_averages_inside_the_input_smooth() {
        // Averages of 160 x 160 input: (rows, columns) of the window, of the stride, the pads,
        // and the output's rows and columns.
        let dx = [8, 256, 160, 160];
        let average = |kernel, stride, pads, (oh, ow)| {
            pool_smooths(false, kernel, stride, pads, &dx, &[8, 256, oh, ow])
        };
        // ADown's 2x2 stride-1 average into 159 x 159.
        assert!(average([2, 2], [1, 1], [0; 4], (159, 159)));
        let ad_down = [8, 256, 159, 159];
        assert!(!pool_smooths(true, [2, 2], [1, 1], [0; 4], &dx, &ad_down));
        // A 3-row window, stride 2 down, padding, or a bottom pad (one more row out).
        assert!(!average([3, 3], [1, 1], [0; 4], (158, 158)));
        assert!(!average([2, 2], [2, 2], [0; 4], (80, 80)));
        assert!(!average([2, 2], [1, 1], [1; 4], (161, 161)));
        assert!(!average([2, 2], [1, 1], [0, 0, 1, 1], (160, 160)));
        // Columns may stride (2 rows x 2 columns, stride 1 x 2), not read past the edge.
        assert!(average([2, 2], [1, 2], [0; 4], (159, 80)));
        assert!(!average([2, 2], [1, 2], [0; 4], (159, 81)));
    }

    #[test]
    fn pool_smooth_grids_cover_rows_and_strips_within_the_launch_limit() {
        // ADown's average at gelan-c batch 8: 159 columns x 16 vectors of 16 int8 channels
        // (2544 threads: 10 blocks) per row; 40 strips of 4 rows per image.
        assert_eq!(pool_smooth_grid(&[8, 256, 159, 159], 16), (10, 320));
        // A short last strip still gets its block row; fp16 vectors of 8 channels.
        assert_eq!(pool_smooth_grid(&[1, 64, 5, 3], 8), (1, 2));
        // Huge launches are capped (the kernel loops over the rest); empty ones get one block.
        assert_eq!(pool_smooth_grid(&[512, 16, 1024, 16], 16).1, 65_535);
        assert_eq!(pool_smooth_grid(&[1, 16, 4, 1 << 22], 16).0, 16_384);
        assert_eq!(pool_smooth_grid(&[0, 16, 4, 4], 16), (1, 1));
    }

    #[test]
    fn buckets_cover_the_profile() {
        assert_eq!(batch_buckets(1, 32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(batch_buckets(1, 3), vec![1, 2, 3]);
        assert_eq!(batch_buckets(4, 4), vec![4]);
        assert_eq!(batch_buckets(3, 12), vec![4, 8, 12]);
        let b = batch_buckets(1, 32);
        assert_eq!(bucket_for(&b, 5), Some(8));
        assert_eq!(bucket_for(&b, 33), None);
    }

    #[test]
    fn int8_tiles_keep_every_multiprocessor_busy() {
        // gelan-c at batch 8, 80x80 pixels, 256 channels: 128 x 64 tiles make 1600 blocks.
        assert_eq!(
            int8_tile(8 * 80 * 80, 256, 132),
            ("conv_int8_m128_n64", 128, 64)
        );
        // Batch 1 at 80x80: 128 x 64 makes 200 blocks, fewer than two per SM: 64 x 64 (400).
        assert_eq!(int8_tile(6400, 256, 132).0, "conv_int8_m64_n64");
        // Batch 1 at 20x20, 512 channels: 64 x 64, 56 blocks, as many as there can be.
        assert_eq!(int8_tile(400, 512, 132).0, "conv_int8_m64_n64");
        // Every tile named exists among the kernels.
        for t in INT8_TILES {
            assert!(KERNEL_NAMES.contains(&t.0));
        }
    }

    /// `base` with one thing changed at a time: the kernel (with `pads`), the stride, the padding
    /// (`pads`), the dilation (padding scaled with it) and the group count.
    fn departures(base: ConvGeometry, kernel: [usize; 2], pads: [usize; 4]) -> Vec<ConvGeometry> {
        vec![
            ConvGeometry {
                kernel,
                pads,
                ..base
            },
            ConvGeometry {
                stride: [2, 2],
                ..base
            },
            ConvGeometry { pads, ..base },
            ConvGeometry {
                dilation: [2, 2],
                pads: base.pads.map(|p| 2 * p),
                ..base
            },
            ConvGeometry { group: 2, ..base },
        ]
    }

    #[test]
    fn thin_kernels_take_3x3_layers_of_32_and_64_channels_only() {
        let g3 = ConvGeometry {
            kernel: [3, 3],
            stride: [1, 1],
            pads: [1; 4],
            dilation: [1, 1],
            group: 1,
        };
        let name = |cin, cout, int8_out| thin_kernel(&g3, cin, cout, int8_out).map(|t| t.name);
        assert_eq!(name(32, 32, true), Some("conv3x3_thin_c32_k32_i8"));
        assert_eq!(name(64, 32, false), Some("conv3x3_thin_c64_k32_f16"));
        assert_eq!(name(32, 64, true), Some("conv3x3_thin_c32_k64_i8"));
        for (cin, cout) in [(16, 32), (32, 48), (128, 128), (64, 128)] {
            assert!(
                thin_kernel(&g3, cin, cout, true).is_none(),
                "{cin} -> {cout}"
            );
        }
        let mut others = departures(g3, [1, 1], [0; 4]);
        others.push(ConvGeometry {
            kernel: [3, 1],
            ..g3
        });
        for g in others {
            assert!(thin_kernel(&g, 32, 32, true).is_none(), "{g:?}");
        }
        // Shared memory (kernels.cu): 32 -> 32 int8: two halos of 10 x 18 x 48 + the filter, 32
        // x 304; 64 -> 64 fp16: the staged output (128 x 144) outgrows the halo (180 x 80), +
        // 64 x 592.
        let bytes = |cin, cout, int8_out| {
            thin_kernel(&g3, cin, cout, int8_out)
                .unwrap()
                .shared_bytes()
        };
        assert_eq!(bytes(32, 32, true), 2 * 8640 + 9728);
        assert_eq!(bytes(64, 64, false), 2 * 18432 + 37888);
        for t in THIN_KERNELS {
            assert!(KERNEL_NAMES.contains(&t.name), "{}", t.name);
            // The name says what the kernel is.
            let want = format!(
                "conv3x3_thin_c{}_k{}_{}",
                t.input_channels,
                t.output_channels,
                if t.int8_out { "i8" } else { "f16" }
            );
            assert_eq!(t.name, want);
            // Within an H100's or H200's 227 KiB of shared memory per block.
            assert!(t.shared_bytes() <= 227 << 10);
        }
    }

    #[test]
    fn pointwise_kernels_take_aligned_1x1_layers_and_size_their_tiles() {
        let g1 = ConvGeometry {
            kernel: [1, 1],
            stride: [1, 1],
            pads: [0; 4],
            dilation: [1, 1],
            group: 1,
        };
        let sms = 132;
        let name = |pixels, cin, cout, int8_out| {
            pointwise_kernel(&g1, pixels, cin, cout, int8_out, sms).map(|k| k.name)
        };
        // gelan-c at batch 8: 160 x 160 and 80 x 80 layers fill the card with 128-pixel tiles,
        // 20 x 20 ones do not; 32 output channels take the narrow tile.
        assert_eq!(
            name(204800, 256, 256, true),
            Some("conv1x1_int8_m128_n64_i8")
        );
        assert_eq!(
            name(51200, 128, 64, false),
            Some("conv1x1_int8_m128_n64_f16")
        );
        assert_eq!(name(3200, 256, 128, true), Some("conv1x1_int8_m64_n64_i8"));
        assert_eq!(name(204800, 64, 32, true), Some("conv1x1_int8_m128_n32_i8"));
        assert_eq!(
            name(12800, 16, 32, false),
            Some("conv1x1_int8_m128_n32_f16")
        );
        // 2 x 64-channel tiles of 128 pixels, against 2 x 132 blocks wanted.
        assert_eq!(
            name(132 * 128, 64, 128, true),
            Some("conv1x1_int8_m128_n64_i8")
        );
        assert_eq!(
            name(132 * 128 - 1, 64, 64, true),
            Some("conv1x1_int8_m64_n64_i8")
        );
        // Channels that would split a 16-byte chunk: the implicit GEMM takes them.
        assert_eq!(name(12800, 24, 64, true), None);
        assert_eq!(name(12800, 64, 8, true), None);
        assert_eq!(name(12800, 64, 1, false), None);
        assert_eq!(name(12800, 64, 8, false), Some("conv1x1_int8_m128_n32_f16"));
        assert_eq!(name(0, 64, 64, true), None);
        for g in departures(g1, [3, 3], [1; 4]) {
            assert!(
                pointwise_kernel(&g, 12800, 64, 64, true, sms).is_none(),
                "{g:?}"
            );
        }
        for k in POINTWISE_KERNELS {
            assert!(KERNEL_NAMES.contains(&k.name), "{}", k.name);
            let want = format!(
                "conv1x1_int8_m{}_n{}_{}",
                k.tile.0,
                k.tile.1,
                if k.int8_out { "i8" } else { "f16" }
            );
            assert_eq!(k.name, want);
            // The staged output fits where the reduction tiles were (the kernel's static_assert).
            let out_row = k.tile.1 * if k.int8_out { 1 } else { 2 } + 16;
            assert!(k.tile.0 * out_row <= k.shared_bytes(), "{}", k.name);
            // Without the opt-in above 48 KiB.
            assert!(k.shared_bytes() <= 48 << 10, "{}", k.name);
        }
    }

    #[test]
    fn broadcast_and_transpose_metadata() {
        // [1,2,A] (anchors) against [B,2,A].
        let m = broadcast_meta(&[1, 2, 5], &[3, 2, 5], &[3, 2, 5]);
        assert_eq!(m, vec![3, 3, 2, 5, 0, 5, 1, 10, 5, 1]);
        // A scalar-like [1] against [2,3].
        let m = broadcast_meta(&[2, 3], &[1], &[2, 3]);
        assert_eq!(m, vec![2, 2, 3, 3, 1, 0, 0]);
        // [B,4,16,A] -> perm [0,2,1,3].
        let m = transpose_meta(&[2, 4, 16, 7], &[0, 2, 1, 3]);
        assert_eq!(m, vec![4, 2, 16, 4, 7, 448, 7, 112, 1]);
    }

    #[test]
    fn engine_files_decide_the_stem_for_themselves() {
        // A file's steps are what its choices index: a recorded stem is replayed, files without
        // the record (made before the stem kernel) keep the unfused stem whatever is asked now.
        set_stem_conv(Some(true));
        assert!(stem_wanted(None));
        assert!(!stem_wanted(Some(
            &serde_json::json!({"conv_algorithms": {}})
        )));
        assert!(!stem_wanted(Some(&serde_json::json!({"stem_conv": false}))));
        set_stem_conv(Some(false));
        assert!(!stem_wanted(None));
        assert!(stem_wanted(Some(&serde_json::json!({"stem_conv": true}))));
        set_stem_conv(None);
    }

    #[test]
    fn stem_filters_are_rows_of_32_taps() {
        // k = 2: OIHW value = 100 k + tap (exact in fp16).
        let dims = [2, 3, 3, 3];
        let oihw: Vec<f32> = (0..2)
            .flat_map(|k| (0..27).map(move |t| (100 * k + t) as f32))
            .collect();
        let rows = stem_filter_rows(&oihw, &dims);
        assert_eq!(rows.len(), 64);
        for k in 0..2 {
            for t in 0..32 {
                let want = if t < 27 { (100 * k + t) as f32 } else { 0.0 };
                assert_eq!(rows[k * 32 + t], f32_to_f16_bits(want), "k {k} tap {t}");
            }
        }
    }

    /// Kernel sources compile with NVRTC where the library is present (CI installs it in the venv).
    #[test]
    fn kernels_compile_with_nvrtc_when_present() {
        // SAFETY: only probes for the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            // scripts/test.sh (CI) installs NVRTC and sets this, so there the check cannot be skipped.
            assert!(
                std::env::var_os("KESTREL_REQUIRE_NVRTC").is_none(),
                "KESTREL_REQUIRE_NVRTC is set but libnvrtc.so.13 is not on LD_LIBRARY_PATH"
            );
            eprintln!("NVRTC not found: kernel compilation not checked here");
            return;
        }
        let arch = Some("compute_80");
        let sources: [(&str, Result<String>, &[&str]); 4] = [
            (
                "kernels.cu",
                compile_kernels(arch, device::int8_stages()),
                &KERNEL_NAMES,
            ),
            (
                "pre.cu",
                pre::compile_pre_kernels(arch),
                &pre::PRE_KERNEL_NAMES,
            ),
            (
                "post.cu",
                post::compile_post_kernels(arch),
                &post::POST_KERNEL_NAMES,
            ),
            (
                "masks.cu",
                masks::compile_mask_kernels(arch),
                &masks::MASK_KERNEL_NAMES,
            ),
        ];
        for (file, ptx, names) in sources {
            let ptx = ptx.unwrap_or_else(|e| panic!("{file} does not compile: {e}"));
            for name in names {
                assert!(
                    ptx.contains(&format!(".entry {name}")),
                    "{name} missing from the PTX of {file}"
                );
            }
        }
    }
}
