//! Kestrel runtime: engines (the `cpu` backend on tract), letterbox pre-processing, decoding of the
//! YOLOv9 head, NMS, datasets (YOLO txt, COCO json, synthetic scenes) with their instance masks,
//! COCO-style evaluation (boxes and masks), and calibration of activation ranges for post-training
//! quantization.
//!
//! The CPU implementations here are the reference every GPU kernel is tested against.

pub mod calibrate;
pub mod dataset;
pub mod detection;
pub mod detector;
pub mod end_to_end;
pub mod engine;
pub mod engine_file;
pub mod error;
pub mod eval;
pub mod frame;
pub mod half;
pub mod kserve;
pub mod labels;
pub mod letterbox;
pub mod masks;
pub mod model_config;
pub mod nms;
pub mod plot;
pub mod probe;
pub mod segments;
pub mod synth;

mod cpu;
pub mod cuda;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;

pub use detection::{BoxXyxy, Detection, GroundTruth};
pub use detector::Detector;
pub use error::{Error, Result};
pub use masks::{Bitmap, Rle};
pub use segments::{Segmentation, paint_order_masks};
