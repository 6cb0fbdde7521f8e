//! The C functions of Kestrel's shim (`shim/kestrel_trt.cpp`), the status codes it returns, and
//! the logger that collects TensorRT's messages for error reports.

use std::ffi::{CStr, c_char, c_void};
use std::sync::Mutex;

/// `KtStatus` of the shim.
pub const KT_OK: i32 = 0;

pub type LogFn = unsafe extern "C" fn(user: *mut c_void, severity: i32, message: *const c_char);
pub type CreateBuilderFn = unsafe extern "C" fn(logger: *mut c_void, version: i32) -> *mut c_void;
pub type CreateRuntimeFn = unsafe extern "C" fn(logger: *mut c_void, version: i32) -> *mut c_void;
pub type CreateParserFn =
    unsafe extern "C" fn(network: *mut c_void, logger: *mut c_void, version: i32) -> *mut c_void;

/// `KtBuildConfig` of the shim (field for field).
#[repr(C)]
pub struct KtBuildConfig {
    pub input_name: *const c_char,
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    pub batch_min: i64,
    pub batch_opt: i64,
    pub batch_max: i64,
    pub workspace_bytes: u64,
    pub hardware_compatibility: i32,
    pub version_compatible: i32,
    pub exclude_lean_runtime: i32,
    pub optimization_level: i32,
    pub timing_cache: *const c_void,
    pub timing_cache_len: u64,
}

/// `KtBlob` of the shim: bytes TensorRT owns.
#[repr(C)]
pub struct KtBlob {
    pub data: *const c_void,
    pub len: u64,
    pub handle: *mut c_void,
}

impl KtBlob {
    pub fn empty() -> Self {
        Self {
            data: std::ptr::null(),
            len: 0,
            handle: std::ptr::null_mut(),
        }
    }
}

unsafe extern "C" {
    pub fn kt_header_version() -> i32;
    pub fn kt_logger_new(log: LogFn, user: *mut c_void) -> *mut c_void;
    pub fn kt_logger_free(logger: *mut c_void);
    pub fn kt_blob_free(blob: *mut KtBlob);
    #[allow(clippy::too_many_arguments)]
    pub fn kt_build(
        create_builder: CreateBuilderFn,
        create_parser: CreateParserFn,
        logger: *mut c_void,
        onnx: *const c_void,
        onnx_len: u64,
        cfg: *const KtBuildConfig,
        plan: *mut KtBlob,
        timing_cache: *mut KtBlob,
        timing_cache_reset: *mut i32,
    ) -> i32;
    pub fn kt_runtime_new(
        create_runtime: CreateRuntimeFn,
        logger: *mut c_void,
        allow_host_code: i32,
    ) -> *mut c_void;
    pub fn kt_runtime_free(runtime: *mut c_void);
    pub fn kt_engine_new(runtime: *mut c_void, plan: *const c_void, len: u64) -> *mut c_void;
    pub fn kt_engine_free(engine: *mut c_void);
    pub fn kt_engine_io_count(engine: *mut c_void) -> i32;
    pub fn kt_engine_io_name(engine: *mut c_void, index: i32) -> *const c_char;
    pub fn kt_engine_io_mode(engine: *mut c_void, name: *const c_char) -> i32;
    pub fn kt_engine_io_dtype(engine: *mut c_void, name: *const c_char) -> i32;
    pub fn kt_context_new(engine: *mut c_void) -> *mut c_void;
    pub fn kt_context_free(context: *mut c_void);
    pub fn kt_context_set_input_shape(
        context: *mut c_void,
        name: *const c_char,
        dims: *const i64,
        rank: i32,
    ) -> i32;
    pub fn kt_context_shape(
        context: *mut c_void,
        name: *const c_char,
        dims: *mut i64,
        capacity: i32,
    ) -> i32;
    pub fn kt_context_set_tensor_address(
        context: *mut c_void,
        name: *const c_char,
        address: *mut c_void,
    ) -> i32;
    pub fn kt_context_enqueue(context: *mut c_void, stream: *mut c_void) -> i32;
}

/// What went wrong, in words, for a shim status (`step` names what Kestrel was doing).
pub fn status_message(status: i32) -> &'static str {
    match status {
        KT_OK => "no error",
        1 => {
            "TensorRT could not create a builder (is the GPU usable and libnvinfer matching the driver?)"
        }
        2 => "TensorRT could not create a network definition",
        3 => "libnvonnxparser could not create an ONNX parser",
        4 => "TensorRT's ONNX parser rejected the model",
        5 => "the parsed network has no input of the model's input name",
        6 => "TensorRT rejected the optimization profile (batch min/opt/max)",
        7 => "TensorRT could not create a builder config",
        8 => "TensorRT could not create or set the timing cache",
        9 => "TensorRT failed to build the engine",
        10 => "TensorRT could not create a runtime",
        11 => "TensorRT could not deserialize the engine plan",
        12 => "TensorRT could not create an execution context",
        13 => "TensorRT rejected the input shape",
        14 => "TensorRT rejected a tensor address",
        15 => "TensorRT failed to enqueue the engine (enqueueV3)",
        16 => "the engine has no tensor of that name",
        17 => "TensorRT threw a C++ exception",
        18 => "the shim was called with a null argument (a Kestrel bug)",
        _ => "unknown status from the TensorRT shim",
    }
}

/// ILogger severities (nvinfer1::ILogger::Severity).
pub fn severity_name(severity: i32) -> &'static str {
    match severity {
        0 => "internal error",
        1 => "error",
        2 => "warning",
        3 => "info",
        _ => "verbose",
    }
}

/// The messages TensorRT logged at warning level or above, kept for error reports.
#[derive(Default)]
pub struct LogSink {
    messages: Mutex<Vec<String>>,
}

impl LogSink {
    pub fn push(&self, severity: i32, message: &str) {
        // Errors and warnings only; info and verbose are noise in an error report.
        if severity > 2 {
            return;
        }
        if let Ok(mut m) = self.messages.lock() {
            // Keep the last 32: a failing build can log thousands of lines.
            if m.len() >= 32 {
                m.remove(0);
            }
            m.push(format!("{}: {}", severity_name(severity), message.trim()));
        }
    }

    /// The messages since the last call.
    pub fn take(&self) -> Vec<String> {
        self.messages
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// The logger callback the shim calls; `user` is a `*const LogSink`.
///
/// # Safety
/// `user` points to a live `LogSink`; `message` is null or a NUL-terminated string.
pub unsafe extern "C" fn log_to_sink(user: *mut c_void, severity: i32, message: *const c_char) {
    if user.is_null() || message.is_null() {
        return;
    }
    // SAFETY: per the contract above.
    let (sink, text) = unsafe { (&*(user as *const LogSink), CStr::from_ptr(message)) };
    sink.push(severity, &text.to_string_lossy());
}

/// A TensorRT error: the shim's status in words, what Kestrel was doing, and what TensorRT logged.
pub fn describe_failure(step: &str, status: i32, logged: &[String]) -> String {
    let mut message = format!("{step}: {}", status_message(status));
    if !logged.is_empty() {
        message.push_str(" — TensorRT said: ");
        message.push_str(&logged.join("; "));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_words() {
        for s in 1..=18 {
            assert_ne!(status_message(s), status_message(99), "{s}");
        }
        assert_eq!(status_message(-3), "unknown status from the TensorRT shim");
    }

    #[test]
    fn the_sink_keeps_warnings_and_errors_only() {
        let sink = LogSink::default();
        let text = std::ffi::CString::new("  parse failed at node 7 ").unwrap();
        // SAFETY: a live sink and a NUL-terminated string.
        unsafe {
            log_to_sink(
                (&sink as *const LogSink).cast_mut().cast(),
                1,
                text.as_ptr(),
            );
            log_to_sink(
                (&sink as *const LogSink).cast_mut().cast(),
                3,
                text.as_ptr(),
            );
            log_to_sink(std::ptr::null_mut(), 1, text.as_ptr());
        }
        for i in 0..40 {
            sink.push(2, &format!("w{i}"));
        }
        let got = sink.take();
        assert_eq!(got.len(), 32);
        assert_eq!(got.last().map(String::as_str), Some("warning: w39"));
        assert!(sink.take().is_empty());
        sink.push(0, "x");
        assert_eq!(sink.take(), vec!["internal error: x".to_string()]);
    }

    #[test]
    fn failures_name_the_step_and_what_tensorrt_logged() {
        let m = describe_failure("building gelan-t", 4, &["error: Unsupported op Foo".into()]);
        assert_eq!(
            m,
            "building gelan-t: TensorRT's ONNX parser rejected the model — TensorRT said: \
             error: Unsupported op Foo"
        );
        assert_eq!(
            describe_failure("x", 9, &[]),
            "x: TensorRT failed to build the engine"
        );
    }

    #[test]
    fn the_shim_is_compiled_against_tensorrt_11() {
        // SAFETY: returns a constant from the headers.
        let v = unsafe { kt_header_version() };
        assert_eq!(v / 10000, 11, "{v}");
    }
}
