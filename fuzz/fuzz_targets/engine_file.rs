//! Fuzz target `engine_file`: see [`kestrel_fuzz::checks::engine_file`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::engine_file(data));
