//! One module per subcommand: its arguments (clap) and its `run`.

pub mod bench;
pub mod build;
pub mod export;
pub mod infer;
pub mod inspect;
pub mod quantize;
pub mod synth;
pub mod val;
