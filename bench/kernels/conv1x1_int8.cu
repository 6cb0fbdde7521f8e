// Kernel-level benchmark of the 1x1 INT8 convolution (`conv1x1_int8` in runtime/src/cuda/kernels.cu)
// against Kestrel's implicit GEMM (`conv_int8`, the reference: both must give the same bytes) and a
// device-to-device copy of the layer's input (the memory rate), on the 1x1 layer shapes of gelan-c
// at 640, batch 8. Built and run by bench/conv1x1-int8.sh on the GPU machine (nvcc); prints one JSON
// object per layer and kernel. Random int8 data; times are CUDA-event means over repeated launches
// on the same buffers (like the engine's per-layer profile, so inputs may sit in L2).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <cuda_runtime.h>
#include "../../runtime/src/cuda/kernels.cu"

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

// Every tile shape the sweep tries: name, BM, BN, WARPS_M, WARPS_N, STAGES.
#define VARIANTS(X) \
    X(pw_m128_n128_w2x4_s3, 128, 128, 2, 4, 3) \
    X(pw_m128_n64_w4x2_s3, 128, 64, 4, 2, 3) \
    X(pw_m128_n64_w4x2_s4, 128, 64, 4, 2, 4) \
    X(pw_m64_n128_w2x4_s3, 64, 128, 2, 4, 3) \
    X(pw_m64_n64_w2x2_s3, 64, 64, 2, 2, 3) \
    X(pw_m64_n64_w2x2_s4, 64, 64, 2, 2, 4) \
    X(pw_m128_n32_w4x1_s3, 128, 32, 4, 1, 3) \
    X(pw_m256_n64_w4x2_s3, 256, 64, 4, 2, 3)

// Each variant as kernels.cu instantiates its own (CONV1X1).
#define DEFINE(NAME, BM, BN, WMS, WNS, ST) CONV1X1(NAME, BM, BN, WMS, WNS, ST)
VARIANTS(DEFINE)

typedef void (*Conv1x1)(CONV1X1_ARGS);
struct Variant { const char* name; Conv1x1 i8, f16; int bm, bn, threads, stages; };
#define ENTRY(NAME, BM, BN, WMS, WNS, ST) {#NAME, NAME##_i8, NAME##_f16, BM, BN, WMS * WNS * 32, ST},
static const Variant variants[] = { VARIANTS(ENTRY) };

__global__ void fill_i8(signed char* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        p[i] = (signed char)(h & 0xff);
    }
}

struct Layer { int m, c, k, count; };
// gelan-c, 640 px, batch 8: (pixels, input channels, output channels, layers of that shape).
static const Layer layers[] = {
    {204800, 256, 256, 1}, {204800, 128, 128, 1}, {204800, 64, 64, 2}, {204800, 64, 32, 4},
    {51200, 512, 512, 1}, {51200, 1024, 256, 1}, {51200, 512, 256, 1}, {51200, 256, 256, 1},
    {51200, 128, 128, 5}, {51200, 128, 64, 8}, {51200, 256, 80, 1},
    {12800, 1024, 512, 4}, {12800, 768, 512, 1}, {12800, 512, 512, 1}, {12800, 256, 256, 7},
    {12800, 256, 128, 12}, {12800, 128, 128, 1}, {12800, 256, 80, 1},
    {3200, 1024, 512, 4}, {3200, 512, 512, 1}, {3200, 512, 256, 1}, {3200, 256, 256, 6},
    {3200, 256, 128, 8}, {3200, 256, 80, 1},
};

template <typename F>
static float time_us(F launch, int reps) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a)); CHECK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) launch();
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms; CHECK(cudaEventElapsedTime(&ms, a, b));
    CHECK(cudaGetLastError());
    cudaEventDestroy(a); cudaEventDestroy(b);
    return ms * 1000.0f / reps;
}

int main(int argc, char** argv) {
    // Arguments: repetitions, then optionally one layer (index into `layers`) and a variant name
    // filter (for profiling one kernel under Nsight Compute).
    const int reps = argc > 1 ? atoi(argv[1]) : 50;
    const int only_layer = argc > 2 ? atoi(argv[2]) : -1;
    const char* only_variant = argc > 3 ? argv[3] : "";
    cudaDeviceProp prop; CHECK(cudaGetDeviceProperties(&prop, 0));
    const int sms = prop.multiProcessorCount;
    for (const Variant& v : variants) {
        int bytes = v.stages * (v.bm + v.bn) * I8_LDS;
        CHECK(cudaFuncSetAttribute(v.i8, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        CHECK(cudaFuncSetAttribute(v.f16, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    }
    typedef void (*Ref)(CONV_INT8_ARGS);
    Ref ref_big = conv_int8_m128_n64, ref_small = conv_int8_m64_n64;
    CHECK(cudaFuncSetAttribute(ref_big, cudaFuncAttributeMaxDynamicSharedMemorySize, I8_STAGES * 192 * I8_LDS));
    CHECK(cudaFuncSetAttribute(ref_small, cudaFuncAttributeMaxDynamicSharedMemorySize, I8_STAGES * 128 * I8_LDS));
    int failures = 0;
    for (int li = 0; li < (int)(sizeof(layers) / sizeof(layers[0])); ++li) {
        const Layer& L = layers[li];
        if (only_layer >= 0 && li != only_layer) continue;
        for (int int8_out = 1; int8_out >= 0; --int8_out) {
            const size_t xs = (size_t)L.m * L.c, ws = (size_t)L.k * L.c, ys = (size_t)L.m * L.k * (int8_out ? 1 : 2);
            signed char *x, *w; float *scale, *bias; void *y_ref, *y;
            CHECK(cudaMalloc(&x, xs)); CHECK(cudaMalloc(&w, ws));
            CHECK(cudaMalloc(&scale, L.k * 4)); CHECK(cudaMalloc(&bias, L.k * 4));
            CHECK(cudaMalloc(&y_ref, ys)); CHECK(cudaMalloc(&y, ys));
            fill_i8<<<1024, 256>>>(x, xs, 17u); fill_i8<<<256, 256>>>(w, ws, 91u);
            // Scales that put the accumulators around +-2 (uniform int8: std ~ 5500 sqrt(c)).
            std::vector<float> hs(L.k), hb(L.k);
            for (int i = 0; i < L.k; ++i) { hs[i] = (0.5f + (i % 7) * 0.1f) / (5500.0f * sqrtf((float)L.c)); hb[i] = ((i % 11) - 5) * 0.1f; }
            CHECK(cudaMemcpy(scale, hs.data(), L.k * 4, cudaMemcpyHostToDevice));
            CHECK(cudaMemcpy(bias, hb.data(), L.k * 4, cudaMemcpyHostToDevice));
            const float out_scale = int8_out ? 3.0f / 127.0f : 0.0f;
            const int act = 1;
            const bool big = (size_t)((L.m + 127) / 128) * ((L.k + 63) / 64) >= (size_t)(2 * sms);
            Ref ref = big ? ref_big : ref_small;
            const int rbm = big ? 128 : 64, rbn = 64;
            const int rblocks = ((L.m + rbm - 1) / rbm) * ((L.k + rbn - 1) / rbn);
            const int rsmem = I8_STAGES * (rbm + rbn) * I8_LDS;
            auto run_ref = [&]() {
                ref<<<rblocks, I8_THREADS, rsmem>>>(x, w, scale, bias, nullptr, (half_t*)y_ref, 1, L.m, 1, L.c, L.m, 1, L.k, 1, 1, 1, 1, 0, 0, 1, 1, act, L.k, 0, out_scale, 1);
            };
            float ref_us = time_us(run_ref, reps);
            float copy_us = time_us([&]() { CHECK(cudaMemcpyAsync(y, x, xs < ys ? xs : ys, cudaMemcpyDeviceToDevice)); }, reps);
            std::vector<unsigned char> want(ys), got(ys);
            CHECK(cudaMemcpy(want.data(), y_ref, ys, cudaMemcpyDeviceToHost));
            printf("{\"m\": %d, \"c\": %d, \"k\": %d, \"layers\": %d, \"int8_out\": %s, \"implicit_gemm_us\": %.2f, \"copy_us\": %.2f, \"variants\": {",
                   L.m, L.c, L.k, L.count, int8_out ? "true" : "false", ref_us, copy_us);
            bool first = true;
            for (const Variant& v : variants) {
                if (L.k < v.bn / 2) continue;  // mostly padding
                if (!strstr(v.name, only_variant)) continue;
                const int blocks = ((L.m + v.bm - 1) / v.bm) * ((L.k + v.bn - 1) / v.bn);
                const int smem = v.stages * (v.bm + v.bn) * I8_LDS;
                Conv1x1 f = int8_out ? v.i8 : v.f16;
                CHECK(cudaMemset(y, 0x55, ys));
                auto run = [&]() { f<<<blocks, v.threads, smem>>>(x, w, scale, bias, nullptr, y, L.m, L.c, L.k, act, out_scale, L.c, L.k); };
                float us = time_us(run, reps);
                CHECK(cudaMemcpy(got.data(), y, ys, cudaMemcpyDeviceToHost));
                size_t diff = 0;
                for (size_t i = 0; i < ys; ++i) diff += want[i] != got[i];
                if (diff) ++failures;
                printf("%s\"%s\": {\"us\": %.2f, \"differing_bytes\": %zu}", first ? "" : ", ", v.name, us, diff);
                first = false;
            }
            printf("}}\n");
            fflush(stdout);
            cudaFree(x); cudaFree(w); cudaFree(scale); cudaFree(bias); cudaFree(y_ref); cudaFree(y);
        }
    }
    fprintf(stderr, "%s: %d layer/kernel pairs differ from the implicit GEMM\n", prop.name, failures);
    return failures ? 1 : 0;
}
