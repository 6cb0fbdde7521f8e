// Kernel-level benchmark of the 1x1 INT8 convolution (`conv1x1_int8` in runtime/src/cuda/kernels.cu,
// and on Hopper the warpgroup-MMA experiment `conv1x1_int8_wgmma` below) against Kestrel's implicit
// GEMM (`conv_int8`, the reference: both must give the same bytes) and a device-to-device copy of
// the layer's input (the memory rate), on the 1x1 layer shapes of gelan-c at 640, batch 8. Built
// and run by bench/conv1x1-int8.sh on the GPU machine (nvcc); prints one JSON object per layer and
// kernel. Random int8 data; times are CUDA-event means over repeated launches on the same buffers
// (like the engine's per-layer profile, so inputs may sit in L2).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <cuda_runtime.h>
#include "../../runtime/src/cuda/kernels.cu"

// ---- An experiment: 1x1 INT8 convolutions on Hopper's warpgroup MMA ------------------------------
// mma.sync runs at a fraction of an H100/H200's INT8 tensor rate: the engine's 1x1 kernel reaches
// about 350 TOP/s on gelan-c's long reductions, where cuDNN's Hopper kernels reach 860. This is the
// same GEMM (rows: pixels, columns: output channels, reduction: input channels) with wgmma: two
// warpgroups each multiply 64 rows of a 128-row tile with BN filter rows, both operands read
// straight from shared memory. Each reduction tile is 128 channels of every row (one 128-byte
// swizzle atom per row, the layout wgmma's descriptors name); cp.async fills STAGES of them ahead,
// and the epilogue and stores are the engine's 1x1 kernel's (wgmma's accumulators sit in the
// threads as mma.sync's m16n8 ones do), so both give the same bits. Needs sm_90a; elsewhere the
// kernels are empty and the sweep skips them.
//
// Measured on an H200 (bench/results/gpu-wgmma-1x1-h200-20261129T0200): 0 differing bytes on every
// shape; faster than the mma.sync kernel on reductions of 256 channels or more (1024 -> 256 at
// 51200 pixels: 47 us against 65), but still slower than cuDNN's fused graph there (31 us), and
// ahead of cuDNN only on 204800 x 256 -> 256 (80.5 us against 83). So the engine does not use it.
// What cuDNN has and this lacks: TMA copies and mbarriers in place of cp.async and a block-wide
// barrier per reduction tile, a producer warp apart from the MMA warpgroups, and MMAs left in
// flight across tiles. A persistent form of this kernel (each block looping over tiles, copies
// running ahead across tile boundaries, one MMA batch in flight) was slower on every shape
// (1024 -> 256: 75 us). Nsight Compute put this one at 67 % of the SMs' issue rate with 50 %
// occupancy (204800 x 256 -> 256).
#define WG_BK 128
// The shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes, swizzled in
// 8-row (1024-byte) atoms: start address, stride between 8-row groups, 128-byte swizzle.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KESTREL_WGMMA 1
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs.
template <int NI>
__device__ __forceinline__ void wgmma_fence_operands(int (&d)[1][NI][4]) {
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[0][j][e])::"memory");
}
// d = a b (+ d where accumulate != 0).
__device__ __forceinline__ void wgmma_s8(int (&d)[1][8][4], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p;\n}\n"
        : "+r"(d[0][0][0]), "+r"(d[0][0][1]), "+r"(d[0][0][2]), "+r"(d[0][0][3]), "+r"(d[0][1][0]), "+r"(d[0][1][1]), "+r"(d[0][1][2]), "+r"(d[0][1][3]),
          "+r"(d[0][2][0]), "+r"(d[0][2][1]), "+r"(d[0][2][2]), "+r"(d[0][2][3]), "+r"(d[0][3][0]), "+r"(d[0][3][1]), "+r"(d[0][3][2]), "+r"(d[0][3][3]),
          "+r"(d[0][4][0]), "+r"(d[0][4][1]), "+r"(d[0][4][2]), "+r"(d[0][4][3]), "+r"(d[0][5][0]), "+r"(d[0][5][1]), "+r"(d[0][5][2]), "+r"(d[0][5][3]),
          "+r"(d[0][6][0]), "+r"(d[0][6][1]), "+r"(d[0][6][2]), "+r"(d[0][6][3]), "+r"(d[0][7][0]), "+r"(d[0][7][1]), "+r"(d[0][7][2]), "+r"(d[0][7][3])
        : "l"(a), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_s8(int (&d)[1][16][4], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p;\n}\n"
        : "+r"(d[0][0][0]), "+r"(d[0][0][1]), "+r"(d[0][0][2]), "+r"(d[0][0][3]), "+r"(d[0][1][0]), "+r"(d[0][1][1]), "+r"(d[0][1][2]), "+r"(d[0][1][3]),
          "+r"(d[0][2][0]), "+r"(d[0][2][1]), "+r"(d[0][2][2]), "+r"(d[0][2][3]), "+r"(d[0][3][0]), "+r"(d[0][3][1]), "+r"(d[0][3][2]), "+r"(d[0][3][3]),
          "+r"(d[0][4][0]), "+r"(d[0][4][1]), "+r"(d[0][4][2]), "+r"(d[0][4][3]), "+r"(d[0][5][0]), "+r"(d[0][5][1]), "+r"(d[0][5][2]), "+r"(d[0][5][3]),
          "+r"(d[0][6][0]), "+r"(d[0][6][1]), "+r"(d[0][6][2]), "+r"(d[0][6][3]), "+r"(d[0][7][0]), "+r"(d[0][7][1]), "+r"(d[0][7][2]), "+r"(d[0][7][3]),
          "+r"(d[0][8][0]), "+r"(d[0][8][1]), "+r"(d[0][8][2]), "+r"(d[0][8][3]), "+r"(d[0][9][0]), "+r"(d[0][9][1]), "+r"(d[0][9][2]), "+r"(d[0][9][3]),
          "+r"(d[0][10][0]), "+r"(d[0][10][1]), "+r"(d[0][10][2]), "+r"(d[0][10][3]), "+r"(d[0][11][0]), "+r"(d[0][11][1]), "+r"(d[0][11][2]), "+r"(d[0][11][3]),
          "+r"(d[0][12][0]), "+r"(d[0][12][1]), "+r"(d[0][12][2]), "+r"(d[0][12][3]), "+r"(d[0][13][0]), "+r"(d[0][13][1]), "+r"(d[0][13][2]), "+r"(d[0][13][3]),
          "+r"(d[0][14][0]), "+r"(d[0][14][1]), "+r"(d[0][14][2]), "+r"(d[0][14][3]), "+r"(d[0][15][0]), "+r"(d[0][15][1]), "+r"(d[0][15][2]), "+r"(d[0][15][3])
        : "l"(a), "l"(b), "r"(accumulate));
}
#endif

// A 128 x BN output tile per block of two warpgroups; STAGES - 1 reduction tiles are copied ahead
// while one is multiplied. Dynamic shared memory: STAGES x (128 + BN) x 128 bytes, plus 1024 to
// align the swizzle atoms (the staged output reuses the tiles).
template <int BN, int STAGES, bool INT8_OUT>
__device__ void conv1x1_int8_wgmma(const signed char* __restrict__ x, const signed char* __restrict__ w,
                                   const float* __restrict__ scale, const float* __restrict__ bias,
                                   const half_t* __restrict__ res, void* __restrict__ y, int m_total, int c,
                                   int k, int act, float out_scale, int x_stride, int y_stride) {
#ifdef KESTREL_WGMMA
    constexpr int BM = 128, THREADS = 256, NI = BN / 8;
    constexpr int A_BYTES = BM * WG_BK, STAGE_BYTES = (BM + BN) * WG_BK;
    extern __shared__ __align__(128) unsigned char wg_smem[];
    // Swizzle atoms start on 1024-byte boundaries (of the shared window's addresses).
    const unsigned raw = smem_addr(wg_smem);
    const unsigned base = (raw + 1023u) & ~1023u;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Channel tiles of one pixel tile are consecutive blocks: they read its input from L2 once.
    const int n_tiles = (k + BN - 1) / BN;
    const int m0 = (blockIdx.x / n_tiles) * BM, n0 = (blockIdx.x % n_tiles) * BN;
    const int ktiles = (c + WG_BK - 1) / WG_BK;
    // 16-byte chunk `part` of tile row `row` sits at chunk part ^ (row % 8) of the row: the
    // 128-byte swizzle, which spreads the MMAs' reads of 8 rows over all banks.
    auto load = [&](int kt, int stage) {
        const int k0 = kt * WG_BK;
        const unsigned a_base = base + stage * STAGE_BYTES, b_base = a_base + A_BYTES;
#pragma unroll
        for (int it = 0; it < BM * 8 / THREADS; ++it) {
            const int i = tid + it * THREADS, row = i >> 3, part = i & 7, kk = k0 + part * 16;
            const bool ok = m0 + row < m_total && kk < c;
            const signed char* src = ok ? x + (i64)(m0 + row) * x_stride + kk : x;
            cp_async16(a_base + row * WG_BK + ((part ^ (row & 7)) << 4), src, ok ? 16 : 0);
        }
#pragma unroll
        for (int it = 0; it < BN * 8 / THREADS; ++it) {
            const int i = tid + it * THREADS, row = i >> 3, part = i & 7, kk = k0 + part * 16;
            const bool ok = n0 + row < k && kk < c;
            const signed char* src = ok ? w + (i64)(n0 + row) * c + kk : w;
            cp_async16(b_base + row * WG_BK + ((part ^ (row & 7)) << 4), src, ok ? 16 : 0);
        }
    };

    int acc[1][NI][4];
    // Warpgroup wg multiplies tile rows 64 wg .. 64 wg + 63.
    const unsigned a_rows = (warp >> 2) * 64 * WG_BK;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ktiles) load(st, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        const int stage = kt % STAGES;
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        // The copies were writes of the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        // Tile kt has landed for every thread, and both warpgroups are done with tile kt - 1,
        // whose stage the prefetch below overwrites.
        __syncthreads();
        if (kt + STAGES - 1 < ktiles) load(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;\n" ::);
        const unsigned a_tile = base + stage * STAGE_BYTES + a_rows, b_tile = base + stage * STAGE_BYTES + A_BYTES;
        // The first MMA overwrites the accumulators instead of their being zeroed: no other
        // instruction touches them until the MMAs are done.
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK; kk += 32)
            wgmma_s8(acc, wgmma_desc(a_tile + kk), wgmma_desc(b_tile + kk), kt != 0 || kk != 0);
        wgmma_commit();
        wgmma_wait<0>();
    }
    wgmma_fence_operands(acc);
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    // Warp `warp` holds tile rows 16 warp .. 16 warp + 15, every column, in m16n8 fragments.
    conv1x1_store<BM, BN, THREADS, INT8_OUT, STAGES * STAGE_BYTES>(acc, (unsigned char*)wg_smem + (base - raw), warp * 16, 0, g, t, m0, n0,
                                                  m_total, c, k, scale, bias, res, y, act, out_scale, y_stride);
#endif
}
// 128 x BN tiles, STAGES reduction tiles of 128 channels.
#define CONV1X1_WGMMA(NAME, BN, STAGES) \
    extern "C" __global__ void __launch_bounds__(256) NAME##_i8(CONV1X1_ARGS) { conv1x1_int8_wgmma<BN, STAGES, true>(CONV1X1_PASS); } \
    extern "C" __global__ void __launch_bounds__(256) NAME##_f16(CONV1X1_ARGS) { conv1x1_int8_wgmma<BN, STAGES, false>(CONV1X1_PASS); }
CONV1X1_WGMMA(conv1x1_wgmma_n128_s2, 128, 2)
CONV1X1_WGMMA(conv1x1_wgmma_n128_s3, 128, 3)
CONV1X1_WGMMA(conv1x1_wgmma_n64_s2, 64, 2)
CONV1X1_WGMMA(conv1x1_wgmma_n64_s3, 64, 3)

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

// Every tile shape the sweep tries: name, BM, BN, WARPS_M, WARPS_N, STAGES.
#define VARIANTS(X) \
    X(pw_m128_n128_w2x4_s3, 128, 128, 2, 4, 3) \
    X(pw_m128_n64_w4x2_s3, 128, 64, 4, 2, 3) \
    X(pw_m64_n64_w2x2_s4, 64, 64, 2, 2, 4) \
    X(pw_m128_n32_w4x1_s3, 128, 32, 4, 1, 3)

// Each variant as kernels.cu instantiates its own (CONV1X1).
#define DEFINE(NAME, BM, BN, WMS, WNS, ST) CONV1X1(NAME, BM, BN, WMS, WNS, ST)
VARIANTS(DEFINE)

// The warpgroup-MMA kernels (sm_90a), as kernels.cu instantiates them: name, BN, STAGES.
#define WGMMA_VARIANTS(X) \
    X(conv1x1_wgmma_n128_s2, 128, 2) \
    X(conv1x1_wgmma_n128_s3, 128, 3) \
    X(conv1x1_wgmma_n64_s2, 64, 2) \
    X(conv1x1_wgmma_n64_s3, 64, 3)

typedef void (*Conv1x1)(CONV1X1_ARGS);
// smem: dynamic shared memory in bytes; wgmma: needs compute capability 9.0 (sm_90a).
struct Variant { const char* name; Conv1x1 i8, f16; int bm, bn, threads, smem; bool wgmma; };
#define ENTRY(NAME, BM, BN, WMS, WNS, ST) {#NAME, NAME##_i8, NAME##_f16, BM, BN, WMS * WNS * 32, ST * (BM + BN) * I8_LDS, false},
#define WGMMA_ENTRY(NAME, BN, ST) {#NAME, NAME##_i8, NAME##_f16, 128, BN, 256, ST * (128 + BN) * WG_BK + 1024, true},
static const Variant variants[] = { VARIANTS(ENTRY) WGMMA_VARIANTS(WGMMA_ENTRY) };

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
    const bool hopper = prop.major == 9;
    for (const Variant& v : variants) {
        if (v.wgmma && !hopper) continue;
        CHECK(cudaFuncSetAttribute(v.i8, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
        CHECK(cudaFuncSetAttribute(v.f16, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
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
                if (!strstr(v.name, only_variant) || (v.wgmma && !hopper)) continue;
                const int blocks = ((L.m + v.bm - 1) / v.bm) * ((L.k + v.bn - 1) / v.bn);
                const int smem = v.smem;
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
