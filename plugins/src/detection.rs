//! How detections travel on buffers: one `GstVideoRegionOfInterestMeta` per detection, its type
//! the class label and its rectangle the box in frame pixels, carrying a `kestrel/detection`
//! structure with the exact box and the scores. Standard consumers see the regions; Kestrel's
//! overlay and applications read the structure.

use gst_video::VideoRegionOfInterestMeta;
use kestrel_runtime::masks::Rle;
use kestrel_runtime::{BoxXyxy, Detection};

/// Name of the structure attached to each region.
pub const STRUCTURE_NAME: &str = "kestrel/detection";

/// One detection as found on a buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameDetection {
    /// Class index of the model.
    pub class_id: u32,
    /// Class label (the region's type).
    pub label: String,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// Index of the detection in its frame (best first).
    pub instance_id: u32,
    /// `unique-id` of the `kestrelinfer` that made it.
    pub unique_id: u32,
    /// Box in frame pixels (exact, not rounded).
    pub bbox: BoxXyxy,
    /// The region's integer rectangle: x, y, width, height in pixels.
    pub rect: (u32, u32, u32, u32),
    /// Segmentation models: the instance mask at the frame's size (COCO RLE).
    pub mask: Option<Rle>,
}

/// The integer rectangle covering `b`, clipped to a `width` × `height` frame.
pub fn rect_of(b: &BoxXyxy, width: u32, height: u32) -> (u32, u32, u32, u32) {
    let x0 = (b.x1.floor().max(0.0) as u32).min(width.saturating_sub(1));
    let y0 = (b.y1.floor().max(0.0) as u32).min(height.saturating_sub(1));
    let x1 = (b.x2.ceil().max(0.0) as u32).clamp(x0 + 1, width.max(x0 + 1));
    let y1 = (b.y2.ceil().max(0.0) as u32).clamp(y0 + 1, height.max(y0 + 1));
    (x0, y0, x1 - x0, y1 - y0)
}

/// Attach `det` to `buffer` (a `width` × `height` frame), with its instance mask for
/// segmentation models (fields `mask-width`, `mask-height` and `mask-counts`, the COCO RLE runs).
pub fn attach(
    buffer: &mut gst::BufferRef,
    det: &Detection,
    label: &str,
    instance_id: u32,
    unique_id: u32,
    (width, height): (u32, u32),
    mask: Option<&Rle>,
) {
    let rect = rect_of(&det.bbox, width, height);
    let mut meta = VideoRegionOfInterestMeta::add(buffer, label, rect);
    meta.set_id(instance_id as i32);
    let mut structure = gst::Structure::builder(STRUCTURE_NAME)
        .field("class-id", det.class_id as u32)
        .field("label", label)
        .field("confidence", f64::from(det.score))
        .field("instance-id", instance_id)
        .field("unique-id", unique_id)
        .field("x1", f64::from(det.bbox.x1))
        .field("y1", f64::from(det.bbox.y1))
        .field("x2", f64::from(det.bbox.x2))
        .field("y2", f64::from(det.bbox.y2));
    if let Some(m) = mask {
        structure = structure
            .field("mask-width", m.width as u32)
            .field("mask-height", m.height as u32)
            .field("mask-counts", gst::Array::new(m.counts.iter().copied()));
    }
    meta.add_param(structure.build());
}

/// The Kestrel detections on `buffer`, in attachment order (regions without a
/// `kestrel/detection` structure are someone else's and skipped).
pub fn read(buffer: &gst::BufferRef) -> Vec<FrameDetection> {
    let mut out = Vec::new();
    read_into(buffer, &mut out);
    out
}

/// [`read`] into `out`, reusing its entries (and their label strings): per frame, nothing is
/// allocated once `out` has held as many detections.
pub fn read_into(buffer: &gst::BufferRef, out: &mut Vec<FrameDetection>) {
    let mut n = 0;
    for meta in buffer.iter_meta::<VideoRegionOfInterestMeta>() {
        let Some(s) = meta.param(STRUCTURE_NAME) else {
            continue;
        };
        let f = |k: &str| s.get::<f64>(k).ok().map(|v| v as f32);
        let (Ok(class_id), Ok(label), Some(confidence), Ok(instance_id), Ok(unique_id)) = (
            s.get::<u32>("class-id"),
            s.get::<&str>("label"),
            s.get::<f64>("confidence").ok(),
            s.get::<u32>("instance-id"),
            s.get::<u32>("unique-id"),
        ) else {
            continue;
        };
        let (Some(x1), Some(y1), Some(x2), Some(y2)) = (f("x1"), f("y1"), f("x2"), f("y2")) else {
            continue;
        };
        if out.len() == n {
            out.push(FrameDetection {
                class_id,
                label: String::new(),
                confidence,
                instance_id,
                unique_id,
                bbox: BoxXyxy { x1, y1, x2, y2 },
                rect: meta.rect(),
                mask: None,
            });
        }
        let d = &mut out[n];
        d.class_id = class_id;
        d.label.clear();
        d.label.push_str(label);
        d.confidence = confidence;
        d.instance_id = instance_id;
        d.unique_id = unique_id;
        d.bbox = BoxXyxy { x1, y1, x2, y2 };
        d.rect = meta.rect();
        read_mask(s, &mut d.mask);
        n += 1;
    }
    out.truncate(n);
}

/// The mask fields of a detection structure into `mask` (its run list reused), or `None`.
fn read_mask(s: &gst::StructureRef, mask: &mut Option<Rle>) {
    let (Ok(width), Ok(height), Ok(counts)) = (
        s.get::<u32>("mask-width"),
        s.get::<u32>("mask-height"),
        s.get::<gst::ArrayRef>("mask-counts"),
    ) else {
        *mask = None;
        return;
    };
    let m = mask.get_or_insert_with(Rle::default);
    m.width = width as usize;
    m.height = height as usize;
    m.counts.clear();
    m.counts
        .extend(counts.iter().filter_map(|v| v.get::<u32>().ok()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_cover_the_box_and_stay_in_the_frame() {
        let b = BoxXyxy {
            x1: 10.4,
            y1: 5.6,
            x2: 20.2,
            y2: 9.0,
        };
        assert_eq!(rect_of(&b, 100, 100), (10, 5, 11, 4));
        let outside = BoxXyxy {
            x1: -5.0,
            y1: 90.0,
            x2: 130.0,
            y2: 140.0,
        };
        assert_eq!(rect_of(&outside, 100, 100), (0, 90, 100, 10));
        // A degenerate box still gets one pixel.
        let dot = BoxXyxy {
            x1: 99.5,
            y1: 99.5,
            x2: 99.5,
            y2: 99.5,
        };
        assert_eq!(rect_of(&dot, 100, 100), (99, 99, 1, 1));
    }
}
