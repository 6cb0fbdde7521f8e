//! Kestrel's fuzz targets (cargo-fuzz, libFuzzer): the checks each target runs on an input
//! ([`checks`]) and the generator of the seed corpora ([`seeds`]). See docs/RELIABILITY.md.

pub mod checks;
pub mod seeds;

/// libFuzzer's panic hook aborts on every panic, even one the code under test catches on
/// purpose. `decode_image_bytes` catches the panics of the JPEG decoder (zune-jpeg, a dependency
/// we cannot fix; see its doc) and returns them as errors: this hook lets those unwind to it, and
/// keeps aborting on every other panic, ours included.
pub fn allow_caught_decoder_panics() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info
            .location()
            .is_some_and(|l| l.file().contains("/zune-jpeg-"))
        {
            return;
        }
        abort(info);
    }));
}
