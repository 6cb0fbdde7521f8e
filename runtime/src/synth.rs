//! Deterministic synthetic scenes: coloured geometric shapes on textured backgrounds, with exact
//! labels. They give the whole stack (training smoke tests, evaluation, the video element) data with
//! known ground truth and no download.
//!
//! A scene is a function of its seed and size only: the same seed gives byte-identical pixels and
//! labels on a given platform (the generator uses its own SplitMix64, no global RNG, no hashing).
//!
//! What a scene holds, and why:
//! - a background of a gradient, smooth value noise, an optional stripe or checker pattern and
//!   clutter lines, so that a detector must not fire on edges or texture alone;
//! - 1–12 objects of [`CLASS_NAMES`], 12 px to 45% of the image in size (log-uniform, so small,
//!   medium and large COCO ranges are all populated), any rotation, stretched up to about 1.6:1,
//!   coloured to contrast with what lies under them;
//! - occlusion: later objects may cover earlier ones, but never more than half of one;
//! - objects cut by the image border (at most about two thirds of the shape outside).
//!
//! Boxes and polygons are amodal (occlusion by other objects is ignored): the polygon is the whole
//! shape clipped to the image, and the box is that clipped polygon's bounds. Instance masks are the
//! visible parts: objects are painted in list order, so a pixel belongs to the last object whose
//! polygon covers its centre ([`scene_masks`]; paint order, see [`crate::segments`]). The YOLO-seg
//! label files list the polygons in that order, so reading them in paint order gives these masks
//! back; the COCO json stores the masks themselves.

use std::io::Write as _;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::detection::BoxXyxy;
use crate::error::{Error, Result};
use crate::masks::Rle;
use crate::segments::{Segmentation, paint_order_masks};

/// Class names of the synthetic shapes; the class id is the index.
pub const CLASS_NAMES: [&str; 6] = [
    "circle",
    "rectangle",
    "triangle",
    "hexagon",
    "star",
    "cross",
];

/// Vertices of the polygon that stands for a circle or ellipse.
const CIRCLE_VERTICES: usize = 48;
/// Smallest object size (longest side of the unrotated shape), pixels.
const MIN_OBJECT_PX: f32 = 12.0;
/// Largest object size as a fraction of the shorter image side.
const MAX_OBJECT_FRACTION: f32 = 0.45;
/// An earlier object must keep at least this fraction of its pixels visible.
const MIN_VISIBLE_FRACTION: f32 = 0.5;
/// At least this fraction of a shape's area must lie inside the image.
const MIN_INSIDE_FRACTION: f32 = 0.35;
/// Placement attempts per object before it is given up.
const PLACEMENT_ATTEMPTS: usize = 40;
/// Smallest distance (RGB, 0..255 per channel) wanted between an object's colour and the mean colour
/// under it.
const MIN_CONTRAST: f32 = 90.0;
/// Largest image side accepted by [`generate`], pixels.
const MAX_SIDE: u32 = 8192;
/// Most objects per image accepted by [`generate`] (the occlusion map stores object ids in a `u8`).
const MAX_OBJECTS: usize = 64;

/// What [`generate`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of images (train + val).
    pub images: usize,
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
    /// Seed of the whole dataset; image `i` uses a seed derived from it and `i`.
    pub seed: u64,
    /// Fraction of the images put in the val split, in [0, 1] (spread evenly over the indices).
    pub val_fraction: f32,
    /// Fewest objects per image (an image may still get fewer when placements keep failing, which
    /// happens only on very small images).
    pub min_objects: usize,
    /// Most objects per image (at most 64).
    pub max_objects: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            images: 200,
            width: 640,
            height: 640,
            seed: 0,
            val_fraction: 0.2,
            min_objects: 1,
            max_objects: 12,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    /// Images in `images/train`.
    pub train_images: usize,
    /// Images in `images/val`.
    pub val_images: usize,
    /// Objects labelled in the train split.
    pub train_objects: usize,
    /// Objects labelled in the val split.
    pub val_objects: usize,
    /// The data YAML (`<out_dir>/data.yaml`).
    pub data_yaml: PathBuf,
}

/// One labelled object of a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneObject {
    /// Index into [`CLASS_NAMES`].
    pub class_id: usize,
    /// Bounds of `polygon`, pixels.
    pub bbox: BoxXyxy,
    /// The whole shape (ignoring occlusion) clipped to the image, pixels, `[x, y]` per vertex.
    pub polygon: Vec<[f32; 2]>,
}

impl SceneObject {
    /// Area of the (clipped) polygon, square pixels.
    pub fn area(&self) -> f32 {
        polygon_area(&self.polygon)
    }
}

/// The visible instance mask of each object of a `width` × `height` scene, in order: objects are
/// stacked in paint order (later ones hide earlier ones), each polygon rasterised at pixel
/// centres. An object hidden entirely gets an empty mask.
pub fn scene_masks(objects: &[SceneObject], width: usize, height: usize) -> Result<Vec<Rle>> {
    let segments: Vec<Segmentation> = objects
        .iter()
        .map(|o| Segmentation::Polygons(vec![o.polygon.clone()]))
        .collect();
    let refs: Vec<&Segmentation> = segments.iter().collect();
    paint_order_masks(&refs, width, height)
}

/// SplitMix64: tiny, fast, and good enough for scene parameters (and it seeds itself from any u64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    /// Uniform integer in [0, n); 0 when n is 0.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for n far below 2^32.
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    fn chance(&mut self, p: f32) -> bool {
        self.f32() < p
    }

    fn colour(&mut self) -> [f32; 3] {
        [
            self.range(0.0, 255.0),
            self.range(0.0, 255.0),
            self.range(0.0, 255.0),
        ]
    }
}

/// SplitMix64's finaliser; also derives per-image seeds.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of image `index` of a dataset with seed `seed`.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    mix64(seed ^ mix64(index as u64 ^ 0x5eed_5eed_5eed_5eed))
}

/// An RGB canvas in floating point (0..255), so that blending does not band.
struct Canvas {
    width: usize,
    height: usize,
    px: Vec<[f32; 3]>,
}

/// Anti-aliased coverage of a polygon: 2×2 samples per pixel, `cov` in 0..=4, over the clipped
/// bounding rectangle `[x0, x0 + w) × [y0, y0 + h)`.
struct Mask {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    cov: Vec<u8>,
}

impl Mask {
    /// Pixels at least half covered: those that count as the object's.
    fn solid_pixels(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.cov.iter().enumerate().filter_map(move |(i, &c)| {
            (c >= 2).then_some((self.x0 + i % self.w, self.y0 + i / self.w))
        })
    }
}

/// Scanline fill at 2×2 samples per pixel (sample centres at +0.25 and +0.75). Even-odd rule; the
/// shapes here are simple polygons, for which it equals non-zero. `None` when nothing is inside.
fn rasterize(poly: &[[f32; 2]], width: usize, height: usize) -> Option<Mask> {
    if poly.len() < 3 {
        return None;
    }
    let (bx1, by1, bx2, by2) = bounds(poly);
    let x0 = bx1.floor().max(0.0) as usize;
    let y0 = by1.floor().max(0.0) as usize;
    let x1 = (bx2.ceil().max(0.0) as usize).min(width);
    let y1 = (by2.ceil().max(0.0) as usize).min(height);
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    let (w, h) = (x1 - x0, y1 - y0);
    let mut cov = vec![0u8; w * h];
    let mut xs: Vec<f32> = Vec::with_capacity(16);
    let n = poly.len();
    for row in 0..h {
        for sub in 0..2 {
            let sy = (y0 + row) as f32 + 0.25 + 0.5 * sub as f32;
            xs.clear();
            for i in 0..n {
                let [ax, ay] = poly[i];
                let [bx, by] = poly[(i + 1) % n];
                // Half-open in y so a vertex on the scanline is counted once.
                if (ay <= sy && sy < by) || (by <= sy && sy < ay) {
                    xs.push(ax + (sy - ay) * (bx - ax) / (by - ay));
                }
            }
            xs.sort_by(f32::total_cmp);
            let lo = (2 * x0) as f32;
            let hi = (2 * x1) as f32;
            for pair in xs.chunks_exact(2) {
                // Sub-column j (half pixels) has its centre at (j + 0.5) / 2; take xa <= centre < xb.
                let ja = (2.0 * pair[0] - 0.5).ceil().clamp(lo, hi) as usize;
                let jb = (2.0 * pair[1] - 0.5).ceil().clamp(lo, hi) as usize;
                let line = &mut cov[row * w..(row + 1) * w];
                for j in ja..jb {
                    line[j / 2 - x0] += 1;
                }
            }
        }
    }
    Some(Mask { x0, y0, w, h, cov })
}

fn bounds(poly: &[[f32; 2]]) -> (f32, f32, f32, f32) {
    poly.iter().fold(
        (
            f32::INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ),
        |(a, b, c, d), p| (a.min(p[0]), b.min(p[1]), c.max(p[0]), d.max(p[1])),
    )
}

/// Shoelace area (square pixels, always >= 0).
fn polygon_area(poly: &[[f32; 2]]) -> f32 {
    let n = poly.len();
    if n < 3 {
        return 0.0;
    }
    let mut s = 0.0f64;
    for i in 0..n {
        let [ax, ay] = poly[i];
        let [bx, by] = poly[(i + 1) % n];
        s += f64::from(ax) * f64::from(by) - f64::from(bx) * f64::from(ay);
    }
    (s.abs() / 2.0) as f32
}

/// Sutherland–Hodgman clipping to `[0, w] × [0, h]` (a convex window, so concave shapes clip right;
/// a shape cut in two pieces comes back joined along the border, with zero-area seams).
fn clip_polygon(poly: &[[f32; 2]], w: f32, h: f32) -> Vec<[f32; 2]> {
    // Each edge: (axis, bound, keep values above the bound?).
    let edges = [
        (0usize, 0.0f32, true),
        (0, w, false),
        (1, 0.0, true),
        (1, h, false),
    ];
    let mut out: Vec<[f32; 2]> = poly.to_vec();
    for (axis, bound, keep_above) in edges {
        if out.is_empty() {
            break;
        }
        let inside = |p: &[f32; 2]| {
            if keep_above {
                p[axis] >= bound
            } else {
                p[axis] <= bound
            }
        };
        let input = std::mem::take(&mut out);
        let n = input.len();
        for i in 0..n {
            let cur = input[i];
            let prev = input[(i + n - 1) % n];
            let (ci, pi) = (inside(&cur), inside(&prev));
            if ci != pi {
                let t = (bound - prev[axis]) / (cur[axis] - prev[axis]);
                let mut p = [
                    prev[0] + t * (cur[0] - prev[0]),
                    prev[1] + t * (cur[1] - prev[1]),
                ];
                p[axis] = bound; // exactly on the border despite rounding
                out.push(p);
            }
            if ci {
                out.push(cur);
            }
        }
    }
    out
}

/// The outline of class `class_id` in unit coordinates (about [-1, 1]², centred), before scaling.
fn unit_shape(class_id: usize, rng: &mut Rng) -> Vec<[f32; 2]> {
    use std::f32::consts::{FRAC_PI_2, TAU};
    let ring = |n: usize, phase: f32| -> Vec<[f32; 2]> {
        (0..n)
            .map(|i| {
                let a = phase + TAU * i as f32 / n as f32;
                [a.cos(), a.sin()]
            })
            .collect()
    };
    match class_id {
        0 => ring(CIRCLE_VERTICES, 0.0),
        1 => vec![[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]],
        2 => ring(3, -FRAC_PI_2),
        3 => ring(6, 0.0),
        4 => {
            let inner = rng.range(0.38, 0.52);
            (0..10)
                .map(|i| {
                    let a = -FRAC_PI_2 + TAU * i as f32 / 10.0;
                    let r = if i % 2 == 0 { 1.0 } else { inner };
                    [r * a.cos(), r * a.sin()]
                })
                .collect()
        }
        _ => {
            // A plus sign with arms of half-width t.
            let t = rng.range(0.22, 0.4);
            vec![
                [-t, -1.0],
                [t, -1.0],
                [t, -t],
                [1.0, -t],
                [1.0, t],
                [t, t],
                [t, 1.0],
                [-t, 1.0],
                [-t, t],
                [-1.0, t],
                [-1.0, -t],
                [-t, -t],
            ]
        }
    }
}

/// Render one scene with 1–12 objects. Any size works; images smaller than about 16 px on a side
/// may get no object at all. Same seed and size ⇒ identical pixels and objects.
pub fn render_scene(seed: u64, width: u32, height: u32) -> (image::RgbImage, Vec<SceneObject>) {
    render_scene_with(seed, width, height, 1..=12)
}

/// [`render_scene`] with a chosen range of object counts (the upper end is capped at 64).
pub fn render_scene_with(
    seed: u64,
    width: u32,
    height: u32,
    objects: RangeInclusive<usize>,
) -> (image::RgbImage, Vec<SceneObject>) {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 {
        return (image::RgbImage::new(width, height), Vec::new());
    }
    let mut rng = Rng::new(seed);
    let mut canvas = Canvas {
        width: w,
        height: h,
        px: vec![[0.0; 3]; w * h],
    };
    paint_background(&mut canvas, &mut rng);
    paint_clutter(&mut canvas, &mut rng);

    let max_n = (*objects.end()).min(MAX_OBJECTS);
    let min_n = (*objects.start()).min(max_n);
    let n = min_n + rng.below(max_n - min_n + 1);
    let placed = place_objects(&mut canvas, &mut rng, n);

    let img = finish(&canvas, &mut rng);
    (img, placed)
}

/// Gradient + smooth value noise + optional stripes or checker.
fn paint_background(c: &mut Canvas, rng: &mut Rng) {
    let (w, h) = (c.width, c.height);
    let c0 = rng.colour();
    let c1 = rng.colour();
    let angle = rng.range(0.0, std::f32::consts::TAU);
    let (ca, sa) = (angle.cos(), angle.sin());
    let half_extent = 0.5 * (w as f32 * ca.abs() + h as f32 * sa.abs()).max(1.0);
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);

    // Value noise on a coarse grid, bilinear with smoothstep, in luminance.
    let cell = rng.range(0.12, 0.3) * w.max(h) as f32;
    let noise_amp = rng.range(5.0, 30.0);
    let gw = (w as f32 / cell).ceil() as usize + 2;
    let gh = (h as f32 / cell).ceil() as usize + 2;
    let grid: Vec<f32> = (0..gw * gh).map(|_| rng.range(-1.0, 1.0)).collect();
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    let cols: Vec<(usize, f32)> = (0..w)
        .map(|x| {
            let f = x as f32 / cell;
            (f as usize, smooth(f.fract()))
        })
        .collect();

    // Pattern: 0 none, 1 stripes, 2 checker.
    let pattern = rng.below(3);
    let pc = rng.colour();
    let palpha = rng.range(0.1, 0.45);
    let pangle = rng.range(0.0, std::f32::consts::PI);
    let (pca, psa) = (pangle.cos(), pangle.sin());
    let period = rng.range(6.0, 0.15 * w.min(h) as f32 + 8.0);
    let duty = rng.range(0.2, 0.6);

    for y in 0..h {
        let fy = y as f32 / cell;
        let (iy, ty) = (fy as usize, smooth(fy.fract()));
        for x in 0..w {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let t = (((xf - cx) * ca + (yf - cy) * sa) / half_extent * 0.5 + 0.5).clamp(0.0, 1.0);
            let (ix, tx) = cols[x];
            let g = |gx: usize, gy: usize| grid[gy * gw + gx];
            let top = g(ix, iy) + (g(ix + 1, iy) - g(ix, iy)) * tx;
            let bot = g(ix, iy + 1) + (g(ix + 1, iy + 1) - g(ix, iy + 1)) * tx;
            let nz = (top + (bot - top) * ty) * noise_amp;
            let mut p = [0.0f32; 3];
            for k in 0..3 {
                p[k] = c0[k] + (c1[k] - c0[k]) * t + nz;
            }
            let on = match pattern {
                1 => ((xf * pca + yf * psa) / period).rem_euclid(1.0) < duty,
                2 => {
                    let u = ((xf * pca + yf * psa) / period).floor() as i64;
                    let v = ((-xf * psa + yf * pca) / period).floor() as i64;
                    (u + v).rem_euclid(2) == 0
                }
                _ => false,
            };
            if on {
                for k in 0..3 {
                    p[k] += (pc[k] - p[k]) * palpha;
                }
            }
            c.px[y * w + x] = p;
        }
    }
}

/// Thin straight lines of random colour: edges that are not objects.
fn paint_clutter(c: &mut Canvas, rng: &mut Rng) {
    let n = 2 + rng.below(9);
    let diag = ((c.width * c.width + c.height * c.height) as f32).sqrt();
    for _ in 0..n {
        let x = rng.range(0.0, c.width as f32);
        let y = rng.range(0.0, c.height as f32);
        let len = rng.range(0.1, 0.7) * diag;
        let a = rng.range(0.0, std::f32::consts::PI);
        let (dx, dy) = (a.cos() * len / 2.0, a.sin() * len / 2.0);
        let hw = rng.range(0.5, 2.0);
        let (nx, ny) = (-a.sin() * hw, a.cos() * hw);
        let quad = [
            [x - dx + nx, y - dy + ny],
            [x + dx + nx, y + dy + ny],
            [x + dx - nx, y + dy - ny],
            [x - dx - nx, y - dy - ny],
        ];
        let colour = rng.colour();
        let alpha = rng.range(0.4, 1.0);
        if let Some(m) = rasterize(&quad, c.width, c.height) {
            blend(c, &m, |_, _| colour, alpha);
        }
    }
}

/// Alpha-blend `colour(x, y)` through the mask's coverage, scaled by `alpha`.
fn blend(c: &mut Canvas, m: &Mask, colour: impl Fn(f32, f32) -> [f32; 3], alpha: f32) {
    for row in 0..m.h {
        let y = m.y0 + row;
        for col in 0..m.w {
            let cov = m.cov[row * m.w + col];
            if cov == 0 {
                continue;
            }
            let x = m.x0 + col;
            let a = alpha * f32::from(cov) / 4.0;
            let src = colour(x as f32 + 0.5, y as f32 + 0.5);
            let p = &mut c.px[y * c.width + x];
            for k in 0..3 {
                p[k] += (src[k] - p[k]) * a;
            }
        }
    }
}

/// Place up to `n` objects, later over earlier, with the occlusion and border rules of the module.
fn place_objects(c: &mut Canvas, rng: &mut Rng, n: usize) -> Vec<SceneObject> {
    let (w, h) = (c.width, c.height);
    let (wf, hf) = (w as f32, h as f32);
    let max_size = (MAX_OBJECT_FRACTION * wf.min(hf)).max(4.0);
    let min_size = MIN_OBJECT_PX.min(max_size);
    // owner[pixel] = 1 + index of the topmost object there, 0 for background.
    let mut owner = vec![0u8; w * h];
    let mut full_px: Vec<usize> = Vec::with_capacity(n);
    let mut visible_px: Vec<usize> = Vec::with_capacity(n);
    let mut objects = Vec::with_capacity(n);

    'objects: for _ in 0..n {
        for _ in 0..PLACEMENT_ATTEMPTS {
            let class_id = rng.below(CLASS_NAMES.len());
            let shape = unit_shape(class_id, rng);
            let size = (rng.range(min_size.ln(), max_size.ln())).exp();
            // Rectangles vary more in aspect than the other shapes, which must stay recognisable.
            let stretch_max: f32 = if class_id == 1 { 0.8 } else { 0.45 };
            let stretch = rng.range(-stretch_max, stretch_max).exp();
            let (sx, sy) = (size / 2.0 * stretch.sqrt(), size / 2.0 / stretch.sqrt());
            let rot = rng.range(0.0, std::f32::consts::TAU);
            let (cr, sr) = (rot.cos(), rot.sin());
            let (cx, cy) = (rng.range(0.0, wf), rng.range(0.0, hf));
            let full: Vec<[f32; 2]> = shape
                .iter()
                .map(|&[x, y]| {
                    let (x, y) = (x * sx, y * sy);
                    [cx + x * cr - y * sr, cy + x * sr + y * cr]
                })
                .collect();
            let clipped = clip_polygon(&full, wf, hf);
            let (bx1, by1, bx2, by2) = bounds(&clipped);
            if clipped.len() < 3
                || polygon_area(&clipped) < MIN_INSIDE_FRACTION * polygon_area(&full)
                || bx2 - bx1 < 4.0
                || by2 - by1 < 4.0
            {
                continue;
            }
            let Some(mask) = rasterize(&full, w, h) else {
                continue;
            };
            let mine: Vec<(usize, usize)> = mask.solid_pixels().collect();
            if mine.len() < 16 {
                continue;
            }
            // Would this hide too much of an earlier object?
            let mut covered = vec![0usize; objects.len()];
            for &(x, y) in &mine {
                let o = owner[y * w + x];
                if o > 0 {
                    covered[usize::from(o) - 1] += 1;
                }
            }
            let hides_too_much = covered.iter().enumerate().any(|(j, &cv)| {
                cv > 0 && ((visible_px[j] - cv) as f32) < MIN_VISIBLE_FRACTION * full_px[j] as f32
            });
            if hides_too_much {
                continue;
            }

            let fill = contrasting_colour(c, &mine, rng);
            let shade = rng.range(0.0, 40.0);
            let sdir = rng.range(0.0, std::f32::consts::TAU);
            let (sdx, sdy) = (sdir.cos() / size, sdir.sin() / size);
            let shaded = move |x: f32, y: f32| {
                let s = ((x - cx) * sdx + (y - cy) * sdy) * shade;
                [fill[0] + s, fill[1] + s, fill[2] + s]
            };
            if rng.chance(0.3) {
                // An outline: the shape in a second colour, then a shrunken copy in the fill colour.
                let edge = contrasting_colour(c, &mine, rng);
                blend(c, &mask, |_, _| edge, 1.0);
                let k = (1.0 - rng.range(1.5, 3.5) / (size / 2.0)).max(0.3);
                let inner: Vec<[f32; 2]> = full
                    .iter()
                    .map(|&[x, y]| [cx + (x - cx) * k, cy + (y - cy) * k])
                    .collect();
                if let Some(m) = rasterize(&inner, w, h) {
                    blend(c, &m, shaded, 1.0);
                }
            } else {
                blend(c, &mask, shaded, 1.0);
            }

            let id = objects.len();
            for (j, &cv) in covered.iter().enumerate() {
                visible_px[j] -= cv;
            }
            for &(x, y) in &mine {
                // id < MAX_OBJECTS <= 255, so it fits.
                owner[y * w + x] = (id + 1) as u8;
            }
            full_px.push(mine.len());
            visible_px.push(mine.len());
            objects.push(SceneObject {
                class_id,
                bbox: BoxXyxy::new(bx1, by1, bx2, by2),
                polygon: clipped,
            });
            continue 'objects;
        }
    }
    objects
}

/// A random colour at least [`MIN_CONTRAST`] from the mean colour under `pixels` (else the most
/// distant of the candidates tried).
fn contrasting_colour(c: &Canvas, pixels: &[(usize, usize)], rng: &mut Rng) -> [f32; 3] {
    // A subsample is enough for a mean and keeps large objects cheap.
    let step = (pixels.len() / 512).max(1);
    let mut mean = [0.0f32; 3];
    let mut n = 0.0f32;
    for &(x, y) in pixels.iter().step_by(step) {
        let p = c.px[y * c.width + x];
        for k in 0..3 {
            mean[k] += p[k];
        }
        n += 1.0;
    }
    for m in &mut mean {
        *m /= n.max(1.0);
    }
    let mut best = rng.colour();
    let mut best_d = 0.0f32;
    for _ in 0..24 {
        let cand = rng.colour();
        let d = (0..3)
            .map(|k| (cand[k] - mean[k]).powi(2))
            .sum::<f32>()
            .sqrt();
        if d > best_d {
            best = cand;
            best_d = d;
        }
        if d >= MIN_CONTRAST {
            break;
        }
    }
    best
}

/// Film grain and quantisation to 8 bits.
fn finish(c: &Canvas, rng: &mut Rng) -> image::RgbImage {
    let grain = rng.range(0.0, 8.0);
    // xorshift32 per pixel: cheaper than SplitMix for 400k draws, and quality hardly matters here.
    let mut s = (rng.next_u64() as u32) | 1;
    let mut raw = Vec::with_capacity(c.width * c.height * 3);
    for p in &c.px {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        // Sum of two uniform bytes: a triangular distribution in [-1, 1).
        let u = (f32::from((s & 0xff) as u8) + f32::from(((s >> 8) & 0xff) as u8)) / 255.0 - 1.0;
        let g = u * grain;
        for &v in p {
            raw.push((v + g).round().clamp(0.0, 255.0) as u8);
        }
    }
    // The buffer has exactly width * height * 3 bytes.
    image::RgbImage::from_raw(c.width as u32, c.height as u32, raw)
        .unwrap_or_else(|| image::RgbImage::new(c.width as u32, c.height as u32))
}

/// Write a synthetic dataset under `out_dir`:
/// - `images/{train,val}/NNNNNN.png`;
/// - YOLO-seg labels `labels/{train,val}/NNNNNN.txt`: one polygon per object, `class x1 y1 x2 y2
///   ...` normalized to [0, 1] with 6 decimals, in paint order, so the loaded box is the polygon's
///   bounds and the paint-order masks are the visible ones;
/// - `data.yaml`;
/// - COCO `annotations/instances_{train,val}.json`: category ids 1..=6, `bbox` the polygon's
///   bounds, `segmentation` the object's visible mask as a compressed RLE `{"size": [h, w],
///   "counts": "..."}`, `area` that mask's pixels (0 for an object hidden entirely, which is kept
///   so that both files list the same objects).
///
/// `progress(done, total)` is called after each image. Refuses a folder that already holds
/// `images/` or `labels/` files, so a smaller run never leaves stale images behind.
pub fn generate(
    cfg: &SynthConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary> {
    validate(cfg)?;
    for sub in ["images", "labels"] {
        let d = out_dir.join(sub);
        if d.is_dir() {
            let mut rd = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
            if rd.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{} is not empty; generate into a new folder or delete the old dataset first",
                    d.display()
                )));
            }
        }
    }
    for split in ["train", "val"] {
        for sub in ["images", "labels"] {
            let d = out_dir.join(sub).join(split);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
    }
    let ann_dir = out_dir.join("annotations");
    std::fs::create_dir_all(&ann_dir).map_err(|e| Error::io(&ann_dir, e))?;

    let n_val = val_count(cfg.images, cfg.val_fraction);
    let digits = cfg.images.saturating_sub(1).to_string().len().max(6);
    let mut coco = [CocoOut::new(), CocoOut::new()]; // train, val
    let mut counts = [(0usize, 0usize); 2]; // (images, objects)
    let (wf, hf) = (cfg.width as f32, cfg.height as f32);

    for i in 0..cfg.images {
        let is_val = (i + 1) * n_val / cfg.images > i * n_val / cfg.images;
        let (split, si) = if is_val { ("val", 1) } else { ("train", 0) };
        let (img, objects) = render_scene_with(
            image_seed(cfg.seed, i),
            cfg.width,
            cfg.height,
            cfg.min_objects..=cfg.max_objects,
        );
        let stem = format!("{i:0digits$}");
        let img_path = out_dir
            .join("images")
            .join(split)
            .join(format!("{stem}.png"));
        write_png(&img_path, &img)?;

        let mut txt = String::new();
        for o in &objects {
            txt.push_str(&o.class_id.to_string());
            for p in &o.polygon {
                let x = f64::from(p[0]) / f64::from(wf);
                let y = f64::from(p[1]) / f64::from(hf);
                txt.push_str(&format!(" {x:.6} {y:.6}"));
            }
            txt.push('\n');
        }
        let label_path = out_dir
            .join("labels")
            .join(split)
            .join(format!("{stem}.txt"));
        std::fs::write(&label_path, txt).map_err(|e| Error::io(&label_path, e))?;

        let image_id = i as u64 + 1;
        let masks = scene_masks(&objects, cfg.width as usize, cfg.height as usize)?;
        coco[si].add(
            image_id,
            format!("{stem}.png"),
            cfg.width,
            cfg.height,
            &objects,
            &masks,
        );
        counts[si].0 += 1;
        counts[si].1 += objects.len();
        progress(i + 1, cfg.images);
    }

    for (si, split) in ["train", "val"].iter().enumerate() {
        let path = ann_dir.join(format!("instances_{split}.json"));
        let json = serde_json::to_string(&coco[si].file()).map_err(|e| Error::Dataset {
            path: path.clone(),
            line: None,
            message: format!("cannot serialise the COCO json: {e}"),
        })?;
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    }

    let data_yaml = out_dir.join("data.yaml");
    let mut yaml = format!(
        "# Kestrel synthetic shapes: {} images of {}x{}, seed {}\npath: .\ntrain: images/train\nval: images/val\nnc: {}\nnames:\n",
        cfg.images,
        cfg.width,
        cfg.height,
        cfg.seed,
        CLASS_NAMES.len()
    );
    for n in CLASS_NAMES {
        yaml.push_str(&format!("  - {n}\n"));
    }
    std::fs::write(&data_yaml, yaml).map_err(|e| Error::io(&data_yaml, e))?;

    Ok(SynthSummary {
        train_images: counts[0].0,
        val_images: counts[1].0,
        train_objects: counts[0].1,
        val_objects: counts[1].1,
        data_yaml,
    })
}

fn validate(cfg: &SynthConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if cfg.images == 0 {
        return bad("synthetic dataset: `images` must be at least 1".into());
    }
    if !(32..=MAX_SIDE).contains(&cfg.width) || !(32..=MAX_SIDE).contains(&cfg.height) {
        return bad(format!(
            "synthetic dataset: image size {}x{} is outside 32..={MAX_SIDE} pixels per side",
            cfg.width, cfg.height
        ));
    }
    if !(0.0..=1.0).contains(&cfg.val_fraction) {
        return bad(format!(
            "synthetic dataset: `val_fraction` {} must be in [0, 1]",
            cfg.val_fraction
        ));
    }
    if cfg.min_objects > cfg.max_objects || cfg.max_objects > MAX_OBJECTS {
        return bad(format!(
            "synthetic dataset: objects per image {}..={} must satisfy min <= max <= {MAX_OBJECTS}",
            cfg.min_objects, cfg.max_objects
        ));
    }
    Ok(())
}

/// Images in val: `round(images * fraction)`, but at least one of each split when the fraction is
/// strictly between 0 and 1 and there are two images or more.
fn val_count(images: usize, fraction: f32) -> usize {
    let n = (images as f64 * f64::from(fraction)).round() as usize;
    if fraction > 0.0 && fraction < 1.0 && images >= 2 {
        n.clamp(1, images - 1)
    } else {
        n.min(images)
    }
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    use image::ImageEncoder as _;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    // Fast compression: generation speed matters more than a few percent of disk.
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    out.flush().map_err(|e| Error::io(path, e))
}

/// Round to 1/1000 pixel: exact enough for labels and keeps the json small.
fn r3(v: f32) -> f64 {
    (f64::from(v) * 1000.0).round() / 1000.0
}

#[derive(Serialize)]
struct CocoFileOut<'a> {
    info: CocoInfo,
    images: &'a [CocoImageOut],
    annotations: &'a [CocoAnnOut],
    categories: Vec<CocoCatOut>,
}

#[derive(Serialize)]
struct CocoInfo {
    description: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct CocoImageOut {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CocoAnnOut {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
    segmentation: CocoRleOut,
}

/// pycocotools' compressed RLE: `size` is `[height, width]`.
#[derive(Serialize)]
struct CocoRleOut {
    size: [usize; 2],
    counts: String,
}

#[derive(Serialize)]
struct CocoCatOut {
    id: u64,
    name: &'static str,
    supercategory: &'static str,
}

/// One split's COCO json, built image by image.
struct CocoOut {
    images: Vec<CocoImageOut>,
    annotations: Vec<CocoAnnOut>,
}

impl CocoOut {
    fn new() -> Self {
        CocoOut {
            images: Vec::new(),
            annotations: Vec::new(),
        }
    }

    fn add(
        &mut self,
        id: u64,
        file_name: String,
        width: u32,
        height: u32,
        objects: &[SceneObject],
        masks: &[Rle],
    ) {
        self.images.push(CocoImageOut {
            id,
            file_name,
            width,
            height,
        });
        for (o, m) in objects.iter().zip(masks) {
            let b = &o.bbox;
            self.annotations.push(CocoAnnOut {
                id: self.annotations.len() as u64 + 1,
                image_id: id,
                category_id: o.class_id as u64 + 1,
                bbox: [r3(b.x1), r3(b.y1), r3(b.width()), r3(b.height())],
                area: m.area() as f64,
                iscrowd: 0,
                segmentation: CocoRleOut {
                    size: [m.height, m.width],
                    counts: m.to_coco_string(),
                },
            });
        }
    }

    fn file(&self) -> CocoFileOut<'_> {
        CocoFileOut {
            info: CocoInfo {
                description: "Kestrel synthetic shapes",
                version: "1",
            },
            images: &self.images,
            annotations: &self.annotations,
            categories: CLASS_NAMES
                .iter()
                .enumerate()
                .map(|(i, &name)| CocoCatOut {
                    id: i as u64 + 1,
                    name,
                    supercategory: "shape",
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        let (a, oa) = render_scene(42, 320, 240);
        let (b, ob) = render_scene(42, 320, 240);
        assert_eq!(a.as_raw(), b.as_raw());
        assert_eq!(oa, ob);
        let (c, _) = render_scene(43, 320, 240);
        assert_ne!(a.as_raw(), c.as_raw());
    }

    #[test]
    fn odd_sizes_work_and_labels_are_inside() {
        for (seed, w, h) in [
            (1, 1283, 721),
            (2, 33, 97),
            (3, 17, 17),
            (4, 1, 1),
            (5, 0, 10),
        ] {
            let (img, objs) = render_scene(seed, w, h);
            assert_eq!(img.dimensions(), (w, h));
            for o in &objs {
                let b = o.bbox;
                assert!(b.x1 >= 0.0 && b.y1 >= 0.0 && b.x2 <= w as f32 && b.y2 <= h as f32);
                assert!(b.width() >= 4.0 && b.height() >= 4.0);
                assert!(o.class_id < CLASS_NAMES.len());
                assert!(o.area() > 0.0 && o.area() <= b.area() + 1e-2);
                let (x1, y1, x2, y2) = bounds(&o.polygon);
                assert_eq!((x1, y1, x2, y2), (b.x1, b.y1, b.x2, b.y2));
            }
        }
        let (_, objs) = render_scene(1, 1283, 721);
        assert!(!objs.is_empty());
    }

    #[test]
    fn scenes_vary() {
        let mut classes = [0usize; 6];
        let mut sizes = Vec::new();
        let mut counts = Vec::new();
        for seed in 0..40 {
            let (_, objs) = render_scene(seed, 320, 320);
            counts.push(objs.len());
            for o in objs {
                classes[o.class_id] += 1;
                sizes.push(o.bbox.width().max(o.bbox.height()));
            }
        }
        assert!(classes.iter().all(|&c| c > 5), "{classes:?}");
        assert!(counts.iter().all(|&n| (1..=12).contains(&n)), "{counts:?}");
        assert!(sizes.iter().any(|&s| s < 20.0) && sizes.iter().any(|&s| s > 100.0));
    }

    #[test]
    fn rasterizer_covers_the_area() {
        // A 10x6 rectangle at integer coordinates: 60 fully covered pixels.
        let rect = [[2.0, 3.0], [12.0, 3.0], [12.0, 9.0], [2.0, 9.0]];
        let m = rasterize(&rect, 20, 20).unwrap();
        assert_eq!(m.cov.iter().map(|&c| usize::from(c)).sum::<usize>(), 60 * 4);
        assert_eq!(m.solid_pixels().count(), 60);
        // A half-pixel offset gives half-covered edge pixels.
        let rect = [[2.5, 3.0], [12.5, 3.0], [12.5, 4.0], [2.5, 4.0]];
        let m = rasterize(&rect, 20, 20).unwrap();
        assert_eq!(m.cov.iter().map(|&c| usize::from(c)).sum::<usize>(), 10 * 4);
        // A circle's coverage approximates its area.
        let mut rng = Rng::new(0);
        let circle: Vec<[f32; 2]> = unit_shape(0, &mut rng)
            .iter()
            .map(|p| [50.0 + 30.0 * p[0], 50.0 + 30.0 * p[1]])
            .collect();
        let m = rasterize(&circle, 100, 100).unwrap();
        let covered = m.cov.iter().map(|&c| f32::from(c)).sum::<f32>() / 4.0;
        assert!((covered - polygon_area(&circle)).abs() / covered < 0.01);
    }

    #[test]
    fn clipping_keeps_the_inside() {
        let sq = [[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]];
        let c = clip_polygon(&sq, 100.0, 100.0);
        assert!((polygon_area(&c) - 25.0).abs() < 1e-4);
        assert_eq!(bounds(&c), (0.0, 0.0, 5.0, 5.0));
        let outside = [[200.0, 200.0], [210.0, 200.0], [210.0, 210.0]];
        assert!(clip_polygon(&outside, 100.0, 100.0).is_empty());
    }

    #[test]
    fn val_split_sizes() {
        assert_eq!(val_count(10, 0.2), 2);
        assert_eq!(val_count(3, 0.01), 1);
        assert_eq!(val_count(3, 0.99), 2);
        assert_eq!(val_count(5, 0.0), 0);
        assert_eq!(val_count(5, 1.0), 5);
        assert_eq!(val_count(1, 0.5), 1);
    }

    #[test]
    fn generate_writes_a_consistent_dataset() {
        let dir = std::env::temp_dir().join(format!("kestrel-synth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = SynthConfig {
            images: 5,
            width: 96,
            height: 64,
            seed: 7,
            val_fraction: 0.4,
            ..SynthConfig::default()
        };
        let mut calls = Vec::new();
        let s = generate(&cfg, &dir, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls.last(), Some(&(5, 5)));
        assert_eq!((s.train_images, s.val_images), (3, 2));
        let ds = crate::dataset::Dataset::from_yolo_yaml(&s.data_yaml, crate::dataset::Split::Val)
            .unwrap();
        assert_eq!(ds.names, CLASS_NAMES);
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.num_objects(), s.val_objects);
        let coco = crate::dataset::Dataset::from_coco_json(
            &dir.join("annotations/instances_train.json"),
            &dir.join("images/train"),
        )
        .unwrap();
        assert_eq!(coco.category_ids, [1, 2, 3, 4, 5, 6]);
        assert_eq!(coco.num_objects(), s.train_objects);
        assert!(coco.samples.iter().all(|x| x.image.is_file()));

        // Masks: YOLO-seg polygons read in paint order give the COCO json's visible masks (up to
        // the 6-decimal rounding of the label vertices), and COCO's area is the mask's.
        let yolo =
            crate::dataset::Dataset::from_yolo_yaml(&s.data_yaml, crate::dataset::Split::Train)
                .unwrap();
        assert_eq!(yolo.mask_overlap, crate::dataset::MaskOverlap::PaintOrder);
        assert!(yolo.has_masks() && coco.has_masks());
        for (y, c) in yolo.samples.iter().zip(&coco.samples) {
            let ym = y.instance_masks(yolo.mask_overlap).unwrap().unwrap();
            let cm = c.instance_masks(coco.mask_overlap).unwrap().unwrap();
            assert_eq!(ym.len(), cm.len());
            for ((a, b), g) in ym.iter().zip(&cm).zip(&c.objects) {
                assert_eq!(b.area() as f32, g.area);
                let iou = a.iou(b, false).unwrap();
                assert!(iou > 0.98 || a.area() + b.area() < 10, "IoU {iou}");
            }
        }

        // A second run into the same folder is refused.
        let e = generate(&cfg, &dir, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        let bad = SynthConfig {
            width: 8,
            ..cfg.clone()
        };
        assert!(generate(&bad, &dir.join("x"), &mut |_, _| {}).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scene_masks_are_the_visible_parts() {
        for seed in 0..20 {
            let (_, objs) = render_scene(seed, 160, 120);
            let masks = scene_masks(&objs, 160, 120).unwrap();
            assert_eq!(masks.len(), objs.len());
            let mut union = vec![0u8; 160 * 120];
            for (k, (o, m)) in objs.iter().zip(&masks).enumerate() {
                let alone = Segmentation::Polygons(vec![o.polygon.clone()])
                    .to_bitmap(160, 120)
                    .unwrap();
                let mine = m.decode().unwrap();
                for (i, (&v, &a)) in mine.data.iter().zip(&alone.data).enumerate() {
                    // Inside the object's own shape, never on another object's mask.
                    assert!(v <= a, "seed {seed} object {k} pixel {i}");
                    union[i] += v;
                }
                // The placement rules keep at least about half of every object visible.
                assert!(
                    m.area() as f64 >= 0.3 * alone.area() as f64,
                    "seed {seed} object {k}: {} of {} pixels visible",
                    m.area(),
                    alone.area()
                );
                if k + 1 == objs.len() {
                    assert_eq!(m.area() as usize, alone.area(), "the last object is whole");
                }
            }
            assert!(union.iter().all(|&v| v <= 1), "seed {seed}: masks overlap");
        }
    }

    #[test]
    fn render_is_fast_enough() {
        // Generous bound (debug builds on a loaded machine); the real figure is printed for reports.
        let t = std::time::Instant::now();
        for seed in 0..4 {
            let _ = render_scene(seed, 640, 640);
        }
        let per = t.elapsed() / 4;
        eprintln!("render_scene 640x640: {per:?} per image");
        assert!(per < std::time::Duration::from_millis(500), "{per:?}");
    }
}
