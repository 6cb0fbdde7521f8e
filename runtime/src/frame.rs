//! Raw camera frames (packed RGB-family and planar 4:2:0 YUV, any pitch) and their conversion to
//! 8-bit RGB: the CPU reference the GPU letterbox (`cuda::pre`) is tested against, and what the
//! GStreamer elements read frames with.

use image::RgbImage;

use crate::error::{Error, Result};

/// Pixel layouts of raw frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Packed R, G, B bytes.
    Rgb,
    /// Packed B, G, R bytes.
    Bgr,
    /// Packed R, G, B, A bytes (alpha ignored).
    Rgba,
    /// Packed B, G, R, x bytes.
    Bgrx,
    /// Planar Y, then interleaved U/V at half resolution.
    Nv12,
    /// Planar Y, U, V, chroma at half resolution.
    I420,
}

impl PixelFormat {
    /// Bytes each plane of a `width` x `height` frame with these row pitches spans (0 for
    /// unused planes): (rows - 1) pitches and one row. An error names an empty frame or a pitch
    /// under its row.
    pub fn plane_bytes(
        self,
        width: usize,
        height: usize,
        strides: [usize; 3],
    ) -> Result<[usize; 3]> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidArgument(format!(
                "empty {width}x{height} frame"
            )));
        }
        let mut need = [0; 3];
        for (i, n) in need.iter_mut().enumerate().take(self.planes()) {
            let (row, rows) = (self.row_bytes(i, width), self.rows(i, height));
            if strides[i] < row {
                return Err(Error::InvalidArgument(format!(
                    "{self:?} frame {width}x{height}: plane {i} pitch {} is under its row of \
                     {row} bytes",
                    strides[i]
                )));
            }
            *n = (rows - 1) * strides[i] + row;
        }
        Ok(need)
    }

    /// Numeric code shared with the GPU kernels.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Byte offsets of R, G, B in one pixel of a packed format, and the pixel's size in bytes.
    pub fn packed_layout(self) -> Option<([usize; 3], usize)> {
        match self {
            PixelFormat::Rgb => Some(([0, 1, 2], 3)),
            PixelFormat::Bgr => Some(([2, 1, 0], 3)),
            PixelFormat::Rgba => Some(([0, 1, 2], 4)),
            PixelFormat::Bgrx => Some(([2, 1, 0], 4)),
            PixelFormat::Nv12 | PixelFormat::I420 => None,
        }
    }

    /// Planes of the format.
    pub fn planes(self) -> usize {
        match self {
            PixelFormat::Nv12 => 2,
            PixelFormat::I420 => 3,
            _ => 1,
        }
    }

    /// Bytes of one row of plane `i` for a frame `width` pixels wide (the least pitch).
    pub fn row_bytes(self, plane: usize, width: usize) -> usize {
        let half = width.div_ceil(2);
        match (self, plane) {
            (PixelFormat::Nv12, 1) => half * 2,
            (PixelFormat::I420, 1 | 2) => half,
            (PixelFormat::Nv12 | PixelFormat::I420, _) => width,
            (f, _) => width * f.packed_layout().map_or(3, |(_, s)| s),
        }
    }

    /// Rows of plane `i` for a frame `height` pixels high.
    pub fn rows(self, plane: usize, height: usize) -> usize {
        if plane > 0 {
            height.div_ceil(2)
        } else {
            height
        }
    }
}

/// Y'CbCr → R'G'B' of a frame's colorimetry: luma weights and range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YuvMatrix {
    /// Luma weight of red (0.299 for BT.601, 0.2126 for BT.709).
    pub kr: f32,
    /// Luma weight of blue (0.114 for BT.601, 0.0722 for BT.709).
    pub kb: f32,
    /// Full range (0–255) rather than studio range (16–235 luma, 16–240 chroma).
    pub full_range: bool,
}

impl YuvMatrix {
    /// BT.601, studio range: what GStreamer assumes for unspecified SD content.
    pub const BT601: Self = Self {
        kr: 0.299,
        kb: 0.114,
        full_range: false,
    };
    /// BT.709, studio range (HD).
    pub const BT709: Self = Self {
        kr: 0.2126,
        kb: 0.0722,
        full_range: false,
    };

    /// One pixel to RGB, rounded and saturated. The GPU letterbox computes the same float
    /// operations in the same order.
    pub fn yuv_to_rgb(self, y: u8, u: u8, v: u8) -> [u8; 3] {
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

    /// One RGB pixel to Y'CbCr, rounded and saturated.
    pub fn rgb_to_yuv(self, [r, g, b]: [u8; 3]) -> [u8; 3] {
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

/// A raw frame in memory: `planes[i]` holds plane i's rows, `strides[i]` bytes apart (unused
/// planes empty).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub format: PixelFormat,
    /// Size in pixels.
    pub width: usize,
    pub height: usize,
    pub planes: [&'a [u8]; 3],
    /// Row pitch of each plane, in bytes.
    pub strides: [usize; 3],
    /// Colorimetry of YUV formats.
    pub yuv: YuvMatrix,
}

impl Frame<'_> {
    /// Check sizes and pitches against the planes' lengths; the error names the plane.
    pub fn validate(&self) -> Result<()> {
        let need = self
            .format
            .plane_bytes(self.width, self.height, self.strides)?;
        for (i, &need) in need.iter().enumerate().take(self.format.planes()) {
            if self.planes[i].len() < need {
                return Err(Error::InvalidArgument(format!(
                    "{:?} frame {}x{}: plane {i} holds {} bytes, needs {need}",
                    self.format,
                    self.width,
                    self.height,
                    self.planes[i].len()
                )));
            }
        }
        Ok(())
    }

    /// The frame as 8-bit RGB in `out` (resized to the frame).
    pub fn to_rgb(&self, out: &mut RgbImage) -> Result<()> {
        self.validate()?;
        let (w, h) = (self.width, self.height);
        if out.dimensions() != (w as u32, h as u32) {
            *out = RgbImage::new(w as u32, h as u32);
        }
        let px: &mut [u8] = out;
        let s = self.strides;
        if let Some((rgb, size)) = self.format.packed_layout() {
            for y in 0..h {
                let row = &self.planes[0][y * s[0]..y * s[0] + w * size];
                let dst = &mut px[y * w * 3..(y + 1) * w * 3];
                for (d, p) in dst.chunks_exact_mut(3).zip(row.chunks_exact(size)) {
                    d.copy_from_slice(&[p[rgb[0]], p[rgb[1]], p[rgb[2]]]);
                }
            }
            return Ok(());
        }
        let luma = self.planes[0];
        for y in 0..h {
            for x in 0..w {
                let (u, v) = match self.format {
                    PixelFormat::Nv12 => {
                        let c = (y / 2) * s[1] + (x / 2) * 2;
                        (self.planes[1][c], self.planes[1][c + 1])
                    }
                    _ => (
                        self.planes[1][(y / 2) * s[1] + x / 2],
                        self.planes[2][(y / 2) * s[2] + x / 2],
                    ),
                };
                let rgb = self.yuv.yuv_to_rgb(luma[y * s[0] + x], u, v);
                px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuv_round_trips_within_rounding() {
        for (kr, kb) in [(0.299, 0.114), (0.2126, 0.0722)] {
            for full_range in [false, true] {
                let yuv = YuvMatrix { kr, kb, full_range };
                for rgb in [[0, 0, 0], [255, 255, 255], [200, 30, 90], [12, 250, 128]] {
                    let [y, u, v] = yuv.rgb_to_yuv(rgb);
                    let back = yuv.yuv_to_rgb(y, u, v);
                    for (a, b) in rgb.iter().zip(back) {
                        assert!(
                            (i32::from(*a) - i32::from(b)).abs() <= 3,
                            "{rgb:?} -> {back:?}"
                        );
                    }
                }
            }
        }
        assert_eq!(YuvMatrix::BT601.rgb_to_yuv([0, 0, 0]), [16, 128, 128]);
        assert_eq!(
            YuvMatrix::BT601.rgb_to_yuv([255, 255, 255]),
            [235, 128, 128]
        );
    }

    #[test]
    fn planar_and_packed_frames_read_alike() {
        // A 3x3 frame (odd: chroma rounds up) with padded pitches, as NV12, I420 and BGRx.
        let (w, h) = (3, 3);
        let rgb = |x: usize, y: usize| [(x * 80) as u8, (y * 100) as u8, 77];
        let m = YuvMatrix::BT601;
        let mut bgrx = vec![0u8; 16 * h];
        let mut luma = vec![0u8; 5 * h];
        let mut uv = vec![0u8; 6 * 2];
        let (mut u, mut v) = (vec![0u8; 4 * 2], vec![0u8; 4 * 2]);
        for y in 0..h {
            for x in 0..w {
                let [r, g, b] = rgb(x, y);
                bgrx[y * 16 + x * 4..y * 16 + x * 4 + 4].copy_from_slice(&[b, g, r, 0]);
                let [yy, cu, cv] = m.rgb_to_yuv([r, g, b]);
                luma[y * 5 + x] = yy;
                if x % 2 == 0 && y % 2 == 0 {
                    uv[(y / 2) * 6 + x] = cu;
                    uv[(y / 2) * 6 + x + 1] = cv;
                    u[(y / 2) * 4 + x / 2] = cu;
                    v[(y / 2) * 4 + x / 2] = cv;
                }
            }
        }
        let frame = |format, planes, strides| Frame {
            format,
            width: w,
            height: h,
            planes,
            strides,
            yuv: m,
        };
        let mut out = RgbImage::new(1, 1);
        frame(PixelFormat::Bgrx, [&bgrx[..], &[], &[]], [16, 0, 0])
            .to_rgb(&mut out)
            .unwrap();
        assert_eq!(out.get_pixel(2, 1).0, rgb(2, 1));
        let mut nv12 = RgbImage::new(1, 1);
        frame(PixelFormat::Nv12, [&luma[..], &uv[..], &[]], [5, 6, 0])
            .to_rgb(&mut nv12)
            .unwrap();
        let mut i420 = RgbImage::new(1, 1);
        frame(PixelFormat::I420, [&luma[..], &u[..], &v[..]], [5, 4, 4])
            .to_rgb(&mut i420)
            .unwrap();
        assert_eq!(nv12, i420);
        let err = frame(PixelFormat::I420, [&luma[..], &u[..4], &v[..]], [5, 4, 4])
            .to_rgb(&mut i420)
            .unwrap_err()
            .to_string();
        assert!(err.contains("plane 1"), "{err}");
    }
}
