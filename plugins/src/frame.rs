//! Raw video frames for the detector (the runtime's view of a mapped frame, any supported format)
//! and an RGBA drawing layer composited onto a frame of any supported format (for the overlay).

use gst_video::{VideoColorMatrix, VideoColorRange, VideoFormat, VideoFrameExt, VideoFrameRef};
use image::RgbaImage;
use kestrel_runtime::frame::{Frame, PixelFormat, YuvMatrix};

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
fn yuv_of(info: &gst_video::VideoInfo) -> YuvMatrix {
    let c = info.colorimetry();
    let (kr, kb) = match c.matrix() {
        VideoColorMatrix::Bt709 => (0.2126, 0.0722),
        VideoColorMatrix::Bt2020 => (0.2627, 0.0593),
        // BT.601 is what GStreamer assumes for unspecified SD content; use it as the default.
        _ => (0.299, 0.114),
    };
    YuvMatrix {
        kr,
        kb,
        full_range: c.range() == VideoColorRange::Range0_255,
    }
}

/// The runtime's name for a GStreamer format of [`FORMATS`].
fn pixel_format(format: VideoFormat) -> Option<PixelFormat> {
    Some(match format {
        VideoFormat::Rgb => PixelFormat::Rgb,
        VideoFormat::Bgr => PixelFormat::Bgr,
        VideoFormat::Rgba => PixelFormat::Rgba,
        VideoFormat::Bgrx => PixelFormat::Bgrx,
        VideoFormat::Nv12 => PixelFormat::Nv12,
        VideoFormat::I420 => PixelFormat::I420,
        _ => return None,
    })
}

/// The runtime's view of `frame`: its planes as they are, for the detector (which letterboxes
/// them on the GPU where it can).
pub fn raw<'a>(frame: &'a VideoFrameRef<&gst::BufferRef>) -> Result<Frame<'a>, gst::FlowError> {
    let format = pixel_format(frame.format()).ok_or(gst::FlowError::NotNegotiated)?;
    let plane = |i: usize| -> Result<&[u8], gst::FlowError> {
        if i < format.planes() {
            frame
                .plane_data(i as u32)
                .map_err(|_| gst::FlowError::Error)
        } else {
            Ok(&[])
        }
    };
    let stride = |i: usize| {
        frame
            .plane_stride()
            .get(i)
            .map_or(0, |&s| s.max(0) as usize)
    };
    Ok(Frame {
        format,
        width: frame.width() as usize,
        height: frame.height() as usize,
        planes: [plane(0)?, plane(1)?, plane(2)?],
        strides: [stride(0), stride(1), stride(2)],
        yuv: yuv_of(frame.info()),
    })
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
    if let Some((rgb, size)) = pixel_format(format).and_then(PixelFormat::packed_layout) {
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
    let yuv = yuv_of(frame.info());
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
