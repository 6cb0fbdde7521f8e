//! Fuzz target `yolo_labels`: see [`kestrel_fuzz::checks::yolo_labels`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::yolo_labels(data));
