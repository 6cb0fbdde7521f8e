//! The trainer: GELAN / YOLOv9 networks in tch, built from the exporter's specs, and their
//! fusion into the deployment form the exporter writes.

pub mod data;
pub mod error;
pub mod eval;
pub mod graph;
pub mod import;
pub mod loss;
pub mod model;
pub mod optim;
/// The charts moved to the runtime (the soak runs draw them too).
pub use kestrel_runtime::plot;
pub mod quant;
pub mod train;

pub use error::{Error, Result};
pub use model::Gelan;
