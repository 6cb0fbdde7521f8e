//! Fuzz target `repository_config`: see [`kestrel_fuzz::checks::repository_config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::repository_config(data));
