//! One module per subcommand: its arguments (clap) and its `run`.

pub mod bench;
pub mod build;
pub mod doctor;
pub mod export;
pub mod infer;
pub mod inspect;
#[cfg(feature = "gstreamer")]
pub mod pipeline;
pub mod quantize;
pub mod soak;
pub mod synth;
pub mod val;
