//! Convolutions through cuDNN 9's legacy API: descriptors per layer and batch bucket, the
//! algorithm chosen by cuDNN's heuristics (the first that fits the workspace limit).

use std::ffi::c_void;

use cudarc::cudnn::{result as dnn, sys as nsys};

use super::device::cuda_error;
use super::plan::{ConvGeometry, Layout};
use crate::error::Result;

/// Workspace any single convolution may use, in bytes.
pub const WORKSPACE_LIMIT: usize = 256 << 20;

/// A cuDNN handle bound to the engine's stream.
pub struct Dnn(pub nsys::cudnnHandle_t);

impl Dnn {
    pub fn new(stream: cudarc::driver::sys::CUstream) -> Result<Self> {
        let h = dnn::create_handle().map_err(|e| cuda_error("creating a cuDNN handle", e))?;
        // SAFETY: a live handle and stream; cudarc's CUstream and cuDNN's cudaStream_t are the same pointer.
        unsafe { dnn::set_stream(h, stream.cast()) }
            .map_err(|e| cuda_error("binding cuDNN to the stream", e))?;
        Ok(Self(h))
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { dnn::destroy_handle(self.0) };
    }
}

// SAFETY: the handle is used by one engine at a time (behind `&mut`).
unsafe impl Send for Dnn {}

/// One convolution at one batch size: descriptors and the chosen algorithm.
pub struct ConvPlan {
    x: nsys::cudnnTensorDescriptor_t,
    y: nsys::cudnnTensorDescriptor_t,
    w: nsys::cudnnFilterDescriptor_t,
    conv: nsys::cudnnConvolutionDescriptor_t,
    pub algo: nsys::cudnnConvolutionFwdAlgo_t,
    pub workspace: usize,
}

// SAFETY: descriptors are plain host objects owned by this value.
unsafe impl Send for ConvPlan {}

impl Drop for ConvPlan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once in `new` and is destroyed once here.
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// Shapes of one convolution: input `[n, c, h, w]`, output `[n, k, oh, ow]`.
#[derive(Debug, Clone, Copy)]
pub struct ConvShape {
    pub x: [usize; 4],
    pub y: [usize; 4],
}

fn ci(v: usize) -> i32 {
    v as i32
}

impl ConvPlan {
    /// Descriptors for `shape` in `layout` (`half`: FP16 storage, FP32 accumulation, tensor cores).
    pub fn new(
        dnn_handle: &Dnn,
        shape: ConvShape,
        g: &ConvGeometry,
        layout: Layout,
        half: bool,
    ) -> Result<Self> {
        let fmt = match layout {
            Layout::Nhwc => nsys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            Layout::RowMajor => nsys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            // INT8 convolutions run on Kestrel's own kernel, never through cuDNN.
            Layout::NhwcInt8 => {
                return Err(cuda_error(
                    "convolution",
                    "int8 activations go to the INT8 kernel, not cuDNN",
                ));
            }
        };
        let dt = if half {
            nsys::cudnnDataType_t::CUDNN_DATA_HALF
        } else {
            nsys::cudnnDataType_t::CUDNN_DATA_FLOAT
        };
        if g.pads[0] != g.pads[2] || g.pads[1] != g.pads[3] {
            return Err(cuda_error(
                "convolution",
                "asymmetric padding is not supported by the cuda backend",
            ));
        }
        let e = |what: &'static str| move |err| cuda_error(what, err);
        let x = dnn::create_tensor_descriptor().map_err(e("tensor descriptor"))?;
        let y = dnn::create_tensor_descriptor().map_err(e("tensor descriptor"))?;
        let w = dnn::create_filter_descriptor().map_err(e("filter descriptor"))?;
        let conv = dnn::create_convolution_descriptor().map_err(e("convolution descriptor"))?;
        let mut plan = Self {
            x,
            y,
            w,
            conv,
            algo: nsys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            workspace: 0,
        };
        let [n, c, h, wd] = shape.x;
        let [_, k, oh, ow] = shape.y;
        // SAFETY: descriptors created above; all values are checked by cuDNN, which returns a status.
        unsafe {
            dnn::set_tensor4d_descriptor(x, fmt, dt, [ci(n), ci(c), ci(h), ci(wd)])
                .map_err(e("input descriptor"))?;
            dnn::set_tensor4d_descriptor(y, fmt, dt, [ci(n), ci(k), ci(oh), ci(ow)])
                .map_err(e("output descriptor"))?;
            dnn::set_filter4d_descriptor(
                w,
                dt,
                fmt,
                [ci(k), ci(c / g.group), ci(g.kernel[0]), ci(g.kernel[1])],
            )
            .map_err(e("filter descriptor"))?;
            dnn::set_convolution2d_descriptor(
                conv,
                ci(g.pads[0]),
                ci(g.pads[1]),
                ci(g.stride[0]),
                ci(g.stride[1]),
                ci(g.dilation[0]),
                ci(g.dilation[1]),
                nsys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                nsys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(e("convolution descriptor"))?;
            dnn::set_convolution_group_count(conv, ci(g.group)).map_err(e("group count"))?;
            // FP32 is the debugging mode: cuDNN's default math would let it run in TF32 (10-bit
            // mantissas), which moved scores by 2e-3 against the cpu backend on the demo model.
            let math = if half {
                nsys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else {
                nsys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            dnn::set_convolution_math_type(conv, math).map_err(e("math type"))?;

            let mut perf: [nsys::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
            let mut returned = 0;
            dnn::get_convolution_forward_algorithm(
                dnn_handle.0,
                x,
                w,
                conv,
                y,
                8,
                &mut returned,
                perf.as_mut_ptr(),
            )
            .map_err(e("choosing a convolution algorithm"))?;
            let choice = perf[..returned.max(0) as usize]
                .iter()
                .find(|p| {
                    p.status == nsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                        && p.memory <= WORKSPACE_LIMIT
                })
                .ok_or_else(|| {
                    cuda_error("convolution", "cuDNN offers no algorithm for this layer")
                })?;
            plan.algo = choice.algo;
            plan.workspace =
                dnn::get_convolution_forward_workspace_size(dnn_handle.0, x, w, conv, y, plan.algo)
                    .map_err(e("workspace size"))?;
        }
        Ok(plan)
    }

    /// Time every algorithm cuDNN offers on the real buffers (`cudnnFindConvolutionForwardAlgorithmEx`)
    /// and keep the fastest whose workspace fits `workspace_bytes` (like TensorRT's tactic timing).
    /// `y` is overwritten.
    pub fn choose_fastest(
        &mut self,
        dnn_handle: &Dnn,
        x: u64,
        w: u64,
        y: u64,
        workspace: u64,
        workspace_bytes: usize,
    ) -> Result<()> {
        let mut perf: [nsys::cudnnConvolutionFwdAlgoPerf_t; 10] = unsafe { std::mem::zeroed() };
        let mut returned = 0;
        // SAFETY: descriptors describe the buffers, which the executor sized for them; cuDNN
        // writes at most 10 results.
        unsafe {
            nsys::cudnnFindConvolutionForwardAlgorithmEx(
                dnn_handle.0,
                self.x,
                x as *const c_void,
                self.w,
                w as *const c_void,
                self.conv,
                self.y,
                y as *mut c_void,
                10,
                &mut returned,
                perf.as_mut_ptr(),
                workspace as *mut c_void,
                workspace_bytes,
            )
        }
        .result()
        .map_err(|e| cuda_error("timing convolution algorithms", e))?;
        // Results come sorted by time; take the first that succeeded and fits.
        if let Some(best) = perf[..returned.max(0) as usize].iter().find(|p| {
            p.status == nsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= workspace_bytes
        }) {
            self.algo = best.algo;
            // cuDNN timed the algorithm with this math type; run it the same way.
            // SAFETY: a live descriptor.
            unsafe { dnn::set_convolution_math_type(self.conv, best.mathType) }
                .map_err(|e| cuda_error("math type", e))?;
            // SAFETY: descriptors are live.
            self.workspace = unsafe {
                dnn::get_convolution_forward_workspace_size(
                    dnn_handle.0,
                    self.x,
                    self.w,
                    self.conv,
                    self.y,
                    self.algo,
                )
            }
            .map_err(|e| cuda_error("workspace size", e))?;
        }
        Ok(())
    }

    /// Enqueue y = conv(x, w) on the handle's stream.
    pub fn run(
        &self,
        dnn_handle: &Dnn,
        x: u64,
        w: u64,
        y: u64,
        workspace: u64,
        workspace_bytes: usize,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let beta = 0.0f32;
        // SAFETY: pointers are device buffers sized for these descriptors by the executor; alpha and
        // beta are f32 as cuDNN requires for half and float data.
        unsafe {
            dnn::convolution_forward(
                dnn_handle.0,
                (&alpha as *const f32).cast::<c_void>(),
                self.x,
                x as *const c_void,
                self.w,
                w as *const c_void,
                self.conv,
                self.algo,
                workspace as *mut c_void,
                workspace_bytes,
                (&beta as *const f32).cast::<c_void>(),
                self.y,
                y as *mut c_void,
            )
        }
        .map_err(|e| cuda_error("convolution", e))
    }
}
