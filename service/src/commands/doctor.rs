//! `kestrel doctor`: for each backend, whether it can run on this machine and, if not, why and
//! how to fix it; and what of each backend has been verified on real hardware.

use anyhow::Result;
use kestrel_runtime::probe::{CudaReport, Finding, cuda_report};
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text (for tools).
    #[arg(long)]
    json: bool,
}

/// One backend's verdict.
struct Verdict {
    backend: &'static str,
    available: bool,
    /// Why not, with the fix (empty when available).
    reasons: Vec<String>,
    /// Components checked: (name, finding).
    checks: Vec<(&'static str, Finding)>,
    /// What has and has not been verified of this backend.
    verified: &'static str,
}

fn finding_json(f: &Finding) -> Value {
    match f {
        Ok(v) => json!({"found": true, "detail": v}),
        Err(e) => json!({"found": false, "problem": e}),
    }
}

fn gpu_finding(cuda: &CudaReport) -> Finding {
    match &cuda.gpus {
        Ok(gpus) => Ok(gpus
            .iter()
            .map(|g| format!("GPU {}: {} ({})", g.index, g.name, g.compute_capability))
            .collect::<Vec<_>>()
            .join("; ")),
        Err(e) => Err(e.clone()),
    }
}

fn cuda_verdict(cuda: &CudaReport) -> Verdict {
    let checks = vec![
        ("NVIDIA driver", cuda.driver.clone()),
        ("GPU", gpu_finding(cuda)),
        ("NVRTC", cuda.nvrtc.clone()),
        ("cuDNN", cuda.cudnn.clone()),
    ];
    let reasons: Vec<String> = checks.iter().filter_map(|(_, f)| f.clone().err()).collect();
    Verdict {
        backend: "cuda",
        available: reasons.is_empty(),
        reasons,
        checks,
        verified: "runs on H100 and H200 (CUDA 13 driver, cuDNN 9) in this project's GPU tests",
    }
}

#[cfg(feature = "tensorrt")]
fn tensorrt_verdict(cuda: &CudaReport) -> Verdict {
    use kestrel_runtime::tensorrt::library_report;
    let libs = library_report();
    let checks = vec![
        ("NVIDIA driver", cuda.driver.clone()),
        ("GPU", gpu_finding(cuda)),
        ("libnvinfer", libs.nvinfer.clone()),
        ("libnvonnxparser", libs.onnx_parser.clone()),
        ("TensorRT headers of this build", Ok(libs.headers.clone())),
    ];
    // The ONNX parser is needed to build, not to load engine files; NVRTC only for GPU decode.
    let reasons: Vec<String> = [&checks[0], &checks[1], &checks[2]]
        .iter()
        .filter_map(|(_, f)| f.clone().err())
        .collect();
    Verdict {
        backend: "tensorrt",
        available: reasons.is_empty(),
        reasons,
        checks,
        verified: "compiled and unit-tested without TensorRT; it has NEVER run against libnvinfer \
                   on this project's machines (none has TensorRT): building, loading and running \
                   TensorRT engines are unverified (docs/tensorrt.md)",
    }
}

#[cfg(not(feature = "tensorrt"))]
fn tensorrt_verdict(_: &CudaReport) -> Verdict {
    Verdict {
        backend: "tensorrt",
        available: false,
        reasons: vec![
            "not compiled into this build; rebuild with `--features tensorrt` (e.g. `cargo build \
             --release -p kestrel-service --features tensorrt`)"
                .into(),
        ],
        checks: Vec::new(),
        verified: "compiled and unit-tested without TensorRT; it has NEVER run against libnvinfer \
                   on this project's machines (docs/tensorrt.md)",
    }
}

fn verdicts() -> Vec<Verdict> {
    let cuda = cuda_report();
    vec![
        Verdict {
            backend: "cpu",
            available: true,
            reasons: Vec::new(),
            checks: vec![("tract", Ok("0.23.9 (built in)".into()))],
            verified: "runs everywhere; the reference the GPU backends are tested against",
        },
        cuda_verdict(&cuda),
        tensorrt_verdict(&cuda),
    ]
}

pub fn run(a: Args) -> Result<()> {
    let verdicts = verdicts();
    if a.json {
        let backends: Vec<Value> = verdicts
            .iter()
            .map(|v| {
                let checks: serde_json::Map<String, Value> = v
                    .checks
                    .iter()
                    .map(|(k, f)| (k.to_string(), finding_json(f)))
                    .collect();
                json!({
                    "backend": v.backend,
                    "available": v.available,
                    "reasons": v.reasons,
                    "checks": checks,
                    "verified": v.verified,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "kestrel": env!("CARGO_PKG_VERSION"),
                "tensorrt_compiled": cfg!(feature = "tensorrt"),
                "backends": backends,
            }))?
        );
        return Ok(());
    }
    for v in &verdicts {
        println!(
            "{:<9} {}",
            v.backend,
            if v.available {
                "available"
            } else {
                "unavailable"
            }
        );
        for (name, f) in &v.checks {
            match f {
                Ok(detail) => println!("  ok    {name}: {detail}"),
                Err(problem) => println!("  no    {name}: {problem}"),
            }
        }
        for r in &v.reasons {
            if v.checks.is_empty() {
                println!("  no    {r}");
            }
        }
        println!("  verified: {}", v.verified);
    }
    Ok(())
}
