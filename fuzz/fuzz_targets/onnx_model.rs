//! Fuzz target `onnx_model`: see [`kestrel_fuzz::checks::onnx_model`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::onnx_model(data));
