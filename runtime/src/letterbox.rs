//! Letterbox pre-processing: resize keeping the aspect ratio, centre, pad with grey 114, and the
//! exact inverse mapping for boxes. This is the CPU reference the GPU kernel is tested against.

use image::RgbImage;

use crate::detection::BoxXyxy;
use crate::error::{Error, Result};
use crate::half::f32_to_f16_bits;

/// Grey level of the padding (0–255), as YOLO uses.
pub const FILL: u8 = 114;

/// Where a source image lands inside the engine input, and how to map boxes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LetterboxParams {
    /// Source image size in pixels.
    pub src_w: u32,
    pub src_h: u32,
    /// Engine input size in pixels.
    pub dst_w: u32,
    pub dst_h: u32,
    /// Size of the resized image inside the input, in pixels.
    pub new_w: u32,
    pub new_h: u32,
    /// Left and top padding, in input pixels.
    pub left: u32,
    pub top: u32,
}

/// Python's `round` (half to even), which YOLO's letterbox uses for sizes and padding.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

impl LetterboxParams {
    /// The placement YOLO's `letterbox(auto=False, scaleup=True)` chooses.
    pub fn new(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> Result<Self> {
        if src_w == 0 || src_h == 0 {
            return Err(Error::InvalidArgument(format!(
                "empty {src_w}x{src_h} image"
            )));
        }
        if dst_w == 0 || dst_h == 0 {
            return Err(Error::InvalidArgument(format!(
                "empty {dst_w}x{dst_h} engine input"
            )));
        }
        let r = (dst_h as f64 / src_h as f64).min(dst_w as f64 / src_w as f64);
        let new_w = (round_half_even(src_w as f64 * r) as u32).clamp(1, dst_w);
        let new_h = (round_half_even(src_h as f64 * r) as u32).clamp(1, dst_h);
        let dw = (dst_w - new_w) as f64 / 2.0;
        let dh = (dst_h - new_h) as f64 / 2.0;
        let left = round_half_even(dw - 0.1).max(0.0) as u32;
        let top = round_half_even(dh - 0.1).max(0.0) as u32;
        Ok(Self {
            src_w,
            src_h,
            dst_w,
            dst_h,
            new_w,
            new_h,
            left,
            top,
        })
    }

    /// Horizontal scale from source to input pixels.
    pub fn scale_x(&self) -> f32 {
        self.new_w as f32 / self.src_w as f32
    }

    /// Vertical scale from source to input pixels.
    pub fn scale_y(&self) -> f32 {
        self.new_h as f32 / self.src_h as f32
    }

    /// A box in source pixels → input pixels.
    pub fn to_input(&self, b: BoxXyxy) -> BoxXyxy {
        let (sx, sy) = (self.scale_x(), self.scale_y());
        let (l, t) = (self.left as f32, self.top as f32);
        BoxXyxy::new(b.x1 * sx + l, b.y1 * sy + t, b.x2 * sx + l, b.y2 * sy + t)
    }

    /// A box in input pixels → source pixels (not clipped).
    pub fn to_source(&self, b: BoxXyxy) -> BoxXyxy {
        let (sx, sy) = (self.scale_x(), self.scale_y());
        let (l, t) = (self.left as f32, self.top as f32);
        BoxXyxy::new(
            (b.x1 - l) / sx,
            (b.y1 - t) / sy,
            (b.x2 - l) / sx,
            (b.y2 - t) / sy,
        )
    }
}

/// One axis of bilinear sampling: for each output pixel, the two source indices and the weight
/// of the second (OpenCV's INTER_LINEAR with half-pixel centres and edge clamping).
pub(crate) fn axis_taps(src: u32, dst: u32, taps: &mut Vec<(u32, u32, f32)>) {
    taps.clear();
    let scale = src as f64 / dst as f64;
    taps.extend((0..dst).map(|d| clamped_tap((d as f64 + 0.5) * scale - 0.5, src)));
}

/// The bilinear tap at sample position `f` (in source cells) of an axis of `n` cells: the two
/// cells and the weight of the second, clamped at both edges.
pub(crate) fn clamped_tap(f: f64, n: u32) -> (u32, u32, f32) {
    let mut i0 = f.floor();
    let mut w = f - i0;
    if i0 < 0.0 {
        i0 = 0.0;
        w = 0.0;
    }
    let mut i0 = i0 as u32;
    if i0 >= n - 1 {
        i0 = n - 1;
        w = 0.0;
    }
    (i0, (i0 + 1).min(n - 1), w as f32)
}

/// Memory layout of an engine's image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayout {
    /// `[batch, 3, height, width]`: planar, as ONNX models take it.
    Nchw,
    /// `[batch, height, width, 3]`: interleaved.
    Nhwc,
}

/// Element type of an engine's image input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputType {
    F32,
    /// IEEE half, rounded to nearest even.
    F16,
    /// Symmetric INT8 with the input's quantization scale (zero point 0): `round_ties_even(v /
    /// scale)`, saturated to -128..=127, as ONNX `QuantizeLinear`.
    Int8 {
        scale: f32,
    },
}

/// Layout and element type of an engine's image input; values are RGB in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputTensor {
    pub layout: InputLayout,
    pub dtype: InputType,
}

impl InputTensor {
    /// Planar float32, the input of ONNX models and of Kestrel's engines.
    pub const NCHW_F32: Self = Self {
        layout: InputLayout::Nchw,
        dtype: InputType::F32,
    };

    /// Bytes per element.
    pub fn element_bytes(&self) -> usize {
        match self.dtype {
            InputType::F32 => 4,
            InputType::F16 => 2,
            InputType::Int8 { .. } => 1,
        }
    }

    /// An INT8 scale must be a positive finite number.
    pub fn validate(&self) -> Result<()> {
        match self.dtype {
            InputType::Int8 { scale } if !(scale.is_finite() && scale > 0.0) => {
                Err(Error::InvalidArgument(format!(
                    "INT8 input scale {scale}: it must be a positive finite number (the input \
                     QuantizeLinear's scale, e.g. 1/255)"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Convert a planar float32 batch (`[batch, 3, height, width]`, what [`Letterboxer`] writes)
    /// into this layout and type, as little-endian bytes in `out` (replaced): the CPU reference
    /// of the GPU letterbox's other outputs.
    pub fn encode(
        &self,
        nchw: &[f32],
        height: usize,
        width: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.validate()?;
        let plane = height * width;
        if plane == 0 || !nchw.len().is_multiple_of(3 * plane) {
            return Err(Error::Shape(format!(
                "{} values are not whole 3 x {height} x {width} images",
                nchw.len()
            )));
        }
        out.clear();
        out.reserve(nchw.len() * self.element_bytes());
        // Element order of the output, then the value each element takes.
        let index = |o: usize| -> usize {
            match self.layout {
                InputLayout::Nchw => o,
                InputLayout::Nhwc => {
                    let (b, rest) = (o / (3 * plane), o % (3 * plane));
                    let (p, c) = (rest / 3, rest % 3);
                    (b * 3 + c) * plane + p
                }
            }
        };
        for o in 0..nchw.len() {
            let v = nchw[index(o)];
            match self.dtype {
                InputType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                InputType::F16 => out.extend_from_slice(&f32_to_f16_bits(v).to_le_bytes()),
                InputType::Int8 { scale } => {
                    out.push(((v / scale).round_ties_even().clamp(-128.0, 127.0) as i8) as u8)
                }
            }
        }
        Ok(())
    }
}

/// Letterboxes RGB images into planar float input; keeps its sampling tables between calls so
/// the per-frame path allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Letterboxer {
    xs: Vec<(u32, u32, f32)>,
    ys: Vec<(u32, u32, f32)>,
}

impl Letterboxer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `image` letterboxed into `out`, one image of NCHW float32 (`3 * dst_h * dst_w` values,
    /// RGB planes, values in [0, 1]). Returns the placement.
    pub fn run(
        &mut self,
        image: &RgbImage,
        dst_w: u32,
        dst_h: u32,
        out: &mut [f32],
    ) -> Result<LetterboxParams> {
        let p = LetterboxParams::new(image.width(), image.height(), dst_w, dst_h)?;
        let plane = (dst_w * dst_h) as usize;
        if out.len() != 3 * plane {
            return Err(Error::Shape(format!(
                "letterbox output holds {} values, a 3x{dst_h}x{dst_w} image needs {}",
                out.len(),
                3 * plane
            )));
        }
        let fill = FILL as f32 / 255.0;
        out.fill(fill);
        axis_taps(p.src_w, p.new_w, &mut self.xs);
        axis_taps(p.src_h, p.new_h, &mut self.ys);
        let src = image.as_raw();
        let stride = (p.src_w * 3) as usize;
        let (r_plane, rest) = out.split_at_mut(plane);
        let (g_plane, b_plane) = rest.split_at_mut(plane);
        for (dy, &(y0, y1, wy)) in self.ys.iter().enumerate() {
            let row0 = &src[y0 as usize * stride..][..stride];
            let row1 = &src[y1 as usize * stride..][..stride];
            let base = (dy as u32 + p.top) as usize * dst_w as usize + p.left as usize;
            for (dx, &(x0, x1, wx)) in self.xs.iter().enumerate() {
                let (a, b) = (x0 as usize * 3, x1 as usize * 3);
                let o = base + dx;
                for (c, plane) in [&mut *r_plane, &mut *g_plane, &mut *b_plane]
                    .into_iter()
                    .enumerate()
                {
                    let top = row0[a + c] as f32 * (1.0 - wx) + row0[b + c] as f32 * wx;
                    let bot = row1[a + c] as f32 * (1.0 - wx) + row1[b + c] as f32 * wx;
                    plane[o] = (top * (1.0 - wy) + bot * wy) * (1.0 / 255.0);
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_tensors_reorder_and_convert() {
        // One 2x2 image: channel c, pixel p holds c * 0.25 + p * 0.05.
        let nchw: Vec<f32> = (0..12)
            .map(|i| (i / 4) as f32 * 0.25 + (i % 4) as f32 * 0.05)
            .collect();
        let mut out = Vec::new();
        InputTensor::NCHW_F32
            .encode(&nchw, 2, 2, &mut out)
            .expect("f32");
        assert_eq!(out.len(), 48);
        assert_eq!(
            f32::from_le_bytes(out[4..8].try_into().expect("4 bytes")),
            nchw[1]
        );
        let nhwc = InputTensor {
            layout: InputLayout::Nhwc,
            dtype: InputType::F32,
        };
        nhwc.encode(&nchw, 2, 2, &mut out).expect("nhwc");
        let v: Vec<f32> = out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        // Pixel 1's R, G, B come 3rd to 5th.
        assert_eq!(&v[3..6], &[nchw[1], nchw[5], nchw[9]]);
        let half = InputTensor {
            layout: InputLayout::Nchw,
            dtype: InputType::F16,
        };
        half.encode(&nchw, 2, 2, &mut out).expect("f16");
        assert_eq!(u16::from_le_bytes([out[8], out[9]]), 0x3400);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0);
        let int8 = InputTensor {
            layout: InputLayout::Nchw,
            dtype: InputType::Int8 { scale: 1.0 / 127.0 },
        };
        int8.encode(&nchw, 2, 2, &mut out).expect("int8");
        // 0.5 / (1/127) = 63.5 rounds to even (64); 0.65 * 127 = 82.55 → 83.
        assert_eq!(out[8] as i8, 64);
        assert_eq!(out[11] as i8, 83);
        let bad = InputTensor {
            layout: InputLayout::Nchw,
            dtype: InputType::Int8 { scale: 0.0 },
        };
        assert!(bad.encode(&nchw, 2, 2, &mut out).is_err());
        assert!(
            InputTensor::NCHW_F32
                .encode(&nchw[1..], 2, 2, &mut out)
                .is_err()
        );
    }

    #[test]
    fn yolo_placement() {
        let p = LetterboxParams::new(1280, 720, 640, 640).unwrap();
        assert_eq!((p.new_w, p.new_h, p.left, p.top), (640, 360, 0, 140));
        let p = LetterboxParams::new(17, 999, 640, 640).unwrap();
        assert_eq!(p.new_h, 640);
        assert_eq!(p.new_w, 11);
        assert_eq!(p.left, 314);
    }

    #[test]
    fn box_mapping_inverts_exactly() {
        for (w, h) in [(1283, 721), (17, 999), (640, 640), (3, 5), (4000, 33)] {
            let p = LetterboxParams::new(w, h, 640, 640).unwrap();
            let b = BoxXyxy::new(
                0.3 * w as f32,
                0.1 * h as f32,
                0.9 * w as f32,
                0.77 * h as f32,
            );
            let back = p.to_source(p.to_input(b));
            for (x, y) in [
                (b.x1, back.x1),
                (b.y1, back.y1),
                (b.x2, back.x2),
                (b.y2, back.y2),
            ] {
                assert!((x - y).abs() < 1e-2, "{w}x{h}: {b:?} -> {back:?}");
            }
        }
    }

    /// A bright rectangle's intensity centroid in the letterboxed input maps back to the
    /// rectangle's centre in the source within 0.5 px: catches half-pixel and offset errors.
    #[test]
    fn pixel_round_trip_within_half_pixel() {
        for (w, h, rect) in [
            (1283u32, 721u32, (100u32, 200u32, 500u32, 520u32)),
            (17, 999, (3, 400, 14, 700)),
            (641, 479, (0, 0, 320, 100)),
            (333, 1001, (40, 41, 300, 990)),
        ] {
            let mut img = RgbImage::from_pixel(w, h, image::Rgb([0, 0, 0]));
            for y in rect.1..rect.3 {
                for x in rect.0..rect.2 {
                    img.put_pixel(x, y, image::Rgb([255, 255, 255]));
                }
            }
            let mut out = vec![0f32; 3 * 640 * 640];
            let p = Letterboxer::new().run(&img, 640, 640, &mut out).unwrap();
            // Centroid of (value - fill) restricted to the resized region (the pad is uniform).
            let (mut sx, mut sy, mut sw) = (0f64, 0f64, 0f64);
            for y in p.top..p.top + p.new_h {
                for x in p.left..p.left + p.new_w {
                    let v = out[(y * 640 + x) as usize] as f64;
                    sx += v * (x as f64 + 0.5);
                    sy += v * (y as f64 + 0.5);
                    sw += v;
                }
            }
            let (cx, cy) = (sx / sw, sy / sw);
            let back = p.to_source(BoxXyxy::new(cx as f32, cy as f32, cx as f32, cy as f32));
            let want_x = (rect.0 + rect.2) as f32 / 2.0;
            let want_y = (rect.1 + rect.3) as f32 / 2.0;
            assert!(
                (back.x1 - want_x).abs() <= 0.5 && (back.y1 - want_y).abs() <= 0.5,
                "{w}x{h}: centre maps back to ({}, {}), want ({want_x}, {want_y})",
                back.x1,
                back.y1
            );
        }
    }

    #[test]
    fn padding_is_grey_and_values_in_range() {
        let img = RgbImage::from_pixel(100, 50, image::Rgb([255, 0, 10]));
        let mut out = vec![0f32; 3 * 64 * 64];
        let p = Letterboxer::new().run(&img, 64, 64, &mut out).unwrap();
        assert_eq!((p.new_w, p.new_h, p.top), (64, 32, 16));
        assert!((out[0] - 114.0 / 255.0).abs() < 1e-6);
        assert!((out[(20 * 64 + 5) as usize] - 1.0).abs() < 1e-6);
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn wrong_output_size_is_an_error() {
        let img = RgbImage::new(10, 10);
        let mut out = vec![0f32; 10];
        assert!(Letterboxer::new().run(&img, 64, 64, &mut out).is_err());
    }
}
