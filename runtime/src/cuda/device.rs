//! Small RAII wrappers over the CUDA driver, NVRTC and cuDNN through cudarc's `result`/`sys`
//! layers: device and pinned buffers, a stream, the compiled kernel module, kernel launches.
//! Every call's status is checked; nothing here panics on a CUDA error.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::driver::{CudaContext, result as drv, sys as dsys};

use crate::error::{Error, Result};

pub use crate::half::f32_to_f16_bits;

/// A `cuda` backend error with context.
pub fn cuda_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "cuda",
        message: format!("{what}: {e:?}"),
    }
}

/// Why the `cuda` backend cannot run here, if it cannot: the driver, NVRTC or cuDNN is missing,
/// or there is no GPU. Never panics (cudarc panics when a library is absent, so look first).
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, nvrtc, cudnn) = unsafe {
        (
            dsys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cudnn::sys::is_culib_present(),
        )
    };
    if !driver {
        return Some(
            "no NVIDIA driver on this machine (libcuda.so.1 not found); use --backend cpu".into(),
        );
    }
    if !nvrtc {
        return Some(
            "NVRTC (libnvrtc.so, CUDA 13) not found; install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` \
             and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    if !cudnn {
        return Some(
            "cuDNN 9 (libcudnn.so.9) not found; install it (e.g. `pip install nvidia-cudnn-cu13`) and add its \
             lib folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    if let Err(e) = drv::init() {
        return Some(format!("the NVIDIA driver failed to initialise ({e:?})"));
    }
    match drv::device::get_count() {
        Ok(0) => Some("the NVIDIA driver reports no GPU".into()),
        Ok(_) => None,
        Err(e) => Some(format!("cannot count GPUs ({e:?})")),
    }
}

/// Device memory (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
    pub ptr: dsys::CUdeviceptr,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: plain allocation; a zero-byte request allocates one byte so the pointer is valid.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
            .map_err(|e| cuda_error(&format!("allocating {bytes} bytes"), e))?;
        Ok(Self { ptr, bytes })
    }

    /// A buffer holding `values`.
    pub fn from_slice<T: Copy>(values: &[T]) -> Result<Self> {
        let buf = Self::new(std::mem::size_of_val(values))?;
        if !values.is_empty() {
            // SAFETY: the buffer holds exactly `values`' bytes; the copy is synchronous.
            unsafe { drv::memcpy_htod_sync(buf.ptr, values) }
                .map_err(|e| cuda_error("uploading constants", e))?;
        }
        Ok(buf)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and freed once; an error here cannot be acted on.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

// SAFETY: a device pointer is an address in the context's memory, usable from any thread that
// binds the context.
unsafe impl Send for DeviceBuffer {}

/// A device buffer that grows to the largest request and is reused.
#[derive(Default)]
pub struct Growing(Option<DeviceBuffer>);

impl Growing {
    /// The buffer's address, reallocated first when it holds fewer than `bytes`.
    pub fn at_least(&mut self, bytes: usize) -> Result<dsys::CUdeviceptr> {
        if self.0.as_ref().is_none_or(|b| b.bytes < bytes) {
            self.0 = None;
            self.0 = Some(DeviceBuffer::new(bytes)?);
        }
        self.0
            .as_ref()
            .map(|b| b.ptr)
            .ok_or_else(|| cuda_error("a growing buffer", "no buffer"))
    }
}

/// Page-locked host memory for asynchronous copies, freed on drop.
pub struct PinnedBuffer {
    ptr: *mut c_void,
    bytes: usize,
}

impl PinnedBuffer {
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: plain allocation of page-locked memory.
        let ptr = unsafe { drv::malloc_host(bytes.max(4), 0) }
            .map_err(|e| cuda_error("allocating pinned memory", e))?;
        Ok(Self { ptr, bytes })
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        // SAFETY: the allocation is at least `bytes` long, 4-aligned (page-aligned), and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<f32>(), self.bytes / 4) }
    }

    /// The whole allocation as bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is at least `bytes` long and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.bytes) }
    }

    /// The whole allocation as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the allocation is at least `bytes` long.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.bytes) }
    }

    pub fn as_f32(&self) -> &[f32] {
        // SAFETY: as above, shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<f32>(), self.bytes / 4) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host and freed once.
        let _ = unsafe { drv::free_host(self.ptr) };
    }
}

// SAFETY: host memory owned by this value alone.
unsafe impl Send for PinnedBuffer {}

/// Whether `bytes` lie in page-locked memory the driver knows (so copies from it go straight to
/// the device, with no staging).
pub fn is_pinned(bytes: &[u8]) -> bool {
    let mut kind = 0u32;
    // SAFETY: the driver writes one CUmemorytype (a 32-bit enum) into `kind`; pageable memory
    // is an error, reported as "not pinned".
    let r = unsafe {
        dsys::cuPointerGetAttribute(
            (&mut kind as *mut u32).cast(),
            dsys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            bytes.as_ptr() as dsys::CUdeviceptr,
        )
    };
    r == dsys::CUresult::CUDA_SUCCESS && kind == dsys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
}

/// Bytes of device memory from `ptr` to the end of its allocation, when `ptr` is device memory
/// of GPU `ordinal`; `None` otherwise.
pub fn allocation_after(ptr: dsys::CUdeviceptr, ordinal: usize) -> Option<usize> {
    let mut kind = 0u32;
    let mut device = -1i32;
    let mut start: dsys::CUdeviceptr = 0;
    let mut size: usize = 0;
    // SAFETY: the driver writes a 32-bit enum, an int, a device pointer and a size_t into the
    // four locals; an address it does not know is an error, reported as None.
    let ok = unsafe {
        dsys::cuPointerGetAttribute(
            (&mut kind as *mut u32).cast(),
            dsys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        ) == dsys::CUresult::CUDA_SUCCESS
            && dsys::cuPointerGetAttribute(
                (&mut device as *mut i32).cast(),
                dsys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            ) == dsys::CUresult::CUDA_SUCCESS
            && dsys::cuPointerGetAttribute(
                (&mut start as *mut dsys::CUdeviceptr).cast(),
                dsys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                ptr,
            ) == dsys::CUresult::CUDA_SUCCESS
            && dsys::cuPointerGetAttribute(
                (&mut size as *mut usize).cast(),
                dsys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                ptr,
            ) == dsys::CUresult::CUDA_SUCCESS
    };
    (ok && kind == dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 && device == ordinal as i32)
        .then(|| (start + size as u64).saturating_sub(ptr) as usize)
}

/// Pinned host memory that grows to the largest request and is reused.
#[derive(Default)]
pub struct GrowingPinned(Option<PinnedBuffer>);

impl GrowingPinned {
    /// The first `bytes` bytes, reallocated first when the buffer holds fewer.
    pub fn at_least(&mut self, bytes: usize) -> Result<&mut [u8]> {
        if self.0.as_ref().is_none_or(|b| b.bytes < bytes) {
            self.0 = None;
            self.0 = Some(PinnedBuffer::new(bytes)?);
        }
        match self.0.as_mut() {
            Some(b) => Ok(&mut b.as_bytes_mut()[..bytes]),
            None => Err(cuda_error("a growing pinned buffer", "no buffer")),
        }
    }
}

/// A non-blocking stream, destroyed on drop.
pub struct Stream(pub dsys::CUstream);

impl Stream {
    pub fn new() -> Result<Self> {
        drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map(Stream)
            .map_err(|e| cuda_error("creating a stream", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream.
        unsafe { drv::stream::synchronize(self.0) }.map_err(|e| cuda_error("running the engine", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by stream::create, destroyed once.
        let _ = unsafe { drv::stream::destroy(self.0) };
    }
}

// SAFETY: streams may be used from any thread bound to their context.
unsafe impl Send for Stream {}

/// A CUDA event, destroyed on drop: for timing, or for ordering work across streams.
pub struct Event(pub dsys::CUevent);

impl Event {
    /// An event that can time (`elapsed`).
    pub fn new() -> Result<Self> {
        drv::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| cuda_error("creating an event", e))
    }

    /// An event for ordering only (cheaper to record and wait on).
    pub fn ordering() -> Result<Self> {
        drv::event::create(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| cuda_error("creating an event", e))
    }

    /// Mark the point `stream` has reached.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: a live event and stream of the bound context.
        unsafe { drv::event::record(self.0, stream.0) }
            .map_err(|e| cuda_error("recording an event", e))
    }

    /// Milliseconds of device time from this event to `end`, both recorded and complete.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        // SAFETY: live events; the caller synchronised the stream both were recorded on.
        unsafe { drv::event::elapsed(self.0, end.0) }
            .map(f64::from)
            .map_err(|e| cuda_error("reading an event", e))
    }

    /// Make `stream`'s later work wait for the last recorded point (none yet: no wait).
    pub fn wait_on(&self, stream: &Stream) -> Result<()> {
        // SAFETY: a live event and stream of the bound context.
        unsafe {
            drv::stream::wait_event(
                stream.0,
                self.0,
                dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| cuda_error("ordering streams", e))
    }

    /// Block the host until the last recorded point is reached.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        unsafe { drv::event::synchronize(self.0) }.map_err(|e| cuda_error("waiting for the GPU", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { drv::event::destroy(self.0) };
    }
}

// SAFETY: events may be used from any thread bound to their context.
unsafe impl Send for Event {}

/// GPUs the driver sees (what `CUDA_VISIBLE_DEVICES` leaves visible).
pub fn device_count() -> Result<usize> {
    if let Some(reason) = unavailable_reason() {
        return Err(Error::Backend {
            backend: "cuda",
            message: reason,
        });
    }
    drv::device::get_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| cuda_error("counting the GPUs", e))
}

/// Why GPU `ordinal` cannot be used on a machine with `count` GPUs, if it cannot.
pub fn missing_gpu(ordinal: usize, count: usize) -> Option<String> {
    (ordinal >= count).then(|| match count {
        0 => format!("GPU {ordinal} was asked for, but the driver sees no GPU; use --backend cpu"),
        1 => format!(
            "GPU {ordinal} was asked for, but this machine has 1 GPU (GPU 0); give GPU 0 \
             (--gpu, the element's gpu-id, a model's instances)"
        ),
        n => format!(
            "GPU {ordinal} was asked for, but this machine has {n} GPUs (0 to {}); give one of \
             those (--gpu, the element's gpu-id, a model's instances)",
            n - 1
        ),
    })
}

/// The context: the device's primary context, bound to the calling thread before each use.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if let Some(message) = missing_gpu(ordinal, device_count()?) {
        return Err(Error::Backend {
            backend: "cuda",
            message,
        });
    }
    CudaContext::new(ordinal).map_err(|e| cuda_error(&format!("opening GPU {ordinal}"), e))
}

/// The kernels of `kernels.cu`, compiled by NVRTC for the device, loaded as a module.
pub struct Kernels {
    module: dsys::CUmodule,
}

/// Kernel source, compiled at engine build.
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Reduction tiles in flight in the INT8 convolution: 3, or `$KESTREL_INT8_STAGES` (2 to 4) for
/// tuning experiments. Compiled into the kernels and used for their shared memory size.
pub fn int8_stages() -> usize {
    std::env::var("KESTREL_INT8_STAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (2..=4).contains(n))
        .unwrap_or(3)
}

/// Compile the kernel source to PTX with NVRTC, the INT8 convolution with `int8_stages` reduction
/// tiles in flight (no GPU needed; CI uses this to check the source). Compiled once per process
/// for each architecture and depth: it takes seconds (the INT8 kernels' unrolled loops), and a
/// server or test run builds many engines.
pub fn compile_kernels(arch: Option<&'static str>, int8_stages: usize) -> Result<String> {
    type PtxCache = std::sync::Mutex<HashMap<(Option<&'static str>, usize), String>>;
    static COMPILED: std::sync::OnceLock<PtxCache> = std::sync::OnceLock::new();
    let cache = COMPILED.get_or_init(Default::default);
    let key = (arch, int8_stages);
    if let Some(ptx) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(ptx);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch,
        use_fast_math: Some(false),
        options: vec![format!("-DI8_STAGES={int8_stages}")],
        name: Some("kestrel_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile(KERNEL_SOURCE, "kernels.cu", opts)?;
    if let Ok(mut c) = cache.lock() {
        c.insert(key, ptx.clone());
    }
    Ok(ptx)
}

/// Compile a kernel source (`file` names it in errors) to PTX without fused multiply-add, so
/// each float operation rounds as the CPU reference's Rust code does (the pre- and
/// post-processing kernels, which must equal it bit for bit).
pub fn compile_exact(source: &str, file: &str, arch: Option<&'static str>) -> Result<String> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch,
        fmad: Some(false),
        use_fast_math: Some(false),
        name: Some(file.into()),
        ..Default::default()
    };
    compile(source, file, opts)
}

/// NVRTC with `opts`; the error carries the compiler's log.
fn compile(source: &str, file: &str, opts: cudarc::nvrtc::CompileOptions) -> Result<String> {
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Backend {
        backend: "cuda",
        message: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                format!("NVRTC rejected {file}:\n{}", log.to_string_lossy())
            }
            other => format!("NVRTC failed: {other:?}"),
        },
    })?;
    Ok(ptx.to_src())
}

/// The device's architecture for NVRTC (`sm_XY`) of the bound context.
pub fn device_arch(ctx: &CudaContext) -> Result<&'static str> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| cuda_error("compute capability", e))?;
    // Leaked once per engine or processor: NVRTC's options take a 'static str.
    Ok(Box::leak(format!("sm_{major}{minor}").into_boxed_str()))
}

impl Kernels {
    pub fn load(ptx: &str) -> Result<Self> {
        let image = CString::new(ptx).map_err(|_| cuda_error("PTX", "embedded NUL"))?;
        // SAFETY: `image` is a NUL-terminated PTX text that lives through the call.
        let module = unsafe { drv::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| cuda_error("loading PTX", e))?;
        Ok(Self { module })
    }

    pub fn function(&self, name: &str) -> Result<dsys::CUfunction> {
        let cname = CString::new(name).map_err(|_| cuda_error("kernel name", name))?;
        // SAFETY: the module is loaded and outlives the returned handle (both live in the engine).
        unsafe { drv::module::get_function(self.module, cname) }
            .map_err(|e| cuda_error(&format!("kernel {name}"), e))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // SAFETY: loaded once, unloaded once.
        let _ = unsafe { drv::module::unload(self.module) };
    }
}

// SAFETY: module handles are context-wide.
unsafe impl Send for Kernels {}

/// One kernel argument, by value.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(dsys::CUdeviceptr),
    I64(i64),
    I32(i32),
    F32(f32),
}

/// Launch `f` over `total` elements (grid-stride kernels) on `stream`.
pub fn launch(
    f: dsys::CUfunction,
    stream: dsys::CUstream,
    total: usize,
    args: &[Arg],
) -> Result<()> {
    if total == 0 {
        return Ok(());
    }
    let block = 256u32;
    let grid = total.div_ceil(block as usize).min(65_535) as u32;
    launch_grid(f, stream, (grid, 1, 1), block, 0, args)
}

/// Launch `f` on an explicit grid of `block`-thread blocks with `shared_bytes` of dynamic shared
/// memory (tiled kernels such as the INT8 convolution).
pub fn launch_grid(
    f: dsys::CUfunction,
    stream: dsys::CUstream,
    grid: (u32, u32, u32),
    block: u32,
    shared_bytes: u32,
    args: &[Arg],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut values: Vec<Arg> = args.to_vec();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => (p as *mut dsys::CUdeviceptr).cast(),
            Arg::I64(v) => (v as *mut i64).cast(),
            Arg::I32(v) => (v as *mut i32).cast(),
            Arg::F32(v) => (v as *mut f32).cast(),
        })
        .collect();
    // SAFETY: `params` points at `values`, alive through the call (the driver copies them); the
    // argument list matches the kernel's signature, which the executor's callers guarantee.
    unsafe { drv::launch_kernel(f, grid, (block, 1, 1), shared_bytes, stream, &mut params) }
        .map_err(|e| cuda_error("launching a kernel", e))
}

/// An instantiated CUDA graph (one batch bucket's captured launches), destroyed on drop.
pub(crate) struct GraphExec(pub(crate) dsys::CUgraphExec);

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: instantiated once, destroyed once.
        let _ = unsafe { drv::graph::exec_destroy(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::missing_gpu;

    #[test]
    fn a_missing_gpu_is_named_with_the_ones_that_exist() {
        assert_eq!(missing_gpu(0, 1), None);
        assert_eq!(missing_gpu(1, 2), None);
        let one = missing_gpu(1, 1).unwrap_or_default();
        assert!(
            one.contains("GPU 1") && one.contains("1 GPU (GPU 0)"),
            "{one}"
        );
        let two = missing_gpu(3, 2).unwrap_or_default();
        assert!(
            two.contains("GPU 3") && two.contains("2 GPUs (0 to 1)"),
            "{two}"
        );
        let none = missing_gpu(0, 0).unwrap_or_default();
        assert!(
            none.contains("no GPU") && none.contains("--backend cpu"),
            "{none}"
        );
    }
}
