// Kestrel's GPU post-processing: YOLOv9 `output0` decoding and class-aware greedy NMS for a whole
// batch, computing exactly what the CPU reference (runtime/src/nms.rs) computes. Compiled by NVRTC
// with --fmad=false, so every float operation rounds as the Rust code's does and an IoU at a
// threshold compares the same way on both.
//
// Candidates are 64-bit sort keys: (bitwise NOT of the score's bits) << 32 | (anchor * nc + class).
// Scores are positive (> the confidence threshold >= 0), so ascending keys are descending scores,
// ties in (anchor, class) order: the CPU's stable sort order, hence deterministic results.

typedef long long i64;
typedef unsigned long long u64;

#define GRID_LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

struct Box { float x1, y1, x2, y2; };

// Not Inf or NaN (a bit test: no math header under NVRTC, and immune to compiler folding).
__device__ __forceinline__ bool finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

// BoxXyxy::from_xywh.
__device__ __forceinline__ Box from_xywh(float cx, float cy, float w, float h) {
    float hw = w / 2.0f, hh = h / 2.0f;
    Box b = {cx - hw, cy - hh, cx + hw, cy + hh};
    return b;
}

// BoxXyxy::area and BoxXyxy::iou (NaN for two empty boxes, which compares false).
__device__ __forceinline__ float area(Box b) { return fmaxf(b.x2 - b.x1, 0.0f) * fmaxf(b.y2 - b.y1, 0.0f); }
__device__ __forceinline__ float iou(Box a, Box b) {
    float w = fmaxf(fminf(a.x2, b.x2) - fmaxf(a.x1, b.x1), 0.0f);
    float h = fmaxf(fminf(a.y2, b.y2) - fmaxf(a.y1, b.y1), 0.0f);
    float inter = w * h;
    return inter / ((area(a) + area(b)) - inter);
}

// One image's head, float32 or IEEE half (`half`), read as float32.
struct Head { const void* p; int half; };
__device__ __forceinline__ Head image_head(const void* out, int half, i64 offset) {
    Head h = {half ? (const void*)((const unsigned short*)out + offset) : (const void*)((const float*)out + offset), half};
    return h;
}
__device__ __forceinline__ float at(Head h, i64 i) {
    if (!h.half) return ((const float*)h.p)[i];
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(((const unsigned short*)h.p)[i]));
    return f;
}

__device__ __forceinline__ Box anchor_box(Head o, int anchors, int a) {
    return from_xywh(at(o, a), at(o, anchors + a), at(o, 2 * anchors + a), at(o, 3 * anchors + a));
}

__device__ __forceinline__ void push(u64* keys, unsigned int* count, i64 capacity, float score, unsigned int index) {
    unsigned int slot = atomicAdd(count, 1u);
    if ((i64)slot < capacity) keys[slot] = ((u64)(~__float_as_uint(score)) << 32) | (u64)index;
}

// One thread per (image, anchor): the anchor's candidates (every class above `conf`, or the best
// class), appended to the image's key list. `out` is [batch, channels, anchors], float32 or half.
extern "C" __global__ void decode_candidates(const void* out, int half, int batch, int channels, int nc, int anchors,
                                             float conf, int multi_label, const unsigned char* allowed,
                                             u64* keys, i64 stride, unsigned int* counts) {
    GRID_LOOP(i, (i64)batch * anchors) {
        int b = (int)(i / anchors), a = (int)(i % anchors);
        Head o = image_head(out, half, (i64)b * channels * anchors);
        Box box = anchor_box(o, anchors, a);
        if (!(finite(box.x1) && finite(box.y1) && finite(box.x2) && finite(box.y2))) continue;
        u64* k = keys + (i64)b * stride;
        if (multi_label) {
            for (int c = 0; c < nc; c++) {
                float s = at(o, (i64)(4 + c) * anchors + a);
                if (finite(s) && s > conf && allowed[c]) push(k, counts + b, stride, s, (unsigned int)a * nc + c);
            }
        } else {
            int best = -1;
            float bs = 0.0f;
            for (int c = 0; c < nc; c++) {
                if (!allowed[c]) continue;
                float s = at(o, (i64)(4 + c) * anchors + a);
                if (finite(s) && (best < 0 || s > bs)) { best = c; bs = s; }
            }
            if (best >= 0 && bs > conf) push(k, counts + b, stride, bs, (unsigned int)a * nc + best);
        }
    }
}

// One compare-exchange step (distance j, block size k) of a bitonic sort of every image's first
// `len` keys (a power of two; the tail is padded with the largest key).
extern "C" __global__ void bitonic_step(u64* keys, i64 stride, int batch, i64 len, i64 j, i64 k) {
    GRID_LOOP(t, (i64)batch * (len / 2)) {
        int b = (int)(t / (len / 2));
        i64 r = t % (len / 2);
        // The r-th pair whose lower index has bit j clear.
        i64 i = ((r / j) * 2 * j) + (r % j);
        i64 l = i + j;
        u64* s = keys + (i64)b * stride;
        u64 x = s[i], y = s[l];
        bool ascending = (i & k) == 0;
        if ((x > y) == ascending) { s[i] = y; s[l] = x; }
    }
}

// The steps of one bitonic block size k whose distances fit in a tile of 2 * SORT_TILE keys,
// in shared memory: saves a launch and a global round trip per step.
#define SORT_TILE 1024
extern "C" __global__ void bitonic_tile(u64* keys, i64 stride, int batch, i64 len, i64 j_start, i64 k) {
    __shared__ u64 tile[2 * SORT_TILE];
    i64 tiles_per_image = len / (2 * SORT_TILE);
    for (i64 g = blockIdx.x; g < (i64)batch * tiles_per_image; g += gridDim.x) {
        int b = (int)(g / tiles_per_image);
        i64 base = (g % tiles_per_image) * 2 * SORT_TILE;
        u64* s = keys + (i64)b * stride + base;
        for (int e = threadIdx.x; e < 2 * SORT_TILE; e += blockDim.x) tile[e] = s[e];
        __syncthreads();
        for (i64 j = j_start; j > 0; j >>= 1) {
            for (int r = threadIdx.x; r < SORT_TILE; r += blockDim.x) {
                int i = (int)((r / j) * 2 * j + (r % j));
                int l = i + (int)j;
                u64 x = tile[i], y = tile[l];
                bool ascending = ((base + i) & k) == 0;
                if ((x > y) == ascending) { tile[i] = y; tile[l] = x; }
            }
            __syncthreads();
        }
        for (int e = threadIdx.x; e < 2 * SORT_TILE; e += blockDim.x) s[e] = tile[e];
        __syncthreads();
    }
}

// Greedy NMS, one block of NMS_CHUNK threads per image, over the image's sorted candidates in
// chunks of NMS_CHUNK: each thread tests its candidate against the boxes already kept and builds
// its row of the chunk's overlap bitmask; one thread then walks the chunk in order. Kept boxes go
// to [batch, slots] arrays (at most max_det per image), mapped to source pixels through the image's letterbox
// (left, top, scale_x, scale_y, width, height) and clipped, as the CPU Postprocessor does.
#define NMS_CHUNK 256
#define NMS_WORDS (NMS_CHUNK / 64)
extern "C" __global__ void __launch_bounds__(NMS_CHUNK) nms_greedy(
        const void* out, int half, int channels, int nc, int anchors, const u64* keys, i64 stride,
        const unsigned int* counts, int max_candidates, float iou_threshold, int agnostic, int max_det,
        int slots, const float* letterbox, float* kept_input_boxes, float* kept_boxes, float* kept_scores,
        int* kept_classes, int* kept_anchors, int* kept_count) {
    __shared__ Box boxes[NMS_CHUNK];
    __shared__ int classes[NMS_CHUNK];
    __shared__ unsigned int indices[NMS_CHUNK];
    __shared__ float scores[NMS_CHUNK];
    __shared__ unsigned char suppressed[NMS_CHUNK];
    __shared__ u64 rows[NMS_CHUNK][NMS_WORDS];
    __shared__ int kept;
    __shared__ int done;
    int b = blockIdx.x, t = threadIdx.x;
    Head o = image_head(out, half, (i64)b * channels * anchors);
    const u64* k = keys + (i64)b * stride;
    i64 n = counts[b];
    if (n > stride) n = stride;
    if (n > max_candidates) n = max_candidates;
    i64 slot0 = (i64)b * slots;
    const Box* kept_in = (const Box*)kept_input_boxes + slot0;
    if (t == 0) { kept = 0; done = 0; }
    __syncthreads();
    for (i64 base = 0; base < n && !done; base += NMS_CHUNK) {
        int m = (int)(n - base < NMS_CHUNK ? n - base : NMS_CHUNK);
        if (t < m) {
            u64 key = k[base + t];
            unsigned int index = (unsigned int)(key & 0xffffffffu);
            indices[t] = index;
            scores[t] = __uint_as_float(~(unsigned int)(key >> 32));
            classes[t] = (int)(index % (unsigned int)nc);
            boxes[t] = anchor_box(o, anchors, (int)(index / (unsigned int)nc));
        }
        __syncthreads();
        if (t < m) {
            Box me = boxes[t];
            unsigned char hit = 0;
            for (int q = 0; q < kept && !hit; q++) {
                if ((agnostic || kept_classes[slot0 + q] == classes[t]) && iou(kept_in[q], me) > iou_threshold) hit = 1;
            }
            suppressed[t] = hit;
            for (int w = 0; w < NMS_WORDS; w++) {
                u64 bits = 0;
                for (int r = 0; r < 64; r++) {
                    int j = w * 64 + r;
                    if (j > t && j < m && (agnostic || classes[j] == classes[t]) && iou(me, boxes[j]) > iou_threshold)
                        bits |= 1ull << r;
                }
                rows[t][w] = bits;
            }
        }
        __syncthreads();
        if (t == 0) {
            u64 removed[NMS_WORDS];
            for (int w = 0; w < NMS_WORDS; w++) removed[w] = 0;
            const float* lb = letterbox + (i64)b * 6;
            for (int i = 0; i < m; i++) {
                if (suppressed[i] || ((removed[i / 64] >> (i % 64)) & 1)) continue;
                i64 s = slot0 + kept;
                Box x = boxes[i];
                ((Box*)kept_input_boxes)[s] = x;
                // LetterboxParams::to_source then BoxXyxy::clip.
                float* d = kept_boxes + s * 4;
                d[0] = fminf(fmaxf((x.x1 - lb[0]) / lb[2], 0.0f), lb[4]);
                d[1] = fminf(fmaxf((x.y1 - lb[1]) / lb[3], 0.0f), lb[5]);
                d[2] = fminf(fmaxf((x.x2 - lb[0]) / lb[2], 0.0f), lb[4]);
                d[3] = fminf(fmaxf((x.y2 - lb[1]) / lb[3], 0.0f), lb[5]);
                kept_scores[s] = scores[i];
                kept_classes[s] = classes[i];
                kept_anchors[s] = (int)(indices[i] / (unsigned int)nc);
                kept++;
                if (kept >= max_det) { done = 1; break; }
                for (int w = 0; w < NMS_WORDS; w++) removed[w] |= rows[i][w];
            }
        }
        __syncthreads();
    }
    if (t == 0) kept_count[b] = kept;
}
