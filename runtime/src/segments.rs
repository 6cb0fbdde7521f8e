//! Instance-segmentation ground truth: an object's shape as polygons or a COCO run-length
//! encoding ([`Segmentation`]), its rasterisation into masks, and COCO's compressed RLE strings.
//!
//! Rasterisation samples pixel centres: pixel `(x, y)` belongs to a polygon when its centre
//! `(x + 0.5, y + 0.5)` lies inside it by the even-odd rule. Several polygons of one object are
//! united (as pycocotools merges them). Each row is filled from its sorted edge crossings (a
//! scanline fill), so the cost is rows × edges, not pixels × edges.
//!
//! Objects of one image either overlap freely (COCO json: every annotation's mask stands alone)
//! or in paint order (YOLO-seg txt, and the synthetic scenes): a pixel belongs to the last object
//! whose shape covers it, so earlier objects lose what later ones hide ([`paint_order_masks`]).

use crate::error::{Error, Result};
use crate::masks::{Bitmap, Rle};

/// Most objects [`paint_order_masks`] can stack in one image: labels are `u16`, 0 is background.
pub const MAX_PAINTED_OBJECTS: usize = u16::MAX as usize;

/// The shape of one object, in pixels of its image.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// One or more polygons, `[x, y]` per vertex in pixels (0 is the left/top edge of the image).
    /// The object is their union; each polygon is filled by the even-odd rule. Polygons of fewer
    /// than three vertices cover nothing.
    Polygons(Vec<Vec<[f32; 2]>>),
    /// A COCO run-length encoding; it must have the size of the image it is painted into.
    Rle(Rle),
}

impl Segmentation {
    /// Set every pixel the shape covers in `map` (row-major, `width * height` labels) to `value`.
    /// The primitive of the other rasterisations: painting objects one after the other into one
    /// map gives paint order. Errors: a map of the wrong length, non-finite polygon vertices, an
    /// RLE of another size than `width` × `height` pixels or whose runs do not cover it exactly.
    pub fn paint(&self, map: &mut [u16], width: usize, height: usize, value: u16) -> Result<()> {
        if map.len() != width * height {
            return Err(Error::Shape(format!(
                "a label map of {} values cannot hold {width}x{height} pixels",
                map.len()
            )));
        }
        match self {
            Segmentation::Polygons(polygons) => {
                let mut crossings = Vec::new();
                for polygon in polygons {
                    fill_polygon(polygon, width, height, &mut crossings, |y, x0, x1| {
                        map[y * width + x0..y * width + x1].fill(value);
                    })?;
                }
            }
            Segmentation::Rle(rle) => {
                if (rle.width, rle.height) != (width, height) {
                    return Err(Error::Shape(format!(
                        "a {}x{} RLE mask cannot be painted into a {width}x{height} image; the \
                         RLE's `size` must be the image's [height, width]",
                        rle.width, rle.height
                    )));
                }
                check_runs(rle)?;
                // Column-major runs: pixel i is (x = i / height, y = i % height).
                let mut at = 0usize;
                for (k, &c) in rle.counts.iter().enumerate() {
                    let c = c as usize;
                    if k % 2 == 1 {
                        for i in at..at + c {
                            map[(i % height) * width + i / height] = value;
                        }
                    }
                    at += c;
                }
            }
        }
        Ok(())
    }

    /// The shape as a `width` × `height` bitmap (see [`Segmentation::paint`] for the errors).
    pub fn to_bitmap(&self, width: usize, height: usize) -> Result<Bitmap> {
        let mut map = vec![0u16; width * height];
        self.paint(&mut map, width, height, 1)?;
        Ok(Bitmap {
            width,
            height,
            data: map.into_iter().map(|v| v as u8).collect(),
        })
    }

    /// The shape as a COCO RLE of a `width` × `height` image (an RLE of that size comes back as
    /// it is, once its runs are checked).
    pub fn to_rle(&self, width: usize, height: usize) -> Result<Rle> {
        match self {
            Segmentation::Rle(rle) if (rle.width, rle.height) == (width, height) => {
                check_runs(rle)?;
                Ok(rle.clone())
            }
            _ => Ok(Rle::encode(&self.to_bitmap(width, height)?)),
        }
    }
}

/// The runs of `rle` cover its `width * height` pixels exactly.
fn check_runs(rle: &Rle) -> Result<()> {
    let total: u64 = rle.counts.iter().map(|&c| u64::from(c)).sum();
    let pixels = rle.width as u64 * rle.height as u64;
    if total != pixels {
        return Err(Error::Shape(format!(
            "the run lengths cover {total} pixels; a {}x{} mask has {pixels}",
            rle.width, rle.height
        )));
    }
    Ok(())
}

/// Scanline fill of one polygon at pixel centres, even-odd rule: `span(y, x0, x1)` for each run
/// of covered pixels `x0..x1` of row `y`, clipped to the image. `crossings` is scratch space.
fn fill_polygon(
    polygon: &[[f32; 2]],
    width: usize,
    height: usize,
    crossings: &mut Vec<f64>,
    mut span: impl FnMut(usize, usize, usize),
) -> Result<()> {
    if let Some(p) = polygon
        .iter()
        .find(|p| !p[0].is_finite() || !p[1].is_finite())
    {
        return Err(Error::InvalidArgument(format!(
            "polygon vertex {p:?} is not a finite point in pixels"
        )));
    }
    if polygon.len() < 3 || width == 0 || height == 0 {
        return Ok(());
    }
    let (mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in polygon {
        ymin = ymin.min(f64::from(p[1]));
        ymax = ymax.max(f64::from(p[1]));
    }
    // Rows whose centre y + 0.5 can lie in [ymin, ymax); the casts saturate at 0.
    let y0 = ((ymin - 0.5).ceil().max(0.0) as usize).min(height);
    let y1 = ((ymax - 0.5).ceil().max(0.0) as usize).min(height);
    let n = polygon.len();
    for y in y0..y1 {
        let sy = y as f64 + 0.5;
        crossings.clear();
        for i in 0..n {
            let (ax, ay) = (f64::from(polygon[i][0]), f64::from(polygon[i][1]));
            let j = (i + 1) % n;
            let (bx, by) = (f64::from(polygon[j][0]), f64::from(polygon[j][1]));
            // Half-open in y, so a vertex on the scanline counts once and horizontal edges never.
            if (ay <= sy && sy < by) || (by <= sy && sy < ay) {
                crossings.push(ax + (sy - ay) * (bx - ax) / (by - ay));
            }
        }
        crossings.sort_by(f64::total_cmp);
        for pair in crossings.chunks_exact(2) {
            // Pixel x is inside when pair[0] <= x + 0.5 < pair[1]: x from ceil(pair[0] - 0.5).
            let first = |v: f64| ((v - 0.5).ceil().max(0.0) as usize).min(width);
            let (x0, x1) = (first(pair[0]), first(pair[1]));
            if x0 < x1 {
                span(y, x0, x1);
            }
        }
    }
    Ok(())
}

/// The masks of one image's objects stacked in paint order: later segments lie on top, so a
/// pixel belongs to the last segment (in slice order) that covers it and earlier objects keep
/// only what stays visible. One RLE per segment, in order, each `width` × `height` pixels (an
/// object hidden entirely gets an empty mask). At most [`MAX_PAINTED_OBJECTS`] segments.
pub fn paint_order_masks(
    segments: &[&Segmentation],
    width: usize,
    height: usize,
) -> Result<Vec<Rle>> {
    if segments.len() > MAX_PAINTED_OBJECTS {
        return Err(Error::InvalidArgument(format!(
            "{} objects in one image; paint-order masks hold at most {MAX_PAINTED_OBJECTS}",
            segments.len()
        )));
    }
    let mut map = vec![0u16; width * height];
    for (k, s) in segments.iter().enumerate() {
        // k < MAX_PAINTED_OBJECTS, so k + 1 fits a u16.
        s.paint(&mut map, width, height, (k + 1) as u16)?;
    }
    Ok(encode_labels(&map, width, height, segments.len()))
}

/// One RLE per label `1..=labels` of a row-major label map, in a single column-major pass: each
/// label's runs grow as its pixels are met. Equal to [`Rle::encode`] of each label's bitmap.
fn encode_labels(map: &[u16], width: usize, height: usize, labels: usize) -> Vec<Rle> {
    let total = width * height;
    // Per label: its runs so far, and the index just past its last set pixel.
    let mut counts: Vec<Vec<u32>> = vec![Vec::new(); labels];
    let mut end = vec![0usize; labels];
    for x in 0..width {
        for y in 0..height {
            let v = map[y * width + x];
            if v == 0 {
                continue;
            }
            let (k, i) = (usize::from(v) - 1, x * height + y);
            let runs = &mut counts[k];
            match runs.last_mut() {
                Some(last) if end[k] == i => *last += 1,
                _ => {
                    // The zeros since the last set pixel (possibly none, at the very start).
                    runs.push((i - end[k]) as u32);
                    runs.push(1);
                }
            }
            end[k] = i + 1;
        }
    }
    counts
        .into_iter()
        .zip(end)
        .map(|(mut runs, end)| {
            if runs.is_empty() || end < total {
                runs.push((total - end) as u32);
            }
            Rle {
                height,
                width,
                counts: runs,
            }
        })
        .collect()
}

impl Rle {
    /// Parse pycocotools' compressed `counts` string for a `height` × `width` mask: each count
    /// is written 5 bits a character (low bits first, bit 5 = more follows, bit 4 of the last
    /// character = negative), offset by ASCII 48; counts after the third are stored as the
    /// difference to the count two before (the run of the same value). Errors name the problem:
    /// a character outside `0`..`o`, a number cut short, a negative or oversized count, or runs
    /// that do not cover the mask.
    pub fn from_coco_string(height: usize, width: usize, s: &str) -> Result<Rle> {
        let bad = |m: String| Error::InvalidArgument(format!("compressed RLE counts: {m}"));
        let bytes = s.as_bytes();
        let mut counts: Vec<u32> = Vec::with_capacity(bytes.len());
        let mut p = 0usize;
        while p < bytes.len() {
            let (mut x, mut k) = (0i64, 0u32);
            loop {
                let Some(&b) = bytes.get(p) else {
                    return Err(bad(format!(
                        "the string ends inside a number (character {p} continues it)"
                    )));
                };
                if !(48..48 + 64).contains(&b) {
                    return Err(bad(format!(
                        "character {p} ({:?}) is outside '0'..='o'",
                        char::from(b)
                    )));
                }
                // 12 characters carry 60 bits, far more than any count (or difference of two
                // u32 counts) needs; stopping there also keeps the shifts below within an i64.
                if k >= 12 {
                    return Err(bad(format!(
                        "the number ending at character {p} is too long"
                    )));
                }
                let c = i64::from(b - 48);
                x |= (c & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if c & 0x20 == 0 {
                    if c & 0x10 != 0 {
                        // Sign extension, as pycocotools' `x |= -1 << 5*k`.
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            let m = counts.len();
            if m > 2 {
                x += i64::from(counts[m - 2]);
            }
            let c = u32::try_from(x).map_err(|_| {
                bad(format!(
                    "count {} decodes to {x}, outside 0..={}",
                    m + 1,
                    u32::MAX
                ))
            })?;
            counts.push(c);
        }
        let rle = Rle {
            height,
            width,
            counts,
        };
        check_runs(&rle).map_err(|e| bad(e.to_string()))?;
        Ok(rle)
    }

    /// pycocotools' compressed `counts` string of this mask (what `mask.encode` returns, as
    /// text); [`Rle::from_coco_string`] reads it back.
    pub fn to_coco_string(&self) -> String {
        let mut s = String::with_capacity(self.counts.len() * 2);
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = i64::from(c);
            if i > 2 {
                x -= i64::from(self.counts[i - 2]);
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push(char::from(c + 48));
                if !more {
                    break;
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poly(points: &[[f32; 2]]) -> Segmentation {
        Segmentation::Polygons(vec![points.to_vec()])
    }

    #[test]
    fn a_square_covers_the_pixels_whose_centres_it_holds() {
        // [2, 12) x [3, 9) at integer corners: 10 x 6 pixels.
        let sq = poly(&[[2.0, 3.0], [12.0, 3.0], [12.0, 9.0], [2.0, 9.0]]);
        let m = sq.to_bitmap(20, 20).expect("bitmap");
        assert_eq!(m.area(), 60);
        for y in 0..20 {
            for x in 0..20 {
                let inside = (2..12).contains(&x) && (3..9).contains(&y);
                assert_eq!(m.data[y * 20 + x] == 1, inside, "pixel {x},{y}");
            }
        }
        // Edges through pixel centres: a centre on the left/top edge is in, on the right out.
        let sq = poly(&[[2.5, 3.5], [5.5, 3.5], [5.5, 6.5], [2.5, 6.5]]);
        assert_eq!(sq.to_bitmap(10, 10).expect("bitmap").area(), 9);
        // Clipped to the image; clockwise or not makes no difference.
        let big = poly(&[[-5.0, -5.0], [-5.0, 4.0], [4.0, 4.0], [4.0, -5.0]]);
        assert_eq!(big.to_bitmap(10, 10).expect("bitmap").area(), 16);
        assert_eq!(big.to_rle(10, 10).expect("rle").area(), 16);
    }

    #[test]
    fn a_triangle_has_its_expected_pixel_count() {
        // Right triangle (0,0), (10,0), (0,10): centre (x+.5, y+.5) inside when x + y + 1 < 10,
        // so row y holds 9 - y pixels: 45 in all.
        let t = poly(&[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]);
        let m = t.to_bitmap(12, 12).expect("bitmap");
        assert_eq!(m.area(), 45);
        for y in 0..9 {
            let row = &m.data[y * 12..(y + 1) * 12];
            assert_eq!(row.iter().filter(|&&v| v == 1).count(), 9 - y, "row {y}");
            assert_eq!(row[0], 1);
        }
    }

    #[test]
    fn polygons_unite_and_each_is_even_odd() {
        // Two disjoint squares in one object, and a ring drawn as one self-overlapping polygon
        // (outer square, then the inner one): even-odd leaves the hole.
        let two = Segmentation::Polygons(vec![
            vec![[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]],
            vec![[5.0, 5.0], [8.0, 5.0], [8.0, 8.0], [5.0, 8.0]],
        ]);
        assert_eq!(two.to_bitmap(10, 10).expect("bitmap").area(), 4 + 9);
        let ring = poly(&[
            [0.0, 0.0],
            [10.0, 0.0],
            [10.0, 10.0],
            [0.0, 10.0],
            [0.0, 0.0],
            [3.0, 3.0],
            [3.0, 7.0],
            [7.0, 7.0],
            [7.0, 3.0],
            [3.0, 3.0],
        ]);
        let m = ring.to_bitmap(10, 10).expect("bitmap");
        assert_eq!(m.area(), 100 - 16);
        assert_eq!(m.data[5 * 10 + 5], 0);
        // Degenerate polygons cover nothing; NaN vertices are refused.
        assert_eq!(
            poly(&[[0.0, 0.0], [5.0, 5.0]])
                .to_bitmap(10, 10)
                .expect("bitmap")
                .area(),
            0
        );
        let e = poly(&[[0.0, 0.0], [f32::NAN, 5.0], [5.0, 0.0]])
            .to_bitmap(10, 10)
            .expect_err("NaN");
        assert!(e.to_string().contains("finite"), "{e}");
    }

    #[test]
    fn rle_segments_paint_and_must_fit_the_image() {
        let sq = poly(&[[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0]]);
        let rle = sq.to_rle(6, 5).expect("rle");
        let back = Segmentation::Rle(rle.clone());
        assert_eq!(
            back.to_bitmap(6, 5).expect("bitmap"),
            rle.decode().expect("decode")
        );
        assert_eq!(back.to_rle(6, 5).expect("rle"), rle);
        let e = back.to_bitmap(5, 6).expect_err("size");
        assert!(matches!(e, Error::Shape(_)), "{e}");
        assert!(
            e.to_string().contains("6x5") && e.to_string().contains("5x6"),
            "{e}"
        );
        let short = Segmentation::Rle(Rle {
            height: 5,
            width: 6,
            counts: vec![3, 4],
        });
        assert!(short.to_rle(6, 5).is_err());
        let mut map = vec![0u16; 29];
        assert!(sq.paint(&mut map, 6, 5, 1).is_err());
    }

    #[test]
    fn paint_order_hides_earlier_objects() {
        // A 6x6 square, then a 4x4 square over its bottom-right corner, then one entirely under
        // the second.
        let a = poly(&[[0.0, 0.0], [6.0, 0.0], [6.0, 6.0], [0.0, 6.0]]);
        let b = poly(&[[4.0, 4.0], [8.0, 4.0], [8.0, 8.0], [4.0, 8.0]]);
        let hidden = poly(&[[5.0, 5.0], [7.0, 5.0], [7.0, 7.0], [5.0, 7.0]]);
        let on_top = [&a, &b, &hidden];
        let masks = paint_order_masks(&on_top, 10, 9).expect("masks");
        assert_eq!(masks[0].area(), 36 - 4);
        assert_eq!(masks[1].area(), 16 - 4);
        assert_eq!(masks[2].area(), 4);
        assert_eq!(masks[0].intersection(&masks[1]).expect("same size"), 0);
        // Reversed: the small square is painted first and b hides it completely.
        let masks = paint_order_masks(&[&hidden, &b, &a], 10, 9).expect("masks");
        assert_eq!(masks[0].area(), 0);
        assert_eq!(masks[0].counts, vec![90]);
        assert_eq!(masks[1].area(), 12);
        assert_eq!(masks[2].area(), 36);
        // Each mask equals Rle::encode of its bitmap.
        for (m, s) in masks.iter().zip([&hidden, &b, &a]) {
            assert_eq!((m.width, m.height), (10, 9));
            let alone = s.to_bitmap(10, 9).expect("bitmap");
            let mine = m.decode().expect("decode");
            assert!(mine.data.iter().zip(&alone.data).all(|(&v, &w)| v <= w));
            assert_eq!(Rle::encode(&mine), *m);
        }
        assert!(paint_order_masks(&[], 4, 4).expect("none").is_empty());
    }

    #[test]
    fn paint_order_masks_refuse_too_many_objects() {
        let tiny = poly(&[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]);
        let many = vec![&tiny; MAX_PAINTED_OBJECTS + 1];
        let e = paint_order_masks(&many, 2, 2).expect_err("too many");
        assert!(e.to_string().contains("65535"), "{e}");
    }

    /// SplitMix64 for random masks.
    fn rng(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn coco_strings_round_trip() {
        let mut seed = 11u64;
        for case in 0..200 {
            let (w, h) = (
                1 + rng(&mut seed) as usize % 40,
                1 + rng(&mut seed) as usize % 40,
            );
            // Blobs of varying density, so runs are short and long (multi-character counts,
            // negative deltas).
            let density = rng(&mut seed) % 100;
            let data = (0..w * h)
                .map(|_| u8::from(rng(&mut seed) % 100 < density))
                .collect();
            let m = Bitmap {
                width: w,
                height: h,
                data,
            };
            let rle = Rle::encode(&m);
            let s = rle.to_coco_string();
            assert!(s.bytes().all(|b| (48..112).contains(&b)), "{s}");
            let back = Rle::from_coco_string(h, w, &s).expect("decode");
            assert_eq!(back, rle, "case {case}: {s}");
        }
        // Large runs need several characters.
        let big = Rle {
            height: 1000,
            width: 1000,
            counts: vec![123_456, 800_000, 76_544],
        };
        let s = big.to_coco_string();
        assert_eq!(Rle::from_coco_string(1000, 1000, &s).expect("decode"), big);
    }

    #[test]
    fn coco_strings_match_pycocotools() {
        // What pycocotools 2.0 `mask.encode(np.asfortranarray(m))["counts"]` gives for masks
        // with these column-major runs: deltas from the count two before (after the third),
        // negative deltas, multi-character counts, empty and full masks.
        let cases: [(usize, usize, &[u32], &str); 7] = [
            (4, 5, &[1, 2, 3, 4, 10], "12327"),
            (4, 5, &[0, 1, 1, 2, 2, 3, 11], "0111119"),
            (4, 6, &[5, 10, 2, 3, 4], "5:2I2"),
            (40, 50, &[700, 40, 2, 1000, 258], "le0X12Pn0P8"),
            (1000, 1000, &[123_456, 800_000, 76_544], "Pbh3PX]h0PhZ2"),
            (3, 3, &[9], "9"),
            (3, 3, &[0, 9], "09"),
        ];
        for (h, w, counts, text) in cases {
            let r = Rle {
                height: h,
                width: w,
                counts: counts.to_vec(),
            };
            assert_eq!(r.to_coco_string(), text, "{counts:?}");
            assert_eq!(Rle::from_coco_string(h, w, text).expect("decode"), r);
        }
    }

    #[test]
    fn bad_coco_strings_name_the_problem() {
        let e = Rle::from_coco_string(2, 2, "0 4").expect_err("space");
        assert!(e.to_string().contains("outside '0'..='o'"), "{e}");
        // 'P' = 48 + 32: "more follows", then nothing.
        let e = Rle::from_coco_string(2, 2, "P").expect_err("cut");
        assert!(e.to_string().contains("ends inside a number"), "{e}");
        // 'O' = 48 + 0x1f: the sign bit without "more", so -1.
        let e = Rle::from_coco_string(2, 2, "O").expect_err("negative");
        assert!(e.to_string().contains("outside 0..="), "{e}");
        let e = Rle::from_coco_string(2, 2, "3").expect_err("short");
        assert!(e.to_string().contains("cover 3 pixels"), "{e}");
        let e = Rle::from_coco_string(2, 2, &"P".repeat(20)).expect_err("long");
        assert!(e.to_string().contains("too long"), "{e}");
        // Twelve characters with the sign bit last: a huge negative number, refused, no overflow.
        let e = Rle::from_coco_string(2, 2, &format!("{}O", "P".repeat(11))).expect_err("sign");
        assert!(e.to_string().contains("outside 0..="), "{e}");
    }
}
