//! Training batches: images letterboxed to the network size (as inference does), boxes mapped
//! with them, a deterministic shuffle per epoch, and YOLOv9's augmentation: four-image mosaics,
//! random scale and translation, HSV jitter and horizontal flips. Images load on several threads.
//! For segmentation models each batch also carries the objects' masks at a quarter of the input
//! size, as YOLOv9's overlapping masks: one label map per image (0 background, k + 1 where
//! object k is on top), made by sampling each source image's painted outlines through the same
//! letterbox, mosaic, zoom, shift and flip as the pixels.
//! Sources: a dataset the runtime reads (YOLO txt or COCO json) or Kestrel's synthetic scenes
//! (rendered on first use and kept in memory).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use kestrel_runtime::dataset::{Dataset, MaskOverlap, Split, load_rgb};
use kestrel_runtime::labels::hsv_to_rgb;
use kestrel_runtime::letterbox::{LetterboxParams, Letterboxer};
use kestrel_runtime::segments::Segmentation;
use kestrel_runtime::synth::{image_seed, render_scene};
use kestrel_runtime::{BoxXyxy, GroundTruth};
use tch::{Device, Tensor};

use crate::error::{Error, Result};

/// Where training images come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A labelled dataset (images are read from disk for every batch).
    Dataset(Dataset),
    /// `count` synthetic scenes of `size`×`size` pixels; scene `i` is rendered from
    /// `image_seed(seed, i)`, like `kestrel synth` writes them.
    Synthetic { seed: u64, count: usize, size: u32 },
}

impl Source {
    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Source::Dataset(d) => d.samples.len(),
            Source::Synthetic { count, .. } => *count,
        }
    }

    /// The first `n` images only (all when there are fewer).
    pub fn first(mut self, n: usize) -> Self {
        match &mut self {
            Source::Dataset(d) => d.samples.truncate(n),
            Source::Synthetic { count, .. } => *count = (*count).min(n),
        }
        self
    }

    /// True when there is no image to train on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Source::Dataset(d) => d.num_classes(),
            Source::Synthetic { .. } => kestrel_runtime::synth::CLASS_NAMES.len(),
        }
    }

    /// Where image `index` comes from, for messages: its file, or the synthetic scene's seed.
    pub fn describe(&self, index: usize) -> String {
        match self {
            Source::Dataset(d) => d.samples.get(index).map_or_else(
                || format!("image {index}"),
                |s| s.image.display().to_string(),
            ),
            Source::Synthetic { seed, .. } => format!("synthetic scene {index} of seed {seed}"),
        }
    }

    /// Image `index` as RGB with its ground truth in its pixels (crowd regions included: the
    /// evaluator ignores them, training skips them).
    pub fn load(&self, index: usize) -> Result<(image::RgbImage, Vec<GroundTruth>)> {
        let (img, objects, _) = self.load_with_segments(index)?;
        Ok((img, objects))
    }

    /// [`Source::load`] with each object's outline (`None` where the labels give only a box).
    pub fn load_with_segments(&self, index: usize) -> Result<Labelled> {
        match self {
            Source::Dataset(d) => {
                let s = &d.samples[index];
                let img = load_rgb(&s.image).map_err(Error::Runtime)?;
                Ok((img, s.objects.clone(), s.segments.clone()))
            }
            Source::Synthetic { seed, size, .. } => {
                let (img, objects) = render_scene(image_seed(*seed, index), *size, *size);
                let segments = objects
                    .iter()
                    .map(|o| Some(Segmentation::Polygons(vec![o.polygon.clone()])))
                    .collect();
                let objects = objects
                    .into_iter()
                    .map(|o| GroundTruth {
                        area: o.bbox.area(),
                        bbox: o.bbox,
                        class_id: o.class_id,
                        iscrowd: false,
                    })
                    .collect();
                Ok((img, objects, segments))
            }
        }
    }

    /// Whether later objects of an image lie on top of earlier ones (YOLO-seg labels, synthetic
    /// scenes); otherwise (COCO json) masks are independent and training paints the smaller
    /// ones on top, as YOLOv9 does.
    pub fn paint_order(&self) -> bool {
        match self {
            Source::Dataset(d) => d.mask_overlap == MaskOverlap::PaintOrder,
            Source::Synthetic { .. } => true,
        }
    }
}

/// An image, its objects and their outlines (one entry per object).
pub type Labelled = (image::RgbImage, Vec<GroundTruth>, Vec<Option<Segmentation>>);

/// One batch for the network and the loss.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` RGB in [0, 1].
    pub images: Tensor,
    /// `[B, N]` class ids (int64), N = most objects in one image of the batch (at least 1).
    pub classes: Tensor,
    /// `[B, N, 4]` boxes in input pixels (x1, y1, x2, y2).
    pub boxes: Tensor,
    /// `[B, N]` 1 for a real object, 0 for padding.
    pub valid: Tensor,
    /// `[B, H/4, W/4]` object labels for segmentation models (0 background, k + 1 where row k
    /// of the image's objects is on top); `None` for detectors.
    pub masks: Option<Tensor>,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
}

impl Batch {
    /// The same batch on `device` (the loader builds batches on the CPU, off the training thread).
    pub fn to_device(self, device: Device) -> Batch {
        if device == Device::Cpu {
            return self;
        }
        Batch {
            images: self.images.to_device(device),
            classes: self.classes.to_device(device),
            boxes: self.boxes.to_device(device),
            valid: self.valid.to_device(device),
            masks: self.masks.map(|m| m.to_device(device)),
            indices: self.indices,
        }
    }
}

/// A decoded image with its objects (class id, box in its pixels) and, when masks are made, their
/// outlines in paint order (the same order as `objects`: later ones on top).
#[derive(Debug)]
struct Loaded {
    image: image::RgbImage,
    objects: Vec<(usize, BoxXyxy)>,
    segments: Vec<Segmentation>,
}

type Item = Arc<Loaded>;

/// Pixels of the input per mask cell (YOLOv9's prototypes are at stride 4).
pub const MASK_STRIDE: u32 = 4;

/// One letterboxed image placed on the augmentation canvas.
struct Tile {
    item: Item,
    placement: LetterboxParams,
    offset: [f32; 2],
}

/// Images that failed to load and were skipped (`--skip-bad`): dataset index → the reason.
pub type SkippedImages = Arc<Mutex<BTreeMap<usize, String>>>;

/// Batches of one source for a network input of `imgsz` pixels.
#[derive(Debug, Clone)]
pub struct Loader {
    source: Source,
    /// Decoded images kept in memory (`--cache`, and always for synthetic scenes, which are
    /// expensive to render); shared by clones of the loader.
    cache: Option<Arc<Vec<OnceLock<Item>>>>,
    /// Skip images that fail to load (warning, counted in [`Self::skipped`]) instead of failing.
    skip_bad: bool,
    skipped: SkippedImages,
    imgsz: u32,
    batch_size: usize,
    seed: u64,
    /// Probability of a horizontal flip (YOLOv9: 0.5).
    pub flip: f64,
    /// Random scale gain: the image is zoomed by a factor in `1 ± scale` (YOLOv9: 0.9).
    pub scale: f64,
    /// Random translation, as a fraction of the input size in each direction (YOLOv9: 0.1).
    pub translate: f64,
    /// HSV gains: hue, saturation, value (YOLOv9: 0.015, 0.7, 0.4).
    pub hsv: [f64; 3],
    /// Probability of a four-image mosaic (YOLOv9: 1.0; set to 0 for the last epochs, YOLOv9's
    /// `close_mosaic`).
    pub mosaic: f64,
    /// Worker threads for image loading.
    pub workers: usize,
    /// Make instance masks (segmentation models): every object needs an outline.
    pub masks: bool,
}

/// SplitMix64, for shuffles and flips that depend only on (seed, epoch, index).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unit(z: u64) -> f64 {
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl Loader {
    pub fn new(source: Source, imgsz: u32, batch_size: usize, seed: u64) -> Result<Self> {
        if source.is_empty() {
            return Err(Error::Data(
                "the training split has no images: check the data YAML's train: entry".into(),
            ));
        }
        if batch_size == 0 {
            return Err(Error::Data("batch size 0: give at least 1".into()));
        }
        if imgsz == 0 || !imgsz.is_multiple_of(32) {
            return Err(Error::Data(format!(
                "image size {imgsz} is not a positive multiple of 32 (the network's largest stride)"
            )));
        }
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cache = matches!(source, Source::Synthetic { .. })
            .then(|| Arc::new((0..source.len()).map(|_| OnceLock::new()).collect()));
        Ok(Self {
            source,
            cache,
            skip_bad: false,
            skipped: Arc::default(),
            imgsz,
            batch_size,
            seed,
            flip: 0.5,
            scale: 0.9,
            translate: 0.1,
            hsv: [0.015, 0.7, 0.4],
            mosaic: 1.0,
            workers,
            masks: false,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Keep decoded images in memory after their first use (about width × height × 3 bytes each).
    pub fn cache_images(&mut self) {
        if self.cache.is_none() {
            self.cache = Some(Arc::new(
                (0..self.source.len()).map(|_| OnceLock::new()).collect(),
            ));
        }
    }

    /// Skip images that fail to load (each reported once on stderr and recorded in
    /// [`Self::skipped`]); another image of the dataset takes the place of a bad one.
    pub fn skip_bad_images(&mut self) {
        self.skip_bad = true;
    }

    /// The images skipped so far, with the reasons.
    pub fn skipped(&self) -> BTreeMap<usize, String> {
        self.skipped.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.source.len().div_ceil(self.batch_size)
    }

    /// The image order of `epoch`: a Fisher–Yates shuffle seeded by (seed, epoch).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        let mut z = mix(self.seed ^ mix(epoch as u64));
        for i in (1..order.len()).rev() {
            z = mix(z);
            order.swap(i, (z % (i as u64 + 1)) as usize);
        }
        order
    }

    /// The batches `steps` ((epoch, batch index) pairs), built on a loader thread at most two
    /// ahead and handed to `consume` here, in order: augmentation is CPU work that overlaps the
    /// step consuming the previous batch. The first error, loading or consuming, stops both.
    pub fn for_each_batch<E: From<Error>>(
        &self,
        steps: impl Iterator<Item = (usize, usize)> + Send,
        mut consume: impl FnMut(Batch) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        std::thread::scope(|scope| {
            let (sender, batches) = std::sync::mpsc::sync_channel::<Result<Batch>>(2);
            scope.spawn(move || {
                for (epoch, b) in steps {
                    let batch = self.batch(epoch, b);
                    let failed = batch.is_err();
                    if sender.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            // Ends when the loader thread has sent every batch (or stopped at an error).
            for batch in batches {
                consume(batch?)?;
            }
            Ok(())
        })
    }

    /// Batch `b` of `epoch`, on the CPU (see [`Batch::to_device`]).
    pub fn batch(&self, epoch: usize, b: usize) -> Result<Batch> {
        let order = self.order(epoch);
        let start = b * self.batch_size;
        if start >= order.len() {
            return Err(Error::Data(format!("epoch has no batch {b}")));
        }
        let indices: Vec<usize> = order[start..(start + self.batch_size).min(order.len())].to_vec();
        let size = self.imgsz as usize;
        let plane = 3 * size * size;
        let n = indices.len();
        let mut pixels = vec![0f32; n * plane];
        let mut objects: Vec<Vec<(usize, BoxXyxy)>> = vec![Vec::new(); n];
        let cells = size / MASK_STRIDE as usize;
        // One mask plane per image when masks are made; a zero-length plane each otherwise.
        let mask_plane = if self.masks { cells * cells } else { 0 };
        let mut masks = vec![0f32; n * mask_plane];
        let workers = self.workers.clamp(1, n);
        let per = n.div_ceil(workers);
        // Each worker owns its images' mask planes (none when no masks are made).
        let mask_chunks: Vec<&mut [f32]> = if mask_plane == 0 {
            (0..n.div_ceil(per))
                .map(|_| <&mut [f32]>::default())
                .collect()
        } else {
            masks.chunks_mut(per * mask_plane).collect()
        };
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pixels
                .chunks_mut(per * plane)
                .zip(objects.chunks_mut(per))
                .zip(indices.chunks(per))
                .zip(mask_chunks)
                .map(|(((px, objs), idx), m)| {
                    scope.spawn(move || -> Result<()> {
                        let mut lb = Letterboxer::new();
                        for (k, ((out, obj), &i)) in px
                            .chunks_mut(plane)
                            .zip(objs.iter_mut())
                            .zip(idx)
                            .enumerate()
                        {
                            let mask = (mask_plane > 0)
                                .then(|| &mut m[k * mask_plane..(k + 1) * mask_plane]);
                            *obj = self.load_one(&mut lb, epoch, i, out, mask)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Data("an image loader thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        let most = objects.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut classes = vec![0i64; n * most];
        let mut boxes = vec![0f32; n * most * 4];
        let mut valid = vec![0f32; n * most];
        for (i, objs) in objects.iter().enumerate() {
            for (j, (c, bx)) in objs.iter().enumerate() {
                let k = i * most + j;
                classes[k] = *c as i64;
                boxes[k * 4..k * 4 + 4].copy_from_slice(&[bx.x1, bx.y1, bx.x2, bx.y2]);
                valid[k] = 1.0;
            }
        }
        let (n, m, s) = (n as i64, most as i64, size as i64);
        Ok(Batch {
            images: Tensor::from_slice(&pixels).view([n, 3, s, s]),
            classes: Tensor::from_slice(&classes).view([n, m]),
            boxes: Tensor::from_slice(&boxes).view([n, m, 4]),
            valid: Tensor::from_slice(&valid).view([n, m]),
            masks: self.masks.then(|| {
                let c = cells as i64;
                Tensor::from_slice(&masks).view([n, c, c])
            }),
            indices,
        })
    }

    /// Image `index`, or with `skip_bad` the first image from `index` on that loads.
    fn load_good(&self, index: usize) -> Result<Item> {
        let len = self.source.len();
        let mut last = None;
        for k in 0..len {
            let i = (index + k) % len;
            match self.load_cached(i) {
                Ok(item) => return Ok(item),
                Err(e) if self.skip_bad => {
                    let message = e.to_string();
                    if let Ok(mut skipped) = self.skipped.lock()
                        && !skipped.contains_key(&i)
                    {
                        eprintln!("warning: skipping a bad image: {message}");
                        skipped.insert(i, message);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Data(format!(
            "no image of the training split loads (the last error: {})",
            last.map_or_else(|| "none".to_string(), |e| e.to_string())
        )))
    }

    fn load_cached(&self, index: usize) -> Result<Item> {
        let Some(cache) = &self.cache else {
            return self.load_checked(index);
        };
        if let Some(item) = cache[index].get() {
            return Ok(item.clone());
        }
        let item = self.load_checked(index)?;
        Ok(cache[index].get_or_init(|| item).clone())
    }

    /// One image `index` with its objects, class ids checked; with masks, their outlines in
    /// paint order.
    fn load_checked(&self, index: usize) -> Result<Item> {
        let (image, objects, segments) = self.source.load_with_segments(index)?;
        let nc = self.source.num_classes();
        let mut kept = Vec::with_capacity(objects.len());
        for (k, (o, seg)) in objects.into_iter().zip(segments).enumerate() {
            if o.iscrowd {
                continue;
            }
            if o.class_id >= nc {
                return Err(Error::Data(format!(
                    "{}: class {} is out of range for {nc} classes",
                    self.source.describe(index),
                    o.class_id
                )));
            }
            if self.masks && seg.is_none() {
                return Err(Error::Data(format!(
                    "{}: object {} has a box but no outline; a segmentation model trains on \
                     YOLO-seg polygons or COCO segmentations (label every object with one)",
                    self.source.describe(index),
                    k + 1
                )));
            }
            kept.push(((o.class_id, o.bbox), seg));
        }
        if self.masks && !self.source.paint_order() {
            // Independent masks (COCO): larger objects first, so smaller ones stay visible.
            kept.sort_by(|a, b| b.0.1.area().total_cmp(&a.0.1.area()));
        }
        let (objects, segments): (Vec<_>, Vec<_>) = kept.into_iter().unzip();
        let segments = if self.masks {
            segments.into_iter().flatten().collect()
        } else {
            Vec::new()
        };
        Ok(Arc::new(Loaded {
            image,
            objects,
            segments,
        }))
    }

    /// Image `index` for the network, augmented, into `out` (NCHW planes), with its objects in
    /// input pixels. With probability `mosaic` it is YOLOv9's mosaic: four images (this one and
    /// three drawn from the dataset) letterboxed into the quadrants around a random centre of a
    /// canvas twice the input size, which the random zoom and shift then crop to the input.
    /// With `mask` (a `(H/4)·(W/4)` plane), the kept objects' labels go there.
    fn load_one(
        &self,
        lb: &mut Letterboxer,
        epoch: usize,
        index: usize,
        out: &mut [f32],
        mask: Option<&mut [f32]>,
    ) -> Result<Vec<(usize, BoxXyxy)>> {
        let size = self.imgsz as f32;
        let n = self.imgsz as usize;
        // Every random choice of this image in this epoch derives from one seed.
        let mut z = mix(self.seed ^ mix(epoch as u64 ^ mix(index as u64)));
        let mut uniform = || {
            z = mix(z);
            unit(z)
        };
        let flip = uniform() < self.flip;
        let zoom = 1.0 + self.scale * (2.0 * uniform() - 1.0);
        let shift = [
            self.translate * (2.0 * uniform() - 1.0) * size as f64,
            self.translate * (2.0 * uniform() - 1.0) * size as f64,
        ];
        let gains = [
            1.0 + self.hsv[0] * (2.0 * uniform() - 1.0),
            1.0 + self.hsv[1] * (2.0 * uniform() - 1.0),
            1.0 + self.hsv[2] * (2.0 * uniform() - 1.0),
        ];
        let use_mosaic = uniform() < self.mosaic;

        // The source canvas (side `canvas`), its tiles, and the objects in its pixels with their
        // tile and index there.
        let mut tiles: Vec<Tile> = Vec::with_capacity(4);
        let (canvas, pixels, objects) = if use_mosaic {
            let side = 2 * n;
            let fill = kestrel_runtime::letterbox::FILL as f32 / 255.0;
            let mut pixels = vec![fill; 3 * side * side];
            let mut tile = vec![0f32; 3 * n * n];
            let centre = [(0.5 + uniform()) * n as f64, (0.5 + uniform()) * n as f64];
            let (cx, cy) = (centre[0] as i64, centre[1] as i64);
            let mut objects = Vec::new();
            for k in 0..4 {
                let pick = if k == 0 {
                    index
                } else {
                    ((uniform() * self.source.len() as f64) as usize).min(self.source.len() - 1)
                };
                let item = self.load_good(pick)?;
                let (img, objs) = (&item.image, &item.objects);
                let p = lb
                    .run(img, self.imgsz, self.imgsz, &mut tile)
                    .map_err(Error::Runtime)?;
                let (ox, oy) = match k {
                    0 => (cx - n as i64, cy - n as i64),
                    1 => (cx, cy - n as i64),
                    2 => (cx - n as i64, cy),
                    _ => (cx, cy),
                };
                paste(&tile, n, &mut pixels, side, ox, oy);
                let t = tiles.len();
                objects.extend(objs.iter().enumerate().map(|(j, &(c, b))| {
                    let b = p.to_input(b);
                    let (dx, dy) = (ox as f32, oy as f32);
                    let b = BoxXyxy {
                        x1: b.x1 + dx,
                        y1: b.y1 + dy,
                        x2: b.x2 + dx,
                        y2: b.y2 + dy,
                    };
                    (c, b.clip(side as f32, side as f32), t, j)
                }));
                tiles.push(Tile {
                    item: item.clone(),
                    placement: p,
                    offset: [ox as f32, oy as f32],
                });
            }
            (side, pixels, objects)
        } else {
            let item = self.load_good(index)?;
            let (img, objs) = (&item.image, &item.objects);
            let p = lb
                .run(img, self.imgsz, self.imgsz, out)
                .map_err(Error::Runtime)?;
            let objects = objs
                .iter()
                .enumerate()
                .map(|(j, &(c, b))| (c, p.to_input(b), 0, j))
                .collect();
            tiles.push(Tile {
                item: item.clone(),
                placement: p,
                offset: [0.0, 0.0],
            });
            (n, out.to_vec(), objects)
        };
        let geometry = Affine {
            zoom: zoom.max(0.05) as f32,
            shift: [shift[0] as f32, shift[1] as f32],
            src_centre: canvas as f32 / 2.0,
            dst_centre: size / 2.0,
        };
        if use_mosaic || self.scale > 0.0 || self.translate > 0.0 {
            geometry.warp(&pixels, canvas, out, n);
        }
        if self.hsv.iter().any(|&g| g > 0.0) {
            jitter_hsv(out, gains);
        }
        if flip {
            for row in out.chunks_mut(n) {
                row.reverse();
            }
        }
        let kept: Vec<(usize, BoxXyxy, usize, usize)> = objects
            .into_iter()
            .filter_map(|(c, original, tile, j)| {
                let b = geometry.apply(original).clip(size, size);
                let (w, h) = (b.x2 - b.x1, b.y2 - b.y1);
                let (w0, h0) = (
                    (original.x2 - original.x1) * geometry.zoom,
                    (original.y2 - original.y1) * geometry.zoom,
                );
                // YOLOv9's box_candidates: over 2 px a side, over 10 % of the (scaled) box still
                // in the image, aspect ratio under 100.
                let keep =
                    w > 2.0 && h > 2.0 && w * h > 0.1 * w0 * h0 && (w / h).max(h / w) < 100.0;
                let b = if flip {
                    BoxXyxy {
                        x1: size - b.x2,
                        y1: b.y1,
                        x2: size - b.x1,
                        y2: b.y2,
                    }
                } else {
                    b
                };
                keep.then_some((c, b, tile, j))
            })
            .collect();
        if let Some(mask) = mask {
            let cells = n / MASK_STRIDE as usize;
            paint_masks(
                &tiles,
                &kept,
                &geometry,
                flip,
                canvas as f32,
                n as f32,
                cells,
                mask,
            )?;
        }
        Ok(kept.into_iter().map(|(c, b, _, _)| (c, b)).collect())
    }
}

/// The label plane of one augmented image: each mask cell's centre is mapped back through the
/// flip, the zoom and shift, the mosaic and the letterbox to a source pixel, whose object (by
/// paint order) gives the label: k + 1 for `kept[k]`, 0 for background and dropped objects.
/// `canvas` is the side of the canvas the tiles were pasted on (clipped there), `size` the
/// input's.
#[allow(clippy::too_many_arguments)]
fn paint_masks(
    tiles: &[Tile],
    kept: &[(usize, BoxXyxy, usize, usize)],
    geometry: &Affine,
    flip: bool,
    canvas: f32,
    size: f32,
    cells: usize,
    mask: &mut [f32],
) -> Result<()> {
    // Per tile: its source image's painted outlines (value j + 1 for object j) and the label of
    // each object.
    let mut painted: Vec<Vec<u16>> = Vec::with_capacity(tiles.len());
    let mut labels: Vec<Vec<f32>> = Vec::with_capacity(tiles.len());
    for t in tiles {
        let (w, h) = (
            t.item.image.width() as usize,
            t.item.image.height() as usize,
        );
        let mut map = vec![0u16; w * h];
        if t.item.segments.len() >= usize::from(u16::MAX) {
            return Err(Error::Data(format!(
                "an image with {} objects: at most {} can be masked",
                t.item.segments.len(),
                u16::MAX - 1
            )));
        }
        for (j, seg) in t.item.segments.iter().enumerate() {
            seg.paint(&mut map, w, h, (j + 1) as u16)
                .map_err(Error::Runtime)?;
        }
        painted.push(map);
        labels.push(vec![0.0; t.item.segments.len() + 1]);
    }
    for (k, &(_, _, tile, j)) in kept.iter().enumerate() {
        labels[tile][j + 1] = (k + 1) as f32;
    }
    let stride = size / cells as f32;
    let inv = 1.0 / geometry.zoom;
    for v in 0..cells {
        let y = (v as f32 + 0.5) * stride;
        let cy = (y - geometry.dst_centre - geometry.shift[1]) * inv + geometry.src_centre;
        for u in 0..cells {
            let x = (u as f32 + 0.5) * stride;
            let x = if flip { size - x } else { x };
            let cx = (x - geometry.dst_centre - geometry.shift[0]) * inv + geometry.src_centre;
            // Outside the canvas `paste` left the fill; else the last pasted tile wins.
            let on_canvas = cx >= 0.0 && cy >= 0.0 && cx < canvas && cy < canvas;
            let found = tiles
                .iter()
                .enumerate()
                .rev()
                .filter(|_| on_canvas)
                .find_map(|(t, tile)| {
                    let (tx, ty) = (cx - tile.offset[0], cy - tile.offset[1]);
                    (tx >= 0.0 && ty >= 0.0 && tx < size && ty < size).then_some((t, tx, ty))
                });
            let label = found.map_or(0.0, |(t, tx, ty)| {
                let p = &tiles[t].placement;
                let sx = (tx - p.left as f32) / p.scale_x();
                let sy = (ty - p.top as f32) / p.scale_y();
                let (w, h) = (p.src_w as f32, p.src_h as f32);
                if sx < 0.0 || sy < 0.0 || sx >= w || sy >= h {
                    return 0.0;
                }
                let at = sy as usize * p.src_w as usize + sx as usize;
                labels[t][usize::from(painted[t][at])]
            });
            mask[v * cells + u] = label;
        }
    }
    Ok(())
}

/// Copy NCHW planes of a `n`×`n` tile into a `side`×`side` canvas at (`ox`, `oy`), clipped.
fn paste(tile: &[f32], n: usize, canvas: &mut [f32], side: usize, ox: i64, oy: i64) {
    for c in 0..3 {
        for y in 0..n as i64 {
            let cy = oy + y;
            if cy < 0 || cy >= side as i64 {
                continue;
            }
            let x0 = ox.max(0);
            let x1 = (ox + n as i64).min(side as i64);
            if x1 <= x0 {
                continue;
            }
            let src = c * n * n + y as usize * n + (x0 - ox) as usize;
            let dst = c * side * side + cy as usize * side + x0 as usize;
            let len = (x1 - x0) as usize;
            canvas[dst..dst + len].copy_from_slice(&tile[src..src + len]);
        }
    }
}

/// Zoom about the source centre, then shift (input pixels):
/// `x' = (x − src_centre)·zoom + dst_centre + shift`.
#[derive(Debug, Clone, Copy)]
struct Affine {
    zoom: f32,
    shift: [f32; 2],
    src_centre: f32,
    dst_centre: f32,
}

impl Affine {
    fn apply(&self, b: BoxXyxy) -> BoxXyxy {
        let f =
            |v: f32, k: usize| (v - self.src_centre) * self.zoom + self.dst_centre + self.shift[k];
        BoxXyxy {
            x1: f(b.x1, 0),
            y1: f(b.y1, 1),
            x2: f(b.x2, 0),
            y2: f(b.y2, 1),
        }
    }

    /// Resample the NCHW planes of a `src_size`² image through the transform into a `dst_size`²
    /// one (bilinear), filling what comes from outside with the letterbox grey.
    fn warp(&self, src: &[f32], src_size: usize, dst: &mut [f32], dst_size: usize) {
        let fill = kestrel_runtime::letterbox::FILL as f32 / 255.0;
        let inv = 1.0 / self.zoom;
        let to_src = |v: usize, k: usize| {
            (v as f32 + 0.5 - self.dst_centre - self.shift[k]) * inv + self.src_centre - 0.5
        };
        for y in 0..dst_size {
            let sy = to_src(y, 1);
            for x in 0..dst_size {
                let sx = to_src(x, 0);
                let limit = src_size as f32;
                let inside = sx > -1.0 && sy > -1.0 && sx < limit && sy < limit;
                for c in 0..3 {
                    let plane = &src[c * src_size * src_size..(c + 1) * src_size * src_size];
                    dst[c * dst_size * dst_size + y * dst_size + x] = if inside {
                        bilinear(plane, src_size, sx, sy, fill)
                    } else {
                        fill
                    };
                }
            }
        }
    }
}

fn bilinear(plane: &[f32], size: usize, x: f32, y: f32, fill: f32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: f32, yi: f32| {
        if xi < 0.0 || yi < 0.0 || xi >= size as f32 || yi >= size as f32 {
            fill
        } else {
            plane[yi as usize * size + xi as usize]
        }
    };
    let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1.0, y0) * fx;
    let bottom = at(x0, y0 + 1.0) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// YOLOv9's `augment_hsv` on RGB planes in [0, 1]: hue multiplied by `gains[0]` (wrapping),
/// saturation and value by `gains[1]` and `gains[2]` (clipped).
fn jitter_hsv(planes: &mut [f32], gains: [f64; 3]) {
    let n = planes.len() / 3;
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for i in 0..n {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let h = (h * gains[0] as f32).rem_euclid(360.0);
        let s = (s * gains[1] as f32).clamp(0.0, 1.0);
        let v = (v * gains[2] as f32).clamp(0.0, 1.0);
        let (rr, gg, bb) = hsv_to_rgb(h, s, v);
        (r[i], g[i], b[i]) = (rr, gg, bb);
    }
}

/// Hue in degrees, saturation and value in [0, 1].
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d <= 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    let s = if max <= 0.0 { 0.0 } else { d / max };
    (h, s, max)
}

/// Most scenes in the validation split of synthetic data.
pub const SYNTHETIC_VAL_MAX: usize = 500;

/// Load a split of a YOLO data YAML, or synthetic scenes for `synthetic[:SEED[:COUNT]]` (the
/// validation split of synthetic data is another seed: `SEED + 1_000_003`, a quarter as many,
/// at most [`SYNTHETIC_VAL_MAX`]).
///
/// With `skipped`, images of a dataset that cannot be used (missing, corrupt, bad label lines)
/// are left out and their errors pushed there; without it the first one fails.
pub fn open_source(
    data: &str,
    imgsz: u32,
    split: Split,
    skipped: Option<&mut Vec<kestrel_runtime::Error>>,
) -> Result<Source> {
    if let Some(rest) = data.strip_prefix("synthetic") {
        let parts: Vec<&str> = rest.trim_start_matches(':').split(':').collect();
        let num = |i: usize, default: u64| -> Result<u64> {
            match parts.get(i).filter(|s| !s.is_empty()) {
                None => Ok(default),
                Some(s) => s.parse().map_err(|_| {
                    Error::Data(format!(
                        "'{data}': expected synthetic[:SEED[:COUNT]] with numbers, got '{s}'"
                    ))
                }),
            }
        };
        let (seed, count) = (num(0, 0)?, num(1, 256)? as usize);
        return Ok(match split {
            Split::Train => Source::Synthetic {
                seed,
                count,
                size: imgsz,
            },
            Split::Val => Source::Synthetic {
                seed: seed.wrapping_add(1_000_003),
                count: count.div_ceil(4).min(SYNTHETIC_VAL_MAX),
                size: imgsz,
            },
        });
    }
    let d = match skipped {
        Some(skipped) => Dataset::from_yolo_yaml_skipping_bad(Path::new(data), split, skipped),
        None => Dataset::from_yolo_yaml(Path::new(data), split),
    }
    .map_err(Error::Runtime)?;
    Ok(Source::Dataset(d))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trips_and_gains_of_one_change_nothing() {
        let mut planes = vec![0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.4, 0.7, 0.6, 0.5, 0.5, 0.5];
        let before = planes.clone();
        jitter_hsv(&mut planes, [1.0, 1.0, 1.0]);
        for (a, b) in planes.iter().zip(&before) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Value gain 0.5 halves every channel; grey stays grey under hue and saturation gains.
        let mut grey = vec![0.5, 0.5, 0.5];
        jitter_hsv(&mut grey, [1.3, 1.7, 0.5]);
        assert_eq!(grey, vec![0.25, 0.25, 0.25]);
    }

    #[test]
    fn the_warp_moves_pixels_where_the_boxes_go() {
        // A white 8x8 square at (20..28, 12..20) in a 64x64 grey image.
        let size = 64;
        let mut planes = vec![0.45f32; 3 * size * size];
        for c in 0..3 {
            for y in 12..20 {
                for x in 20..28 {
                    planes[c * size * size + y * size + x] = 1.0;
                }
            }
        }
        let t = Affine {
            zoom: 1.5,
            shift: [5.0, -3.0],
            src_centre: 32.0,
            dst_centre: 32.0,
        };
        let src = planes.clone();
        t.warp(&src, size, &mut planes, size);
        let b = t.apply(BoxXyxy {
            x1: 20.0,
            y1: 12.0,
            x2: 28.0,
            y2: 20.0,
        });
        // x' = (x - 32)·1.5 + 32 + 5, y' = (y - 32)·1.5 + 32 - 3.
        assert_eq!((b.x1, b.x2), (19.0, 31.0));
        assert_eq!((b.y1, b.y2), (-1.0, 11.0));
        let at = |x: usize, y: usize| planes[y * size + x];
        // Inside the moved box (away from its edges): white; just outside: grey.
        assert!(at(25, 5) > 0.99 && at(21, 2) > 0.99 && at(29, 9) > 0.99);
        assert!((at(25, 14) - 0.45).abs() < 1e-5 && (at(16, 5) - 0.45).abs() < 1e-5);
    }
}
