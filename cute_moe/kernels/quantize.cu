// Quantize the rows of a [M, K] matrix to fp8 e4m3 in place order (row r -> row r), e.g. GEMM1's
// activated output before GEMM2, with cute_moe.quant semantics (helpers in common.cuh). One warp per
// row, 16-byte loads and stores, no host sync. Only rows r < n = min(M, *count) are read and written
// (count may be null: n = M), so rows past the routed data (flat rows past cu_seqlens[E]) are skipped.
//
// quantize_rows, by MODE:
//   1: one scale per row, scale [M];
//   2: one scale per 1x128 group, group-major scale [ceil(K/128), M];
//   3: one scale for all n rows: reads their amax from scale[0] (amax_rows, launched before) and block
//      0 writes the scale to scale[1].
// amax_rows: scale[0] = max(scale[0], max |x| over the n rows) with NaN winning; scale[0] must start at 0.
//
// Defines: X_DT (input dtype), MODE (1, 2 or 3), WARPS. K must be a multiple of 16 and rows 16-byte
// aligned.
#include "common.cuh"

__device__ __forceinline__ int row_limit(int rows, const int* __restrict__ count) {
    return count == nullptr ? rows : min(rows, max(*count, 0));
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
amax_rows(const void* __restrict__ x, i64 x_row_bytes, int rows, int cols, const int* __restrict__ count,
          float* __restrict__ scale) {
    PDL_ENTER();
    __shared__ float warp_amax[WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = row_limit(rows, count);
    const int nchunk = cols / FP8_CHUNK;
    float amax = 0.f;
    for (int r = blockIdx.x * WARPS + warp; r < n; r += gridDim.x * WARPS)
        amax = nanmax(amax, lane_row_amax<X_DT>((const char*)x + (i64)r * x_row_bytes, lane, nchunk));
    amax = warp_max(amax);
    if (lane == 0) warp_amax[warp] = amax;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < WARPS; ++w) amax = nanmax(amax, warp_amax[w]);
        if (amax != 0.f) atomic_max_abs(scale, amax);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
quantize_rows(const void* __restrict__ x, i64 x_row_bytes, int rows, int cols, const int* __restrict__ count,
              u8* __restrict__ out, float* __restrict__ scale) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int n = row_limit(rows, count);
    const int nchunk = cols / FP8_CHUNK;
#if MODE == 3
    const float tensor_scale = fp8_scale(scale[0]);
    if (blockIdx.x == 0 && threadIdx.x == 0) scale[1] = tensor_scale;
#endif
    for (int r = blockIdx.x * WARPS + (threadIdx.x >> 5); r < n; r += gridDim.x * WARPS) {
        const char* src = (const char*)x + (i64)r * x_row_bytes;
        uint4* dst = (uint4*)(out + (i64)r * cols);
#if MODE == 1
        const float row_scale = fp8_scale(warp_max(lane_row_amax<X_DT>(src, lane, nchunk)));
        if (lane == 0) scale[r] = row_scale;
#endif
        for (int c0 = 0; c0 < nchunk; c0 += 32) {  // warp-uniform: MODE 2 shuffles inside
            const int c = c0 + lane;
            float f[FP8_CHUNK];
            load_chunk<X_DT>(src, c, nchunk, f);
#if MODE == 1
            const float sc = row_scale;
#elif MODE == 2
            const float sc = fp8_scale(group_max(chunk_amax(f)));
            if (c < nchunk && (c & (FP8_GROUP / FP8_CHUNK - 1)) == 0)
                scale[(i64)(c / (FP8_GROUP / FP8_CHUNK)) * rows + r] = sc;
#else
            const float sc = tensor_scale;
#endif
            if (c < nchunk) dst[c] = quantize_chunk(f, sc);
        }
    }
}
