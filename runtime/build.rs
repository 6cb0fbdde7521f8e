//! Build script: with the `tensorrt` feature, compile the C++ shim of the TensorRT backend
//! (`src/tensorrt/shim/kestrel_trt.cpp`) against the TensorRT 11 headers. Nothing else.
//!
//! The headers are not part of this repository. They come from, in order:
//! 1. `$KESTREL_TENSORRT_INCLUDE`: a folder holding `NvInfer.h` and `NvOnnxParser.h` (a TensorRT
//!    11 install's `include` folder);
//! 2. the source of the `trtx-sys` crate (`TensorRT-Headers/TRT-Enterprise-11.4`) in the cargo
//!    registry, which `cargo fetch --locked --manifest-path runtime/tensorrt-headers/Cargo.toml`
//!    (run by `scripts/setup.sh`) puts there.
//!
//! The shim uses TensorRT through its virtual interfaces and factory pointers resolved at run time,
//! so nothing links libnvinfer.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tensorrt")]
    tensorrt::compile_shim();
}

#[cfg(feature = "tensorrt")]
mod tensorrt {
    use std::path::{Path, PathBuf};

    /// The trtx-sys release whose headers the shim is written against (TensorRT 11.4).
    const TRTX_SYS: &str = "trtx-sys-0.9.1+rtx1.7";
    const HEADERS: &str = "TensorRT-Headers/TRT-Enterprise-11.4";

    pub fn compile_shim() {
        println!("cargo:rerun-if-env-changed=KESTREL_TENSORRT_INCLUDE");
        println!("cargo:rerun-if-env-changed=CARGO_HOME");
        println!("cargo:rerun-if-changed=src/tensorrt/shim");
        let include = match headers() {
            Ok(dir) => dir,
            Err(why) => {
                eprintln!("error: {why}");
                panic!("{why}");
            }
        };
        println!("cargo:rerun-if-changed={}", include.display());
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file("src/tensorrt/shim/kestrel_trt.cpp")
            // Our stand-in for cuda_runtime_api.h (stream and event handle types) comes first.
            .include("src/tensorrt/shim")
            .include(&include)
            .flag_if_supported("-Wno-deprecated-declarations")
            .warnings(true)
            .compile("kestrel_trt");
        println!(
            "cargo:rustc-env=KESTREL_TENSORRT_HEADERS={}",
            include.display()
        );
    }

    fn has_headers(dir: &Path) -> bool {
        dir.join("NvInfer.h").is_file() && dir.join("NvOnnxParser.h").is_file()
    }

    fn headers() -> Result<PathBuf, String> {
        if let Some(dir) = std::env::var_os("KESTREL_TENSORRT_INCLUDE") {
            let dir = PathBuf::from(dir);
            return if has_headers(&dir) {
                Ok(dir)
            } else {
                Err(format!(
                    "KESTREL_TENSORRT_INCLUDE={} holds no NvInfer.h and NvOnnxParser.h; point it \
                     at a TensorRT 11 include folder, or unset it to use the headers of {TRTX_SYS}",
                    dir.display()
                ))
            };
        }
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        let registries = cargo_home.map(|h| h.join("registry/src"));
        if let Some(registries) = &registries
            && let Ok(entries) = std::fs::read_dir(registries)
        {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join(TRTX_SYS).join(HEADERS))
                .filter(|d| has_headers(d))
                .collect();
            found.sort();
            if let Some(dir) = found.into_iter().next() {
                return Ok(dir);
            }
        }
        Err(format!(
            "the `tensorrt` feature compiles against the TensorRT 11 headers of the {TRTX_SYS} crate, \
             which are not in the cargo registry ({}); fetch them with `cargo fetch --locked \
             --manifest-path runtime/tensorrt-headers/Cargo.toml` (scripts/setup.sh does), or set \
             KESTREL_TENSORRT_INCLUDE to a TensorRT 11 include folder",
            registries
                .map(|r| r.display().to_string())
                .unwrap_or_else(|| "no CARGO_HOME or HOME".into())
        ))
    }
}
