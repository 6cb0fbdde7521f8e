//! With the `cuda` feature, link libtorch_cuda even though nothing references it directly, so the
//! trainer uses CUDA where the machine has it (DESIGN.md). Without it (CI, CPU machines) the
//! binaries need only libtorch_cpu and libc10: libtorch_cuda cannot even load there, it needs
//! cuBLAS, cuDNN, cuSPARSE, NCCL… which only the GPU machine has. Either way, an rpath to the
//! venv's libtorch lets tests run without LD_LIBRARY_PATH. Link args reach this crate's binaries
//! and tests, not build scripts.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
