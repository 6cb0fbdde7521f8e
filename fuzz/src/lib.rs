//! Kestrel's fuzz targets (cargo-fuzz, libFuzzer): the checks each target runs on an input
//! ([`checks`]) and the generator of the seed corpora ([`seeds`]). See docs/RELIABILITY.md.

pub mod checks;
pub mod seeds;
