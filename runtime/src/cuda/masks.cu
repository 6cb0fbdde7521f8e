// Kestrel's GPU instance masks: coefficients x prototypes (one GEMM row per detection), sigmoid,
// bilinear sampling at each source pixel's centre, crop to the box, threshold 0.5; written as
// full-frame bitmaps or as COCO run-length encodings computed here, so only the runs travel.
// Compiled with --fmad=false: every value is what masks.rs computes, in the same order (the
// exponential may differ from the host's in the last bit).

typedef long long i64;

#define GRID_LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)
#define COEFFICIENTS 32
// Per detection, DET_INTS ints: image, frame width, height, box columns x0 x1 and rows y0 y1
// (half-open), x-tap offset, y-tap offset (in taps).
#define DET_INTS 9
#define RLE_THREADS 256

struct Tap { unsigned int i0, i1; float w; };

// Row d of the batched GEMM: sigmoid(coefficients[d] . prototypes[image(d)]) at every cell.
extern "C" __global__ void mask_cells(const float* protos, int plane, const int* dets,
                                      const float* coef, int n, float* cells) {
    GRID_LOOP(i, (i64)n * plane) {
        int d = (int)(i / plane);
        int p = (int)(i % plane);
        const float* proto = protos + (i64)dets[d * DET_INTS] * COEFFICIENTS * plane + p;
        const float* c = coef + d * COEFFICIENTS;
        float z = 0.0f;
        for (int k = 0; k < COEFFICIENTS; ++k) z += c[k] * proto[(i64)k * plane];
        cells[i] = 1.0f / (1.0f + expf(-z));
    }
}

// masks.rs `blend`.
__device__ __forceinline__ float blend(float v00, float v01, float v10, float v11, float wx, float wy) {
    float top = v00 + (v01 - v00) * wx;
    float bottom = v10 + (v11 - v10) * wx;
    return top + (bottom - top) * wy;
}

// The mask bit of source pixel (x, y) of detection d.
__device__ __forceinline__ unsigned char mask_bit(const float* cells, int plane, int pw, const int* d,
                                                   const Tap* taps, int x, int y, int det) {
    if (x < d[3] || x >= d[4] || y < d[5] || y >= d[6]) return 0;
    Tap tx = taps[d[7] + x], ty = taps[d[8] + y];
    const float* m = cells + (i64)det * plane;
    float v = blend(m[ty.i0 * pw + tx.i0], m[ty.i0 * pw + tx.i1], m[ty.i1 * pw + tx.i0], m[ty.i1 * pw + tx.i1], tx.w, ty.w);
    return v > 0.5f ? 1 : 0;
}

// Full-frame bitmaps: blockIdx.y is the detection, 4 pixels a thread (one 32-bit store where
// the 4 share the word; each bitmap starts 4-byte aligned).
extern "C" __global__ void mask_bitmaps(const float* cells, int plane, int pw, const int* dets,
                                        const Tap* taps, const i64* offsets, unsigned char* out) {
    int det = blockIdx.y;
    const int* d = dets + det * DET_INTS;
    int w = d[1];
    i64 pixels = (i64)w * d[2];
    unsigned char* o = out + offsets[det];
    GRID_LOOP(t, (pixels + 3) / 4) {
        i64 i = t * 4;
        int y = (int)(i / w), x = (int)(i % w);
        unsigned char b[4];
        for (int k = 0; k < 4; ++k) {
            b[k] = i + k < pixels ? mask_bit(cells, plane, pw, d, taps, x, y, det) : 0;
            if (++x == w) { x = 0; ++y; }
        }
        if (i + 4 <= pixels) {
            *(unsigned int*)(o + i) = b[0] | (b[1] << 8) | (b[2] << 16) | ((unsigned int)b[3] << 24);
        } else {
            for (int k = 0; i + k < pixels; ++k) o[i + k] = b[k];
        }
    }
}

// Changes of the column-major bit sequence in column x: positions x * h + y where the bit differs
// from the one before it (the previous column's last for y = 0). Only rows around the box can
// change. With `runs` null, counts them and returns the last position in *last; otherwise writes
// the run lengths ending at each change, from `prev`, into runs[0..].
__device__ int column_changes(const float* cells, int plane, int pw, const int* d, const Tap* taps,
                              int det, int x, i64* last, unsigned int* runs, i64 prev) {
    int h = d[2];
    int y_end = min(d[6] + 1, h);
    int count = 0;
    unsigned char before = x > 0 ? mask_bit(cells, plane, pw, d, taps, x - 1, h - 1, det) : 0;
    // Row 0 against the previous column, then the box rows and the row after the box.
    int y = 0;
    while (y < y_end) {
        unsigned char bit = mask_bit(cells, plane, pw, d, taps, x, y, det);
        if (bit != before) {
            i64 pos = (i64)x * h + y;
            if (runs) runs[count] = (unsigned int)(pos - prev);
            prev = pos;
            ++count;
        }
        before = bit;
        if (y == 0 && d[5] > 1) {
            // Rows 1 .. y0 - 1 are outside the box: all 0, and row y0 - 1 is the one before y0.
            before = 0;
            y = d[5];
        } else {
            ++y;
        }
    }
    *last = prev;
    return count;
}

// COCO RLE of each detection's mask: one block per detection walks the columns that can change
// in chunks of RLE_THREADS, a thread a column: count the changes, scan the counts (and the last
// change position) across the block, then write the runs at their offsets. runs[offsets[det]..]
// has room for capacity[det] runs; counts[det] receives the number written (or 0xffffffff when
// the room was short, which the host reports).
extern "C" __global__ void mask_rle(const float* cells, int plane, int pw, const int* dets,
                                    const Tap* taps, const i64* offsets, const unsigned int* capacity,
                                    unsigned int* runs, unsigned int* counts) {
    __shared__ unsigned int scan[RLE_THREADS];
    __shared__ i64 lasts[RLE_THREADS];
    __shared__ unsigned int carry_count;
    __shared__ i64 carry_last;
    __shared__ int overflow;
    int det = blockIdx.x;
    const int* d = dets + det * DET_INTS;
    int w = d[1], h = d[2];
    int t = threadIdx.x;
    unsigned int room = capacity[det];
    unsigned int* out = runs + offsets[det];
    if (t == 0) { carry_count = 0; carry_last = 0; overflow = 0; }
    // Columns x0 .. x1 (the one after the box can change at row 0); none for an empty box.
    int x_begin = d[3], x_end = d[4] > d[3] && d[6] > d[5] ? min(d[4] + 1, w) : d[3];
    __syncthreads();
    for (int base = x_begin; base < x_end; base += RLE_THREADS) {
        int x = base + t;
        i64 last = -1;
        unsigned int n = 0;
        if (x < x_end) {
            i64 l;
            n = (unsigned int)column_changes(cells, plane, pw, d, taps, det, x, &l, 0, -1);
            last = l;
        }
        scan[t] = n;
        lasts[t] = last;
        __syncthreads();
        // Inclusive scans: sum of counts, latest change position.
        for (int s = 1; s < RLE_THREADS; s <<= 1) {
            unsigned int a = t >= s ? scan[t - s] : 0;
            i64 b = t >= s ? lasts[t - s] : -1;
            __syncthreads();
            scan[t] += a;
            if (b > lasts[t]) lasts[t] = b;
            __syncthreads();
        }
        unsigned int first = carry_count + scan[t] - n;
        i64 prev = t > 0 && lasts[t - 1] >= 0 ? lasts[t - 1] : carry_last;
        if (n > 0) {
            if (first + n > room) {
                overflow = 1;
            } else {
                i64 l;
                column_changes(cells, plane, pw, d, taps, det, x, &l, out + first, prev);
            }
        }
        __syncthreads();
        if (t == 0) {
            carry_count += scan[RLE_THREADS - 1];
            if (lasts[RLE_THREADS - 1] >= 0) carry_last = lasts[RLE_THREADS - 1];
        }
        __syncthreads();
    }
    if (t == 0) {
        // The final run, to the end of the frame.
        if (overflow || carry_count + 1 > room) {
            counts[det] = 0xffffffffu;
        } else {
            out[carry_count] = (unsigned int)((i64)w * h - carry_last);
            counts[det] = carry_count + 1;
        }
    }
}

// Runs of every detection back to back: packed[packed_offsets[d] ..] = runs[offsets[d] ..].
extern "C" __global__ void mask_pack(const unsigned int* runs, const i64* offsets,
                                     const i64* packed_offsets, int n, unsigned int* packed) {
    GRID_LOOP(i, packed_offsets[n]) {
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (packed_offsets[mid] <= i) lo = mid; else hi = mid - 1;
        }
        packed[i] = runs[offsets[lo] + (i - packed_offsets[lo])];
    }
}

// Each detection's mask coefficients from a raw head on the device ([images, channels, anchors],
// the coefficients in rows first_row ..): src holds (image, anchor) per detection.
extern "C" __global__ void mask_gather(const float* head, int channels, int anchors, int first_row,
                                       const int* src, int n, float* coef) {
    GRID_LOOP(i, (i64)n * COEFFICIENTS) {
        int d = (int)(i / COEFFICIENTS), k = (int)(i % COEFFICIENTS);
        coef[i] = head[((i64)src[2 * d] * channels + first_row + k) * anchors + src[2 * d + 1]];
    }
}
