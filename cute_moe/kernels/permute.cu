// Permute: copy each token's row of x to its k destination rows of an expert-contiguous row space
// (flat, block_m-padded or masked layout), optionally quantizing to fp8 e4m3 on the way. One warp
// per (token, row segment): the row is read once and written k times. Copies (MODE 0) cut rows into
// `segs` segments of whole UNROLL*32-vector steps so that few tokens (decode) still spread over many
// warps; fp8 modes take segs = 1. Work items past the tokens zero the padding rows of each expert
// segment so GEMMs read finite data.
//
// fp8 follows cute_moe.quant (helpers in common.cuh): scale = max(amax, 1e-10) / 448 over the token
// (MODE 1), over each 1x128 group (MODE 2) or over all of x (MODE 3); q = x / scale (IEEE division),
// rounded to nearest even and saturated to +-448. MODE 1 scales are [rows]; MODE 2 scales are
// group-major: scale[slab][g][r % slab_rows] with slab = r / slab_rows ([G, rows] for one slab;
// [E, G, max_m] for the masked layout). MODE 3 reads x's amax from scale[0] (computed beforehand by
// quantize.cu's amax_rows) and block 0 writes the scale to scale[1].
//
// Defines: X_DT, MODE (0 copy, 1 fp8 per-token, 2 fp8 1x128 groups, 3 fp8 per-tensor), TOP_K (<= 32),
// VB (copy vector bytes: 16, 8, 4 or 2), PAD (0 none, 1 padded, 2 masked), WARPS, UNROLL.
#include "common.cuh"

typedef Elem<X_DT> XE;
#define CHUNK FP8_CHUNK

__device__ __forceinline__ void permute_token(const char* __restrict__ src, const int* dst, int hidden,
                                              char* __restrict__ out, float* __restrict__ scale, int slab_rows,
                                              int seg, int segs) {
    const int lane = threadIdx.x & 31;
#if MODE == 0
    typedef typename RawVec<VB>::T R;
    const i64 row_bytes = (i64)hidden * XE::SIZE;
    const int total = (int)(row_bytes / VB);
    const int step = 32 * UNROLL;
    const int seg_len = (total + step * segs - 1) / (step * segs) * step;  // vectors per segment
    const int v_begin = seg * seg_len;
    const int nv = min(total, v_begin + seg_len);
    const R* s = (const R*)src;
    for (int v0 = v_begin + lane; v0 < nv; v0 += step) {
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
    const float tok_scale = fp8_scale(warp_max(lane_row_amax<X_DT>(src, lane, nchunk)));
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < TOP_K; ++j)
            if (dst[j] >= 0) scale[dst[j]] = tok_scale;
    }
#elif MODE == 2
    const int num_groups = (hidden + FP8_GROUP - 1) / FP8_GROUP;
#else
    const float tok_scale = fp8_scale(scale[0]);
#endif
    for (int c0 = 0; c0 < nchunk; c0 += 32) {  // warp-uniform: MODE 2 shuffles inside
        const int c = c0 + lane;
        float f[CHUNK];
        load_chunk<X_DT>(src, c, nchunk, f);
#if MODE == 2
        const float sc = fp8_scale(group_max(chunk_amax(f)));
#else
        const float sc = tok_scale;
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
#elif MODE == 2
    const int num_groups = (hidden + FP8_GROUP - 1) / FP8_GROUP;
    for (int g = lane; g < num_groups; g += 32) scale[group_scale_index(r, g, num_groups, slab_rows)] = 0.f;
#endif
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
permute_rows(const void* __restrict__ x, i64 x_row_bytes, int num_tokens, int hidden,
             const int* __restrict__ dest_rows, void* __restrict__ out, float* __restrict__ scale, int slab_rows,
             int num_pad_items, int pad_per_expert, const int* __restrict__ pad_base,
             const int* __restrict__ pad_count, int max_m, int pad_multiple, int segs) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int token_items = num_tokens * segs;
    const int items = token_items + num_pad_items;
#if MODE == 3
    if (blockIdx.x == 0 && threadIdx.x == 0) scale[1] = fp8_scale(scale[0]);
#endif
    for (int item = blockIdx.x * WARPS + (threadIdx.x >> 5); item < items; item += gridDim.x * WARPS) {
        if (item < token_items) {
            const int t = item / segs;
            const int my_dst = lane < TOP_K ? dest_rows[(i64)t * TOP_K + lane] : -1;
            int dst[TOP_K];
#pragma unroll
            for (int j = 0; j < TOP_K; ++j) dst[j] = __shfl_sync(FULL_MASK, my_dst, j);
            permute_token((const char*)x + (i64)t * x_row_bytes, dst, hidden, (char*)out, scale, slab_rows,
                          item - t * segs, segs);
        } else {
#if PAD != 0
            const int q = item - token_items;
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
