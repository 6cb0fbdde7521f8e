//! Annotated pictures: boxes (and instance masks) in a colour per class, with "label score" tags.

use ab_glyph::{FontVec, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;
use kestrel_runtime::Detection;
use kestrel_runtime::labels;
use kestrel_runtime::masks::Bitmap;

/// Draws detections; holds the label font.
pub struct Annotator {
    font: Option<FontVec>,
}

/// The class's colour ([`kestrel_runtime::labels::class_colour`]) as an image pixel.
pub fn class_colour(class_id: usize) -> Rgb<u8> {
    Rgb(labels::class_colour(class_id))
}

impl Annotator {
    /// Loads the first font found (`$KESTREL_FONT` first); without one, boxes are drawn without text.
    pub fn new() -> Self {
        let font = labels::label_font_bytes().and_then(|b| FontVec::try_from_vec(b).ok());
        if font.is_none() {
            tracing::warn!(
                "no label font found (install fonts-dejavu-core); drawing boxes without labels"
            );
        }
        Self { font }
    }

    /// Blend each detection's instance mask onto `img` in its class colour (40 % opacity);
    /// `masks[k]` is the mask of `dets[k]`, at the image's size.
    pub fn draw_masks(&self, img: &mut RgbImage, dets: &[Detection], masks: &[Bitmap]) {
        let width = img.width() as usize;
        for (d, m) in dets.iter().zip(masks).rev() {
            if (m.width, m.height) != (width, img.height() as usize) {
                continue;
            }
            let colour = class_colour(d.class_id).0;
            for (i, _) in m.data.iter().enumerate().filter(|(_, v)| **v != 0) {
                let px = img.get_pixel_mut((i % width) as u32, (i / width) as u32);
                for c in 0..3 {
                    px.0[c] = ((px.0[c] as u16 * 3 + colour[c] as u16 * 2) / 5) as u8;
                }
            }
        }
    }

    /// Draw `dets` onto `img`; `names[class_id]` labels each box.
    pub fn draw(&self, img: &mut RgbImage, dets: &[Detection], names: &[String]) {
        let (w, h) = (img.width() as i32, img.height() as i32);
        let thickness = ((w.min(h) as f32 / 320.0).round() as i32).clamp(1, 6);
        let scale = PxScale::from((w.min(h) as f32 / 40.0).clamp(11.0, 40.0));
        for d in dets.iter().rev() {
            let colour = class_colour(d.class_id);
            let x1 = d.bbox.x1.round() as i32;
            let y1 = d.bbox.y1.round() as i32;
            let bw = (d.bbox.width().round() as u32).max(1);
            let bh = (d.bbox.height().round() as u32).max(1);
            for t in 0..thickness {
                let rw = bw.saturating_sub(2 * t as u32).max(1);
                let rh = bh.saturating_sub(2 * t as u32).max(1);
                draw_hollow_rect_mut(img, Rect::at(x1 + t, y1 + t).of_size(rw, rh), colour);
            }
            if let Some(font) = &self.font {
                let name = names.get(d.class_id).map(String::as_str).unwrap_or("?");
                let text = format!("{name} {:.2}", d.score);
                let (tw, th) = text_size(scale, font, &text);
                let ty = if y1 - th as i32 - 4 >= 0 {
                    y1 - th as i32 - 4
                } else {
                    y1
                };
                let tx = x1.clamp(0, (w - tw as i32 - 4).max(0));
                draw_filled_rect_mut(img, Rect::at(tx, ty).of_size(tw + 4, th + 4), colour);
                draw_text_mut(
                    img,
                    Rgb([255, 255, 255]),
                    tx + 2,
                    ty + 1,
                    scale,
                    font,
                    &text,
                );
            }
        }
    }
}
