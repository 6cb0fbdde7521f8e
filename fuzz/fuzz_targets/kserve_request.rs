//! Fuzz target `kserve_request`: see [`kestrel_fuzz::checks::kserve_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::kserve_request(data));
