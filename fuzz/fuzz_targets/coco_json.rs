//! Fuzz target `coco_json`: see [`kestrel_fuzz::checks::coco_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::coco_json(data));
