//! `kestreloverlay`: draws the detections `kestrelinfer` attached (boxes, labels with
//! confidence) onto the frames, in place.
//!
//! ```text
//! gst-launch-1.0 filesrc location=in.mp4 ! decodebin ! videoconvert \
//!     ! kestrelinfer model=models/gelan-t-shapes.onnx ! kestreloverlay line-width=3 \
//!     ! videoconvert ! autovideosink
//! ```

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct KestrelOverlay(ObjectSubclass<imp::KestrelOverlay>)
        @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "kestreloverlay",
        gst::Rank::NONE,
        KestrelOverlay::static_type(),
    )
}
