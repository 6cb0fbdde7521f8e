//! Fused convolutions through cuDNN 9's graph (backend) API: convolution → per-channel scale →
//! bias → activation → residual → output scale as one operation graph, which cuDNN's runtime
//! fusion engines compile into one kernel. INT8 (int8 in, int32 accumulate, int8 or fp16 out) and
//! FP16 (fp16 in and out, fp32 accumulate).
//!
//! The legacy API cannot do this: its INT8 convolution takes one scalar alpha, and Q/DQ models
//! carry a scale per output channel. Whether a fused engine exists for a layer, and whether it
//! beats Kestrel's own kernel, differs per layer and card, so the engine times both.

use std::ffi::c_void;

use cudarc::cudnn::sys as nsys;
use nsys::cudnnBackendAttributeName_t as A;
use nsys::cudnnBackendAttributeType_t as T;
use nsys::cudnnBackendDescriptorType_t as D;

use super::conv::{ConvShape, Dnn};
use super::device::cuda_error;
use super::plan::{Act, ConvGeometry};
use crate::error::Result;

/// Storage of a tensor the fused convolution reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Int8,
    Half,
}

impl Storage {
    fn data_type(self) -> nsys::cudnnDataType_t {
        match self {
            Storage::Int8 => nsys::cudnnDataType_t::CUDNN_DATA_INT8,
            Storage::Half => nsys::cudnnDataType_t::CUDNN_DATA_HALF,
        }
    }
}

/// What one fused convolution computes:
/// `y = out_scale[k] · (act(scale[k] · conv(x, w) + bias[k]) + residual)`, each term optional.
#[derive(Debug, Clone, Copy)]
pub struct FusedConvSpec {
    pub shape: ConvShape,
    /// Elements between consecutive pixels of `x` and of `y`: their channel counts, or more
    /// where the tensor is a slice of a concatenation's buffer.
    pub x_channel_stride: usize,
    pub y_channel_stride: usize,
    pub geometry: ConvGeometry,
    /// `x` and `w`: int8 (int32 accumulation) or fp16 (fp32 accumulation).
    pub input: Storage,
    pub output: Storage,
    /// Per-output-channel float scale after the convolution (INT8: input scale × filter scale).
    pub channel_scale: bool,
    pub bias: bool,
    pub act: Act,
    /// A tensor shaped like `y`, stored as fp16, added after the activation.
    pub residual: bool,
    /// Per-output-channel multiplier before the store (INT8 out: 1 / the next layer's scale).
    pub output_scale: bool,
}

/// Device addresses for one fused convolution (0 where the spec has no such operand).
#[derive(Debug, Clone, Copy, Default)]
pub struct FusedConvPointers {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub scale: u64,
    pub bias: u64,
    pub residual: u64,
    pub output_scale: u64,
    pub workspace: u64,
}

// Tensor ids inside one operation graph.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;
const SCALE: i64 = 4;
const BIAS: i64 = 5;
const RESIDUAL: i64 = 6;
const OUT_SCALE: i64 = 7;
const VIRTUAL: i64 = 100;

/// The second operand of an epilogue op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operand {
    /// A float vector with one value per output channel (tensor id).
    PerChannel(i64),
    /// An fp16 tensor shaped like the output (tensor id).
    LikeOutput(i64),
}

/// The pointwise ops after the convolution, in the order the spec's formula applies them.
fn epilogue(spec: &FusedConvSpec) -> Vec<(nsys::cudnnPointwiseMode_t, Option<Operand>)> {
    use nsys::cudnnPointwiseMode_t as M;
    let mut ops = Vec::new();
    if spec.channel_scale {
        ops.push((M::CUDNN_POINTWISE_MUL, Some(Operand::PerChannel(SCALE))));
    }
    if spec.bias {
        ops.push((M::CUDNN_POINTWISE_ADD, Some(Operand::PerChannel(BIAS))));
    }
    match spec.act {
        Act::None => {}
        Act::Silu => ops.push((M::CUDNN_POINTWISE_SWISH_FWD, None)),
        Act::Relu => ops.push((M::CUDNN_POINTWISE_RELU_FWD, None)),
        Act::Sigmoid => ops.push((M::CUDNN_POINTWISE_SIGMOID_FWD, None)),
    }
    if spec.residual {
        ops.push((M::CUDNN_POINTWISE_ADD, Some(Operand::LikeOutput(RESIDUAL))));
    }
    if spec.output_scale {
        ops.push((M::CUDNN_POINTWISE_MUL, Some(Operand::PerChannel(OUT_SCALE))));
    }
    ops
}

/// One cuDNN backend descriptor, destroyed on drop.
struct Desc(nsys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created once in `Desc::new`, destroyed once here.
        let _ = unsafe { nsys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

fn check(status: nsys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == nsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(cuda_error(what, status))
    }
}

impl Desc {
    fn new(kind: D) -> Result<Self> {
        let mut d: nsys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes one descriptor handle.
        check(
            unsafe { nsys::cudnnBackendCreateDescriptor(kind, &mut d) },
            "creating a cuDNN graph descriptor",
        )?;
        Ok(Self(d))
    }

    /// Set an attribute to `values` (elements of the C type that `ty` names).
    fn set<V>(&self, name: A, ty: T, values: &[V]) -> Result<()> {
        // SAFETY: `values` holds `len` elements of the type `ty` names (the callers pair them).
        check(
            unsafe {
                nsys::cudnnBackendSetAttribute(
                    self.0,
                    name,
                    ty,
                    values.len() as i64,
                    values.as_ptr().cast::<c_void>(),
                )
            },
            "setting a cuDNN graph attribute",
        )
    }

    fn set_i64(&self, name: A, values: &[i64]) -> Result<()> {
        self.set(name, T::CUDNN_TYPE_INT64, values)
    }

    fn set_descs(&self, name: A, descs: &[&Desc]) -> Result<()> {
        let raw: Vec<nsys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    /// Read up to `out.len()` elements of an attribute (none: only count them); returns how
    /// many the attribute has.
    fn get<V>(&self, name: A, ty: T, out: &mut [V], what: &str) -> Result<i64> {
        let mut count = 0i64;
        let ptr = if out.is_empty() {
            std::ptr::null_mut()
        } else {
            out.as_mut_ptr().cast::<c_void>()
        };
        // SAFETY: `out` has room for `out.len()` elements of the type `ty` names (the callers
        // pair them); with none requested cuDNN writes only the count.
        check(
            unsafe {
                nsys::cudnnBackendGetAttribute(self.0, name, ty, out.len() as i64, &mut count, ptr)
            },
            what,
        )?;
        Ok(count)
    }

    fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: a live descriptor.
        check(unsafe { nsys::cudnnBackendFinalize(self.0) }, what)
    }
}

/// NHWC strides of an `[n, c, h, w]` tensor whose pixels are `row` elements apart (`row` >= c).
fn nhwc_strides(d: [i64; 4], row: i64) -> [i64; 4] {
    [row * d[2] * d[3], 1, d[3] * row, row]
}

fn tensor(uid: i64, dims: [i64; 4], dt: nsys::cudnnDataType_t, is_virtual: bool) -> Result<Desc> {
    strided_tensor(uid, dims, dims[1], dt, is_virtual)
}

fn strided_tensor(
    uid: i64,
    dims: [i64; 4],
    row: i64,
    dt: nsys::cudnnDataType_t,
    is_virtual: bool,
) -> Result<Desc> {
    let t = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set(
        A::CUDNN_ATTR_TENSOR_DATA_TYPE,
        T::CUDNN_TYPE_DATA_TYPE,
        &[dt],
    )?;
    t.set_i64(A::CUDNN_ATTR_TENSOR_DIMENSIONS, &dims)?;
    t.set_i64(A::CUDNN_ATTR_TENSOR_STRIDES, &nhwc_strides(dims, row))?;
    t.set_i64(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?;
    t.set_i64(A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
    t.set(
        A::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
        T::CUDNN_TYPE_BOOLEAN,
        &[is_virtual],
    )?;
    t.finalize("a cuDNN graph tensor")?;
    Ok(t)
}

fn pointwise_op(
    mode: nsys::cudnnPointwiseMode_t,
    x: &Desc,
    b: Option<&Desc>,
    y: &Desc,
) -> Result<(Desc, Desc)> {
    let pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    pw.set(
        A::CUDNN_ATTR_POINTWISE_MODE,
        T::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?;
    pw.set(
        A::CUDNN_ATTR_POINTWISE_MATH_PREC,
        T::CUDNN_TYPE_DATA_TYPE,
        &[nsys::cudnnDataType_t::CUDNN_DATA_FLOAT],
    )?;
    pw.finalize("a cuDNN pointwise descriptor")?;
    let op = Desc::new(D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
    op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
    if let Some(b) = b {
        op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    }
    op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    op.finalize("a cuDNN pointwise operation")?;
    Ok((pw, op))
}

/// The operation graph of one fused convolution, finalized, with every descriptor it refers to.
pub struct FusedConvGraph {
    spec: FusedConvSpec,
    graph: Desc,
    _parts: Vec<Desc>,
}

// SAFETY: host-side descriptors owned by this value, used by one engine at a time.
unsafe impl Send for FusedConvGraph {}

impl FusedConvGraph {
    /// Describe `spec` as a cuDNN operation graph. Errors where cuDNN rejects the description
    /// (for example grouped INT8 convolutions), which callers treat as "no fused engine".
    pub fn new(dnn: &Dnn, spec: FusedConvSpec) -> Result<Self> {
        let g = &spec.geometry;
        if g.pads[0] != g.pads[2] || g.pads[1] != g.pads[3] {
            return Err(cuda_error(
                "fused convolution",
                "asymmetric padding is not supported",
            ));
        }
        let i = |v: usize| v as i64;
        let [n, c, h, w] = spec.shape.x.map(i);
        let [_, k, p, q] = spec.shape.y.map(i);
        let cg = c / i(g.group.max(1));
        let y_dims = [n, k, p, q];
        let channel = [1, k, 1, 1];
        let float = nsys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let mut parts = Vec::new();

        if spec.x_channel_stride < spec.shape.x[1] || spec.y_channel_stride < spec.shape.y[1] {
            return Err(cuda_error(
                "fused convolution",
                "a channel stride is smaller than the channel count",
            ));
        }
        let x = strided_tensor(
            X,
            [n, c, h, w],
            i(spec.x_channel_stride),
            spec.input.data_type(),
            false,
        )?;
        let wt = tensor(
            W,
            [k, cg, i(g.kernel[0]), i(g.kernel[1])],
            spec.input.data_type(),
            false,
        )?;
        let y = strided_tensor(
            Y,
            y_dims,
            i(spec.y_channel_stride),
            spec.output.data_type(),
            false,
        )?;

        // The pointwise chain after the convolution, in order, with each op's second operand.
        let mut chain: Vec<(nsys::cudnnPointwiseMode_t, Option<Desc>)> = Vec::new();
        for (mode, operand) in epilogue(&spec) {
            let t = match operand {
                Some(Operand::PerChannel(uid)) => Some(tensor(uid, channel, float, false)?),
                Some(Operand::LikeOutput(uid)) => {
                    Some(tensor(uid, y_dims, Storage::Half.data_type(), false)?)
                }
                None => None,
            };
            chain.push((mode, t));
        }

        let (comp, acc) = match spec.input {
            Storage::Int8 => (
                nsys::cudnnDataType_t::CUDNN_DATA_INT32,
                nsys::cudnnDataType_t::CUDNN_DATA_INT32,
            ),
            Storage::Half => (float, float),
        };
        let conv = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set(
            A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            T::CUDNN_TYPE_DATA_TYPE,
            &[comp],
        )?;
        conv.set(
            A::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            T::CUDNN_TYPE_CONVOLUTION_MODE,
            &[nsys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
        )?;
        conv.set_i64(A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
        conv.set_i64(
            A::CUDNN_ATTR_CONVOLUTION_DILATIONS,
            &[i(g.dilation[0]), i(g.dilation[1])],
        )?;
        conv.set_i64(
            A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
            &[i(g.stride[0]), i(g.stride[1])],
        )?;
        conv.set_i64(
            A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
            &[i(g.pads[0]), i(g.pads[1])],
        )?;
        conv.set_i64(
            A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
            &[i(g.pads[2]), i(g.pads[3])],
        )?;
        conv.finalize("a cuDNN convolution descriptor")?;

        let mut ops: Vec<Desc> = Vec::new();
        // Each op's output: virtual intermediates, the real `y` last.
        let mut next_virtual = VIRTUAL;
        let mut virtual_tensor = |dt| -> Result<Desc> {
            next_virtual += 1;
            tensor(next_virtual, y_dims, dt, true)
        };
        let conv_out = if chain.is_empty() {
            None
        } else {
            Some(virtual_tensor(acc)?)
        };
        let conv_op = Desc::new(D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
        conv_op.set_descs(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
        conv_op.set_descs(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&wt])?;
        conv_op.set_descs(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            &[conv_out.as_ref().unwrap_or(&y)],
        )?;
        conv_op.set_descs(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            &[&conv],
        )?;
        conv_op.set(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            T::CUDNN_TYPE_FLOAT,
            &[1.0f32],
        )?;
        conv_op.set(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            T::CUDNN_TYPE_FLOAT,
            &[0.0f32],
        )?;
        conv_op.finalize("a cuDNN convolution operation")?;
        ops.push(conv_op);

        let last = chain.len();
        let mut input = conv_out;
        for (at, (mode, operand)) in chain.into_iter().enumerate() {
            let out = if at + 1 == last {
                None
            } else {
                Some(virtual_tensor(float)?)
            };
            let xin = input
                .take()
                .ok_or_else(|| cuda_error("fused convolution", "pointwise chain lost its input"))?;
            let (pw, op) = pointwise_op(mode, &xin, operand.as_ref(), out.as_ref().unwrap_or(&y))?;
            parts.extend([xin, pw]);
            parts.extend(operand);
            ops.push(op);
            input = out;
        }

        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let op_refs: Vec<&Desc> = ops.iter().collect();
        graph.set_descs(A::CUDNN_ATTR_OPERATIONGRAPH_OPS, &op_refs)?;
        graph.set(
            A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            T::CUDNN_TYPE_HANDLE,
            &[dnn.0],
        )?;
        graph.finalize("a cuDNN operation graph (no fused engine supports this layer)")?;
        parts.extend([x, wt, y, conv]);
        parts.extend(ops);
        Ok(Self {
            spec,
            graph,
            _parts: parts,
        })
    }

    /// Execution plans for this graph in the order cuDNN's heuristics rank them, at most `limit`,
    /// skipping engines whose workspace exceeds `workspace_limit` bytes or that fail to build.
    /// Each plan's [`FusedConvPlan::label`] names the heuristic and its rank there, so an engine
    /// file can ask for the same plan again with [`Self::plan_labelled`].
    pub fn plans(
        self: &std::sync::Arc<Self>,
        dnn: &Dnn,
        limit: usize,
        workspace_limit: usize,
    ) -> Result<Vec<FusedConvPlan>> {
        let mut out = Vec::new();
        for mode in HEURISTIC_MODES {
            for (rank, cfg) in self.heuristic_configs(mode)?.into_iter().enumerate() {
                if out.len() >= limit {
                    return Ok(out);
                }
                if let Some(p) = self.finalize(dnn, mode, rank, cfg, workspace_limit)? {
                    out.push(p);
                }
            }
            if !out.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    /// The plan `label` names (one of [`Self::plans`]' labels), built alone: `None` when cuDNN
    /// here no longer ranks the same engine there, or it builds with another workspace.
    pub fn plan_labelled(
        self: &std::sync::Arc<Self>,
        dnn: &Dnn,
        label: &str,
        workspace_limit: usize,
    ) -> Result<Option<FusedConvPlan>> {
        let Some((mode_name, rest)) = label.split_once(" #") else {
            return Ok(None);
        };
        let Some(rank) = rest
            .split_once(' ')
            .and_then(|(r, _)| r.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        let Some(mode) = HEURISTIC_MODES
            .into_iter()
            .find(|m| format!("{m:?}") == mode_name)
        else {
            return Ok(None);
        };
        let Some(cfg) = self.heuristic_configs(mode)?.into_iter().nth(rank) else {
            return Ok(None);
        };
        Ok(self
            .finalize(dnn, mode, rank, cfg, workspace_limit)?
            .filter(|p| p.label() == label))
    }

    /// The engine configurations heuristic `mode` offers for this graph, best first (none when
    /// the heuristic does not apply).
    fn heuristic_configs(&self, mode: nsys::cudnnBackendHeurMode_t) -> Result<Vec<Desc>> {
        let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_descs(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&self.graph])?;
        heur.set(
            A::CUDNN_ATTR_ENGINEHEUR_MODE,
            T::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )?;
        if heur.finalize("cuDNN engine heuristics").is_err() {
            return Ok(Vec::new());
        }
        let count = heur.get::<nsys::cudnnBackendDescriptor_t>(
            A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut [],
            "counting cuDNN engine configurations",
        )?;
        let configs = (0..count.max(0))
            .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
            .collect::<Result<Vec<_>>>()?;
        // cuDNN fills the engine-config descriptors created here.
        let mut raw: Vec<nsys::cudnnBackendDescriptor_t> = configs.iter().map(|d| d.0).collect();
        let returned = heur.get(
            A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut raw,
            "reading cuDNN engine configurations",
        )?;
        Ok(configs.into_iter().take(returned.max(0) as usize).collect())
    }

    /// An execution plan of engine configuration `cfg` (rank `rank` of heuristic `mode`); `None`
    /// when it does not build or needs more than `workspace_limit` bytes of workspace.
    fn finalize(
        self: &std::sync::Arc<Self>,
        dnn: &Dnn,
        mode: nsys::cudnnBackendHeurMode_t,
        rank: usize,
        cfg: Desc,
        workspace_limit: usize,
    ) -> Result<Option<FusedConvPlan>> {
        let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set(
            A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
            T::CUDNN_TYPE_HANDLE,
            &[dnn.0],
        )?;
        plan.set_descs(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&cfg])?;
        if plan.finalize("a cuDNN execution plan").is_err() {
            return Ok(None);
        }
        let mut workspace = [0i64];
        plan.get(
            A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
            T::CUDNN_TYPE_INT64,
            &mut workspace,
            "reading a plan's workspace size",
        )?;
        let workspace = workspace[0];
        if workspace < 0 || workspace as usize > workspace_limit {
            return Ok(None);
        }
        Ok(Some(FusedConvPlan {
            exec: std::sync::Arc::new(ExecPlan {
                spec: self.spec,
                _graph: self.clone(),
                plan,
                _config: cfg,
                label: format!("{mode:?} #{rank} ({workspace} B workspace)"),
            }),
            variant: None,
        }))
    }
}

/// cuDNN's heuristics, in the order they are asked for engines.
const HEURISTIC_MODES: [nsys::cudnnBackendHeurMode_t; 2] = [
    nsys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
    nsys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
];

/// A finalized cuDNN execution plan. Plans hold no buffer addresses, so layers with the same
/// spec share one (each with its own variant pack).
struct ExecPlan {
    spec: FusedConvSpec,
    // Execution plans refer to their graph's descriptors; keep them alive.
    _graph: std::sync::Arc<FusedConvGraph>,
    plan: Desc,
    _config: Desc,
    label: String,
}

/// One executable fused convolution: a shared execution plan and, once bound, the variant pack
/// naming this layer's buffers (built once, so enqueueing allocates nothing).
pub struct FusedConvPlan {
    exec: std::sync::Arc<ExecPlan>,
    variant: Option<Desc>,
}

// SAFETY: host-side descriptors owned by this value (or shared read-only), used by one engine at a
// time.
unsafe impl Send for FusedConvPlan {}
unsafe impl Send for ExecPlan {}
unsafe impl Sync for ExecPlan {}
unsafe impl Sync for FusedConvGraph {}

impl FusedConvPlan {
    /// Fix the buffers this plan reads and writes.
    pub fn bind(&mut self, p: FusedConvPointers) -> Result<()> {
        let s = &self.exec.spec;
        let mut uids = vec![X, W, Y];
        let mut ptrs = vec![p.x, p.w, p.y];
        for (on, uid, ptr) in [
            (s.channel_scale, SCALE, p.scale),
            (s.bias, BIAS, p.bias),
            (s.residual, RESIDUAL, p.residual),
            (s.output_scale, OUT_SCALE, p.output_scale),
        ] {
            if on {
                if ptr == 0 {
                    return Err(cuda_error("fused convolution", "an operand has no buffer"));
                }
                uids.push(uid);
                ptrs.push(ptr);
            }
        }
        let ptrs: Vec<*mut c_void> = ptrs.into_iter().map(|v| v as *mut c_void).collect();
        let vp = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        vp.set_i64(A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &uids)?;
        vp.set(
            A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            T::CUDNN_TYPE_VOID_PTR,
            &ptrs,
        )?;
        vp.set(
            A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            T::CUDNN_TYPE_VOID_PTR,
            &[p.workspace as *mut c_void],
        )?;
        vp.finalize("a cuDNN variant pack")?;
        self.variant = Some(vp);
        Ok(())
    }

    /// The same execution plan, not yet bound to buffers (for another layer with the same spec).
    pub fn share(&self) -> Self {
        Self {
            exec: self.exec.clone(),
            variant: None,
        }
    }

    /// Which engine configuration this is (for engine-file choices and profiles).
    pub fn label(&self) -> &str {
        &self.exec.label
    }

    /// Enqueue the fused convolution on the handle's stream.
    pub fn run(&self, dnn: &Dnn) -> Result<()> {
        let vp = self.variant.as_ref().ok_or_else(|| {
            cuda_error(
                "fused convolution",
                "plan run before its buffers were bound",
            )
        })?;
        // SAFETY: a finalized plan and a variant pack whose pointers the engine keeps alive.
        check(
            unsafe { nsys::cudnnBackendExecute(dnn.0, self.exec.plan.0, vp.0) },
            "running a fused convolution",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(input: Storage, output: Storage) -> FusedConvSpec {
        FusedConvSpec {
            shape: ConvShape {
                x: [1, 16, 8, 8],
                y: [1, 32, 8, 8],
            },
            x_channel_stride: 16,
            y_channel_stride: 32,
            geometry: ConvGeometry {
                kernel: [3, 3],
                stride: [1, 1],
                pads: [1, 1, 1, 1],
                dilation: [1, 1],
                group: 1,
            },
            input,
            output,
            channel_scale: input == Storage::Int8,
            bias: true,
            act: Act::Silu,
            residual: false,
            output_scale: output == Storage::Int8,
        }
    }

    #[test]
    fn int8_epilogue_dequantizes_then_activates_then_requantizes() {
        use nsys::cudnnPointwiseMode_t as M;
        let mut s = spec(Storage::Int8, Storage::Int8);
        s.residual = true;
        // The residual joins after SiLU (GELAN's bottleneck) and before requantization.
        assert_eq!(
            epilogue(&s),
            vec![
                (M::CUDNN_POINTWISE_MUL, Some(Operand::PerChannel(SCALE))),
                (M::CUDNN_POINTWISE_ADD, Some(Operand::PerChannel(BIAS))),
                (M::CUDNN_POINTWISE_SWISH_FWD, None),
                (M::CUDNN_POINTWISE_ADD, Some(Operand::LikeOutput(RESIDUAL))),
                (M::CUDNN_POINTWISE_MUL, Some(Operand::PerChannel(OUT_SCALE))),
            ]
        );
    }

    #[test]
    fn fp16_epilogue_has_no_scales() {
        use nsys::cudnnPointwiseMode_t as M;
        let mut s = spec(Storage::Half, Storage::Half);
        assert_eq!(
            epilogue(&s),
            vec![
                (M::CUDNN_POINTWISE_ADD, Some(Operand::PerChannel(BIAS))),
                (M::CUDNN_POINTWISE_SWISH_FWD, None),
            ]
        );
        s.bias = false;
        s.act = Act::None;
        // A bare convolution: the graph is the convolution alone, writing `y` directly.
        assert!(epilogue(&s).is_empty());
    }

    #[test]
    fn nhwc_strides_put_channels_innermost() {
        assert_eq!(nhwc_strides([2, 16, 5, 7], 16), [16 * 35, 1, 7 * 16, 16]);
        assert_eq!(nhwc_strides([1, 64, 1, 1], 64), [64, 1, 64, 64]);
        // A 16-channel slice of a 48-channel concatenation.
        assert_eq!(nhwc_strides([2, 16, 5, 7], 48), [48 * 35, 1, 7 * 48, 48]);
    }
}
