//! Boxes, detections and ground-truth objects shared by post-processing, datasets and evaluation.

use serde::{Deserialize, Serialize};

/// An axis-aligned box as corners, in pixels (x to the right, y down).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BoxXyxy {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

impl BoxXyxy {
    pub const fn new(x1: f32, y1: f32, x2: f32, y2: f32) -> Self {
        Self { x1, y1, x2, y2 }
    }

    /// From centre, width and height (pixels), the layout of YOLO's `output0`.
    pub fn from_xywh(cx: f32, cy: f32, w: f32, h: f32) -> Self {
        Self::new(cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)
    }

    /// Width in pixels (negative widths count as zero).
    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).max(0.0)
    }

    /// Height in pixels (negative heights count as zero).
    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).max(0.0)
    }

    /// Area in square pixels.
    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }

    /// Area of the intersection with `other`, in square pixels.
    pub fn intersection(&self, other: &BoxXyxy) -> f32 {
        let w = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let h = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        w * h
    }

    /// Intersection over union. Two zero-area boxes give NaN, which compares false with every
    /// threshold, so such boxes never suppress each other (torchvision behaves the same).
    pub fn iou(&self, other: &BoxXyxy) -> f32 {
        let inter = self.intersection(other);
        inter / (self.area() + other.area() - inter)
    }

    /// Clip to the image `[0, width] x [0, height]` (pixels).
    pub fn clip(&self, width: f32, height: f32) -> BoxXyxy {
        BoxXyxy::new(
            self.x1.clamp(0.0, width),
            self.y1.clamp(0.0, height),
            self.x2.clamp(0.0, width),
            self.y2.clamp(0.0, height),
        )
    }
}

/// One detection after NMS.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Box in the pixels of the image the caller asked about (original image after letterbox inversion).
    pub bbox: BoxXyxy,
    /// Class confidence in [0, 1].
    pub score: f32,
    /// Index into the model's class names.
    pub class_id: usize,
    /// Index of the anchor (column of `output0`) the detection came from; masks need it.
    pub anchor: usize,
}

/// One labelled object of a dataset, in the pixels of its image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub bbox: BoxXyxy,
    pub class_id: usize,
    /// Area used by COCO's small/medium/large ranges (square pixels); the box area when no mask is known.
    pub area: f32,
    /// COCO's crowd flag: crowd regions are ignored by matching, not counted as misses.
    pub iscrowd: bool,
}
