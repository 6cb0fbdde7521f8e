//! Decoding of YOLOv9's `output0` and class-aware greedy NMS on the CPU — the reference every GPU
//! implementation is tested against.
//!
//! `output0` of one image is `[4 + nc (+ extra), anchors]` row-major: rows 0–3 are box centre x,
//! centre y, width, height in input pixels, then one sigmoid score per class (segmentation models
//! append mask coefficients, which decoding ignores).

use crate::detection::{BoxXyxy, Detection};
use crate::error::{Error, Result};
use crate::letterbox::LetterboxParams;

/// Thresholds and limits of one post-processing call.
#[derive(Debug, Clone, PartialEq)]
pub struct NmsConfig {
    /// Candidates need a score strictly above this (0–1).
    pub conf_threshold: f32,
    /// A candidate is suppressed by a kept box of its class with IoU strictly above this (0–1).
    pub iou_threshold: f32,
    /// Detections kept per image.
    pub max_detections: usize,
    /// Candidates entering NMS per image, highest scores first (YOLO's `max_nms`).
    pub max_candidates: usize,
    /// Every class above the threshold is a candidate (YOLO's validation); otherwise only the best.
    pub multi_label: bool,
    /// Suppress across classes.
    pub agnostic: bool,
    /// Keep only these class ids (`None`: all).
    pub classes: Option<Vec<usize>>,
}

impl NmsConfig {
    /// YOLOv9's validation settings: conf 0.001, IoU 0.7, 300 detections, multi-label.
    pub fn evaluation() -> Self {
        Self {
            conf_threshold: 0.001,
            iou_threshold: 0.7,
            max_detections: 300,
            max_candidates: 30_000,
            multi_label: true,
            agnostic: false,
            classes: None,
        }
    }

    /// Display settings: conf 0.25, IoU 0.45, 300 detections, best class only.
    pub fn display() -> Self {
        Self {
            conf_threshold: 0.25,
            iou_threshold: 0.45,
            multi_label: false,
            ..Self::evaluation()
        }
    }

    /// Check ranges; every error names the setting.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.conf_threshold) {
            return Err(Error::InvalidArgument(format!(
                "confidence threshold {} is outside [0, 1]",
                self.conf_threshold
            )));
        }
        if !(0.0..=1.0).contains(&self.iou_threshold) {
            return Err(Error::InvalidArgument(format!(
                "IoU threshold {} is outside [0, 1]",
                self.iou_threshold
            )));
        }
        if self.max_detections == 0 || self.max_candidates == 0 {
            return Err(Error::InvalidArgument(
                "max detections and max candidates must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A box before NMS, in input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub bbox: BoxXyxy,
    pub score: f32,
    pub class_id: usize,
    pub anchor: usize,
}

/// Candidates of one image's `output0` (`channels x anchors`, row-major), in (anchor, class)
/// order. Non-finite scores and boxes are never candidates.
pub fn decode_candidates(
    output: &[f32],
    num_classes: usize,
    anchors: usize,
    cfg: &NmsConfig,
    out: &mut Vec<Candidate>,
) -> Result<()> {
    out.clear();
    if output.len() < (4 + num_classes) * anchors {
        return Err(Error::Shape(format!(
            "output holds {} values, {} classes x {anchors} anchors need at least {}",
            output.len(),
            num_classes,
            (4 + num_classes) * anchors
        )));
    }
    let row = |r: usize| &output[r * anchors..(r + 1) * anchors];
    let (cx, cy, w, h) = (row(0), row(1), row(2), row(3));
    let allowed = |c: usize| cfg.classes.as_ref().is_none_or(|v| v.contains(&c));
    for a in 0..anchors {
        let bbox = BoxXyxy::from_xywh(cx[a], cy[a], w[a], h[a]);
        if !(bbox.x1.is_finite()
            && bbox.y1.is_finite()
            && bbox.x2.is_finite()
            && bbox.y2.is_finite())
        {
            continue;
        }
        if cfg.multi_label {
            for c in 0..num_classes {
                let s = output[(4 + c) * anchors + a];
                if s.is_finite() && s > cfg.conf_threshold && allowed(c) {
                    out.push(Candidate {
                        bbox,
                        score: s,
                        class_id: c,
                        anchor: a,
                    });
                }
            }
        } else {
            // Best class; ties go to the lower class id, NaN never wins.
            let mut best: Option<(usize, f32)> = None;
            for c in (0..num_classes).filter(|&c| allowed(c)) {
                let s = output[(4 + c) * anchors + a];
                if s.is_finite() && best.is_none_or(|(_, b)| s > b) {
                    best = Some((c, s));
                }
            }
            if let Some((c, s)) = best.filter(|&(_, s)| s > cfg.conf_threshold) {
                out.push(Candidate {
                    bbox,
                    score: s,
                    class_id: c,
                    anchor: a,
                });
            }
        }
    }
    Ok(())
}

/// Greedy class-aware NMS: sort by score (ties by candidate order), cap to `max_candidates`, keep
/// a candidate unless a kept box of the same class (any class when agnostic) overlaps it with IoU
/// above the threshold; stop at `max_detections`. `cands` is reordered.
pub fn nms(cands: &mut Vec<Candidate>, cfg: &NmsConfig, kept: &mut Vec<Candidate>) {
    kept.clear();
    // Stable: equal scores keep (anchor, class) order, so results are deterministic.
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    cands.truncate(cfg.max_candidates);
    for c in cands.iter() {
        if kept.len() >= cfg.max_detections {
            break;
        }
        let suppressed = kept.iter().any(|k| {
            (cfg.agnostic || k.class_id == c.class_id) && k.bbox.iou(&c.bbox) > cfg.iou_threshold
        });
        if !suppressed {
            kept.push(*c);
        }
    }
}

/// Post-processing of one model's outputs with reusable buffers (no allocation once warm).
#[derive(Debug, Default)]
pub struct Postprocessor {
    candidates: Vec<Candidate>,
    kept: Vec<Candidate>,
}

impl Postprocessor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Detections of one image: decode `output` (`channels x anchors`), NMS, then map boxes to
    /// source pixels through `letterbox` and clip them to the source image. Appends to `out`.
    pub fn run(
        &mut self,
        output: &[f32],
        num_classes: usize,
        anchors: usize,
        letterbox: &LetterboxParams,
        cfg: &NmsConfig,
        out: &mut Vec<Detection>,
    ) -> Result<()> {
        decode_candidates(output, num_classes, anchors, cfg, &mut self.candidates)?;
        nms(&mut self.candidates, cfg, &mut self.kept);
        let (w, h) = (letterbox.src_w as f32, letterbox.src_h as f32);
        out.extend(self.kept.iter().map(|k| Detection {
            bbox: letterbox.to_source(k.bbox).clip(w, h),
            score: k.score,
            class_id: k.class_id,
            anchor: k.anchor,
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator for test data.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// The textbook formulation: repeatedly take the best remaining box (score, then order) and
    /// delete everything of its class that overlaps it too much.
    fn brute_force(cands: &[Candidate], cfg: &NmsConfig) -> Vec<Candidate> {
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_by(|&a, &b| cands[b].score.total_cmp(&cands[a].score).then(a.cmp(&b)));
        order.truncate(cfg.max_candidates);
        let mut alive = vec![true; cands.len()];
        let mut kept = Vec::new();
        loop {
            let best = order.iter().copied().find(|&i| alive[i]);
            let Some(i) = best else { break };
            if kept.len() == cfg.max_detections {
                break;
            }
            kept.push(cands[i]);
            alive[i] = false;
            for &j in &order {
                if alive[j]
                    && (cfg.agnostic || cands[j].class_id == cands[i].class_id)
                    && cands[i].bbox.iou(&cands[j].bbox) > cfg.iou_threshold
                {
                    alive[j] = false;
                }
            }
        }
        kept
    }

    fn random_output(rng: &mut Lcg, nc: usize, anchors: usize, coarse: bool) -> Vec<f32> {
        let mut out = vec![0f32; (4 + nc) * anchors];
        for a in 0..anchors {
            let q = |v: f32| if coarse { (v * 4.0).round() / 4.0 } else { v };
            out[a] = q(rng.next()) * 100.0;
            out[anchors + a] = q(rng.next()) * 100.0;
            out[2 * anchors + a] = q(rng.next()) * 40.0;
            out[3 * anchors + a] = q(rng.next()) * 40.0;
            for c in 0..nc {
                // Coarse scores create many exact ties.
                out[(4 + c) * anchors + a] = q(rng.next());
            }
        }
        out
    }

    #[test]
    fn equals_brute_force_on_random_boxes_with_ties() {
        let mut rng = Lcg(7);
        for trial in 0..60 {
            let nc = 1 + trial % 5;
            let anchors = 50 + trial * 7;
            let coarse = trial % 2 == 0;
            let mut out = random_output(&mut rng, nc, anchors, coarse);
            // Zero-area boxes and NaN / infinite scores.
            out[2 * anchors] = 0.0;
            out[3 * anchors + 1] = 0.0;
            out[4 * anchors + 2] = f32::NAN;
            out[4 * anchors + 3] = f32::INFINITY;
            out[anchors + 4] = f32::NAN;
            for multi_label in [true, false] {
                for agnostic in [false, true] {
                    let cfg = NmsConfig {
                        conf_threshold: 0.2,
                        iou_threshold: [0.3, 0.45, 0.7][trial % 3],
                        max_detections: [300, 5][trial % 2],
                        max_candidates: [30_000, 40][(trial / 2) % 2],
                        multi_label,
                        agnostic,
                        classes: None,
                    };
                    let mut cands = Vec::new();
                    decode_candidates(&out, nc, anchors, &cfg, &mut cands).unwrap();
                    assert!(cands.iter().all(|c| c.score.is_finite()));
                    let want = brute_force(&cands, &cfg);
                    let mut kept = Vec::new();
                    nms(&mut cands, &cfg, &mut kept);
                    assert_eq!(
                        kept, want,
                        "trial {trial} multi_label {multi_label} agnostic {agnostic}"
                    );
                    assert!(kept.iter().all(|k| k.anchor != 2 || k.class_id != 0));
                }
            }
        }
    }

    #[test]
    fn nan_is_never_selected() {
        let anchors = 3;
        let mut out = vec![0f32; 5 * anchors];
        for a in 0..anchors {
            out[a] = 10.0;
            out[anchors + a] = 10.0;
            out[2 * anchors + a] = 5.0;
            out[3 * anchors + a] = 5.0;
            out[4 * anchors + a] = f32::NAN;
        }
        let mut cands = Vec::new();
        for multi_label in [true, false] {
            let cfg = NmsConfig {
                conf_threshold: 0.0,
                multi_label,
                ..NmsConfig::evaluation()
            };
            decode_candidates(&out, 1, anchors, &cfg, &mut cands).unwrap();
            assert!(cands.is_empty());
        }
    }

    #[test]
    fn identical_candidates_keep_the_first() {
        let b = BoxXyxy::new(0.0, 0.0, 10.0, 10.0);
        let mut cands: Vec<Candidate> = (0..100)
            .map(|i| Candidate {
                bbox: b,
                score: 0.5,
                class_id: 0,
                anchor: i,
            })
            .collect();
        let mut kept = Vec::new();
        nms(&mut cands, &NmsConfig::evaluation(), &mut kept);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].anchor, 0);
    }

    #[test]
    fn zero_area_boxes_do_not_suppress_each_other() {
        let b = BoxXyxy::new(5.0, 5.0, 5.0, 5.0);
        let mut cands = vec![
            Candidate {
                bbox: b,
                score: 0.9,
                class_id: 0,
                anchor: 0,
            },
            Candidate {
                bbox: b,
                score: 0.8,
                class_id: 0,
                anchor: 1,
            },
        ];
        let mut kept = Vec::new();
        nms(&mut cands, &NmsConfig::evaluation(), &mut kept);
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn boxes_map_back_and_clip() {
        let lb = LetterboxParams::new(1280, 720, 640, 640).unwrap();
        // One anchor, one class: a box around the input's centre and one hanging off the pad.
        let out = vec![
            320.0, 630.0, 320.0, 630.0, 100.0, 100.0, 100.0, 100.0, 0.9, 0.8,
        ];
        let mut dets = Vec::new();
        let cfg = NmsConfig::display();
        Postprocessor::new()
            .run(&out, 1, 2, &lb, &cfg, &mut dets)
            .unwrap();
        assert_eq!(dets.len(), 2);
        assert_eq!(dets[0].bbox, BoxXyxy::new(540.0, 260.0, 740.0, 460.0));
        assert_eq!(dets[1].bbox.y2, 720.0);
    }

    #[test]
    fn thresholds_are_validated() {
        let bad = NmsConfig {
            conf_threshold: 1.5,
            ..NmsConfig::display()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("confidence threshold 1.5")
        );
    }
}
