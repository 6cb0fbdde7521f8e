// Kestrel's GPU letterbox: raw frames (RGB, BGR, RGBA, BGRx packed; NV12, I420 planar; any size
// and pitch) of a batch to the engine's input (NCHW or NHWC; float32, half or INT8) in one launch:
// bilinear resize keeping the aspect ratio (the CPU's sampling taps, computed on the host),
// centred, fill 114, scaled to [0, 1]. Compiled with --fmad=false: every pixel is what the CPU
// reference computes (frame.rs to RGB, then letterbox.rs, then InputTensor::encode), bit for bit.

typedef long long i64;

#define GRID_LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// One axis tap: the two source indices and the weight of the second.
struct Tap { unsigned int i0, i1; float w; };

// Per frame, FRAME_INTS ints: format, width, height, stride0, stride1, stride2, new_w, new_h,
// left, top, x-tap offset, y-tap offset. Formats: 0 RGB, 1 BGR, 2 RGBA, 3 BGRx, 4 NV12, 5 I420.
#define FRAME_INTS 12

__device__ __forceinline__ unsigned char clamp_u8(float v) {
    float r = roundf(v);
    return (unsigned char)fminf(fmaxf(r, 0.0f), 255.0f);
}

// YuvMatrix::yuv_to_rgb, the same float operations in the same order.
__device__ void yuv_to_rgb(float kr, float kb, int full_range, unsigned char Y, unsigned char U, unsigned char V, float* rgb) {
    float y, u, v;
    if (full_range) {
        y = (float)Y; u = (float)U - 128.0f; v = (float)V - 128.0f;
    } else {
        y = ((float)Y - 16.0f) * (255.0f / 219.0f);
        u = ((float)U - 128.0f) * (255.0f / 224.0f);
        v = ((float)V - 128.0f) * (255.0f / 224.0f);
    }
    float kg = 1.0f - kr - kb;
    float r = y + 2.0f * (1.0f - kr) * v;
    float b = y + 2.0f * (1.0f - kb) * u;
    float g = y - (2.0f * kb * (1.0f - kb) / kg) * u - (2.0f * kr * (1.0f - kr) / kg) * v;
    rgb[0] = (float)clamp_u8(r);
    rgb[1] = (float)clamp_u8(g);
    rgb[2] = (float)clamp_u8(b);
}

// The 8-bit RGB of source pixel (x, y).
__device__ void fetch(const i64* planes, const int* d, const float* yuv, int x, int y, float* rgb) {
    int format = d[0];
    if (format <= 3) {
        int size = format <= 1 ? 3 : 4;
        const unsigned char* p = (const unsigned char*)planes[0] + (i64)y * d[3] + (i64)x * size;
        bool bgr = format == 1 || format == 3;
        rgb[0] = (float)p[bgr ? 2 : 0];
        rgb[1] = (float)p[1];
        rgb[2] = (float)p[bgr ? 0 : 2];
        return;
    }
    unsigned char Y = *((const unsigned char*)planes[0] + (i64)y * d[3] + x), U, V;
    if (format == 4) {
        const unsigned char* c = (const unsigned char*)planes[1] + (i64)(y / 2) * d[4] + (x / 2) * 2;
        U = c[0]; V = c[1];
    } else {
        U = *((const unsigned char*)planes[1] + (i64)(y / 2) * d[4] + x / 2);
        V = *((const unsigned char*)planes[2] + (i64)(y / 2) * d[5] + x / 2);
    }
    yuv_to_rgb(yuv[0], yuv[1], (int)yuv[2], Y, U, V, rgb);
}

// Channel c of pixel p of image b in the engine's input: layout 0 NCHW, 1 NHWC; dtype 0 float32,
// 1 half (round to nearest even), 2 INT8 (round half to even of v / scale, saturated).
__device__ __forceinline__ void store(void* out, int layout, int dtype, float scale, i64 b, i64 plane,
                                      i64 p, int c, float v) {
    i64 i = layout == 0 ? (b * 3 + c) * plane + p : (b * plane + p) * 3 + c;
    if (dtype == 0) {
        ((float*)out)[i] = v;
    } else if (dtype == 1) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        ((unsigned short*)out)[i] = h;
    } else {
        float q = fminf(fmaxf(rintf(v / scale), -128.0f), 127.0f);
        ((signed char*)out)[i] = (signed char)q;
    }
}

// One thread per output pixel of the batch; writes its three channels.
extern "C" __global__ void letterbox_frames(const i64* planes, const int* desc,
                                            const float* yuv, const Tap* taps, void* out, int batch,
                                            int dst_w, int dst_h, int layout, int dtype, float scale) {
    i64 plane = (i64)dst_w * dst_h;
    GRID_LOOP(i, (i64)batch * plane) {
        int b = (int)(i / plane);
        i64 p = i % plane;
        int y = (int)(p / dst_w), x = (int)(p % dst_w);
        const int* d = desc + b * FRAME_INTS;
        int nw = d[6], nh = d[7], left = d[8], top = d[9];
        if (x < left || x >= left + nw || y < top || y >= top + nh) {
            float fill = 114.0f / 255.0f;
            for (int c = 0; c < 3; c++) store(out, layout, dtype, scale, b, plane, p, c, fill);
            continue;
        }
        Tap tx = taps[d[10] + (x - left)], ty = taps[d[11] + (y - top)];
        const i64* pl = planes + b * 3;
        const float* m = yuv + b * 3;
        float p00[3], p01[3], p10[3], p11[3];
        fetch(pl, d, m, tx.i0, ty.i0, p00);
        fetch(pl, d, m, tx.i1, ty.i0, p01);
        fetch(pl, d, m, tx.i0, ty.i1, p10);
        fetch(pl, d, m, tx.i1, ty.i1, p11);
        float wx = tx.w, wy = ty.w;
        for (int c = 0; c < 3; c++) {
            float t = p00[c] * (1.0f - wx) + p01[c] * wx;
            float u = p10[c] * (1.0f - wx) + p11[c] * wx;
            store(out, layout, dtype, scale, b, plane, p, c, (t * (1.0f - wy) + u * wy) * (1.0f / 255.0f));
        }
    }
}
