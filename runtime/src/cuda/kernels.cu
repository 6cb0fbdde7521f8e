// Kestrel's CUDA kernels for the `cuda` backend, compiled with NVRTC when an engine is built.
// No headers: half precision is stored as `unsigned short` and converted with PTX `cvt`, so the
// source compiles with NVRTC alone (CI compiles it without a GPU).
//
// Layouts: the convolutional trunk is NHWC in the engine's precision (T = f16 or f32); tensors of the
// detection tail (reshapes, softmax, decoding) are row-major float32 with ONNX semantics.

typedef unsigned short half_t;
typedef long long i64;
// 16 bytes moved as one load or store (8 halves or 4 floats).
struct __align__(16) vec16 { unsigned int a, b, c, d; };

__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, i64 i) { return h2f(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, i64 i, float v) { p[i] = f2h(v); }

#define GRID_LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)
// Index loop over a template index type I: kernels instantiate it with 32-bit indices when the
// tensor is small enough, because 64-bit division and modulo cost many instructions per element.
#define INDEX_LOOP(I, i, n) for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < (I)(n); i += (I)blockDim.x * gridDim.x)
#define FITS_32(n) ((n) < 2147483647LL)

// Activation codes shared with the host: 0 none, 1 SiLU, 2 ReLU, 3 sigmoid.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
        case 1: return x / (1.0f + __expf(-x));
        case 2: return x > 0.0f ? x : 0.0f;
        case 3: return 1.0f / (1.0f + __expf(-x));
        default: return x;
    }
}

// Binary operation codes: 0 add, 1 sub, 2 mul, 3 div.
__device__ __forceinline__ float binary(float a, float b, int op) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}

// ---- layout conversion -------------------------------------------------------------------------

// NCHW float32 (the engine input) -> NHWC T. `total` = n * c * hw.
template <typename T>
__device__ void nchw_to_nhwc(const float* in, T* out, i64 total, int c, i64 hw) {
    GRID_LOOP(i, total) {
        // i indexes the output: ((n * hw) + p) * c + ch
        int ch = (int)(i % c);
        i64 p = (i / c) % hw;
        i64 n = i / (c * hw);
        st(out, i, in[(n * c + ch) * hw + p]);
    }
}
extern "C" __global__ void nchw_f32_to_nhwc_f16(const float* in, half_t* out, i64 total, int c, i64 hw) { nchw_to_nhwc(in, out, total, c, hw); }
extern "C" __global__ void nchw_f32_to_nhwc_f32(const float* in, float* out, i64 total, int c, i64 hw) { nchw_to_nhwc(in, out, total, c, hw); }

// NHWC T -> NCHW float32 (row-major, ONNX order).
template <typename T>
__device__ void nhwc_to_nchw(const T* in, float* out, i64 total, int c, i64 hw) {
    GRID_LOOP(i, total) {
        // i indexes the output: ((n * c) + ch) * hw + p
        i64 p = i % hw;
        int ch = (int)((i / hw) % c);
        i64 n = i / (c * hw);
        out[i] = ld(in, (n * hw + p) * c + ch);
    }
}
extern "C" __global__ void nhwc_f16_to_nchw_f32(const half_t* in, float* out, i64 total, int c, i64 hw) { nhwc_to_nchw(in, out, total, c, hw); }
extern "C" __global__ void nhwc_f32_to_nchw_f32(const float* in, float* out, i64 total, int c, i64 hw) { nhwc_to_nchw(in, out, total, c, hw); }

// ---- convolution epilogue ----------------------------------------------------------------------

// y = act(y + bias[ch]) (+ residual), in place on a channels-last tensor (`channels` innermost).
template <typename I, typename T>
__device__ void bias_act_i(T* y, const float* bias, const T* residual, i64 total, int channels, int act) {
    INDEX_LOOP(I, i, total) {
        float v = ld(y, i);
        if (bias) v += bias[i % (I)channels];
        v = activate(v, act);
        if (residual) v += ld(residual, i);
        st(y, i, v);
    }
}
template <typename T>
__device__ void bias_act(T* y, const float* bias, const T* residual, i64 total, int channels, int act) {
    if (FITS_32(total)) bias_act_i<unsigned int>(y, bias, residual, total, channels, act);
    else bias_act_i<i64>(y, bias, residual, total, channels, act);
}
extern "C" __global__ void bias_act_f16(half_t* y, const float* bias, const half_t* residual, i64 total, int channels, int act) { bias_act(y, bias, residual, total, channels, act); }
extern "C" __global__ void bias_act_f32(float* y, const float* bias, const float* residual, i64 total, int channels, int act) { bias_act(y, bias, residual, total, channels, act); }

// The same on FP16 with 8 channels per thread (16-byte loads and stores); needs channels % 8 == 0.
template <typename I>
__device__ void bias_act_v8_i(vec16* y, const float* bias, const vec16* residual, i64 vectors, int channels, int act) {
    INDEX_LOOP(I, v, vectors) {
        vec16 yv = y[v];
        half_t* h = (half_t*)&yv;
        vec16 rv;
        if (residual) rv = residual[v];
        const half_t* r = (const half_t*)&rv;
        int c0 = (int)((v * 8) % (I)channels);
        #pragma unroll
        for (int k = 0; k < 8; ++k) {
            float x = h2f(h[k]);
            if (bias) x += bias[c0 + k];
            x = activate(x, act);
            if (residual) x += h2f(r[k]);
            h[k] = f2h(x);
        }
        y[v] = yv;
    }
}
extern "C" __global__ void bias_act_v8_f16(vec16* y, const float* bias, const vec16* residual, i64 vectors, int channels, int act) {
    if (FITS_32(vectors * 8)) bias_act_v8_i<unsigned int>(y, bias, residual, vectors, channels, act);
    else bias_act_v8_i<i64>(y, bias, residual, vectors, channels, act);
}

// Bias + activation on an NCHW float32 tensor (row-major convolutions of the tail).
extern "C" __global__ void bias_act_nchw_f32(float* y, const float* bias, i64 total, int channels, i64 hw, int act) {
    GRID_LOOP(i, total) {
        float v = y[i];
        if (bias) v += bias[(i / hw) % channels];
        y[i] = activate(v, act);
    }
}

// ---- pooling and resizing (NHWC) ---------------------------------------------------------------

// kind 0: max, 1: average (count_include_pad selects the divisor).
template <typename I, typename T>
__device__ void pool_nhwc_i(const T* in, T* out, int n, int h, int w, int c, int oh, int ow,
                            int kh, int kw, int sh, int sw, int ph, int pw, int kind, int count_include_pad) {
    i64 total = (i64)n * oh * ow * c;
    INDEX_LOOP(I, i, total) {
        int ch = (int)(i % (I)c);
        I pix = i / (I)c;
        int ox = (int)(pix % (I)ow);
        int oy = (int)((pix / (I)ow) % (I)oh);
        int b = (int)(pix / ((I)ow * oh));
        int y0 = oy * sh - ph, x0 = ox * sw - pw;
        float acc = kind == 0 ? -3.402823466e38f : 0.0f;
        int count = 0;
        for (int dy = 0; dy < kh; ++dy) {
            int y = y0 + dy;
            if (y < 0 || y >= h) continue;
            for (int dx = 0; dx < kw; ++dx) {
                int x = x0 + dx;
                if (x < 0 || x >= w) continue;
                float v = ld(in, (((i64)b * h + y) * w + x) * c + ch);
                if (kind == 0) acc = fmaxf(acc, v); else acc += v;
                ++count;
            }
        }
        if (kind == 1) acc /= (float)(count_include_pad ? kh * kw : (count > 0 ? count : 1));
        st(out, i, acc);
    }
}
template <typename T>
__device__ void pool_nhwc(const T* in, T* out, int n, int h, int w, int c, int oh, int ow,
                          int kh, int kw, int sh, int sw, int ph, int pw, int kind, int cip) {
    if (FITS_32((i64)n * h * w * c)) pool_nhwc_i<unsigned int>(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip);
    else pool_nhwc_i<i64>(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip);
}
extern "C" __global__ void pool_nhwc_f16(const half_t* in, half_t* out, int n, int h, int w, int c, int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int kind, int cip) { pool_nhwc(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip); }
extern "C" __global__ void pool_nhwc_f32(const float* in, float* out, int n, int h, int w, int c, int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int kind, int cip) { pool_nhwc(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip); }

// FP16 pooling with 8 channels per thread (16-byte loads); needs c % 8 == 0.
template <typename I>
__device__ void pool_v8_i(const vec16* in, vec16* out, int n, int h, int w, int c, int oh, int ow,
                          int kh, int kw, int sh, int sw, int ph, int pw, int kind, int count_include_pad) {
    int cv = c / 8;
    i64 total = (i64)n * oh * ow * cv;
    INDEX_LOOP(I, i, total) {
        int g = (int)(i % (I)cv);
        I pix = i / (I)cv;
        int ox = (int)(pix % (I)ow);
        int oy = (int)((pix / (I)ow) % (I)oh);
        int b = (int)(pix / ((I)ow * oh));
        int y0 = oy * sh - ph, x0 = ox * sw - pw;
        float acc[8];
        #pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = kind == 0 ? -3.402823466e38f : 0.0f;
        int count = 0;
        for (int dy = 0; dy < kh; ++dy) {
            int y = y0 + dy;
            if (y < 0 || y >= h) continue;
            for (int dx = 0; dx < kw; ++dx) {
                int x = x0 + dx;
                if (x < 0 || x >= w) continue;
                vec16 v = in[(((I)b * h + y) * w + x) * cv + g];
                const half_t* hv = (const half_t*)&v;
                #pragma unroll
                for (int k = 0; k < 8; ++k) {
                    float f = h2f(hv[k]);
                    acc[k] = kind == 0 ? fmaxf(acc[k], f) : acc[k] + f;
                }
                ++count;
            }
        }
        float div = kind == 1 ? (float)(count_include_pad ? kh * kw : (count > 0 ? count : 1)) : 1.0f;
        vec16 r;
        half_t* hr = (half_t*)&r;
        #pragma unroll
        for (int k = 0; k < 8; ++k) hr[k] = f2h(acc[k] / div);
        out[i] = r;
    }
}
extern "C" __global__ void pool_v8_f16(const vec16* in, vec16* out, int n, int h, int w, int c, int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int kind, int cip) {
    if (FITS_32((i64)n * h * w * c)) pool_v8_i<unsigned int>(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip);
    else pool_v8_i<i64>(in, out, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, kind, cip);
}

// Nearest resize, ONNX 'asymmetric' + 'floor' (PyTorch's nn.Upsample nearest), integer sizes.
template <typename I, typename T>
__device__ void resize_nearest_nhwc_i(const T* in, T* out, int n, int h, int w, int c, int oh, int ow) {
    i64 total = (i64)n * oh * ow * c;
    INDEX_LOOP(I, i, total) {
        int ch = (int)(i % (I)c);
        I pix = i / (I)c;
        int ox = (int)(pix % (I)ow);
        int oy = (int)((pix / (I)ow) % (I)oh);
        int b = (int)(pix / ((I)ow * oh));
        int y = (int)(((i64)oy * h) / oh), x = (int)(((i64)ox * w) / ow);
        out[i] = in[(((I)b * h + y) * w + x) * c + ch];
    }
}
template <typename T>
__device__ void resize_nearest_nhwc(const T* in, T* out, int n, int h, int w, int c, int oh, int ow) {
    if (FITS_32((i64)n * oh * ow * c)) resize_nearest_nhwc_i<unsigned int>(in, out, n, h, w, c, oh, ow);
    else resize_nearest_nhwc_i<i64>(in, out, n, h, w, c, oh, ow);
}
extern "C" __global__ void resize_nearest_nhwc_f16(const half_t* in, half_t* out, int n, int h, int w, int c, int oh, int ow) { resize_nearest_nhwc(in, out, n, h, w, c, oh, ow); }
extern "C" __global__ void resize_nearest_nhwc_f32(const float* in, float* out, int n, int h, int w, int c, int oh, int ow) { resize_nearest_nhwc(in, out, n, h, w, c, oh, ow); }

// 16-byte vectors of channels (8 halves or 4 floats); needs c % (16 / element size) == 0. `cv` is
// the channel count in vectors.
extern "C" __global__ void resize_nearest_v16(const vec16* in, vec16* out, int n, int h, int w, int cv, int oh, int ow) {
    if (FITS_32((i64)n * oh * ow * cv)) resize_nearest_nhwc_i<unsigned int>(in, out, n, h, w, cv, oh, ow);
    else resize_nearest_nhwc_i<i64>(in, out, n, h, w, cv, oh, ow);
}

// ---- copies along an axis (Concat, Split, Slice) -----------------------------------------------

// View both tensors as [outer, len, inner]; copy `count` slices from in[.., in_off + j, ..] to
// out[.., out_off + j, ..]. NHWC channel concat/split use inner = 1 and outer = n*h*w.
template <typename I, typename T>
__device__ void copy_axis_i(const T* in, T* out, I outer, I in_len, I in_off, I out_len, I out_off, I count, I inner) {
    I total = outer * count * inner;
    INDEX_LOOP(I, i, total) {
        I k = i % inner;
        I j = (i / inner) % count;
        I o = i / (inner * count);
        out[(o * out_len + out_off + j) * inner + k] = in[(o * in_len + in_off + j) * inner + k];
    }
}
template <typename T>
__device__ void copy_axis(const T* in, T* out, i64 outer, i64 in_len, i64 in_off, i64 out_len, i64 out_off, i64 count, i64 inner) {
    // Both the copied range and the larger of the two tensors must fit 32-bit indices.
    i64 span = outer * (in_len > out_len ? in_len : out_len) * inner;
    if (FITS_32(span)) copy_axis_i<unsigned int>(in, out, outer, in_len, in_off, out_len, out_off, count, inner);
    else copy_axis_i<i64>(in, out, outer, in_len, in_off, out_len, out_off, count, inner);
}
// 16-byte units: NHWC channel copies whose lengths and offsets are multiples of 8 halves (or 4
// floats) move whole 16-byte vectors instead of single 2-byte elements.
extern "C" __global__ void copy_axis_v16(const vec16* in, vec16* out, i64 outer, i64 in_len, i64 in_off, i64 out_len, i64 out_off, i64 count, i64 inner) { copy_axis(in, out, outer, in_len, in_off, out_len, out_off, count, inner); }
extern "C" __global__ void copy_axis_f16(const half_t* in, half_t* out, i64 outer, i64 in_len, i64 in_off, i64 out_len, i64 out_off, i64 count, i64 inner) { copy_axis(in, out, outer, in_len, in_off, out_len, out_off, count, inner); }
extern "C" __global__ void copy_axis_f32(const float* in, float* out, i64 outer, i64 in_len, i64 in_off, i64 out_len, i64 out_off, i64 count, i64 inner) { copy_axis(in, out, outer, in_len, in_off, out_len, out_off, count, inner); }

// ---- elementwise -------------------------------------------------------------------------------

template <typename T>
__device__ void unary(const T* in, T* out, i64 total, int act) {
    GRID_LOOP(i, total) { st(out, i, activate(ld(in, i), act)); }
}
extern "C" __global__ void unary_f16(const half_t* in, half_t* out, i64 total, int act) { unary(in, out, total, act); }
extern "C" __global__ void unary_f32(const float* in, float* out, i64 total, int act) { unary(in, out, total, act); }

template <typename T>
__device__ void binary_same(const T* a, const T* b, T* out, i64 total, int op) {
    GRID_LOOP(i, total) { st(out, i, binary(ld(a, i), ld(b, i), op)); }
}
extern "C" __global__ void binary_same_f16(const half_t* a, const half_t* b, half_t* out, i64 total, int op) { binary_same(a, b, out, total, op); }
extern "C" __global__ void binary_same_f32(const float* a, const float* b, float* out, i64 total, int op) { binary_same(a, b, out, total, op); }

// Row-major broadcasting binary op. meta = [rank, dims[rank], a_strides[rank], b_strides[rank]]
// (strides 0 on broadcast axes), all int64, resident on the device.
extern "C" __global__ void binary_bcast_f32(const float* a, const float* b, float* out, i64 total, const i64* meta, int op) {
    int rank = (int)meta[0];
    const i64* dims = meta + 1;
    const i64* sa = dims + rank;
    const i64* sb = sa + rank;
    GRID_LOOP(i, total) {
        i64 rem = i, ia = 0, ib = 0;
        for (int d = rank - 1; d >= 0; --d) {
            i64 idx = rem % dims[d];
            rem /= dims[d];
            ia += idx * sa[d];
            ib += idx * sb[d];
        }
        out[i] = binary(a[ia], b[ib], op);
    }
}

// Row-major transpose. meta = [rank, out_dims[rank], in_strides_permuted[rank]].
extern "C" __global__ void transpose_f32(const float* in, float* out, i64 total, const i64* meta) {
    int rank = (int)meta[0];
    const i64* dims = meta + 1;
    const i64* strides = dims + rank;
    GRID_LOOP(i, total) {
        i64 rem = i, src = 0;
        for (int d = rank - 1; d >= 0; --d) {
            src += (rem % dims[d]) * strides[d];
            rem /= dims[d];
        }
        out[i] = in[src];
    }
}

// Softmax over the middle axis of [outer, len, inner], one thread per (outer, inner) pair.
extern "C" __global__ void softmax_f32(const float* in, float* out, i64 outer, int len, i64 inner) {
    GRID_LOOP(t, outer * inner) {
        i64 o = t / inner, k = t % inner;
        const float* x = in + o * len * inner + k;
        float* y = out + o * len * inner + k;
        float m = -3.402823466e38f;
        for (int j = 0; j < len; ++j) m = fmaxf(m, x[(i64)j * inner]);
        float s = 0.0f;
        for (int j = 0; j < len; ++j) s += __expf(x[(i64)j * inner] - m);
        float inv = 1.0f / s;
        for (int j = 0; j < len; ++j) y[(i64)j * inner] = __expf(x[(i64)j * inner] - m) * inv;
    }
}
