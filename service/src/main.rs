//! `kestrel`: export, quantize, inspect, run, evaluate and benchmark YOLOv9 / GELAN detectors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod draw;
mod serve;
mod util;

/// Kestrel: deploy quantized YOLOv9 detectors. Runs on the CPU backend out of the box.
#[derive(Debug, Parser)]
#[command(name = "kestrel", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a GELAN model (t, s, m, c, e) to ONNX, with weights from safetensors or seeded random ones.
    Export(commands::export::Args),
    /// Quantize a float model to INT8 Q/DQ ONNX, with activation ranges calibrated on images.
    #[command(
        override_usage = "kestrel quantize (--onnx FILE | --model NAME [EXPORT OPTIONS]) --calibrate DIR [--images N] -o FILE"
    )]
    Quantize(commands::quantize::Args),
    /// Show a model's inputs, outputs, operators, Q/DQ pairs, parameters and GFLOPs.
    Inspect(commands::inspect::Args),
    /// Detect objects in images: annotated PNGs and one JSON per image.
    Infer(commands::infer::Args),
    /// Evaluate a model on a labelled dataset: P, R, mAP50 and mAP50-95.
    Val(commands::val::Args),
    /// Measure engine latency and throughput, trtexec style.
    Bench(commands::bench::Args),
    /// Build an engine file for a backend, precision and batch profile.
    Build(commands::build::Args),
    /// Generate the synthetic shapes dataset (images, YOLO labels, COCO json).
    Synth(commands::synth::Args),
    /// Which backends can run on this machine (driver, CUDA libraries, cuDNN, NVRTC, TensorRT,
    /// GPUs), why not, and the fix.
    Doctor(commands::doctor::Args),
    /// Serve models over HTTP: KServe v2 (Triton clients), an image endpoint, dynamic batching,
    /// Prometheus metrics at /metrics.
    Serve(serve::Args),
    /// Soak runs: the service, an engine or the GStreamer element under long load, memory
    /// sampled, failing on growth after warm-up or on unexpected errors (soak.json, soak.png).
    Soak(commands::soak::Args),
    /// Run a GStreamer pipeline through kestrelinfer and kestreloverlay: numbered frames or a
    /// test pattern in, annotated frames and detections.jsonl out.
    #[cfg(feature = "gstreamer")]
    Pipeline(commands::pipeline::Args),
}

fn main() -> ExitCode {
    ignore_sigxfsz();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KESTREL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Export(a) => commands::export::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Infer(a) => commands::infer::run(a),
        Command::Val(a) => commands::val::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Build(a) => commands::build::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Doctor(a) => commands::doctor::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Soak(a) => commands::soak::run(a),
        #[cfg(feature = "gstreamer")]
        Command::Pipeline(a) => commands::pipeline::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, most general first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A write past a file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) then fails with EFBIG,
/// which the atomic writers report ("file too large … raise the limit") and clean up after,
/// instead of SIGXFSZ killing the process mid-write with a core dump and leaving the temporary
/// file behind (PostgreSQL ignores it for the same reason).
#[cfg(unix)]
#[allow(unsafe_code)]
fn ignore_sigxfsz() {
    // SAFETY: only sets one signal's disposition to SIG_IGN, first thing in main, before any
    // other thread exists or any handler is installed.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn ignore_sigxfsz() {}
