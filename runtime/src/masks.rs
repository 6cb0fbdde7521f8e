//! Instance masks of YOLOv9 segmentation heads, decoded at the source frame's resolution: the CPU
//! reference every GPU mask kernel is tested against ([`crate::cuda::masks`]).
//!
//! A segmentation model emits, per kept detection, `MASK_COEFFICIENTS` coefficients (the head's
//! last rows at the detection's anchor) and, per image, as many prototype maps at a fraction of
//! the input size (`output1`, `[32, H/4, W/4]`). A detection's mask is `sigmoid(coefficients ·
//! prototypes)`, sampled bilinearly at each source pixel's centre (mapped through the letterbox),
//! kept inside the detection's box and thresholded at 0.5, as YOLOv9's `process_mask_native` does
//! up to its choice of sampling grid.
//!
//! Masks come as bitmaps ([`Bitmap`], one byte a pixel) or COCO run-length encodings ([`Rle`]).

use serde::{Deserialize, Serialize};

use crate::detection::BoxXyxy;
use crate::error::{Error, Result};
use crate::letterbox::{LetterboxParams, clamped_tap};

/// Mask coefficients per detection (and prototype maps per image) of YOLOv9 segmentation heads.
pub const MASK_COEFFICIENTS: usize = 32;

/// Shape of one image's prototype maps: `[MASK_COEFFICIENTS, height, width]` float32, covering
/// the whole engine input (so each map cell spans `input / size` input pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrototypeShape {
    /// Map width in cells.
    pub width: usize,
    /// Map height in cells.
    pub height: usize,
}

impl PrototypeShape {
    /// Floats of one image's prototypes.
    pub fn len(&self) -> usize {
        MASK_COEFFICIENTS * self.width * self.height
    }

    /// Whether the maps are empty (never for a valid shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A binary mask in source pixels: `height` rows of `width` bytes, 1 inside the instance, 0 outside.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major, one byte (0 or 1) a pixel.
    pub data: Vec<u8>,
}

impl Bitmap {
    /// Pixels set.
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }

    /// Intersection over union with `other` (1 when both are empty).
    pub fn iou(&self, other: &Bitmap) -> Result<f64> {
        if (self.width, self.height) != (other.width, other.height) {
            return Err(Error::Shape(format!(
                "masks of {}x{} and {}x{} pixels cannot be compared",
                self.width, self.height, other.width, other.height
            )));
        }
        let (mut inter, mut union) = (0usize, 0usize);
        for (&a, &b) in self.data.iter().zip(&other.data) {
            inter += usize::from(a != 0 && b != 0);
            union += usize::from(a != 0 || b != 0);
        }
        Ok(if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        })
    }
}

/// COCO run-length encoding of a binary mask: pixels in column-major order (down each column,
/// columns left to right), alternating run lengths starting with a (possibly empty) run of zeros,
/// as pycocotools' uncompressed `{"size": [h, w], "counts": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rle {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Run lengths in pixels; they sum to `width * height`.
    pub counts: Vec<u32>,
}

impl Rle {
    /// Encode `mask`.
    pub fn encode(mask: &Bitmap) -> Self {
        let (w, h) = (mask.width, mask.height);
        let mut counts = Vec::new();
        let (mut current, mut run) = (0u8, 0u32);
        for x in 0..w {
            for y in 0..h {
                let v = u8::from(mask.data[y * w + x] != 0);
                if v != current {
                    counts.push(run);
                    current = v;
                    run = 0;
                }
                run += 1;
            }
        }
        counts.push(run);
        Self {
            height: h,
            width: w,
            counts,
        }
    }

    /// Pixels set.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| u64::from(c))
            .sum()
    }

    /// Pixels set in both `self` and `other` (masks of the same size), walking both run lists.
    pub fn intersection(&self, other: &Rle) -> Result<u64> {
        if (self.width, self.height) != (other.width, other.height) {
            return Err(Error::Shape(format!(
                "masks of {}x{} and {}x{} pixels cannot be compared",
                self.width, self.height, other.width, other.height
            )));
        }
        let (a, b) = (&self.counts, &other.counts);
        let (mut i, mut j) = (0usize, 0usize);
        // Remaining pixels of the current run of each, and whether that run is set.
        let (mut ra, mut rb) = (
            a.first().copied().unwrap_or(0) as u64,
            b.first().copied().unwrap_or(0) as u64,
        );
        let mut inter = 0u64;
        loop {
            while ra == 0 {
                i += 1;
                match a.get(i) {
                    Some(&c) => ra = u64::from(c),
                    None => return Ok(inter),
                }
            }
            while rb == 0 {
                j += 1;
                match b.get(j) {
                    Some(&c) => rb = u64::from(c),
                    None => return Ok(inter),
                }
            }
            let step = ra.min(rb);
            if i % 2 == 1 && j % 2 == 1 {
                inter += step;
            }
            ra -= step;
            rb -= step;
        }
    }

    /// Intersection over union with a ground-truth mask `gt`, as pycocotools' `rleIou`: for a
    /// crowd region the union is this mask's area; 0 when the masks do not meet.
    pub fn iou(&self, gt: &Rle, crowd: bool) -> Result<f64> {
        let inter = self.intersection(gt)?;
        if inter == 0 {
            return Ok(0.0);
        }
        let union = if crowd {
            self.area()
        } else {
            self.area() + gt.area() - inter
        };
        Ok(inter as f64 / union as f64)
    }

    /// Decode into a bitmap; an error when the runs do not cover the mask exactly.
    pub fn decode(&self) -> Result<Bitmap> {
        let (w, h) = (self.width, self.height);
        let total: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        if total != (w * h) as u64 {
            return Err(Error::Shape(format!(
                "the run lengths cover {total} pixels; a {w}x{h} mask has {}",
                w * h
            )));
        }
        let mut data = vec![0u8; w * h];
        let mut i = 0usize;
        for (k, &c) in self.counts.iter().enumerate() {
            if k % 2 == 1 {
                for j in i..i + c as usize {
                    data[(j % h) * w + j / h] = 1;
                }
            }
            i += c as usize;
        }
        Ok(Bitmap {
            width: w,
            height: h,
            data,
        })
    }
}

/// One axis of mask sampling: for each source pixel, the two prototype cells around its centre
/// and the weight of the second (half-pixel centres, clamped at the edges). `src` source pixels
/// were resized to `new` input pixels starting at input pixel `pad`; the prototype map has
/// `cells` cells over `input` input pixels. Shared by the CPU and the GPU decoders, so both
/// sample at exactly the same places.
pub(crate) fn mask_axis_taps(
    src: u32,
    new: u32,
    pad: u32,
    input: u32,
    cells: u32,
    taps: &mut Vec<(u32, u32, f32)>,
) {
    taps.clear();
    let to_input = new as f64 / src as f64;
    let to_cells = cells as f64 / input as f64;
    taps.extend((0..src).map(|d| {
        clamped_tap(
            (pad as f64 + (d as f64 + 0.5) * to_input) * to_cells - 0.5,
            cells,
        )
    }));
}

/// The source pixels a box keeps, as half-open column and row ranges: pixel `x` is inside when
/// `x1 <= x < x2` (YOLO's `crop_mask`), clipped to the frame. NaN corners keep nothing.
pub fn box_pixel_range(b: &BoxXyxy, width: usize, height: usize) -> [usize; 4] {
    if [b.x1, b.y1, b.x2, b.y2].iter().any(|v| v.is_nan()) {
        return [0; 4];
    }
    // ceil(v) is the first integer pixel index >= v; the float-to-int cast saturates.
    let edge = |v: f32, n: usize| -> usize { (v.ceil().max(0.0) as usize).min(n) };
    let (x0, y0) = (edge(b.x1, width), edge(b.y1, height));
    [
        x0,
        y0,
        edge(b.x2, width).max(x0),
        edge(b.y2, height).max(y0),
    ]
}

/// The logistic function, written out so the GPU kernel computes the same expression.
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Mask value at one pixel from the four surrounding prototype-mask values and the weights of
/// the second column and row: the bilinear blend `mask.cu` computes in the same order.
pub(crate) fn blend(v00: f32, v01: f32, v10: f32, v11: f32, wx: f32, wy: f32) -> f32 {
    let top = v00 + (v01 - v00) * wx;
    let bottom = v10 + (v11 - v10) * wx;
    top + (bottom - top) * wy
}

/// Check an image's inputs to mask decoding; shared with the GPU decoder.
pub(crate) fn check_mask_inputs(
    prototypes: usize,
    shape: PrototypeShape,
    boxes: usize,
    coefficients: usize,
) -> Result<()> {
    if shape.width == 0 || shape.height == 0 {
        return Err(Error::Shape(format!(
            "empty {}x{} prototype maps",
            shape.width, shape.height
        )));
    }
    if prototypes != shape.len() {
        return Err(Error::Shape(format!(
            "the prototypes hold {prototypes} values; {MASK_COEFFICIENTS} maps of {}x{} need {}",
            shape.width,
            shape.height,
            shape.len()
        )));
    }
    if coefficients != boxes * MASK_COEFFICIENTS {
        return Err(Error::Shape(format!(
            "{coefficients} mask coefficients for {boxes} detections; each needs \
             {MASK_COEFFICIENTS}"
        )));
    }
    Ok(())
}

/// Decodes instance masks on the CPU; keeps its tables between calls.
#[derive(Debug, Default)]
pub struct MaskDecoder {
    xs: Vec<(u32, u32, f32)>,
    ys: Vec<(u32, u32, f32)>,
    cells: Vec<f32>,
}

impl MaskDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sampling taps of both axes for `letterbox` and prototype maps of `shape`.
    fn set_taps(&mut self, l: &LetterboxParams, shape: PrototypeShape) {
        mask_axis_taps(
            l.src_w,
            l.new_w,
            l.left,
            l.dst_w,
            shape.width as u32,
            &mut self.xs,
        );
        mask_axis_taps(
            l.src_h,
            l.new_h,
            l.top,
            l.dst_h,
            shape.height as u32,
            &mut self.ys,
        );
    }

    /// Masks of one image's detections at the source resolution of `letterbox`, one bitmap per
    /// box in `out` (reused). `prototypes` is the image's `[32, height, width]` prototype maps;
    /// `coefficients` holds 32 values per box; boxes are in source pixels.
    pub fn decode(
        &mut self,
        prototypes: &[f32],
        shape: PrototypeShape,
        letterbox: &LetterboxParams,
        boxes: &[BoxXyxy],
        coefficients: &[f32],
        out: &mut Vec<Bitmap>,
    ) -> Result<()> {
        check_mask_inputs(prototypes.len(), shape, boxes.len(), coefficients.len())?;
        let l = letterbox;
        self.set_taps(l, shape);
        let (w, h) = (l.src_w as usize, l.src_h as usize);
        let plane = shape.width * shape.height;
        self.cells.resize(plane, 0.0);
        out.resize_with(boxes.len(), Bitmap::default);
        for ((b, coef), mask) in boxes
            .iter()
            .zip(coefficients.chunks_exact(MASK_COEFFICIENTS))
            .zip(out.iter_mut())
        {
            // The prototype-resolution mask (the GEMM row of this detection), then sampling.
            for (p, cell) in self.cells.iter_mut().enumerate() {
                let mut z = 0.0f32;
                for (k, &c) in coef.iter().enumerate() {
                    z += c * prototypes[k * plane + p];
                }
                *cell = sigmoid(z);
            }
            sample_mask(&self.cells, shape, &self.xs, &self.ys, w, h, b, mask);
        }
        Ok(())
    }

    /// Masks of one image's detections from mask probabilities at prototype resolution (an
    /// end-to-end model's `det_masks`: `shape` cells per box in `probabilities`), sampled like
    /// [`MaskDecoder::decode`] at the source resolution of `letterbox`.
    pub fn decode_probabilities(
        &mut self,
        probabilities: &[f32],
        shape: PrototypeShape,
        letterbox: &LetterboxParams,
        boxes: &[BoxXyxy],
        out: &mut Vec<Bitmap>,
    ) -> Result<()> {
        let plane = shape.width * shape.height;
        if plane == 0 || probabilities.len() != plane * boxes.len() {
            return Err(Error::Shape(format!(
                "{} mask probabilities for {} boxes of {}x{} cells",
                probabilities.len(),
                boxes.len(),
                shape.width,
                shape.height
            )));
        }
        let l = letterbox;
        self.set_taps(l, shape);
        let (w, h) = (l.src_w as usize, l.src_h as usize);
        out.resize_with(boxes.len(), Bitmap::default);
        for ((b, cells), mask) in boxes
            .iter()
            .zip(probabilities.chunks_exact(plane))
            .zip(out.iter_mut())
        {
            sample_mask(cells, shape, &self.xs, &self.ys, w, h, b, mask);
        }
        Ok(())
    }
}

/// One detection's mask at the source resolution (`w` × `h`): the probability `cells` sampled
/// bilinearly through the axis taps, cleared outside box `b`, thresholded at 0.5.
#[allow(clippy::too_many_arguments)]
fn sample_mask(
    cells: &[f32],
    shape: PrototypeShape,
    xs: &[(u32, u32, f32)],
    ys: &[(u32, u32, f32)],
    w: usize,
    h: usize,
    b: &BoxXyxy,
    mask: &mut Bitmap,
) {
    mask.width = w;
    mask.height = h;
    mask.data.clear();
    mask.data.resize(w * h, 0);
    let [x0, y0, x1, y1] = box_pixel_range(b, w, h);
    for y in y0..y1 {
        let (r0, r1, wy) = ys[y];
        let (row0, row1) = (r0 as usize * shape.width, r1 as usize * shape.width);
        for x in x0..x1 {
            let (c0, c1, wx) = xs[x];
            let (c0, c1) = (c0 as usize, c1 as usize);
            let v = blend(
                cells[row0 + c0],
                cells[row0 + c1],
                cells[row1 + c0],
                cells[row1 + c1],
                wx,
                wy,
            );
            mask.data[y * w + x] = u8::from(v > 0.5);
        }
    }
}

/// The mask coefficients of the detection at `anchor` in one image's raw head (`[channels,
/// anchors]` row-major, the coefficients in its last 32 rows), appended to `out`.
pub fn coefficients_at(
    head: &[f32],
    channels: usize,
    anchors: usize,
    anchor: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    if channels < MASK_COEFFICIENTS || head.len() != channels * anchors || anchor >= anchors {
        return Err(Error::Shape(format!(
            "mask coefficients of anchor {anchor} from a head of {} values ({channels} rows x \
             {anchors} anchors expected, the last {MASK_COEFFICIENTS} rows the coefficients)",
            head.len()
        )));
    }
    let first = channels - MASK_COEFFICIENTS;
    out.extend((first..channels).map(|r| head[r * anchors + anchor]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letterbox(w: u32, h: u32) -> LetterboxParams {
        LetterboxParams::new(w, h, 640, 640).expect("placement")
    }

    #[test]
    fn rle_round_trips_and_starts_with_zeros() {
        let mask = Bitmap {
            width: 3,
            height: 2,
            // Column-major: (0,0)=1 (0,1)=1 | (1,0)=0 (1,1)=1 | (2,0)=0 (2,1)=0
            data: vec![1, 0, 0, 1, 1, 0],
        };
        let rle = Rle::encode(&mask);
        assert_eq!(rle.counts, vec![0, 2, 1, 1, 2]);
        assert_eq!(rle.decode().expect("decode"), mask);
        let empty = Bitmap {
            width: 4,
            height: 5,
            data: vec![0; 20],
        };
        assert_eq!(Rle::encode(&empty).counts, vec![20]);
        let bad = Rle {
            height: 2,
            width: 2,
            counts: vec![1, 2],
        };
        assert!(bad.decode().is_err());
    }

    #[test]
    fn rle_area_intersection_and_iou_match_the_bitmaps() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for _ in 0..50 {
            let (w, h) = (1 + next() % 9, 1 + next() % 7);
            let mut bitmap = || Bitmap {
                width: w,
                height: h,
                data: (0..w * h).map(|_| u8::from(next() % 3 == 0)).collect(),
            };
            let (a, b) = (bitmap(), bitmap());
            let (ra, rb) = (Rle::encode(&a), Rle::encode(&b));
            assert_eq!(ra.area() as usize, a.area());
            let inter = a
                .data
                .iter()
                .zip(&b.data)
                .filter(|(x, y)| **x != 0 && **y != 0)
                .count();
            assert_eq!(ra.intersection(&rb).expect("same size") as usize, inter);
            let iou = ra.iou(&rb, false).expect("same size");
            if inter > 0 {
                assert!((iou - a.iou(&b).expect("same size")).abs() < 1e-12);
                let crowd = ra.iou(&rb, true).expect("same size");
                assert!((crowd - inter as f64 / a.area() as f64).abs() < 1e-12);
            } else {
                assert_eq!(iou, 0.0);
            }
        }
        let small = Rle {
            height: 1,
            width: 2,
            counts: vec![2],
        };
        assert!(
            small
                .intersection(&Rle::encode(&Bitmap {
                    width: 3,
                    height: 1,
                    data: vec![0; 3]
                }))
                .is_err()
        );
    }

    #[test]
    fn a_positive_prototype_fills_exactly_the_box() {
        // One map of +10 everywhere with coefficient 1 (the rest 0): sigmoid > 0.5 all over, so
        // the mask is the box's pixel range.
        let shape = PrototypeShape {
            width: 160,
            height: 160,
        };
        let mut protos = vec![0.0f32; shape.len()];
        protos[..160 * 160].fill(10.0);
        let mut coef = vec![0.0f32; MASK_COEFFICIENTS];
        coef[0] = 1.0;
        let b = BoxXyxy::new(10.2, 5.0, 50.0, 30.5);
        let mut out = Vec::new();
        MaskDecoder::new()
            .decode(&protos, shape, &letterbox(100, 60), &[b], &coef, &mut out)
            .expect("decode");
        let m = &out[0];
        assert_eq!((m.width, m.height), (100, 60));
        for y in 0..60 {
            for x in 0..100 {
                let inside = (11..50).contains(&x) && (5..31).contains(&y);
                assert_eq!(m.data[y * 100 + x] == 1, inside, "pixel {x},{y}");
            }
        }
        assert_eq!(box_pixel_range(&b, 100, 60), [11, 5, 50, 31]);
    }

    #[test]
    fn masks_follow_the_prototypes_through_the_letterbox() {
        // Left half of the input positive, right half negative: a 200x100 frame is letterboxed
        // to 640x320 at the vertical centre, so its left 100 columns map to input x < 320.
        let shape = PrototypeShape {
            width: 160,
            height: 160,
        };
        let mut protos = vec![0.0f32; shape.len()];
        for y in 0..160 {
            for x in 0..160 {
                protos[y * 160 + x] = if x < 80 { 5.0 } else { -5.0 };
            }
        }
        let mut coef = vec![0.0f32; MASK_COEFFICIENTS];
        coef[0] = 1.0;
        let full = BoxXyxy::new(0.0, 0.0, 200.0, 100.0);
        let mut out = Vec::new();
        MaskDecoder::new()
            .decode(
                &protos,
                shape,
                &letterbox(200, 100),
                &[full],
                &coef,
                &mut out,
            )
            .expect("decode");
        let m = &out[0];
        for y in 0..100 {
            for x in 0..200 {
                assert_eq!(m.data[y * 200 + x] == 1, x < 100, "pixel {x},{y}");
            }
        }
    }

    #[test]
    fn degenerate_boxes_and_bad_inputs() {
        let shape = PrototypeShape {
            width: 8,
            height: 8,
        };
        let protos = vec![1.0f32; shape.len()];
        let coef = vec![1.0f32; MASK_COEFFICIENTS * 3];
        let boxes = [
            BoxXyxy::new(5.0, 5.0, 5.0, 9.0),                 // zero width
            BoxXyxy::new(f32::NAN, 0.0, 4.0, 4.0),            // NaN corner
            BoxXyxy::new(-10.0, -10.0, f32::INFINITY, 100.0), // beyond the frame
        ];
        let mut out = Vec::new();
        let mut d = MaskDecoder::new();
        d.decode(&protos, shape, &letterbox(20, 10), &boxes, &coef, &mut out)
            .expect("decode");
        assert_eq!(out[0].area(), 0);
        assert_eq!(out[1].area(), 0);
        assert_eq!(out[2].area(), 200);
        let err = d
            .decode(
                &protos[1..],
                shape,
                &letterbox(20, 10),
                &boxes,
                &coef,
                &mut out,
            )
            .expect_err("short prototypes");
        assert!(err.to_string().contains("prototypes hold"), "{err}");
        let err = d
            .decode(
                &protos,
                shape,
                &letterbox(20, 10),
                &boxes,
                &coef[1..],
                &mut out,
            )
            .expect_err("short coefficients");
        assert!(err.to_string().contains("coefficients"), "{err}");
    }

    #[test]
    fn coefficients_come_from_the_last_rows() {
        // 4 + 2 classes + 32 rows, 3 anchors; value = row * 10 + anchor.
        let (channels, anchors) = (38, 3);
        let head: Vec<f32> = (0..channels * anchors)
            .map(|i| ((i / anchors) * 10 + i % anchors) as f32)
            .collect();
        let mut out = Vec::new();
        coefficients_at(&head, channels, anchors, 2, &mut out).expect("coefficients");
        assert_eq!(out.len(), 32);
        assert_eq!(out[0], 62.0);
        assert_eq!(out[31], 372.0);
        assert!(coefficients_at(&head, channels, anchors, 3, &mut out).is_err());
    }
}
