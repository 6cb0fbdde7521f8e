//! The `kestreloverlay` element: a video filter that draws the `kestrel/detection` regions of
//! each buffer into an RGBA layer and blends it onto the frame in place.

use std::fmt::Write;
use std::sync::{LazyLock, Mutex};

use ab_glyph::{Font, FontVec, PxScale, ScaleFont};
use gst::glib;
use gst::subclass::prelude::*;
use gst_base::subclass::BaseTransformMode;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use image::{Rgba, RgbaImage};

use crate::detection::{self, FrameDetection};
use crate::frame;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "kestreloverlay",
        gst::DebugColorFlags::empty(),
        Some("Kestrel detection overlay"),
    )
});

const DEFAULT_LINE: u32 = 2;
const DEFAULT_FONT_SCALE: f64 = 1.0;
/// Label text height at font-scale 1, pixels.
const BASE_TEXT_PX: f32 = 16.0;
/// Opacity of instance masks in the layer (of 255).
const MASK_ALPHA: u8 = 110;

#[derive(Debug, Clone, Copy)]
struct Settings {
    line_width: u32,
    font_scale: f64,
}

/// What the overlay reuses from frame to frame, so drawing allocates nothing once warm.
struct Scratch {
    /// The drawing layer, transparent outside `dirty`.
    layer: RgbaImage,
    /// Rows of `layer` drawn on for the previous frame.
    dirty: std::ops::Range<u32>,
    detections: Vec<FrameDetection>,
    text: String,
}

pub struct KestrelOverlay {
    settings: Mutex<Settings>,
    scratch: Mutex<Scratch>,
    font: Option<FontVec>,
}

impl KestrelOverlay {
    /// Draw `dets` into `layer` (`text`: a scratch string); returns the rows touched.
    fn draw(
        &self,
        layer: &mut RgbaImage,
        dets: &[FrameDetection],
        text: &mut String,
        s: Settings,
    ) -> std::ops::Range<u32> {
        let (w, h) = layer.dimensions();
        let (mut top, mut bottom) = (h, 0u32);
        // Instance masks first (translucent, in the class colour), boxes and labels on top.
        for d in dets {
            let Some(m) = d
                .mask
                .as_ref()
                .filter(|m| (m.width, m.height) == (w as usize, h as usize))
            else {
                continue;
            };
            let [r, g, b] = kestrel_runtime::labels::class_colour(d.class_id as usize);
            let mut at = 0usize;
            for (k, &run) in m.counts.iter().enumerate() {
                if k % 2 == 1 {
                    // Column-major runs: pixel i is (i / height, i % height).
                    for i in at..(at + run as usize).min(m.width * m.height) {
                        let (x, y) = ((i / m.height) as u32, (i % m.height) as u32);
                        layer.put_pixel(x, y, Rgba([r, g, b, MASK_ALPHA]));
                        top = top.min(y);
                        bottom = bottom.max(y + 1);
                    }
                }
                at += run as usize;
            }
        }
        let mut fill = |layer: &mut RgbaImage, x0: u32, y0: u32, x1: u32, y1: u32, c: [u8; 4]| {
            let (x1, y1) = (x1.min(w), y1.min(h));
            for y in y0..y1 {
                for x in x0..x1 {
                    layer.put_pixel(x, y, Rgba(c));
                }
            }
            if y0 < y1 {
                top = top.min(y0);
                bottom = bottom.max(y1);
            }
        };
        let t = s.line_width;
        for d in dets {
            let [r, g, b] = kestrel_runtime::labels::class_colour(d.class_id as usize);
            let c = [r, g, b, 255];
            let (x, y, rw, rh) = d.rect;
            let (x1, y1) = (x + rw, y + rh);
            fill(layer, x, y, x1, y + t, c);
            fill(layer, x, y1.saturating_sub(t), x1, y1, c);
            fill(layer, x, y, x + t, y1, c);
            fill(layer, x1.saturating_sub(t), y, x1, y1, c);
            let Some(font) = &self.font else { continue };
            text.clear();
            let _ = write!(text, "{} {:.2}", d.label, d.confidence);
            let px = BASE_TEXT_PX * s.font_scale as f32;
            let scaled = font.as_scaled(PxScale::from(px));
            let text_w: f32 = text
                .chars()
                .map(|ch| scaled.h_advance(font.glyph_id(ch)))
                .sum();
            let (tw, th) = (text_w.ceil() as u32 + 4, (px * 1.25).ceil() as u32);
            // Above the box when there is room, else inside it; moved left to stay in the frame.
            let ty = if y >= th { y - th } else { y };
            let x = x.min(w.saturating_sub(tw));
            fill(layer, x, ty, x + tw, ty + th, [r / 2, g / 2, b / 2, 230]);
            let mut caret = x as f32 + 2.0;
            for ch in text.chars() {
                let id = font.glyph_id(ch);
                let glyph = id.with_scale_and_position(
                    PxScale::from(px),
                    ab_glyph::point(caret, ty as f32 + scaled.ascent() + px * 0.1),
                );
                caret += scaled.h_advance(id);
                if let Some(outlined) = font.outline_glyph(glyph) {
                    let bounds = outlined.px_bounds();
                    outlined.draw(|gx, gy, coverage| {
                        let (px_x, px_y) = (
                            bounds.min.x as i64 + gx as i64,
                            bounds.min.y as i64 + gy as i64,
                        );
                        if px_x >= 0
                            && px_y >= 0
                            && (px_x as u32) < w
                            && (px_y as u32) < h
                            && coverage > 0.0
                        {
                            let a = (coverage.min(1.0) * 255.0) as u8;
                            let p = layer.get_pixel_mut(px_x as u32, px_y as u32);
                            // White text over the label background.
                            let k = f32::from(a) / 255.0;
                            for ch in 0..3 {
                                p.0[ch] = (f32::from(p.0[ch]) * (1.0 - k) + 255.0 * k) as u8;
                            }
                            p.0[3] = p.0[3].max(a);
                        }
                    });
                }
            }
        }
        top.min(bottom)..bottom
    }
}

#[glib::object_subclass]
impl ObjectSubclass for KestrelOverlay {
    const NAME: &'static str = "GstKestrelOverlay";
    type Type = super::KestrelOverlay;
    type ParentType = gst_video::VideoFilter;

    fn new() -> Self {
        let font =
            kestrel_runtime::labels::label_font_bytes().and_then(|b| FontVec::try_from_vec(b).ok());
        Self {
            settings: Mutex::new(Settings {
                line_width: DEFAULT_LINE,
                font_scale: DEFAULT_FONT_SCALE,
            }),
            scratch: Mutex::new(Scratch {
                layer: RgbaImage::new(0, 0),
                dirty: 0..0,
                detections: Vec::new(),
                text: String::new(),
            }),
            font,
        }
    }
}

impl ObjectImpl for KestrelOverlay {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecUInt::builder("line-width")
                    .nick("Line width")
                    .blurb("Box outline width in pixels")
                    .minimum(1)
                    .maximum(50)
                    .default_value(DEFAULT_LINE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("font-scale")
                    .nick("Font scale")
                    .blurb("Label size relative to 16-pixel text")
                    .minimum(0.25)
                    .maximum(10.0)
                    .default_value(DEFAULT_FONT_SCALE)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match pspec.name() {
            "line-width" => s.line_width = value.get().unwrap_or(DEFAULT_LINE),
            "font-scale" => s.font_scale = value.get().unwrap_or(DEFAULT_FONT_SCALE),
            other => gst::warning!(CAT, imp = self, "no property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match pspec.name() {
            "line-width" => s.line_width.to_value(),
            "font-scale" => s.font_scale.to_value(),
            _ => pspec.default_value().clone(),
        }
    }
}

impl GstObjectImpl for KestrelOverlay {}

impl ElementImpl for KestrelOverlay {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Kestrel detection overlay",
                "Filter/Effect/Video",
                "Draws the boxes and labels kestrelinfer attached to each frame",
                "Kestrel",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = frame::caps();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink template"),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for KestrelOverlay {
    const MODE: BaseTransformMode = BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;
}

impl VideoFilterImpl for KestrelOverlay {
    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Scratch {
            layer,
            dirty,
            detections,
            text,
        } = &mut *scratch;
        detection::read_into(frame.buffer(), detections);
        if detections.is_empty() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let settings = *self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (w, h) = (frame.width(), frame.height());
        if layer.dimensions() != (w, h) {
            *layer = RgbaImage::new(w, h);
        } else if dirty.start < dirty.end {
            // Only the rows the previous frame drew on need clearing.
            let row = w as usize * 4;
            layer.as_mut()[dirty.start as usize * row..dirty.end as usize * row].fill(0);
        }
        let rows = self.draw(layer, detections, text, settings);
        *dirty = rows.clone();
        frame::composite(frame, layer, rows)?;
        Ok(gst::FlowSuccess::Ok)
    }
}
