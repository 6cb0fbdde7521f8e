//! Datasets as YOLO tools know them: a data YAML pointing at image folders with YOLO txt labels, or a
//! COCO instances json. Both load into the same [`Dataset`] of images with their ground truth in pixels.
//!
//! Instance masks come with the boxes where the labels have them: YOLO-seg polygon lines, COCO
//! `segmentation` polygons or RLEs ([`Sample::segments`]). How objects of one image overlap
//! differs by format ([`MaskOverlap`]): in a YOLO-seg label file later lines lie on top (a pixel
//! belongs to the last object whose polygon covers it, as the synthetic scenes are painted); in a
//! COCO json every annotation's mask stands alone, as pycocotools reads it.
//! [`Sample::instance_masks`] applies the rule.
//!
//! Only image headers are read while loading (for the sizes); pixels are decoded later, one image at
//! a time, with [`load_rgb`].

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::detection::{BoxXyxy, GroundTruth};
use crate::error::{Error, Result};
use crate::masks::Rle;
use crate::segments::{Segmentation, paint_order_masks};

/// Largest image (width × height, pixels) [`load_rgb`] decodes. Larger files are refused from their
/// header alone, so a small compressed "decompression bomb" cannot make us allocate gigabytes.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;

/// File extensions (lower case) taken as images when a folder is listed.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

/// How far (in normalized units) a YOLO label coordinate may lie outside [0, 1]: label tools that
/// round or convert from floats produce values like 1.0000002, which are clipped, not refused.
pub const COORD_TOLERANCE: f64 = 1e-3;

/// Deepest folder nesting followed when listing images (guards against symlink loops).
const MAX_DIR_DEPTH: usize = 32;

/// Which list of images of a data YAML to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// The data YAML key of the split (`train` or `val`).
    pub fn key(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// One image and its labelled objects.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Path of the image file.
    pub image: PathBuf,
    /// COCO image id; for YOLO datasets the 1-based position in the sorted image list.
    pub image_id: u64,
    /// Image width in pixels (from the file header).
    pub width: u32,
    /// Image height in pixels (from the file header).
    pub height: u32,
    /// Objects with boxes in this image's pixels; `area` is the box area for YOLO labels and COCO's
    /// `area` (mask area) for COCO json.
    pub objects: Vec<GroundTruth>,
    /// The shape of each object of `objects` (same order), in this image's pixels: the polygon of
    /// a YOLO-seg label line, the `segmentation` of a COCO annotation; `None` for an object with
    /// only a box.
    pub segments: Vec<Option<Segmentation>>,
}

/// How the instance masks of one image's objects relate where their shapes overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskOverlap {
    /// Later objects lie on top: a pixel belongs to the last object (in label order) whose shape
    /// covers it, so masks never overlap. YOLO-seg txt labels and the synthetic scenes.
    PaintOrder,
    /// Every object's mask is its whole shape, whatever else covers it (pycocotools' reading of a
    /// COCO json).
    Independent,
}

impl Sample {
    /// Whether every object has a segmentation (true for an image without objects).
    pub fn has_masks(&self) -> bool {
        self.segments.len() == self.objects.len() && self.segments.iter().all(Option::is_some)
    }

    /// The instance mask of each object, in order, as COCO RLEs of this image's size
    /// (`width` × `height` pixels), objects overlapping as `overlap` says (use the dataset's
    /// [`Dataset::mask_overlap`]). `None` when some object has no segmentation. An error when a
    /// segmentation cannot be rasterised (an RLE of another size, more than 65535 objects in
    /// paint order).
    pub fn instance_masks(&self, overlap: MaskOverlap) -> Result<Option<Vec<Rle>>> {
        if !self.has_masks() {
            return Ok(None);
        }
        let segments: Vec<&Segmentation> = self.segments.iter().flatten().collect();
        let (w, h) = (self.width as usize, self.height as usize);
        let masks = match overlap {
            MaskOverlap::PaintOrder => paint_order_masks(&segments, w, h),
            MaskOverlap::Independent => segments.iter().map(|s| s.to_rle(w, h)).collect(),
        };
        masks.map(Some).map_err(|e| Error::Dataset {
            path: self.image.clone(),
            line: None,
            message: format!("the instance masks of this image: {e}"),
        })
    }
}

/// A list of images with ground truth and the class names.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Class names; a class id is an index into this list.
    pub names: Vec<String>,
    /// The original category id of each class (`category_ids[class_id]`): COCO's ids (sorted) for a
    /// COCO json, `0..nc` for YOLO datasets. Predictions are written back with these.
    pub category_ids: Vec<u64>,
    /// Images sorted by path (YOLO) or by image id (COCO), so runs are reproducible.
    pub samples: Vec<Sample>,
    /// How the objects' masks overlap: [`MaskOverlap::PaintOrder`] for YOLO datasets,
    /// [`MaskOverlap::Independent`] for COCO json.
    pub mask_overlap: MaskOverlap,
}

impl Dataset {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.names.len()
    }

    /// Total number of labelled objects (crowd regions included).
    pub fn num_objects(&self) -> usize {
        self.samples.iter().map(|s| s.objects.len()).sum()
    }

    /// Whether mask metrics can be computed: every object of every image has a segmentation,
    /// and there is at least one object.
    pub fn has_masks(&self) -> bool {
        self.num_objects() > 0 && self.samples.iter().all(Sample::has_masks)
    }

    /// Objects without a segmentation (box-only labels), over all images.
    pub fn objects_without_masks(&self) -> usize {
        self.samples
            .iter()
            .map(|s| {
                let with = s.segments.iter().filter(|g| g.is_some()).count();
                s.objects.len().saturating_sub(with)
            })
            .sum()
    }

    /// Load one split of a YOLO data YAML.
    ///
    /// The YAML's `path:` (optional) is the dataset root, relative to the YAML's folder when relative;
    /// `train:`/`val:` are relative to the root and each is a folder of images (searched recursively),
    /// a `.txt` file listing image paths (relative to the txt's folder), a single image, or a list of
    /// these. `names:` is a list or a map `{0: name, ...}`; `nc:`, when present, must agree with it.
    /// Labels follow YOLO's convention: `.../images/<sub>/x.png` → `.../labels/<sub>/x.txt`; a missing
    /// label file means an image without objects.
    pub fn from_yolo_yaml(data_yaml: &Path, split: Split) -> Result<Dataset> {
        Self::read_yolo_yaml(data_yaml, split, None)
    }

    /// [`Self::from_yolo_yaml`], but an image that cannot be used (listed but missing, unreadable
    /// or corrupt header, a label file with a bad line) is left out and its error pushed to
    /// `skipped` instead of failing the whole split. Errors in the YAML itself, and a split left
    /// without images, still fail.
    pub fn from_yolo_yaml_skipping_bad(
        data_yaml: &Path,
        split: Split,
        skipped: &mut Vec<Error>,
    ) -> Result<Dataset> {
        Self::read_yolo_yaml(data_yaml, split, Some(skipped))
    }

    fn read_yolo_yaml(
        data_yaml: &Path,
        split: Split,
        mut skipped: Option<&mut Vec<Error>>,
    ) -> Result<Dataset> {
        let text = std::fs::read_to_string(data_yaml).map_err(|e| Error::io(data_yaml, e))?;
        let yaml_err = |line: Option<usize>, message: String| Error::Dataset {
            path: data_yaml.to_path_buf(),
            line,
            message,
        };
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| {
            yaml_err(
                e.location().map(|l| l.line()),
                format!("not valid YAML: {e}"),
            )
        })?;
        let map = doc.as_mapping().ok_or_else(|| {
            yaml_err(
                None,
                "expected a mapping with `train:`, `val:` and `names:`".into(),
            )
        })?;
        let get = |key: &str| map.get(serde_yaml::Value::String(key.into()));

        let names = parse_names(get("names"), get("nc"), &text, &yaml_err)?;

        let yaml_dir = data_yaml.parent().unwrap_or(Path::new("."));
        let root = match get("path") {
            None | Some(serde_yaml::Value::Null) => yaml_dir.to_path_buf(),
            Some(serde_yaml::Value::String(p)) => {
                let p = Path::new(p);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    // Without `.` components, so messages name files as users write them.
                    yaml_dir.join(p).components().collect()
                }
            }
            Some(_) => {
                return Err(yaml_err(
                    key_line(&text, "path"),
                    "`path:` must be a folder name".into(),
                ));
            }
        };

        let key = split.key();
        let entries: Vec<String> = match get(key) {
            None | Some(serde_yaml::Value::Null) => {
                return Err(yaml_err(
                    None,
                    format!("no `{key}:` entry; add `{key}: images/{key}` (a folder of images)"),
                ));
            }
            Some(serde_yaml::Value::String(s)) => vec![s.clone()],
            Some(serde_yaml::Value::Sequence(seq)) => seq
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        yaml_err(
                            key_line(&text, key),
                            format!("`{key}:` entries must be paths (strings)"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(yaml_err(
                    key_line(&text, key),
                    format!("`{key}:` must be a path or a list of paths"),
                ));
            }
        };

        let mut images = Vec::new();
        for entry in &entries {
            let p = root.join(entry);
            collect_images(
                &p,
                data_yaml,
                key_line(&text, key),
                &mut images,
                skipped.as_deref_mut(),
            )?;
        }
        images.sort();
        images.dedup();
        if images.is_empty() {
            return Err(yaml_err(
                key_line(&text, key),
                format!(
                    "no images found in {} (looked for .{} files)",
                    entries
                        .iter()
                        .map(|e| root.join(e).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    IMAGE_EXTENSIONS.join(" .")
                ),
            ));
        }

        let mut samples = Vec::with_capacity(images.len());
        for image in images {
            let sample = (|| {
                let (width, height) = image_size(&image)?;
                let label = label_path_for(&image);
                let (objects, segments) = match std::fs::read_to_string(&label) {
                    Ok(text) => {
                        parse_yolo_labels_with_segments(&text, &label, width, height, names.len())?
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), Vec::new()),
                    Err(e) => return Err(Error::io(&label, e)),
                };
                Ok(Sample {
                    image_id: samples.len() as u64 + 1,
                    image: image.clone(),
                    width,
                    height,
                    objects,
                    segments,
                })
            })();
            match (sample, skipped.as_deref_mut()) {
                (Ok(s), _) => samples.push(s),
                (Err(e), Some(skipped)) => skipped.push(e),
                (Err(e), None) => return Err(e),
            }
        }
        if samples.is_empty() {
            return Err(yaml_err(
                key_line(&text, key),
                format!("every image of the `{key}:` split is bad (see the warnings)"),
            ));
        }
        let category_ids = (0..names.len() as u64).collect();
        Ok(Dataset {
            names,
            category_ids,
            samples,
            mask_overlap: MaskOverlap::PaintOrder,
        })
    }

    /// Load a COCO instances json (`images`, `annotations` with `bbox` `[x, y, w, h]` in pixels from
    /// the top-left corner, `categories`); image files are `images_dir/<file_name>`. Class ids are the
    /// positions of the categories sorted by id; [`Dataset::category_ids`] maps them back. Image sizes
    /// come from the json; the image files are not opened.
    ///
    /// An annotation's `segmentation`, when present, becomes its [`Sample::segments`] entry: a list
    /// of polygons (each a flat `[x1, y1, x2, y2, ...]` of at least 6 numbers, pixels) or an RLE
    /// `{"size": [height, width], "counts": [...] | "..."}` (uncompressed runs or pycocotools'
    /// compressed string) of the image's size. An empty list or `null` means box only. Masks of
    /// a COCO json overlap independently ([`MaskOverlap::Independent`]).
    pub fn from_coco_json(json: &Path, images_dir: &Path) -> Result<Dataset> {
        let text = std::fs::read_to_string(json).map_err(|e| Error::io(json, e))?;
        Self::from_coco_json_text(&text, json, images_dir)
    }

    /// [`Dataset::from_coco_json`] on the json's text, already read; `json` names it in errors.
    pub fn from_coco_json_text(text: &str, json: &Path, images_dir: &Path) -> Result<Dataset> {
        let err = |message: String| Error::Dataset {
            path: json.to_path_buf(),
            line: None,
            message,
        };
        let coco: CocoFile = serde_json::from_str(text).map_err(|e| Error::Dataset {
            path: json.to_path_buf(),
            line: Some(e.line()),
            message: format!(
                "not a COCO instances json ({e}); it needs `images`, `annotations` and `categories`"
            ),
        })?;

        let mut cats = coco.categories;
        cats.sort_by_key(|c| c.id);
        if let Some(w) = cats.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(err(format!("category id {} appears twice", w[0].id)));
        }
        if cats.is_empty() {
            return Err(err(
                "`categories` is empty; the json must list its classes".into()
            ));
        }
        let class_of: HashMap<u64, usize> =
            cats.iter().enumerate().map(|(i, c)| (c.id, i)).collect();

        let mut images = coco.images;
        images.sort_by_key(|im| im.id);
        if let Some(w) = images.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(err(format!("image id {} appears twice", w[0].id)));
        }
        let index_of: HashMap<u64, usize> = images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.id, i))
            .collect();
        let mut samples: Vec<Sample> = images
            .iter()
            .map(|im| Sample {
                image: images_dir.join(&im.file_name),
                image_id: im.id,
                width: im.width,
                height: im.height,
                objects: Vec::new(),
                segments: Vec::new(),
            })
            .collect();

        for (n, ann) in coco.annotations.iter().enumerate() {
            let what = || match ann.id {
                Some(id) => format!("annotation id {id} (entry {} of `annotations`)", n + 1),
                None => format!("entry {} of `annotations`", n + 1),
            };
            let &i = index_of.get(&ann.image_id).ok_or_else(|| {
                err(format!(
                    "{} refers to image id {}, which `images` does not list",
                    what(),
                    ann.image_id
                ))
            })?;
            let &class_id = class_of.get(&ann.category_id).ok_or_else(|| {
                err(format!(
                    "{} has category id {}, which `categories` does not list",
                    what(),
                    ann.category_id
                ))
            })?;
            let [x, y, w, h] = ann.bbox;
            if ![x, y, w, h].iter().all(|v| v.is_finite()) || w < 0.0 || h < 0.0 {
                return Err(err(format!(
                    "{} has bbox {:?}; COCO boxes are [x, y, width, height] with width, height >= 0",
                    what(),
                    ann.bbox
                )));
            }
            let bbox = BoxXyxy::new(x as f32, y as f32, (x + w) as f32, (y + h) as f32);
            let segment = match &ann.segmentation {
                None => None,
                Some(v) => parse_coco_segmentation(v, samples[i].width, samples[i].height)
                    .map_err(|m| err(format!("{}: {m}", what())))?,
            };
            samples[i].segments.push(segment);
            samples[i].objects.push(GroundTruth {
                bbox,
                class_id,
                area: ann.area.unwrap_or(w * h) as f32,
                iscrowd: ann.iscrowd.0,
            });
        }

        Ok(Dataset {
            names: cats.iter().map(|c| c.name.clone()).collect(),
            category_ids: cats.iter().map(|c| c.id).collect(),
            samples,
            mask_overlap: MaskOverlap::Independent,
        })
    }
}

/// The label file YOLO tools pair with `image`: the last `images` folder of the path becomes `labels`
/// and the extension `.txt`. Without an `images` folder the label sits next to the image.
pub fn label_path_for(image: &Path) -> PathBuf {
    let comps: Vec<Component<'_>> = image.components().collect();
    // The file name itself is never the folder to replace, hence the `- 1`.
    let last_images = comps
        .iter()
        .take(comps.len().saturating_sub(1))
        .rposition(|c| c.as_os_str() == "images");
    let mut out = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        if Some(i) == last_images {
            out.push("labels");
        } else {
            out.push(c.as_os_str());
        }
    }
    out.set_extension("txt");
    out
}

/// Parse a YOLO label file: one object per line, `class cx cy w h` (normalized to [0, 1]) or a YOLO-seg
/// polygon `class x1 y1 x2 y2 ...` (at least three points; the box is the polygon's bounds). Blank
/// lines are skipped. Boxes are returned in pixels of a `width` × `height` image, clipped to it, with
/// `area` = box area. `path` is only used in error messages. The polygons are dropped; see
/// [`parse_yolo_labels_with_segments`].
pub fn parse_yolo_labels(
    text: &str,
    path: &Path,
    width: u32,
    height: u32,
    num_classes: usize,
) -> Result<Vec<GroundTruth>> {
    parse_yolo_labels_with_segments(text, path, width, height, num_classes).map(|(boxes, _)| boxes)
}

/// [`parse_yolo_labels`], keeping each object's shape: for a polygon line, the polygon in pixels
/// of the image (vertices clipped to it, like the box); `None` for a box line. Later lines lie on
/// top of earlier ones ([`MaskOverlap::PaintOrder`]).
pub fn parse_yolo_labels_with_segments(
    text: &str,
    path: &Path,
    width: u32,
    height: u32,
    num_classes: usize,
) -> Result<(Vec<GroundTruth>, Vec<Option<Segmentation>>)> {
    let mut out = Vec::new();
    let mut segments = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let err = |message: String| Error::Dataset {
            path: path.to_path_buf(),
            line: Some(lineno),
            message,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let n = fields.len();
        let is_box = n == 5;
        let is_polygon = n >= 7 && (n - 1).is_multiple_of(2);
        if !is_box && !is_polygon {
            return Err(err(format!(
                "expected `class cx cy w h` (5 fields) or a polygon `class x1 y1 x2 y2 x3 y3 ...` (an \
                 even number, at least 6, of coordinates after the class), found {n} fields"
            )));
        }
        let class_id = parse_class(fields[0]).ok_or_else(|| {
            err(format!(
                "class `{}` is not a non-negative integer",
                fields[0]
            ))
        })?;
        if class_id >= num_classes {
            return Err(err(format!(
                "class {class_id} is out of range: the data YAML names {num_classes} classes, so valid \
                 ids are 0..={}",
                num_classes.saturating_sub(1)
            )));
        }
        let mut coords = Vec::with_capacity(n - 1);
        for (k, f) in fields[1..].iter().enumerate() {
            let v: f64 = f
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| err(format!("field {} (`{f}`) is not a number", k + 2)))?;
            if !(-COORD_TOLERANCE..=1.0 + COORD_TOLERANCE).contains(&v) {
                return Err(err(format!(
                    "field {} is {v}, outside [0, 1]: YOLO labels are normalized by the image size \
                     (pixel coordinates must be divided by the width and height)",
                    k + 2
                )));
            }
            coords.push(v);
        }
        let (w, h) = (f64::from(width), f64::from(height));
        let (x1, y1, x2, y2) = if is_box {
            // A width or height just below zero (within the tolerance) is a zero one: taken as
            // it is, it would make a box whose corners are swapped (x1 > x2).
            let (cx, cy) = (coords[0], coords[1]);
            let (bw, bh) = (coords[2].max(0.0), coords[3].max(0.0));
            (cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0)
        } else {
            let xs = coords.iter().step_by(2);
            let ys = coords.iter().skip(1).step_by(2);
            (
                xs.clone().copied().fold(f64::INFINITY, f64::min),
                ys.clone().copied().fold(f64::INFINITY, f64::min),
                xs.copied().fold(f64::NEG_INFINITY, f64::max),
                ys.copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let bbox = BoxXyxy::new(
            (x1.clamp(0.0, 1.0) * w) as f32,
            (y1.clamp(0.0, 1.0) * h) as f32,
            (x2.clamp(0.0, 1.0) * w) as f32,
            (y2.clamp(0.0, 1.0) * h) as f32,
        );
        out.push(GroundTruth {
            bbox,
            class_id,
            area: bbox.area(),
            iscrowd: false,
        });
        segments.push((!is_box).then(|| {
            Segmentation::Polygons(vec![
                coords
                    .chunks_exact(2)
                    .map(|p| {
                        [
                            (p[0].clamp(0.0, 1.0) * w) as f32,
                            (p[1].clamp(0.0, 1.0) * h) as f32,
                        ]
                    })
                    .collect(),
            ])
        }));
    }
    Ok((out, segments))
}

/// A class field: an integer, or an integral float such as `3.0` (some converters write those).
fn parse_class(s: &str) -> Option<usize> {
    if let Ok(c) = s.parse::<usize>() {
        return Some(c);
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < usize::MAX as f64).then_some(v as usize)
}

/// Width and height (pixels) of an image, from its header only.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let image_err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| image_err(e.to_string()))
}

/// Decode an image to 8-bit RGB. Images over [`MAX_IMAGE_PIXELS`] are refused from their header,
/// before any pixel is decoded.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let image_err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let (w, h) = image_size(path)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(image_err(format!(
            "{w}x{h} is {pixels} pixels, more than the {MAX_IMAGE_PIXELS} this tool decodes; \
             downscale the image first"
        )));
    }
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    // Also cap the decoder itself: the header was checked, but a decoder may still allocate more
    // (16-bit or RGBA intermediates); 8 bytes per pixel covers every format we accept.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let img = decode_catching_panics(reader).map_err(image_err)?;
    Ok(img.into_rgb8())
}

/// Why [`decode_image_bytes`] refused an in-memory image. The messages are those the HTTP
/// service returns to its clients: [`ImageBytesError::TooManyPixels`] is the one a client can fix
/// by sending a smaller image (413); every other variant means the bytes are not a usable image
/// (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageBytesError {
    /// The bytes could not be read to guess their format.
    #[error("reading the image: {0}")]
    Read(String),
    /// The bytes are not a PNG, JPEG or BMP file.
    #[error("the body is not a PNG, JPEG or BMP image (send the file's bytes)")]
    UnsupportedFormat,
    /// The format is known but its header (the size) cannot be read.
    #[error("the image header is unreadable: {0}")]
    Header(String),
    /// The header says `width` × `height` pixels, more than `max_pixels`.
    #[error("a {width}×{height} image exceeds {max_pixels} pixels (--max-image-pixels)")]
    TooManyPixels {
        /// Width from the header, pixels.
        width: u32,
        /// Height from the header, pixels.
        height: u32,
        /// The limit, pixels (width × height).
        max_pixels: u64,
    },
    /// The header was fine but the pixel data does not decode (truncated, corrupted, over the
    /// decoder's allocation limit).
    #[error("the image does not decode: {0}")]
    Decode(String),
}

/// Decode a PNG, JPEG or BMP file held in memory (an HTTP request body) to 8-bit RGB, refusing an
/// image of more than `max_pixels` (width × height) from its header alone, before any pixel is
/// decoded: a small compressed body cannot make the caller allocate gigabytes. The decoder itself
/// is also capped at 8 bytes a pixel of `max_pixels` (16-bit and RGBA intermediates).
pub fn decode_image_bytes(
    bytes: &[u8],
    max_pixels: u64,
) -> std::result::Result<image::RgbImage, ImageBytesError> {
    use image::ImageReader;
    let reader = || {
        ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageBytesError::Read(e.to_string()))
    };
    let format = reader()?.format();
    if !matches!(
        format,
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::Bmp)
    ) {
        return Err(ImageBytesError::UnsupportedFormat);
    }
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| ImageBytesError::Header(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageBytesError::TooManyPixels {
            width,
            height,
            max_pixels,
        });
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    r.limits(limits);
    Ok(decode_catching_panics(r)
        .map_err(ImageBytesError::Decode)?
        .to_rgb8())
}

/// Decode with `reader`, a panic of the decoder included in the errors: zune-jpeg 0.5.15
/// (image's JPEG decoder) panics on some corrupt files (an `unwrap` in its AVX2 IDCT, found by
/// fuzzing: `fuzz/regressions/image_decode/zune-jpeg-idct-unwrap`), and a corrupt file must be an
/// error for the request or the image that sent it, not a crash of its caller.
fn decode_catching_panics<R: std::io::BufRead + std::io::Seek>(
    reader: image::ImageReader<R>,
) -> std::result::Result<image::DynamicImage, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode())) {
        Ok(decoded) => decoded.map_err(|e| e.to_string()),
        Err(_) => Err("the decoder failed on this file (it is corrupt)".into()),
    }
}

fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Add the images named by one `train:`/`val:` entry (folder, txt list or single image).
fn collect_images(
    entry: &Path,
    yaml: &Path,
    yaml_line: Option<usize>,
    out: &mut Vec<PathBuf>,
    mut skipped: Option<&mut Vec<Error>>,
) -> Result<()> {
    if entry.is_dir() {
        return walk_images(entry, 0, out);
    }
    if !entry.exists() {
        return Err(Error::Dataset {
            path: yaml.to_path_buf(),
            line: yaml_line,
            message: format!(
                "{} does not exist; `path:` and the split entries must point at the image folders",
                entry.display()
            ),
        });
    }
    if entry
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
    {
        let text = std::fs::read_to_string(entry).map_err(|e| Error::io(entry, e))?;
        let base = entry.parent().unwrap_or(Path::new("."));
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let p = base.join(line);
            if !p.is_file() {
                let e = Error::Dataset {
                    path: entry.to_path_buf(),
                    line: Some(i + 1),
                    message: format!(
                        "image {} does not exist (relative paths are taken from this list's folder)",
                        p.display()
                    ),
                };
                match skipped.as_deref_mut() {
                    Some(skipped) => {
                        skipped.push(e);
                        continue;
                    }
                    None => return Err(e),
                }
            }
            out.push(p);
        }
        return Ok(());
    }
    if is_image_file(entry) {
        out.push(entry.to_path_buf());
        return Ok(());
    }
    Err(Error::Dataset {
        path: yaml.to_path_buf(),
        line: yaml_line,
        message: format!(
            "{} is neither a folder, a .txt list of images nor an image",
            entry.display()
        ),
    })
}

fn walk_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DIR_DEPTH {
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_dir() {
            walk_images(&p, depth + 1, out)?;
        } else if is_image_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Class names from `names:` (list or `{index: name}` map), checked against `nc:` when both exist.
fn parse_names(
    names: Option<&serde_yaml::Value>,
    nc: Option<&serde_yaml::Value>,
    text: &str,
    yaml_err: &dyn Fn(Option<usize>, String) -> Error,
) -> Result<Vec<String>> {
    use serde_yaml::Value;
    let scalar = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let nc = match nc {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            yaml_err(
                key_line(text, "nc"),
                "`nc:` must be a non-negative integer".into(),
            )
        })? as usize),
    };
    let names_line = key_line(text, "names");
    let names: Vec<String> = match names {
        None | Some(Value::Null) => match nc {
            // YOLO tools invent names when only `nc` is given.
            Some(nc) => (0..nc).map(|i| format!("class{i}")).collect(),
            None => {
                return Err(yaml_err(
                    None,
                    "no `names:` entry; list the class names (`names: [person, car]`)".into(),
                ));
            }
        },
        Some(Value::Sequence(seq)) => seq
            .iter()
            .map(|v| {
                scalar(v).ok_or_else(|| {
                    yaml_err(names_line, "`names:` entries must be plain names".into())
                })
            })
            .collect::<Result<_>>()?,
        Some(Value::Mapping(m)) => {
            let mut pairs = Vec::with_capacity(m.len());
            for (k, v) in m {
                let idx = k.as_u64().ok_or_else(|| {
                    yaml_err(
                        names_line,
                        "`names:` map keys must be class indices 0, 1, 2, ...".into(),
                    )
                })?;
                let name = scalar(v).ok_or_else(|| {
                    yaml_err(names_line, "`names:` values must be plain names".into())
                })?;
                pairs.push((idx, name));
            }
            pairs.sort_by_key(|p| p.0);
            for (i, (idx, _)) in pairs.iter().enumerate() {
                if *idx != i as u64 {
                    return Err(yaml_err(
                        names_line,
                        format!(
                            "`names:` keys must be 0..{} without gaps; index {i} is missing or repeated",
                            pairs.len()
                        ),
                    ));
                }
            }
            pairs.into_iter().map(|p| p.1).collect()
        }
        Some(_) => {
            return Err(yaml_err(
                names_line,
                "`names:` must be a list or a map {0: name, ...}".into(),
            ));
        }
    };
    if names.is_empty() {
        return Err(yaml_err(names_line, "`names:` is empty".into()));
    }
    if let Some(nc) = nc
        && nc != names.len()
    {
        return Err(yaml_err(
            key_line(text, "nc"),
            format!(
                "`nc: {nc}` but `names:` lists {} classes; make them agree",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// The fix appended to every malformed-`segmentation` message.
const COCO_SEGMENTATION_FORMS: &str = "COCO segmentations are a list of polygons \
     [[x1, y1, x2, y2, x3, y3, ...], ...] in pixels or an RLE {\"size\": [height, width], \
     \"counts\": [runs...] or \"compressed string\"}";

/// A COCO annotation's `segmentation` in a `width` × `height` image: polygons or an RLE (see
/// [`Dataset::from_coco_json`]); `None` for `null` or `[]`. The error is the problem and its fix.
fn parse_coco_segmentation(
    v: &serde_json::Value,
    width: u32,
    height: u32,
) -> std::result::Result<Option<Segmentation>, String> {
    use serde_json::Value;
    match v {
        Value::Null => Ok(None),
        Value::Array(list) if list.is_empty() => Ok(None),
        Value::Array(list) => {
            let mut polygons = Vec::with_capacity(list.len());
            for (k, p) in list.iter().enumerate() {
                let Value::Array(nums) = p else {
                    return Err(format!(
                        "`segmentation` item {} is {}, not a polygon (a flat list of numbers \
                         wrapped in an outer list); {COCO_SEGMENTATION_FORMS}",
                        k + 1,
                        json_kind(p)
                    ));
                };
                if nums.len() < 6 || nums.len() % 2 != 0 {
                    return Err(format!(
                        "`segmentation` polygon {} has {} numbers; a polygon needs an even \
                         number, at least 6 (3 points x, y); {COCO_SEGMENTATION_FORMS}",
                        k + 1,
                        nums.len()
                    ));
                }
                let mut points = Vec::with_capacity(nums.len() / 2);
                for pair in nums.chunks_exact(2) {
                    let coord = |n: &Value| n.as_f64().filter(|v| v.is_finite());
                    match (coord(&pair[0]), coord(&pair[1])) {
                        (Some(x), Some(y)) => points.push([x as f32, y as f32]),
                        _ => {
                            return Err(format!(
                                "`segmentation` polygon {} holds {} and {}, which are not both \
                                 finite numbers (pixels); {COCO_SEGMENTATION_FORMS}",
                                k + 1,
                                pair[0],
                                pair[1]
                            ));
                        }
                    }
                }
                polygons.push(points);
            }
            Ok(Some(Segmentation::Polygons(polygons)))
        }
        Value::Object(map) => {
            let size = map
                .get("size")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 2)
                .and_then(|a| Some([a[0].as_u64()?, a[1].as_u64()?]))
                .ok_or_else(|| {
                    format!(
                        "the RLE `segmentation` needs `size`: [height, width] (two integers); \
                         {COCO_SEGMENTATION_FORMS}"
                    )
                })?;
            if size != [u64::from(height), u64::from(width)] {
                return Err(format!(
                    "the RLE `segmentation` has size {size:?} but its image is {height} high and \
                     {width} wide; `size` is [height, width] of the image"
                ));
            }
            let (h, w) = (height as usize, width as usize);
            let rle = match map.get("counts") {
                Some(Value::String(text)) => Rle::from_coco_string(h, w, text)
                    .map_err(|e| format!("the RLE `segmentation`: {e}"))?,
                Some(Value::Array(runs)) => {
                    let counts = runs
                        .iter()
                        .map(|c| c.as_u64().and_then(|c| u32::try_from(c).ok()))
                        .collect::<Option<Vec<u32>>>()
                        .ok_or_else(|| {
                            "the RLE `segmentation` has `counts` that are not all non-negative \
                             integers (run lengths in pixels)"
                                .to_string()
                        })?;
                    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
                    if total != u64::from(width) * u64::from(height) {
                        return Err(format!(
                            "the RLE `segmentation` runs cover {total} pixels; a {width}x{height} \
                             image has {}; the runs must add up to height * width",
                            u64::from(width) * u64::from(height)
                        ));
                    }
                    Rle {
                        height: h,
                        width: w,
                        counts,
                    }
                }
                _ => {
                    return Err(format!(
                        "the RLE `segmentation` needs `counts`, a list of run lengths or a \
                         compressed string; {COCO_SEGMENTATION_FORMS}"
                    ));
                }
            };
            Ok(Some(Segmentation::Rle(rle)))
        }
        other => Err(format!(
            "`segmentation` is {}; {COCO_SEGMENTATION_FORMS}",
            json_kind(other)
        )),
    }
}

/// A JSON value's kind in words, for messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// 1-based line of a top-level `key:` in the YAML text, for error messages.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    #[serde(default)]
    id: Option<u64>,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: Flag,
    /// Read by hand ([`parse_coco_segmentation`]) so that a malformed one gets a precise message.
    #[serde(default)]
    segmentation: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

/// COCO's `iscrowd`: 0/1 in the official files, `true`/`false` in some converters' output.
#[derive(Default)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Int(i64),
        }
        Ok(Flag(match Raw::deserialize(d)? {
            Raw::Bool(b) => b,
            Raw::Int(i) => i != 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kestrel-dataset-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_png(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::new(w, h).save(path).unwrap();
    }

    #[test]
    fn label_path_replaces_last_images_folder() {
        assert_eq!(
            label_path_for(Path::new("/d/images/x/images/train/a.b.png")),
            PathBuf::from("/d/images/x/labels/train/a.b.txt")
        );
        assert_eq!(
            label_path_for(Path::new("rel/images/a.JPG")),
            PathBuf::from("rel/labels/a.txt")
        );
        assert_eq!(
            label_path_for(Path::new("/d/pics/a.png")),
            PathBuf::from("/d/pics/a.txt")
        );
        // A file literally called `images` is not a folder to replace.
        assert_eq!(
            label_path_for(Path::new("/d/images")),
            PathBuf::from("/d/images.txt")
        );
    }

    #[test]
    fn parses_boxes_and_polygons() {
        let text = "0 0.5 0.5 0.2 0.4\n\n  \n1 0.1 0.1 0.3 0.1 0.2 0.5\n";
        let g = parse_yolo_labels(text, Path::new("l.txt"), 200, 100, 2).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].bbox, BoxXyxy::new(80.0, 30.0, 120.0, 70.0));
        assert_eq!(g[0].area, 40.0 * 40.0);
        assert_eq!(g[1].class_id, 1);
        assert!((g[1].bbox.x1 - 20.0).abs() < 1e-4 && (g[1].bbox.x2 - 60.0).abs() < 1e-4);
        assert!((g[1].bbox.y1 - 10.0).abs() < 1e-4 && (g[1].bbox.y2 - 50.0).abs() < 1e-4);
        assert!(!g[1].iscrowd);
    }

    /// Fuzzing (`fuzz/regressions/yolo_labels/negative-width-within-tolerance`): a width of
    /// -0.0005 is inside the rounding tolerance, and made a box with x1 > x2.
    #[test]
    fn widths_just_below_zero_are_zero() {
        let g =
            parse_yolo_labels("0 0.5 0.5 -0.0005 0.2\n", Path::new("l.txt"), 64, 48, 1).unwrap();
        assert_eq!(g[0].bbox, BoxXyxy::new(32.0, 19.2, 32.0, 28.8));
        assert!(g[0].bbox.x1 <= g[0].bbox.x2 && g[0].area == 0.0);
    }

    #[test]
    fn yolo_seg_lines_keep_their_polygons_in_pixels() {
        // A box line, then a triangle, then a square over the triangle's right part.
        let text =
            "0 0.5 0.5 0.2 0.4\n1 0.0 0.0 0.5 0.0 0.0 1.0\n2 0.2 0.2 0.6 0.2 0.6 0.6 0.2 0.6\n";
        let (g, seg) =
            parse_yolo_labels_with_segments(text, Path::new("l.txt"), 10, 10, 3).unwrap();
        assert_eq!((g.len(), seg.len()), (3, 3));
        assert!(seg[0].is_none());
        assert_eq!(
            seg[1],
            Some(Segmentation::Polygons(vec![vec![
                [0.0, 0.0],
                [5.0, 0.0],
                [0.0, 10.0]
            ]]))
        );
        assert_eq!(g[2].bbox, BoxXyxy::new(2.0, 2.0, 6.0, 6.0));
        let sample = Sample {
            image: PathBuf::from("x.png"),
            image_id: 1,
            width: 10,
            height: 10,
            objects: g.clone(),
            segments: seg.clone(),
        };
        assert!(!sample.has_masks());
        assert_eq!(
            sample.instance_masks(MaskOverlap::PaintOrder).unwrap(),
            None
        );
        // Without the box-only object: the square (16 px) hides part of the triangle.
        let sample = Sample {
            objects: g[1..].to_vec(),
            segments: seg[1..].to_vec(),
            ..sample
        };
        assert!(sample.has_masks());
        let painted = sample
            .instance_masks(MaskOverlap::PaintOrder)
            .unwrap()
            .unwrap();
        let alone = sample
            .instance_masks(MaskOverlap::Independent)
            .unwrap()
            .unwrap();
        // Triangle (0,0) (5,0) (0,10): row y holds the pixels with x + 0.5 < 5 - (y + 0.5) / 2.
        let triangle: u64 = (0..10)
            .map(|y| (4.25 - f64::from(y) / 2.0).ceil().max(0.0) as u64)
            .sum();
        assert_eq!(triangle, 25);
        assert_eq!(alone[0].area(), triangle);
        assert_eq!(alone[1].area(), 16);
        assert_eq!(painted[1], alone[1]);
        let hidden = alone[0].intersection(&alone[1]).unwrap();
        assert!(hidden > 0);
        assert_eq!(painted[0].area(), triangle - hidden);
        assert_eq!(painted[0].intersection(&painted[1]).unwrap(), 0);
    }

    #[test]
    fn label_errors_name_line_and_problem() {
        let p = Path::new("lab.txt");
        let e = parse_yolo_labels("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n", p, 10, 10, 1).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("lab.txt:2:") && s.contains("found 4 fields"),
            "{s}"
        );

        let s = parse_yolo_labels("0 0.5 x 0.2 0.2", p, 10, 10, 1)
            .unwrap_err()
            .to_string();
        assert!(s.contains(":1:") && s.contains("not a number"), "{s}");

        let s = parse_yolo_labels("3 0.5 0.5 0.2 0.2", p, 10, 10, 3)
            .unwrap_err()
            .to_string();
        assert!(s.contains("names 3 classes") && s.contains("0..=2"), "{s}");

        let s = parse_yolo_labels("0 50 50 20 20", p, 10, 10, 3)
            .unwrap_err()
            .to_string();
        assert!(s.contains("outside [0, 1]"), "{s}");

        let s = parse_yolo_labels("-1 0.5 0.5 0.2 0.2", p, 10, 10, 3)
            .unwrap_err()
            .to_string();
        assert!(s.contains("non-negative integer"), "{s}");

        // Within the tolerance: accepted and clipped.
        let g = parse_yolo_labels("0 0.9 0.5 0.2002 0.2", p, 10, 10, 1).unwrap();
        assert_eq!(g[0].bbox.x2, 10.0);
        // Integral float classes are accepted.
        assert_eq!(
            parse_yolo_labels("2.0 0.5 0.5 0.2 0.2", p, 10, 10, 3).unwrap()[0].class_id,
            2
        );
    }

    #[test]
    fn loads_yolo_yaml_with_map_names_and_txt_lists() {
        let dir = tmp("yaml");
        write_png(&dir.join("data/images/val/b.png"), 40, 20);
        write_png(&dir.join("data/images/val/a.PNG"), 20, 10);
        write_png(&dir.join("data/images/train/c.png"), 8, 8);
        std::fs::create_dir_all(dir.join("data/labels/val")).unwrap();
        std::fs::write(dir.join("data/labels/val/b.txt"), "1 0.5 0.5 0.5 0.5\n").unwrap();
        std::fs::write(dir.join("data/train.txt"), "./images/train/c.png\n\n").unwrap();
        std::fs::write(
            dir.join("data.yaml"),
            "path: data\ntrain: train.txt\nval: [images/val]\nnc: 2\nnames:\n  0: cat\n  1: dog\n",
        )
        .unwrap();
        let ds = Dataset::from_yolo_yaml(&dir.join("data.yaml"), Split::Val).unwrap();
        assert_eq!(ds.names, ["cat", "dog"]);
        assert_eq!(ds.category_ids, [0, 1]);
        assert_eq!(ds.samples.len(), 2);
        assert!(ds.samples[0].image.ends_with("a.PNG"), "sorted by path");
        assert_eq!((ds.samples[0].width, ds.samples[0].height), (20, 10));
        assert!(
            ds.samples[0].objects.is_empty(),
            "missing label = no objects"
        );
        assert_eq!(
            ds.samples[1].objects[0].bbox,
            BoxXyxy::new(10.0, 5.0, 30.0, 15.0)
        );
        assert_eq!(ds.samples[1].image_id, 2);

        let tr = Dataset::from_yolo_yaml(&dir.join("data.yaml"), Split::Train).unwrap();
        assert_eq!(tr.samples.len(), 1);
    }

    #[test]
    fn yolo_yaml_errors() {
        let dir = tmp("yamlerr");
        write_png(&dir.join("images/val/a.png"), 4, 4);
        let y = dir.join("d.yaml");
        std::fs::write(&y, "val: images/val\nnc: 3\nnames: [a, b]\n").unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Val)
            .unwrap_err()
            .to_string();
        assert!(s.contains("d.yaml:2:") && s.contains("nc: 3"), "{s}");

        std::fs::write(&y, "val: images/missing\nnames: [a]\n").unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Val)
            .unwrap_err()
            .to_string();
        assert!(s.contains("does not exist"), "{s}");

        std::fs::create_dir_all(dir.join("images/empty")).unwrap();
        std::fs::write(&y, "val: images/empty\nnames: [a]\n").unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Val)
            .unwrap_err()
            .to_string();
        assert!(s.contains("no images found in"), "{s}");

        std::fs::write(&y, "names: [a]\n").unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Train)
            .unwrap_err()
            .to_string();
        assert!(s.contains("no `train:` entry"), "{s}");

        // A bad label line is reported with the label file and its line.
        std::fs::create_dir_all(dir.join("labels/val")).unwrap();
        std::fs::write(
            dir.join("labels/val/a.txt"),
            "0 0.5 0.5 0.1 0.1\n5 0.5 0.5 0.1 0.1\n",
        )
        .unwrap();
        std::fs::write(&y, "val: images/val\nnames: {0: a}\n").unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Val)
            .unwrap_err()
            .to_string();
        assert!(s.contains("a.txt:2:") && s.contains("out of range"), "{s}");

        // An image that is not one.
        std::fs::write(dir.join("images/val/bad.jpg"), b"not a jpeg").unwrap();
        std::fs::remove_file(dir.join("labels/val/a.txt")).unwrap();
        let s = Dataset::from_yolo_yaml(&y, Split::Val)
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("bad.jpg") && s.contains("cannot read the image"),
            "{s}"
        );
    }

    #[test]
    fn loads_coco_json() {
        let dir = tmp("coco");
        let json = dir.join("inst.json");
        std::fs::write(
            &json,
            r#"{"images":[{"id":9,"file_name":"b.png","width":100,"height":50},
                         {"id":3,"file_name":"a.png","width":10,"height":10}],
               "annotations":[{"id":1,"image_id":9,"category_id":7,"bbox":[10,5,20,10],"area":150,"iscrowd":0},
                              {"id":2,"image_id":9,"category_id":2,"bbox":[0,0,5,5],"iscrowd":true}],
               "categories":[{"id":7,"name":"dog"},{"id":2,"name":"cat"}]}"#,
        )
        .unwrap();
        let ds = Dataset::from_coco_json(&json, &dir).unwrap();
        assert_eq!(ds.names, ["cat", "dog"]);
        assert_eq!(ds.category_ids, [2, 7]);
        assert_eq!(ds.samples[0].image_id, 3);
        assert_eq!(ds.samples[1].image, dir.join("b.png"));
        let o = &ds.samples[1].objects;
        assert_eq!(o[0].class_id, 1);
        assert_eq!(o[0].bbox, BoxXyxy::new(10.0, 5.0, 30.0, 15.0));
        assert_eq!(o[0].area, 150.0);
        assert!(o[1].iscrowd);
        assert_eq!(o[1].area, 25.0, "missing area = box area");
    }

    /// A one-image COCO json (10 wide, 8 high) whose single annotation has `segmentation`.
    fn coco_with_segmentation(dir: &Path, segmentation: &str) -> Result<Dataset> {
        let json = dir.join("seg.json");
        std::fs::write(
            &json,
            format!(
                r#"{{"images":[{{"id":1,"file_name":"a.png","width":10,"height":8}}],
                   "annotations":[{{"id":42,"image_id":1,"category_id":1,"bbox":[0,0,4,4],
                                    "segmentation":{segmentation}}}],
                   "categories":[{{"id":1,"name":"a"}}]}}"#
            ),
        )
        .unwrap();
        Dataset::from_coco_json(&json, dir)
    }

    #[test]
    fn coco_segmentations_load_as_polygons_and_rles() {
        let dir = tmp("cocoseg");
        let poly = coco_with_segmentation(&dir, "[[0,0,4,0,4,4,0,4],[6,6,8,6,8,8]]").unwrap();
        assert_eq!(poly.mask_overlap, MaskOverlap::Independent);
        assert!(poly.has_masks());
        let s = &poly.samples[0];
        let masks = s.instance_masks(poly.mask_overlap).unwrap().unwrap();
        // The square (16 px) and the triangle (6,6) (8,6) (8,8), whose hypotenuse y = x passes
        // through pixel centres: (6, 6), (7, 6) and (7, 7) are in (left edges belong to the shape).
        assert_eq!(masks[0].area(), 16 + 3);
        assert_eq!((masks[0].width, masks[0].height), (10, 8));

        // The same square as uncompressed and compressed RLE.
        let square =
            Segmentation::Polygons(vec![vec![[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]]])
                .to_rle(10, 8)
                .unwrap();
        let counts = format!("{:?}", square.counts);
        let raw = coco_with_segmentation(&dir, &format!(r#"{{"size":[8,10],"counts":{counts}}}"#))
            .unwrap();
        let text = square.to_coco_string();
        let packed =
            coco_with_segmentation(&dir, &format!(r#"{{"size":[8,10],"counts":"{text}"}}"#))
                .unwrap();
        for ds in [&raw, &packed] {
            assert_eq!(
                ds.samples[0].segments[0],
                Some(Segmentation::Rle(square.clone()))
            );
            let m = ds.samples[0]
                .instance_masks(ds.mask_overlap)
                .unwrap()
                .unwrap();
            assert_eq!(m[0], square);
        }

        // No segmentation, null or []: box only.
        for seg in ["null", "[]"] {
            let ds = coco_with_segmentation(&dir, seg).unwrap();
            assert_eq!(ds.samples[0].segments, [None]);
            assert!(!ds.has_masks());
            assert_eq!(ds.objects_without_masks(), 1);
        }
    }

    #[test]
    fn malformed_coco_segmentations_name_the_problem() {
        let dir = tmp("cocosegerr");
        for (seg, needle) in [
            ("[[0,0,4,0,4]]", "polygon 1 has 5 numbers"),
            ("[[0,0,4,0,4,4],[1,2,3,4]]", "polygon 2 has 4 numbers"),
            ("[0,0,4,0,4,4]", "not a polygon"),
            (r#"[[0,0,4,"x",4,4]]"#, "not both finite numbers"),
            ("7", "`segmentation` is a number"),
            (r#"{"counts":[80]}"#, "needs `size`"),
            (
                r#"{"size":[10,8],"counts":[80]}"#,
                "size [10, 8] but its image is 8 high",
            ),
            (r#"{"size":[8,10],"counts":[70]}"#, "cover 70 pixels"),
            (
                r#"{"size":[8,10],"counts":[-1,81]}"#,
                "not all non-negative",
            ),
            (r#"{"size":[8,10],"counts":"0 x"}"#, "outside '0'..='o'"),
            (r#"{"size":[8,10]}"#, "needs `counts`"),
        ] {
            let e = coco_with_segmentation(&dir, seg).unwrap_err().to_string();
            assert!(
                e.contains("seg.json") && e.contains("annotation id 42") && e.contains(needle),
                "{seg}: {e}"
            );
        }
    }

    #[test]
    fn coco_json_errors() {
        let dir = tmp("cocoerr");
        let json = dir.join("bad.json");
        std::fs::write(
            &json,
            r#"{"images":[{"id":1,"file_name":"a.png","width":10,"height":10}],
               "annotations":[{"id":5,"image_id":2,"category_id":1,"bbox":[0,0,1,1]}],
               "categories":[{"id":1,"name":"a"}]}"#,
        )
        .unwrap();
        let s = Dataset::from_coco_json(&json, &dir)
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("bad.json") && s.contains("annotation id 5") && s.contains("image id 2"),
            "{s}"
        );

        std::fs::write(&json, "{\"images\": [\n{\"id\": 1}]}").unwrap();
        let s = Dataset::from_coco_json(&json, &dir)
            .unwrap_err()
            .to_string();
        assert!(s.contains("bad.json:2:") && s.contains("file_name"), "{s}");
    }

    #[test]
    fn load_rgb_decodes_and_reports() {
        let dir = tmp("load");
        let p = dir.join("x.png");
        write_png(&p, 7, 3);
        let img = load_rgb(&p).unwrap();
        assert_eq!(img.dimensions(), (7, 3));
        let bad = dir.join("y.png");
        std::fs::write(&bad, b"garbage").unwrap();
        let s = load_rgb(&bad).unwrap_err().to_string();
        assert!(
            s.contains("y.png") && s.contains("cannot read the image"),
            "{s}"
        );
        let s = load_rgb(&dir.join("none.png")).unwrap_err().to_string();
        assert!(s.contains("none.png"), "{s}");
    }

    #[test]
    fn load_rgb_refuses_decompression_bombs() {
        // A 20000 x 20000 PNG header (400 MP) with no pixel data: refused before decoding.
        let dir = tmp("bomb");
        let p = dir.join("bomb.png");
        std::fs::write(&p, png_header(20000, 20000)).unwrap();
        let s = load_rgb(&p).unwrap_err().to_string();
        assert!(s.contains("more than the"), "{s}");
    }

    #[test]
    fn image_bytes_decode_with_a_pixel_limit() {
        let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        for format in [
            image::ImageFormat::Png,
            image::ImageFormat::Jpeg,
            image::ImageFormat::Bmp,
        ] {
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
                .unwrap();
            let back = decode_image_bytes(&bytes, 20).unwrap();
            assert_eq!(back.dimensions(), (5, 4), "{format:?}");
            if format != image::ImageFormat::Jpeg {
                assert_eq!(back, img, "{format:?}");
            }
            // One pixel over the limit: refused from the header.
            assert_eq!(
                decode_image_bytes(&bytes, 19),
                Err(ImageBytesError::TooManyPixels {
                    width: 5,
                    height: 4,
                    max_pixels: 19
                })
            );
        }
        let bomb = decode_image_bytes(&png_header(20000, 20000), MAX_IMAGE_PIXELS).unwrap_err();
        assert_eq!(
            bomb.to_string(),
            "a 20000×20000 image exceeds 100000000 pixels (--max-image-pixels)"
        );
        assert_eq!(
            decode_image_bytes(b"GIF89a....", 100),
            Err(ImageBytesError::UnsupportedFormat)
        );
        let empty = decode_image_bytes(&png_header(3, 3), 100).unwrap_err();
        assert!(matches!(empty, ImageBytesError::Decode(_)), "{empty}");
    }

    /// Fuzzing: a corrupt JPEG on which zune-jpeg 0.5.15 panics is a decode error.
    #[test]
    fn decoder_panics_are_decode_errors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/image_decode/zune-jpeg-idct-unwrap");
        let bytes = std::fs::read(&path).unwrap();
        // The panic is on the AVX2 path; elsewhere the file may decode or fail plainly.
        if let Err(e) = decode_image_bytes(&bytes, 512 * 512) {
            assert!(matches!(e, ImageBytesError::Decode(_)), "{e}");
        }
    }

    /// PNG signature, IHDR of an 8-bit RGB image, an empty IDAT and IEND: a valid header with no pixels.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &[][..]), (b"IEND", &[][..])] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut chunk = kind.to_vec();
            chunk.extend_from_slice(data);
            out.extend_from_slice(&chunk);
            out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
