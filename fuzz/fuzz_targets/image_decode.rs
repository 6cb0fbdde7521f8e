//! Fuzz target `image_decode`: see [`kestrel_fuzz::checks::image_decode`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_fuzz::checks::image_decode(data));
