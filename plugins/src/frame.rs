//! Raw video frames ↔ RGB: any supported format read into an RGB image for the detector, and an
//! RGBA drawing layer composited onto a frame of any supported format (for the overlay).

use gst_video::{VideoColorMatrix, VideoColorRange, VideoFormat, VideoFrameExt, VideoFrameRef};
use image::{RgbImage, RgbaImage};

/// The formats both elements accept.
pub const FORMATS: [VideoFormat; 6] = [
    VideoFormat::Rgb,
    VideoFormat::Bgr,
    VideoFormat::Rgba,
    VideoFormat::Bgrx,
    VideoFormat::Nv12,
    VideoFormat::I420,
];

/// `video/x-raw` caps of [`FORMATS`], any size and frame rate.
pub fn caps() -> gst::Caps {
    gst_video::VideoCapsBuilder::new()
        .format_list(FORMATS)
        .build()
}

/// Y'CbCr ↔ R'G'B' of a frame's colorimetry: luma weights and range.
#[derive(Debug, Clone, Copy)]
struct Yuv {
    kr: f32,
    kb: f32,
    full_range: bool,
}

impl Yuv {
    fn of(info: &gst_video::VideoInfo) -> Self {
        let c = info.colorimetry();
        let (kr, kb) = match c.matrix() {
            VideoColorMatrix::Bt709 => (0.2126, 0.0722),
            VideoColorMatrix::Bt2020 => (0.2627, 0.0593),
            // BT.601 is what GStreamer assumes for unspecified SD content; use it as the default.
            _ => (0.299, 0.114),
        };
        Self {
            kr,
            kb,
            full_range: c.range() == VideoColorRange::Range0_255,
        }
    }

    fn yuv_to_rgb(self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let (y, u, v) = if self.full_range {
            (f32::from(y), f32::from(u) - 128.0, f32::from(v) - 128.0)
        } else {
            (
                (f32::from(y) - 16.0) * (255.0 / 219.0),
                (f32::from(u) - 128.0) * (255.0 / 224.0),
                (f32::from(v) - 128.0) * (255.0 / 224.0),
            )
        };
        let kg = 1.0 - self.kr - self.kb;
        let r = y + 2.0 * (1.0 - self.kr) * v;
        let b = y + 2.0 * (1.0 - self.kb) * u;
        let g = y
            - (2.0 * self.kb * (1.0 - self.kb) / kg) * u
            - (2.0 * self.kr * (1.0 - self.kr) / kg) * v;
        [clamp_u8(r), clamp_u8(g), clamp_u8(b)]
    }

    fn rgb_to_yuv(self, [r, g, b]: [u8; 3]) -> [u8; 3] {
        let (r, g, b) = (f32::from(r), f32::from(g), f32::from(b));
        let kg = 1.0 - self.kr - self.kb;
        let y = self.kr * r + kg * g + self.kb * b;
        let u = (b - y) / (2.0 * (1.0 - self.kb));
        let v = (r - y) / (2.0 * (1.0 - self.kr));
        if self.full_range {
            [clamp_u8(y), clamp_u8(u + 128.0), clamp_u8(v + 128.0)]
        } else {
            [
                clamp_u8(16.0 + y * (219.0 / 255.0)),
                clamp_u8(128.0 + u * (224.0 / 255.0)),
                clamp_u8(128.0 + v * (224.0 / 255.0)),
            ]
        }
    }
}

fn clamp_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Byte offsets of R, G, B in one pixel of a packed RGB-family format, and its size.
fn packed_layout(format: VideoFormat) -> Option<([usize; 3], usize)> {
    match format {
        VideoFormat::Rgb => Some(([0, 1, 2], 3)),
        VideoFormat::Bgr => Some(([2, 1, 0], 3)),
        VideoFormat::Rgba => Some(([0, 1, 2], 4)),
        VideoFormat::Bgrx => Some(([2, 1, 0], 4)),
        _ => None,
    }
}

/// Read `frame` into `out` (resized to the frame), as 8-bit RGB.
pub fn to_rgb(
    frame: &VideoFrameRef<&gst::BufferRef>,
    out: &mut RgbImage,
) -> Result<(), gst::FlowError> {
    let (w, h) = (frame.width(), frame.height());
    if out.dimensions() != (w, h) {
        *out = RgbImage::new(w, h);
    }
    let (w, h) = (w as usize, h as usize);
    let format = frame.format();
    let stride = |i: usize| frame.plane_stride()[i] as usize;
    let plane = |i: u32| frame.plane_data(i).map_err(|_| gst::FlowError::Error);
    let px: &mut [u8] = out;
    if let Some((rgb, size)) = packed_layout(format) {
        let data = plane(0)?;
        let s = stride(0);
        for y in 0..h {
            let row = &data[y * s..y * s + w * size];
            let dst = &mut px[y * w * 3..(y + 1) * w * 3];
            for (d, p) in dst.chunks_exact_mut(3).zip(row.chunks_exact(size)) {
                d.copy_from_slice(&[p[rgb[0]], p[rgb[1]], p[rgb[2]]]);
            }
        }
        return Ok(());
    }
    let yuv = Yuv::of(frame.info());
    let luma = plane(0)?;
    let (sy, s1) = (stride(0), stride(1));
    match format {
        VideoFormat::Nv12 => {
            let uv = plane(1)?;
            for y in 0..h {
                for x in 0..w {
                    let c = (y / 2) * s1 + (x / 2) * 2;
                    let rgb = yuv.yuv_to_rgb(luma[y * sy + x], uv[c], uv[c + 1]);
                    px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                }
            }
        }
        VideoFormat::I420 => {
            let (u, v, s2) = (plane(1)?, plane(2)?, stride(2));
            for y in 0..h {
                for x in 0..w {
                    let rgb = yuv.yuv_to_rgb(
                        luma[y * sy + x],
                        u[(y / 2) * s1 + x / 2],
                        v[(y / 2) * s2 + x / 2],
                    );
                    px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                }
            }
        }
        _ => return Err(gst::FlowError::NotNegotiated),
    }
    Ok(())
}

/// Blend the RGBA `layer` (the frame's size; alpha 0 leaves a pixel alone) onto `frame`, only in
/// rows `rows`. Chroma of 4:2:0 formats takes the colour of the most opaque layer pixel of each
/// 2×2 block.
pub fn composite(
    frame: &mut VideoFrameRef<&mut gst::BufferRef>,
    layer: &RgbaImage,
    rows: std::ops::Range<u32>,
) -> Result<(), gst::FlowError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if layer.dimensions() != (w as u32, h as u32) {
        return Err(gst::FlowError::Error);
    }
    let rows = rows.start as usize..(rows.end as usize).min(h);
    let format = frame.format();
    let strides: Vec<usize> = frame.plane_stride().iter().map(|&s| s as usize).collect();
    let blend = |dst: u8, src: u8, a: u8| -> u8 {
        let a = u16::from(a);
        ((u16::from(src) * a + u16::from(dst) * (255 - a) + 127) / 255) as u8
    };
    if let Some((rgb, size)) = packed_layout(format) {
        let s = strides[0];
        let data = frame.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?;
        for y in rows {
            for x in 0..w {
                let p = layer.get_pixel(x as u32, y as u32).0;
                if p[3] == 0 {
                    continue;
                }
                let o = y * s + x * size;
                for c in 0..3 {
                    data[o + rgb[c]] = blend(data[o + rgb[c]], p[c], p[3]);
                }
            }
        }
        return Ok(());
    }
    let yuv = Yuv::of(frame.info());
    {
        let s = strides[0];
        let luma = frame.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?;
        for y in rows.clone() {
            for x in 0..w {
                let p = layer.get_pixel(x as u32, y as u32).0;
                if p[3] != 0 {
                    let o = y * s + x;
                    luma[o] = blend(luma[o], yuv.rgb_to_yuv([p[0], p[1], p[2]])[0], p[3]);
                }
            }
        }
    }
    // Chroma: one sample per 2×2 block.
    let chroma_rows = rows.start / 2..rows.end.div_ceil(2);
    let block = |cx: usize, cy: usize| -> Option<([u8; 3], u8)> {
        let mut best: Option<([u8; 3], u8)> = None;
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (x, y) = (2 * cx + dx, 2 * cy + dy);
            if x < w && y < h {
                let p = layer.get_pixel(x as u32, y as u32).0;
                if p[3] > best.map_or(0, |b| b.1) {
                    best = Some(([p[0], p[1], p[2]], p[3]));
                }
            }
        }
        best
    };
    let cw = w.div_ceil(2);
    match format {
        VideoFormat::Nv12 => {
            let s = strides[1];
            let uv = frame.plane_data_mut(1).map_err(|_| gst::FlowError::Error)?;
            for cy in chroma_rows {
                for cx in 0..cw {
                    if let Some((rgb, a)) = block(cx, cy) {
                        let c = yuv.rgb_to_yuv(rgb);
                        let o = cy * s + 2 * cx;
                        uv[o] = blend(uv[o], c[1], a);
                        uv[o + 1] = blend(uv[o + 1], c[2], a);
                    }
                }
            }
        }
        VideoFormat::I420 => {
            for (plane, k) in [(1usize, 1usize), (2, 2)] {
                let s = strides[plane];
                let data = frame
                    .plane_data_mut(plane as u32)
                    .map_err(|_| gst::FlowError::Error)?;
                for cy in chroma_rows.clone() {
                    for cx in 0..cw {
                        if let Some((rgb, a)) = block(cx, cy) {
                            let o = cy * s + cx;
                            data[o] = blend(data[o], yuv.rgb_to_yuv(rgb)[k], a);
                        }
                    }
                }
            }
        }
        _ => return Err(gst::FlowError::NotNegotiated),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn yuv_round_trips_within_rounding() {
        for (kr, kb) in [(0.299, 0.114), (0.2126, 0.0722)] {
            for full_range in [false, true] {
                let yuv = Yuv { kr, kb, full_range };
                for rgb in [[0, 0, 0], [255, 255, 255], [200, 30, 90], [10, 240, 120]] {
                    let [y, u, v] = yuv.rgb_to_yuv(rgb);
                    let back = yuv.yuv_to_rgb(y, u, v);
                    for c in 0..3 {
                        let d = (i16::from(back[c]) - i16::from(rgb[c])).abs();
                        assert!(d <= 2, "{rgb:?} -> {:?} -> {back:?}", [y, u, v]);
                    }
                }
            }
        }
        // Limited-range black and white are 16 and 235.
        let bt601 = Yuv {
            kr: 0.299,
            kb: 0.114,
            full_range: false,
        };
        assert_eq!(bt601.rgb_to_yuv([0, 0, 0]), [16, 128, 128]);
        assert_eq!(bt601.rgb_to_yuv([255, 255, 255]), [235, 128, 128]);
    }
}
