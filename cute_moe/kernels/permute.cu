// Permute: copy each token's row of x to its k destination rows of an expert-contiguous row space
// (flat, block_m-padded or masked layout), optionally quantizing to fp8 e4m3 on the way. One warp
// per token: the row is read once and written k times. Work items past the tokens zero the padding
// rows of each expert segment so GEMMs read finite data.
//
// fp8 follows cute_moe.quant: scale = max(amax, 1e-10) / 448 over the token (MODE 1) or over each
// 1x128 group (MODE 2); q = x / scale (IEEE division), rounded to nearest even and saturated to
// +-448. MODE 1 scales are [rows]; MODE 2 scales are group-major: scale[slab][g][r % slab_rows] with
// slab = r / slab_rows ([G, rows] for one slab; [E, G, max_m] for the masked layout).
//
// Defines: X_DT, MODE (0 copy, 1 fp8 per-token, 2 fp8 1x128 groups), TOP_K (<= 32), VB (copy vector
// bytes: 16, 8, 4 or 2), PAD (0 none, 1 padded, 2 masked), WARPS, UNROLL.
#include "common.cuh"

#define FP8_MAX 448.0f
#define AMAX_EPS 1e-10f
#define FP8_GROUP 128
#define CHUNK 16  // elements per lane per step in the fp8 modes (one 16-byte fp8 store)

typedef Elem<X_DT> XE;

// max that propagates NaN (like torch's amax)
__device__ __forceinline__ float nanmax(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float fp8_scale(float amax) { return (amax < AMAX_EPS ? AMAX_EPS : amax) / FP8_MAX; }

// CHUNK elements of x starting at element c * CHUNK of row `src` as floats (zeros if c >= nchunk).
__device__ __forceinline__ void load_chunk(const char* __restrict__ src, int c, int nchunk, float* f) {
    constexpr int PER = 16 / XE::SIZE;  // elements per 16-byte load
    if (c < nchunk) {
        const uint4* p = (const uint4*)(src + (i64)c * CHUNK * XE::SIZE);
#pragma unroll
        for (int i = 0; i < CHUNK / PER; ++i) VecIO<X_DT, 16>::unpack(p[i], f + i * PER);
    } else {
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) f[i] = 0.f;
    }
}

__device__ __forceinline__ uint4 quantize_chunk(const float* f, float scale) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 lo = f32x2_to_e4m3x2(f[4 * i] / scale, f[4 * i + 1] / scale);
        const u32 hi = f32x2_to_e4m3x2(f[4 * i + 2] / scale, f[4 * i + 3] / scale);
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ i64 group_scale_index(int r, int g, int num_groups, int slab_rows) {
    const int slab = r / slab_rows;
    return ((i64)slab * num_groups + g) * slab_rows + (r - slab * slab_rows);
}

__device__ __forceinline__ void permute_token(const char* __restrict__ src, const int* dst, int hidden,
                                              char* __restrict__ out, float* __restrict__ scale, int slab_rows) {
    const int lane = threadIdx.x & 31;
#if MODE == 0
    typedef typename RawVec<VB>::T R;
    const i64 row_bytes = (i64)hidden * XE::SIZE;
    const int nv = (int)(row_bytes / VB);
    const R* s = (const R*)src;
    for (int v0 = lane; v0 < nv; v0 += 32 * UNROLL) {
        R buf[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int v = v0 + u * 32;
            buf[u] = v < nv ? s[v] : zero_raw<R>();
        }
#pragma unroll
        for (int j = 0; j < TOP_K; ++j) {
            if (dst[j] < 0) continue;
            R* d = (R*)(out + (i64)dst[j] * row_bytes);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                if (v0 + u * 32 < nv) d[v0 + u * 32] = buf[u];
        }
    }
#else
    const int nchunk = hidden / CHUNK;
#if MODE == 1
    float amax = 0.f;
    for (int c0 = 0; c0 < nchunk; c0 += 32) {
        float f[CHUNK];
        load_chunk(src, c0 + lane, nchunk, f);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) amax = nanmax(amax, fabsf(f[i]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = nanmax(amax, __shfl_xor_sync(FULL_MASK, amax, o));
    const float tok_scale = fp8_scale(amax);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < TOP_K; ++j)
            if (dst[j] >= 0) scale[dst[j]] = tok_scale;
    }
#else
    const int num_groups = (hidden + FP8_GROUP - 1) / FP8_GROUP;
#endif
    for (int c0 = 0; c0 < nchunk; c0 += 32) {  // warp-uniform: MODE 2 shuffles inside
        const int c = c0 + lane;
        float f[CHUNK];
        load_chunk(src, c, nchunk, f);
#if MODE == 1
        const float sc = tok_scale;
#else
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) amax = nanmax(amax, fabsf(f[i]));
#pragma unroll
        for (int o = 1; o < FP8_GROUP / CHUNK; o <<= 1) amax = nanmax(amax, __shfl_xor_sync(FULL_MASK, amax, o));
        const float sc = fp8_scale(amax);
#endif
        if (c < nchunk) {
            const uint4 q = quantize_chunk(f, sc);
#pragma unroll
            for (int j = 0; j < TOP_K; ++j) {
                if (dst[j] < 0) continue;
                ((uint4*)(out + (i64)dst[j] * hidden))[c] = q;
#if MODE == 2
                if ((c & (FP8_GROUP / CHUNK - 1)) == 0)
                    scale[group_scale_index(dst[j], c / (FP8_GROUP / CHUNK), num_groups, slab_rows)] = sc;
#endif
            }
        }
    }
#endif
}

__device__ __forceinline__ void zero_row(int r, int hidden, char* __restrict__ out, float* __restrict__ scale,
                                         int slab_rows) {
    const int lane = threadIdx.x & 31;
#if MODE == 0
    typedef typename RawVec<VB>::T R;
    const i64 row_bytes = (i64)hidden * XE::SIZE;
    const int nv = (int)(row_bytes / VB);
    R* d = (R*)(out + (i64)r * row_bytes);
    for (int v = lane; v < nv; v += 32) d[v] = zero_raw<R>();
#else
    uint4* d = (uint4*)(out + (i64)r * hidden);
    for (int c = lane; c < hidden / CHUNK; c += 32) d[c] = make_uint4(0u, 0u, 0u, 0u);
#if MODE == 1
    if (lane == 0) scale[r] = 0.f;
#else
    const int num_groups = (hidden + FP8_GROUP - 1) / FP8_GROUP;
    for (int g = lane; g < num_groups; g += 32) scale[group_scale_index(r, g, num_groups, slab_rows)] = 0.f;
#endif
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
permute_rows(const void* __restrict__ x, i64 x_row_bytes, int num_tokens, int hidden,
             const int* __restrict__ dest_rows, void* __restrict__ out, float* __restrict__ scale, int slab_rows,
             int num_pad_items, int pad_per_expert, const int* __restrict__ pad_base,
             const int* __restrict__ pad_count, int max_m, int pad_multiple) {
    const int lane = threadIdx.x & 31;
    const int items = num_tokens + num_pad_items;
    for (int item = blockIdx.x * WARPS + (threadIdx.x >> 5); item < items; item += gridDim.x * WARPS) {
        if (item < num_tokens) {
            const int my_dst = lane < TOP_K ? dest_rows[(i64)item * TOP_K + lane] : -1;
            int dst[TOP_K];
#pragma unroll
            for (int j = 0; j < TOP_K; ++j) dst[j] = __shfl_sync(FULL_MASK, my_dst, j);
            permute_token((const char*)x + (i64)item * x_row_bytes, dst, hidden, (char*)out, scale, slab_rows);
        } else {
#if PAD != 0
            const int q = item - num_tokens;
            const int e = q / pad_per_expert;
            const int i = q - e * pad_per_expert;
#if PAD == 1
            const int r = pad_base[e] + pad_count[e] + i;  // padded: rows after the expert's tokens
            const int stop = pad_base[e + 1];
#else
            const int c = pad_count[e];  // masked: up to the next multiple of pad_multiple
            const int r = e * max_m + c + i;
            const int stop = e * max_m + min((c + pad_multiple - 1) / pad_multiple * pad_multiple, max_m);
#endif
            if (r < stop) zero_row(r, hidden, (char*)out, scale, slab_rows);
#endif
        }
    }
}
