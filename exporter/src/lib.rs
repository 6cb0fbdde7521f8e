//! Kestrel's exporter: the ONNX format (protobuf types, read/write, a graph builder, shape
//! inference), the GELAN / YOLOv9 model family as data, ONNX export from a spec plus weights, model
//! inspection (parameters, FLOPs, operators), and post-training quantization to Q/DQ models.

pub mod builder;
pub mod deepstream;
pub mod end2end;
pub mod error;
pub mod export;
pub mod graph_view;
pub mod inspect;
pub mod onnx;
pub mod quantize;
pub mod shapes;
pub mod spec;
pub mod weights;

pub use error::{Error, Result};
pub use export::{ExportOptions, INPUT_NAME, OUTPUT_NAME, export};
pub use inspect::{ModelSummary, summarize};
pub use onnx::{pb, read_model, write_model};
pub use spec::{Activation, ModelConfig, ModelSpec};
pub use weights::{WeightFile, WeightSource};
