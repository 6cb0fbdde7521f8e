//! COCO-style box evaluation, a faithful port of pycocotools' `COCOeval` (`iouType="bbox"`), plus the
//! precision and recall that YOLO's validator reports.
//!
//! The COCO part follows `cocoeval.py` step by step, because the numbers are only comparable with
//! published ones when every tie-break and off-by-one matches:
//! - IoU thresholds 0.50:0.05:0.95, 101 recall points, `maxDets` ladder `[1, 10, 100]` and the area
//!   ranges all / small (< 32²) / medium (32²..96²) / large (> 96²) in square pixels;
//! - boxes are compared as `[x, y, w, h]` with areas `w * h` (no `+1`), computed in `f64`;
//! - detections are ordered by score with a stable sort (pycocotools' `mergesort` on `-score`), so
//!   equal scores keep the order in which they were given; only the first 100 per image and class count;
//! - ground truth is stably ordered so that ignored objects (crowd, or outside the area range) come
//!   last; a detection matched to an ignored object is ignored, crowd objects can be matched many
//!   times and their IoU is `intersection / area(detection)`;
//! - the precision envelope is taken, recall thresholds are looked up with `searchsorted(side="left")`,
//!   and classes without (non-crowd) ground truth are left out of the means (precision `-1`).
//!
//! The order of the images given to [`Evaluator::add_image`] plays the role of COCO's sorted image
//! ids: across images, equal scores are ranked in that order.
//!
//! YOLO's precision and recall (what `val.py` prints as P and R) come from its `ap_per_class`: detections
//! are matched to labels at IoU ≥ 0.5, per-class precision and recall curves are interpolated on a
//! 1000-point confidence grid, and P and R are read at the confidence that maximises the (smoothed)
//! mean F1 over classes.

use std::fmt::Write as _;

use crate::detection::{Detection, GroundTruth};
use crate::error::{Error, Result};
use crate::masks::Rle;

/// Number of IoU thresholds (0.50, 0.55, …, 0.95).
pub const NUM_IOU_THRESHOLDS: usize = 10;
/// Number of recall points of the interpolated precision (0.00, 0.01, …, 1.00).
pub const NUM_RECALL_POINTS: usize = 101;
/// pycocotools' `maxDets` ladder: detections per image and class kept for each summary.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];
/// COCO's area ranges in square pixels, bounds inclusive: all, small, medium, large.
pub const AREA_RANGES: [(f64, f64); 4] = [
    (0.0, 1e10),
    (0.0, 32.0 * 32.0),
    (32.0 * 32.0, 96.0 * 96.0),
    (96.0 * 96.0, 1e10),
];
/// Labels of [`AREA_RANGES`], as pycocotools prints them.
pub const AREA_LABELS: [&str; 4] = ["all", "small", "medium", "large"];
/// IoU at which YOLO's precision and recall match detections to labels.
pub const YOLO_IOU: f64 = 0.5;

const NUM_AREAS: usize = AREA_RANGES.len();
const NUM_MAX_DETS: usize = MAX_DETS.len();
/// The largest `maxDets`: detections beyond it (per image and class) are dropped before matching.
const MAX_DET: usize = MAX_DETS[NUM_MAX_DETS - 1];
/// `np.spacing(1)`, the guard pycocotools adds to the precision's denominator.
const NP_SPACING_1: f64 = f64::EPSILON;
/// The `eps` of YOLO's `ap_per_class`.
const YOLO_EPS: f64 = 1e-16;
/// Points of YOLO's confidence grid.
const YOLO_GRID: usize = 1000;

/// `np.linspace(start, stop, N)`: `i * step + start`, with the last point exactly `stop`.
/// Reproduced bit for bit because thresholds are compared with `<` against IoUs.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// IoU thresholds 0.50:0.05:0.95 exactly as pycocotools builds them.
pub fn iou_thresholds() -> [f64; NUM_IOU_THRESHOLDS] {
    linspace(0.5, 0.95)
}

/// Recall points 0:0.01:1 exactly as pycocotools builds them.
pub fn recall_thresholds() -> [f64; NUM_RECALL_POINTS] {
    linspace(0.0, 1.0)
}

/// Descending by score with NaN last, the order of numpy's `argsort(-score)`.
fn by_score_desc(a: f64, b: f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal),
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
    }
}

/// A box as COCO stores it: top-left corner, width and height, in pixels.
#[derive(Clone, Copy)]
struct Xywh {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Xywh {
    fn from_xyxy(b: &crate::detection::BoxXyxy) -> Self {
        let (x1, y1) = (f64::from(b.x1), f64::from(b.y1));
        Xywh {
            x: x1,
            y: y1,
            w: f64::from(b.x2) - x1,
            h: f64::from(b.y2) - y1,
        }
    }

    fn area(&self) -> f64 {
        self.w * self.h
    }
}

/// pycocotools' `bbIou` (maskApi.c): `intersection / union`, or `intersection / area(dt)` for crowd.
fn coco_iou(dt: &Xywh, gt: &Xywh, crowd: bool) -> f64 {
    let w = (dt.w + dt.x).min(gt.w + gt.x) - dt.x.max(gt.x);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt.h + dt.y).min(gt.h + gt.y) - dt.y.max(gt.y);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let union = if crowd {
        dt.area()
    } else {
        dt.area() + gt.area() - inter
    };
    inter / union
}

/// How detections and ground-truth objects overlap: by boxes (bbox AP) or by instance masks
/// (segm AP), with the detections' areas that go with it.
enum Overlap<'a> {
    Boxes,
    Masks { gt: &'a [Rle], det: &'a [Rle] },
}

impl Overlap<'_> {
    /// pycocotools' IoU of detection `d` and object `g` (crowd regions: over the detection).
    fn coco_iou(&self, dets: &[Detection], d: usize, gts: &[GroundTruth], g: usize) -> Result<f64> {
        Ok(match self {
            Overlap::Boxes => coco_iou(
                &Xywh::from_xyxy(&dets[d].bbox),
                &Xywh::from_xyxy(&gts[g].bbox),
                gts[g].iscrowd,
            ),
            Overlap::Masks { gt, det } => det[d].iou(&gt[g], gts[g].iscrowd)?,
        })
    }

    /// YOLO's IoU of detection `d` and label `g`.
    fn yolo_iou(&self, dets: &[Detection], d: usize, gts: &[GroundTruth], g: usize) -> Result<f64> {
        Ok(match self {
            Overlap::Boxes => yolo_iou(&gts[g].bbox, &dets[d].bbox),
            Overlap::Masks { gt, det } => det[d].iou(&gt[g], false)?,
        })
    }

    /// The detection's area for the area ranges, in square pixels.
    fn det_area(&self, dets: &[Detection], d: usize) -> f64 {
        match self {
            Overlap::Boxes => Xywh::from_xyxy(&dets[d].bbox).area(),
            Overlap::Masks { det, .. } => det[d].area() as f64,
        }
    }
}

/// One detection's outcome for every area range: what `accumulate` needs from `evaluateImg`.
/// Kept compact (24 bytes) because a COCO-sized run holds over a million of them.
#[derive(Clone, Copy)]
struct DetRecord {
    /// The detection's score (an `f32`, so nothing is lost against the `f64` pycocotools reads).
    score: f32,
    /// Rank of the detection among its image's detections of this class (0 = highest score).
    rank: u8,
    /// Per area range, bit `t` set: matched at IoU threshold `t`.
    matched: [u16; NUM_AREAS],
    /// Per area range, bit `t` set: ignored at threshold `t` (matched to an ignored object, or
    /// unmatched and outside the area range).
    ignored: [u16; NUM_AREAS],
}

/// Everything accumulated for one class.
#[derive(Clone, Default)]
struct ClassAccum {
    /// Non-ignored ground-truth objects per area range (pycocotools' `npig`).
    npig: [usize; NUM_AREAS],
    /// Detections in image order, then score order within the image.
    dets: Vec<DetRecord>,
}

/// YOLO-style statistics of one detection: confidence, class, true positive at IoU 0.5.
#[derive(Clone, Copy)]
struct YoloDet {
    score: f32,
    class_id: u32,
    tp: bool,
}

/// Streaming COCO evaluator: add images one at a time, then [`Evaluator::summarize`].
///
/// ```
/// use kestrel_runtime::eval::Evaluator;
/// use kestrel_runtime::{BoxXyxy, Detection, GroundTruth};
/// let b = BoxXyxy::new(10.0, 10.0, 50.0, 60.0);
/// let gt = GroundTruth { bbox: b, class_id: 0, area: b.area(), iscrowd: false };
/// let dt = Detection { bbox: b, score: 0.9, class_id: 0, anchor: 0 };
/// let mut ev = Evaluator::new(1);
/// ev.add_image(&[gt], &[dt]).unwrap();
/// assert!((ev.summarize().ap - 1.0).abs() < 1e-12);
/// ```
pub struct Evaluator {
    num_classes: usize,
    images: usize,
    /// Per class.
    accum: Vec<ClassAccum>,
    /// Non-crowd ground-truth objects per class.
    instances: Vec<usize>,
    /// Images holding at least one non-crowd object of the class.
    images_with_class: Vec<usize>,
    yolo_dets: Vec<YoloDet>,
    iou_thrs: [f64; NUM_IOU_THRESHOLDS],
}

impl Evaluator {
    /// An evaluator for class ids `0..num_classes`.
    pub fn new(num_classes: usize) -> Self {
        Evaluator {
            num_classes,
            images: 0,
            accum: vec![Default::default(); num_classes],
            instances: vec![0; num_classes],
            images_with_class: vec![0; num_classes],
            yolo_dets: Vec::new(),
            iou_thrs: iou_thresholds(),
        }
    }

    /// Number of classes the evaluator was made for.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of images added so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Add one image's ground truth and detections (boxes in the pixels of that image, class ids
    /// already mapped to `0..num_classes`). The order of `gts` and `dets` matters only for ties, as in
    /// pycocotools (annotation order). Fails, adding nothing, when a class id is out of range.
    pub fn add_image(&mut self, gts: &[GroundTruth], dets: &[Detection]) -> Result<()> {
        self.add(gts, dets, &Overlap::Boxes)
    }

    /// [`Evaluator::add_image`] for instance segmentation (mask AP, pycocotools' `segm`):
    /// `gt_masks[k]` is the mask of `gts[k]` and `det_masks[k]` of `dets[k]`, all of the image's
    /// size. Objects and detections overlap by their masks; the area ranges read each ground
    /// truth's `area` (give its mask area) and each detection's mask area.
    pub fn add_image_masks(
        &mut self,
        gts: &[GroundTruth],
        gt_masks: &[Rle],
        dets: &[Detection],
        det_masks: &[Rle],
    ) -> Result<()> {
        if gt_masks.len() != gts.len() || det_masks.len() != dets.len() {
            return Err(Error::InvalidArgument(format!(
                "image {}: {} masks for {} objects and {} masks for {} detections; give one \
                 mask each",
                self.images,
                gt_masks.len(),
                gts.len(),
                det_masks.len(),
                dets.len()
            )));
        }
        if let Some(m) = gt_masks.iter().chain(det_masks).find(|m| {
            gt_masks
                .first()
                .or(det_masks.first())
                .is_some_and(|f| (f.width, f.height) != (m.width, m.height))
        }) {
            return Err(Error::Shape(format!(
                "image {}: a {}x{} mask among masks of another size; all masks of an image have \
                 its size",
                self.images, m.width, m.height
            )));
        }
        self.add(
            gts,
            dets,
            &Overlap::Masks {
                gt: gt_masks,
                det: det_masks,
            },
        )
    }

    fn add(&mut self, gts: &[GroundTruth], dets: &[Detection], overlap: &Overlap) -> Result<()> {
        let nc = self.num_classes;
        if let Some(g) = gts.iter().find(|g| g.class_id >= nc) {
            return Err(Error::InvalidArgument(format!(
                "image {} has a ground-truth object of class {} but the evaluator has {nc} classes \
                 (valid ids 0..{nc}); check that the dataset and the model use the same class list",
                self.images, g.class_id
            )));
        }
        if let Some(d) = dets.iter().find(|d| d.class_id >= nc) {
            return Err(Error::InvalidArgument(format!(
                "image {} has a detection of class {} but the evaluator has {nc} classes \
                 (valid ids 0..{nc}); check that the dataset and the model use the same class list",
                self.images, d.class_id
            )));
        }

        for class_id in 0..nc {
            let g: Vec<usize> = (0..gts.len())
                .filter(|&k| gts[k].class_id == class_id)
                .collect();
            let d: Vec<usize> = (0..dets.len())
                .filter(|&k| dets[k].class_id == class_id)
                .collect();
            if g.is_empty() && d.is_empty() {
                // pycocotools' evaluateImg returns None here: the pair contributes nothing.
                continue;
            }
            let n_real = g.iter().filter(|&&k| !gts[k].iscrowd).count();
            self.instances[class_id] += n_real;
            if n_real > 0 {
                self.images_with_class[class_id] += 1;
            }
            self.coco_image_class(class_id, gts, &g, dets, &d, overlap)?;
        }
        self.yolo_image(gts, dets, overlap)?;
        self.images += 1;
        Ok(())
    }

    /// pycocotools' `computeIoU` + `evaluateImg` for one image and class, for every area range.
    /// `gi` and `di` index the class's objects in `all_gts` and detections in `all_dets`.
    fn coco_image_class(
        &mut self,
        class_id: usize,
        all_gts: &[GroundTruth],
        gi: &[usize],
        all_dets: &[Detection],
        di: &[usize],
        overlap: &Overlap,
    ) -> Result<()> {
        let gts: Vec<&GroundTruth> = gi.iter().map(|&k| &all_gts[k]).collect();
        // Stable sort by descending score, then keep the first maxDets[-1] (computeIoU and evaluateImg).
        let mut order: Vec<usize> = di.to_vec();
        order.sort_by(|&a, &b| {
            by_score_desc(f64::from(all_dets[a].score), f64::from(all_dets[b].score))
        });
        order.truncate(MAX_DET);
        let (nd, ng) = (order.len(), gi.len());
        // ious[d * ng + g], ground truth in its original order (computeIoU); detection areas
        // for the area ranges (the box's, or the mask's for segm).
        let mut ious = vec![0.0f64; nd * ng];
        let mut dt_areas = Vec::with_capacity(nd);
        for (d, &dk) in order.iter().enumerate() {
            for (g, &gk) in gi.iter().enumerate() {
                ious[d * ng + g] = overlap.coco_iou(all_dets, dk, all_gts, gk)?;
            }
            dt_areas.push(overlap.det_area(all_dets, dk));
        }

        let mut records: Vec<DetRecord> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| DetRecord {
                score: all_dets[i].score,
                // rank < MAX_DET = 100, so it fits.
                rank: rank as u8,
                matched: [0; NUM_AREAS],
                ignored: [0; NUM_AREAS],
            })
            .collect();
        let acc = &mut self.accum[class_id];
        for (a, &(lo, hi)) in AREA_RANGES.iter().enumerate() {
            let area = |g: &GroundTruth| {
                let v = f64::from(g.area);
                v < lo || v > hi
            };
            let gt_ignore: Vec<bool> = gts.iter().map(|g| g.iscrowd || area(g)).collect();
            // Non-ignored first, otherwise original order (numpy mergesort on the ignore flag).
            let mut gt_order: Vec<usize> = (0..ng).collect();
            gt_order.sort_by_key(|&g| gt_ignore[g]);

            let mut matched = vec![0u16; nd];
            let mut ignored = vec![0u16; nd];
            let iou_thrs = &self.iou_thrs;
            if nd > 0 && ng > 0 {
                for (t, &thr) in iou_thrs.iter().enumerate() {
                    let mut gt_matched = vec![false; ng];
                    for d in 0..nd {
                        let mut best = thr.min(1.0 - 1e-10);
                        let mut m: Option<usize> = None;
                        for &g in &gt_order {
                            // A matched object is taken, unless it is a crowd region.
                            if gt_matched[g] && !gts[g].iscrowd {
                                continue;
                            }
                            // Already matched a real object and only ignored ones remain: stop.
                            if let Some(mg) = m
                                && !gt_ignore[mg]
                                && gt_ignore[g]
                            {
                                break;
                            }
                            let iou = ious[d * ng + g];
                            if iou < best {
                                continue;
                            }
                            best = iou;
                            m = Some(g);
                        }
                        if let Some(mg) = m {
                            matched[d] |= 1 << t;
                            if gt_ignore[mg] {
                                ignored[d] |= 1 << t;
                            }
                            gt_matched[mg] = true;
                        }
                    }
                }
            }
            // Unmatched detections outside the area range are ignored, not false positives.
            let all_thresholds = (1u16 << NUM_IOU_THRESHOLDS) - 1;
            for (d, &da) in dt_areas.iter().enumerate() {
                if da < lo || da > hi {
                    ignored[d] |= !matched[d] & all_thresholds;
                }
            }

            acc.npig[a] += gt_ignore.iter().filter(|&&i| !i).count();
            for (r, (m, i)) in records.iter_mut().zip(matched.iter().zip(&ignored)) {
                r.matched[a] = *m;
                r.ignored[a] = *i;
            }
        }
        acc.dets.extend(records);
        Ok(())
    }

    /// YOLO's `process_batch` at IoU 0.5: candidate pairs of the same class sorted by IoU, each
    /// detection keeps its best pair, then each label keeps its best remaining pair. Crowd regions are
    /// left out, as YOLO's COCO labels leave them out.
    fn yolo_image(
        &mut self,
        gts: &[GroundTruth],
        dets: &[Detection],
        overlap: &Overlap,
    ) -> Result<()> {
        let labels: Vec<usize> = (0..gts.len()).filter(|&k| !gts[k].iscrowd).collect();
        let mut pairs: Vec<(usize, usize, f64)> = Vec::new();
        for (li, &lk) in labels.iter().enumerate() {
            for (di, d) in dets.iter().enumerate() {
                if gts[lk].class_id != d.class_id {
                    continue;
                }
                let iou = overlap.yolo_iou(dets, di, gts, lk)?;
                if iou >= YOLO_IOU {
                    pairs.push((li, di, iou));
                }
            }
        }
        pairs.sort_by(|a, b| by_score_desc(a.2, b.2));
        let mut det_taken = vec![false; dets.len()];
        let mut label_taken = vec![false; labels.len()];
        let mut tp = vec![false; dets.len()];
        // Pass 1: the best pair of each detection (first occurrence in IoU order).
        let mut best_per_det: Vec<(usize, usize, f64)> = Vec::new();
        for &p in &pairs {
            if !det_taken[p.1] {
                det_taken[p.1] = true;
                best_per_det.push(p);
            }
        }
        // Pass 2: of those, the best pair of each label; still in IoU order.
        for &(li, di, _) in &best_per_det {
            if !label_taken[li] {
                label_taken[li] = true;
                tp[di] = true;
            }
        }
        self.yolo_dets
            .extend(dets.iter().zip(&tp).map(|(d, &tp)| YoloDet {
                score: d.score,
                // Class ids were checked against num_classes, which fits any realistic u32.
                class_id: d.class_id as u32,
                tp,
            }));
        Ok(())
    }

    /// pycocotools' `accumulate` and `summarize`, and YOLO's precision and recall.
    pub fn summarize(&self) -> EvalSummary {
        let coco = self.accumulate();
        let (yolo_p, yolo_r) = self.yolo_precision_recall();

        let valid: Vec<usize> = (0..self.num_classes)
            .filter(|&k| self.accum[k].npig[0] > 0)
            .collect();
        let per_class = valid
            .iter()
            .map(|&k| ClassAp {
                class_id: k,
                images: self.images_with_class[k],
                instances: self.instances[k],
                precision: yolo_p[k],
                recall: yolo_r[k],
                ap50: coco.mean_precision(Some(0), Some(k), 0, 2),
                ap: coco.mean_precision(None, Some(k), 0, 2),
                pr50: (0..NUM_RECALL_POINTS)
                    .map(|r| coco.precision[coco.p_index(0, r, k, 0, 2)].max(0.0))
                    .collect(),
            })
            .collect::<Vec<_>>();
        let mean = |v: &dyn Fn(&ClassAp) -> f64| {
            if per_class.is_empty() {
                0.0
            } else {
                per_class.iter().map(v).sum::<f64>() / per_class.len() as f64
            }
        };
        let t75 = 5; // index of 0.75 in the thresholds
        EvalSummary {
            images: self.images,
            instances: self.instances.iter().sum(),
            ap: coco.mean_precision(None, None, 0, 2),
            ap50: coco.mean_precision(Some(0), None, 0, 2),
            ap75: coco.mean_precision(Some(t75), None, 0, 2),
            ap_small: coco.mean_precision(None, None, 1, 2),
            ap_medium: coco.mean_precision(None, None, 2, 2),
            ap_large: coco.mean_precision(None, None, 3, 2),
            ar1: coco.mean_recall(0, 0),
            ar10: coco.mean_recall(0, 1),
            ar100: coco.mean_recall(0, 2),
            ar_small: coco.mean_recall(1, 2),
            ar_medium: coco.mean_recall(2, 2),
            ar_large: coco.mean_recall(3, 2),
            precision: mean(&|c| c.precision),
            recall: mean(&|c| c.recall),
            per_class,
        }
    }

    /// pycocotools' `accumulate`: precision `[T][R][K][A][M]` and recall `[T][K][A][M]`, -1 where the
    /// class has no non-ignored ground truth.
    fn accumulate(&self) -> CocoTables {
        let k_n = self.num_classes;
        let mut tables = CocoTables {
            num_classes: k_n,
            precision: vec![
                -1.0;
                NUM_IOU_THRESHOLDS * NUM_RECALL_POINTS * k_n * NUM_AREAS * NUM_MAX_DETS
            ],
            recall: vec![-1.0; NUM_IOU_THRESHOLDS * k_n * NUM_AREAS * NUM_MAX_DETS],
        };
        let rec_thrs = recall_thresholds();
        for k in 0..k_n {
            for a in 0..NUM_AREAS {
                let acc = &self.accum[k];
                if acc.npig[a] == 0 {
                    continue;
                }
                let npig = acc.npig[a] as f64;
                for (m, &max_det) in MAX_DETS.iter().enumerate() {
                    let mut dets: Vec<DetRecord> = acc
                        .dets
                        .iter()
                        .filter(|d| (d.rank as usize) < max_det)
                        .copied()
                        .collect();
                    // Stable: ties keep image order, then in-image order (numpy mergesort).
                    dets.sort_by(|x, y| by_score_desc(f64::from(x.score), f64::from(y.score)));
                    let nd = dets.len();
                    for t in 0..NUM_IOU_THRESHOLDS {
                        let bit = 1u16 << t;
                        let mut rc = Vec::with_capacity(nd);
                        let mut pr = Vec::with_capacity(nd);
                        let (mut tp, mut fp) = (0.0f64, 0.0f64);
                        for d in &dets {
                            if d.ignored[a] & bit == 0 {
                                if d.matched[a] & bit != 0 {
                                    tp += 1.0;
                                } else {
                                    fp += 1.0;
                                }
                            }
                            rc.push(tp / npig);
                            pr.push(tp / (fp + tp + NP_SPACING_1));
                        }
                        *tables.recall_mut(t, k, a, m) = rc.last().copied().unwrap_or(0.0);
                        // Precision envelope: make it non-increasing from the right.
                        for i in (1..nd).rev() {
                            if pr[i] > pr[i - 1] {
                                pr[i - 1] = pr[i];
                            }
                        }
                        for (r, &thr) in rec_thrs.iter().enumerate() {
                            // searchsorted(rc, thr, side="left"): first index with rc >= thr.
                            let idx = rc.partition_point(|&v| v < thr);
                            // Past the last detection the recall is never reached: precision 0.
                            let q = pr.get(idx).copied().unwrap_or(0.0);
                            *tables.precision_mut(t, r, k, a, m) = q;
                        }
                    }
                }
            }
        }
        tables
    }

    /// YOLO's `ap_per_class`: per-class precision and recall at the confidence maximising mean F1.
    /// Returns `(precision, recall)` indexed by class id (zero for classes without labels).
    fn yolo_precision_recall(&self) -> (Vec<f64>, Vec<f64>) {
        let nc = self.num_classes;
        let mut p_out = vec![0.0; nc];
        let mut r_out = vec![0.0; nc];
        let classes: Vec<usize> = (0..nc).filter(|&c| self.instances[c] > 0).collect();
        if classes.is_empty() {
            return (p_out, r_out);
        }
        let mut dets = self.yolo_dets.clone();
        dets.sort_by(|a, b| by_score_desc(f64::from(a.score), f64::from(b.score)));
        let px: [f64; YOLO_GRID] = linspace(0.0, 1.0);
        // p[ci][x], r[ci][x]: zero rows for classes without detections, as in YOLO.
        let mut p = vec![[0.0f64; YOLO_GRID]; classes.len()];
        let mut r = vec![[0.0f64; YOLO_GRID]; classes.len()];
        for (ci, &c) in classes.iter().enumerate() {
            let cls: Vec<&YoloDet> = dets.iter().filter(|d| d.class_id as usize == c).collect();
            if cls.is_empty() {
                continue;
            }
            let n_l = self.instances[c] as f64;
            let mut neg_conf = Vec::with_capacity(cls.len());
            let mut recall = Vec::with_capacity(cls.len());
            let mut precision = Vec::with_capacity(cls.len());
            let (mut tpc, mut fpc) = (0.0f64, 0.0f64);
            for d in &cls {
                if d.tp {
                    tpc += 1.0;
                } else {
                    fpc += 1.0;
                }
                neg_conf.push(-f64::from(d.score));
                recall.push(tpc / (n_l + YOLO_EPS));
                precision.push(tpc / (tpc + fpc));
            }
            for (x, &v) in px.iter().enumerate() {
                r[ci][x] = np_interp(-v, &neg_conf, &recall, 0.0);
                p[ci][x] = np_interp(-v, &neg_conf, &precision, 1.0);
            }
        }
        let mut f1_mean = [0.0f64; YOLO_GRID];
        for ci in 0..classes.len() {
            for x in 0..YOLO_GRID {
                let (pv, rv) = (p[ci][x], r[ci][x]);
                f1_mean[x] += 2.0 * pv * rv / (pv + rv + YOLO_EPS) / classes.len() as f64;
            }
        }
        let best = argmax_first(&smooth(&f1_mean, 0.1));
        for (ci, &c) in classes.iter().enumerate() {
            p_out[c] = p[ci][best];
            r_out[c] = r[ci][best];
        }
        (p_out, r_out)
    }
}

/// `box_iou` of YOLO (xyxy, no `+1`), in `f64`.
fn yolo_iou(a: &crate::detection::BoxXyxy, b: &crate::detection::BoxXyxy) -> f64 {
    let (ax1, ay1, ax2, ay2) = (
        f64::from(a.x1),
        f64::from(a.y1),
        f64::from(a.x2),
        f64::from(a.y2),
    );
    let (bx1, by1, bx2, by2) = (
        f64::from(b.x1),
        f64::from(b.y1),
        f64::from(b.x2),
        f64::from(b.y2),
    );
    let inter = (ax2.min(bx2) - ax1.max(bx1)).max(0.0) * (ay2.min(by2) - ay1.max(by1)).max(0.0);
    let union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// `np.interp(x, xp, fp, left=left)` for increasing `xp` (right = last value).
fn np_interp(x: f64, xp: &[f64], fp: &[f64], left: f64) -> f64 {
    let n = xp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x < xp[0] {
        return left;
    }
    if x >= xp[n - 1] {
        return fp[n - 1];
    }
    // j with xp[j] <= x < xp[j + 1]; duplicates in xp can't bracket x, so the slope is finite.
    let j = xp.partition_point(|&v| v <= x) - 1;
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    slope * (x - xp[j]) + fp[j]
}

/// YOLO's `smooth`: a box filter over a fraction `f` of the points, edges padded with edge values.
fn smooth(y: &[f64], f: f64) -> Vec<f64> {
    let n = y.len();
    if n == 0 {
        return Vec::new();
    }
    // round(len * f * 2) // 2 + 1: an odd number of taps.
    let nf = ((n as f64 * f * 2.0).round() as usize) / 2 + 1;
    let pad = nf / 2;
    let padded: Vec<f64> = std::iter::repeat_n(y[0], pad)
        .chain(y.iter().copied())
        .chain(std::iter::repeat_n(y[n - 1], pad))
        .collect();
    padded
        .windows(nf)
        .map(|w| w.iter().sum::<f64>() / nf as f64)
        .collect()
}

/// Index of the first maximum (numpy `argmax`); 0 for an empty slice.
fn argmax_first(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// pycocotools' `eval["precision"]` and `eval["recall"]`.
struct CocoTables {
    num_classes: usize,
    precision: Vec<f64>,
    recall: Vec<f64>,
}

impl CocoTables {
    fn p_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        (((t * NUM_RECALL_POINTS + r) * self.num_classes + k) * NUM_AREAS + a) * NUM_MAX_DETS + m
    }

    fn r_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        ((t * self.num_classes + k) * NUM_AREAS + a) * NUM_MAX_DETS + m
    }

    fn precision_mut(&mut self, t: usize, r: usize, k: usize, a: usize, m: usize) -> &mut f64 {
        let i = self.p_index(t, r, k, a, m);
        &mut self.precision[i]
    }

    fn recall_mut(&mut self, t: usize, k: usize, a: usize, m: usize) -> &mut f64 {
        let i = self.r_index(t, k, a, m);
        &mut self.recall[i]
    }

    /// `_summarize(ap=1)`: mean of the valid (> -1) precisions over thresholds (`t`, or all), recall
    /// points and classes (`k`, or all); -1 when none is valid.
    fn mean_precision(&self, t: Option<usize>, k: Option<usize>, a: usize, m: usize) -> f64 {
        let ts = t.map_or(0..NUM_IOU_THRESHOLDS, |t| t..t + 1);
        let ks = k.map_or(0..self.num_classes, |k| k..k + 1);
        let mut values = Vec::new();
        for t in ts {
            for r in 0..NUM_RECALL_POINTS {
                for k in ks.clone() {
                    values.push(self.precision[self.p_index(t, r, k, a, m)]);
                }
            }
        }
        mean_valid(&values)
    }

    /// `_summarize(ap=0)`: mean of the valid recalls over all thresholds and classes.
    fn mean_recall(&self, a: usize, m: usize) -> f64 {
        let mut values = Vec::new();
        for t in 0..NUM_IOU_THRESHOLDS {
            for k in 0..self.num_classes {
                values.push(self.recall[self.r_index(t, k, a, m)]);
            }
        }
        mean_valid(&values)
    }
}

/// `np.mean(s[s > -1])`, or -1 when nothing is valid.
fn mean_valid(values: &[f64]) -> f64 {
    let valid: Vec<f64> = values.iter().copied().filter(|&v| v > -1.0).collect();
    if valid.is_empty() {
        -1.0
    } else {
        valid.iter().sum::<f64>() / valid.len() as f64
    }
}

/// Metrics of one class (only classes with at least one non-crowd ground-truth object are listed).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassAp {
    pub class_id: usize,
    /// Images holding at least one non-crowd object of the class.
    pub images: usize,
    /// Non-crowd ground-truth objects of the class.
    pub instances: usize,
    /// YOLO-style precision at the confidence of best mean F1, in [0, 1].
    pub precision: f64,
    /// YOLO-style recall at the same confidence, in [0, 1].
    pub recall: f64,
    /// COCO AP at IoU 0.5 (area all, 100 detections), in [0, 1].
    pub ap50: f64,
    /// COCO AP averaged over IoU 0.50:0.95, in [0, 1].
    pub ap: f64,
    /// The precision-recall curve at IoU 0.50 as pycocotools interpolates it: precision at
    /// recall 0, 0.01, …, 1 (101 values, 0 beyond the highest recall reached).
    pub pr50: Vec<f64>,
}

/// The result of an evaluation. COCO numbers follow pycocotools: in [0, 1], or -1 when undefined (no
/// ground truth in that area range); `precision` and `recall` are YOLO's mean P and R (0 without
/// ground truth).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    /// Images evaluated.
    pub images: usize,
    /// Non-crowd ground-truth objects.
    pub instances: usize,
    /// AP@[.50:.95], area all, 100 detections (pycocotools `stats[0]`).
    pub ap: f64,
    /// AP@.50 (`stats[1]`).
    pub ap50: f64,
    /// AP@.75 (`stats[2]`).
    pub ap75: f64,
    /// AP for small objects, area < 32² px² (`stats[3]`).
    pub ap_small: f64,
    /// AP for medium objects, 32²..96² px² (`stats[4]`).
    pub ap_medium: f64,
    /// AP for large objects, > 96² px² (`stats[5]`).
    pub ap_large: f64,
    /// AR with 1 detection per image and class (`stats[6]`).
    pub ar1: f64,
    /// AR with 10 detections (`stats[7]`).
    pub ar10: f64,
    /// AR with 100 detections (`stats[8]`).
    pub ar100: f64,
    /// AR for small objects, 100 detections (`stats[9]`).
    pub ar_small: f64,
    /// AR for medium objects (`stats[10]`).
    pub ar_medium: f64,
    /// AR for large objects (`stats[11]`).
    pub ar_large: f64,
    /// YOLO mean precision over classes with ground truth, at the confidence of best mean F1.
    pub precision: f64,
    /// YOLO mean recall at the same confidence.
    pub recall: f64,
    /// One entry per class with non-crowd ground truth, by class id.
    pub per_class: Vec<ClassAp>,
}

impl EvalSummary {
    /// The twelve numbers of pycocotools' `COCOeval.stats`, in its order.
    pub fn coco_stats(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    /// A table like YOLO's `val.py`: an `all` row, then one row per class named from `names` (the
    /// class id when `names` is too short). mAP columns are the COCO numbers above.
    pub fn table<S: AsRef<str>>(&self, names: &[S]) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "{:>22}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
            "Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"
        );
        let _ = writeln!(
            s,
            "{:>22}{:>11}{:>11}{:>11.3}{:>11.3}{:>11.3}{:>11.3}",
            "all",
            self.images,
            self.instances,
            self.precision,
            self.recall,
            self.ap50.max(0.0),
            self.ap.max(0.0)
        );
        for c in &self.per_class {
            let name = names
                .get(c.class_id)
                .map_or_else(|| c.class_id.to_string(), |n| n.as_ref().to_string());
            let _ = writeln!(
                s,
                "{:>22}{:>11}{:>11}{:>11.3}{:>11.3}{:>11.3}{:>11.3}",
                name, c.images, c.instances, c.precision, c.recall, c.ap50, c.ap
            );
        }
        s
    }

    /// pycocotools' printed summary (the twelve `Average Precision/Recall` lines).
    pub fn coco_report(&self) -> String {
        let rows: [(&str, &str, &str, usize); 12] = [
            ("Precision", "0.50:0.95", "all", 100),
            ("Precision", "0.50", "all", 100),
            ("Precision", "0.75", "all", 100),
            ("Precision", "0.50:0.95", "small", 100),
            ("Precision", "0.50:0.95", "medium", 100),
            ("Precision", "0.50:0.95", "large", 100),
            ("Recall", "0.50:0.95", "all", 1),
            ("Recall", "0.50:0.95", "all", 10),
            ("Recall", "0.50:0.95", "all", 100),
            ("Recall", "0.50:0.95", "small", 100),
            ("Recall", "0.50:0.95", "medium", 100),
            ("Recall", "0.50:0.95", "large", 100),
        ];
        let mut s = String::new();
        for ((kind, iou, area, max_dets), v) in rows.iter().zip(self.coco_stats()) {
            let title = format!("Average {kind}");
            let short = if *kind == "Precision" { "(AP)" } else { "(AR)" };
            let _ = writeln!(
                s,
                " {title:<18} {short} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {v:.3}"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::BoxXyxy;

    /// pycocotools' precision is `tp / (tp + fp + eps)`, so a perfect score is 1 - 2.2e-16.
    fn assert_close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn gt(x1: f32, y1: f32, x2: f32, y2: f32, class_id: usize) -> GroundTruth {
        let bbox = BoxXyxy::new(x1, y1, x2, y2);
        GroundTruth {
            bbox,
            class_id,
            area: bbox.area(),
            iscrowd: false,
        }
    }

    fn dt(x1: f32, y1: f32, x2: f32, y2: f32, class_id: usize, score: f32) -> Detection {
        Detection {
            bbox: BoxXyxy::new(x1, y1, x2, y2),
            score,
            class_id,
            anchor: 0,
        }
    }

    #[test]
    fn thresholds_match_numpy_linspace() {
        let t = iou_thresholds();
        assert_eq!(t[0], 0.5);
        assert_eq!(t[9], 0.95);
        // numpy: np.linspace(.5, .95, 10)[5] == 0.75 and [1] == 0.55 exactly.
        assert_eq!(t[5], 0.75);
        assert_eq!(t[1], 0.55);
        let r = recall_thresholds();
        assert_close(r[100], 1.0);
        assert_eq!(r[1], 0.01);
    }

    #[test]
    fn perfect_detections_score_one() {
        let mut ev = Evaluator::new(2);
        let g = [
            gt(0.0, 0.0, 50.0, 50.0, 0),
            gt(100.0, 100.0, 300.0, 200.0, 1),
        ];
        let d = [
            dt(0.0, 0.0, 50.0, 50.0, 0, 0.9),
            dt(100.0, 100.0, 300.0, 200.0, 1, 0.8),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        assert_close(s.ap, 1.0);
        assert_close(s.ap50, 1.0);
        assert_close(s.ar100, 1.0);
        assert_eq!(s.ap_small, -1.0, "no small objects: undefined");
        assert_close(s.precision, 1.0);
        assert_close(s.recall, 1.0);
        assert_eq!(s.per_class.len(), 2);
    }

    #[test]
    fn false_positive_ranked_first_halves_precision() {
        // One object; a wrong detection with a higher score, then the right one.
        let mut ev = Evaluator::new(1);
        let g = [gt(0.0, 0.0, 100.0, 100.0, 0)];
        let d = [
            dt(200.0, 200.0, 300.0, 300.0, 0, 0.9),
            dt(0.0, 0.0, 100.0, 100.0, 0, 0.5),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        // Precision at every recall point is 1/2 for all thresholds.
        assert!((s.ap - 0.5).abs() < 1e-9, "{}", s.ap);
        assert_close(s.ar100, 1.0);
        assert_close(s.ar1, 0.0);
        // The curve at IoU .50 is that 1/2 at all 101 recall points, and its mean is AP50.
        let pr = &s.per_class[0].pr50;
        assert_eq!(pr.len(), NUM_RECALL_POINTS);
        assert!(pr.iter().all(|&p| (p - 0.5).abs() < 1e-12), "{pr:?}");
    }

    #[test]
    fn the_pr_curve_averages_to_ap50_and_drops_to_zero_past_the_last_recall() {
        // Two objects, one found: precision 1 up to recall 0.5, then 0.
        let mut ev = Evaluator::new(1);
        let g = [
            gt(0.0, 0.0, 100.0, 100.0, 0),
            gt(200.0, 200.0, 300.0, 300.0, 0),
        ];
        ev.add_image(&g, &[dt(0.0, 0.0, 100.0, 100.0, 0, 0.9)])
            .unwrap();
        let s = ev.summarize();
        let c = &s.per_class[0];
        assert!(
            c.pr50[..=50].iter().all(|&p| (p - 1.0).abs() < 1e-9),
            "{:?}",
            c.pr50
        );
        assert!(c.pr50[51..].iter().all(|&p| p == 0.0), "{:?}", c.pr50);
        let mean = c.pr50.iter().sum::<f64>() / c.pr50.len() as f64;
        assert!((mean - c.ap50).abs() < 1e-12, "{mean} vs {}", c.ap50);
    }

    #[test]
    fn iou_threshold_ladder() {
        // IoU = 0.62 when the detection covers 62% of the box and nothing else.
        let mut ev = Evaluator::new(1);
        let g = [gt(0.0, 0.0, 100.0, 10.0, 0)];
        let d = [dt(0.0, 0.0, 62.0, 10.0, 0, 0.9)];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        // Matched at 0.50, 0.55 and 0.60: 3 of 10 thresholds.
        assert!((s.ap - 0.3).abs() < 1e-9, "{}", s.ap);
        assert_close(s.ap50, 1.0);
        assert_close(s.ap75, 0.0);
    }

    #[test]
    fn crowd_regions_absorb_detections() {
        let mut ev = Evaluator::new(1);
        let mut crowd = gt(0.0, 0.0, 200.0, 200.0, 0);
        crowd.iscrowd = true;
        let g = [gt(300.0, 300.0, 350.0, 350.0, 0), crowd];
        // Two detections inside the crowd (IoU with crowd = inter/area(dt) = 1), one on the object.
        let d = [
            dt(10.0, 10.0, 50.0, 50.0, 0, 0.95),
            dt(60.0, 60.0, 90.0, 90.0, 0, 0.9),
            dt(300.0, 300.0, 350.0, 350.0, 0, 0.5),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        assert_close(s.ap, 1.0);
        assert_eq!(s.instances, 1);
    }

    #[test]
    fn classes_without_ground_truth_are_skipped() {
        let mut ev = Evaluator::new(3);
        let g = [gt(0.0, 0.0, 50.0, 50.0, 0)];
        let d = [
            dt(0.0, 0.0, 50.0, 50.0, 0, 0.9),
            dt(0.0, 0.0, 50.0, 50.0, 2, 0.99),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        assert_close(s.ap, 1.0);
        assert_eq!(s.per_class.len(), 1);
    }

    #[test]
    fn area_ranges_ignore_unmatched_out_of_range_detections() {
        // A small object and a large false positive: for the small range the large FP is ignored.
        let mut ev = Evaluator::new(1);
        let g = [gt(0.0, 0.0, 20.0, 20.0, 0)];
        let d = [
            dt(100.0, 100.0, 300.0, 300.0, 0, 0.9),
            dt(0.0, 0.0, 20.0, 20.0, 0, 0.5),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        assert_close(s.ap_small, 1.0);
        assert_eq!(s.ap_large, -1.0);
        assert!((s.ap - 0.5).abs() < 1e-9);
    }

    #[test]
    fn out_of_range_class_is_an_error() {
        let mut ev = Evaluator::new(1);
        let err = ev.add_image(&[gt(0.0, 0.0, 1.0, 1.0, 1)], &[]).unwrap_err();
        assert!(err.to_string().contains("class 1"), "{err}");
        assert_eq!(ev.images(), 0);
    }

    #[test]
    fn max_dets_keeps_the_best_hundred() {
        // 150 false positives scored below one true positive: AP stays 1 at maxDets 100.
        let mut ev = Evaluator::new(1);
        let g = [gt(0.0, 0.0, 40.0, 40.0, 0)];
        let mut d = vec![dt(0.0, 0.0, 40.0, 40.0, 0, 0.99)];
        for i in 0..150 {
            let x = 100.0 + i as f32;
            d.push(dt(x, 100.0, x + 10.0, 110.0, 0, 0.5));
        }
        ev.add_image(&g, &d).unwrap();
        assert_close(ev.summarize().ap, 1.0);
    }

    #[test]
    fn yolo_precision_recall_half() {
        // Two objects, one found, one false positive with a lower score.
        let mut ev = Evaluator::new(1);
        let g = [
            gt(0.0, 0.0, 40.0, 40.0, 0),
            gt(100.0, 100.0, 140.0, 140.0, 0),
        ];
        let d = [
            dt(0.0, 0.0, 40.0, 40.0, 0, 0.9),
            dt(200.0, 200.0, 240.0, 240.0, 0, 0.4),
        ];
        ev.add_image(&g, &d).unwrap();
        let s = ev.summarize();
        // Recall is 0.5 at every confidence up to 0.9. Precision falls linearly from 1 at 0.9 to 0.5
        // at 0.4 on the interpolated grid, and the 101-point smoothing window puts the best mean F1
        // a little below 0.9 (no F1 right of 0.9), so P is just under 1.
        assert!(s.precision > 0.9 && s.precision < 1.0, "{}", s.precision);
        assert!((s.recall - 0.5).abs() < 1e-6, "{}", s.recall);
    }

    #[test]
    fn np_interp_matches_numpy() {
        let xp = [-0.9, -0.5, -0.5, -0.1];
        let fp = [0.2, 0.4, 0.6, 1.0];
        assert_eq!(np_interp(-1.0, &xp, &fp, 7.0), 7.0);
        assert_close(np_interp(0.0, &xp, &fp, 7.0), 1.0);
        assert!((np_interp(-0.7, &xp, &fp, 7.0) - 0.3).abs() < 1e-12);
        // At a duplicated abscissa numpy takes the last one's value.
        assert!((np_interp(-0.5, &xp, &fp, 7.0) - 0.6).abs() < 1e-12);
    }

    #[test]
    fn smooth_keeps_length_and_constants() {
        let y = vec![2.0; 1000];
        let s = smooth(&y, 0.1);
        assert_eq!(s.len(), 1000);
        assert!(s.iter().all(|&v| (v - 2.0).abs() < 1e-12));
    }

    #[test]
    fn table_lists_all_and_classes() {
        let mut ev = Evaluator::new(2);
        ev.add_image(
            &[gt(0.0, 0.0, 50.0, 50.0, 1)],
            &[dt(0.0, 0.0, 50.0, 50.0, 1, 0.9)],
        )
        .unwrap();
        let t = ev.summarize().table(&["cat", "dog"]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("mAP50-95"));
        assert!(lines[1].trim_start().starts_with("all"));
        assert!(lines[2].trim_start().starts_with("dog"));
    }
}
