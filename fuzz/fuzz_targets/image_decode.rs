//! Fuzz target `image_decode`: see [`kestrel_fuzz::checks::image_decode`].
#![no_main]

static HOOK: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    HOOK.call_once(kestrel_fuzz::allow_caught_decoder_panics);
    kestrel_fuzz::checks::image_decode(data)
});
