//! libnvinfer and libnvonnxparser, opened at run time (dlopen) so a binary built with the
//! `tensorrt` feature starts, and says what is missing, on machines without TensorRT.

use std::sync::OnceLock;

use super::ffi::{CreateBuilderFn, CreateParserFn, CreateRuntimeFn};

/// The TensorRT 11 runtime library (soname).
pub const LIBNVINFER: &str = "libnvinfer.so.11";
/// TensorRT 11's ONNX parser (soname).
pub const LIBNVONNXPARSER: &str = "libnvonnxparser.so.11";
/// Overrides the path or name of libnvinfer.
pub const LIBNVINFER_ENV: &str = "KESTREL_LIBNVINFER";
/// Overrides the path or name of libnvonnxparser.
pub const LIBNVONNXPARSER_ENV: &str = "KESTREL_LIBNVONNXPARSER";
/// The TensorRT major version the shim is written for.
pub const TENSORRT_MAJOR: u32 = 11;

/// How to get TensorRT, appended to every "not found" message.
pub const INSTALL_HINT: &str = "install TensorRT 11 (NVIDIA's tar, deb or pip packages) and add \
     the folder holding its libraries to LD_LIBRARY_PATH (or set KESTREL_LIBNVINFER / KESTREL_LIBNVONNXPARSER to their paths); or use \
     --backend cuda";

/// A TensorRT version (`getInferLibVersion`: major * 10000 + minor * 100 + patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub fn from_int(v: i32) -> Option<Self> {
        let v = u32::try_from(v).ok().filter(|&v| v > 0)?;
        Some(Self {
            major: v / 10000,
            minor: v / 100 % 100,
            patch: v % 100,
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why a library that loaded cannot be used with this build, if it cannot.
pub fn version_problem(library: &str, found: Option<Version>) -> Option<String> {
    match found {
        None => Some(format!(
            "{library} reports no valid version; {INSTALL_HINT}"
        )),
        Some(v) if v.major != TENSORRT_MAJOR => Some(format!(
            "{library} is TensorRT {v}, but this Kestrel is built against the TensorRT \
             {TENSORRT_MAJOR} API; install TensorRT {TENSORRT_MAJOR}, or rebuild Kestrel with \
             KESTREL_TENSORRT_INCLUDE pointing at the headers of the TensorRT you have"
        )),
        Some(_) => None,
    }
}

/// The opened libraries and the factory functions of the shim.
pub struct Library {
    _nvinfer: libloading::Library,
    _parser: Option<libloading::Library>,
    pub create_builder: CreateBuilderFn,
    pub create_runtime: CreateRuntimeFn,
    /// `None` where libnvonnxparser is missing: engines can then be loaded but not built.
    pub create_parser: Option<CreateParserFn>,
    pub version: Version,
    pub parser_version: Option<Version>,
    /// Why the ONNX parser is unavailable, if it is.
    pub parser_problem: Option<String>,
}

fn name_of(env: &str, default: &str) -> String {
    std::env::var(env)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn open(name: &str) -> std::result::Result<libloading::Library, String> {
    // SAFETY: opening a shared library runs its initialisers; TensorRT's are plain C++ statics.
    unsafe { libloading::Library::new(name) }.map_err(|e| {
        // The loader's own words ("cannot open shared object file ..."), not just "dlopen failed".
        let detail = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        format!("{name} (TensorRT {TENSORRT_MAJOR}) cannot be loaded ({detail}); {INSTALL_HINT}")
    })
}

fn symbol<T: Copy>(lib: &libloading::Library, lib_name: &str, name: &str) -> Result<T, String> {
    // SAFETY: the symbol's type is the one TensorRT's headers declare for it (see ffi.rs).
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| {
            format!("{lib_name} has no {name} ({e}): it is not TensorRT {TENSORRT_MAJOR}; {INSTALL_HINT}")
        })
}

impl Library {
    fn load() -> std::result::Result<Self, String> {
        let nvinfer_name = name_of(LIBNVINFER_ENV, LIBNVINFER);
        let nvinfer = open(&nvinfer_name)?;
        let get_version: unsafe extern "C" fn() -> i32 =
            symbol(&nvinfer, &nvinfer_name, "getInferLibVersion")?;
        // SAFETY: takes nothing, returns an int.
        let version = Version::from_int(unsafe { get_version() });
        if let Some(problem) = version_problem(&nvinfer_name, version) {
            return Err(problem);
        }
        let version = version.ok_or_else(|| format!("{nvinfer_name}: no version"))?;
        let create_builder = symbol(&nvinfer, &nvinfer_name, "createInferBuilder_INTERNAL")?;
        let create_runtime = symbol(&nvinfer, &nvinfer_name, "createInferRuntime_INTERNAL")?;
        let parser_name = name_of(LIBNVONNXPARSER_ENV, LIBNVONNXPARSER);
        let (parser, create_parser, parser_version, parser_problem) = match open(&parser_name) {
            Err(e) => (None, None, None, Some(e)),
            Ok(lib) => {
                let create =
                    symbol::<CreateParserFn>(&lib, &parser_name, "createNvOnnxParser_INTERNAL");
                let get_version = symbol::<unsafe extern "C" fn() -> i32>(
                    &lib,
                    &parser_name,
                    "getNvOnnxParserVersion",
                );
                match (create, get_version) {
                    (Ok(create), Ok(get_version)) => {
                        // SAFETY: takes nothing, returns an int.
                        let v = Version::from_int(unsafe { get_version() });
                        match version_problem(&parser_name, v) {
                            Some(problem) => (Some(lib), None, v, Some(problem)),
                            None => (Some(lib), Some(create), v, None),
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => (Some(lib), None, None, Some(e)),
                }
            }
        };
        Ok(Self {
            _nvinfer: nvinfer,
            _parser: parser,
            create_builder,
            create_runtime,
            create_parser,
            version,
            parser_version,
            parser_problem,
        })
    }

    /// The libraries, opened once per process; the error names the missing library and the fix.
    pub fn get() -> std::result::Result<&'static Library, String> {
        static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
        LIBRARY
            .get_or_init(Library::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The ONNX parser's factory, or why there is none.
    pub fn parser(&self) -> std::result::Result<CreateParserFn, String> {
        self.create_parser.ok_or_else(|| {
            self.parser_problem
                .clone()
                .unwrap_or_else(|| format!("{LIBNVONNXPARSER} is not loaded; {INSTALL_HINT}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decode() {
        let v = Version::from_int(110400).unwrap();
        assert_eq!((v.major, v.minor, v.patch), (11, 4, 0));
        assert_eq!(v.to_string(), "11.4.0");
        assert_eq!(Version::from_int(100_905).unwrap().to_string(), "10.9.5");
        assert_eq!(Version::from_int(0), None);
        assert_eq!(Version::from_int(-1), None);
    }

    #[test]
    fn other_majors_are_refused_with_the_fix() {
        assert_eq!(
            version_problem("libnvinfer.so.11", Version::from_int(110400)),
            None
        );
        let e = version_problem("libnvinfer.so.10", Version::from_int(100905)).unwrap();
        assert!(
            e.contains("TensorRT 10.9.5") && e.contains("install TensorRT 11"),
            "{e}"
        );
        let e = version_problem("libnvinfer.so.11", None).unwrap();
        assert!(
            e.contains("no valid version") && e.contains("LD_LIBRARY_PATH"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_library_is_named_with_the_fix() {
        let e = open("libnvinfer-that-does-not-exist.so.11").err().unwrap();
        assert!(
            e.starts_with("libnvinfer-that-does-not-exist.so.11 (TensorRT 11) cannot be loaded"),
            "{e}"
        );
        assert!(
            e.contains("LD_LIBRARY_PATH") && e.contains("--backend cuda"),
            "{e}"
        );
    }
}
