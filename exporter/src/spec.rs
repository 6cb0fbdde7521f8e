//! The GELAN / YOLOv9 model family as data, in deployment form (BN fused, RepConvN merged).
//!
//! One [`ModelSpec`] drives the ONNX builder here and, later, the trainer's tch modules, so a trained
//! network and its exported graph cannot disagree. The layer lists follow YOLOv9's `gelan-*.yaml`
//! files; indices (and therefore weight names `model.{index}.…`) are those of the fused models.

use serde::Serialize;

use crate::error::{Error, Result};

/// One block of the network, with YOLOv9's arguments (output channels first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Block {
    /// Passes the network input through (gelan-e's layer 0, a routing point for the second backbone).
    Silence,
    /// Conv2d(k, stride s, padding k/2) + bias + activation.
    Conv { c2: usize, k: usize, s: usize },
    /// ELAN-1: 1×1 conv to c3, split in two, two 3×3 convs of c4 on the second half, concat, 1×1 to c2.
    Elan1 { c2: usize, c3: usize, c4: usize },
    /// RepNCSPELAN4: like ELAN-1 but each 3×3 branch is RepNCSP(n bottlenecks) followed by a 3×3 conv.
    RepNcspElan4 {
        c2: usize,
        c3: usize,
        c4: usize,
        n: usize,
    },
    /// ADown: avgpool k2 s1, split, [3×3 s2 conv | maxpool k3 s2 p1 → 1×1 conv], concat.
    ADown { c2: usize },
    /// AConv: avgpool k2 s1 → 3×3 s2 conv.
    AConv { c2: usize },
    /// SPPELAN: 1×1 conv to c3, three cascaded maxpools k5 s1 p2, concat of the four, 1×1 to c2.
    SppElan { c2: usize, c3: usize },
    /// Nearest-neighbour upsampling by 2.
    Upsample,
    /// Channel concatenation of the `from` layers.
    Concat,
    /// CBLinear: one 1×1 conv with bias producing the concatenated `c2s` channels, split into them.
    CbLinear { c2s: Vec<usize> },
    /// CBFuse: nearest-resize the chosen split (`idx[i]`) of each CBLinear input to the last input's
    /// size and sum them with it.
    CbFuse { idx: Vec<usize> },
    /// The decoupled detection head on the `from` levels (strides 8/16/32).
    DDetect,
    /// YOLOv9's segmentation head (`Segment` of `gelan-c-seg.yaml`) on the `from` levels: a
    /// detection head whose box branch is dense (YOLOv9's `Detect`, no grouped convolutions),
    /// `nm` mask coefficients per anchor (per level: 3×3 conv, 3×3 conv, 1×1 conv to `nm`), and
    /// `nm` prototypes from the first level (`Proto`: 3×3 conv to `npr`, nearest upsampling by 2,
    /// 3×3 conv, 1×1 conv to `nm`), at a quarter of the input size.
    Segment { nm: usize, npr: usize },
}

/// A layer: its inputs (negative = relative to this layer, as in YOLO yaml) and its block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layer {
    pub from: Vec<i32>,
    pub block: Block,
}

/// Activation used after every convolution (except the head's final 1×1 convolutions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Activation {
    #[default]
    Silu,
    Relu,
}

/// A named architecture: the layer list. The last layer is the head.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub layers: Vec<Layer>,
}

/// DFL bins per box side (YOLOv9's `reg_max`).
pub const REG_MAX: usize = 16;
/// Strides of the three detection levels, in input pixels.
pub const STRIDES: [usize; 3] = [8, 16, 32];

/// The detection models [`ModelSpec::by_name`] knows.
pub const MODEL_NAMES: [&str; 5] = ["gelan-t", "gelan-s", "gelan-m", "gelan-c", "gelan-e"];
/// The segmentation models [`ModelSpec::by_name`] knows: gelan-c-seg as YOLOv9 defines it, and
/// the same head on gelan-t and gelan-s (prototype widths scaled with the model) for tests and
/// demos.
pub const SEG_MODEL_NAMES: [&str; 3] = ["gelan-t-seg", "gelan-s-seg", "gelan-c-seg"];
/// Mask coefficients per anchor, and prototypes per image, of the segmentation heads.
pub const MASK_COEFFICIENTS: usize = 32;

/// `spec` with its detection head replaced by a segmentation head of `npr` prototype channels.
fn with_segment_head(mut spec: ModelSpec, npr: usize) -> ModelSpec {
    spec.name.push_str("-seg");
    if let Some(head) = spec.layers.last_mut() {
        head.block = Block::Segment {
            nm: MASK_COEFFICIENTS,
            npr,
        };
    }
    spec
}

fn l(from: i32, block: Block) -> Layer {
    Layer {
        from: vec![from],
        block,
    }
}

fn lm(from: &[i32], block: Block) -> Layer {
    Layer {
        from: from.to_vec(),
        block,
    }
}

fn conv(c2: usize, k: usize, s: usize) -> Block {
    Block::Conv { c2, k, s }
}

fn rep(c2: usize, c3: usize, c4: usize, n: usize) -> Block {
    Block::RepNcspElan4 { c2, c3, c4, n }
}

/// gelan-t / gelan-s share a layout; `w` are the widths of gelan-t's yaml scaled by the caller.
fn gelan_small(name: &str, w: [usize; 8], n: usize) -> ModelSpec {
    // w: [stem1, stem2, p3, p4, p5, p3 head down, p4 head down, elan1 c3/2 == stem2/2]
    let [s1, s2, p3, p4, p5, d3, d4, _] = w;
    let layers = vec![
        l(-1, conv(s1, 3, 2)), // 0 P1/2
        l(-1, conv(s2, 3, 2)), // 1 P2/4
        l(
            -1,
            Block::Elan1 {
                c2: s2,
                c3: s2,
                c4: s2 / 2,
            },
        ), // 2
        l(-1, Block::AConv { c2: p3 }), // 3 P3/8
        l(-1, rep(p3, p3, p3 / 2, n)), // 4
        l(-1, Block::AConv { c2: p4 }), // 5 P4/16
        l(-1, rep(p4, p4, p4 / 2, n)), // 6
        l(-1, Block::AConv { c2: p5 }), // 7 P5/32
        l(-1, rep(p5, p5, p5 / 2, n)), // 8
        l(-1, Block::SppElan { c2: p5, c3: p5 / 2 }), // 9
        l(-1, Block::Upsample), // 10
        lm(&[-1, 6], Block::Concat), // 11
        l(-1, rep(p4, p4, p4 / 2, n)), // 12
        l(-1, Block::Upsample), // 13
        lm(&[-1, 4], Block::Concat), // 14
        l(-1, rep(p3, p3, p3 / 2, n)), // 15 P3 out
        l(-1, Block::AConv { c2: d3 }), // 16
        lm(&[-1, 12], Block::Concat), // 17
        l(-1, rep(p4, p4, p4 / 2, n)), // 18 P4 out
        l(-1, Block::AConv { c2: d4 }), // 19
        lm(&[-1, 9], Block::Concat), // 20
        l(-1, rep(p5, p5, p5 / 2, n)), // 21 P5 out
        lm(&[15, 18, 21], Block::DDetect), // 22
    ];
    ModelSpec {
        name: name.into(),
        layers,
    }
}

fn gelan_m() -> ModelSpec {
    let layers = vec![
        l(-1, conv(32, 3, 2)),                      // 0
        l(-1, conv(64, 3, 2)),                      // 1
        l(-1, rep(128, 128, 64, 1)),                // 2
        l(-1, Block::AConv { c2: 240 }),            // 3
        l(-1, rep(240, 240, 120, 1)),               // 4
        l(-1, Block::AConv { c2: 360 }),            // 5
        l(-1, rep(360, 360, 180, 1)),               // 6
        l(-1, Block::AConv { c2: 480 }),            // 7
        l(-1, rep(480, 480, 240, 1)),               // 8
        l(-1, Block::SppElan { c2: 480, c3: 240 }), // 9
        l(-1, Block::Upsample),                     // 10
        lm(&[-1, 6], Block::Concat),                // 11
        l(-1, rep(360, 360, 180, 1)),               // 12
        l(-1, Block::Upsample),                     // 13
        lm(&[-1, 4], Block::Concat),                // 14
        l(-1, rep(240, 240, 120, 1)),               // 15
        l(-1, Block::AConv { c2: 180 }),            // 16 (rounded up to 184, as YOLOv9 does)
        lm(&[-1, 12], Block::Concat),               // 17
        l(-1, rep(360, 360, 180, 1)),               // 18
        l(-1, Block::AConv { c2: 240 }),            // 19
        lm(&[-1, 9], Block::Concat),                // 20
        l(-1, rep(480, 480, 240, 1)),               // 21
        lm(&[15, 18, 21], Block::DDetect),          // 22
    ];
    ModelSpec {
        name: "gelan-m".into(),
        layers,
    }
}

fn gelan_c() -> ModelSpec {
    let layers = vec![
        l(-1, conv(64, 3, 2)),                      // 0
        l(-1, conv(128, 3, 2)),                     // 1
        l(-1, rep(256, 128, 64, 1)),                // 2
        l(-1, Block::ADown { c2: 256 }),            // 3
        l(-1, rep(512, 256, 128, 1)),               // 4
        l(-1, Block::ADown { c2: 512 }),            // 5
        l(-1, rep(512, 512, 256, 1)),               // 6
        l(-1, Block::ADown { c2: 512 }),            // 7
        l(-1, rep(512, 512, 256, 1)),               // 8
        l(-1, Block::SppElan { c2: 512, c3: 256 }), // 9
        l(-1, Block::Upsample),                     // 10
        lm(&[-1, 6], Block::Concat),                // 11
        l(-1, rep(512, 512, 256, 1)),               // 12
        l(-1, Block::Upsample),                     // 13
        lm(&[-1, 4], Block::Concat),                // 14
        l(-1, rep(256, 256, 128, 1)),               // 15
        l(-1, Block::ADown { c2: 256 }),            // 16
        lm(&[-1, 12], Block::Concat),               // 17
        l(-1, rep(512, 512, 256, 1)),               // 18
        l(-1, Block::ADown { c2: 512 }),            // 19
        lm(&[-1, 9], Block::Concat),                // 20
        l(-1, rep(512, 512, 256, 1)),               // 21
        lm(&[15, 18, 21], Block::DDetect),          // 22
    ];
    ModelSpec {
        name: "gelan-c".into(),
        layers,
    }
}

fn gelan_e() -> ModelSpec {
    let cbl = |c2s: &[usize]| Block::CbLinear { c2s: c2s.to_vec() };
    let cbf = |idx: &[usize]| Block::CbFuse { idx: idx.to_vec() };
    let layers = vec![
        l(-1, Block::Silence),                                // 0
        l(-1, conv(64, 3, 2)),                                // 1
        l(-1, conv(128, 3, 2)),                               // 2
        l(-1, rep(256, 128, 64, 2)),                          // 3
        l(-1, Block::ADown { c2: 256 }),                      // 4
        l(-1, rep(512, 256, 128, 2)),                         // 5
        l(-1, Block::ADown { c2: 512 }),                      // 6
        l(-1, rep(1024, 512, 256, 2)),                        // 7
        l(-1, Block::ADown { c2: 1024 }),                     // 8
        l(-1, rep(1024, 512, 256, 2)),                        // 9
        l(1, cbl(&[64])),                                     // 10
        l(3, cbl(&[64, 128])),                                // 11
        l(5, cbl(&[64, 128, 256])),                           // 12
        l(7, cbl(&[64, 128, 256, 512])),                      // 13
        l(9, cbl(&[64, 128, 256, 512, 1024])),                // 14
        l(0, conv(64, 3, 2)),                                 // 15
        lm(&[10, 11, 12, 13, 14, -1], cbf(&[0, 0, 0, 0, 0])), // 16
        l(-1, conv(128, 3, 2)),                               // 17
        lm(&[11, 12, 13, 14, -1], cbf(&[1, 1, 1, 1])),        // 18
        l(-1, rep(256, 128, 64, 2)),                          // 19
        l(-1, Block::ADown { c2: 256 }),                      // 20
        lm(&[12, 13, 14, -1], cbf(&[2, 2, 2])),               // 21
        l(-1, rep(512, 256, 128, 2)),                         // 22
        l(-1, Block::ADown { c2: 512 }),                      // 23
        lm(&[13, 14, -1], cbf(&[3, 3])),                      // 24
        l(-1, rep(1024, 512, 256, 2)),                        // 25
        l(-1, Block::ADown { c2: 1024 }),                     // 26
        lm(&[14, -1], cbf(&[4])),                             // 27
        l(-1, rep(1024, 512, 256, 2)),                        // 28
        l(28, Block::SppElan { c2: 512, c3: 256 }),           // 29
        l(-1, Block::Upsample),                               // 30
        lm(&[-1, 25], Block::Concat),                         // 31
        l(-1, rep(512, 512, 256, 2)),                         // 32
        l(-1, Block::Upsample),                               // 33
        lm(&[-1, 22], Block::Concat),                         // 34
        l(-1, rep(256, 256, 128, 2)),                         // 35
        l(-1, Block::ADown { c2: 256 }),                      // 36
        lm(&[-1, 32], Block::Concat),                         // 37
        l(-1, rep(512, 512, 256, 2)),                         // 38
        l(-1, Block::ADown { c2: 512 }),                      // 39
        lm(&[-1, 29], Block::Concat),                         // 40
        l(-1, rep(512, 1024, 512, 2)),                        // 41
        lm(&[35, 38, 41], Block::DDetect),                    // 42
    ];
    ModelSpec {
        name: "gelan-e".into(),
        layers,
    }
}

impl ModelSpec {
    /// The spec called `name` (one of [`MODEL_NAMES`]).
    pub fn by_name(name: &str) -> Result<ModelSpec> {
        match name {
            "gelan-t" => Ok(gelan_small("gelan-t", [16, 32, 64, 96, 128, 48, 64, 16], 3)),
            "gelan-s" => Ok(gelan_small(
                "gelan-s",
                [32, 64, 128, 192, 256, 96, 128, 32],
                3,
            )),
            "gelan-m" => Ok(gelan_m()),
            "gelan-c" => Ok(gelan_c()),
            "gelan-e" => Ok(gelan_e()),
            "gelan-t-seg" => Ok(with_segment_head(Self::by_name("gelan-t")?, 64)),
            "gelan-s-seg" => Ok(with_segment_head(Self::by_name("gelan-s")?, 128)),
            "gelan-c-seg" => Ok(with_segment_head(gelan_c(), 256)),
            _ => Err(Error::UnknownModel {
                name: name.into(),
                known: format!("{}, {}", MODEL_NAMES.join(", "), SEG_MODEL_NAMES.join(", ")),
            }),
        }
    }

    /// Absolute indices of a layer's inputs (`-1` = previous layer).
    pub fn inputs_of(&self, index: usize) -> Vec<usize> {
        self.layers[index]
            .from
            .iter()
            .map(|&f| {
                if f < 0 {
                    (index as i64 + f as i64) as usize
                } else {
                    f as usize
                }
            })
            .collect()
    }

    /// Check that every `from` points at an earlier layer and the last layer is the head.
    pub fn validate(&self) -> Result<()> {
        for (i, layer) in self.layers.iter().enumerate() {
            for &f in &layer.from {
                let abs = if f < 0 { i as i64 + f as i64 } else { f as i64 };
                let first = i == 0 && f == -1;
                if !first && (abs < 0 || abs >= i as i64) {
                    return Err(Error::InvalidConfig(format!(
                        "{}: layer {i} reads layer {abs}, which does not come before it",
                        self.name
                    )));
                }
            }
        }
        match self.layers.last() {
            Some(Layer {
                block: Block::DDetect | Block::Segment { .. },
                from,
            }) if from.len() == STRIDES.len() => Ok(()),
            _ => Err(Error::InvalidConfig(format!(
                "{}: the last layer must be DDetect or Segment on three levels",
                self.name
            ))),
        }
    }

    /// Mask coefficients per anchor of a segmentation head; `None` for a detector.
    pub fn mask_coefficients(&self) -> Option<usize> {
        match self.layers.last()?.block {
            Block::Segment { nm, .. } => Some(nm),
            _ => None,
        }
    }
}

/// YOLO's `make_divisible`: round `x` up to a multiple of `divisor`.
pub fn make_divisible(x: usize, divisor: usize) -> usize {
    x.div_ceil(divisor) * divisor
}

/// What to build: architecture, class count, input size and activation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub spec: ModelSpec,
    /// Number of classes (≥ 1).
    pub num_classes: usize,
    /// Input height and width in pixels (multiples of 32).
    pub imgsz: [usize; 2],
    pub activation: Activation,
}

impl ModelConfig {
    /// A config for a named spec with `num_classes` classes and a square input of `imgsz` pixels.
    pub fn new(name: &str, num_classes: usize, imgsz: usize) -> Result<Self> {
        let cfg = Self {
            spec: ModelSpec::by_name(name)?,
            num_classes,
            imgsz: [imgsz, imgsz],
            activation: Activation::Silu,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the class count and input size.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if self.num_classes == 0 || self.num_classes > 10_000 {
            return Err(Error::InvalidConfig(format!(
                "--classes {} is out of range: give between 1 and 10000 classes",
                self.num_classes
            )));
        }
        for s in self.imgsz {
            if s == 0 || s % 32 != 0 || s > 8192 {
                return Err(Error::InvalidConfig(format!(
                    "input size {s} is not usable: give a multiple of 32 between 32 and 8192 (e.g. 640)"
                )));
            }
        }
        Ok(())
    }

    /// The number of anchors (columns of `output0`): sum over strides of (H/s)·(W/s).
    pub fn num_anchors(&self) -> usize {
        STRIDES
            .iter()
            .map(|s| (self.imgsz[0] / s) * (self.imgsz[1] / s))
            .sum()
    }

    /// Channels of the head's box branch and class branch, as YOLOv9's DDetect chooses them from
    /// the first level's channels `c_p3`.
    pub fn head_widths(&self, c_p3: usize) -> (usize, usize) {
        let c2 = make_divisible((c_p3 / 4).max(REG_MAX * 4).max(16), 4);
        let c3 = c_p3.max((self.num_classes * 2).min(128));
        (c2, c3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segmentation_specs_end_in_the_segment_head() {
        for name in SEG_MODEL_NAMES {
            let spec = ModelSpec::by_name(name).expect("known");
            spec.validate().expect("valid");
            assert_eq!(spec.name, name);
            assert_eq!(spec.mask_coefficients(), Some(MASK_COEFFICIENTS));
            let detector = ModelSpec::by_name(name.trim_end_matches("-seg")).expect("detector");
            assert_eq!(spec.layers.len(), detector.layers.len());
            assert_eq!(detector.mask_coefficients(), None);
        }
    }

    #[test]
    fn every_spec_validates() {
        for name in MODEL_NAMES {
            ModelSpec::by_name(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = ModelSpec::by_name("gelan-x").unwrap_err().to_string();
        assert!(err.contains("unknown model 'gelan-x'"), "{err}");
        assert!(
            err.contains("gelan-t, gelan-s, gelan-m, gelan-c, gelan-e"),
            "{err}"
        );
    }

    #[test]
    fn anchors_at_640() {
        let cfg = ModelConfig::new("gelan-t", 80, 640).unwrap();
        assert_eq!(cfg.num_anchors(), 8400);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(ModelConfig::new("gelan-t", 0, 640).is_err());
        assert!(ModelConfig::new("gelan-t", 80, 650).is_err());
    }
}
