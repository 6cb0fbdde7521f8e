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

use gst::glib;
use gst::prelude::*;

mod imp;

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
