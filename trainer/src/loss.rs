//! YOLOv9's detection loss (`utils/loss_tal.py`): a task-aligned assigner picks, for each
//! ground-truth box, the anchors whose predictions already align best with it; classification
//! is BCE against IoU-scaled soft targets, boxes get CIoU and distribution-focal (DFL) losses.
//!
//! Segmentation models add YOLOv9's mask loss (`utils/segment/loss_tal.py`): each foreground
//! anchor's mask (its coefficients times the image's prototypes) against its ground-truth
//! object's mask, BCE inside the object's box, normalised by the box area.
//!
//! Boxes are `x1, y1, x2, y2`. Predictions come in grid units per anchor (the head's raw output);
//! the assigner works in input pixels, the box losses in grid units, as YOLOv9 does.

use kestrel_exporter::spec::REG_MAX;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// YOLOv9's loss hyperparameters (`hyp.scratch-high.yaml`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub boxes: f64,
    pub classes: f64,
    pub dfl: f64,
    /// The mask term of segmentation models (YOLOv9 uses the box gain).
    pub masks: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            boxes: 7.5,
            classes: 0.5,
            dfl: 1.5,
            masks: 7.5,
        }
    }
}

/// The task-aligned assigner's settings (YOLOv9: top-k 10, alpha 0.5, beta 6.0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AssignerConfig {
    pub top_k: i64,
    pub alpha: f64,
    pub beta: f64,
}

impl Default for AssignerConfig {
    fn default() -> Self {
        Self {
            top_k: 10,
            alpha: 0.5,
            beta: 6.0,
        }
    }
}

const EPS: f64 = 1e-9;

/// Complete IoU of paired boxes `[..., 4]` (x1, y1, x2, y2) → `[...]`: IoU minus the normalised
/// centre distance minus the aspect-ratio term (Zheng et al.), as YOLOv9's `bbox_iou(CIoU=True)`.
pub fn ciou(a: &Tensor, b: &Tensor) -> Tensor {
    let eps = 1e-7;
    let (ax1, ay1, ax2, ay2) = corners(a);
    let (bx1, by1, bx2, by2) = corners(b);
    let (w1, h1) = (&ax2 - &ax1, &ay2 - &ay1 + eps);
    let (w2, h2) = (&bx2 - &bx1, &by2 - &by1 + eps);
    let inter = (ax2.minimum(&bx2) - ax1.maximum(&bx1)).clamp_min(0.0)
        * (ay2.minimum(&by2) - ay1.maximum(&by1)).clamp_min(0.0);
    let union = &w1 * &h1 + &w2 * &h2 - &inter + eps;
    let iou = &inter / union;
    // Smallest enclosing box: its squared diagonal normalises the centre distance.
    let cw = ax2.maximum(&bx2) - ax1.minimum(&bx1);
    let ch = ay2.maximum(&by2) - ay1.minimum(&by1);
    let c2 = cw.square() + ch.square() + eps;
    let rho2 = ((&bx1 + &bx2 - &ax1 - &ax2).square() + (&by1 + &by2 - &ay1 - &ay2).square()) / 4.0;
    let v =
        ((&w2 / &h2).atan() - (&w1 / &h1).atan()).square() * (4.0 / std::f64::consts::PI.powi(2));
    let alpha = tch::no_grad(|| &v / (&v - &iou + (1.0 + eps)));
    iou - (rho2 / c2 + v * alpha)
}

fn corners(t: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let c = t.unbind(-1);
    (
        c[0].shallow_clone(),
        c[1].shallow_clone(),
        c[2].shallow_clone(),
        c[3].shallow_clone(),
    )
}

/// Distances from anchor points `[A, 2]` to the sides of boxes `[..., A, 4]` (left, top, right,
/// bottom), clamped to the DFL's range `[0, reg_max - 1 - 0.01]`.
fn box_to_distances(anchors: &Tensor, boxes: &Tensor) -> Tensor {
    let parts = boxes.split(2, -1);
    let lt = anchors - &parts[0];
    let rb = &parts[1] - anchors;
    Tensor::cat(&[lt, rb], -1).clamp(0.0, REG_MAX as f64 - 1.0 - 0.01)
}

/// Boxes `[..., A, 4]` from per-side distance distributions `[..., A, 4 · reg_max]` (softmax,
/// expectation) around anchor points `[A, 2]`, all in grid units.
pub fn decode_boxes(anchors: &Tensor, distributions: &Tensor) -> Tensor {
    let mut shape = distributions.size();
    let last = shape.len() - 1;
    shape[last] = 4;
    shape.push(REG_MAX as i64);
    let proj = Tensor::arange(REG_MAX as i64, (Kind::Float, distributions.device()));
    let d = distributions
        .view(shape.as_slice())
        .softmax(-1, Kind::Float)
        .matmul(&proj);
    let parts = d.split(2, -1);
    Tensor::cat(&[anchors - &parts[0], anchors + &parts[1]], -1)
}

/// The distribution focal loss of each positive anchor `[P, 4·reg_max]` against its target
/// distances `[P, 4]`: cross-entropy on the two bins around each distance, weighted by
/// closeness, averaged over the four sides → `[P]`.
pub fn dfl(distributions: &Tensor, targets: &Tensor) -> Tensor {
    let p = distributions.size()[0];
    let logits = distributions.view([p * 4, REG_MAX as i64]);
    let t = targets.view([p * 4]);
    let left = t.to_kind(Kind::Int64);
    let right = &left + 1;
    let w_left = right.to_kind(Kind::Float) - &t;
    let w_right = 1.0 - &w_left;
    let log_probs = logits.log_softmax(-1, Kind::Float);
    let ce =
        |idx: &Tensor| -> Tensor { -log_probs.gather(1, &idx.unsqueeze(1), false).squeeze_dim(1) };
    let per_side: Tensor = ce(&left) * w_left + ce(&right) * w_right;
    per_side.view([p, 4]).mean_dim(-1, false, Kind::Float)
}

/// What the assigner decided for a batch.
#[derive(Debug)]
pub struct Assignment {
    /// Soft class targets `[B, A, classes]` (alignment-scaled one-hot).
    pub scores: Tensor,
    /// Target boxes in pixels `[B, A, 4]` (meaningful where `foreground`).
    pub boxes: Tensor,
    /// Anchors assigned to some ground truth `[B, A]` (bool).
    pub foreground: Tensor,
    /// The ground-truth row each anchor is assigned to `[B, A]` (int64; meaningful where
    /// `foreground`).
    pub gt_index: Tensor,
}

/// YOLOv9's `TaskAlignedAssigner`. Inputs: sigmoid scores `[B, A, C]`, predicted boxes in pixels
/// `[B, A, 4]`, anchor centres in pixels `[A, 2]`, ground-truth classes `[B, N]` (int64),
/// boxes in pixels `[B, N, 4]` and a validity mask `[B, N]` (padding rows are 0).
pub fn assign(
    config: &AssignerConfig,
    scores: &Tensor,
    pred_boxes: &Tensor,
    anchors: &Tensor,
    gt_classes: &Tensor,
    gt_boxes: &Tensor,
    gt_valid: &Tensor,
) -> Result<Assignment> {
    tch::no_grad(|| {
        let [b, a, c] = dims3(scores)?;
        let n = gt_boxes.size()[1];
        let device = scores.device();
        if n == 0 {
            return Ok(Assignment {
                scores: scores.zeros_like(),
                boxes: pred_boxes.zeros_like(),
                foreground: Tensor::zeros([b, a], (Kind::Bool, device)),
                gt_index: Tensor::zeros([b, a], (Kind::Int64, device)),
            });
        }
        // Anchor centres strictly inside each ground-truth box: [B, N, A].
        let gt_lt = gt_boxes.narrow(2, 0, 2).unsqueeze(2);
        let gt_rb = gt_boxes.narrow(2, 2, 2).unsqueeze(2);
        let pts = anchors.view([1, 1, a, 2]);
        let deltas = Tensor::cat(&[&pts - gt_lt, gt_rb - &pts], -1);
        let inside = deltas.amin(-1, false).gt(EPS);
        let valid = gt_valid.to_kind(Kind::Bool).unsqueeze(-1);
        let candidates = inside.logical_and(&valid);

        // Alignment metric: score of the gt's class ^ alpha × CIoU(gt, prediction) ^ beta.
        let cls = gt_classes.clamp(0, c - 1).to_kind(Kind::Int64);
        let cls_scores =
            scores
                .transpose(1, 2)
                .gather(1, &cls.unsqueeze(-1).expand([b, n, a], false), false);
        let overlaps = ciou(&gt_boxes.unsqueeze(2), &pred_boxes.unsqueeze(1))
            .clamp_min(0.0)
            .where_self(&candidates, &Tensor::zeros([], (Kind::Float, device)));
        let metric =
            cls_scores.pow_tensor_scalar(config.alpha) * overlaps.pow_tensor_scalar(config.beta);
        let metric = metric.where_self(&candidates, &Tensor::zeros([], (Kind::Float, device)));

        // The top-k anchors of each ground truth, among its candidates.
        let k = config.top_k.min(a);
        let (_, top) = metric.topk(k, -1, true, true);
        let mut chosen = Tensor::zeros([b, n, a], (Kind::Float, device));
        chosen = chosen.scatter_add(-1, &top, &Tensor::ones([b, n, k], (Kind::Float, device)));
        let mut positive = chosen.gt(0.0).logical_and(&candidates);

        // An anchor claimed by several ground truths keeps the one it overlaps most.
        let claims = positive
            .to_kind(Kind::Float)
            .sum_dim_intlist(1, false, Kind::Float);
        let contested = claims.gt(1.0).unsqueeze(1).expand([b, n, a], false);
        let best = overlaps.argmax(1, false);
        let best_mask = best.one_hot(n).permute([0, 2, 1]).to_kind(Kind::Bool);
        positive = best_mask.where_self(&contested, &positive);
        let foreground = positive.any_dim(1, false);
        let gt_index = positive.to_kind(Kind::Float).argmax(1, false);

        // Targets gathered from the assigned ground truth.
        let boxes = gt_boxes.gather(1, &gt_index.unsqueeze(-1).expand([b, a, 4], false), false);
        let labels = cls.gather(1, &gt_index, false);
        let one_hot =
            labels.one_hot(c).to_kind(Kind::Float) * foreground.unsqueeze(-1).to_kind(Kind::Float);

        // Scale each target by the anchor's alignment relative to its gt's best, times that
        // gt's best IoU.
        let metric = metric * positive.to_kind(Kind::Float);
        let best_metric = metric.amax(-1, true);
        let best_overlap = (overlaps * positive.to_kind(Kind::Float)).amax(-1, true);
        let norm = (metric * best_overlap / (best_metric + EPS)).amax(1, false);
        Ok(Assignment {
            scores: one_hot * norm.unsqueeze(-1),
            boxes,
            foreground,
            gt_index,
        })
    })
}

fn dims3(t: &Tensor) -> Result<[i64; 3]> {
    match t.size()[..] {
        [a, b, c] => Ok([a, b, c]),
        ref s => Err(Error::Shape(format!("expected a 3-d tensor, got {s:?}"))),
    }
}

/// The loss terms (already weighted) and their sum. Like YOLOv9's, the detection terms are
/// normalised by the sum of the soft class targets; YOLOv9 then multiplies the sum by the batch
/// size for the optimiser, which the training loop does.
#[derive(Debug)]
pub struct LossTerms {
    pub total: Tensor,
    pub boxes: f64,
    pub classes: f64,
    pub dfl: f64,
    /// The mask term (0 for a detector).
    pub masks: f64,
}

/// YOLOv9's detection loss for raw head outputs `[B, 4·reg_max + C, A]` (grid units), anchor
/// centres `[A, 2]` and strides `[A, 1]` (grid units / pixels per cell), and ground truth as in
/// [`assign`] (pixels).
#[allow(clippy::too_many_arguments)]
pub fn detection_loss(
    raw: &Tensor,
    anchors: &Tensor,
    strides: &Tensor,
    gt_classes: &Tensor,
    gt_boxes: &Tensor,
    gt_valid: &Tensor,
    weights: &LossWeights,
    assigner: &AssignerConfig,
) -> Result<LossTerms> {
    let d = detection_terms(
        raw, anchors, strides, gt_classes, gt_boxes, gt_valid, weights, assigner,
    )?;
    Ok(d.finish(None))
}

/// YOLOv9's segmentation loss: the detection loss of the raw head's first `4·reg_max + C` rows
/// (`raw` is `[B, 4·reg_max + C + nm, A]`, the mask coefficients last) plus the mask term.
/// `prototypes` is `[B, nm, h, w]`; `gt_masks` `[B, h, w]` holds each image's objects as labels
/// (0 background, k + 1 where row k of `gt_boxes` is on top, YOLOv9's overlapping masks);
/// `input` is the network's input size (width, height) in pixels.
#[allow(clippy::too_many_arguments)]
pub fn segmentation_loss(
    raw: &Tensor,
    prototypes: &Tensor,
    anchors: &Tensor,
    strides: &Tensor,
    gt_classes: &Tensor,
    gt_boxes: &Tensor,
    gt_valid: &Tensor,
    gt_masks: &Tensor,
    input: [i64; 2],
    weights: &LossWeights,
    assigner: &AssignerConfig,
) -> Result<LossTerms> {
    let [b, channels, _] = dims3(raw)?;
    let (nm, h, w) = match prototypes.size()[..] {
        [pb, nm, h, w] if pb == b => (nm, h, w),
        ref s => {
            return Err(Error::Shape(format!(
                "prototypes {s:?} for a batch of {b}: expected [{b}, masks, height, width]"
            )));
        }
    };
    if gt_masks.size() != [b, h, w] {
        return Err(Error::Shape(format!(
            "ground-truth masks {:?}; the prototypes need [{b}, {h}, {w}] (a quarter of the input)",
            gt_masks.size()
        )));
    }
    let det_rows = channels - nm;
    let d = detection_terms(
        &raw.narrow(1, 0, det_rows),
        anchors,
        strides,
        gt_classes,
        gt_boxes,
        gt_valid,
        weights,
        assigner,
    )?;
    let coefficients = raw.narrow(1, det_rows, nm).transpose(1, 2); // [B, A, nm]
    let fg = &d.assignment.foreground;
    let scale = Tensor::from_slice(&[
        1.0 / input[0] as f32,
        1.0 / input[1] as f32,
        1.0 / input[0] as f32,
        1.0 / input[1] as f32,
    ])
    .to_device(raw.device());
    let cols = Tensor::arange(w, (Kind::Float, raw.device())).view([1, 1, w]);
    let rows = Tensor::arange(h, (Kind::Float, raw.device())).view([1, h, 1]);
    let mut total = raw.sum(Kind::Float) * 0.0;
    for i in 0..b {
        let fg_i = fg.get(i);
        if fg_i.sum(Kind::Int64).int64_value(&[]) == 0 {
            continue;
        }
        let index = d.assignment.gt_index.get(i).masked_select(&fg_i);
        let target = gt_masks
            .get(i)
            .unsqueeze(0)
            .eq_tensor(&(index + 1).to_kind(Kind::Float).view([-1, 1, 1]))
            .to_kind(Kind::Float);
        let boxes = d
            .assignment
            .boxes
            .get(i)
            .masked_select(&fg_i.unsqueeze(-1))
            .view([-1, 4])
            * &scale;
        let area =
            (boxes.select(1, 2) - boxes.select(1, 0)) * (boxes.select(1, 3) - boxes.select(1, 1));
        let coef = coefficients
            .get(i)
            .masked_select(&fg_i.unsqueeze(-1))
            .view([-1, nm]);
        let logits = coef
            .matmul(&prototypes.get(i).view([nm, -1]))
            .view([-1, h, w]);
        let bce = logits.binary_cross_entropy_with_logits::<Tensor>(
            &target,
            None,
            None,
            tch::Reduction::None,
        );
        // YOLO's crop_mask: cells whose index lies in [x1, x2) × [y1, y2) in mask cells.
        let edge = |k: i64, size: i64| (boxes.select(1, k) * size as f64).view([-1, 1, 1]);
        let inside = cols
            .ge_tensor(&edge(0, w))
            .logical_and(&cols.lt_tensor(&edge(2, w)))
            .logical_and(&rows.ge_tensor(&edge(1, h)))
            .logical_and(&rows.lt_tensor(&edge(3, h)))
            .to_kind(Kind::Float);
        let per_object =
            (bce * inside).mean_dim([1, 2].as_slice(), false, Kind::Float) / area.clamp_min(EPS);
        total = total + per_object.mean(Kind::Float);
    }
    let masks = total * (weights.masks / b as f64);
    Ok(d.finish(Some(masks)))
}

/// The detection terms (weighted) and the assignment they came from.
struct DetectionTerms {
    boxes: Tensor,
    classes: Tensor,
    dfl: Tensor,
    assignment: Assignment,
}

impl DetectionTerms {
    fn finish(self, masks: Option<Tensor>) -> LossTerms {
        let value = |t: &Tensor| t.double_value(&[]);
        let mut total = &self.boxes + &self.classes + &self.dfl;
        let mut mask_value = 0.0;
        if let Some(m) = masks {
            mask_value = value(&m);
            total = total + m;
        }
        LossTerms {
            boxes: value(&self.boxes),
            classes: value(&self.classes),
            dfl: value(&self.dfl),
            masks: mask_value,
            total,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn detection_terms(
    raw: &Tensor,
    anchors: &Tensor,
    strides: &Tensor,
    gt_classes: &Tensor,
    gt_boxes: &Tensor,
    gt_valid: &Tensor,
    weights: &LossWeights,
    assigner: &AssignerConfig,
) -> Result<DetectionTerms> {
    let [b, channels, _] = dims3(raw)?;
    let classes = channels - 4 * REG_MAX as i64;
    if classes < 1 {
        return Err(Error::Shape(format!(
            "the head output has {channels} channels, fewer than 4 x {REG_MAX} + 1"
        )));
    }
    let raw = raw.transpose(1, 2);
    let parts = raw.split_with_sizes([4 * REG_MAX as i64, classes], -1);
    let (distributions, logits) = (&parts[0], &parts[1]);
    let pred_boxes = decode_boxes(anchors, distributions);

    let assignment = assign(
        assigner,
        &logits.sigmoid().detach(),
        &(pred_boxes.detach() * strides),
        &(anchors * strides),
        gt_classes,
        gt_boxes,
        gt_valid,
    )?;
    let target_sum = assignment.scores.sum(Kind::Float).clamp_min(1.0);
    let cls_loss = logits.binary_cross_entropy_with_logits::<Tensor>(
        &assignment.scores,
        None,
        None,
        tch::Reduction::Sum,
    ) / &target_sum;

    let fg = &assignment.foreground;
    let (box_loss, dfl_loss) = if fg.sum(Kind::Int64).int64_value(&[]) > 0 {
        let weight = assignment
            .scores
            .sum_dim_intlist(-1, false, Kind::Float)
            .masked_select(fg);
        let target_boxes = &assignment.boxes / strides;
        let mask4 = fg.unsqueeze(-1).expand_as(&pred_boxes);
        let p = pred_boxes.masked_select(&mask4).view([-1, 4]);
        let t = target_boxes.masked_select(&mask4).view([-1, 4]);
        let iou = ciou(&p, &t);
        let miss: Tensor = 1.0 - iou;
        let box_loss = (miss * &weight).sum(Kind::Float) / &target_sum;
        let a = anchors.size()[0];
        let anchors_b = anchors.unsqueeze(0).expand([b, a, 2], false);
        let pts = anchors_b
            .masked_select(&fg.unsqueeze(-1).expand([b, a, 2], false))
            .view([-1, 2]);
        let dist_targets = box_to_distances(&pts, &t);
        let mask_d = fg.unsqueeze(-1).expand_as(distributions);
        let d = distributions
            .masked_select(&mask_d)
            .view([-1, 4 * REG_MAX as i64]);
        let dfl_loss = (dfl(&d, &dist_targets) * &weight).sum(Kind::Float) / &target_sum;
        (box_loss, dfl_loss)
    } else {
        let zero = raw.sum(Kind::Float) * 0.0;
        (zero.shallow_clone(), zero)
    };
    Ok(DetectionTerms {
        boxes: box_loss * weights.boxes,
        classes: cls_loss * weights.classes,
        dfl: dfl_loss * weights.dfl,
        assignment,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).view(shape)
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} vs {b}");
    }

    #[test]
    fn ciou_matches_hand_computed_values() {
        let pairs = [
            // Overlapping squares: IoU 1/7, centre term 2/18, no aspect term.
            (
                [0.0, 0.0, 2.0, 2.0],
                [1.0, 1.0, 3.0, 3.0],
                1.0 / 7.0 - 2.0 / 18.0,
            ),
            // Transposed rectangles: IoU 1/3, centre 2/32, aspect term v·alpha = 0.033752.
            ([0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.0, 4.0], 0.237_081_7),
            ([0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 32.0, 32.0], 1.0),
            // Concentric: IoU 784/1024 and nothing else.
            ([0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 30.0, 30.0], 0.765_625),
        ];
        for (a, b, want) in pairs {
            let got = ciou(&t(&a, &[4]), &t(&b, &[4])).double_value(&[]);
            close(got, want, 1e-5);
        }
        // Broadcasting [2, 1, 4] x [1, 3, 4] -> [2, 3].
        let a = Tensor::rand([2, 1, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::rand([1, 3, 4], (Kind::Float, Device::Cpu));
        assert_eq!(ciou(&a, &b).size(), vec![2, 3]);
    }

    #[test]
    fn dfl_is_the_closeness_weighted_cross_entropy_of_the_two_nearest_bins() {
        // Uniform distributions: every bin has probability 1/16, so the loss is ln 16.
        let uniform = Tensor::zeros([2, 4 * REG_MAX as i64], (Kind::Float, Device::Cpu));
        let targets = t(&[0.5, 3.25, 7.0, 14.99, 1.0, 2.0, 3.0, 4.0], &[2, 4]);
        let got = dfl(&uniform, &targets);
        for v in Vec::<f32>::try_from(&got).unwrap() {
            close(v as f64, 16f64.ln(), 1e-5);
        }
        // All mass split evenly on bins 3 and 4, target 3.25 on every side: ln 2 for each bin.
        let mut logits = vec![-30.0f32; 4 * REG_MAX];
        for side in 0..4 {
            logits[side * REG_MAX + 3] = 30.0;
            logits[side * REG_MAX + 4] = 30.0;
        }
        let got = dfl(&t(&logits, &[1, 64]), &t(&[3.25; 4], &[1, 4]));
        close(got.double_value(&[0]), 2f64.ln(), 1e-4);
    }

    #[test]
    fn decoding_uniform_distributions_puts_each_side_at_the_middle_bin() {
        let anchors = t(&[10.5, 20.5], &[1, 2]);
        let d = Tensor::zeros([1, 1, 4 * REG_MAX as i64], (Kind::Float, Device::Cpu));
        let b = Vec::<f32>::try_from(decode_boxes(&anchors, &d).flatten(0, -1)).unwrap();
        assert_eq!(b, vec![3.0, 13.0, 18.0, 28.0]);
    }

    #[test]
    fn assigner_picks_the_top_k_aligned_anchors_inside_the_box() {
        // One ground truth (class 1 of 2) over [0, 32]²; four anchors, the last outside it.
        let anchors = t(&[4.0, 4.0, 12.0, 12.0, 20.0, 20.0, 40.0, 40.0], &[4, 2]);
        let pred = t(
            &[
                2.0, 2.0, 30.0, 30.0, // CIoU 0.765625
                0.0, 0.0, 32.0, 32.0, // exact
                4.0, 0.0, 36.0, 32.0, // CIoU 0.770881
                0.0, 0.0, 32.0, 32.0, // exact, but its anchor is outside the box
            ],
            &[1, 4, 4],
        );
        let scores = Tensor::full([1, 4, 2], 0.5, (Kind::Float, Device::Cpu));
        let gt_classes = Tensor::from_slice(&[1i64]).view([1, 1]);
        let gt_boxes = t(&[0.0, 0.0, 32.0, 32.0], &[1, 1, 4]);
        let valid = Tensor::ones([1, 1], (Kind::Float, Device::Cpu));
        let config = AssignerConfig {
            top_k: 2,
            ..Default::default()
        };
        let a = assign(
            &config,
            &scores,
            &pred,
            &anchors,
            &gt_classes,
            &gt_boxes,
            &valid,
        )
        .unwrap();
        let fg = Vec::<bool>::try_from(a.foreground.flatten(0, -1)).unwrap();
        assert_eq!(fg, vec![false, true, true, false]);
        let s = Vec::<f32>::try_from(a.scores.flatten(0, -1)).unwrap();
        // The best-aligned anchor gets the gt's best IoU (1); the other its alignment relative
        // to the best: (0.770881 / 1)^6 (the class scores are equal).
        close(s[3] as f64, 1.0, 1e-4);
        close(s[5] as f64, 0.770_881_2f64.powi(6), 1e-4);
        assert_eq!(
            (s[0], s[1], s[2], s[4], s[6], s[7]),
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        );
        let boxes = Vec::<f32>::try_from(a.boxes.get(0).get(2)).unwrap();
        assert_eq!(boxes, vec![0.0, 0.0, 32.0, 32.0]);
    }

    #[test]
    fn an_anchor_claimed_by_two_boxes_goes_to_the_one_it_overlaps_most() {
        let anchors = t(&[16.0, 16.0], &[1, 2]);
        let pred = t(&[8.0, 8.0, 24.0, 24.0], &[1, 1, 4]);
        let scores = Tensor::full([1, 1, 2], 0.5, (Kind::Float, Device::Cpu));
        let gt_classes = Tensor::from_slice(&[0i64, 1]).view([1, 2]);
        let gt_boxes = t(&[0.0, 0.0, 32.0, 32.0, 8.0, 8.0, 24.0, 24.0], &[1, 2, 4]);
        let valid = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let a = assign(
            &AssignerConfig::default(),
            &scores,
            &pred,
            &anchors,
            &gt_classes,
            &gt_boxes,
            &valid,
        )
        .unwrap();
        let s = Vec::<f32>::try_from(a.scores.flatten(0, -1)).unwrap();
        assert_eq!(s[0], 0.0);
        close(s[1] as f64, 1.0, 1e-4);
        // A padding row (valid 0) claims nothing.
        let valid = t(&[1.0, 0.0], &[1, 2]);
        let a = assign(
            &AssignerConfig::default(),
            &scores,
            &pred,
            &anchors,
            &gt_classes,
            &gt_boxes,
            &valid,
        )
        .unwrap();
        let s = Vec::<f32>::try_from(a.scores.flatten(0, -1)).unwrap();
        assert!(s[0] > 0.0 && s[1] == 0.0, "{s:?}");
    }

    #[test]
    fn detection_loss_is_finite_and_differentiable() {
        tch::manual_seed(1);
        let a = 6;
        let raw = Tensor::randn([2, 4 * REG_MAX as i64 + 3, a], (Kind::Float, Device::Cpu))
            .set_requires_grad(true);
        let anchors = t(
            &[0.5, 0.5, 1.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.5, 0.5, 0.5, 0.5],
            &[a, 2],
        );
        let strides = t(&[8.0, 8.0, 8.0, 8.0, 16.0, 32.0], &[a, 1]);
        let gt_classes = Tensor::from_slice(&[2i64, 0, 1, 0]).view([2, 2]);
        let gt_boxes = t(
            &[
                0.0, 0.0, 16.0, 16.0, 4.0, 4.0, 12.0, 12.0, 0.0, 0.0, 20.0, 20.0, 0.0, 0.0, 0.0,
                0.0,
            ],
            &[2, 2, 4],
        );
        let valid = t(&[1.0, 1.0, 1.0, 0.0], &[2, 2]);
        let loss = detection_loss(
            &raw,
            &anchors,
            &strides,
            &gt_classes,
            &gt_boxes,
            &valid,
            &LossWeights::default(),
            &AssignerConfig::default(),
        )
        .unwrap();
        for v in [loss.boxes, loss.classes, loss.dfl] {
            assert!(v.is_finite() && v > 0.0, "{loss:?}");
        }
        loss.total.backward();
        let g = raw.grad();
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
