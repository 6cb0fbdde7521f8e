//! The `tensorrt` backend (cargo feature `tensorrt`): TensorRT 11 engines behind [`Engine`].
//!
//! Build: TensorRT's ONNX parser fills a strongly typed network (INT8 where the model's Q/DQ
//! says so, FP16 where the model is typed FP16; [`options::check_precision`] refuses a precision
//! the types do not express), the builder config gets the workspace limit, the timing cache file
//! (reused across builds), one optimization profile from the engine's `min:opt:max` batch, and the
//! hardware-/version-compatibility options ([`options::TensorrtOptions`], `KESTREL_TRT_*`). The
//! serialized plan goes into Kestrel's engine file beside the ONNX.
//!
//! Run: the input and outputs are bound by name to device buffers sized for the largest batch;
//! each batch bucket (the `cuda` backend's buckets) gets `setInputShape`, one warm-up `enqueueV3`
//! on a non-default stream, then one captured CUDA graph (TensorRT's rule for graphs with dynamic
//! shapes). Detection post-processing on the GPU is the `cuda` backend's ([`GpuPostprocessor`]).
//!
//! TensorRT is reached through a C++ shim (`shim/kestrel_trt.cpp`, compiled by build.rs against
//! the TensorRT 11 headers) and libnvinfer / libnvonnxparser opened at run time ([`library`]).
//! Without them every entry point returns an error naming the missing library and the fix.
//! TensorRT has never run on the machines this project is built and tested on: see
//! docs/tensorrt.md for what has and has not been executed.
#![allow(unsafe_code)]

mod ffi;
pub mod library;
pub mod options;

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};
use kestrel_exporter::onnx::pb;

use crate::cuda::device::{DeviceBuffer, Event, GraphExec, PinnedBuffer, Stream};
use crate::cuda::post::{GpuPostprocessor, HeadElement};
use crate::cuda::{batch_buckets, bucket_for};
use crate::detection::Detection;
use crate::engine::{Engine, EngineInfo};
use crate::engine_file::BuildEnvironment;
use crate::error::{Error, Result};
use crate::letterbox::LetterboxParams;
use crate::nms::NmsConfig;
use ffi::{KT_OK, KtBlob, KtBuildConfig, LogSink};
use library::{Library, Version};
use options::{ModelTypes, TensorrtOptions};

pub use library::{LIBNVINFER, LIBNVONNXPARSER};

/// A `tensorrt` backend error.
pub fn trt_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "tensorrt",
        message: message.into(),
    }
}

/// The TensorRT version of the headers the shim was compiled against.
pub fn header_version() -> Option<Version> {
    // SAFETY: returns a constant.
    Version::from_int(unsafe { ffi::kt_header_version() })
}

/// What `kestrel doctor` reports about TensorRT's libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryReport {
    /// libnvinfer's version, or why it cannot be used.
    pub nvinfer: std::result::Result<String, String>,
    /// libnvonnxparser's version, or why it cannot be used (engines can then be loaded, not built).
    pub onnx_parser: std::result::Result<String, String>,
    /// The TensorRT version of the headers this build was compiled against.
    pub headers: String,
}

/// The state of libnvinfer and libnvonnxparser on this machine (opens them; never panics).
pub fn library_report() -> LibraryReport {
    let headers = header_version().map_or_else(|| "unknown".into(), |v| v.to_string());
    match Library::get() {
        Err(e) => LibraryReport {
            nvinfer: Err(e),
            onnx_parser: Err("not checked: libnvinfer is missing".into()),
            headers,
        },
        Ok(lib) => LibraryReport {
            nvinfer: Ok(lib.version.to_string()),
            onnx_parser: match (&lib.parser_version, lib.parser()) {
                (Some(v), Ok(_)) => Ok(v.to_string()),
                (_, Err(e)) => Err(e),
                (None, Ok(_)) => Ok("unknown".into()),
            },
            headers,
        },
    }
}

/// The GPU: the driver loaded and initialised, GPU `ordinal`'s context, name and compute
/// capability.
/// TensorRT needs neither cuDNN nor NVRTC, so unlike the `cuda` backend this checks the driver
/// only.
fn gpu(ordinal: usize) -> Result<(Arc<CudaContext>, String, (i32, i32))> {
    // SAFETY: only tries to open the driver library.
    if !unsafe { dsys::is_culib_present() } {
        return Err(trt_error(
            "no NVIDIA driver on this machine (libcuda.so.1 not found); TensorRT needs an NVIDIA \
             GPU and its driver, or use --backend cpu",
        ));
    }
    drv::init()
        .map_err(|e| trt_error(format!("the NVIDIA driver failed to initialise ({e:?})")))?;
    match drv::device::get_count() {
        Ok(0) => {
            return Err(trt_error(
                "the NVIDIA driver reports no GPU; use --backend cpu",
            ));
        }
        Err(e) => return Err(trt_error(format!("cannot count GPUs ({e:?})"))),
        Ok(n) => {
            if let Some(m) = crate::cuda::device::missing_gpu(ordinal, n.max(0) as usize) {
                return Err(trt_error(m));
            }
        }
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| trt_error(format!("opening GPU {ordinal}: {e:?}")))?;
    let name = ctx
        .name()
        .map_err(|e| trt_error(format!("reading the GPU's name: {e:?}")))?;
    let cc = ctx
        .compute_capability()
        .map_err(|e| trt_error(format!("reading the compute capability: {e:?}")))?;
    Ok((ctx, name, cc))
}

/// Why the `tensorrt` backend cannot run here, if it cannot (libraries first, then the GPU).
pub fn unavailable_reason() -> Option<String> {
    if let Err(e) = Library::get() {
        return Some(e);
    }
    gpu(0).err().map(|e| e.to_string())
}

fn library() -> Result<&'static Library> {
    Library::get().map_err(trt_error)
}

fn options() -> Result<TensorrtOptions> {
    TensorrtOptions::from_env().map_err(Error::InvalidArgument)
}

/// The environment engine headers record for TensorRT `version` with `options` on `device`:
/// the TensorRT version and the plan-changing options are keyed, so a change of either (or of the
/// GPU) rebuilds the engine and says why.
pub fn environment_for(
    version: Version,
    options: &TensorrtOptions,
    device: String,
    compute_capability: (i32, i32),
) -> BuildEnvironment {
    BuildEnvironment {
        backend_versions: [
            ("tensorrt".to_string(), version.to_string()),
            ("tensorrt_options".to_string(), options.key()),
        ]
        .into(),
        device,
        compute_capability: Some(compute_capability),
    }
}

/// The build environment here: libnvinfer's version, the options, GPU `ordinal`.
pub fn build_environment(ordinal: usize) -> Result<BuildEnvironment> {
    let lib = library()?;
    let options = options()?;
    let (_, name, cc) = gpu(ordinal)?;
    Ok(environment_for(lib.version, &options, name, cc))
}

// ---- RAII handles over the shim's objects -------------------------------------------------------

macro_rules! handle {
    ($name:ident, $free:path) => {
        struct $name(*mut c_void);
        impl Drop for $name {
            fn drop(&mut self) {
                if !self.0.is_null() {
                    // SAFETY: created by the shim, freed once.
                    unsafe { $free(self.0) };
                }
            }
        }
    };
}
handle!(LoggerHandle, ffi::kt_logger_free);
handle!(RuntimeHandle, ffi::kt_runtime_free);
handle!(EngineHandle, ffi::kt_engine_free);
handle!(ContextHandle, ffi::kt_context_free);

/// A blob TensorRT owns, released on drop.
struct Blob(KtBlob);

impl Blob {
    fn bytes(&self) -> &[u8] {
        if self.0.data.is_null() {
            return &[];
        }
        // SAFETY: the shim's blob holds `len` bytes at `data` until freed.
        unsafe { std::slice::from_raw_parts(self.0.data.cast::<u8>(), self.0.len as usize) }
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        // SAFETY: a blob from the shim (or empty), freed once.
        unsafe { ffi::kt_blob_free(&mut self.0) };
    }
}

/// TensorRT's logger, collecting warnings and errors for error messages. The sink is boxed so
/// its address, which the shim keeps, stays fixed.
struct Logger {
    handle: LoggerHandle,
    sink: Box<LogSink>,
}

impl Logger {
    fn new() -> Result<Self> {
        let sink = Box::new(LogSink::default());
        // SAFETY: the sink outlives the logger (dropped after it, see field order).
        let handle = unsafe {
            ffi::kt_logger_new(
                ffi::log_to_sink,
                (&*sink as *const LogSink).cast_mut().cast(),
            )
        };
        if handle.is_null() {
            return Err(trt_error("cannot create TensorRT's logger (out of memory)"));
        }
        Ok(Self {
            handle: LoggerHandle(handle),
            sink,
        })
    }

    fn failure(&self, step: &str, status: i32) -> Error {
        trt_error(ffi::describe_failure(step, status, &self.sink.take()))
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| trt_error(format!("tensor name {s:?} contains a NUL byte")))
}

/// Build a serialized plan for `model` (`onnx` its bytes) as `info` describes it, on GPU
/// `ordinal`.
pub fn build_plan(
    model: &pb::ModelProto,
    onnx: &[u8],
    info: &EngineInfo,
    path: &Path,
    ordinal: usize,
) -> Result<Vec<u8>> {
    let lib = library()?;
    let create_parser = lib.parser().map_err(trt_error)?;
    options::check_precision(info.precision, ModelTypes::of(model)).map_err(|m| Error::Model {
        path: path.to_path_buf(),
        message: m,
    })?;
    let options = options()?;
    let (ctx, device, _) = gpu(ordinal)?;
    ctx.bind_to_thread()
        .map_err(|e| trt_error(format!("binding the GPU context: {e:?}")))?;
    let cache_path = options.timing_cache.clone().unwrap_or_else(|| {
        options::timing_cache_path(
            &crate::engine_file::EngineCache::default_location().dir,
            &lib.version.to_string(),
            &device,
        )
    });
    // A missing or unreadable timing cache only makes the build slower.
    let previous = std::fs::read(&cache_path).ok();
    let settings = options::builder_settings(info.profile, info.input_hw, &options);
    let input_name = cstring(&info.input_name)?;
    let cfg = KtBuildConfig {
        input_name: input_name.as_ptr(),
        channels: settings.chw[0],
        height: settings.chw[1],
        width: settings.chw[2],
        batch_min: settings.batch[0],
        batch_opt: settings.batch[1],
        batch_max: settings.batch[2],
        workspace_bytes: settings.workspace_bytes,
        hardware_compatibility: settings.hardware_compatibility,
        version_compatible: i32::from(settings.version_compatible),
        exclude_lean_runtime: i32::from(settings.exclude_lean_runtime),
        optimization_level: settings.optimization_level,
        timing_cache: previous
            .as_ref()
            .map_or(std::ptr::null(), |b| b.as_ptr().cast()),
        timing_cache_len: previous.as_ref().map_or(0, |b| b.len() as u64),
    };
    let logger = Logger::new()?;
    let mut plan = Blob(KtBlob::empty());
    let mut cache = Blob(KtBlob::empty());
    let mut cache_reset = 0i32;
    // SAFETY: every pointer is live for the call; the blobs are written by the shim and released
    // by `Blob`'s drop.
    let status = unsafe {
        ffi::kt_build(
            lib.create_builder,
            create_parser,
            logger.handle.0,
            onnx.as_ptr().cast(),
            onnx.len() as u64,
            &cfg,
            &mut plan.0,
            &mut cache.0,
            &mut cache_reset,
        )
    };
    if status != KT_OK {
        return Err(logger.failure(&format!("building {}", path.display()), status));
    }
    if !cache.bytes().is_empty() {
        if let Some(dir) = cache_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        crate::engine_file::write_atomic(&cache_path, cache.bytes())?;
    }
    Ok(plan.bytes().to_vec())
}

/// One tensor of the engine, bound by name to a device buffer.
struct Binding {
    name: CString,
    buffer: DeviceBuffer,
    /// Values per image.
    per_image: usize,
    half: bool,
}

/// A TensorRT engine on GPU 0.
pub struct TensorrtEngine {
    // Field order is drop order: TensorRT's objects and graphs before the memory they use, the
    // context last.
    post: Option<GpuPostprocessor>,
    graphs: HashMap<usize, GraphExec>,
    context: ContextHandle,
    _engine: EngineHandle,
    _runtime: RuntimeHandle,
    logger: Logger,
    input: Binding,
    output: Binding,
    prototypes: Option<Binding>,
    pinned_in: PinnedBuffer,
    pinned_out: PinnedBuffer,
    pinned_protos: PinnedBuffer,
    host_out: Vec<f32>,
    host_protos: Vec<f32>,
    /// The bucket whose input shape the execution context holds now.
    shape_bucket: Option<usize>,
    buckets: Vec<usize>,
    info: EngineInfo,
    plan: Vec<u8>,
    version: Version,
    options_key: String,
    device: String,
    stream: Stream,
    ctx: Arc<CudaContext>,
}

// SAFETY: every handle is owned by this value and used only through `&mut self`, with the CUDA
// context bound to the calling thread first.
unsafe impl Send for TensorrtEngine {}

impl TensorrtEngine {
    /// Build from `model` (bytes `onnx`) as `info` says, or deserialize `recorded_plan` (an engine
    /// file's plan, made in this environment).
    pub fn new(
        model: &pb::ModelProto,
        onnx: &[u8],
        info: EngineInfo,
        path: &Path,
        recorded_plan: Option<&[u8]>,
        ordinal: usize,
    ) -> Result<Self> {
        let plan = match recorded_plan.filter(|p| !p.is_empty()) {
            Some(p) => p.to_vec(),
            None => build_plan(model, onnx, &info, path, ordinal)?,
        };
        Self::from_plan(plan, info, path, ordinal)
    }

    fn from_plan(plan: Vec<u8>, info: EngineInfo, path: &Path, ordinal: usize) -> Result<Self> {
        let lib = library()?;
        let options = options()?;
        let (ctx, device, _) = gpu(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| trt_error(format!("binding the GPU context: {e:?}")))?;
        let logger = Logger::new()?;
        // SAFETY: the factory from libnvinfer and a live logger (which outlives the runtime).
        let runtime = RuntimeHandle(unsafe {
            ffi::kt_runtime_new(
                lib.create_runtime,
                logger.handle.0,
                i32::from(options.version_compatible),
            )
        });
        if runtime.0.is_null() {
            return Err(logger.failure("creating TensorRT's runtime", 10));
        }
        // SAFETY: a live runtime and the plan's bytes for the call.
        let engine = EngineHandle(unsafe {
            ffi::kt_engine_new(runtime.0, plan.as_ptr().cast(), plan.len() as u64)
        });
        if engine.0.is_null() {
            return Err(logger.failure(
                &format!(
                    "loading the plan of {} (rebuild it with `kestrel build`)",
                    path.display()
                ),
                11,
            ));
        }
        let max = info.profile.max;
        let io = io_tensors(&engine)?;
        let expect = |name: &str| -> Result<bool> {
            match io.iter().find(|t| t.0 == name) {
                Some((_, _, 0)) => Ok(false),
                Some((_, _, 1)) => Ok(true),
                Some((_, _, t)) => Err(trt_error(format!(
                    "tensor '{name}' has TensorRT data type {t}; Kestrel reads float32 or float16"
                ))),
                None => Err(trt_error(format!(
                    "the plan has no tensor '{name}' (its tensors: {}); rebuild it from the ONNX",
                    io.iter()
                        .map(|t| t.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        if expect(&info.input_name)? {
            return Err(trt_error(format!(
                "input '{}' is float16 in the plan; Kestrel feeds float32 images (export with a \
                 float32 input)",
                info.input_name
            )));
        }
        let output_half = expect(&info.output_name)?;
        let protos_half = match &info.prototypes {
            Some(_) => Some(expect(&info.prototypes_name)?),
            None => None,
        };
        let binding = |name: &str, per_image: usize, half: bool| -> Result<Binding> {
            let bytes = max * per_image * if half { 2 } else { 4 };
            Ok(Binding {
                name: cstring(name)?,
                buffer: DeviceBuffer::new(bytes)?,
                per_image,
                half,
            })
        };
        let input = binding(&info.input_name, info.input_len(), false)?;
        let output = binding(&info.output_name, info.output_len(), output_half)?;
        let prototypes = match (info.prototypes, protos_half) {
            (Some(p), Some(half)) => Some(binding(
                &info.prototypes_name,
                crate::masks::MASK_COEFFICIENTS * p.width * p.height,
                half,
            )?),
            _ => None,
        };
        // SAFETY: a live engine.
        let context = ContextHandle(unsafe { ffi::kt_context_new(engine.0) });
        if context.0.is_null() {
            return Err(logger.failure("creating an execution context", 12));
        }
        let mut me = Self {
            post: None,
            graphs: HashMap::new(),
            context,
            _engine: engine,
            _runtime: runtime,
            pinned_in: PinnedBuffer::new(input.buffer.bytes)?,
            pinned_out: PinnedBuffer::new(output.buffer.bytes)?,
            pinned_protos: PinnedBuffer::new(prototypes.as_ref().map_or(4, |p| p.buffer.bytes))?,
            host_out: Vec::new(),
            host_protos: Vec::new(),
            logger,
            input,
            output,
            prototypes,
            shape_bucket: None,
            buckets: batch_buckets(info.profile.min, info.profile.max),
            info,
            plan,
            version: lib.version,
            options_key: options.key(),
            device,
            stream: Stream::new()?,
            ctx,
        };
        me.bind_addresses()?;
        me.prepare_buckets()?;
        Ok(me)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| trt_error(format!("binding the GPU context: {e:?}")))
    }

    /// Every tensor's address, once: the buffers hold the largest batch, so every bucket uses them.
    fn bind_addresses(&mut self) -> Result<()> {
        let bindings = [
            Some(&self.input),
            Some(&self.output),
            self.prototypes.as_ref(),
        ];
        for b in bindings.into_iter().flatten() {
            // SAFETY: a live context; the buffer lives as long as the context (field order).
            let status = unsafe {
                ffi::kt_context_set_tensor_address(
                    self.context.0,
                    b.name.as_ptr(),
                    b.buffer.ptr as *mut c_void,
                )
            };
            if status != KT_OK {
                return Err(self
                    .logger
                    .failure(&format!("binding tensor {:?}", b.name), status));
            }
        }
        Ok(())
    }

    /// Put bucket `b`'s input shape on the context and check the outputs' shapes it gives.
    fn set_bucket_shape(&mut self, b: usize) -> Result<()> {
        if self.shape_bucket == Some(b) {
            return Ok(());
        }
        let [h, w] = self.info.input_hw;
        let dims = [b as i64, 3, h as i64, w as i64];
        // SAFETY: a live context, a 4-element shape.
        let status = unsafe {
            ffi::kt_context_set_input_shape(
                self.context.0,
                self.input.name.as_ptr(),
                dims.as_ptr(),
                4,
            )
        };
        if status != KT_OK {
            return Err(self
                .logger
                .failure(&format!("setting the input shape {dims:?}"), status));
        }
        let mut out = [0i64; 8];
        // SAFETY: a live context, an 8-element buffer.
        let rank = unsafe {
            ffi::kt_context_shape(
                self.context.0,
                self.output.name.as_ptr(),
                out.as_mut_ptr(),
                8,
            )
        };
        let want = [
            b as i64,
            self.info.output_channels as i64,
            self.info.anchors as i64,
        ];
        if rank != 3 || out[..3] != want {
            return Err(trt_error(format!(
                "output '{}' has shape {:?} at batch {b}, expected {want:?}; rebuild the engine",
                self.info.output_name,
                &out[..rank.clamp(0, 8) as usize]
            )));
        }
        self.shape_bucket = Some(b);
        Ok(())
    }

    fn enqueue(&mut self) -> Result<()> {
        // SAFETY: a live context whose tensors are bound; the stream belongs to the bound context.
        let status = unsafe { ffi::kt_context_enqueue(self.context.0, self.stream.0.cast()) };
        if status != KT_OK {
            return Err(self.logger.failure("running the engine", status));
        }
        Ok(())
    }

    /// Per bucket: the input shape, a warm-up enqueue (TensorRT allocates and selects kernels for
    /// the shape there), then a CUDA graph of one enqueue. `KESTREL_CUDA_GRAPHS=0`: eager only.
    fn prepare_buckets(&mut self) -> Result<()> {
        let graphs_on = std::env::var("KESTREL_CUDA_GRAPHS").map_or(true, |v| v != "0");
        for b in self.buckets.clone() {
            self.set_bucket_shape(b)?;
            self.enqueue()?;
            self.stream.synchronize()?;
            if graphs_on {
                let graph = self.capture()?;
                self.graphs.insert(b, graph);
            }
        }
        Ok(())
    }

    fn capture(&mut self) -> Result<GraphExec> {
        let s = self.stream.0;
        // SAFETY: a live stream not already capturing.
        unsafe {
            drv::stream::begin_capture(
                s,
                dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| trt_error(format!("starting graph capture: {e:?}")))?;
        let enqueued = self.enqueue();
        // SAFETY: ends the capture begun above, whatever happened in between.
        let graph = unsafe { drv::stream::end_capture(s) };
        enqueued?;
        let graph = graph.map_err(|e| trt_error(format!("ending graph capture: {e:?}")))?;
        // SAFETY: a graph returned by end_capture; destroyed after instantiation.
        let exec = unsafe { drv::graph::instantiate(graph, dsys::CUgraphInstantiate_flags(0)) };
        // SAFETY: the graph handle from above, destroyed once.
        let _ = unsafe { drv::graph::destroy(graph) };
        exec.map(GraphExec)
            .map_err(|e| trt_error(format!("instantiating the CUDA graph: {e:?}")))
    }

    fn check_batch(&self, input_len: Option<usize>, batch: usize) -> Result<usize> {
        let bucket = bucket_for(&self.buckets, batch)
            .filter(|_| self.info.profile.contains(batch))
            .ok_or_else(|| {
                Error::Shape(format!(
                    "batch of {batch} outside the engine's profile {}",
                    self.info.profile
                ))
            })?;
        if let Some(len) = input_len
            && len != batch * self.info.input_len()
        {
            return Err(Error::Shape(format!(
                "{len} input values for {batch} images of {}",
                self.info.input_len()
            )));
        }
        Ok(bucket)
    }

    /// Upload `input` (when given) and run its bucket: the graph, or an eager enqueue.
    fn launch(&mut self, input: Option<&[f32]>, batch: usize) -> Result<()> {
        let bucket = self.check_batch(input.map(<[f32]>::len), batch)?;
        self.bind()?;
        if let Some(input) = input {
            self.pinned_in.as_f32_mut()[..input.len()].copy_from_slice(input);
            let bytes = &self.pinned_in.as_bytes()[..bucket * self.input.per_image * 4];
            // SAFETY: the device buffer holds the largest bucket; pinned memory stays alive and
            // unchanged until the stream is synchronised by the caller.
            unsafe { drv::memcpy_htod_async(self.input.buffer.ptr, bytes, self.stream.0) }
                .map_err(|e| trt_error(format!("uploading the batch: {e:?}")))?;
        }
        match self.graphs.get(&bucket) {
            // SAFETY: a graph instantiated for this engine's memory.
            Some(g) => unsafe { drv::graph::launch(g.0, self.stream.0) }
                .map_err(|e| trt_error(format!("launching the CUDA graph: {e:?}")))?,
            None => {
                self.set_bucket_shape(bucket)?;
                self.enqueue()?;
            }
        }
        Ok(())
    }

    /// Copy the first `batch` images of `b` to `pinned`, then to `host` as float32.
    fn download(
        b: &Binding,
        pinned: &mut PinnedBuffer,
        host: &mut Vec<f32>,
        batch: usize,
        stream: &Stream,
    ) -> Result<()> {
        let n = batch * b.per_image;
        let elem = if b.half { 2 } else { 4 };
        let dst = &mut pinned.as_bytes_mut()[..n * elem];
        // SAFETY: the device buffer holds at least n elements; synchronised right after.
        unsafe { drv::memcpy_dtoh_async(dst, b.buffer.ptr, stream.0) }
            .map_err(|e| trt_error(format!("downloading an output: {e:?}")))?;
        stream.synchronize()?;
        host.clear();
        if b.half {
            host.extend(
                pinned.as_bytes()[..n * 2]
                    .chunks_exact(2)
                    .map(|c| crate::half::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
            );
        } else {
            host.extend_from_slice(&pinned.as_f32()[..n]);
        }
        Ok(())
    }
}

/// The engine's I/O tensors: (name, mode 1 input / 2 output, TensorRT data type).
fn io_tensors(engine: &EngineHandle) -> Result<Vec<(String, i32, i32)>> {
    // SAFETY: a live engine; names are NUL-terminated strings the engine owns.
    unsafe {
        let n = ffi::kt_engine_io_count(engine.0);
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for i in 0..n {
            let name = ffi::kt_engine_io_name(engine.0, i);
            if name.is_null() {
                return Err(trt_error(format!("the plan's tensor {i} has no name")));
            }
            let text = std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned();
            out.push((
                text,
                ffi::kt_engine_io_mode(engine.0, name),
                ffi::kt_engine_io_dtype(engine.0, name),
            ));
        }
        Ok(out)
    }
}

impl Engine for TensorrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]> {
        self.launch(Some(input), batch)?;
        Self::download(
            &self.output,
            &mut self.pinned_out,
            &mut self.host_out,
            batch,
            &self.stream,
        )?;
        Ok(&self.host_out)
    }

    fn run_with_prototypes(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<(&[f32], Option<&[f32]>)> {
        self.launch(Some(input), batch)?;
        Self::download(
            &self.output,
            &mut self.pinned_out,
            &mut self.host_out,
            batch,
            &self.stream,
        )?;
        if let Some(p) = &self.prototypes {
            Self::download(
                p,
                &mut self.pinned_protos,
                &mut self.host_protos,
                batch,
                &self.stream,
            )?;
            return Ok((&self.host_out, Some(&self.host_protos)));
        }
        Ok((&self.host_out, None))
    }

    fn time_compute(&mut self, batch: usize, iterations: usize) -> Result<Option<Vec<f64>>> {
        self.launch(None, batch)?;
        self.stream.synchronize()?;
        let events: Vec<(Event, Event)> = (0..iterations)
            .map(|_| Ok((Event::new()?, Event::new()?)))
            .collect::<Result<_>>()?;
        for (start, end) in &events {
            start.record(&self.stream)?;
            self.launch(None, batch)?;
            end.record(&self.stream)?;
        }
        self.stream.synchronize()?;
        events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b))
            .collect::<Result<Vec<f64>>>()
            .map(Some)
    }

    fn layer_choices(&self) -> serde_json::Value {
        serde_json::json!({
            "tensorrt": self.version.to_string(),
            "options": self.options_key,
            "plan_bytes": self.plan.len(),
            "buckets": self.buckets,
            "output_fp16": self.output.half,
        })
    }

    fn serialized_plan(&self) -> Option<&[u8]> {
        Some(&self.plan)
    }

    fn device_name(&self) -> Option<String> {
        Some(self.device.clone())
    }

    fn run_and_detect(
        &mut self,
        input: &[f32],
        batch: usize,
        placements: &[LetterboxParams],
        cfg: &NmsConfig,
        out: &mut Vec<Vec<Detection>>,
    ) -> Result<bool> {
        if self.post.is_none() {
            self.bind()?;
            // The post-processor's kernels need NVRTC (and its context check cuDNN): where they
            // are missing, say "no device post-processing" and the detector decodes on the CPU.
            match GpuPostprocessor::new(
                self.ctx.ordinal(),
                self.info.profile.max,
                self.info.num_classes,
                self.info.output_channels,
                self.info.anchors,
            ) {
                Ok(p) => self.post = Some(p),
                Err(_) => return Ok(false),
            }
        }
        self.launch(Some(input), batch)?;
        // The post-processor runs on its own stream: the engine's output must be complete.
        self.stream.synchronize()?;
        let element = if self.output.half {
            HeadElement::F16
        } else {
            HeadElement::F32
        };
        let ptr = self.output.buffer.ptr;
        let Some(post) = self.post.as_mut() else {
            return Ok(false);
        };
        post.run_device_as(ptr, element, batch, placements, cfg, out)?;
        Ok(true)
    }
}

impl Drop for TensorrtEngine {
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
    fn environments_key_the_version_options_and_gpu() {
        let v = Version::from_int(110400).unwrap();
        let o = TensorrtOptions::default();
        let a = environment_for(v, &o, "NVIDIA H100".into(), (9, 0));
        assert_eq!(a.backend_versions["tensorrt"], "11.4.0");
        assert_eq!(a.backend_versions["tensorrt_options"], o.key());
        assert_eq!(a.compute_capability, Some((9, 0)));
        let options = crate::engine::BuildOptions {
            backend: crate::engine::Backend::Tensorrt,
            precision: crate::engine::Precision::Int8,
            profile: crate::engine::BatchProfile {
                min: 1,
                opt: 8,
                max: 32,
            },
            device: 0,
        };
        let header = crate::engine_file::EngineHeader::new(b"onnx", &options, &a);
        assert_eq!(header.backend, "tensorrt");
        assert_eq!(header.profile, [1, 8, 32]);
        assert_eq!(header.mismatch(&a), None);
        // A newer TensorRT: rebuild, and say why.
        let b = environment_for(
            Version::from_int(110500).unwrap(),
            &o,
            "NVIDIA H100".into(),
            (9, 0),
        );
        let why = header.mismatch(&b).unwrap();
        assert!(
            why.contains("tensorrt 11.4.0") && why.contains("tensorrt 11.5.0"),
            "{why}"
        );
        assert_ne!(
            header.cache_key(),
            crate::engine_file::EngineHeader::new(b"onnx", &options, &b).cache_key()
        );
        // Another GPU.
        let c = environment_for(v, &o, "NVIDIA H200".into(), (9, 0));
        let why = header.mismatch(&c).unwrap();
        assert!(
            why.contains("built for NVIDIA H100 (sm_90), this machine has NVIDIA H200"),
            "{why}"
        );
        // Other builder options.
        let hw = TensorrtOptions {
            hardware_compatibility: options::HardwareCompatibility::AmperePlus,
            ..Default::default()
        };
        let d = environment_for(v, &hw, "NVIDIA H100".into(), (9, 0));
        assert!(
            header
                .mismatch(&d)
                .unwrap()
                .contains("hardware=ampere-plus")
        );
    }

    #[test]
    fn without_libnvinfer_every_entry_point_names_it() {
        if Library::get().is_ok() {
            eprintln!("libnvinfer is installed here: this test checks machines without it");
            return;
        }
        let check = |e: String| {
            assert!(e.contains(LIBNVINFER), "{e}");
            assert!(
                e.contains("LD_LIBRARY_PATH") && e.contains("install TensorRT 11"),
                "{e}"
            );
        };
        check(unavailable_reason().expect("unavailable without libnvinfer"));
        check(build_environment(0).unwrap_err().to_string());
        let report = library_report();
        check(report.nvinfer.clone().unwrap_err());
        assert_eq!(report.headers, "11.4.0");
        // A tiny detector: images [1, 3, 4, 4] reshaped to output0 [1, 6, 8] (2 classes).
        let onnx = tiny_detector();
        let model = kestrel_exporter::onnx::decode_model(&onnx, Path::new("m.onnx")).unwrap();
        let options = crate::engine::BuildOptions {
            backend: crate::engine::Backend::Tensorrt,
            precision: crate::engine::Precision::Fp32,
            profile: crate::engine::BatchProfile::fixed(1),
            device: 0,
        };
        let info = crate::engine::describe_model(&model, Path::new("m.onnx"), &options).unwrap();
        check(
            build_plan(&model, &onnx, &info, Path::new("m.onnx"), 0)
                .unwrap_err()
                .to_string(),
        );
        check(
            TensorrtEngine::new(&model, &onnx, info, Path::new("m.onnx"), Some(b"plan"), 0)
                .err()
                .expect("no engine without libnvinfer")
                .to_string(),
        );
        // Through the runtime's entry points: an ONNX file, and an engine file holding a plan.
        let dir = std::env::temp_dir().join(format!("kestrel-trt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let onnx_path = dir.join("m.onnx");
        std::fs::write(&onnx_path, &onnx).unwrap();
        check(
            crate::engine::build_engine(&onnx_path, &options)
                .err()
                .expect("no engine without libnvinfer")
                .to_string(),
        );
        let cache = crate::engine_file::EngineCache {
            dir: dir.join("cache"),
        };
        check(
            crate::engine::open_engine(&onnx_path, &options, Some(&cache))
                .err()
                .expect("no engine without libnvinfer")
                .to_string(),
        );
        check(
            crate::engine::build_engine_file(&onnx_path, &options, &dir.join("m.engine"))
                .unwrap_err()
                .to_string(),
        );
        let env = environment_for(
            Version::from_int(110400).unwrap(),
            &TensorrtOptions::default(),
            "NVIDIA H100".into(),
            (9, 0),
        );
        let engine_path = dir.join("made-elsewhere.engine");
        crate::engine_file::EngineFile {
            header: crate::engine_file::EngineHeader::new(&onnx, &options, &env),
            onnx: onnx.clone(),
            plan: b"a plan".to_vec(),
        }
        .write(&engine_path)
        .unwrap();
        check(
            crate::engine::build_engine(&engine_path, &options)
                .err()
                .expect("no engine without libnvinfer")
                .to_string(),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tiny_detector() -> Vec<u8> {
        let model = kestrel_exporter::builder::tiny_detector().expect("tiny detector");
        kestrel_exporter::onnx::encode_model(&model)
    }
}
