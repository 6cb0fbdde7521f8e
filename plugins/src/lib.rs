//! Kestrel's GStreamer plugin: `kestrelinfer` runs a detector on video frames and attaches one
//! `GstVideoRegionOfInterestMeta` per detection; `kestreloverlay` draws them. Load it with
//! `GST_PLUGIN_PATH=<folder of libgstkestrel.so>`.
#![allow(unsafe_code)] // gst::plugin_define! exports the C entry point GStreamer looks up.

pub mod detection;
mod frame;
mod kestrelinfer;
mod kestreloverlay;

/// Names of what `kestrelinfer` measures: its metrics (through the `metrics` facade) and its
/// `kestrel/stats` element messages.
pub mod stats {
    pub use crate::kestrelinfer::{
        BATCH_FILL, BATCHES, DROPPED, FRAMES, INFERRED, LATENCY, STATS_MESSAGE,
    };
}

/// Register every element of the plugin with `plugin`.
fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    kestrelinfer::register(plugin)?;
    kestreloverlay::register(plugin)?;
    Ok(())
}

/// Register the elements in this process without loading the shared library (tests, apps that
/// link the crate).
pub fn register_static() -> Result<(), gst::glib::BoolError> {
    plugin_register_static()
}

// GStreamer accepts only its own list of license names, which has no "Apache-2.0".
gst::plugin_define!(
    kestrel,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "unknown",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY")
);
