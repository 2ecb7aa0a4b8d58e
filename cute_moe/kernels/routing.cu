// Top-k routing: one warp per token. Semantics of cute_moe.reference.route_reference:
// scores = softmax or sigmoid of the logits in float32; selection = scores (+ correction bias);
// optional group limiting (contiguous groups scored by their max, or by the sum of their best two
// when a bias is given; only the TOPK_GROUPS best groups stay selectable); the TOP_K best
// selection values in descending order, ties to the lower index (NaN above everything); weights are
// the unbiased scores, renormalized over the k if RENORM, times the scaling factor.
//
// Defines: NUM_E (<= 1024), TOP_K (<= 32), LOGIT_DT, SCORING (0 softmax, 1 sigmoid), HAS_BIAS,
// BIAS_DT, NUM_GROUPS (0 = no groups, else <= 32 and divides NUM_E), TOPK_GROUPS, RENORM, WARPS.
#include "common.cuh"

#define VPT ((NUM_E + 31) / 32)  // experts per lane: expert v*32 + lane lives in slot v of that lane

// Order-preserving float -> u32 map (larger float, larger key). -0 == +0, NaN (any sign) maps to
// the maximum like torch's sort; 0 never comes from a float and marks "not selectable".
__device__ __forceinline__ u32 float_key(float f) {
    if (f != f) return 0xffffffffu;
    u32 b = __float_as_uint(f);
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
    if (k == 0xffffffffu) return __uint_as_float(0x7fffffffu);
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
route_topk(const void* __restrict__ logits_, i64 row_stride, const void* __restrict__ bias_, float scaling,
           float* __restrict__ out_w, int* __restrict__ out_ids, int num_tokens) {
    typedef Elem<LOGIT_DT> LE;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#if NUM_GROUPS > 0
    __shared__ u32 sel_s[WARPS][VPT * 32];
#endif
    const int t = blockIdx.x * WARPS + warp;
    if (t >= num_tokens) return;  // warp-uniform; the kernel has no block-level barrier

    const typename LE::T* row = (const typename LE::T*)logits_ + (i64)t * row_stride;
    float score[VPT];
    u32 key[VPT];

#pragma unroll
    for (int v = 0; v < VPT; ++v) {
        const int e = v * 32 + lane;
        score[v] = e < NUM_E ? LE::to_f32(row[e]) : neg_inf();
    }

#if SCORING == 0
    float m = neg_inf();
#pragma unroll
    for (int v = 0; v < VPT; ++v) m = fmaxf(m, score[v]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, o));
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
        if (v * 32 + lane < NUM_E) {
            score[v] = expf(score[v] - m);
            sum += score[v];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);  // same value in all lanes
#pragma unroll
    for (int v = 0; v < VPT; ++v) score[v] = score[v] / sum;
#else
#pragma unroll
    for (int v = 0; v < VPT; ++v) score[v] = 1.0f / (1.0f + expf(-score[v]));
#endif

#pragma unroll
    for (int v = 0; v < VPT; ++v) {
        const int e = v * 32 + lane;
        float s = score[v];
#if HAS_BIAS
        if (e < NUM_E) s += Elem<BIAS_DT>::to_f32(((const typename Elem<BIAS_DT>::T*)bias_)[e]);
#endif
        key[v] = e < NUM_E ? float_key(s) : 0u;
    }

#if NUM_GROUPS > 0
    {
        constexpr int GS = NUM_E / NUM_GROUPS;
#pragma unroll
        for (int v = 0; v < VPT; ++v) sel_s[warp][v * 32 + lane] = key[v];
        __syncwarp();
        u32 gkey = 0u;
        if (lane < NUM_GROUPS) {
            u32 k1 = 0u, k2 = 0u;  // best two selection keys of group `lane`
            for (int i = 0; i < GS; ++i) {
                const u32 kk = sel_s[warp][lane * GS + i];
                if (kk > k1) {
                    k2 = k1;
                    k1 = kk;
                } else if (kk > k2) {
                    k2 = kk;
                }
            }
#if HAS_BIAS
            gkey = GS >= 2 ? float_key(key_float(k1) + key_float(k2)) : k1;
#else
            gkey = k1;
#endif
        }
        bool kept = false;
#pragma unroll 1
        for (int g = 0; g < TOPK_GROUPS; ++g) {
            const u32 m = __reduce_max_sync(FULL_MASK, gkey);
            const u32 win = __reduce_min_sync(FULL_MASK, (gkey == m && lane < NUM_GROUPS) ? (u32)lane : 32u);
            if (lane == (int)win) {
                kept = true;
                gkey = 0u;
            }
        }
        const u32 keep_mask = __ballot_sync(FULL_MASK, kept);
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
            const int e = v * 32 + lane;
            if (e < NUM_E && !((keep_mask >> (e / GS)) & 1u)) key[v] = 0u;
        }
    }
#endif

    int my_id = 0;
    float my_w = 0.f;
#pragma unroll 1
    for (int j = 0; j < TOP_K; ++j) {
        u32 bk = 0u;
        int bv = 0;
        float bs = 0.f;
#pragma unroll
        for (int v = 0; v < VPT; ++v) {  // strict '>' keeps the lowest slot (= lowest index) on ties
            if (key[v] > bk) {
                bk = key[v];
                bv = v;
                bs = score[v];
            }
        }
        const u32 m = __reduce_max_sync(FULL_MASK, bk);
        const u32 win = __reduce_min_sync(FULL_MASK, bk == m ? (u32)(bv * 32 + lane) : 0xffffffffu);
        const int win_lane = (int)(win & 31u);
        const float ws = __shfl_sync(FULL_MASK, bs, win_lane);
        if (lane == win_lane) {
#pragma unroll
            for (int v = 0; v < VPT; ++v)
                if (v == bv) key[v] = 0u;
        }
        if (lane == j) {
            my_id = (int)win;
            my_w = ws;
        }
    }

#if RENORM
    float wsum = 0.f;
#pragma unroll
    for (int j = 0; j < TOP_K; ++j) wsum += __shfl_sync(FULL_MASK, my_w, j);
    my_w = my_w / wsum;
#endif
    my_w = my_w * scaling;
    if (lane < TOP_K) {
        out_w[(i64)t * TOP_K + lane] = my_w;
        out_ids[(i64)t * TOP_K + lane] = my_id;
    }
}
