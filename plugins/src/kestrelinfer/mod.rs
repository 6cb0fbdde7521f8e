//! `kestrelinfer`: runs a Kestrel detector on raw video and attaches the detections to the
//! buffers, which pass through unchanged.
//!
//! ```text
//! gst-launch-1.0 videotestsrc num-buffers=30 ! video/x-raw,format=I420,width=1283,height=721 \
//!     ! kestrelinfer model=models/gelan-t-shapes.onnx ! kestreloverlay ! videoconvert \
//!     ! pngenc ! multifilesink location=frame%05d.png
//! ```
//!
//! Frames are queued and run as one batch when `batch-size` of them wait, or when the first of
//! them has waited `batch-timeout` microseconds (a partial batch also runs at EOS, caps changes
//! and other serialized events; a flush drops it); each buffer then leaves with one
//! `GstVideoRegionOfInterestMeta` per detection (see [`crate::detection`]).
//!
//! Several streams can share the element's engine: each requested `sink_N` pad (N ≥ 1) brings a
//! `src_N` pad, and the frames of all streams fill the same batches; each stream's buffers and
//! events leave by its own src pad, in order. `sink`/`src` are stream 0. As after `tee` or a
//! demuxer, give each src branch a `queue` when there are several: one thread pushes a batch's
//! frames out of all the pads, so a sink blocking on one branch (prerolling) would otherwise
//! hold up the frames the other branches need to preroll.
//!
//! ```text
//! gst-launch-1.0 kestrelinfer name=k model=m.onnx batch-size=2 batch-timeout=20000 \
//!     videotestsrc ! k.sink    k.src ! queue ! fakesink \
//!     videotestsrc pattern=ball ! k.sink_1    k.src_1 ! queue ! fakesink
//! ```
//!
//! With `stats-interval` set, the element posts a `kestrel/stats` element message per stream that
//! often; it always records [`FRAMES`], [`INFERRED`], [`DROPPED`], [`LATENCY`], [`BATCHES`] and
//! [`BATCH_FILL`] through the `metrics` facade (labels `element` and `stream`), which the process's
//! recorder exposes (`kestrel pipeline --metrics FILE` writes Prometheus's text format).

use gst::glib;
use gst::prelude::*;

mod imp;
mod stats;

pub use stats::{
    BATCH_FILL, BATCHES, DROPPED, FRAMES, INFERRED, LATENCY, MESSAGE as STATS_MESSAGE,
};

glib::wrapper! {
    pub struct KestrelInfer(ObjectSubclass<imp::KestrelInfer>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "kestrelinfer",
        gst::Rank::NONE,
        KestrelInfer::static_type(),
    )
}
