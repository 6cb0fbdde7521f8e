//! Lowering an ONNX graph to the `cuda` backend's execution plan. Pure logic (no GPU), unit-tested
//! on the CPU-only machines.
//!
//! The convolutional trunk runs channels-last (NHWC) in the engine's precision; Conv + bias +
//! activation (SiLU as `x * sigmoid(x)`, or ReLU) + the residual Add that follows become one
//! [`Step::Conv`]. Tensors the trunk does not own (reshapes, softmax, the DFL and box decoding)
//! are row-major float32 with ONNX semantics; a [`Step::ToRowMajor`] converts at the boundary.
//!
//! Q/DQ models: with INT8 on, a convolution behind a QuantizeLinear → DequantizeLinear pair with
//! an int8 filter runs on the INT8 kernel ([`Int8Conv`]), and quantization then moves upstream so
//! int8 travels between INT8 layers; every other Q/DQ pair becomes [`Step::FakeQuant`].

use std::collections::HashMap;

use kestrel_exporter::onnx::pb;
use kestrel_exporter::shapes::{self, Dim};

use crate::error::{Error, Result};

/// Index of a value (tensor) in [`EnginePlan::values`].
pub type ValueId = usize;

/// Memory layout of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Channels-last 4-D tensor in the engine's trunk precision.
    Nhwc,
    /// ONNX order, float32.
    RowMajor,
    /// Channels-last int8: a quantized activation read by INT8 convolutions.
    NhwcInt8,
}

/// Activation fused into a step: codes shared with `kernels.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    Silu = 1,
    Relu = 2,
    Sigmoid = 3,
}

/// Binary operation codes shared with `kernels.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// A tensor of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: String,
    /// Logical ONNX shape; the batch may be symbolic.
    pub dims: Vec<Dim>,
    pub layout: Layout,
    /// Index into [`EnginePlan::constants`] when the value is a constant uploaded at build time.
    pub constant: Option<usize>,
    /// Another value whose memory this one shares (Reshape, Identity).
    pub alias_of: Option<ValueId>,
}

impl Value {
    /// Element count with the batch set to `batch`.
    pub fn numel(&self, batch: usize) -> usize {
        self.dims
            .iter()
            .map(|d| d.fixed().map(|v| v as usize).unwrap_or(batch))
            .product()
    }

    /// Dimensions with the batch set to `batch`.
    pub fn shape(&self, batch: usize) -> Vec<usize> {
        self.dims
            .iter()
            .map(|d| d.fixed().map(|v| v as usize).unwrap_or(batch))
            .collect()
    }
}

/// A float32 constant (weights, biases, anchors, scales).
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

/// An int8 filter with one scale per output channel, from a weight DequantizeLinear.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub name: String,
    /// OIHW.
    pub dims: Vec<usize>,
    pub values: Vec<i8>,
    /// Per output channel (axis 0).
    pub scales: Vec<f32>,
}

/// How a convolution runs in INT8: its int8 input, quantized with `input_scale`, comes from a
/// [`Step::Quantize`], a producer's requantizing epilogue or int8 channel copies; its filter is
/// [`EnginePlan::quantized_weights`]`[weight]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Conv {
    pub weight: usize,
    pub input_scale: f32,
    /// Set where the output feeds only the next INT8 layer: the epilogue stores int8 quantized
    /// with this scale (`y` is then [`Layout::NhwcInt8`]) and no [`Step::Quantize`] pass follows.
    pub output_scale: Option<f32>,
}

/// Convolution geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub group: usize,
}

/// One operation of the plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The engine input (row-major NCHW float32) to the trunk's NHWC layout.
    InputToNhwc {
        x: ValueId,
        y: ValueId,
    },
    /// y = act(conv(x, weight) + bias) (+ residual); NHWC in the trunk, NCHW float32 otherwise.
    Conv {
        x: ValueId,
        y: ValueId,
        weight: usize,
        bias: Option<usize>,
        geometry: ConvGeometry,
        act: Act,
        residual: Option<ValueId>,
        layout: Layout,
        /// Set where the convolution runs on int8 tensor cores (`x` is then [`Layout::NhwcInt8`]);
        /// `weight` still names the dequantized filter.
        int8: Option<Int8Conv>,
    },
    /// The first convolution, over the engine input, in one pass (`stem_conv_*` in kernels.cu):
    /// `x` is the engine input (row-major NCHW float32, 3 channels, 3x3 filter), fake-quantized
    /// on load with `input_scale`; float32 accumulation, bias and activation; `y` is NHWC fp16,
    /// or int8 quantized with `output_scale`. Replaces [`Step::InputToNhwc`], the input's
    /// [`Step::FakeQuant`], a [`Step::Conv`] and its output's [`Step::Quantize`]
    /// ([`EnginePlan::fuse_stem`]).
    StemConv {
        x: ValueId,
        y: ValueId,
        weight: usize,
        bias: Option<usize>,
        geometry: ConvGeometry,
        act: Act,
        input_scale: Option<f32>,
        output_scale: Option<f32>,
    },
    /// fp16 NHWC to int8 NHWC: ONNX QuantizeLinear with a zero point of 0.
    Quantize {
        x: ValueId,
        y: ValueId,
        scale: f32,
    },
    /// QuantizeLinear then DequantizeLinear in the layout of `x`: the Q/DQ pair in front of a
    /// consumer that runs in floating point.
    FakeQuant {
        x: ValueId,
        y: ValueId,
        scale: f32,
    },
    /// Max or average pooling, NHWC.
    Pool {
        x: ValueId,
        y: ValueId,
        max: bool,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
        count_include_pad: bool,
    },
    /// Nearest-neighbour resize by integer factors, NHWC.
    ResizeNearest {
        x: ValueId,
        y: ValueId,
    },
    /// Copy `count` slices along `axis`: `y[.., out_offset + j, ..] = x[.., in_offset + j, ..]`.
    /// Concat, Split and Slice are made of these.
    CopyAxis {
        x: ValueId,
        y: ValueId,
        axis: usize,
        in_offset: usize,
        out_offset: usize,
        count: usize,
    },
    Unary {
        x: ValueId,
        y: ValueId,
        act: Act,
    },
    /// Same-shape operands (any layout) or row-major broadcasting.
    Binary {
        a: ValueId,
        b: ValueId,
        y: ValueId,
        op: BinaryOp,
    },
    Softmax {
        x: ValueId,
        y: ValueId,
        axis: usize,
    },
    Transpose {
        x: ValueId,
        y: ValueId,
        perm: Vec<usize>,
    },
    ToRowMajor {
        x: ValueId,
        y: ValueId,
    },
    /// YOLO's DFL box decoding in one pass: `x` row-major `[n, sides, bins, anchors]` (raw box
    /// logits); `y[n, 0, side, anchor]` = the expectation of the softmax over the bins under the
    /// projection `weight` (`[1, bins, 1, 1]`, 0..bins-1 in YOLO). Replaces a [`Step::Transpose`],
    /// a [`Step::Softmax`] and a row-major 1x1 [`Step::Conv`] ([`EnginePlan::fuse_dfl`]).
    Dfl {
        x: ValueId,
        y: ValueId,
        weight: usize,
        bins: usize,
    },
}

impl Step {
    /// The values the step reads.
    pub fn inputs(&self) -> Vec<ValueId> {
        match self {
            Step::InputToNhwc { x, .. }
            | Step::StemConv { x, .. }
            | Step::ResizeNearest { x, .. }
            | Step::Unary { x, .. }
            | Step::Softmax { x, .. }
            | Step::Transpose { x, .. }
            | Step::ToRowMajor { x, .. }
            | Step::Quantize { x, .. }
            | Step::FakeQuant { x, .. }
            | Step::Pool { x, .. }
            | Step::CopyAxis { x, .. }
            | Step::Dfl { x, .. } => vec![*x],
            Step::Conv { x, residual, .. } => std::iter::once(*x).chain(*residual).collect(),
            Step::Binary { a, b, .. } => vec![*a, *b],
        }
    }

    /// The values the step reads, to rewire them.
    pub fn inputs_mut(&mut self) -> Vec<&mut ValueId> {
        match self {
            Step::InputToNhwc { x, .. }
            | Step::StemConv { x, .. }
            | Step::ResizeNearest { x, .. }
            | Step::Unary { x, .. }
            | Step::Softmax { x, .. }
            | Step::Transpose { x, .. }
            | Step::ToRowMajor { x, .. }
            | Step::Quantize { x, .. }
            | Step::FakeQuant { x, .. }
            | Step::Pool { x, .. }
            | Step::CopyAxis { x, .. }
            | Step::Dfl { x, .. } => vec![x],
            Step::Conv { x, residual, .. } => std::iter::once(x).chain(residual.as_mut()).collect(),
            Step::Binary { a, b, .. } => vec![a, b],
        }
    }

    /// What the step does, as engine listings and profiles name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::InputToNhwc { .. } => "input to NHWC",
            Step::StemConv { .. } => "stem conv",
            Step::Conv { int8: Some(_), .. } => "conv int8",
            Step::Conv {
                layout: Layout::Nhwc,
                ..
            } => "conv + epilogue",
            Step::Conv { .. } => "conv row-major",
            Step::Quantize { .. } => "quantize",
            Step::FakeQuant { .. } => "fake quantize",
            Step::Pool { .. } => "pool",
            Step::ResizeNearest { .. } => "resize",
            Step::CopyAxis { .. } => "concat/split copy",
            Step::Unary { .. } => "unary",
            Step::Binary { .. } => "binary",
            Step::Softmax { .. } => "softmax",
            Step::Transpose { .. } => "transpose",
            Step::ToRowMajor { .. } => "NHWC to row-major",
            Step::Dfl { .. } => "DFL decode",
        }
    }

    /// The value the step writes.
    pub fn output(&self) -> ValueId {
        match self {
            Step::InputToNhwc { y, .. }
            | Step::StemConv { y, .. }
            | Step::ResizeNearest { y, .. }
            | Step::Unary { y, .. }
            | Step::Softmax { y, .. }
            | Step::Transpose { y, .. }
            | Step::ToRowMajor { y, .. }
            | Step::Quantize { y, .. }
            | Step::FakeQuant { y, .. }
            | Step::Pool { y, .. }
            | Step::CopyAxis { y, .. }
            | Step::Conv { y, .. }
            | Step::Binary { y, .. }
            | Step::Dfl { y, .. } => *y,
        }
    }
}

/// What the executor runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EnginePlan {
    pub values: Vec<Value>,
    pub constants: Vec<Constant>,
    pub quantized_weights: Vec<QuantizedWeight>,
    pub steps: Vec<Step>,
    /// The engine input (row-major NCHW float32).
    pub input: ValueId,
    /// The engine output (row-major float32).
    pub output: ValueId,
    /// Segmentation models' prototypes, the second graph output (row-major float32).
    pub prototypes: Option<ValueId>,
}

impl EnginePlan {
    /// The value holding the memory of `v` (follows aliases).
    pub fn storage_of(&self, mut v: ValueId) -> ValueId {
        while let Some(a) = self.values[v].alias_of {
            v = a;
        }
        v
    }

    /// Number of convolutions and how many of them carry a fused activation / residual.
    pub fn fusion_counts(&self) -> (usize, usize, usize) {
        let mut convs = 0;
        let mut acts = 0;
        let mut residuals = 0;
        for s in &self.steps {
            if let Step::Conv { act, residual, .. } = s {
                convs += 1;
                acts += usize::from(*act != Act::None);
                residuals += usize::from(residual.is_some());
            }
        }
        (convs, acts, residuals)
    }

    /// The steps reading each stored value (aliases resolved to the value holding the memory).
    fn readers(&self) -> HashMap<ValueId, Vec<usize>> {
        let mut readers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            for v in s.inputs() {
                readers.entry(self.storage_of(v)).or_default().push(i);
            }
        }
        readers
    }

    /// Whether `v` is only an intermediate between steps, which a fusion that bypasses its
    /// reader may leave unwritten: not an engine output, not an alias of another value and not
    /// aliased by one (a Reshape of it would read it under another name).
    fn is_intermediate(&self, v: ValueId) -> bool {
        v != self.output
            && Some(v) != self.prototypes
            && self.values[v].alias_of.is_none()
            && !self.values.iter().any(|w| w.alias_of == Some(v))
    }

    /// Most output channels the `stem_conv_*` kernels produce (`STEM_MAX_CHANNELS` in
    /// kernels.cu: one warp's accumulators hold 16 pixels of them). YOLO stems have 16 to 64.
    pub const STEM_MAX_CHANNELS: usize = 64;

    /// Fold the first convolution and what surrounds it into one [`Step::StemConv`]: the engine
    /// input's layout pass, its fake quantization (a Q/DQ model's input pair), a 3x3 NHWC
    /// convolution of 3 input channels, YOLO's stem (no residual, one group, no dilation, output
    /// channels in whole groups of 8, at most [`Self::STEM_MAX_CHANNELS`]) and, where a
    /// quantization is the only reader of its output, that quantization. Each intermediate must
    /// have no other reader. For FP16 and INT8 engines (the kernel stores fp16 or int8). Returns
    /// whether it applied.
    pub fn fuse_stem(&mut self) -> bool {
        let readers = self.readers();
        let private = |v: ValueId, reader: usize| {
            readers.get(&v).is_some_and(|r| r == &[reader]) && self.is_intermediate(v)
        };
        let Some(ti) = self
            .steps
            .iter()
            .position(|s| matches!(s, Step::InputToNhwc { x, .. } if *x == self.input))
        else {
            return false;
        };
        let Step::InputToNhwc { y: nhwc, .. } = self.steps[ti] else {
            return false;
        };
        let Some(&[first]) = readers.get(&nhwc).map(Vec::as_slice) else {
            return false;
        };
        let (fq, conv_in, input_scale) = match self.steps[first] {
            Step::FakeQuant { x, y, scale } if x == nhwc => (Some(first), y, Some(scale)),
            _ => (None, nhwc, None),
        };
        let ci = match fq {
            Some(f) => match readers.get(&conv_in).map(Vec::as_slice) {
                Some(&[c]) if private(nhwc, f) => c,
                _ => return false,
            },
            None => first,
        };
        if !private(conv_in, ci) {
            return false;
        }
        let Step::Conv {
            x,
            y,
            weight,
            bias,
            geometry,
            act,
            residual: None,
            layout: Layout::Nhwc,
            int8: None,
        } = self.steps[ci]
        else {
            return false;
        };
        let fits = match self.constants[weight].dims[..] {
            [k, 3, 3, 3] => k % 8 == 0 && k <= Self::STEM_MAX_CHANNELS,
            _ => false,
        };
        if x != conv_in || geometry.group != 1 || geometry.dilation != [1, 1] || !fits {
            return false;
        }
        let quantize = readers.get(&y).and_then(|r| match r[..] {
            [qi] if private(y, qi) => match self.steps[qi] {
                Step::Quantize { x, y: q, scale } if x == y => Some((qi, q, scale)),
                _ => None,
            },
            _ => None,
        });
        let (out, output_scale) = quantize.map_or((y, None), |(_, q, scale)| (q, Some(scale)));
        self.steps[ci] = Step::StemConv {
            x: self.input,
            y: out,
            weight,
            bias,
            geometry,
            act,
            input_scale,
            output_scale,
        };
        let mut gone: Vec<usize> = [Some(ti), fq, quantize.map(|q| q.0)]
            .into_iter()
            .flatten()
            .collect();
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            self.steps.remove(i);
        }
        true
    }

    /// Fold one DFL decoding into a [`Step::Dfl`]: a [`Step::Transpose`] swapping axes 1 and 2
    /// of a rank-4 tensor `[n, sides, bins, anchors]`, read only by a [`Step::Softmax`] over axis
    /// 1 (the bins), read only by a row-major 1x1 convolution to one channel (stride 1, no
    /// padding, bias, activation or residual). The three steps read and write the detection
    /// tail's small tensors several times (gelan-c, batch 8, H200: 0.07 ms); the fused step reads
    /// each logit once. Returns whether it applied (call until false: models may have several).
    pub fn fuse_dfl(&mut self) -> bool {
        let readers = self.readers();
        let only_reader = |v: ValueId| -> Option<usize> {
            match readers.get(&v).map(Vec::as_slice) {
                Some(&[r]) if self.is_intermediate(v) => Some(r),
                _ => None,
            }
        };
        for ti in 0..self.steps.len() {
            let Step::Transpose { x, y: t, perm } = &self.steps[ti] else {
                continue;
            };
            let (x, t) = (*x, *t);
            if perm[..] != [0, 2, 1, 3] {
                continue;
            }
            let Some(si) = only_reader(t) else { continue };
            let Step::Softmax { y: sm, axis: 1, .. } = self.steps[si] else {
                continue;
            };
            let Some(ci) = only_reader(sm) else { continue };
            let Step::Conv {
                x: conv_in,
                y,
                weight,
                bias: None,
                geometry,
                act: Act::None,
                residual: None,
                layout: Layout::RowMajor,
                int8: None,
            } = self.steps[ci]
            else {
                continue;
            };
            let bins = self.values[t].dims.get(1).and_then(Dim::fixed);
            let Some(bins) = bins.and_then(|b| usize::try_from(b).ok()) else {
                continue;
            };
            let one_by_one = geometry.kernel == [1, 1]
                && geometry.stride == [1, 1]
                && geometry.pads == [0, 0, 0, 0]
                && geometry.dilation == [1, 1]
                && geometry.group == 1;
            if conv_in != sm
                || !one_by_one
                || self.values[t].dims.len() != 4
                || self.constants[weight].dims != [1, bins, 1, 1]
            {
                continue;
            }
            self.steps[ci] = Step::Dfl { x, y, weight, bins };
            let mut gone = [ti, si];
            gone.sort_unstable();
            for i in gone.into_iter().rev() {
                self.steps.remove(i);
            }
            return true;
        }
        false
    }

    /// Move quantization towards the producers until nothing moves, so activations travel as
    /// int8 between INT8 layers (all three rewrites are exact):
    /// - a second quantization of the same value with the same scale reuses the first;
    /// - an INT8 convolution whose output only a quantization reads stores int8 itself (the
    ///   epilogue requantizes);
    /// - a quantization of a value that channel copies assemble (concat, split), read by nothing
    ///   else, quantizes the copies' sources instead and the copies move int8.
    fn move_quantization_upstream(&mut self) {
        while self.move_one_quantization() {}
    }

    /// One rewrite of [`Self::move_quantization_upstream`]; false when none applies.
    fn move_one_quantization(&mut self) -> bool {
        let mut readers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        let mut writers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            for v in s.inputs() {
                readers.entry(self.storage_of(v)).or_default().push(i);
            }
            writers.entry(s.output()).or_default().push(i);
        }
        let aliased: std::collections::HashSet<ValueId> =
            self.values.iter().filter_map(|v| v.alias_of).collect();
        let mut first_quantization: HashMap<(ValueId, u32), ValueId> = HashMap::new();
        for qi in 0..self.steps.len() {
            let Step::Quantize { x, y, scale } = self.steps[qi] else {
                continue;
            };
            if let Some(&earlier) = first_quantization.get(&(x, scale.to_bits())) {
                self.steps.remove(qi);
                for s in &mut self.steps {
                    for v in s.inputs_mut() {
                        if *v == y {
                            *v = earlier;
                        }
                    }
                }
                return true;
            }
            first_quantization.insert((x, scale.to_bits()), y);
            let only_reader = readers.get(&x).is_some_and(|r| r == &[qi])
                && x != self.output
                && Some(x) != self.prototypes
                && !aliased.contains(&x);
            if !only_reader {
                continue;
            }
            let ws = writers.get(&x).cloned().unwrap_or_default();
            if let [pi] = ws[..]
                && let Step::Conv {
                    y: out,
                    int8: Some(q),
                    ..
                } = &mut self.steps[pi]
                && q.output_scale.is_none()
            {
                *out = y;
                q.output_scale = Some(scale);
                self.steps.remove(qi);
                return true;
            }
            // Pools run on int8 as well: max pooling commutes with quantization (exactly), and
            // the average of quantized values is rounded to nearest even as QuantizeLinear
            // rounds (TensorRT's INT8 pooling does the same; it can differ from quantizing the
            // float average by one step). So does the nearest resize (it only copies; exact),
            // on whole 16-channel vectors. The pool's or resize's input is then quantized
            // instead, and where that input is quantized already the first rewrite shares it.
            // The INT8 average sums biased bytes in 16-bit lanes: at most 257 taps.
            let channels = |v: ValueId| self.values[v].dims.get(1).and_then(|d| d.fixed());
            let int8_source = match ws[..] {
                [pi] => match self.steps[pi] {
                    Step::Pool {
                        x: src,
                        kernel: [kh, kw],
                        ..
                    } if channels(src).is_some_and(|c| c % 8 == 0) && kh * kw <= 257 => {
                        Some((pi, src))
                    }
                    Step::ResizeNearest { x: src, .. }
                        if channels(src).is_some_and(|c| c % 16 == 0) =>
                    {
                        Some((pi, src))
                    }
                    _ => None,
                },
                _ => None,
            };
            if let Some((pi, src)) = int8_source
                && self.values[src].layout == Layout::Nhwc
            {
                let src_q = self.values.len();
                self.values.push(Value {
                    name: format!("{}.int8", self.values[src].name),
                    dims: self.values[src].dims.clone(),
                    layout: Layout::NhwcInt8,
                    constant: None,
                    alias_of: None,
                });
                if let Step::Pool { x: px, y: py, .. } | Step::ResizeNearest { x: px, y: py } =
                    &mut self.steps[pi]
                {
                    *px = src_q;
                    *py = y;
                }
                self.steps.remove(qi);
                self.steps.insert(
                    pi,
                    Step::Quantize {
                        x: src,
                        y: src_q,
                        scale,
                    },
                );
                return true;
            }
            // The quantize kernel moves 8 channels at a time: sources must have whole groups.
            let channel_copies = !ws.is_empty()
                && ws.iter().all(|&w| {
                    matches!(self.steps[w], Step::CopyAxis { x: src, axis: 1, .. }
                        if self.values[src].layout == Layout::Nhwc
                            && self.values[src].dims.get(1).and_then(|d| d.fixed())
                                .is_some_and(|c| c % 8 == 0))
                });
            if channel_copies {
                let mut steps = Vec::with_capacity(self.steps.len() + ws.len());
                for (i, step) in std::mem::take(&mut self.steps).into_iter().enumerate() {
                    if i == qi {
                        continue;
                    }
                    if let Step::CopyAxis {
                        x: src,
                        y: _,
                        axis,
                        in_offset,
                        out_offset,
                        count,
                    } = step
                        && ws.contains(&i)
                    {
                        let src_q = self.values.len();
                        self.values.push(Value {
                            name: format!("{}.int8", self.values[src].name),
                            dims: self.values[src].dims.clone(),
                            layout: Layout::NhwcInt8,
                            constant: None,
                            alias_of: None,
                        });
                        steps.push(Step::Quantize {
                            x: src,
                            y: src_q,
                            scale,
                        });
                        steps.push(Step::CopyAxis {
                            x: src_q,
                            y,
                            axis,
                            in_offset,
                            out_offset,
                            count,
                        });
                        continue;
                    }
                    steps.push(step);
                }
                self.steps = steps;
                return true;
            }
        }
        false
    }

    /// Number of convolutions that run in INT8.
    pub fn int8_convolutions(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Conv { int8: Some(_), .. }))
            .count()
    }
}

/// A QuantizeLinear → DequantizeLinear pair on an activation: the DQ output stands for
/// `source` quantized with `scale`.
#[derive(Debug, Clone)]
struct FakeQuantized {
    source: String,
    scale: f32,
}

/// A DequantizeLinear of an int8 initializer (a quantized filter).
#[derive(Debug, Clone)]
struct DequantizedWeight {
    initializer: String,
    scales: Vec<f32>,
}

struct Lowering<'g> {
    graph: &'g pb::GraphProto,
    shapes: shapes::ShapeMap,
    initializers: HashMap<&'g str, &'g pb::TensorProto>,
    int_consts: HashMap<String, Vec<i64>>,
    consumers: HashMap<&'g str, Vec<usize>>,
    plan: EnginePlan,
    by_name: HashMap<String, ValueId>,
    /// Row-major twin of an NHWC value, once converted.
    row_major: HashMap<ValueId, ValueId>,
    /// NHWC twin of the (row-major) engine input.
    input_nhwc: Option<ValueId>,
    constant_ids: HashMap<String, usize>,
    skip: Vec<bool>,
    /// Lower Q/DQ convolutions to INT8 ones (precision int8 / best).
    int8: bool,
    fake_quantized: HashMap<String, FakeQuantized>,
    dequantized_weights: HashMap<String, DequantizedWeight>,
    /// Quantized twin of an fp16 NHWC value, by (value, scale bits).
    quantized: HashMap<(ValueId, u32), ValueId>,
    quantized_weight_ids: HashMap<String, usize>,
}

fn unsupported(node: &pb::NodeProto, why: &str) -> Error {
    Error::Backend {
        backend: "cuda",
        message: format!(
            "node '{}' ({}) is not supported by the cuda backend: {why}",
            node.name, node.op_type
        ),
    }
}

fn attr_pair(node: &pb::NodeProto, name: &str, default: usize) -> [usize; 2] {
    match node.attr_ints(name) {
        Some([a, b]) => [*a as usize, *b as usize],
        _ => [default, default],
    }
}

fn attr_pads(node: &pb::NodeProto) -> [usize; 4] {
    match node.attr_ints("pads") {
        Some([t, l, b, r]) => [*t as usize, *l as usize, *b as usize, *r as usize],
        _ => [0; 4],
    }
}

impl<'g> Lowering<'g> {
    fn new(graph: &'g pb::GraphProto, int8: bool) -> Result<Self> {
        let shapes = shapes::infer_graph(graph).map_err(|e| Error::Backend {
            backend: "cuda",
            message: format!("shape inference: {e}"),
        })?;
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for input in n.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(input.as_str()).or_default().push(i);
            }
        }
        Ok(Self {
            graph,
            shapes,
            initializers: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            int_consts: shapes::int_constants(graph),
            consumers,
            plan: EnginePlan {
                values: Vec::new(),
                constants: Vec::new(),
                quantized_weights: Vec::new(),
                steps: Vec::new(),
                input: 0,
                output: 0,
                prototypes: None,
            },
            by_name: HashMap::new(),
            row_major: HashMap::new(),
            input_nhwc: None,
            constant_ids: HashMap::new(),
            skip: vec![false; graph.node.len()],
            int8,
            fake_quantized: HashMap::new(),
            dequantized_weights: HashMap::new(),
            quantized: HashMap::new(),
            quantized_weight_ids: HashMap::new(),
        })
    }

    /// A scalar float32 initializer (a per-tensor scale).
    fn scalar_f32(&self, name: &str) -> Option<f32> {
        let t = self.initializers.get(name)?;
        match t.to_f32()?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The zero point of a Q/DQ node must be absent or int8 zeros: Kestrel's INT8 is symmetric.
    fn check_zero_point(&self, node: &pb::NodeProto) -> Result<()> {
        let Some(name) = node.input.get(2).filter(|s| !s.is_empty()) else {
            return Ok(());
        };
        let zero = self
            .initializers
            .get(name.as_str())
            .and_then(|t| t.to_i8())
            .is_some_and(|v| v.iter().all(|&z| z == 0));
        if zero {
            Ok(())
        } else {
            Err(unsupported(
                node,
                "the zero point must be an int8 initializer of zeros (symmetric quantization)",
            ))
        }
    }

    /// Find the Q/DQ pairs on activations and the dequantized int8 filters; their nodes are
    /// folded away (into INT8 convolutions, fake quantization, or dequantized constants).
    fn fold_qdq(&mut self) -> Result<()> {
        let nodes = &self.graph.node;
        let mut quantized: HashMap<&str, (String, f32)> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.op_type != "QuantizeLinear" {
                continue;
            }
            self.check_zero_point(n)?;
            let scale = n
                .input
                .get(1)
                .and_then(|s| self.scalar_f32(s))
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| {
                    unsupported(
                        n,
                        "activations need one positive float32 scale (per-tensor quantization)",
                    )
                })?;
            let out = n.output[0].as_str();
            let only_dq = !self.is_graph_output(out)
                && self
                    .only_consumers(out)
                    .iter()
                    .all(|&c| nodes[c].op_type == "DequantizeLinear");
            if !only_dq {
                return Err(unsupported(
                    n,
                    "a quantized tensor may only feed DequantizeLinear nodes",
                ));
            }
            quantized.insert(out, (n.input[0].clone(), scale));
            self.skip[i] = true;
        }
        for (i, n) in nodes.iter().enumerate() {
            if n.op_type != "DequantizeLinear" {
                continue;
            }
            self.check_zero_point(n)?;
            let input = n.input[0].as_str();
            let out = n.output[0].clone();
            if let Some((source, scale)) = quantized.get(input) {
                if n.input.get(1).and_then(|s| self.scalar_f32(s)) != Some(*scale) {
                    return Err(unsupported(
                        n,
                        "a DequantizeLinear must use the scale of its QuantizeLinear",
                    ));
                }
                self.fake_quantized.insert(
                    out,
                    FakeQuantized {
                        source: source.clone(),
                        scale: *scale,
                    },
                );
            } else if let Some(w) = self.initializers.get(input) {
                let dims = &w.dims;
                let scales = n
                    .input
                    .get(1)
                    .and_then(|s| self.initializers.get(s.as_str()))
                    .and_then(|t| t.to_f32())
                    .unwrap_or_default();
                let axis = n.attr_int("axis", 1);
                let per_channel = scales.len() == dims.first().copied().unwrap_or(0) as usize
                    && (axis == 0 || scales.len() == 1);
                if w.data_type != pb::data_type::INT8
                    || !per_channel
                    || scales.iter().any(|s| !s.is_finite() || *s <= 0.0)
                {
                    return Err(unsupported(
                        n,
                        "weights must be int8 with positive per-output-channel (axis 0) scales",
                    ));
                }
                self.dequantized_weights.insert(
                    out,
                    DequantizedWeight {
                        initializer: input.to_string(),
                        scales,
                    },
                );
            } else {
                return Err(unsupported(
                    n,
                    "DequantizeLinear must follow a QuantizeLinear or read an int8 initializer",
                ));
            }
            self.skip[i] = true;
        }
        Ok(())
    }

    /// The int8 filter behind a weight DequantizeLinear output, added to the plan once.
    fn quantized_weight(&mut self, name: &str) -> Result<Option<usize>> {
        if let Some(&i) = self.quantized_weight_ids.get(name) {
            return Ok(Some(i));
        }
        let Some(dq) = self.dequantized_weights.get(name) else {
            return Ok(None);
        };
        let t = self.initializers[dq.initializer.as_str()];
        let values = t.to_i8().ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: format!("initializer '{}' is not int8 data", dq.initializer),
        })?;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let scales = if dq.scales.len() == 1 {
            vec![dq.scales[0]; dims[0]]
        } else {
            dq.scales.clone()
        };
        self.plan.quantized_weights.push(QuantizedWeight {
            name: name.to_string(),
            dims,
            values,
            scales,
        });
        let i = self.plan.quantized_weights.len() - 1;
        self.quantized_weight_ids.insert(name.to_string(), i);
        Ok(Some(i))
    }

    /// `x` (fp16 NHWC) quantized with `scale`, converted once per scale.
    fn quantized_value(&mut self, x: ValueId, scale: f32) -> ValueId {
        if let Some(&q) = self.quantized.get(&(x, scale.to_bits())) {
            return q;
        }
        let dims = self.plan.values[x].dims.clone();
        let name = format!("{}.int8", self.plan.values[x].name);
        let y = self.new_value(&name, dims, Layout::NhwcInt8);
        self.plan.steps.push(Step::Quantize { x, y, scale });
        self.quantized.insert((x, scale.to_bits()), y);
        y
    }

    fn new_value(&mut self, name: &str, dims: Vec<Dim>, layout: Layout) -> ValueId {
        self.plan.values.push(Value {
            name: name.to_string(),
            dims,
            layout,
            constant: None,
            alias_of: None,
        });
        let id = self.plan.values.len() - 1;
        self.by_name.insert(name.to_string(), id);
        id
    }

    fn dims_of(&self, name: &str) -> Result<Vec<Dim>> {
        self.shapes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Backend {
                backend: "cuda",
                message: format!("no shape for '{name}'"),
            })
    }

    fn constant(&mut self, name: &str) -> Result<usize> {
        if let Some(&i) = self.constant_ids.get(name) {
            return Ok(i);
        }
        if self.dequantized_weights.contains_key(name) {
            // Floating-point consumers of a quantized filter read its dequantized values.
            let q = self.quantized_weight(name)?.unwrap_or_default();
            let w = &self.plan.quantized_weights[q];
            let per_channel = w.values.len() / w.dims[0].max(1);
            let values = w
                .values
                .iter()
                .enumerate()
                .map(|(i, &v)| f32::from(v) * w.scales[i / per_channel.max(1)])
                .collect();
            self.plan.constants.push(Constant {
                name: name.to_string(),
                dims: w.dims.clone(),
                values,
            });
            let id = self.plan.constants.len() - 1;
            self.constant_ids.insert(name.to_string(), id);
            return Ok(id);
        }
        let t = self.initializers.get(name).ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: format!("'{name}' must be a float32 initializer"),
        })?;
        let values = t.to_f32().ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: format!("initializer '{name}' is not float32 data"),
        })?;
        self.plan.constants.push(Constant {
            name: name.to_string(),
            dims: t.dims.iter().map(|&d| d as usize).collect(),
            values,
        });
        let id = self.plan.constants.len() - 1;
        self.constant_ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// The value for `name`, as a constant value when it is an initializer.
    fn value(&mut self, name: &str) -> Result<ValueId> {
        if let Some(&v) = self.by_name.get(name) {
            return Ok(v);
        }
        if let Some(fq) = self.fake_quantized.get(name).cloned() {
            let x = self.value(&fq.source)?;
            // The engine input only feeds the trunk: quantize it there, channels-last.
            let x = if x == self.plan.input {
                self.as_nhwc(x).unwrap_or(x)
            } else {
                x
            };
            let dims = self.plan.values[x].dims.clone();
            let layout = self.layout(x);
            let y = self.new_value(name, dims, layout);
            self.plan.steps.push(Step::FakeQuant {
                x,
                y,
                scale: fq.scale,
            });
            return Ok(y);
        }
        if self.initializers.contains_key(name) {
            let c = self.constant(name)?;
            let dims = self.plan.constants[c]
                .dims
                .iter()
                .map(|&d| Dim::Fixed(d as i64))
                .collect();
            let v = self.new_value(name, dims, Layout::RowMajor);
            self.plan.values[v].constant = Some(c);
            return Ok(v);
        }
        Err(Error::Backend {
            backend: "cuda",
            message: format!("value '{name}' is used before it is produced"),
        })
    }

    fn layout(&self, v: ValueId) -> Layout {
        self.plan.values[v].layout
    }

    /// `v` in NHWC (the engine input gets converted once); `None` if it is not a trunk tensor.
    fn as_nhwc(&mut self, v: ValueId) -> Option<ValueId> {
        if self.layout(v) == Layout::Nhwc {
            return Some(v);
        }
        if v == self.plan.input {
            if let Some(n) = self.input_nhwc {
                return Some(n);
            }
            let dims = self.plan.values[v].dims.clone();
            let name = format!("{}.nhwc", self.plan.values[v].name);
            let y = self.new_value(&name, dims, Layout::Nhwc);
            self.plan.steps.push(Step::InputToNhwc { x: v, y });
            self.input_nhwc = Some(y);
            return Some(y);
        }
        None
    }

    /// `v` in row-major float32, converting an NHWC value once.
    fn as_row_major(&mut self, v: ValueId) -> ValueId {
        if self.layout(v) == Layout::RowMajor {
            return v;
        }
        if let Some(&r) = self.row_major.get(&v) {
            return r;
        }
        let dims = self.plan.values[v].dims.clone();
        let name = format!("{}.rowmajor", self.plan.values[v].name);
        let y = self.new_value(&name, dims, Layout::RowMajor);
        self.plan.steps.push(Step::ToRowMajor { x: v, y });
        self.row_major.insert(v, y);
        y
    }

    fn only_consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    fn is_graph_output(&self, value: &str) -> bool {
        self.graph.output.iter().any(|o| o.name == value)
    }

    /// Look ahead from a convolution's output for `x * sigmoid(x)` or `relu(x)` that only it feeds.
    /// Returns the activation, the name of the activated value, and the nodes it absorbed.
    fn fusable_activation(&self, conv_out: &str) -> (Act, String, Vec<usize>) {
        let none = (Act::None, conv_out.to_string(), vec![]);
        if self.is_graph_output(conv_out) {
            return none;
        }
        let users = self.only_consumers(conv_out);
        let nodes = &self.graph.node;
        if let [u] = users
            && nodes[*u].op_type == "Relu"
        {
            return (Act::Relu, nodes[*u].output[0].clone(), vec![*u]);
        }
        if let [a, b] = users {
            let (s, m) = if nodes[*a].op_type == "Sigmoid" {
                (*a, *b)
            } else {
                (*b, *a)
            };
            let sig_out = &nodes[s].output[0];
            if nodes[s].op_type == "Sigmoid"
                && nodes[m].op_type == "Mul"
                && self.only_consumers(sig_out) == [m]
                && !self.is_graph_output(sig_out)
                && nodes[m].input.iter().any(|i| i == conv_out)
                && nodes[m].input.iter().any(|i| i == sig_out)
            {
                return (Act::Silu, nodes[m].output[0].clone(), vec![s, m]);
            }
        }
        none
    }

    /// The INT8 form of convolution `node`, where the graph and the kernel allow it: a Q/DQ
    /// activation of whole 16-channel groups on the trunk, a quantized filter, no groups.
    fn int8_input(&mut self, node: &pb::NodeProto) -> Result<Option<(ValueId, Int8Conv)>> {
        let groups = node.attr_int("group", 1);
        if !self.int8 || groups < 1 {
            return Ok(None);
        }
        let Some(fq) = self.fake_quantized.get(&node.input[0]).cloned() else {
            return Ok(None);
        };
        if !self.dequantized_weights.contains_key(&node.input[1]) {
            return Ok(None);
        }
        let source = self.value(&fq.source)?;
        let Some(x) = self.as_nhwc(source) else {
            return Ok(None);
        };
        // Each group's input channels must be whole 16-byte int8 chunks; its output channels an
        // even count (the epilogue stores pairs).
        let channels = self.plan.values[x].dims.get(1).and_then(|d| d.fixed());
        let outputs = self
            .initializers
            .get(
                self.dequantized_weights[&node.input[1]]
                    .initializer
                    .as_str(),
            )
            .and_then(|w| w.dims.first().copied());
        let fits = |c: i64, k: i64| c % groups == 0 && (c / groups) % 16 == 0 && k % groups == 0;
        if self.plan.values[x].dims.len() != 4
            || !matches!((channels, outputs), (Some(c), Some(k)) if fits(c, k))
        {
            return Ok(None);
        }
        let Some(weight) = self.quantized_weight(&node.input[1])? else {
            return Ok(None);
        };
        let xq = self.quantized_value(x, fq.scale);
        Ok(Some((
            xq,
            Int8Conv {
                weight,
                input_scale: fq.scale,
                output_scale: None,
            },
        )))
    }

    fn lower_conv(&mut self, i: usize) -> Result<()> {
        let node = &self.graph.node[i];
        let int8 = self.int8_input(node)?;
        let x = match &int8 {
            Some((xq, _)) => *xq,
            None => self.value(&node.input[0])?,
        };
        let int8 = int8.map(|(_, q)| q);
        let weight = self.constant(&node.input[1])?;
        let bias = match node.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => Some(self.constant(b)?),
            None => None,
        };
        let wdims = &self.plan.constants[weight].dims;
        if wdims.len() != 4 {
            return Err(unsupported(node, "only 2-D convolutions are supported"));
        }
        let geometry = ConvGeometry {
            kernel: [wdims[2], wdims[3]],
            stride: attr_pair(node, "strides", 1),
            pads: attr_pads(node),
            dilation: attr_pair(node, "dilations", 1),
            group: node.attr_int("group", 1) as usize,
        };
        let (x, layout) = if int8.is_some() {
            (x, Layout::Nhwc)
        } else {
            match self.as_nhwc(x) {
                Some(n) => (n, Layout::Nhwc),
                None => (x, Layout::RowMajor),
            }
        };
        let (mut act, mut out_name, absorbed) = self.fusable_activation(&node.output[0]);
        if layout == Layout::RowMajor && act == Act::Silu {
            // Keep the tail simple: row-major convolutions fuse only plain activations.
            act = Act::None;
            out_name = node.output[0].clone();
        } else {
            for n in absorbed {
                self.skip[n] = true;
            }
        }
        // A residual Add right after the activation, whose other operand already exists.
        let mut residual = None;
        if layout == Layout::Nhwc
            && !self.is_graph_output(&out_name)
            && let [u] = *self.only_consumers(&out_name)
        {
            let add = &self.graph.node[u];
            if add.op_type == "Add" && add.input.len() == 2 {
                let other = if add.input[0] == out_name {
                    &add.input[1]
                } else {
                    &add.input[0]
                };
                let same_shape = self.shapes.get(other) == self.shapes.get(&out_name);
                if let Some(&o) = self.by_name.get(other.as_str())
                    && same_shape
                    && self.layout(o) == Layout::Nhwc
                {
                    residual = Some(o);
                    self.skip[u] = true;
                    out_name = add.output[0].clone();
                }
            }
        }
        let dims = self.dims_of(&out_name)?;
        let y = self.new_value(&out_name, dims, layout);
        self.plan.steps.push(Step::Conv {
            x,
            y,
            weight,
            bias,
            geometry,
            act,
            residual,
            layout,
            int8,
        });
        Ok(())
    }

    fn lower_node(&mut self, i: usize) -> Result<()> {
        let node = &self.graph.node[i];
        let out = node.output.first().cloned().unwrap_or_default();
        match node.op_type.as_str() {
            "Conv" => self.lower_conv(i)?,
            "Sigmoid" | "Relu" => {
                let act = if node.op_type == "Relu" {
                    Act::Relu
                } else {
                    Act::Sigmoid
                };
                let x = self.value(&node.input[0])?;
                let layout = self.layout(x);
                let dims = self.dims_of(&out)?;
                let y = self.new_value(&out, dims, layout);
                self.plan.steps.push(Step::Unary { x, y, act });
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let op = match node.op_type.as_str() {
                    "Add" => BinaryOp::Add,
                    "Sub" => BinaryOp::Sub,
                    "Mul" => BinaryOp::Mul,
                    _ => BinaryOp::Div,
                };
                let a = self.value(&node.input[0])?;
                let b = self.value(&node.input[1])?;
                let same = self.plan.values[a].dims == self.plan.values[b].dims;
                let dims = self.dims_of(&out)?;
                let (a, b, layout) =
                    if same && self.layout(a) == Layout::Nhwc && self.layout(b) == Layout::Nhwc {
                        (a, b, Layout::Nhwc)
                    } else {
                        (self.as_row_major(a), self.as_row_major(b), Layout::RowMajor)
                    };
                let y = self.new_value(&out, dims, layout);
                self.plan.steps.push(Step::Binary { a, b, y, op });
            }
            "MaxPool" | "AveragePool" => {
                let x = self.value(&node.input[0])?;
                let x = self.as_nhwc(x).ok_or_else(|| {
                    unsupported(node, "pooling runs on the convolutional trunk only")
                })?;
                if node.attr_int("ceil_mode", 0) != 0 {
                    return Err(unsupported(node, "ceil_mode=1"));
                }
                let dims = self.dims_of(&out)?;
                let y = self.new_value(&out, dims, Layout::Nhwc);
                self.plan.steps.push(Step::Pool {
                    x,
                    y,
                    max: node.op_type == "MaxPool",
                    kernel: attr_pair(node, "kernel_shape", 1),
                    stride: attr_pair(node, "strides", 1),
                    pads: attr_pads(node),
                    count_include_pad: node.attr_int("count_include_pad", 0) != 0,
                });
            }
            "Resize" => {
                let x = self.value(&node.input[0])?;
                let x = self.as_nhwc(x).ok_or_else(|| {
                    unsupported(node, "resize runs on the convolutional trunk only")
                })?;
                let mode = node.attr_string("mode").unwrap_or_else(|| "nearest".into());
                let ctm = node
                    .attr_string("coordinate_transformation_mode")
                    .unwrap_or_else(|| "half_pixel".into());
                let nearest = node
                    .attr_string("nearest_mode")
                    .unwrap_or_else(|| "round_prefer_floor".into());
                if mode != "nearest" || ctm != "asymmetric" || nearest != "floor" {
                    return Err(unsupported(
                        node,
                        "only nearest/asymmetric/floor resizing (nn.Upsample) is supported",
                    ));
                }
                let dims = self.dims_of(&out)?;
                let xd = &self.plan.values[x].dims;
                let integer = (2..4).all(|a| match (xd[a].fixed(), dims[a].fixed()) {
                    (Some(i), Some(o)) => i > 0 && o % i == 0,
                    _ => false,
                });
                if !integer {
                    return Err(unsupported(
                        node,
                        "only integer upsampling factors are supported",
                    ));
                }
                let y = self.new_value(&out, dims, Layout::Nhwc);
                self.plan.steps.push(Step::ResizeNearest { x, y });
            }
            "Concat" => {
                let inputs: Vec<ValueId> = node
                    .input
                    .iter()
                    .map(|n| self.value(n))
                    .collect::<Result<_>>()?;
                let dims = self.dims_of(&out)?;
                let rank = dims.len() as i64;
                let axis = node.attr_int("axis", 0);
                let axis = (if axis < 0 { axis + rank } else { axis }) as usize;
                let nhwc: Option<Vec<ValueId>> = if axis == 1 && rank == 4 {
                    inputs.iter().map(|&v| self.as_nhwc(v)).collect()
                } else {
                    None
                };
                let (inputs, layout) = match nhwc {
                    Some(v) => (v, Layout::Nhwc),
                    None => (
                        inputs.into_iter().map(|v| self.as_row_major(v)).collect(),
                        Layout::RowMajor,
                    ),
                };
                let y = self.new_value(&out, dims, layout);
                let mut offset = 0;
                for x in inputs {
                    let count = self.plan.values[x].dims[axis]
                        .fixed()
                        .ok_or_else(|| unsupported(node, "concatenation along the batch axis"))?
                        as usize;
                    self.plan.steps.push(Step::CopyAxis {
                        x,
                        y,
                        axis,
                        in_offset: 0,
                        out_offset: offset,
                        count,
                    });
                    offset += count;
                }
            }
            "Split" => {
                let x = self.value(&node.input[0])?;
                let rank = self.plan.values[x].dims.len() as i64;
                let axis = node.attr_int("axis", 0);
                let axis = (if axis < 0 { axis + rank } else { axis }) as usize;
                let (x, layout) = match (axis == 1 && rank == 4).then(|| self.as_nhwc(x)).flatten()
                {
                    Some(n) => (n, Layout::Nhwc),
                    None => (self.as_row_major(x), Layout::RowMajor),
                };
                let mut offset = 0;
                for o in node.output.iter() {
                    let dims = self.dims_of(o)?;
                    let count = dims[axis]
                        .fixed()
                        .ok_or_else(|| unsupported(node, "split along the batch axis"))?
                        as usize;
                    let y = self.new_value(o, dims, layout);
                    self.plan.steps.push(Step::CopyAxis {
                        x,
                        y,
                        axis,
                        in_offset: offset,
                        out_offset: 0,
                        count,
                    });
                    offset += count;
                }
            }
            "Slice" => {
                let x = self.value(&node.input[0])?;
                let get = |k: usize| {
                    node.input
                        .get(k)
                        .and_then(|n| self.int_consts.get(n))
                        .cloned()
                };
                let (Some(starts), Some(axes)) = (get(1), get(3).or(Some(vec![0]))) else {
                    return Err(unsupported(node, "starts/ends/axes must be constants"));
                };
                if starts.len() != 1 || axes.len() != 1 || get(4).is_some_and(|s| s != [1]) {
                    return Err(unsupported(
                        node,
                        "only single-axis, step-1 slices are supported",
                    ));
                }
                let rank = self.plan.values[x].dims.len() as i64;
                let axis = (if axes[0] < 0 { axes[0] + rank } else { axes[0] }) as usize;
                let len = self.plan.values[x].dims[axis]
                    .fixed()
                    .ok_or_else(|| unsupported(node, "slice of the batch axis"))?;
                let start = (if starts[0] < 0 {
                    starts[0] + len
                } else {
                    starts[0]
                })
                .clamp(0, len) as usize;
                let dims = self.dims_of(&out)?;
                let count = dims[axis].fixed().unwrap_or(0) as usize;
                let x = self.as_row_major(x);
                let y = self.new_value(&out, dims, Layout::RowMajor);
                self.plan.steps.push(Step::CopyAxis {
                    x,
                    y,
                    axis,
                    in_offset: start,
                    out_offset: 0,
                    count,
                });
            }
            "Reshape" | "Identity" => {
                let x = self.value(&node.input[0])?;
                let x = self.as_row_major(x);
                let dims = self.dims_of(&out)?;
                let y = self.new_value(&out, dims, Layout::RowMajor);
                self.plan.values[y].alias_of = Some(x);
            }
            "Transpose" => {
                let x = self.value(&node.input[0])?;
                let x = self.as_row_major(x);
                let rank = self.plan.values[x].dims.len();
                let perm: Vec<usize> = match node.attr_ints("perm") {
                    Some(p) => p.iter().map(|&v| v as usize).collect(),
                    None => (0..rank).rev().collect(),
                };
                let dims = self.dims_of(&out)?;
                let y = self.new_value(&out, dims, Layout::RowMajor);
                self.plan.steps.push(Step::Transpose { x, y, perm });
            }
            "Softmax" => {
                let x = self.value(&node.input[0])?;
                let x = self.as_row_major(x);
                let rank = self.plan.values[x].dims.len() as i64;
                let axis = node.attr_int("axis", -1);
                let axis = (if axis < 0 { axis + rank } else { axis }) as usize;
                let dims = self.dims_of(&out)?;
                let y = self.new_value(&out, dims, Layout::RowMajor);
                self.plan.steps.push(Step::Softmax { x, y, axis });
            }
            other => {
                return Err(unsupported(
                    node,
                    &format!("operator {other} has no cuda kernel yet"),
                ));
            }
        }
        Ok(())
    }
}

/// Lower `model` into an execution plan. The model must have one float32 image input; its
/// first output is the engine output, a second one (segmentation models) the prototypes.
///
/// With `int8`, every convolution behind a Q/DQ pair and a quantized filter that the INT8 kernel
/// can run becomes an INT8 convolution; other Q/DQ pairs become fake quantization in floating
/// point, so the plan computes what the ONNX graph says either way.
pub fn lower(model: &pb::ModelProto, int8: bool) -> Result<EnginePlan> {
    let graph = model.graph();
    let mut lw = Lowering::new(graph, int8)?;
    lw.fold_qdq()?;
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = graph
        .input
        .iter()
        .find(|i| !inits.contains(i.name.as_str()))
        .ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: "the model has no input".into(),
        })?;
    let dims = lw.dims_of(&input.name)?;
    lw.plan.input = lw.new_value(&input.name, dims, Layout::RowMajor);
    for i in 0..graph.node.len() {
        if !lw.skip[i] {
            lw.lower_node(i)?;
        }
    }
    let out_name = &graph
        .output
        .first()
        .ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: "the model has no output".into(),
        })?
        .name;
    let out = lw.value(out_name)?;
    lw.plan.output = lw.as_row_major(out);
    if let Some(protos) = graph.output.get(1) {
        let v = lw.value(&protos.name)?;
        lw.plan.prototypes = Some(lw.as_row_major(v));
    }
    lw.plan.move_quantization_upstream();
    while lw.plan.fuse_dfl() {}
    Ok(lw.plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export};

    fn plan_for(name: &str) -> EnginePlan {
        let cfg = ModelConfig::new(name, 80, 640).unwrap();
        let model = export(
            &cfg,
            &mut WeightSource::Random { seed: 0 },
            &ExportOptions::dynamic(80),
        )
        .unwrap();
        lower(&model, false).unwrap()
    }

    #[test]
    fn gelan_t_fuses_every_activation_and_the_residuals() {
        let plan = plan_for("gelan-t");
        let (convs, acts, residuals) = plan.fusion_counts();
        // 185 convolutions (the DFL's projection is part of its decoding step): all but the 6
        // final head convolutions carry SiLU.
        assert_eq!(convs, 185);
        assert_eq!(acts, 185 - 6);
        // gelan-t: 7 RepNCSPELAN4 blocks x 2 RepNCSP x 3 bottlenecks, each ending in a residual Add.
        assert_eq!(residuals, 42);
        // No stand-alone sigmoid/mul is left in the trunk: the only unary step is the score sigmoid.
        let unary = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Unary { .. }))
            .count();
        assert_eq!(unary, 1);
        assert_eq!(plan.values[plan.output].layout, Layout::RowMajor);
        assert_eq!(plan.values[plan.output].shape(2), vec![2, 84, 8400]);
    }

    #[test]
    fn the_dfl_decoding_becomes_one_step() {
        let plan = plan_for("gelan-t");
        let kinds: Vec<&str> = plan.steps.iter().map(Step::kind).collect();
        assert!(!kinds.contains(&"softmax") && !kinds.contains(&"transpose"));
        assert!(!kinds.contains(&"conv row-major"));
        let dfl: Vec<&Step> = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Dfl { .. }))
            .collect();
        let [Step::Dfl { x, y, weight, bins }] = dfl[..] else {
            panic!("one DFL step expected, got {kinds:?}");
        };
        assert_eq!(*bins, 16);
        // Reads the raw box logits [n, 4 sides, 16 bins, anchors], writes [n, 1, 4, anchors].
        assert_eq!(plan.values[*x].shape(2), vec![2, 4, 16, 8400]);
        assert_eq!(plan.values[*y].shape(2), vec![2, 1, 4, 8400]);
        let w = &plan.constants[*weight];
        assert_eq!(w.dims, vec![1, 16, 1, 1]);
        assert_eq!(w.values, (0..16).map(|i| i as f32).collect::<Vec<_>>());
        // A second reader of the softmax (here: a second graph output) keeps the three steps.
        let kinds_of = |softmax_out: bool| -> Vec<&'static str> {
            let plan = lower(&dfl_graph(softmax_out), false).unwrap();
            plan.steps.iter().map(Step::kind).collect()
        };
        assert_eq!(kinds_of(false), ["DFL decode"]);
        assert_eq!(kinds_of(true), ["transpose", "softmax", "conv row-major"]);
    }

    /// Box logits `[batch, 64, 8]` through YOLO's DFL: Reshape to `[batch, 4, 16, 8]`, Transpose,
    /// Softmax over the bins, the 1x1 projection, Reshape to `[batch, 4, 8]`; with
    /// `softmax_out`, the softmax's output is a second graph output too.
    fn dfl_graph(softmax_out: bool) -> pb::ModelProto {
        use kestrel_exporter::builder::GraphBuilder;
        let mut b = GraphBuilder::new();
        let x = b.input(
            "logits",
            vec![Dim::Symbol("batch".into()), Dim::Fixed(64), Dim::Fixed(8)],
        );
        let shape = b.const_i64("view", &[0, 4, 16, -1]);
        let r = b
            .node1("Reshape", "dfl.view", &[&x, &shape], vec![])
            .unwrap();
        let t = b
            .node1(
                "Transpose",
                "dfl.transpose",
                &[&r],
                vec![pb::AttributeProto::ints("perm", &[0, 2, 1, 3])],
            )
            .unwrap();
        let sm = b
            .node1(
                "Softmax",
                "dfl.softmax",
                &[&t],
                vec![pb::AttributeProto::int("axis", 1)],
            )
            .unwrap();
        let proj: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let w = b.const_f32("proj", &[1, 16, 1, 1], &proj);
        let d = b
            .node1(
                "Conv",
                "dfl.conv",
                &[&sm, &w],
                vec![pb::AttributeProto::ints("kernel_shape", &[1, 1])],
            )
            .unwrap();
        let shape = b.const_i64("flat", &[0, 4, -1]);
        let out = b
            .node1("Reshape", "dfl.out", &[&d, &shape], vec![])
            .unwrap();
        b.rename_last_output(&out, "output0");
        b.output("output0", pb::data_type::FLOAT, "");
        if softmax_out {
            b.output(&sm, pb::data_type::FLOAT, "");
        }
        b.finish_model("dfl")
    }

    /// images -> Q/DQ -> conv0 (3 -> 16) -> SiLU -> Q/DQ -> conv1 (16 -> 32, stride 2) ->
    /// Q/DQ -> conv2 (32 -> 32, 4 groups of 8 channels) -> output0 [B, 32, P*Q], every filter int8.
    fn qdq_chain() -> pb::ModelProto {
        use kestrel_exporter::builder::GraphBuilder;
        let mut b = GraphBuilder::new();
        let mut x = b.input(
            "images",
            vec![
                Dim::Symbol("batch".into()),
                Dim::Fixed(3),
                Dim::Fixed(16),
                Dim::Fixed(16),
            ],
        );
        for (i, (cin, cout, stride, group)) in [(3, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 4)]
            .into_iter()
            .enumerate()
        {
            let s = b.const_f32(&format!("s{i}"), &[], &[0.02]);
            let z = b.const_i8(&format!("z{i}"), &[], &[0]);
            let q = b.node1("QuantizeLinear", &format!("q{i}"), &[&x, &s, &z], vec![]);
            let dq = b.node1(
                "DequantizeLinear",
                &format!("dq{i}"),
                &[&q.unwrap(), &s, &z],
                vec![],
            );
            let n = cout * cin / group * 9;
            let wq = b.const_i8(
                &format!("w{i}"),
                &[cout, cin / group, 3, 3],
                &vec![3; n as usize],
            );
            let ws = b.const_f32(&format!("ws{i}"), &[cout], &vec![0.01; cout as usize]);
            let wz = b.const_i8(&format!("wz{i}"), &[cout], &vec![0; cout as usize]);
            let w = b.node1(
                "DequantizeLinear",
                &format!("wdq{i}"),
                &[&wq, &ws, &wz],
                vec![pb::AttributeProto::int("axis", 0)],
            );
            let conv = b
                .node1(
                    "Conv",
                    &format!("conv{i}"),
                    &[&dq.unwrap(), &w.unwrap()],
                    vec![
                        pb::AttributeProto::ints("kernel_shape", &[3, 3]),
                        pb::AttributeProto::ints("strides", &[stride, stride]),
                        pb::AttributeProto::ints("pads", &[1, 1, 1, 1]),
                        pb::AttributeProto::int("group", group),
                    ],
                )
                .unwrap();
            let sig = b
                .node1("Sigmoid", &format!("sig{i}"), &[&conv], vec![])
                .unwrap();
            x = b
                .node1("Mul", &format!("silu{i}"), &[&conv, &sig], vec![])
                .unwrap();
        }
        let shape = b.const_i64("shape", &[0, 32, -1]);
        let out = b
            .node1("Reshape", "flatten", &[&x, &shape], vec![])
            .unwrap();
        b.rename_last_output(&out, "output0");
        b.output("output0", pb::data_type::FLOAT, "");
        b.finish_model("qdq")
    }

    #[test]
    fn qdq_folds_into_int8_convolutions_where_the_kernel_can_run_them() {
        let model = qdq_chain();
        let plan = lower(&model, true).unwrap();
        let kinds: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| match s {
                Step::InputToNhwc { .. } => "to-nhwc",
                Step::FakeQuant { .. } => "fake-quant",
                Step::Quantize { .. } => "quantize",
                Step::Conv { int8: Some(_), .. } => "conv-int8",
                Step::Conv { .. } => "conv",
                Step::ToRowMajor { .. } => "to-row-major",
                _ => "other",
            })
            .collect();
        // conv0 has 3 input channels (the int8 kernel reads 16-channel groups): floating point
        // on fake-quantized input; conv1 is int8; conv2's groups have 8 channels: floating point
        // again.
        assert_eq!(
            kinds,
            [
                "to-nhwc",
                "fake-quant",
                "conv",
                "quantize",
                "conv-int8",
                "fake-quant",
                "conv",
                "to-row-major"
            ]
        );
        assert_eq!(plan.int8_convolutions(), 1);
        assert_eq!(plan.quantized_weights.len(), 3);
        // Every convolution still fuses its SiLU.
        assert_eq!(plan.fusion_counts(), (3, 3, 0));
        // The dequantized filters are what the floating-point convolutions read.
        let Step::Conv { weight, .. } = plan.steps[2] else {
            panic!("conv0")
        };
        assert!(plan.constants[weight].values.iter().all(|&v| v == 0.03));

        // fp16/fp32 engines keep the Q/DQ arithmetic as fake quantization.
        let plan = lower(&model, false).unwrap();
        assert_eq!(plan.int8_convolutions(), 0);
        let fake = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::FakeQuant { .. }))
            .count();
        assert_eq!(fake, 3);
    }

    /// The stem pass folds the input's layout pass, its Q/DQ pair, the 3-channel convolution and
    /// the quantization of its output into one step; nothing reads the values it bypassed.
    #[test]
    fn the_stem_becomes_one_step() {
        let kinds = |plan: &EnginePlan| -> Vec<&'static str> {
            plan.steps.iter().map(Step::kind).collect()
        };
        // INT8: the stem stores int8 for the INT8 convolution after it.
        let mut plan = lower(&qdq_chain(), true).unwrap();
        assert!(plan.fuse_stem());
        assert_eq!(
            kinds(&plan),
            [
                "stem conv",
                "conv int8",
                "fake quantize",
                "conv + epilogue",
                "NHWC to row-major"
            ]
        );
        let Step::StemConv {
            x,
            y,
            weight,
            act,
            input_scale,
            output_scale,
            geometry,
            ..
        } = plan.steps[0].clone()
        else {
            panic!("{:?}", plan.steps[0])
        };
        assert_eq!(x, plan.input);
        assert_eq!((input_scale, output_scale), (Some(0.02), Some(0.02)));
        assert_eq!(plan.values[y].layout, Layout::NhwcInt8);
        assert_eq!(act, Act::Silu);
        assert_eq!(plan.constants[weight].dims, vec![16, 3, 3, 3]);
        assert_eq!((geometry.stride, geometry.pads), ([1, 1], [1, 1, 1, 1]));
        // The INT8 convolution reads what the stem writes.
        assert_eq!(plan.steps[1].inputs(), vec![y]);
        // Applied once: there is no input layout pass left.
        assert!(!plan.fuse_stem());

        // FP16 on the same Q/DQ model: the input still fake-quantized, the output fp16 for the
        // fake quantization in front of the next (floating-point) convolution.
        let mut plan = lower(&qdq_chain(), false).unwrap();
        assert!(plan.fuse_stem());
        let Step::StemConv {
            y,
            input_scale,
            output_scale,
            ..
        } = plan.steps[0].clone()
        else {
            panic!("{:?}", plan.steps[0])
        };
        assert_eq!((input_scale, output_scale), (Some(0.02), None));
        assert_eq!(plan.values[y].layout, Layout::Nhwc);
        assert_eq!(kinds(&plan)[1], "fake quantize");

        // A float model: gelan-t's stem (3 -> 16, stride 2), no quantization on either side.
        let mut plan = plan_for("gelan-t");
        let before = plan.steps.len();
        assert!(plan.fuse_stem());
        assert_eq!(plan.steps.len(), before - 1);
        let Step::StemConv {
            input_scale,
            output_scale,
            geometry,
            ..
        } = plan.steps[0].clone()
        else {
            panic!("{:?}", plan.steps[0])
        };
        assert_eq!((input_scale, output_scale), (None, None));
        assert_eq!(geometry.stride, [2, 2]);
        let readers: Vec<ValueId> = plan.steps.iter().flat_map(Step::inputs).collect();
        assert_eq!(readers.iter().filter(|&&v| v == plan.input).count(), 1);
    }

    /// The stem kernel holds at most `STEM_MAX_CHANNELS` output channels, in whole groups of 8;
    /// a first convolution outside that keeps the unfused path.
    #[test]
    fn stems_the_kernel_cannot_hold_stay_unfused() {
        for k in [EnginePlan::STEM_MAX_CHANNELS + 8, 12] {
            let mut plan = plan_for("gelan-t");
            let weight = plan
                .steps
                .iter()
                .find_map(|s| match s {
                    Step::Conv { weight, .. } => Some(*weight),
                    _ => None,
                })
                .unwrap();
            assert_eq!(plan.constants[weight].dims, vec![16, 3, 3, 3]);
            plan.constants[weight].dims[0] = k;
            let before = plan.steps.len();
            assert!(!plan.fuse_stem(), "{k} output channels");
            assert_eq!(plan.steps.len(), before);
        }
    }

    #[test]
    fn int8_layers_feeding_only_int8_layers_store_int8() {
        let cfg = ModelConfig::new("gelan-t", 80, 640).unwrap();
        let model = export(
            &cfg,
            &mut WeightSource::Random { seed: 0 },
            &ExportOptions::dynamic(80),
        )
        .unwrap();
        let points = kestrel_exporter::quantize::quantization_points(&model);
        let amax = points.iter().map(|p| (p.clone(), 1.0f32)).collect();
        let qdq = kestrel_exporter::quantize::quantize_model(&model, &amax).unwrap();
        let plan = lower(&qdq, true).unwrap();
        // Follow every int8 value's scale through the plan: each INT8 convolution must read its
        // input at the scale it was built for, and copies must not mix scales.
        let mut scale_of: HashMap<ValueId, f32> = HashMap::new();
        let (mut fused, mut int8_copies, mut quantize_passes, mut int8_pools) = (0, 0, 0, 0);
        let mut int8_resizes = 0;
        let layout = |v: ValueId| plan.values[v].layout;
        for s in &plan.steps {
            match s {
                Step::Quantize { x, y, scale } => {
                    quantize_passes += 1;
                    assert_eq!((layout(*x), layout(*y)), (Layout::Nhwc, Layout::NhwcInt8));
                    assert!(scale_of.insert(*y, *scale).is_none(), "{s:?}");
                }
                Step::Conv {
                    x,
                    y,
                    int8: Some(q),
                    residual,
                    ..
                } => {
                    assert_eq!(scale_of.get(x), Some(&q.input_scale), "{s:?}");
                    assert!(residual.is_none_or(|r| layout(r) == Layout::Nhwc));
                    match q.output_scale {
                        Some(out) => {
                            fused += 1;
                            assert_eq!(layout(*y), Layout::NhwcInt8);
                            assert!(scale_of.insert(*y, out).is_none(), "{s:?}");
                        }
                        None => assert_eq!(layout(*y), Layout::Nhwc),
                    }
                }
                Step::Pool { x, y, .. } if layout(*x) == Layout::NhwcInt8 => {
                    int8_pools += 1;
                    assert_eq!(layout(*y), Layout::NhwcInt8);
                    // Input and output share one scale.
                    let sx = scale_of[x];
                    assert!(scale_of.insert(*y, sx).is_none(), "{s:?}");
                }
                Step::ResizeNearest { x, y } if layout(*x) == Layout::NhwcInt8 => {
                    int8_resizes += 1;
                    assert_eq!(layout(*y), Layout::NhwcInt8);
                    let sx = scale_of[x];
                    assert!(scale_of.insert(*y, sx).is_none(), "{s:?}");
                }
                Step::CopyAxis { x, y, .. } if layout(*x) == Layout::NhwcInt8 => {
                    int8_copies += 1;
                    assert_eq!(layout(*y), Layout::NhwcInt8);
                    let sx = scale_of[x];
                    assert_eq!(*scale_of.entry(*y).or_insert(sx), sx, "{s:?}");
                }
                other => {
                    for v in other.inputs().into_iter().chain([other.output()]) {
                        assert_ne!(layout(v), Layout::NhwcInt8, "{other:?}");
                    }
                }
            }
        }
        // Most INT8 layers hand int8 to the next; concatenations and splits move int8.
        println!(
            "{fused} convolutions store int8, {int8_copies} int8 copies, {int8_pools} int8 pools, \
             {int8_resizes} int8 resizes, {quantize_passes} quantize passes"
        );
        // Both upsamples of the neck move int8 (gelan-t's 64 and 96 channels: whole vectors).
        assert_eq!(int8_resizes, 2);
        // ADown's average and max pools and SPPELAN's max pools.
        assert!(int8_pools >= 8, "{int8_pools} int8 pools");
        assert!(fused >= 60, "{fused} convolutions store int8");
        assert!(int8_copies >= 40, "{int8_copies} int8 copies");
        // No value is quantized twice with one scale.
        let mut seen = std::collections::HashSet::new();
        for s in &plan.steps {
            if let Step::Quantize { x, scale, .. } = s {
                assert!(seen.insert((*x, scale.to_bits())), "{s:?}");
            }
        }
    }

    /// images [B, 3, 17, 17] -> conv (3 -> 16, float) -> AveragePool (k x k, stride 1) -> Q/DQ
    /// -> conv (16 -> 16, int8 filter) -> output0.
    fn pool_before_int8_conv(k: i64) -> pb::ModelProto {
        use kestrel_exporter::builder::GraphBuilder;
        let mut b = GraphBuilder::new();
        let hw = Dim::Fixed(17);
        let x = b.input(
            "images",
            vec![Dim::Symbol("batch".into()), Dim::Fixed(3), hw.clone(), hw],
        );
        let wa = b.const_f32("wa", &[16, 3, 1, 1], &[0.5; 48]);
        let one = vec![pb::AttributeProto::ints("kernel_shape", &[1, 1])];
        let a = b.node1("Conv", "a", &[&x, &wa], one.clone()).unwrap();
        let pool = vec![pb::AttributeProto::ints("kernel_shape", &[k, k])];
        let p = b.node1("AveragePool", "pool", &[&a], pool).unwrap();
        let s = b.const_f32("s", &[], &[0.02]);
        let z = b.const_i8("z", &[], &[0]);
        let q = b.node1("QuantizeLinear", "q", &[&p, &s, &z], vec![]);
        let dq = b.node1("DequantizeLinear", "dq", &[&q.unwrap(), &s, &z], vec![]);
        let wq = b.const_i8("wq", &[16, 16, 1, 1], &[1; 256]);
        let ws = b.const_f32("ws", &[16], &[0.01; 16]);
        let wz = b.const_i8("wz", &[16], &[0; 16]);
        let axis = vec![pb::AttributeProto::int("axis", 0)];
        let w = b.node1("DequantizeLinear", "wdq", &[&wq, &ws, &wz], axis);
        let conv = b.node1("Conv", "b", &[&dq.unwrap(), &w.unwrap()], one);
        let shape = b.const_i64("shape", &[0, 16, -1]);
        let out = b.node1("Reshape", "flatten", &[&conv.unwrap(), &shape], vec![]);
        b.rename_last_output(&out.unwrap(), "output0");
        b.output("output0", pb::data_type::FLOAT, "");
        b.finish_model("pool-qdq")
    }

    #[test]
    fn int8_pools_hold_at_most_257_taps() {
        let pool_input_layout = |k| {
            let plan = lower(&pool_before_int8_conv(k), true).unwrap();
            let pools: Vec<Layout> = plan
                .steps
                .iter()
                .filter_map(|s| match s {
                    Step::Pool { x, .. } => Some(plan.values[*x].layout),
                    _ => None,
                })
                .collect();
            assert_eq!(pools.len(), 1, "{:?}", plan.steps);
            pools[0]
        };
        // The kernel sums biased bytes in 16-bit lanes: 257 x 255 fits, 289 x 255 would not.
        assert_eq!(pool_input_layout(2), Layout::NhwcInt8);
        assert_eq!(pool_input_layout(16), Layout::NhwcInt8);
        assert_eq!(pool_input_layout(17), Layout::Nhwc);
    }

    #[test]
    fn asymmetric_quantization_is_refused_with_the_reason() {
        let mut model = qdq_chain();
        let graph = model.graph.as_mut().unwrap();
        let z = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "z1")
            .unwrap();
        z.raw_data = vec![5];
        let err = lower(&model, true).unwrap_err().to_string();
        assert!(err.contains("zero point"), "{err}");
    }

    #[test]
    fn every_size_lowers() {
        let names = kestrel_exporter::spec::MODEL_NAMES
            .iter()
            .chain(&kestrel_exporter::spec::SEG_MODEL_NAMES);
        for &name in names {
            let plan = plan_for(name);
            assert_eq!(
                plan.prototypes.is_some(),
                name.ends_with("-seg"),
                "{name}: prototypes"
            );
            assert!(plan.steps.len() > 100, "{name}");
            // Every value is produced before it is read.
            let mut ready = vec![false; plan.values.len()];
            ready[plan.input] = true;
            for (i, v) in plan.values.iter().enumerate() {
                ready[i] |= v.constant.is_some();
            }
            let read = |v: ValueId, ready: &Vec<bool>| ready[plan.storage_of(v)];
            for s in &plan.steps {
                let (ins, outs) = (s.inputs(), vec![s.output()]);
                for i in ins {
                    assert!(
                        read(i, &ready),
                        "{name}: {s:?} reads {} before it exists",
                        plan.values[i].name
                    );
                }
                for o in outs {
                    ready[plan.storage_of(o)] = true;
                }
            }
            assert!(read(plan.output, &ready));
        }
    }
}
