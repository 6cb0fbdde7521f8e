//! End-to-end outputs (`kestrel export --end2end`: `num_dets`, `det_boxes`, `det_scores`,
//! `det_classes`, `det_masks`) assembled from a plain model's head and Kestrel's NMS, computed the
//! way the graph's tail computes them. Backends that run decode and NMS themselves (the cuda
//! backend) run the plain part of an end-to-end model
//! ([`kestrel_exporter::end2end::plain_part`]) and return these; the CPU backend runs the graph
//! itself, and the tests hold one against the other.

use kestrel_exporter::end2end::MASK_MARGIN;

use crate::detection::{BoxXyxy, Detection};
use crate::engine::{EndToEndInfo, EndToEndOutputs};
use crate::error::{Error, Result};
use crate::letterbox::LetterboxParams;
use crate::masks::{MASK_COEFFICIENTS, PrototypeShape, sigmoid};
use crate::nms::NmsConfig;

/// The NMS the graph's tail performs, as Kestrel's NMS settings: every class above the score
/// threshold is a candidate (ONNX's `NonMaxSuppression` works per class), suppression within a
/// class above the IoU threshold, the best K of all classes kept.
pub fn graph_nms(info: &EndToEndInfo) -> NmsConfig {
    NmsConfig {
        conf_threshold: info.score_threshold,
        iou_threshold: info.iou_threshold,
        max_detections: info.max_detections,
        max_candidates: usize::MAX,
        multi_label: true,
        agnostic: false,
        classes: None,
    }
}

/// The placement that leaves boxes in input pixels (`input_hw`, pixels): the graph's boxes are
/// in input pixels.
pub fn input_placement([h, w]: [usize; 2]) -> LetterboxParams {
    let (w, h) = (w as u32, h as u32);
    LetterboxParams {
        src_w: w,
        src_h: h,
        dst_w: w,
        dst_h: h,
        new_w: w,
        new_h: h,
        left: 0,
        top: 0,
    }
}

/// One image's raw outputs, for the masks of a segmentation model's detections.
#[derive(Debug, Clone, Copy)]
pub struct ImageHead<'a> {
    /// `output0` of the image, `[channels, anchors]` row-major; the mask coefficients are its last
    /// 32 rows.
    pub head: &'a [f32],
    pub channels: usize,
    pub anchors: usize,
    /// `output1` of the image, `[32, height, width]`.
    pub prototypes: &'a [f32],
    pub shape: PrototypeShape,
    /// Input height and width in pixels.
    pub input_hw: [usize; 2],
}

/// End-to-end outputs of a batch, built image by image; reused across batches (no allocation
/// once warm).
#[derive(Debug, Default)]
pub struct EndToEndBuffers {
    // The CPU backend appends the rows its graph returned directly.
    pub(crate) num_dets: Vec<i32>,
    pub(crate) boxes: Vec<f32>,
    pub(crate) scores: Vec<f32>,
    pub(crate) classes: Vec<i32>,
    pub(crate) masks: Vec<f32>,
    coefficients: Vec<f32>,
    in_x: Vec<bool>,
}

impl EndToEndBuffers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget the last batch.
    pub fn clear(&mut self) {
        self.num_dets.clear();
        self.boxes.clear();
        self.scores.clear();
        self.classes.clear();
        self.masks.clear();
    }

    /// Append one image whose NMS kept `kept` (best first, boxes in input pixels as the head
    /// gives them, not clipped), padded to `k` rows: zero boxes and scores, class −1. With
    /// `head`, also each detection's mask at prototype resolution, as the graph computes it:
    /// the sigmoid of coefficients × prototypes on the cells within [`MASK_MARGIN`] cells of the
    /// box, zero elsewhere.
    pub fn push_image(
        &mut self,
        k: usize,
        kept: &[Detection],
        head: Option<&ImageHead<'_>>,
    ) -> Result<()> {
        let kept = &kept[..kept.len().min(k)];
        self.num_dets.push(kept.len() as i32);
        for d in kept {
            let b = d.bbox;
            self.boxes.extend_from_slice(&[b.x1, b.y1, b.x2, b.y2]);
            self.scores.push(d.score);
            self.classes.push(d.class_id as i32);
        }
        let padding = k - kept.len();
        self.boxes.extend(std::iter::repeat_n(0.0, 4 * padding));
        self.scores.extend(std::iter::repeat_n(0.0, padding));
        self.classes.extend(std::iter::repeat_n(-1, padding));
        let Some(h) = head else {
            return Ok(());
        };
        let cells = h.shape.width * h.shape.height;
        if h.prototypes.len() != h.shape.len() {
            return Err(Error::Shape(format!(
                "{} prototype values for one image; {} x {} x {} expected",
                h.prototypes.len(),
                MASK_COEFFICIENTS,
                h.shape.height,
                h.shape.width
            )));
        }
        for d in kept {
            self.coefficients.clear();
            crate::masks::coefficients_at(
                h.head,
                h.channels,
                h.anchors,
                d.anchor,
                &mut self.coefficients,
            )?;
            let start = self.masks.len();
            self.masks.resize(start + cells, 0.0);
            box_mask(
                &self.coefficients,
                h,
                d.bbox,
                &mut self.in_x,
                &mut self.masks[start..],
            );
        }
        self.masks.resize(self.masks.len() + padding * cells, 0.0);
        Ok(())
    }

    /// The batch's outputs; `masks` for segmentation models.
    pub fn outputs(&self, masks: bool) -> EndToEndOutputs<'_> {
        EndToEndOutputs {
            num_dets: &self.num_dets,
            boxes: &self.boxes,
            scores: &self.scores,
            classes: &self.classes,
            masks: masks.then_some(&self.masks[..]),
        }
    }
}

/// One detection's `det_masks` cells (`out`: height × width, zeroed): the graph's crop with the
/// same float operations (box × cells per pixel, ± the margin, `>=` / `<` on cell indices).
fn box_mask(
    coefficients: &[f32],
    h: &ImageHead<'_>,
    b: BoxXyxy,
    in_x: &mut Vec<bool>,
    out: &mut [f32],
) {
    let (pw, ph) = (h.shape.width, h.shape.height);
    let (sx, sy) = (
        pw as f32 / h.input_hw[1] as f32,
        ph as f32 / h.input_hw[0] as f32,
    );
    let (x1, x2) = (b.x1 * sx - MASK_MARGIN, b.x2 * sx + MASK_MARGIN);
    let (y1, y2) = (b.y1 * sy - MASK_MARGIN, b.y2 * sy + MASK_MARGIN);
    in_x.clear();
    in_x.extend((0..pw).map(|c| c as f32 >= x1 && (c as f32) < x2));
    let cells = pw * ph;
    for r in (0..ph).filter(|&r| r as f32 >= y1 && (r as f32) < y2) {
        for c in (0..pw).filter(|&c| in_x[c]) {
            let cell = r * pw + c;
            let z: f32 = coefficients
                .iter()
                .enumerate()
                .map(|(m, w)| w * h.prototypes[m * cells + cell])
                .sum();
            out[cell] = sigmoid(z);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box's mask covers exactly the cells within the margin of it, with the sigmoid of the
    /// dot product there; padding rows are zero with class −1.
    #[test]
    fn masks_cover_the_box_and_its_margin_and_rows_are_padded() {
        let shape = PrototypeShape {
            width: 8,
            height: 8,
        };
        let cells = 64;
        // Prototype m is the constant m / 100; the head has one anchor whose coefficients are 1.
        let prototypes: Vec<f32> = (0..MASK_COEFFICIENTS)
            .flat_map(|m| std::iter::repeat_n(m as f32 / 100.0, cells))
            .collect();
        let channels = 4 + 2 + MASK_COEFFICIENTS;
        let head = vec![1.0; channels];
        let h = ImageHead {
            head: &head,
            channels,
            anchors: 1,
            prototypes: &prototypes,
            shape,
            input_hw: [32, 32],
        };
        // Input 32 px = 8 cells: the box (12, 12)-(16, 16) px is cells 3..4, with the margin 1..6.
        let d = Detection {
            bbox: BoxXyxy::new(12.0, 12.0, 16.0, 16.0),
            score: 0.9,
            class_id: 1,
            anchor: 0,
        };
        let mut b = EndToEndBuffers::new();
        b.push_image(3, &[d], Some(&h)).expect("push");
        let o = b.outputs(true);
        assert_eq!(o.num_dets, &[1]);
        assert_eq!(o.classes, &[1, -1, -1]);
        assert_eq!(o.scores, &[0.9, 0.0, 0.0]);
        assert_eq!(&o.boxes[4..], &[0.0; 8]);
        let masks = o.masks.expect("masks");
        assert_eq!(masks.len(), 3 * cells);
        let z: f32 = (0..MASK_COEFFICIENTS).map(|m| m as f32 / 100.0).sum();
        for r in 0..8 {
            for c in 0..8 {
                let inside = (1..6).contains(&r) && (1..6).contains(&c);
                let want = if inside { sigmoid(z) } else { 0.0 };
                assert_eq!(masks[r * 8 + c], want, "cell ({r}, {c})");
            }
        }
        assert!(masks[cells..].iter().all(|&v| v == 0.0));
        // Wrong prototype sizes are named.
        let e = b
            .push_image(
                3,
                &[d],
                Some(&ImageHead {
                    prototypes: &[0.0; 3],
                    ..h
                }),
            )
            .expect_err("short prototypes")
            .to_string();
        assert!(e.contains("prototype"), "{e}");
    }
}
