//! ONNX from a [`ModelConfig`] plus weights.
//!
//! The graph is YOLOv9's deployment form: input `images [batch, 3, H, W]` float32 in [0, 1], output
//! `output0 [batch, 4 + nc, anchors]` with box centre x, centre y, width, height in input pixels
//! followed by sigmoid class scores; opset 17, dynamic batch by default. Segmentation models
//! (`gelan-*-seg`) add 32 mask coefficients per anchor to `output0` and the prototypes as
//! `output1 [batch, 32, H/4, W/4]`; their head's weights are `model.{head}.proto.cv{1,2,3}.conv.*`
//! and `model.{head}.cv4.{level}.{0,1}.conv.*` / `.2.weight|bias`.
//!
//! # Weight names
//! Tensor names follow the state dict of YOLOv9's fused (deployment) PyTorch model, so weights
//! converted from there load directly: every convolution with an activation is
//! `model.{layer}.{path}.conv.weight` / `.conv.bias` (e.g. `model.2.cv2.0.m.0.cv1.conv.weight` for the
//! merged RepConvN of the first bottleneck), the head's final 1×1 convolutions are
//! `model.{head}.cv2.{level}.2.weight` / `.bias` (box, 64 channels, groups 4) and
//! `model.{head}.cv3.{level}.2.weight` / `.bias` (classes), CBLinear is `model.{layer}.conv.weight`,
//! and the DFL's fixed projection is `model.{head}.dfl.conv.weight` `[1, 16, 1, 1]`.
//! `kestrel export --list-weights` prints every name with its shape.

use crate::builder::GraphBuilder;
use crate::error::{Error, Result};
use crate::onnx::pb;
use crate::shapes::Dim;
use crate::spec::{Activation, Block, ModelConfig, REG_MAX, STRIDES, make_divisible};
use crate::weights::WeightSource;

/// ONNX IR version written (the one opset 17 belongs to).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written.
pub const OPSET: i64 = 17;
/// Name of the image input.
pub const INPUT_NAME: &str = "images";
/// Name of the detection output.
pub const OUTPUT_NAME: &str = "output0";
/// Name of the segmentation models' prototype output.
pub const PROTOTYPES_NAME: &str = "output1";

/// Export options beyond the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// `None`: a symbolic `batch` dimension; `Some(n)`: fixed batch n.
    pub batch: Option<usize>,
    /// Class names written to the metadata (`names`); must have `num_classes` entries.
    pub class_names: Vec<String>,
}

impl ExportOptions {
    /// Dynamic batch and names `class0`, `class1`, …
    pub fn dynamic(num_classes: usize) -> Self {
        Self {
            batch: None,
            class_names: (0..num_classes).map(|i| format!("class{i}")).collect(),
        }
    }
}

struct Lowering<'a> {
    b: GraphBuilder,
    w: &'a mut WeightSource,
    act: Activation,
}

impl Lowering<'_> {
    fn channels(&self, x: &str) -> Result<usize> {
        self.b
            .channels(x)
            .ok_or_else(|| Error::Graph(format!("value '{x}' has no fixed channel count")))
    }

    /// Conv2d (+bias) with padding k/2; `prefix` gets `.weight`/`.bias` appended.
    fn conv_raw(
        &mut self,
        x: &str,
        prefix: &str,
        c2: usize,
        k: usize,
        s: usize,
        g: usize,
        bias_init: Option<f32>,
    ) -> Result<String> {
        let c1 = self.channels(x)?;
        if c1 % g != 0 || c2 % g != 0 {
            return Err(Error::Graph(format!(
                "{prefix}: {c1}->{c2} channels cannot be split in {g} groups"
            )));
        }
        let wshape = [c2, c1 / g, k, k];
        let fan_in = c1 / g * k * k;
        let wname = format!("{prefix}.weight");
        let bname = format!("{prefix}.bias");
        let wv = self.w.conv_param(&wname, &wshape, fan_in, None)?;
        let bv = self.w.conv_param(&bname, &[c2], fan_in, bias_init)?;
        let wdims: Vec<i64> = wshape.iter().map(|&d| d as i64).collect();
        let wn = self.b.const_f32(&wname, &wdims, &wv);
        let bn = self.b.const_f32(&bname, &[c2 as i64], &bv);
        let p = (k / 2) as i64;
        self.b.node1(
            "Conv",
            prefix,
            &[x, &wn, &bn],
            vec![
                pb::AttributeProto::ints("kernel_shape", &[k as i64, k as i64]),
                pb::AttributeProto::ints("strides", &[s as i64, s as i64]),
                pb::AttributeProto::ints("pads", &[p, p, p, p]),
                pb::AttributeProto::ints("dilations", &[1, 1]),
                pb::AttributeProto::int("group", g as i64),
            ],
        )
    }

    /// YOLOv9's `Conv`: convolution + bias + activation; weights at `{prefix}.conv.*`.
    fn conv(
        &mut self,
        x: &str,
        prefix: &str,
        c2: usize,
        k: usize,
        s: usize,
        g: usize,
    ) -> Result<String> {
        let y = self.conv_raw(x, &format!("{prefix}.conv"), c2, k, s, g, None)?;
        self.activation(&y, prefix)
    }

    fn activation(&mut self, x: &str, prefix: &str) -> Result<String> {
        match self.act {
            // Opset 17 has no SiLU; PyTorch exports it as x * sigmoid(x) too.
            Activation::Silu => {
                let s = self
                    .b
                    .node1("Sigmoid", &format!("{prefix}.act.sigmoid"), &[x], vec![])?;
                self.b
                    .node1("Mul", &format!("{prefix}.act"), &[x, &s], vec![])
            }
            Activation::Relu => self.b.node1("Relu", &format!("{prefix}.act"), &[x], vec![]),
        }
    }

    fn split_half(&mut self, x: &str, prefix: &str) -> Result<(String, String)> {
        let c = self.channels(x)?;
        if c % 2 != 0 {
            return Err(Error::Graph(format!("{prefix}: cannot halve {c} channels")));
        }
        let sizes = self.b.const_i64(
            &format!("{prefix}.split_sizes"),
            &[(c / 2) as i64, (c / 2) as i64],
        );
        let mut outs = self.b.node(
            "Split",
            &format!("{prefix}.split"),
            &[x, &sizes],
            vec![pb::AttributeProto::int("axis", 1)],
            2,
        )?;
        let second = outs.remove(1);
        Ok((outs.remove(0), second))
    }

    fn concat(&mut self, xs: &[&str], name: &str, axis: i64) -> Result<String> {
        self.b.node1(
            "Concat",
            name,
            xs,
            vec![pb::AttributeProto::int("axis", axis)],
        )
    }

    fn maxpool(&mut self, x: &str, name: &str, k: i64, s: i64, p: i64) -> Result<String> {
        self.b.node1(
            "MaxPool",
            name,
            &[x],
            vec![
                pb::AttributeProto::ints("kernel_shape", &[k, k]),
                pb::AttributeProto::ints("strides", &[s, s]),
                pb::AttributeProto::ints("pads", &[p, p, p, p]),
            ],
        )
    }

    /// avg_pool2d(k=2, s=1, p=0): the smoothing step of ADown/AConv.
    fn avgpool2(&mut self, x: &str, name: &str) -> Result<String> {
        self.b.node1(
            "AveragePool",
            name,
            &[x],
            vec![
                pb::AttributeProto::ints("kernel_shape", &[2, 2]),
                pb::AttributeProto::ints("strides", &[1, 1]),
                pb::AttributeProto::ints("pads", &[0, 0, 0, 0]),
                pb::AttributeProto::int("count_include_pad", 1),
            ],
        )
    }

    /// Nearest resize by an integer factor, as PyTorch exports `nn.Upsample(mode='nearest')`.
    fn resize_nearest(&mut self, x: &str, name: &str, factor: f32) -> Result<String> {
        let scales = self
            .b
            .const_f32(&format!("{name}.scales"), &[4], &[1.0, 1.0, factor, factor]);
        self.b.node1(
            "Resize",
            name,
            &[x, "", &scales],
            vec![
                pb::AttributeProto::string("mode", "nearest"),
                pb::AttributeProto::string("coordinate_transformation_mode", "asymmetric"),
                pb::AttributeProto::string("nearest_mode", "floor"),
            ],
        )
    }

    fn reshape(&mut self, x: &str, name: &str, shape: &[i64]) -> Result<String> {
        let s = self.b.const_i64(&format!("{name}.shape"), shape);
        self.b.node1("Reshape", name, &[x, &s], vec![])
    }

    fn slice_channels(&mut self, x: &str, name: &str, start: i64, end: i64) -> Result<String> {
        let st = self.b.const_i64(&format!("{name}.starts"), &[start]);
        let en = self.b.const_i64(&format!("{name}.ends"), &[end]);
        let ax = self.b.const_i64(&format!("{name}.axes"), &[1]);
        self.b.node1("Slice", name, &[x, &st, &en, &ax], vec![])
    }

    fn rep_ncsp(&mut self, x: &str, p: &str, c2: usize, n: usize) -> Result<String> {
        let c_ = c2 / 2;
        let mut a = self.conv(x, &format!("{p}.cv1"), c_, 1, 1, 1)?;
        for j in 0..n {
            // RepNBottleneck: merged RepConvN 3x3, then Conv 3x3, plus the shortcut.
            let q = format!("{p}.m.{j}");
            let h = self.conv(&a, &format!("{q}.cv1"), c_, 3, 1, 1)?;
            let h = self.conv(&h, &format!("{q}.cv2"), c_, 3, 1, 1)?;
            a = self
                .b
                .node1("Add", &format!("{q}.add"), &[&a, &h], vec![])?;
        }
        let b = self.conv(x, &format!("{p}.cv2"), c_, 1, 1, 1)?;
        let cat = self.concat(&[&a, &b], &format!("{p}.cat"), 1)?;
        self.conv(&cat, &format!("{p}.cv3"), c2, 1, 1, 1)
    }

    /// ELAN-1 (`n == None`) or RepNCSPELAN4 (`n == Some(depth)`).
    fn elan(
        &mut self,
        x: &str,
        p: &str,
        c2: usize,
        c3: usize,
        c4: usize,
        n: Option<usize>,
    ) -> Result<String> {
        let y = self.conv(x, &format!("{p}.cv1"), c3, 1, 1, 1)?;
        let (a, b) = self.split_half(&y, p)?;
        let (y2, y3) = match n {
            None => {
                let y2 = self.conv(&b, &format!("{p}.cv2"), c4, 3, 1, 1)?;
                let y3 = self.conv(&y2, &format!("{p}.cv3"), c4, 3, 1, 1)?;
                (y2, y3)
            }
            Some(n) => {
                let t = self.rep_ncsp(&b, &format!("{p}.cv2.0"), c4, n)?;
                let y2 = self.conv(&t, &format!("{p}.cv2.1"), c4, 3, 1, 1)?;
                let t = self.rep_ncsp(&y2, &format!("{p}.cv3.0"), c4, n)?;
                let y3 = self.conv(&t, &format!("{p}.cv3.1"), c4, 3, 1, 1)?;
                (y2, y3)
            }
        };
        let cat = self.concat(&[&a, &b, &y2, &y3], &format!("{p}.cat"), 1)?;
        self.conv(&cat, &format!("{p}.cv4"), c2, 1, 1, 1)
    }

    /// The detection rows of the head: boxes `[B, 4, A]` (xywh in input pixels) and sigmoid
    /// scores `[B, nc, A]`. `groups` is 4 for DDetect's box branch, 1 for the dense `Detect` of the
    /// segmentation head.
    fn detect(
        &mut self,
        cfg: &ModelConfig,
        p: &str,
        levels: &[String],
        groups: usize,
    ) -> Result<(String, String)> {
        let nc = cfg.num_classes;
        let (c2, c3) = cfg.head_widths(self.channels(&levels[0])?);
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        for (l, x) in levels.iter().enumerate() {
            let stride = STRIDES[l] as f32;
            let b = self.conv(x, &format!("{p}.cv2.{l}.0"), c2, 3, 1, 1)?;
            let b = self.conv(&b, &format!("{p}.cv2.{l}.1"), c2, 3, 1, groups)?;
            let b = self.conv_raw(
                &b,
                &format!("{p}.cv2.{l}.2"),
                4 * REG_MAX,
                1,
                1,
                groups,
                Some(1.0),
            )?;
            let c = self.conv(x, &format!("{p}.cv3.{l}.0"), c3, 3, 1, 1)?;
            let c = self.conv(&c, &format!("{p}.cv3.{l}.1"), c3, 3, 1, 1)?;
            // YOLOv9's prior: about 5 objects per 640x640 image spread over the classes.
            let cls_bias = (5.0 / nc as f32 / (640.0 / stride).powi(2)).ln();
            let c = self.conv_raw(&c, &format!("{p}.cv3.{l}.2"), nc, 1, 1, 1, Some(cls_bias))?;
            boxes.push(self.reshape(
                &b,
                &format!("{p}.box{l}.flatten"),
                &[0, (4 * REG_MAX) as i64, -1],
            )?);
            scores.push(self.reshape(&c, &format!("{p}.cls{l}.flatten"), &[0, nc as i64, -1])?);
        }
        let box_refs: Vec<&str> = boxes.iter().map(String::as_str).collect();
        let cls_refs: Vec<&str> = scores.iter().map(String::as_str).collect();
        let boxes = self.concat(&box_refs, &format!("{p}.box.cat"), 2)?;
        let logits = self.concat(&cls_refs, &format!("{p}.cls.cat"), 2)?;

        // DFL: softmax over the 16 bins of each side, then the expectation (a fixed 1x1 conv).
        let r = self.reshape(
            &boxes,
            &format!("{p}.dfl.view"),
            &[0, 4, REG_MAX as i64, -1],
        )?;
        let t = self.b.node1(
            "Transpose",
            &format!("{p}.dfl.transpose"),
            &[&r],
            vec![pb::AttributeProto::ints("perm", &[0, 2, 1, 3])],
        )?;
        let sm = self.b.node1(
            "Softmax",
            &format!("{p}.dfl.softmax"),
            &[&t],
            vec![pb::AttributeProto::int("axis", 1)],
        )?;
        let proj_name = format!("{p}.dfl.conv.weight");
        let proj = self.w.fixed_param(
            &proj_name,
            &[1, REG_MAX, 1, 1],
            (0..REG_MAX).map(|i| i as f32).collect(),
        )?;
        let proj = self
            .b
            .const_f32(&proj_name, &[1, REG_MAX as i64, 1, 1], &proj);
        let d = self.b.node1(
            "Conv",
            &format!("{p}.dfl.conv"),
            &[&sm, &proj],
            vec![
                pb::AttributeProto::ints("kernel_shape", &[1, 1]),
                pb::AttributeProto::ints("strides", &[1, 1]),
                pb::AttributeProto::ints("pads", &[0, 0, 0, 0]),
                pb::AttributeProto::int("group", 1),
            ],
        )?;
        let dist = self.reshape(&d, &format!("{p}.dfl.out"), &[0, 4, -1])?;

        // dist2bbox with anchors at cell centres, then scale by the stride: xywh in input pixels.
        let (anchors, strides) = anchor_grid(cfg);
        let a = anchors.len() / 2;
        let anchors = self
            .b
            .const_f32(&format!("{p}.anchors"), &[1, 2, a as i64], &anchors);
        let strides = self
            .b
            .const_f32(&format!("{p}.strides"), &[1, 1, a as i64], &strides);
        let lt = self.slice_channels(&dist, &format!("{p}.lt"), 0, 2)?;
        let rb = self.slice_channels(&dist, &format!("{p}.rb"), 2, 4)?;
        let x1y1 = self
            .b
            .node1("Sub", &format!("{p}.x1y1"), &[&anchors, &lt], vec![])?;
        let x2y2 = self
            .b
            .node1("Add", &format!("{p}.x2y2"), &[&anchors, &rb], vec![])?;
        let sum = self
            .b
            .node1("Add", &format!("{p}.cxy.sum"), &[&x1y1, &x2y2], vec![])?;
        let two = self.b.const_f32(&format!("{p}.two"), &[1], &[2.0]);
        let cxy = self
            .b
            .node1("Div", &format!("{p}.cxy"), &[&sum, &two], vec![])?;
        let wh = self
            .b
            .node1("Sub", &format!("{p}.wh"), &[&x2y2, &x1y1], vec![])?;
        let xywh = self.concat(&[&cxy, &wh], &format!("{p}.xywh"), 1)?;
        let dbox = self
            .b
            .node1("Mul", &format!("{p}.dbox"), &[&xywh, &strides], vec![])?;
        let cls = self
            .b
            .node1("Sigmoid", &format!("{p}.scores"), &[&logits], vec![])?;
        Ok((dbox, cls))
    }

    /// DDetect: `output0` `[B, 4 + nc, A]`.
    fn detection_head(&mut self, cfg: &ModelConfig, p: &str, levels: &[String]) -> Result<String> {
        let (dbox, cls) = self.detect(cfg, p, levels, 4)?;
        let out = self.concat(&[&dbox, &cls], &format!("{p}.output"), 1)?;
        self.b.rename_last_output(&out, OUTPUT_NAME);
        self.b.doc_last("output0: [batch, 4 + classes, anchors]; rows 0-3 are box centre x, centre y, width, height in input pixels, the rest sigmoid class scores");
        Ok(OUTPUT_NAME.to_string())
    }

    /// Segment: `output0` `[B, 4 + nc + nm, A]` (the detection rows, then each anchor's mask
    /// coefficients) and `output1` `[B, nm, H/4, W/4]` (the prototypes).
    fn segmentation_head(
        &mut self,
        cfg: &ModelConfig,
        p: &str,
        levels: &[String],
        nm: usize,
        npr: usize,
    ) -> Result<(String, String)> {
        let c_p3 = self.channels(&levels[0])?;
        // Prototypes from the first level, at stride 4.
        let x = self.conv(&levels[0], &format!("{p}.proto.cv1"), npr, 3, 1, 1)?;
        let x = self.resize_nearest(&x, &format!("{p}.proto.upsample"), 2.0)?;
        let x = self.conv(&x, &format!("{p}.proto.cv2"), npr, 3, 1, 1)?;
        let protos = self.conv(&x, &format!("{p}.proto.cv3"), nm, 1, 1, 1)?;
        self.b.rename_last_output(&protos, PROTOTYPES_NAME);
        self.b
            .doc_last("output1: [batch, 32, H/4, W/4] mask prototypes");
        let (dbox, cls) = self.detect(cfg, p, levels, 1)?;
        let c4 = (c_p3 / 4).max(nm);
        let mut coefficients = Vec::new();
        for (l, x) in levels.iter().enumerate() {
            let m = self.conv(x, &format!("{p}.cv4.{l}.0"), c4, 3, 1, 1)?;
            let m = self.conv(&m, &format!("{p}.cv4.{l}.1"), c4, 3, 1, 1)?;
            let m = self.conv_raw(&m, &format!("{p}.cv4.{l}.2"), nm, 1, 1, 1, None)?;
            coefficients.push(self.reshape(
                &m,
                &format!("{p}.mc{l}.flatten"),
                &[0, nm as i64, -1],
            )?);
        }
        let refs: Vec<&str> = coefficients.iter().map(String::as_str).collect();
        let mc = self.concat(&refs, &format!("{p}.mc.cat"), 2)?;
        let out = self.concat(&[&dbox, &cls, &mc], &format!("{p}.output"), 1)?;
        self.b.rename_last_output(&out, OUTPUT_NAME);
        self.b.doc_last("output0: [batch, 4 + classes + 32, anchors]; rows 0-3 are box centre x, centre y, width, height in input pixels, then sigmoid class scores, then 32 mask coefficients");
        Ok((OUTPUT_NAME.to_string(), PROTOTYPES_NAME.to_string()))
    }
}

/// Anchor centres `[2, A]` (x row then y row, in grid cells + 0.5) and per-anchor strides `[A]`,
/// level by level, row-major within a level, as YOLOv9's `make_anchors`.
pub fn anchor_grid(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut strides = Vec::new();
    for s in STRIDES {
        let (h, w) = (cfg.imgsz[0] / s, cfg.imgsz[1] / s);
        for y in 0..h {
            for x in 0..w {
                xs.push(x as f32 + 0.5);
                ys.push(y as f32 + 0.5);
                strides.push(s as f32);
            }
        }
    }
    xs.extend(ys);
    (xs, strides)
}

/// Build the ONNX model for `cfg` with weights from `weights`.
pub fn export(
    cfg: &ModelConfig,
    weights: &mut WeightSource,
    opts: &ExportOptions,
) -> Result<pb::ModelProto> {
    cfg.validate()?;
    if opts.class_names.len() != cfg.num_classes {
        return Err(Error::InvalidConfig(format!(
            "{} class names given for a {}-class model; give one name per class",
            opts.class_names.len(),
            cfg.num_classes
        )));
    }
    if opts.batch == Some(0) {
        return Err(Error::InvalidConfig("batch size 0: give at least 1".into()));
    }
    let spec = &cfg.spec;
    let mut lw = Lowering {
        b: GraphBuilder::new(),
        w: weights,
        act: cfg.activation,
    };
    let batch = match opts.batch {
        None => Dim::Symbol("batch".into()),
        Some(n) => Dim::Fixed(n as i64),
    };
    let input = lw.b.input(
        INPUT_NAME,
        vec![
            batch,
            Dim::Fixed(3),
            Dim::Fixed(cfg.imgsz[0] as i64),
            Dim::Fixed(cfg.imgsz[1] as i64),
        ],
    );
    // outputs[i] = the values layer i produced (CBLinear produces several).
    let mut outputs: Vec<Vec<String>> = Vec::with_capacity(spec.layers.len());
    let mut result = String::new();
    let mut prototypes = None;
    for (i, layer) in spec.layers.iter().enumerate() {
        let p = format!("model.{i}");
        let from = spec.inputs_of(i);
        let first = if i == 0 {
            input.clone()
        } else {
            outputs[from[0]][0].clone()
        };
        let out: Vec<String> = match &layer.block {
            Block::Silence => vec![first],
            Block::Conv { c2, k, s } => {
                vec![lw.conv(&first, &p, make_divisible(*c2, 8), *k, *s, 1)?]
            }
            Block::Elan1 { c2, c3, c4 } => {
                vec![lw.elan(&first, &p, make_divisible(*c2, 8), *c3, *c4, None)?]
            }
            Block::RepNcspElan4 { c2, c3, c4, n } => {
                vec![lw.elan(&first, &p, make_divisible(*c2, 8), *c3, *c4, Some(*n))?]
            }
            Block::ADown { c2 } => {
                let c = make_divisible(*c2, 8) / 2;
                let x = lw.avgpool2(&first, &format!("{p}.avgpool"))?;
                let (x1, x2) = lw.split_half(&x, &p)?;
                let x1 = lw.conv(&x1, &format!("{p}.cv1"), c, 3, 2, 1)?;
                let x2 = lw.maxpool(&x2, &format!("{p}.maxpool"), 3, 2, 1)?;
                let x2 = lw.conv(&x2, &format!("{p}.cv2"), c, 1, 1, 1)?;
                vec![lw.concat(&[&x1, &x2], &format!("{p}.cat"), 1)?]
            }
            Block::AConv { c2 } => {
                let x = lw.avgpool2(&first, &format!("{p}.avgpool"))?;
                vec![lw.conv(&x, &format!("{p}.cv1"), make_divisible(*c2, 8), 3, 2, 1)?]
            }
            Block::SppElan { c2, c3 } => {
                let y0 = lw.conv(&first, &format!("{p}.cv1"), *c3, 1, 1, 1)?;
                let y1 = lw.maxpool(&y0, &format!("{p}.cv2"), 5, 1, 2)?;
                let y2 = lw.maxpool(&y1, &format!("{p}.cv3"), 5, 1, 2)?;
                let y3 = lw.maxpool(&y2, &format!("{p}.cv4"), 5, 1, 2)?;
                let cat = lw.concat(&[&y0, &y1, &y2, &y3], &format!("{p}.cat"), 1)?;
                vec![lw.conv(&cat, &format!("{p}.cv5"), make_divisible(*c2, 8), 1, 1, 1)?]
            }
            Block::Upsample => vec![lw.resize_nearest(&first, &format!("{p}.upsample"), 2.0)?],
            Block::Concat => {
                let xs: Vec<String> = from.iter().map(|&f| outputs[f][0].clone()).collect();
                let refs: Vec<&str> = xs.iter().map(String::as_str).collect();
                vec![lw.concat(&refs, &format!("{p}.cat"), 1)?]
            }
            Block::CbLinear { c2s } => {
                let total: usize = c2s.iter().sum();
                let y = lw.conv_raw(&first, &format!("{p}.conv"), total, 1, 1, 1, None)?;
                let sizes: Vec<i64> = c2s.iter().map(|&c| c as i64).collect();
                let sz = lw.b.const_i64(&format!("{p}.split_sizes"), &sizes);
                lw.b.node(
                    "Split",
                    &format!("{p}.split"),
                    &[&y, &sz],
                    vec![pb::AttributeProto::int("axis", 1)],
                    c2s.len(),
                )?
            }
            Block::CbFuse { idx } => {
                let last = outputs[*from.last().unwrap_or(&0)][0].clone();
                let target =
                    lw.b.shape(&last)
                        .and_then(|s| s.get(2)?.fixed())
                        .unwrap_or(0);
                let mut acc = last.clone();
                for (j, &sel) in idx.iter().enumerate() {
                    let src = outputs[from[j]].get(sel).cloned().ok_or_else(|| {
                        Error::Graph(format!(
                            "{p}: CBFuse picks split {sel} of layer {}",
                            from[j]
                        ))
                    })?;
                    let h =
                        lw.b.shape(&src)
                            .and_then(|s| s.get(2)?.fixed())
                            .unwrap_or(0);
                    if h == 0 || target % h != 0 {
                        return Err(Error::Graph(format!("{p}: cannot resize {h} to {target}")));
                    }
                    let up = if h == target {
                        src
                    } else {
                        lw.resize_nearest(&src, &format!("{p}.resize{j}"), (target / h) as f32)?
                    };
                    acc =
                        lw.b.node1("Add", &format!("{p}.sum{j}"), &[&acc, &up], vec![])?;
                }
                vec![acc]
            }
            Block::DDetect => {
                let levels: Vec<String> = from.iter().map(|&f| outputs[f][0].clone()).collect();
                result = lw.detection_head(cfg, &p, &levels)?;
                vec![result.clone()]
            }
            Block::Segment { nm, npr } => {
                let levels: Vec<String> = from.iter().map(|&f| outputs[f][0].clone()).collect();
                let (out0, out1) = lw.segmentation_head(cfg, &p, &levels, *nm, *npr)?;
                result = out0;
                prototypes = Some(out1);
                vec![result.clone()]
            }
        };
        outputs.push(out);
    }
    let nm = spec.mask_coefficients();
    lw.b.output(
        &result,
        pb::data_type::FLOAT,
        if nm.is_some() {
            "detections before NMS: [batch, 4 + classes + 32 mask coefficients, anchors]"
        } else {
            "detections before NMS: [batch, 4 + classes, anchors]"
        },
    );
    if let Some(protos) = &prototypes {
        lw.b.output(
            protos,
            pb::data_type::FLOAT,
            "mask prototypes: [batch, 32, H/4, W/4]",
        );
    }
    if let WeightSource::File(f) = lw.w {
        f.check_all_used()?;
    }
    let graph = lw.b.finish(
        &spec.name,
        &format!(
            "{} ({} classes, {}x{} input, {:?}), deployment form exported by Kestrel",
            spec.name, cfg.num_classes, cfg.imgsz[0], cfg.imgsz[1], cfg.activation
        ),
    );
    let names_json = serde_json::to_string(&opts.class_names).unwrap_or_else(|_| "[]".into());
    let meta = |k: &str, v: String| pb::StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    let mut model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "kestrel".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string: match nm {
            None => format!(
                "Kestrel {} detector. Input 'images' [batch, 3, H, W] RGB float32 in [0, 1] (letterboxed, fill 114/255); \
                 output 'output0' [batch, 4 + classes, anchors]: xywh in input pixels then sigmoid scores.",
                spec.name
            ),
            Some(nm) => format!(
                "Kestrel {} instance segmenter. Input 'images' [batch, 3, H, W] RGB float32 in [0, 1] (letterboxed, fill 114/255); \
                 output 'output0' [batch, 4 + classes + {nm}, anchors]: xywh in input pixels, sigmoid scores, mask coefficients; \
                 output 'output1' [batch, {nm}, H/4, W/4]: mask prototypes.",
                spec.name
            ),
        },
        graph: Some(graph),
        metadata_props: vec![
            meta("model", spec.name.clone()),
            meta(
                "task",
                if nm.is_some() { "segment" } else { "detect" }.into(),
            ),
            meta("names", names_json),
            meta("num_classes", cfg.num_classes.to_string()),
            meta("imgsz", format!("[{}, {}]", cfg.imgsz[0], cfg.imgsz[1])),
            meta("strides", format!("{STRIDES:?}")),
            meta("stride", STRIDES[2].to_string()),
            meta("reg_max", REG_MAX.to_string()),
            meta("activation", format!("{:?}", cfg.activation).to_lowercase()),
            meta(
                "batch",
                opts.batch
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "dynamic".into()),
            ),
            meta("producer", format!("kestrel {}", env!("CARGO_PKG_VERSION"))),
        ],
    };
    if let Some(nm) = nm {
        model
            .metadata_props
            .push(meta("mask_coefficients", nm.to_string()));
    }
    Ok(model)
}
