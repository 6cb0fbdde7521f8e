//! Training batches: images letterboxed to the network size (as inference does), boxes mapped
//! with them, a deterministic shuffle per epoch, and horizontal flips. Images load on several
//! threads. Sources: a dataset the runtime reads (YOLO txt or COCO json) or Kestrel's
//! synthetic scenes rendered on the fly.

use std::path::Path;

use kestrel_runtime::BoxXyxy;
use kestrel_runtime::dataset::{Dataset, Split, load_rgb};
use kestrel_runtime::letterbox::Letterboxer;
use kestrel_runtime::synth::{image_seed, render_scene};
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

    /// Image `index` as RGB with its objects (class id, box in its pixels).
    fn load(&self, index: usize) -> Result<(image::RgbImage, Vec<(usize, BoxXyxy)>)> {
        match self {
            Source::Dataset(d) => {
                let s = &d.samples[index];
                let img = load_rgb(&s.image).map_err(Error::Runtime)?;
                let objects = s
                    .objects
                    .iter()
                    .filter(|o| !o.iscrowd)
                    .map(|o| (o.class_id, o.bbox))
                    .collect();
                Ok((img, objects))
            }
            Source::Synthetic { seed, size, .. } => {
                let (img, objects) = render_scene(image_seed(*seed, index), *size, *size);
                Ok((
                    img,
                    objects.into_iter().map(|o| (o.class_id, o.bbox)).collect(),
                ))
            }
        }
    }
}

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
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
}

/// Batches of one source for a network input of `imgsz` pixels.
#[derive(Debug, Clone)]
pub struct Loader {
    source: Source,
    imgsz: u32,
    batch_size: usize,
    seed: u64,
    /// Probability of a horizontal flip (YOLOv9: 0.5).
    pub flip: f64,
    /// Worker threads for image loading.
    pub workers: usize,
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
        Ok(Self {
            source,
            imgsz,
            batch_size,
            seed,
            flip: 0.5,
            workers,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
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

    /// Batch `b` of `epoch`, on `device`.
    pub fn batch(&self, epoch: usize, b: usize, device: Device) -> Result<Batch> {
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
        let workers = self.workers.clamp(1, n);
        let per = n.div_ceil(workers);
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pixels
                .chunks_mut(per * plane)
                .zip(objects.chunks_mut(per))
                .zip(indices.chunks(per))
                .map(|((px, objs), idx)| {
                    scope.spawn(move || -> Result<()> {
                        let mut lb = Letterboxer::new();
                        for ((out, obj), &i) in px.chunks_mut(plane).zip(objs.iter_mut()).zip(idx) {
                            *obj = self.load_one(&mut lb, epoch, i, out)?;
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
            images: Tensor::from_slice(&pixels)
                .view([n, 3, s, s])
                .to_device(device),
            classes: Tensor::from_slice(&classes).view([n, m]).to_device(device),
            boxes: Tensor::from_slice(&boxes).view([n, m, 4]).to_device(device),
            valid: Tensor::from_slice(&valid).view([n, m]).to_device(device),
            indices,
        })
    }

    /// Load image `index`, letterbox it into `out` (NCHW planes), flip it when its coin says so,
    /// and return its objects in input pixels (degenerate boxes dropped).
    fn load_one(
        &self,
        lb: &mut Letterboxer,
        epoch: usize,
        index: usize,
        out: &mut [f32],
    ) -> Result<Vec<(usize, BoxXyxy)>> {
        let (img, objects) = self.source.load(index)?;
        let nc = self.source.num_classes();
        if let Some((c, _)) = objects.iter().find(|(c, _)| *c >= nc) {
            return Err(Error::Data(format!(
                "image {index}: class {c} is out of range for {nc} classes"
            )));
        }
        let p = lb
            .run(&img, self.imgsz, self.imgsz, out)
            .map_err(Error::Runtime)?;
        let size = self.imgsz as f32;
        let flip = unit(mix(self.seed ^ mix(epoch as u64 ^ mix(index as u64)))) < self.flip;
        if flip {
            let s = self.imgsz as usize;
            for row in out.chunks_mut(s) {
                row.reverse();
            }
        }
        Ok(objects
            .into_iter()
            .map(|(c, b)| {
                let b = p.to_input(b);
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
                (c, b)
            })
            .filter(|(_, b)| b.x2 - b.x1 > 1.0 && b.y2 - b.y1 > 1.0)
            .collect())
    }
}

/// Load a split of a YOLO data YAML, or synthetic scenes for `synthetic[:SEED[:COUNT]]` (the
/// validation split of synthetic data is another seed: `SEED + 1_000_003`, a quarter as many).
pub fn open_source(data: &str, imgsz: u32, split: Split) -> Result<Source> {
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
                count: count.div_ceil(4),
                size: imgsz,
            },
        });
    }
    let d = Dataset::from_yolo_yaml(Path::new(data), split).map_err(Error::Runtime)?;
    Ok(Source::Dataset(d))
}
