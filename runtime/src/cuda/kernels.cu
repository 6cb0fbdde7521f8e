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

// INT8 average pooling divides integer sums. (A byte at a time, with 16 extractions, conversions
// and divisions per vector, ADown's 2x2 average over 256 x 160 x 160 at batch 8 took 0.083 ms on an
// H200, bound by instructions; on the word lanes of PoolI8 below, 0.065 ms.) Each sum is divided
// by a multiplication with the reciprocal, rounded by adding 1.5 * 2^23 (round to nearest even on
// the float add): exact where the divisor is a power of two; for other divisors an exact tie
// (sum / count = m + 1/2) may round either way from the product, so it is settled on integers.
// round_half_even(sum / count) for |sum| < 2^22, with inv = 1 / count.
__device__ __forceinline__ int divide_rne(int sum, int count, float inv, bool pow2) {
    const float f = __int_as_float(0x4B400000 + sum) - 12582912.0f;  // exact int -> float
    int r = __float_as_int(fmaf(f, inv, 12582912.0f)) - 0x4B400000;
    if (!pow2) {
        const int e2 = 2 * (sum - r * count);  // 2 (sum / count - r) * count
        if ((e2 == count || e2 == -count) && (r & 1)) r += e2 > 0 ? 1 : -1;
    }
    return r;
}
template <int W> struct Words;
template <> struct Words<2> { typedef uint2 T; };
template <> struct Words<4> { typedef uint4 T; };
// Pooling over whole channel vectors (16 or 8 bytes): the accumulators of one output vector
// (PoolF16, PoolI8), run one output per thread (pool_vectors), or, for the 2 x kw stride-1 averages
// without padding that smooth ADown's and AConv's inputs, a strip of POOL_ROWS output rows of one
// column per thread (pool_smooth: each input row's taps are added once for the two output rows
// that use them, and the pixel indices are worked out once per strip; ADown's average over
// 256 x 160 x 160 int8 at batch 8 on an H200: 0.065 -> 0.044 ms). The strips lost on the other
// pools (max 3x3 and 5x5: fewer threads, each doing serial rows), which stay one output per thread.
#define POOL_ROWS 4
// The accumulators take each vector by value: one 16- or 8-byte load, then its lanes in registers.
// (Taken by reference, `add(in[i])` read the lanes from global memory one by one: gelan-c's INT8
// 3x3 max pool at batch 8 went 0.035 ms, from under 0.025.)
// FP16, 8 channels per 16-byte vector, accumulated in float.
template <bool MAX>
struct PoolF16 {
    typedef vec16 V;
    float a[8];
    __device__ __forceinline__ void init() {
#pragma unroll
        for (int k = 0; k < 8; ++k) a[k] = MAX ? -3.402823466e38f : 0.0f;
    }
    __device__ __forceinline__ void add(const V v) {
        const half_t* hv = (const half_t*)&v;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float f = h2f(hv[k]);
            a[k] = MAX ? fmaxf(a[k], f) : a[k] + f;
        }
    }
    __device__ __forceinline__ void merge(const PoolF16& o) {
#pragma unroll
        for (int k = 0; k < 8; ++k) a[k] += o.a[k];
    }
    __device__ __forceinline__ V finish(int div, int) const {
        V r;
        half_t* hr = (half_t*)&r;
#pragma unroll
        for (int k = 0; k < 8; ++k) hr[k] = f2h(MAX ? a[k] : a[k] / (float)div);
        return r;
    }
};
// INT8, 4 W channels per vector of W words; input and output share one scale. The maximum is
// exact and taken a byte at a time (`vmax4` is emulated on Hopper and made ADown's max pool twice
// as slow). The average sums each word's bytes, biased to 0..255, in two pairs of 16-bit lanes
// (bytes 0 and 2, bytes 1 and 3; up to 257 taps cannot carry across lanes; the planner keeps
// larger windows in FP16) and divides with divide_rne (round half to even, as QuantizeLinear).
template <int W, bool MAX>
struct PoolI8 {
    typedef typename Words<W>::T V;
    int best[MAX ? 4 * W : 1];
    unsigned lo[W], hi[W];
    __device__ __forceinline__ void init() {
#pragma unroll
        for (int k = 0; k < (MAX ? 4 * W : 1); ++k) best[k] = -128;
#pragma unroll
        for (int k = 0; k < W; ++k) lo[k] = 0u, hi[k] = 0u;
    }
    __device__ __forceinline__ void add(const V v) {
        if (MAX) {
            const signed char* q = (const signed char*)&v;
#pragma unroll
            for (int k = 0; k < (MAX ? 4 * W : 1); ++k) best[k] = max(best[k], (int)q[k]);
        } else {
            const unsigned* words = (const unsigned*)&v;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                lo[k] += (words[k] & 0x00FF00FFu) ^ 0x00800080u;
                hi[k] += ((words[k] >> 8) & 0x00FF00FFu) ^ 0x00800080u;
            }
        }
    }
    __device__ __forceinline__ void merge(const PoolI8& o) {
#pragma unroll
        for (int k = 0; k < W; ++k) lo[k] += o.lo[k], hi[k] += o.hi[k];
    }
    // `div`: the divisor; `taps`: the values summed (the bias to take off).
    __device__ __forceinline__ V finish(int div, int taps) const {
        V rv;
        if (MAX) {
            signed char* qr = (signed char*)&rv;
#pragma unroll
            for (int k = 0; k < (MAX ? 4 * W : 1); ++k) qr[k] = (signed char)best[k];
        } else {
            unsigned* r = (unsigned*)&rv;
            const float inv = 1.0f / (float)div;
            const bool pow2 = (div & (div - 1)) == 0;
            const int bias = 128 * taps;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const int q0 = divide_rne((int)(lo[k] & 0xFFFFu) - bias, div, inv, pow2);
                const int q2 = divide_rne((int)(lo[k] >> 16) - bias, div, inv, pow2);
                const int q1 = divide_rne((int)(hi[k] & 0xFFFFu) - bias, div, inv, pow2);
                const int q3 = divide_rne((int)(hi[k] >> 16) - bias, div, inv, pow2);
                r[k] = (unsigned)(q0 & 0xFF) | ((unsigned)(q1 & 0xFF) << 8) | ((unsigned)(q2 & 0xFF) << 16) |
                       ((unsigned)q3 << 24);
            }
        }
        return rv;
    }
};

// One output vector per thread; `in`, `out`: vectors of `cv` per pixel, NHWC.
template <typename I, typename P>
__device__ void pool_vectors(const typename P::V* __restrict__ in, typename P::V* __restrict__ out, int n, int h,
                             int w, int cv, int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw,
                             int count_include_pad) {
    const i64 total = (i64)n * oh * ow * cv;
    INDEX_LOOP(I, i, total) {
        const int g = (int)(i % (I)cv);
        const I pix = i / (I)cv;
        const int ox = (int)(pix % (I)ow);
        const int oy = (int)((pix / (I)ow) % (I)oh);
        const int b = (int)(pix / ((I)ow * oh));
        const int y0 = oy * sh - ph, x0 = ox * sw - pw;
        P acc;
        acc.init();
        int count = 0;
        for (int dy = 0; dy < kh; ++dy) {
            const int y = y0 + dy;
            if (y < 0 || y >= h) continue;
            for (int dx = 0; dx < kw; ++dx) {
                const int x = x0 + dx;
                if (x < 0 || x >= w) continue;
                acc.add(in[(((I)b * h + y) * w + x) * cv + g]);
                ++count;
            }
        }
        const int div = count_include_pad ? kh * kw : (count > 0 ? count : 1);
        out[i] = acc.finish(div, count);
    }
}
// The average over 2 x kw taps, stride 1 down the rows, no padding (every tap inside), POOL_ROWS
// output rows of one column per thread. Grid: x over an output row's columns x channel vectors,
// y over the images' strips.
template <typename P>
__device__ void pool_smooth(const typename P::V* __restrict__ in, typename P::V* __restrict__ out, int n, int h,
                            int w, int cv, int oh, int ow, int kw, int sw) {
    typedef typename P::V V;
    const int strips = (oh + POOL_ROWS - 1) / POOL_ROWS;
    const int row_items = ow * cv;
    for (int s = blockIdx.y; s < n * strips; s += gridDim.y) {
        const int b = s / strips, oy0 = (s - b * strips) * POOL_ROWS;
        const int rows = min(POOL_ROWS, oh - oy0);
        V* dst = out + ((i64)b * oh + oy0) * row_items;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < row_items; j += blockDim.x * gridDim.x) {
            const int ox = j / cv, g = j - ox * cv;
            const V* row = in + (((i64)b * h + oy0) * w + ox * sw) * cv + g;
            P above;
            above.init();
            for (int dx = 0; dx < kw; ++dx) above.add(row[dx * cv]);
            for (int r = 0; r < rows; ++r) {
                row += (i64)w * cv;
                P below;
                below.init();
                for (int dx = 0; dx < kw; ++dx) below.add(row[dx * cv]);
                P sum = above;
                sum.merge(below);
                dst[(i64)r * row_items + j] = sum.finish(2 * kw, 2 * kw);
                above = below;
            }
        }
    }
}
// kind 0: max, 1: average. `smooth` (pool_smooth's case, launched on its grid; the host makes the
// same test, pool_smooths in mod.rs): 2 x kw average, stride 1 down, no padding, every tap inside.
template <typename PMax, typename PAvg>
__device__ void pool_vector_kernel(const typename PMax::V* in, typename PMax::V* out, int n, int h, int w, int cv,
                                   int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int kind,
                                   int cip) {
    const bool smooth = kind == 1 && kh == 2 && sh == 1 && ph == 0 && pw == 0 && oh == h - 1 && ow > 0 &&
                        (ow - 1) * sw + kw <= w;
    if (smooth) {
        pool_smooth<PAvg>(in, out, n, h, w, cv, oh, ow, kw, sw);
    } else if (FITS_32((i64)n * h * w * cv)) {
        if (kind == 0) pool_vectors<unsigned int, PMax>(in, out, n, h, w, cv, oh, ow, kh, kw, sh, sw, ph, pw, cip);
        else pool_vectors<unsigned int, PAvg>(in, out, n, h, w, cv, oh, ow, kh, kw, sh, sw, ph, pw, cip);
    } else {
        if (kind == 0) pool_vectors<i64, PMax>(in, out, n, h, w, cv, oh, ow, kh, kw, sh, sw, ph, pw, cip);
        else pool_vectors<i64, PAvg>(in, out, n, h, w, cv, oh, ow, kh, kw, sh, sw, ph, pw, cip);
    }
}
#define POOL_VECTOR_ARGS int n, int h, int w, int c, int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int kind, int cip
#define POOL_VECTOR_PASS(CV) n, h, w, (CV), oh, ow, kh, kw, sh, sw, ph, pw, kind, cip
extern "C" __global__ void pool_v8_f16(const vec16* in, vec16* out, POOL_VECTOR_ARGS) {
    pool_vector_kernel<PoolF16<true>, PoolF16<false>>(in, out, POOL_VECTOR_PASS(c / 8));
}
extern "C" __global__ void pool_v8_i8(const uint2* in, uint2* out, POOL_VECTOR_ARGS) {
    pool_vector_kernel<PoolI8<2, true>, PoolI8<2, false>>(in, out, POOL_VECTOR_PASS(c / 8));
}
extern "C" __global__ void pool_v16_i8(const uint4* in, uint4* out, POOL_VECTOR_ARGS) {
    pool_vector_kernel<PoolI8<4, true>, PoolI8<4, false>>(in, out, POOL_VECTOR_PASS(c / 16));
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
extern "C" __global__ void copy_axis_i8(const signed char* in, signed char* out, i64 outer, i64 in_len, i64 in_off, i64 out_len, i64 out_off, i64 count, i64 inner) { copy_axis(in, out, outer, in_len, in_off, out_len, out_off, count, inner); }
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

// YOLO's DFL box decoding (Step::Dfl): x row-major [n, sides, bins, anchors] of raw logits; for
// each (n, side, anchor) the softmax over the bins and its expectation under the projection w[bins]:
// y[n, 0, side, anchor]. What Transpose, Softmax and the 1x1 convolution compute, in one pass.
extern "C" __global__ void dfl_f32(const float* x, const float* w, float* y, i64 total, int bins, i64 anchors) {
    GRID_LOOP(i, total) {
        i64 a = i % anchors, row = i / anchors;
        const float* p = x + row * bins * anchors + a;
        float m = -3.402823466e38f;
        for (int j = 0; j < bins; ++j) m = fmaxf(m, p[(i64)j * anchors]);
        float s = 0.0f, e = 0.0f;
        for (int j = 0; j < bins; ++j) {
            float v = __expf(p[(i64)j * anchors] - m);
            s += v;
            e = fmaf(v, w[j], e);
        }
        y[i] = e / s;
    }
}

// ---- quantization -------------------------------------------------------------------------------
// ONNX QuantizeLinear with an int8 zero point of 0: q = clamp(round_half_even(x / scale), -128, 127).
__device__ __forceinline__ int quantize(float x, float scale) {
    int q;
    asm("cvt.rni.s32.f32 %0, %1;" : "=r"(q) : "f"(x / scale));
    return q < -128 ? -128 : (q > 127 ? 127 : q);
}

// The INT8 convolution's epilogue runs once per output for as few reduction steps as 16 (1x1
// layers), and on memory-bound layers its instructions, not the tensor cores, set the pace. The
// conversions (int to float, float to int) and the special functions (exp, reciprocal, tanh) share
// one unit that runs at a quarter of the float rate, so the fast forms spend as few of them as they
// can: SiLU is x/2 + x/2 tanh(x/2) (one tanh.approx, max relative error 2^-11, instead of an exp
// and a reciprocal; gelan-c's 1x1 layers at batch 8 on an H200 ran 3-13 % faster), and
// requantizing rounds in the float adder (below) instead of converting. The requantization
// multiplies by the reciprocal scale (it can differ from x / scale in the last bit, so a value
// within an ulp of a rounding boundary may land one step away).
__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float activate_fast(float x, int act) {
    const float h = 0.5f * x;
    switch (act) {
        case 1: return __fmaf_rn(h, tanh_approx(h), h);
        case 2: return x > 0.0f ? x : 0.0f;
        case 3: return __fmaf_rn(0.5f, tanh_approx(h), 0.5f);
        default: return x;
    }
}
// Clamped to the int8 range first, then rounded to nearest even by adding 1.5 * 2^23 (the sum's
// low mantissa bits are the integer): the same result as cvt.rni and a clamp (NaN aside: it lands
// on -128 instead of 0), without the conversion unit.
__device__ __forceinline__ int quantize_fast(float x, float inv_scale) {
    const float v = fminf(fmaxf(x * inv_scale, -128.0f), 127.0f);
    return __float_as_int(v + 12582912.0f) - 0x4B400000;
}
// An INT8 accumulator (converted to float exactly) dequantized with its per-channel scale plus the
// bias, as one rounding: every INT8 kernel writes it the same way, so that they give the same bits.
__device__ __forceinline__ float dequantize_acc(float acc, float scale, float bias) { return __fmaf_rn(acc, scale, bias); }
// An accumulator of magnitude at most 2^22 (a reduction over at most 256 int8 products: 256 x 128
// x 128) as a float, exactly as cvt gives it, in the integer and float adders (1.5 * 2^23 as the
// float's exponent and leading bits) instead of the conversion unit.
__device__ __forceinline__ float small_acc_to_float(int acc) { return __int_as_float(acc + 0x4B400000) - 12582912.0f; }

// fp16 NHWC -> int8 NHWC, 8 values per thread (the planner quantizes whole 8-channel groups only).
extern "C" __global__ void quantize_v8_f16_i8(const vec16* in, unsigned long long* out, i64 vectors, float scale) {
    GRID_LOOP(i, vectors) {
        vec16 v = in[i];
        unsigned words[4] = {v.a, v.b, v.c, v.d};
        unsigned long long packed = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            half_t h = (half_t)((words[k >> 1] >> ((k & 1) * 16)) & 0xffff);
            packed |= (unsigned long long)(quantize(h2f(h), scale) & 0xff) << (8 * k);
        }
        out[i] = packed;
    }
}

// Quantize-dequantize in place of an int8 consumer: what a Q/DQ pair computes, where the consumer
// runs in floating point (the first convolution, whose 3 channels do not fit the int8 kernel).
template <typename T>
__device__ void fake_quant(const T* in, T* out, i64 total, float scale) {
    GRID_LOOP(i, total) { st(out, i, (float)quantize(ld(in, i), scale) * scale); }
}
extern "C" __global__ void fake_quant_f16(const half_t* in, half_t* out, i64 total, float scale) { fake_quant(in, out, total, scale); }
extern "C" __global__ void fake_quant_f32(const float* in, float* out, i64 total, float scale) { fake_quant(in, out, total, scale); }


// ---- INT8 convolution ---------------------------------------------------------------------------
// Implicit GEMM on tensor cores. GEMM rows are output pixels (n, oh, ow), columns output channels,
// the reduction runs over one KRSC filter row (r, s, c). The input is int8 NHWC with C % 16 == 0, so
// a 16-byte chunk never straddles a filter tap; weights are int8 KRSC. Accumulation is exact int32
// (mma.sync m16n8k32) and one fused epilogue applies the per-channel scale (input scale x weight
// scale), the bias, the activation and the residual, and stores fp16 NHWC, or int8 requantized for
// the next INT8 layer: the Q/DQ arithmetic of the ONNX graph, without a second pass over the output.
#define I8_BM 128
#define I8_BK 64
// Bytes per shared-memory row: 64 + 16 of padding make the 32-bit fragment loads bank-conflict free.
#define I8_LDS 80
#define I8_THREADS 256
// Reduction tiles in flight; the host passes it (-DI8_STAGES) and sizes each kernel's dynamic
// shared memory from it.
#ifndef I8_STAGES
#define I8_STAGES 3
#endif

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}
// 16 bytes global -> shared, asynchronously; `bytes` = 0 writes zeros (padding, ragged edges).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void mma_s8(int* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices from shared memory (lanes 8j..8j+7 give the row addresses of matrix j):
// exactly the m16n8k32 int8 A fragment, or the B fragments of two n8 tiles.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// One k32 step of a warp's MI x NI tile of m16n8 products: the B fragments of NI n8 tiles from
// shared memory (`b_lane`: this lane's ldmatrix row address for tile 0, `ld`: bytes per row; tile
// j sits 8j rows on), multiplied with the A fragments `af` into `acc`.
template <int MI, int NI>
__device__ __forceinline__ void mma_s8_step(int (&acc)[MI][NI][4], const unsigned (&af)[MI][4], unsigned b_lane, int ld) {
    unsigned bf[NI][2];
#pragma unroll
    for (int j = 0; j < NI; j += 2) {
        unsigned b4[4];
        ldmatrix_x4(b4, b_lane + j * 8 * ld);
        bf[j][0] = b4[0];
        bf[j][1] = b4[1];
        bf[j + 1][0] = b4[2];
        bf[j + 1][1] = b4[3];
    }
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_s8(acc[i][j], af[i], bf[j]);
}

// The pipelined reduction of the INT8 GEMM kernels: `ktiles` tiles of I8_BK channels, STAGES - 1
// in flight while one is multiplied. `load(kt, stage)` issues the copies of tile kt into `stage` (in
// order of kt); A tiles are BM rows and B tiles BN rows of I8_LDS bytes. Accumulates the warp's
// MI x NI tile of m16n8 products at rows wm, columns wn.
template <int MI, int NI, int BM, int BN, int STAGES, typename Load>
__device__ __forceinline__ void int8_gemm_mainloop(int (&acc)[MI][NI][4], const signed char* a_tiles, const signed char* b_tiles,
                                                   int ktiles, int wm, int wn, int lane, Load load) {
    // ldmatrix row addresses: lane l feeds row (l & 7) of matrix (l >> 3).
    const int lj = lane >> 3, lr = lane & 7;
    // Prologue: STAGES - 1 tiles in flight. One commit group per tile (empty past the end) keeps
    // the wait count simple.
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ktiles) load(st, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        const int stage = kt % STAGES;
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        // Tile kt has landed for every thread, and every warp is done with tile kt - 1, whose
        // stage the prefetch below overwrites.
        __syncthreads();
        if (kt + STAGES - 1 < ktiles) load(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;\n" ::);
        const unsigned as = smem_addr(a_tiles + stage * BM * I8_LDS);
        const unsigned bs = smem_addr(b_tiles + stage * BN * I8_LDS);
#pragma unroll
        for (int kk = 0; kk < I8_BK; kk += 32) {
            unsigned af[MI][4];
#pragma unroll
            for (int i = 0; i < MI; ++i)
                ldmatrix_x4(af[i], as + (wm + i * 16 + (lj & 1) * 8 + lr) * I8_LDS + kk + (lj >> 1) * 16);
            mma_s8_step<MI, NI>(acc, af, bs + (wn + (lj >> 1) * 8 + lr) * I8_LDS + kk + (lj & 1) * 16, I8_LDS);
        }
    }
}

// A BM x BN output tile per block of 8 warps arranged WARPS_M x WARPS_N; STAGES tiles of the
// reduction in flight (dynamic shared memory: STAGES * (BM + BN) * I8_LDS bytes).
// `out_scale` > 0 stores int8 (quantized for the next INT8 layer) instead of fp16.
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__device__ void conv_int8(const signed char* __restrict__ x, const signed char* __restrict__ w,
                          const float* __restrict__ scale, const float* __restrict__ bias,
                          const half_t* __restrict__ res, half_t* __restrict__ y,
                          int n_img, int h, int wd, int c, int p, int q, int k, int r, int s,
                          int sh, int sw, int ph, int pw, int dh, int dw, int act, int y_stride, int y_offset,
                          float out_scale, int groups) {
    constexpr int WM = BM / WARPS_M;
    constexpr int WN = BN / WARPS_N;
    constexpr int MI = WM / 16;
    constexpr int NI = WN / 8;
    constexpr int A_LOADS = BM * 4 / I8_THREADS;
    constexpr int B_LOADS = BN * 4 / I8_THREADS;
    extern __shared__ __align__(128) signed char i8_smem[];
    signed char* a_tiles = i8_smem;
    signed char* b_tiles = i8_smem + STAGES * BM * I8_LDS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int g = lane >> 2, t = lane & 3;
    const int m_total = n_img * p * q;
    // Grouped convolutions: group g reads input channels [g*cg, (g+1)*cg) and writes output
    // channels [g*kgrp, (g+1)*kgrp); `c` and `k` stay the tensors' channel counts (pixel strides).
    const int cg = c / groups, kgrp = k / groups;
    const int kg = r * s * cg;
    // Channel tiles of one pixel tile are consecutive blocks, so they run together and read its
    // input from L2 once rather than from memory once per channel tile.
    const int n_tiles = (kgrp + BN - 1) / BN;
    const int m0 = (blockIdx.x / (n_tiles * groups)) * BM;
    const int grp = (blockIdx.x / n_tiles) % groups;
    const int n0 = (blockIdx.x % n_tiles) * BN;
    // Channel offsets of this block's group in the input, the filter rows and the output.
    const int c_off = grp * cg, k_off = grp * kgrp;
    const int chunk = tid & 3;

    // This thread loads 16 bytes of A_LOADS rows (output pixels) per tile: precompute their origin.
    int a_ih[A_LOADS], a_iw[A_LOADS];
    const signed char* a_base[A_LOADS];
    bool a_ok[A_LOADS];
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
        int m = m0 + (tid >> 2) + i * (I8_THREADS / 4);
        a_ok[i] = m < m_total;
        int mm = a_ok[i] ? m : 0;
        int img = mm / (p * q);
        int pq = mm - img * p * q;
        int oh = pq / q;
        int ow = pq - oh * q;
        a_ih[i] = oh * sh - ph;
        a_iw[i] = ow * sw - pw;
        a_base[i] = x + (i64)img * h * wd * c;
    }
    // Where this thread's 16-byte chunk of the next tile to load sits in the filter row: reduction
    // index, channel, filter tap. Tiles load in order, so it advances by counting, not dividing.
    int ld_k = chunk * 16;
    int ld_c = ld_k % cg;
    int ld_s = (ld_k / cg) % s;
    int ld_r = ld_k / cg / s;
    auto load = [&](int stage) {
        const int kk = ld_k, ch = ld_c, fr = ld_r, fs = ld_s;
        const bool k_ok = kk < kg;
        ld_k += I8_BK;
        ld_c += I8_BK;
        while (ld_c >= cg) {
            ld_c -= cg;
            if (++ld_s == s) {
                ld_s = 0;
                ++ld_r;
            }
        }
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            int ih = a_ih[i] + fr * dh, iw = a_iw[i] + fs * dw;
            bool ok = k_ok && a_ok[i] && ih >= 0 && ih < h && iw >= 0 && iw < wd;
            const signed char* src = ok ? a_base[i] + ((i64)ih * wd + iw) * c + c_off + ch : x;
            cp_async16(smem_addr(a_tiles + stage * BM * I8_LDS + ((tid >> 2) + i * (I8_THREADS / 4)) * I8_LDS + chunk * 16), src, ok ? 16 : 0);
        }
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            int row = (tid >> 2) + j * (I8_THREADS / 4);
            bool ok = k_ok && n0 + row < kgrp;
            const signed char* src = ok ? w + (i64)(k_off + n0 + row) * kg + kk : w;
            cp_async16(smem_addr(b_tiles + stage * BN * I8_LDS + row * I8_LDS + chunk * 16), src, ok ? 16 : 0);
        }
    };

    int acc[MI][NI][4] = {};
    // Tiles load in order, so `load` can ignore which one it is.
    int8_gemm_mainloop<MI, NI, BM, BN, STAGES>(acc, a_tiles, b_tiles, (kg + I8_BK - 1) / I8_BK, wm, wn, lane,
                                               [&](int, int stage) { load(stage); });

    // Epilogue: accumulator (i, j, e) holds row g (+8 for e >= 2), column 2t (+1 for odd e).
    const bool pairs = ((y_stride | y_offset | kgrp) & 1) == 0;
    const float inv_out_scale = out_scale > 0.0f ? 1.0f / out_scale : 0.0f;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm + i * 16 + g + half * 8;
            if (m >= m_total) continue;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int n = n0 + wn + j * 8 + t * 2;  // within the group
                if (n >= kgrp) continue;
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int nn = k_off + (n + e < kgrp ? n + e : kgrp - 1);
                    float z = dequantize_acc((float)acc[i][j][half * 2 + e], scale[nn], bias ? bias[nn] : 0.0f);
                    z = activate_fast(z, act);
                    if (res) z += h2f(res[(i64)m * k + nn]);
                    v[e] = z;
                }
                const i64 at = (i64)m * y_stride + y_offset + k_off + n;
                const bool two = n + 1 < kgrp;
                if (out_scale > 0.0f) {
                    signed char* out = (signed char*)y + at;
                    const int q0 = quantize_fast(v[0], inv_out_scale), q1 = quantize_fast(v[1], inv_out_scale);
                    if (pairs && two) {
                        *(unsigned short*)out = (unsigned short)((q0 & 0xff) | ((q1 & 0xff) << 8));
                    } else {
                        out[0] = (signed char)q0;
                        if (two) out[1] = (signed char)q1;
                    }
                    continue;
                }
                half_t* out = y + at;
                if (pairs && two) {
                    *(unsigned*)out = (unsigned)f2h(v[0]) | ((unsigned)f2h(v[1]) << 16);
                } else {
                    out[0] = f2h(v[0]);
                    if (two) out[1] = f2h(v[1]);
                }
            }
        }
    }
}

#define CONV_INT8_ARGS const signed char* x, const signed char* w, const float* scale, const float* bias, const half_t* res, half_t* y, \
    int n_img, int h, int wd, int c, int p, int q, int k, int r, int s, int sh, int sw, int ph, int pw, int dh, int dw, int act, int y_stride, int y_offset, \
    float out_scale, int groups
#define CONV_INT8_PASS x, w, scale, bias, res, y, n_img, h, wd, c, p, q, k, r, s, sh, sw, ph, pw, dh, dw, act, y_stride, y_offset, out_scale, groups
// Tile shapes (pixels x channels): the host picks the largest that still gives every SM work.
extern "C" __global__ void __launch_bounds__(I8_THREADS) conv_int8_m128_n128(CONV_INT8_ARGS) { conv_int8<128, 128, 2, 4, I8_STAGES>(CONV_INT8_PASS); }
extern "C" __global__ void __launch_bounds__(I8_THREADS) conv_int8_m128_n64(CONV_INT8_ARGS) { conv_int8<128, 64, 4, 2, I8_STAGES>(CONV_INT8_PASS); }
extern "C" __global__ void __launch_bounds__(I8_THREADS) conv_int8_m64_n128(CONV_INT8_ARGS) { conv_int8<64, 128, 2, 4, I8_STAGES>(CONV_INT8_PASS); }
extern "C" __global__ void __launch_bounds__(I8_THREADS) conv_int8_m64_n64(CONV_INT8_ARGS) { conv_int8<64, 64, 2, 4, I8_STAGES>(CONV_INT8_PASS); }

// ---- 1x1 INT8 convolutions ------------------------------------------------------------------------
// GELAN's 1x1 layers are GEMMs whose reduction is short (64 to 1024 channels) and whose rows are
// many (up to 204800 pixels at batch 8), so they move more bytes than they multiply: gelan-c's
// take 0.90 ms in cuDNN's INT8 engines at batch 8 on an H200, where the memory rate (3.5 TB/s)
// and the INT8 tensor rate would allow about 0.32. This is the implicit GEMM above without the
// filter-tap gathering (each 16-byte chunk of a reduction tile is a contiguous run of one pixel's
// channels), with its output staged in shared memory so that rows leave as whole 16-byte stores:
// the implicit GEMM's 2-byte stores kept its L2 62 % busy on a quarter of the bytes (Nsight
// Compute, bench/results/gpu-conv1x1-int8-h200-20261128T2333). The epilogue's arithmetic is the
// implicit GEMM's, term for term, so both give the same bits. Measured there (bench/conv1x1-int8.sh,
// every 1x1 shape of gelan-c at batch 8): 0.47-0.85x the implicit GEMM's time (0.55x at 160x160);
// against cuDNN it wins where the reduction is short (64-128 channels: 160x160 layers 0.019 ms
// against 0.025, 80x80 ones 0.013 against 0.016) and loses where it is long (1024 -> 256 at 80x80:
// 0.077 against 0.031), because mma.sync runs at a fraction of the Hopper tensor cores' rate. The
// engine times it against cuDNN's fused graph per layer, like any other tactic. Input and output
// may be channel slices of wider tensors (concat views): pixel strides x_stride and y_stride, in
// elements. c % 16 == 0; k % 16 == 0 (int8 out) or k % 8 == 0 (fp16 out). The residual, when
// present, is fp16 [m][k]. Writing an int8 copy of an fp16 output from this epilogue, in place of
// the quantize step after it (GELAN's bottleneck inputs), was tried: the same bytes, but gelan-c's
// whole INT8 pass got 0.04 ms slower (bench/results/gpu-quantized-copy-h200-20261129T0240).

// The 1x1 kernel's epilogue into the staging tile: accumulator (i, j, e) is tile row wm + 16i + g
// (+8 for e >= 2), column wn + 8j + 2t (+1 for odd e). SMALL_K: the reduction has at most 256
// terms (small_acc_to_float is exact); SILU: the activation is SiLU, whatever `act` says; RES: a
// residual is added (else `res` is not read, and no bounds are checked per value).
template <int MI, int NI, int OS, bool INT8_OUT, bool SMALL_K, bool SILU, bool RES>
__device__ __forceinline__ void conv1x1_epilogue(const int (&acc)[MI][NI][4], unsigned char* stage, int wm, int wn,
                                                 int g, int t, int m0, int n0, int m_total, int k,
                                                 const float* __restrict__ scale, const float* __restrict__ bias,
                                                 const half_t* __restrict__ res, int act, float inv_out_scale) {
#pragma unroll
    for (int j = 0; j < NI; ++j) {
        const int n = wn + j * 8 + t * 2;
        float sc[2], bi[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int nn = n0 + n + e < k ? n0 + n + e : k - 1;
            sc[e] = scale[nn];
            bi[e] = bias ? bias[nn] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < MI; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = wm + i * 16 + g + half * 8;
                const i64 m = m0 + row;
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int a = acc[i][j][half * 2 + e];
                    float z = dequantize_acc(SMALL_K ? small_acc_to_float(a) : (float)a, sc[e], bi[e]);
                    z = activate_fast(z, SILU ? 1 : act);
                    if (RES && m < m_total && n0 + n + e < k) z += h2f(res[m * k + n0 + n + e]);
                    v[e] = z;
                }
                if (INT8_OUT) {
                    const int q0 = quantize_fast(v[0], inv_out_scale), q1 = quantize_fast(v[1], inv_out_scale);
                    *(unsigned short*)&stage[row * OS + n] = (unsigned short)((q0 & 0xff) | ((q1 & 0xff) << 8));
                } else {
                    *(unsigned*)&stage[row * OS + n * 2] = (unsigned)f2h(v[0]) | ((unsigned)f2h(v[1]) << 16);
                }
            }
        }
    }
}

// The 1x1 kernels' output: the epilogue into the staging tile `stage` (STAGE_BYTES of shared memory
// every warp is done with), then each output pixel's channels of the tile leave as whole 16-byte
// chunks.
template <int BM, int BN, int THREADS, bool INT8_OUT, int STAGE_BYTES, int MI, int NI>
__device__ __forceinline__ void conv1x1_store(const int (&acc)[MI][NI][4], unsigned char* stage, int wm, int wn, int g,
                                              int t, int m0, int n0, int m_total, int c, int k,
                                              const float* __restrict__ scale, const float* __restrict__ bias,
                                              const half_t* __restrict__ res, void* __restrict__ y, int act,
                                              float out_scale, int y_stride) {
    constexpr int OUT_BYTES = INT8_OUT ? 1 : 2;
    // Staged output rows, 16 bytes past a multiple of 32 (as the tiles' rows).
    constexpr int OS = BN * OUT_BYTES + 16;
    static_assert(BM * OS <= STAGE_BYTES, "the staged output fits in the shared memory given");
    const float inv_out_scale = out_scale > 0.0f ? 1.0f / out_scale : 0.0f;
    // The epilogue's instructions set the pace on memory-bound layers: it is compiled for SiLU,
    // for reductions short enough to convert accumulators without the conversion unit and for
    // layers without a residual (each decided once per block), as well as for the general case.
#define CONV1X1_EPILOGUE(SMALL_K, SILU, RES) conv1x1_epilogue<MI, NI, OS, INT8_OUT, SMALL_K, SILU, RES>(acc, stage, wm, wn, g, t, m0, n0, m_total, k, scale, bias, res, act, inv_out_scale)
    if (res) {
        // GELAN's residual layers (the bottlenecks' second convolutions) are 3x3: one general form.
        CONV1X1_EPILOGUE(false, false, true);
    } else if (c <= 256) {
        if (act == 1) CONV1X1_EPILOGUE(true, true, false);
        else CONV1X1_EPILOGUE(true, false, false);
    } else {
        if (act == 1) CONV1X1_EPILOGUE(false, true, false);
        else CONV1X1_EPILOGUE(false, false, false);
    }
#undef CONV1X1_EPILOGUE
    __syncthreads();
    constexpr int ROW_CHUNKS = BN * OUT_BYTES / 16;
#pragma unroll
    for (int it = 0; it < (BM * ROW_CHUNKS + THREADS - 1) / THREADS; ++it) {
        const int i = (int)threadIdx.x + it * THREADS;
        if (BM * ROW_CHUNKS % THREADS != 0 && i >= BM * ROW_CHUNKS) break;
        const int row = i / ROW_CHUNKS, part = i - row * ROW_CHUNKS;
        const int n = n0 + part * (16 / OUT_BYTES);
        if (m0 + row >= m_total || n >= k) continue;
        *(uint4*)((unsigned char*)y + ((i64)(m0 + row) * y_stride + n) * OUT_BYTES) = *(const uint4*)&stage[row * OS + part * 16];
    }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool INT8_OUT>
__device__ void conv1x1_int8(const signed char* __restrict__ x, const signed char* __restrict__ w,
                             const float* __restrict__ scale, const float* __restrict__ bias,
                             const half_t* __restrict__ res, void* __restrict__ y, int m_total, int c,
                             int k, int act, float out_scale, int x_stride, int y_stride) {
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    extern __shared__ __align__(128) signed char pw_smem[];
    signed char* a_tiles = pw_smem;
    signed char* b_tiles = pw_smem + STAGES * BM * I8_LDS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int g = lane >> 2, t = lane & 3;
    // Channel tiles of one pixel tile are consecutive blocks: they read its input from L2 once.
    const int n_tiles = (k + BN - 1) / BN;
    const int m0 = (blockIdx.x / n_tiles) * BM, n0 = (blockIdx.x % n_tiles) * BN;
    const int ktiles = (c + I8_BK - 1) / I8_BK;
    // The A (input) and B (filter) copies look alike but are kept apart: folding them into one
    // helper changed the generated code of these measured kernels.
    auto load = [&](int kt, int stage) {
        const int k0 = kt * I8_BK;
#pragma unroll
        for (int it = 0; it < (BM * 4 + THREADS - 1) / THREADS; ++it) {
            const int i = tid + it * THREADS;
            if (BM * 4 % THREADS != 0 && i >= BM * 4) break;
            const int row = i >> 2, kk = k0 + (i & 3) * 16;
            const bool ok = m0 + row < m_total && kk < c;
            const signed char* src = ok ? x + (i64)(m0 + row) * x_stride + kk : x;
            cp_async16(smem_addr(a_tiles + (stage * BM + row) * I8_LDS + (i & 3) * 16), src, ok ? 16 : 0);
        }
#pragma unroll
        for (int it = 0; it < (BN * 4 + THREADS - 1) / THREADS; ++it) {
            const int i = tid + it * THREADS;
            if (BN * 4 % THREADS != 0 && i >= BN * 4) break;
            const int row = i >> 2, kk = k0 + (i & 3) * 16;
            const bool ok = n0 + row < k && kk < c;
            const signed char* src = ok ? w + (i64)(n0 + row) * c + kk : w;
            cp_async16(smem_addr(b_tiles + (stage * BN + row) * I8_LDS + (i & 3) * 16), src, ok ? 16 : 0);
        }
    };

    int acc[MI][NI][4] = {};
    int8_gemm_mainloop<MI, NI, BM, BN, STAGES>(acc, a_tiles, b_tiles, ktiles, wm, wn, lane, load);
    // Every warp is done with the tiles (and no copy is in flight): they take the staged output.
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();

    conv1x1_store<BM, BN, THREADS, INT8_OUT, STAGES * (BM + BN) * I8_LDS>(acc, (unsigned char*)pw_smem, wm, wn, g, t, m0, n0, m_total, c, k, scale,
                                                   bias, res, y, act, out_scale, y_stride);
}
#define CONV1X1_ARGS const signed char* x, const signed char* w, const float* scale, const float* bias, const half_t* res, \
    void* y, int m_total, int c, int k, int act, float out_scale, int x_stride, int y_stride
#define CONV1X1_PASS x, w, scale, bias, res, y, m_total, c, k, act, out_scale, x_stride, y_stride
// PointwiseKernel and POINTWISE_KERNELS in mod.rs mirror these: tiles of 128 x 64 pixels x channels
// (8 warps, 3 stages), 64 x 64 (4 warps, 4 stages: layers too small to give every multiprocessor
// two 128-pixel blocks) and 128 x 32 (4 warps: 32 channels or fewer).
#define CONV1X1(NAME, BM, BN, WARPS_M, WARPS_N, STAGES) \
    extern "C" __global__ void __launch_bounds__(WARPS_M * WARPS_N * 32) NAME##_i8(CONV1X1_ARGS) { conv1x1_int8<BM, BN, WARPS_M, WARPS_N, STAGES, true>(CONV1X1_PASS); } \
    extern "C" __global__ void __launch_bounds__(WARPS_M * WARPS_N * 32) NAME##_f16(CONV1X1_ARGS) { conv1x1_int8<BM, BN, WARPS_M, WARPS_N, STAGES, false>(CONV1X1_PASS); }
CONV1X1(conv1x1_int8_m128_n64, 128, 64, 4, 2, 3)
CONV1X1(conv1x1_int8_m64_n64, 64, 64, 2, 2, 4)
CONV1X1(conv1x1_int8_m128_n32, 128, 32, 4, 1, 3)

// ---- the stem: the first convolution, on tensor cores --------------------------------------------
// The first convolution reads the engine input (NCHW float32, 3 channels). Through cuDNN it takes
// a layout pass, then a convolution far below the memory rate (gelan-c, batch 8, H200: 0.17 ms at
// 15 TFLOP/s), and in INT8 engines a fake quantization before it and a quantization after it.
// This kernel does all of that in one pass over 3x3 filters of 3 input channels (YOLO's stem), as
// a GEMM of the 27 taps (padded to 32) on tensor cores: a block of 8 warps takes 128 consecutive
// output pixels, gathers their taps from the image into shared memory as fp16 (fake-quantized
// with in_scale > 0, as the Q/DQ pair in front of the layer says), multiplies them with the
// filter (fp16 [k][32], OIHW rows padded with zeros; mma.sync m16n8k16, float32 accumulation),
// adds the bias, applies the activation and stores fp16 NHWC, or int8 NHWC quantized with
// out_scale (INT8_OUT). The output tile is staged in shared memory: NHWC rows of consecutive
// pixels are one contiguous run, stored with 8-byte writes. k % 8 == 0, k <= STEM_MAX_CHANNELS.
// Measured (gelan-c, batch 8, H200, bench/stem-conv.sh): 0.115 ms in FP16 and 0.137 ms in INT8,
// where the unfused stem takes 0.23 and 0.30 ms; still far from the memory rate (0.04 GB in, 0.05-0.1
// GB out), so gathering and storing, not the tensor cores, are what is left to speed up. Before
// it, a thread per pixel computed the 27 x k products with float32 FMAs from a filter in shared
// memory: about as fast as the unfused stem, limited by the FMAs and the loads feeding them.
// The gather's instructions were most of what is left: with each half of it compiled apart (tap
// channels and offsets constant, one pointer per pixel), 0.105 -> 0.072 ms in FP16 and 0.126 ->
// 0.085 ms in INT8 (bench/results/gpu-stem-gather-h200-20261129T0257).
#define STEM_MAX_CHANNELS 64
#define STEM_TAPS 27
#define STEM_PIXELS 128
// Halves per shared-memory row of taps: 32 + 8 of padding keep the ldmatrix rows conflict free.
#define STEM_LDS 40
__device__ __forceinline__ void mma_f16(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Half PART of one output pixel's taps (0..13 or 14..27, with the padding taps 27..31 zero) into
// its row of halves: the image (NCHW float32, 3 channels) at rows iy0 + 0..2 and columns
// ix0 + 0..2 of image b, rounded to fp16 as the unfused path's layout pass stores it, and
// fake-quantized with in_scale > 0.
template <int PART>
__device__ __forceinline__ void stem_gather(const float* __restrict__ x, half_t* row, bool live, int b, int iy0,
                                            int ix0, int h, int w, float in_scale) {
    const long long plane = (long long)h * w;
    const float* base = x + (long long)b * 3 * plane + (long long)iy0 * w + ix0;
    if (PART == 1) *(unsigned long long*)&row[28] = 0ull;
#pragma unroll
    for (int j = 0; j < 14; j += 2) {
        unsigned pair = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            constexpr int T0 = PART * 14;
            const int t = T0 + j + e;
            float v = 0.0f;
            if (t < STEM_TAPS) {
                const int c = t / 9, r = (t / 3) % 3, s = t % 3;
                if (live && iy0 + r >= 0 && iy0 + r < h && ix0 + s >= 0 && ix0 + s < w) {
                    v = h2f(f2h(base[c * plane + r * w + s]));
                    if (in_scale > 0.0f) v = (float)quantize(v, in_scale) * in_scale;
                }
            }
            pair |= (unsigned)f2h(v) << (16 * e);
        }
        *(unsigned*)&row[PART * 14 + j] = pair;
    }
}
template <bool INT8_OUT>
__device__ void stem_conv3x3(const float* __restrict__ x, const half_t* __restrict__ filter,
                             const float* __restrict__ bias, void* __restrict__ y, int n, int h, int w,
                             int k, int oh, int ow, int sh, int sw, int ph, int pw, int act,
                             float in_scale, float out_scale) {
    constexpr int NI = STEM_MAX_CHANNELS / 8;
    constexpr int OUT_BYTES = INT8_OUT ? 1 : 2;
    __shared__ __align__(16) half_t taps[STEM_PIXELS * STEM_LDS];
    __shared__ __align__(16) half_t wts[STEM_MAX_CHANNELS * STEM_LDS];
    // Output rows padded by 16 bytes, so the epilogue's stores (8 pixels x 4 channel pairs per
    // warp instruction) spread over the banks instead of hitting 4 of them.
    __shared__ __align__(16) unsigned char out_tile[STEM_PIXELS * (STEM_MAX_CHANNELS * OUT_BYTES + 16)];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nt = k / 8;
    const int row_bytes = k * OUT_BYTES, tile_row = row_bytes + 16;
    // 32-bit pixel indices (the host checks that they fit): 64-bit division costs far more.
    const unsigned pixels = (unsigned)n * oh * ow;
    const unsigned p0 = blockIdx.x * STEM_PIXELS;

    // The filter: k rows of 32 halves (taps 27..31 are zero on the host).
    for (int i = tid; i < k * 4; i += blockDim.x) {
        const int row = i >> 2, part = i & 3;
        *(vec16*)&wts[row * STEM_LDS + part * 8] = ((const vec16*)filter)[row * 4 + part];
    }
    // Gather: two threads per pixel, taps 0..13 and 14..27 (27 is the zero padding; 28..31 are
    // zeroed here too), written as pairs of halves. A warp's threads share their half, so each
    // half is compiled apart: the taps' channels and offsets are constants there.
    {
        const int pix = tid & (STEM_PIXELS - 1);
        const unsigned p = p0 + pix;
        half_t* row = &taps[pix * STEM_LDS];
        const bool live = p < pixels;
        const unsigned q = live ? p / (unsigned)ow : 0;
        const int ox = live ? (int)(p - q * ow) : 0;
        const int oy = (int)(q % (unsigned)oh), b = (int)(q / (unsigned)oh);
        if (tid < STEM_PIXELS) stem_gather<0>(x, row, live, b, oy * sh - ph, ox * sw - pw, h, w, in_scale);
        else stem_gather<1>(x, row, live, b, oy * sh - ph, ox * sw - pw, h, w, in_scale);
    }
    __syncthreads();

    // Warp `warp` multiplies pixels 16 * warp .. + 16 with every channel: two k16 steps.
    const int lj = lane >> 3, lr = lane & 7, g = lane >> 2, t = lane & 3;
    float acc[NI][4];
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
    const unsigned as = smem_addr(taps), bs = smem_addr(wts);
#pragma unroll
    for (int kk = 0; kk < 64; kk += 32) {  // bytes: 16 halves per step
        unsigned af[4];
        ldmatrix_x4(af, as + ((warp * 16 + (lj & 1) * 8 + lr) * STEM_LDS) * 2 + kk + (lj >> 1) * 16);
#pragma unroll
        for (int j = 0; j < NI; j += 2) {
            if (j >= nt) break;
            unsigned b4[4];
            // Rows past k (an odd number of 8-channel groups) read the next rows of the buffer;
            // their products are never stored.
            ldmatrix_x4(b4, bs + ((j * 8 + (lj >> 1) * 8 + lr) * STEM_LDS) * 2 + kk + (lj & 1) * 16);
            mma_f16(acc[j], af, b4);
            if (j + 1 < nt) mma_f16(acc[j + 1], af, b4 + 2);
        }
    }

    // Epilogue into the staged tile: accumulator (j, e) is pixel g (+8 for e >= 2), channel
    // 8j + 2t (+1 for odd e).
    const float inv_out_scale = out_scale > 0.0f ? 1.0f / out_scale : 0.0f;
#pragma unroll
    for (int j = 0; j < NI; ++j) {
        if (j >= nt) break;
        const int ch = j * 8 + t * 2;
        const float b0 = bias ? bias[ch] : 0.0f, b1 = bias ? bias[ch + 1] : 0.0f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int pix = warp * 16 + g + half * 8;
            const float v0 = activate_fast(acc[j][half * 2] + b0, act);
            const float v1 = activate_fast(acc[j][half * 2 + 1] + b1, act);
            if (INT8_OUT) {
                const int q0 = quantize_fast(v0, inv_out_scale), q1 = quantize_fast(v1, inv_out_scale);
                *(unsigned short*)&out_tile[pix * tile_row + ch] = (unsigned short)((q0 & 0xff) | ((q1 & 0xff) << 8));
            } else {
                *(unsigned*)&out_tile[pix * tile_row + ch * 2] = (unsigned)f2h(v0) | ((unsigned)f2h(v1) << 16);
            }
        }
    }
    __syncthreads();
    // The tile's pixels are consecutive, so their NHWC rows are one run of bytes (whole 8-byte
    // words: k % 8 == 0).
    const unsigned live = pixels - p0 < STEM_PIXELS ? pixels - p0 : STEM_PIXELS;
    const int row_words = row_bytes / 8, words = (int)live * row_words;
    unsigned long long* dst = (unsigned long long*)((unsigned char*)y + (i64)p0 * row_bytes);
    for (int i = tid; i < words; i += blockDim.x) {
        const int pix = i / row_words;
        dst[i] = *(const unsigned long long*)&out_tile[pix * tile_row + (i - pix * row_words) * 8];
    }
}
#define STEM_ARGS const float* x, const half_t* filter, const float* bias, void* y, int n, int h, int w, int k, \
    int oh, int ow, int sh, int sw, int ph, int pw, int act, float in_scale, float out_scale
#define STEM_PASS x, filter, bias, y, n, h, w, k, oh, ow, sh, sw, ph, pw, act, in_scale, out_scale
extern "C" __global__ void stem_conv_f16(STEM_ARGS) { stem_conv3x3<false>(STEM_PASS); }
extern "C" __global__ void stem_conv_i8(STEM_ARGS) { stem_conv3x3<true>(STEM_PASS); }

// ---- thin 3x3 INT8 convolutions -----------------------------------------------------------------
// cuDNN's INT8 engines run GELAN's 3x3 layers of 32 channels (the first bottlenecks, at 160x160)
// far below the memory rate: 0.4 TB/s on an H200 at gelan-c batch 8, 0.034 ms each
// (bench/results/gpu-int8-variants-h200-20261128T1630), no faster than FP16. The implicit GEMM
// above fares worse on them (0.055-0.062 ms): it gathers each input pixel nine times and wastes
// half a 64-channel tile on 32 channels. This kernel computes TH x 16 output pixels with every
// output channel directly: the input tile with its 1-pixel halo and the whole filter (KRSC) sit in
// shared memory, and each of the 9 taps is a GEMM step whose A rows are the tile's pixels shifted
// by the tap (ldmatrix takes one row address per lane, so nothing is copied per tap). Blocks are
// persistent: each loads the filter once, then walks tiles, loading the next tile's halo while it
// computes this one. The epilogue is the implicit GEMM's, term for term (so both give the same
// bits), staged in shared memory so that each output pixel leaves as whole 16-byte stores. Input
// and output may be channel slices of wider tensors (concat views): pixel strides x_stride and
// y_stride, in elements, with 16-byte aligned slices.
// Measured on an H200, gelan-c batch 8 (bench/results/gpu-thin-int8-h200-20261128T1930): 0.021-
// 0.025 ms on the four 32-channel bottleneck layers, against cuDNN's 0.033-0.035. It loses to cuDNN
// on 64 channels (0.024 against 0.012 ms at 80x80, 0.060 against 0.035 at 160x160), not profiled
// yet; at 80x80 a tile of 128 pixels leaves about one tile per block, so probably nothing hides
// the loads of the 37 KB filter and the halo. A 1x1 form of
// it lost everywhere (0.018-0.068 ms against 0.013-0.051) and is not kept. The engine times it
// against cuDNN's fused graph per layer, like any other tactic.
#define THIN_TW 16
#define THIN_THREADS 128
template <int CIN, int COUT, int TH, bool INT8_OUT>
__device__ void conv3x3_thin(const signed char* __restrict__ x, const signed char* __restrict__ w,
                             const float* __restrict__ scale, const float* __restrict__ bias,
                             const half_t* __restrict__ res, void* __restrict__ y, int n_img, int h,
                             int wd, int act, float out_scale, int x_stride, int y_stride) {
    constexpr int MI = TH / 4;  // output rows per warp, one m16 tile (16 pixels) each
    constexpr int NI = COUT / 8;
    constexpr int HALO_W = THIN_TW + 2;
    constexpr int HALO_PIXELS = (TH + 2) * HALO_W;
    // Row strides in shared memory, 16 bytes past a multiple of 32 so that 8 consecutive rows
    // (one ldmatrix matrix) hit 8 different 16-byte bank groups.
    constexpr int XS = CIN + 16;
    constexpr int KG = 9 * CIN;
    constexpr int WS = KG + 16;
    constexpr int OUT_BYTES = INT8_OUT ? 1 : 2;
    constexpr int OS = COUT * OUT_BYTES + 16;
    constexpr int HALO_BYTES = HALO_PIXELS * XS;
    constexpr int STAGE_BYTES = TH * THIN_TW * OS;
    // Two tile buffers: one tile's halo is read, then its staged output written, while the next
    // tile's halo lands in the other.
    constexpr int A_BYTES = HALO_BYTES > STAGE_BYTES ? HALO_BYTES : STAGE_BYTES;
    extern __shared__ __align__(128) signed char thin_smem[];
    signed char* wt = thin_smem + 2 * A_BYTES;

    const int tiles_w = (wd + THIN_TW - 1) / THIN_TW, tiles_h = (h + TH - 1) / TH;
    const int tiles = n_img * tiles_w * tiles_h;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    constexpr int W_CHUNKS = COUT * KG / 16;
    for (int i = tid; i < W_CHUNKS; i += THIN_THREADS) {
        const int row = i / (KG / 16), part = i - row * (KG / 16);
        cp_async16(smem_addr(wt + row * WS + part * 16), w + (i64)i * 16, 16);
    }
    auto load_halo = [&](int tile, signed char* halo) {
        const int tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, img = tile / (tiles_w * tiles_h);
        const int oy0 = ty * TH, ox0 = tx * THIN_TW;
        constexpr int X_CHUNKS = HALO_PIXELS * (CIN / 16);
        for (int i = tid; i < X_CHUNKS; i += THIN_THREADS) {
            const int p = i / (CIN / 16), part = i - p * (CIN / 16);
            const int hy = p / HALO_W, hx = p - hy * HALO_W;
            const int iy = oy0 - 1 + hy, ix = ox0 - 1 + hx;
            const bool ok = iy >= 0 && iy < h && ix >= 0 && ix < wd;
            const signed char* src = ok ? x + (((i64)img * h + iy) * wd + ix) * x_stride + part * 16 : x;
            cp_async16(smem_addr(halo + p * XS + part * 16), src, ok ? 16 : 0);
        }
    };
    if (blockIdx.x < tiles) load_halo(blockIdx.x, thin_smem);
    asm volatile("cp.async.commit_group;\n" ::);

    const int lj = lane >> 3, lr = lane & 7, g = lane >> 2, t = lane & 3;
    const unsigned bs = smem_addr(wt);
    const float inv_out_scale = out_scale > 0.0f ? 1.0f / out_scale : 0.0f;
    int it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++it) {
        signed char* halo = thin_smem + (it & 1) * A_BYTES;
        if (tile + gridDim.x < tiles) load_halo(tile + gridDim.x, thin_smem + ((it + 1) & 1) * A_BYTES);
        // One group per tile (empty past the end): waiting for all but the newest leaves this
        // tile's halo (and, the first time, the filter) landed.
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();

        int acc[MI][NI][4] = {};
        // ldmatrix row addresses: lane l feeds row (l & 7) of matrix (l >> 3); A matrices 0-3
        // are pixels 0-7 / 8-15 of a row x bytes 0-15 / 16-31 of the k step, B the same for
        // channels.
        const unsigned hs = smem_addr(halo);
#pragma unroll
        for (int r = 0; r < 3; ++r) {
#pragma unroll
            for (int s = 0; s < 3; ++s) {
#pragma unroll
                for (int kc = 0; kc < CIN; kc += 32) {
                    unsigned af[MI][4];
#pragma unroll
                    for (int i = 0; i < MI; ++i) {
                        const int hp = (warp * MI + i + r) * HALO_W + (lj & 1) * 8 + lr + s;
                        ldmatrix_x4(af[i], hs + hp * XS + kc + (lj >> 1) * 16);
                    }
                    mma_s8_step<MI, NI>(acc, af, bs + ((lj >> 1) * 8 + lr) * WS + (r * 3 + s) * CIN + kc + (lj & 1) * 16, WS);
                }
            }
        }
        // Every warp is done with the halo: its buffer takes the staged output.
        __syncthreads();

        const int tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, img = tile / (tiles_w * tiles_h);
        const int oy0 = ty * TH, ox0 = tx * THIN_TW;
        unsigned char* stage = (unsigned char*)halo;
        // Accumulator (i, j, e) is pixel g (+8 for e >= 2) of tile row warp * MI + i, channel
        // 8j + 2t (+1 for odd e).
#pragma unroll
        for (int i = 0; i < MI; ++i) {
            const int oy = oy0 + warp * MI + i;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int pc = g + half * 8, ox = ox0 + pc;
                const bool live = oy < h && ox < wd;
                const i64 m = ((i64)img * h + oy) * wd + ox;
                const int pix = (warp * MI + i) * THIN_TW + pc;
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    const int n = j * 8 + t * 2;
                    float v[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float z = dequantize_acc((float)acc[i][j][half * 2 + e], scale[n + e], bias ? bias[n + e] : 0.0f);
                        z = activate_fast(z, act);
                        if (res && live) z += h2f(res[m * COUT + n + e]);
                        v[e] = z;
                    }
                    if (INT8_OUT) {
                        const int q0 = quantize_fast(v[0], inv_out_scale), q1 = quantize_fast(v[1], inv_out_scale);
                        *(unsigned short*)&stage[pix * OS + n] = (unsigned short)((q0 & 0xff) | ((q1 & 0xff) << 8));
                    } else {
                        *(unsigned*)&stage[pix * OS + n * 2] = (unsigned)f2h(v[0]) | ((unsigned)f2h(v[1]) << 16);
                    }
                }
            }
        }
        __syncthreads();
        // Each output pixel's channels leave as whole 16-byte chunks.
        constexpr int ROW_CHUNKS = COUT * OUT_BYTES / 16;
        for (int i = tid; i < TH * THIN_TW * ROW_CHUNKS; i += THIN_THREADS) {
            const int pix = i / ROW_CHUNKS, part = i - pix * ROW_CHUNKS;
            const int oy = oy0 + pix / THIN_TW, ox = ox0 + pix % THIN_TW;
            if (oy >= h || ox >= wd) continue;
            const i64 m = ((i64)img * h + oy) * wd + ox;
            *(uint4*)((unsigned char*)y + m * y_stride * OUT_BYTES + part * 16) = *(const uint4*)&stage[pix * OS + part * 16];
        }
        // The buffer is refilled two tiles on, by the prefetch of the next iteration.
        __syncthreads();
    }
}
#define THIN_ARGS const signed char* x, const signed char* w, const float* scale, const float* bias, const half_t* res, \
    void* y, int n_img, int h, int wd, int act, float out_scale, int x_stride, int y_stride
#define THIN_PASS x, w, scale, bias, res, y, n_img, h, wd, act, out_scale, x_stride, y_stride
// Shared memory: ThinKernel::shared_bytes in mod.rs mirrors 2 * A_BYTES + COUT * WS above;
// THIN_KERNELS there lists these.
#define THIN(CIN, COUT) \
    extern "C" __global__ void __launch_bounds__(THIN_THREADS) conv3x3_thin_c##CIN##_k##COUT##_i8(THIN_ARGS) { conv3x3_thin<CIN, COUT, 8, true>(THIN_PASS); } \
    extern "C" __global__ void __launch_bounds__(THIN_THREADS) conv3x3_thin_c##CIN##_k##COUT##_f16(THIN_ARGS) { conv3x3_thin<CIN, COUT, 8, false>(THIN_PASS); }
THIN(32, 32)
THIN(32, 64)
THIN(64, 32)
THIN(64, 64)
