//! GELAN / YOLOv9 networks in their training form, built from the exporter's [`ModelSpec`]:
//! every convolution is Conv2d (no bias) + BatchNorm2d (+ activation), and each RepNBottleneck's
//! first convolution is a RepConvN (a 3×3 and a 1×1 branch, summed). [`Gelan::fuse`] folds the
//! BatchNorms and merges the RepConvN branches into the deployment form whose weight names are
//! exactly the exporter's, so a trained network and its ONNX cannot disagree.
//!
//! Names follow YOLOv9's state dict: `model.{i}.cv1.conv.weight`, `model.{i}.cv1.bn.running_var`,
//! `model.{i}.m.0.cv1.conv1.conv.weight` (RepConvN's 3×3 branch), `…conv2…` (its 1×1 branch).

use std::collections::BTreeMap;

use kestrel_exporter::ModelConfig;
use kestrel_exporter::export::anchor_grid;
use kestrel_exporter::spec::{Activation, Block, REG_MAX, STRIDES, make_divisible};
use kestrel_exporter::weights::Tensor as NamedTensor;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// YOLOv9's BatchNorm settings (`initialize_weights`: eps 1e-3, momentum 0.03).
pub const BN_EPS: f64 = 1e-3;
pub const BN_MOMENTUM: f64 = 0.03;

/// Conv2d without bias + BatchNorm2d + optional activation: YOLOv9's `Conv` while training.
#[derive(Debug)]
struct ConvBn {
    path: String,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    act: Option<Activation>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vs: &nn::Path,
        name: &str,
        c1: usize,
        c2: usize,
        k: usize,
        s: usize,
        g: usize,
        act: Option<Activation>,
    ) -> Self {
        let p = vs / name;
        let conv = nn::conv2d(
            &p / "conv",
            c1 as i64,
            c2 as i64,
            k as i64,
            nn::ConvConfig {
                stride: s as i64,
                padding: (k / 2) as i64,
                groups: g as i64,
                bias: false,
                ..Default::default()
            },
        );
        // BatchNorm parameters get no weight decay (their own optimiser group, as YOLOv9).
        let bn = nn::batch_norm2d(
            (&p / "bn").set_group(crate::train::NO_DECAY_GROUP),
            c2 as i64,
            nn::BatchNormConfig {
                eps: BN_EPS,
                momentum: BN_MOMENTUM,
                ..Default::default()
            },
        );
        Self {
            path: path_name(&p),
            conv,
            bn,
            act,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.bn.forward_t(&self.conv.forward(x), train);
        activate(y, self.act)
    }

    /// The BatchNorm folded into the convolution: (weight, bias).
    fn folded(&self) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let std = (&self.bn.running_var + BN_EPS).sqrt();
            let gamma = self
                .bn
                .ws
                .as_ref()
                .map_or_else(|| std.ones_like(), |w| w.shallow_clone());
            let beta = self
                .bn
                .bs
                .as_ref()
                .map_or_else(|| std.zeros_like(), |b| b.shallow_clone());
            let scale = &gamma / &std;
            let w = &self.conv.ws * scale.view([-1, 1, 1, 1]);
            let b = beta - &self.bn.running_mean * &scale;
            (w, b)
        })
    }
}

/// RepConvN: a 3×3 and a 1×1 ConvBn on the same input, summed, then the activation.
#[derive(Debug)]
struct RepConvN {
    path: String,
    conv1: ConvBn,
    conv2: ConvBn,
    act: Activation,
}

impl RepConvN {
    fn new(vs: &nn::Path, name: &str, c1: usize, c2: usize, act: Activation) -> Self {
        let p = vs / name;
        Self {
            path: path_name(&p),
            conv1: ConvBn::new(&p, "conv1", c1, c2, 3, 1, 1, None),
            conv2: ConvBn::new(&p, "conv2", c1, c2, 1, 1, 1, None),
            act,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.conv1.forward_t(x, train) + self.conv2.forward_t(x, train);
        activate(y, Some(self.act))
    }

    /// One 3×3 convolution equal to both branches: the 1×1 kernel sits at the 3×3 centre.
    fn folded(&self) -> (Tensor, Tensor) {
        let (w3, b3) = self.conv1.folded();
        let (w1, b1) = self.conv2.folded();
        tch::no_grad(|| (w3 + w1.constant_pad_nd([1, 1, 1, 1]), b3 + b1))
    }
}

fn activate(y: Tensor, act: Option<Activation>) -> Tensor {
    match act {
        Some(Activation::Silu) => y.silu(),
        Some(Activation::Relu) => y.relu(),
        None => y,
    }
}

fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// RepNCSP: cv1 → n RepNBottlenecks (RepConvN 3×3, Conv 3×3, shortcut), cv2 on the input,
/// concat, cv3.
#[derive(Debug)]
struct RepNcsp {
    cv1: ConvBn,
    cv2: ConvBn,
    cv3: ConvBn,
    bottlenecks: Vec<(RepConvN, ConvBn)>,
}

impl RepNcsp {
    fn new(vs: &nn::Path, name: &str, c1: usize, c2: usize, n: usize, act: Activation) -> Self {
        let p = vs / name;
        let c_ = c2 / 2;
        let bottlenecks = (0..n)
            .map(|j| {
                let q = &p / "m" / j;
                (
                    RepConvN::new(&q, "cv1", c_, c_, act),
                    ConvBn::new(&q, "cv2", c_, c_, 3, 1, 1, Some(act)),
                )
            })
            .collect();
        Self {
            cv1: ConvBn::new(&p, "cv1", c1, c_, 1, 1, 1, Some(act)),
            cv2: ConvBn::new(&p, "cv2", c1, c_, 1, 1, 1, Some(act)),
            cv3: ConvBn::new(&p, "cv3", 2 * c_, c2, 1, 1, 1, Some(act)),
            bottlenecks,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut a = self.cv1.forward_t(x, train);
        for (rep, conv) in &self.bottlenecks {
            let h = conv.forward_t(&rep.forward_t(&a, train), train);
            // Not `+=`: tch's AddAssign is in place, and autograd saved `a` for the next conv.
            let sum = &a + &h;
            a = sum;
        }
        let b = self.cv2.forward_t(x, train);
        self.cv3.forward_t(&Tensor::cat(&[a, b], 1), train)
    }

    fn convs<'a>(&'a self, out: &mut Vec<Fusable<'a>>) {
        out.push(Fusable::Conv(&self.cv1));
        for (rep, conv) in &self.bottlenecks {
            out.push(Fusable::Rep(rep));
            out.push(Fusable::Conv(conv));
        }
        out.push(Fusable::Conv(&self.cv2));
        out.push(Fusable::Conv(&self.cv3));
    }
}

/// One branch of an ELAN block: a plain 3×3 Conv (ELAN-1) or RepNCSP followed by a 3×3 Conv.
// Built once per model, a few dozen of them: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum ElanBranch {
    Conv(ConvBn),
    Rep(RepNcsp, ConvBn),
}

impl ElanBranch {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            ElanBranch::Conv(c) => c.forward_t(x, train),
            ElanBranch::Rep(r, c) => c.forward_t(&r.forward_t(x, train), train),
        }
    }

    fn convs<'a>(&'a self, out: &mut Vec<Fusable<'a>>) {
        match self {
            ElanBranch::Conv(c) => out.push(Fusable::Conv(c)),
            ElanBranch::Rep(r, c) => {
                r.convs(out);
                out.push(Fusable::Conv(c));
            }
        }
    }
}

/// A convolution that [`Gelan::fuse`] turns into one deployment-form Conv2d with bias.
enum Fusable<'a> {
    Conv(&'a ConvBn),
    Rep(&'a RepConvN),
}

/// DDetect's per-level box (`cv2`) and class (`cv3`) branches and the fixed DFL projection.
#[derive(Debug)]
struct Detect {
    path: String,
    boxes: Vec<(ConvBn, ConvBn, nn::Conv2D)>,
    classes: Vec<(ConvBn, ConvBn, nn::Conv2D)>,
    num_classes: usize,
    /// Anchor centres `[1, 2, A]` (grid cells) and strides `[1, 1, A]` (pixels), and the DFL
    /// projection, made once on the model's device.
    anchors: Tensor,
    strides: Tensor,
    dfl: Tensor,
}

/// One layer of the network.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Layer {
    Silence,
    Conv(ConvBn),
    Elan {
        cv1: ConvBn,
        cv2: ElanBranch,
        cv3: ElanBranch,
        cv4: ConvBn,
    },
    ADown {
        cv1: ConvBn,
        cv2: ConvBn,
    },
    AConv(ConvBn),
    SppElan {
        cv1: ConvBn,
        cv5: ConvBn,
    },
    Upsample,
    Concat,
    CbLinear {
        conv: nn::Conv2D,
        path: String,
        splits: Vec<usize>,
    },
    CbFuse {
        idx: Vec<usize>,
    },
    Detect(Detect),
    Segment(SegmentHead),
}

/// YOLOv9's `Segment` head: a [`Detect`] with a dense box branch, per-level mask-coefficient
/// branches (`cv4`: 3×3, 3×3, 1×1 to `nm`) and the prototype branch on the first level (`proto`:
/// 3×3, nearest ×2, 3×3, 1×1 to `nm`, all with activation), at stride 4.
#[derive(Debug)]
struct SegmentHead {
    detect: Detect,
    coefficients: Vec<(ConvBn, ConvBn, nn::Conv2D)>,
    proto: [ConvBn; 3],
    nm: usize,
}

/// The outputs of a forward pass: the head and, for segmentation models, the prototypes.
#[derive(Debug)]
pub struct Outputs {
    /// Decoded (`output0`: `[B, 4 + nc (+ nm), A]`, the exporter's layout) or raw (`[B,
    /// 4·reg_max + nc (+ nm), A]`, what the loss takes); segmentation heads end with each
    /// anchor's `nm` mask coefficients in both forms.
    pub head: Tensor,
    /// `[B, nm, H/4, W/4]` mask prototypes (`output1`) of a segmentation model.
    pub prototypes: Option<Tensor>,
}

/// A GELAN detection network in training form.
#[derive(Debug)]
pub struct Gelan {
    config: ModelConfig,
    layers: Vec<Layer>,
    inputs: Vec<Vec<usize>>,
}

impl Gelan {
    /// Build the network of `config` with its variables under `vs` (PyTorch's default
    /// initialisation, YOLOv9's head biases).
    pub fn new(vs: &nn::Path, config: &ModelConfig) -> Result<Self> {
        config.validate().map_err(Error::Exporter)?;
        let act = config.activation;
        let spec = &config.spec;
        let root = vs / "model";
        let mut layers = Vec::with_capacity(spec.layers.len());
        let mut inputs = Vec::with_capacity(spec.layers.len());
        // Output channels of each layer's outputs (CBLinear has several).
        let mut channels: Vec<Vec<usize>> = Vec::with_capacity(spec.layers.len());
        for (i, layer) in spec.layers.iter().enumerate() {
            let from = spec.inputs_of(i);
            let c1 = if i == 0 { 3 } else { channels[from[0]][0] };
            let p = &root / i;
            let conv = |name: &str, c1, c2, k, s| ConvBn::new(&p, name, c1, c2, k, s, 1, Some(act));
            let (built, out): (Layer, Vec<usize>) = match &layer.block {
                Block::Silence => (Layer::Silence, vec![c1]),
                Block::Conv { c2, k, s } => {
                    let c2 = make_divisible(*c2, 8);
                    let c = ConvBn::new(&root, &i.to_string(), c1, c2, *k, *s, 1, Some(act));
                    (Layer::Conv(c), vec![c2])
                }
                Block::Elan1 { c2, c3, c4 } | Block::RepNcspElan4 { c2, c3, c4, .. } => {
                    let c2 = make_divisible(*c2, 8);
                    let depth = match &layer.block {
                        Block::RepNcspElan4 { n, .. } => Some(*n),
                        _ => None,
                    };
                    let branch = |name: &str, cin: usize| match depth {
                        None => ElanBranch::Conv(conv(name, cin, *c4, 3, 1)),
                        Some(n) => {
                            let q = &p / name;
                            ElanBranch::Rep(
                                RepNcsp::new(&q, "0", cin, *c4, n, act),
                                ConvBn::new(&q, "1", *c4, *c4, 3, 1, 1, Some(act)),
                            )
                        }
                    };
                    let built = Layer::Elan {
                        cv1: conv("cv1", c1, *c3, 1, 1),
                        cv2: branch("cv2", c3 / 2),
                        cv3: branch("cv3", *c4),
                        cv4: conv("cv4", c3 + 2 * c4, c2, 1, 1),
                    };
                    (built, vec![c2])
                }
                Block::ADown { c2 } => {
                    let c2 = make_divisible(*c2, 8);
                    let c = c2 / 2;
                    let built = Layer::ADown {
                        cv1: conv("cv1", c1 / 2, c, 3, 2),
                        cv2: conv("cv2", c1 / 2, c, 1, 1),
                    };
                    (built, vec![c2])
                }
                Block::AConv { c2 } => {
                    let c2 = make_divisible(*c2, 8);
                    (Layer::AConv(conv("cv1", c1, c2, 3, 2)), vec![c2])
                }
                Block::SppElan { c2, c3 } => {
                    let c2 = make_divisible(*c2, 8);
                    let built = Layer::SppElan {
                        cv1: conv("cv1", c1, *c3, 1, 1),
                        cv5: conv("cv5", 4 * c3, c2, 1, 1),
                    };
                    (built, vec![c2])
                }
                Block::Upsample => (Layer::Upsample, vec![c1]),
                Block::Concat => {
                    let c: usize = from.iter().map(|&f| channels[f][0]).sum();
                    (Layer::Concat, vec![c])
                }
                Block::CbLinear { c2s } => {
                    let total: usize = c2s.iter().sum();
                    let conv =
                        nn::conv2d(&p / "conv", c1 as i64, total as i64, 1, Default::default());
                    let built = Layer::CbLinear {
                        conv,
                        path: path_name(&(&p / "conv")),
                        splits: c2s.clone(),
                    };
                    (built, c2s.clone())
                }
                Block::CbFuse { idx } => {
                    let last = channels[*from.last().unwrap_or(&0)][0];
                    (Layer::CbFuse { idx: idx.clone() }, vec![last])
                }
                Block::DDetect => {
                    let levels: Vec<usize> = from.iter().map(|&f| channels[f][0]).collect();
                    (Layer::Detect(Detect::new(&p, config, &levels, 4)?), vec![0])
                }
                Block::Segment { nm, npr } => {
                    let levels: Vec<usize> = from.iter().map(|&f| channels[f][0]).collect();
                    let head = SegmentHead::new(&p, config, &levels, *nm, *npr)?;
                    (Layer::Segment(head), vec![0])
                }
            };
            layers.push(built);
            inputs.push(from);
            channels.push(out);
        }
        Ok(Self {
            config: config.clone(),
            layers,
            inputs,
        })
    }

    /// The model's configuration (spec, classes, input size).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Inference output `[B, 4 + classes, anchors]`: box centre x, y, width, height in input
    /// pixels, then sigmoid class scores (the exporter's `output0`). `train` selects batch
    /// statistics (training) or running statistics (evaluation) in the BatchNorms.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(images, train, false)?.head)
    }

    /// The head's raw output `[B, 4·reg_max + classes, anchors]` (box side distributions as
    /// logits, class logits), what the loss takes.
    pub fn forward_raw_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(images, train, true)?.head)
    }

    /// Both outputs, decoded (`raw` false: the exporter's `output0` and `output1`) or raw (what
    /// the loss takes).
    pub fn forward_outputs_t(&self, images: &Tensor, train: bool, raw: bool) -> Result<Outputs> {
        self.run(images, train, raw)
    }

    /// Mask coefficients per anchor of a segmentation model; `None` for a detector.
    pub fn mask_coefficients(&self) -> Option<usize> {
        self.layers.iter().find_map(|l| match l {
            Layer::Segment(s) => Some(s.nm),
            _ => None,
        })
    }

    fn run(&self, images: &Tensor, train: bool, raw: bool) -> Result<Outputs> {
        let size = images.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(Error::Shape(format!(
                "the network takes [batch, 3, height, width] images, not {size:?}"
            )));
        }
        let [h, w] = self.config.imgsz.map(|v| v as i64);
        if size[2] != h || size[3] != w {
            return Err(Error::Shape(format!(
                "this {} was built for {h}x{w} inputs, not {}x{}",
                self.config.spec.name, size[2], size[3]
            )));
        }
        let mut outputs: Vec<Vec<Tensor>> = Vec::with_capacity(self.layers.len());
        let mut result = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let from = &self.inputs[i];
            let first = if i == 0 {
                images.shallow_clone()
            } else {
                outputs[from[0]][0].shallow_clone()
            };
            let out = match layer {
                Layer::Silence => vec![first],
                Layer::Upsample => vec![first.upsample_nearest2d(
                    [size_of(&first, 2) * 2, size_of(&first, 3) * 2],
                    None,
                    None,
                )],
                Layer::Conv(c) => vec![c.forward_t(&first, train)],
                Layer::AConv(c) => vec![c.forward_t(&avg_pool2(&first), train)],
                Layer::Elan { cv1, cv2, cv3, cv4 } => {
                    let y = cv1.forward_t(&first, train);
                    let halves = y.chunk(2, 1);
                    let y2 = cv2.forward_t(&halves[1], train);
                    let y3 = cv3.forward_t(&y2, train);
                    let cat = Tensor::cat(&[&halves[0], &halves[1], &y2, &y3], 1);
                    vec![cv4.forward_t(&cat, train)]
                }
                Layer::ADown { cv1, cv2 } => {
                    let x = avg_pool2(&first);
                    let halves = x.chunk(2, 1);
                    let a = cv1.forward_t(&halves[0], train);
                    let b = cv2.forward_t(
                        &halves[1].max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
                        train,
                    );
                    vec![Tensor::cat(&[a, b], 1)]
                }
                Layer::SppElan { cv1, cv5 } => {
                    let y0 = cv1.forward_t(&first, train);
                    let pool = |t: &Tensor| t.max_pool2d([5, 5], [1, 1], [2, 2], [1, 1], false);
                    let y1 = pool(&y0);
                    let y2 = pool(&y1);
                    let y3 = pool(&y2);
                    vec![cv5.forward_t(&Tensor::cat(&[y0, y1, y2, y3], 1), train)]
                }
                Layer::Concat => {
                    let xs: Vec<&Tensor> = from.iter().map(|&f| &outputs[f][0]).collect();
                    vec![Tensor::cat(&xs, 1)]
                }
                Layer::CbLinear { conv, splits, .. } => {
                    let sizes: Vec<i64> = splits.iter().map(|&c| c as i64).collect();
                    conv.forward(&first).split_with_sizes(sizes, 1)
                }
                Layer::CbFuse { idx } => {
                    let last = outputs[*from.last().unwrap_or(&0)][0].shallow_clone();
                    let (th, tw) = (size_of(&last, 2), size_of(&last, 3));
                    let mut acc = last;
                    for (j, &sel) in idx.iter().enumerate() {
                        let src = outputs[from[j]].get(sel).ok_or_else(|| {
                            Error::Shape(format!("CBFuse picks split {sel} of layer {}", from[j]))
                        })?;
                        // Not `+=`: in place, it would change the earlier layer's output.
                        let sum = &acc + src.upsample_nearest2d([th, tw], None, None);
                        acc = sum;
                    }
                    vec![acc]
                }
                Layer::Detect(d) => {
                    let levels: Vec<&Tensor> = from.iter().map(|&f| &outputs[f][0]).collect();
                    let y = if raw {
                        d.raw_t(&levels, train)?
                    } else {
                        d.forward_t(&levels, train)?
                    };
                    result = Some(Outputs {
                        head: y.shallow_clone(),
                        prototypes: None,
                    });
                    vec![y]
                }
                Layer::Segment(s) => {
                    let levels: Vec<&Tensor> = from.iter().map(|&f| &outputs[f][0]).collect();
                    let y = s.forward_t(&levels, train, raw)?;
                    let head = y.head.shallow_clone();
                    result = Some(y);
                    vec![head]
                }
            };
            outputs.push(out);
        }
        result.ok_or_else(|| Error::Shape("the spec has no detection head".into()))
    }

    /// The deployment form: BatchNorms folded, RepConvN branches merged, under the exporter's
    /// weight names (`{layer}.conv.weight` / `.bias`), plus the fixed DFL projection.
    pub fn fuse(&self) -> Result<BTreeMap<String, NamedTensor>> {
        let mut out = BTreeMap::new();
        let mut failed = None;
        let mut put = |name: String, t: &Tensor| {
            let t = t
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .contiguous();
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            match Vec::<f32>::try_from(t.flatten(0, -1)) {
                Ok(values) => {
                    out.insert(name, NamedTensor { shape, values });
                }
                Err(e) => failed = Some(e),
            }
        };
        let mut fusable = Vec::new();
        for layer in &self.layers {
            match layer {
                Layer::Conv(c) | Layer::AConv(c) => fusable.push(Fusable::Conv(c)),
                Layer::Elan { cv1, cv2, cv3, cv4 } => {
                    fusable.push(Fusable::Conv(cv1));
                    cv2.convs(&mut fusable);
                    cv3.convs(&mut fusable);
                    fusable.push(Fusable::Conv(cv4));
                }
                Layer::ADown { cv1, cv2 } => {
                    fusable.push(Fusable::Conv(cv1));
                    fusable.push(Fusable::Conv(cv2));
                }
                Layer::SppElan { cv1, cv5 } => {
                    fusable.push(Fusable::Conv(cv1));
                    fusable.push(Fusable::Conv(cv5));
                }
                Layer::CbLinear { conv, path, .. } => {
                    put(format!("{path}.weight"), &conv.ws);
                    if let Some(b) = &conv.bs {
                        put(format!("{path}.bias"), b);
                    }
                }
                Layer::Segment(s) => {
                    s.detect.fuse_into(&mut fusable, &mut put);
                    for (l, (a, b, last)) in s.coefficients.iter().enumerate() {
                        fusable.push(Fusable::Conv(a));
                        fusable.push(Fusable::Conv(b));
                        put(format!("{}.cv4.{l}.2.weight", s.detect.path), &last.ws);
                        if let Some(bias) = &last.bs {
                            put(format!("{}.cv4.{l}.2.bias", s.detect.path), bias);
                        }
                    }
                    fusable.extend(s.proto.iter().map(Fusable::Conv));
                }
                Layer::Detect(d) => d.fuse_into(&mut fusable, &mut put),
                Layer::Silence | Layer::Upsample | Layer::Concat | Layer::CbFuse { .. } => {}
            }
        }
        for f in fusable {
            let (path, (w, b)) = match f {
                Fusable::Conv(c) => (&c.path, c.folded()),
                Fusable::Rep(r) => (&r.path, r.folded()),
            };
            put(format!("{path}.conv.weight"), &w);
            put(format!("{path}.conv.bias"), &b);
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }
}

fn size_of(t: &Tensor, dim: usize) -> i64 {
    t.size().get(dim).copied().unwrap_or(0)
}

/// avg_pool2d(k=2, s=1, p=0): ADown's and AConv's smoothing step.
fn avg_pool2(x: &Tensor) -> Tensor {
    x.avg_pool2d([2, 2], [1, 1], [0, 0], false, true, None)
}

/// DFL's expectation weights 0..16 as a `[1, 16, 1, 1]` convolution filter.
fn dfl_projection() -> Tensor {
    Tensor::arange(REG_MAX as i64, (Kind::Float, tch::Device::Cpu)).view([1, REG_MAX as i64, 1, 1])
}

impl Detect {
    /// `groups`: of the box branch's second 3×3 and last 1×1 convolutions (4 in DDetect, 1 in
    /// the Segment head's dense `Detect`).
    fn new(p: &nn::Path, config: &ModelConfig, levels: &[usize], groups: usize) -> Result<Self> {
        let act = config.activation;
        let nc = config.num_classes;
        let first = *levels
            .first()
            .ok_or_else(|| Error::Shape("DDetect has no input levels".into()))?;
        let (c2, c3) = config.head_widths(first);
        let mut boxes = Vec::new();
        let mut classes = Vec::new();
        for (l, &c) in levels.iter().enumerate() {
            let stride = STRIDES[l] as f64;
            let q = p / "cv2" / l;
            let last = nn::conv2d(
                &q / "2",
                c2 as i64,
                (4 * REG_MAX) as i64,
                1,
                nn::ConvConfig {
                    groups: groups as i64,
                    bs_init: nn::Init::Const(1.0),
                    ..Default::default()
                },
            );
            boxes.push((
                ConvBn::new(&q, "0", c, c2, 3, 1, 1, Some(act)),
                ConvBn::new(&q, "1", c2, c2, 3, 1, groups, Some(act)),
                last,
            ));
            let q = p / "cv3" / l;
            // YOLOv9's prior: about 5 objects per 640x640 image spread over the classes.
            let cls_bias = (5.0 / nc as f64 / (640.0 / stride).powi(2)).ln();
            let last = nn::conv2d(
                &q / "2",
                c3 as i64,
                nc as i64,
                1,
                nn::ConvConfig {
                    bs_init: nn::Init::Const(cls_bias),
                    ..Default::default()
                },
            );
            classes.push((
                ConvBn::new(&q, "0", c, c3, 3, 1, 1, Some(act)),
                ConvBn::new(&q, "1", c3, c3, 3, 1, 1, Some(act)),
                last,
            ));
        }
        let (anchors, strides) = anchor_grid(config);
        let device = p.device();
        Ok(Self {
            path: path_name(p),
            boxes,
            classes,
            num_classes: nc,
            anchors: Tensor::from_slice(&anchors)
                .view([1, 2, -1])
                .to_device(device),
            strides: Tensor::from_slice(&strides)
                .view([1, 1, -1])
                .to_device(device),
            dfl: dfl_projection().to_device(device),
        })
    }

    /// The branches' convolutions for [`Gelan::fuse`], and the final 1×1 convolutions and the
    /// DFL projection put under their exporter names.
    fn fuse_into<'a>(
        &'a self,
        fusable: &mut Vec<Fusable<'a>>,
        put: &mut impl FnMut(String, &Tensor),
    ) {
        for branch in self.boxes.iter().chain(&self.classes) {
            fusable.push(Fusable::Conv(&branch.0));
            fusable.push(Fusable::Conv(&branch.1));
        }
        for (l, (_, _, last)) in self.boxes.iter().enumerate() {
            put(format!("{}.cv2.{l}.2.weight", self.path), &last.ws);
            if let Some(b) = &last.bs {
                put(format!("{}.cv2.{l}.2.bias", self.path), b);
            }
        }
        for (l, (_, _, last)) in self.classes.iter().enumerate() {
            put(format!("{}.cv3.{l}.2.weight", self.path), &last.ws);
            if let Some(b) = &last.bs {
                put(format!("{}.cv3.{l}.2.bias", self.path), b);
            }
        }
        put(format!("{}.dfl.conv.weight", self.path), &dfl_projection());
    }

    /// Raw per-level outputs concatenated over anchors: `[B, 4·reg_max + classes, A]`
    /// (what the loss uses).
    fn raw_t(&self, levels: &[&Tensor], train: bool) -> Result<Tensor> {
        if levels.len() != self.boxes.len() {
            return Err(Error::Shape(format!(
                "DDetect has {} levels, got {}",
                self.boxes.len(),
                levels.len()
            )));
        }
        let mut per_level = Vec::with_capacity(levels.len());
        for (l, x) in levels.iter().enumerate() {
            let (b0, b1, b2) = &self.boxes[l];
            let (c0, c1, c2) = &self.classes[l];
            let b = b2.forward(&b1.forward_t(&b0.forward_t(x, train), train));
            let c = c2.forward(&c1.forward_t(&c0.forward_t(x, train), train));
            let y = Tensor::cat(&[b, c], 1);
            let n = size_of(&y, 0);
            per_level.push(y.view([n, (4 * REG_MAX + self.num_classes) as i64, -1]));
        }
        Ok(Tensor::cat(&per_level, 2))
    }

    /// Decoded output `[B, 4 + classes, A]` (xywh in pixels, sigmoid scores).
    fn forward_t(&self, levels: &[&Tensor], train: bool) -> Result<Tensor> {
        self.decode(&self.raw_t(levels, train)?)
    }

    /// The raw head `[B, 4·reg_max + classes, A]` decoded as [`Detect::forward_t`] returns it.
    fn decode(&self, raw: &Tensor) -> Result<Tensor> {
        let n = size_of(&raw, 0);
        let a = size_of(&raw, 2);
        let parts = raw.split_with_sizes([(4 * REG_MAX) as i64, self.num_classes as i64], 1);
        let dist = parts[0]
            .view([n, 4, REG_MAX as i64, a])
            .softmax(2, Kind::Float)
            .transpose(1, 2)
            .conv2d(&self.dfl, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .view([n, 4, a]);
        let (anchors, strides) = (&self.anchors, &self.strides);
        let lt = dist.narrow(1, 0, 2);
        let rb = dist.narrow(1, 2, 2);
        let x1y1 = anchors - lt;
        let x2y2 = anchors + rb;
        let cxy = (&x1y1 + &x2y2) / 2.0;
        let wh = x2y2 - x1y1;
        let boxes = Tensor::cat(&[cxy, wh], 1) * strides;
        Ok(Tensor::cat(&[boxes, parts[1].sigmoid()], 1))
    }
}

impl SegmentHead {
    fn new(
        p: &nn::Path,
        config: &ModelConfig,
        levels: &[usize],
        nm: usize,
        npr: usize,
    ) -> Result<Self> {
        let act = Some(config.activation);
        let detect = Detect::new(p, config, levels, 1)?;
        let c_p3 = levels[0];
        let c4 = (c_p3 / 4).max(nm);
        let coefficients = levels
            .iter()
            .enumerate()
            .map(|(l, &c)| {
                let q = p / "cv4" / l;
                (
                    ConvBn::new(&q, "0", c, c4, 3, 1, 1, act),
                    ConvBn::new(&q, "1", c4, c4, 3, 1, 1, act),
                    nn::conv2d(&q / "2", c4 as i64, nm as i64, 1, Default::default()),
                )
            })
            .collect();
        let q = p / "proto";
        let proto = [
            ConvBn::new(&q, "cv1", c_p3, npr, 3, 1, 1, act),
            ConvBn::new(&q, "cv2", npr, npr, 3, 1, 1, act),
            ConvBn::new(&q, "cv3", npr, nm, 1, 1, 1, act),
        ];
        Ok(Self {
            detect,
            coefficients,
            proto,
            nm,
        })
    }

    /// The detection rows (raw or decoded) with each anchor's mask coefficients appended, and
    /// the prototypes.
    fn forward_t(&self, levels: &[&Tensor], train: bool, raw: bool) -> Result<Outputs> {
        let det = self.detect.raw_t(levels, train)?;
        let det = if raw { det } else { self.detect.decode(&det)? };
        let mut per_level = Vec::with_capacity(levels.len());
        for ((a, b, last), x) in self.coefficients.iter().zip(levels) {
            let m = last.forward(&b.forward_t(&a.forward_t(x, train), train));
            per_level.push(m.view([size_of(&m, 0), self.nm as i64, -1]));
        }
        let head = Tensor::cat(&[det, Tensor::cat(&per_level, 2)], 1);
        let [cv1, cv2, cv3] = &self.proto;
        let x = cv1.forward_t(levels[0], train);
        let x = x.upsample_nearest2d([size_of(&x, 2) * 2, size_of(&x, 3) * 2], None, None);
        let prototypes = cv3.forward_t(&cv2.forward_t(&x, train), train);
        Ok(Outputs {
            head,
            prototypes: Some(prototypes),
        })
    }
}

/// Anchor centres `[A, 2]` in grid units (cells + 0.5) and each anchor's stride `[A, 1]` in
/// pixels, level by level (the exporter's [`anchor_grid`]): what the loss takes.
pub fn anchor_points(config: &ModelConfig, device: tch::Device) -> (Tensor, Tensor) {
    let (centres, strides) = anchor_grid(config);
    let a = strides.len() as i64;
    (
        Tensor::from_slice(&centres)
            .view([2, a])
            .transpose(0, 1)
            .contiguous()
            .to_device(device),
        Tensor::from_slice(&strides).view([a, 1]).to_device(device),
    )
}
