// Top-k selection of one token by one warp (route_token), shared by routing.cu and route_plan.cu.
// Semantics of cute_moe.reference.route_reference:
// scores = softmax or sigmoid of the logits in float32; selection = scores (+ correction bias);
// optional group limiting (contiguous groups scored by their max, or by the sum of their best two
// when a bias is given; only the TOPK_GROUPS best groups stay selectable); the TOP_K best
// selection values in descending order, ties to the lower index (NaN above everything); weights are
// the unbiased scores, renormalized over the k if RENORM, times the scaling factor.
//
// Defines: NUM_E (<= 1024), TOP_K (<= 32), LOGIT_DT, SCORING (0 softmax, 1 sigmoid), HAS_BIAS,
// BIAS_DT, NUM_GROUPS (0 = no groups, else <= 32 and divides NUM_E), TOPK_GROUPS, RENORM, WARPS.
//
// DeepSeek-V3's configuration (256 experts in 8 groups of 32, sigmoid) has its own selection,
// select_grouped256, with the same results bit for bit; everything else takes select_generic.
#pragma once
#include "common.cuh"

#define GROUPED256 (NUM_E == 256 && NUM_GROUPS == 8 && SCORING == 1)

// 16-byte load of a logits row: read-only global memory by default; a kernel that routes logits it
// keeps in shared memory (moe_decode.cu) defines it as a plain load.
#ifndef ROUTE_ROW_LOAD16
#define ROUTE_ROW_LOAD16(p) __ldg(p)
#endif

#define VPT ((NUM_E + 31) / 32)  // experts per lane: expert v*32 + lane lives in slot v of that lane
#define NP2 (VPT <= 1 ? 1 : VPT <= 2 ? 2 : VPT <= 4 ? 4 : VPT <= 8 ? 8 : VPT <= 16 ? 16 : 32)
#define LOG2_NP2 (NP2 == 1 ? 0 : NP2 == 2 ? 1 : NP2 == 4 ? 2 : NP2 == 8 ? 3 : NP2 == 16 ? 4 : 5)
#define KEEP (NP2 < TOP_K ? NP2 : TOP_K)  // a lane can win at most this many rounds
#if NUM_GROUPS > 0
#define GROUP_SIZE (NUM_E / NUM_GROUPS)
#endif

// Order-preserving float -> u32 map (larger float, larger key). -0 == +0, NaN (any sign) maps to
// the maximum like torch's sort; 0 never comes from a float and marks "not selectable".
__device__ __forceinline__ u32 float_key(float f) {
    const u32 b = __float_as_uint(f + 0.0f);  // -0 + 0 = +0; every other value unchanged
    return f != f ? 0xffffffffu : b ^ ((u32)((int)b >> 31) | 0x80000000u);  // negative: ~b, else b | sign
}

__device__ __forceinline__ float key_float(u32 k) {
    if (k == 0xffffffffu) return __uint_as_float(0x7fffffffu);
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Score of a logit: the same float32 expressions as torch's CUDA softmax / sigmoid kernels.
__device__ __forceinline__ float score_of(float x, float m, float sum) {
#if SCORING == 0
    return expf(x - m) / sum;
#else
    return 1.0f / (1.0f + expf(-x));
#endif
}

// Compare-and-swap putting the larger key first, the lower slot first among equal keys.
__device__ __forceinline__ void cas(u32& ka, int& sa, u32& kb, int& sb) {
    const bool swap = kb > ka || (kb == ka && sb < sa);
    const u32 k = swap ? kb : ka;
    const int s = swap ? sb : sa;
    kb = swap ? ka : kb;
    sb = swap ? sa : sb;
    ka = k;
    sa = s;
}

// Generic selection, one warp per token: expert v * 32 + lane lives in slot v of each lane.
// Returns the id of selection slot `lane` (lanes < TOP_K); sets the softmax max and denominator.
template <typename LE>
__device__ __forceinline__ int select_generic(const typename LE::T* __restrict__ row, const void* __restrict__ bias_,
                                             int lane, int warp, float& m_out, float& sum_out) {
#if NUM_GROUPS > 0 && GROUP_SIZE % 32 != 0
    __shared__ u32 sel_s[WARPS][VPT * 32];
#endif
    float score[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
        const int e = v * 32 + lane;
        score[v] = e < NUM_E ? LE::to_f32(row[e]) : neg_inf();
    }

    float m = 0.f, sum = 1.f;  // softmax max and denominator (all lanes hold the same values)
#if SCORING == 0
    m = neg_inf();
#pragma unroll
    for (int v = 0; v < VPT; ++v) m = fmaxf(m, score[v]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, o));
    sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
        if (v * 32 + lane < NUM_E) {
            score[v] = expf(score[v] - m);
            sum += score[v];
        }
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int v = 0; v < VPT; ++v) score[v] = score[v] / sum;  // == score_of(logit, m, sum)
#else
#pragma unroll
    for (int v = 0; v < VPT; ++v) score[v] = score_of(score[v], m, sum);
#endif

    u32 key[NP2];  // selection keys by slot; 0 = not selectable
    int slot[NP2];
#pragma unroll
    for (int v = 0; v < NP2; ++v) {
        const int e = v * 32 + lane;
        slot[v] = v;
        key[v] = 0u;
        if (v < VPT && e < NUM_E) {
            float s = score[v];
#if HAS_BIAS
            s += Elem<BIAS_DT>::to_f32(((const typename Elem<BIAS_DT>::T*)bias_)[e]);
#endif
            key[v] = float_key(s);
        }
    }

#if NUM_GROUPS > 0
    {
        constexpr int GS = GROUP_SIZE;
        u32 gkey = 0u;  // lane g < NUM_GROUPS: the score key of group g
#if GROUP_SIZE % 32 == 0
        // Whole slots per group (slot v belongs to group v / SPG): warp reductions per group.
        constexpr int SPG = GS / 32;
#pragma unroll
        for (int g = 0; g < NUM_GROUPS; ++g) {
            u32 l1 = 0u, l2 = 0u;  // this lane's best two keys of group g
#pragma unroll
            for (int i = 0; i < SPG; ++i) {
                const u32 kk = key[g * SPG + i];
                l2 = kk > l1 ? l1 : (kk > l2 ? kk : l2);
                l1 = kk > l1 ? kk : l1;
            }
            const u32 k1 = __reduce_max_sync(FULL_MASK, l1);
#if HAS_BIAS
            const u32 first = __reduce_min_sync(FULL_MASK, l1 == k1 ? (u32)lane : 32u);
            const u32 k2 = __reduce_max_sync(FULL_MASK, lane == (int)first ? l2 : l1);
            const u32 gk = float_key(key_float(k1) + key_float(k2));
#else
            const u32 gk = k1;
#endif
            if (lane == g) gkey = gk;
        }
#else
        // Groups cut through slots: lane g scans group g's keys in shared memory.
#pragma unroll
        for (int v = 0; v < VPT; ++v) sel_s[warp][v * 32 + lane] = key[v];
        __syncwarp();
        if (lane < NUM_GROUPS) {
            u32 k1 = 0u, k2 = 0u;  // best two selection keys of group `lane`
#pragma unroll 8
            for (int i = 0; i < GS; ++i) {
                const u32 kk = sel_s[warp][lane * GS + i];
                k2 = kk > k1 ? k1 : (kk > k2 ? kk : k2);
                k1 = kk > k1 ? kk : k1;
            }
#if HAS_BIAS
            gkey = GS >= 2 ? float_key(key_float(k1) + key_float(k2)) : k1;
#else
            gkey = k1;
#endif
        }
#endif
        bool kept = false;
#pragma unroll 1
        for (int g = 0; g < TOPK_GROUPS; ++g) {
            const u32 gm = __reduce_max_sync(FULL_MASK, gkey);
            const u32 win = __reduce_min_sync(FULL_MASK, (gkey == gm && lane < NUM_GROUPS) ? (u32)lane : 32u);
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

    // Sort each lane's (key, slot) pairs: larger key first, lower slot (= lower expert) first on ties
    // (bitonic network, unrolled at compile time). A lane's head is then its best candidate.
    static_for<1, LOG2_NP2 + 1>([&](auto kc) {
        static_for<0, decltype(kc)::value>([&](auto jc) {
            static_for<0, NP2>([&](auto ic) {
                constexpr int kb = 1 << decltype(kc)::value;
                constexpr int i = decltype(ic)::value;
                constexpr int l = i ^ (1 << (decltype(kc)::value - 1 - decltype(jc)::value));
                if constexpr (l > i) {
                    if constexpr ((i & kb) == 0) cas(key[i], slot[i], key[l], slot[l]);
                    else cas(key[l], slot[l], key[i], slot[i]);
                }
            });
        });
    });

    // TOP_K rounds: the best head wins (lowest expert index among equal keys); its lane pops it.
    int my_id = 0;
#pragma unroll 1
    for (int j = 0; j < TOP_K; ++j) {
        const u32 best = __reduce_max_sync(FULL_MASK, key[0]);
        const u32 win = __reduce_min_sync(FULL_MASK, key[0] == best ? (u32)(slot[0] * 32 + lane) : 0xffffffffu);
        if (lane == (int)(win & 31u)) {
#pragma unroll
            for (int i = 0; i + 1 < KEEP; ++i) {
                key[i] = key[i + 1];
                slot[i] = slot[i + 1];
            }
            key[KEEP - 1] = 0u;
        }
        if (lane == j) my_id = (int)win;
    }

    m_out = m;
    sum_out = sum;
    return my_id;
}

#if GROUPED256
// s[i] = score_of(x[i]) = 1 / (1 + expf(-x[i])) for 8 logits. The division's IEEE result comes from
// its own fast path (reciprocal estimate and one Newton step, exact for 1 + expf(-x) < 2^126) where
// all 8 allow it: that saves its per-element range check and branch; else from the division.
__device__ __forceinline__ void sigmoid8(const float* x, float* s) {
    float y[8];
    u32 ymax = 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        y[i] = 1.0f + expf(-x[i]);  // >= 1 or NaN; the same expression (and contraction) as score_of
        ymax = max(ymax, __float_as_uint(y[i]));
    }
    if (ymax < 0x7e800000u) {  // all exponents <= 252 (NaN and inf excluded)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float r;
            asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y[i]));
            s[i] = __fmaf_rn(r, -__fmaf_rn(y[i], r, -1.0f), r);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = 1.0f / y[i];
    }
}

// Larger first: (key << 32 | 7 - slot) orders by selection key, then lower slot first. PTX keeps
// one comparison for both selects (as max and min the compiler compares twice).
__device__ __forceinline__ void cx(u64& a, u64& b) {
    asm("{\n\t"
        ".reg .pred p;\n\t"
        ".reg .b64 t;\n\t"
        "setp.gt.u64 p, %1, %0;\n\t"
        "selp.b64 t, %1, %0, p;\n\t"
        "selp.b64 %1, %0, %1, p;\n\t"
        "mov.b64 %0, t;\n\t"
        "}"
        : "+l"(a), "+l"(b));
}

// Selection for 256 experts in 8 groups of 32 with sigmoid scores; returns the id of selection slot
// `lane` (lanes < TOP_K). Lane l holds the 8 contiguous experts 8l..8l+7 (16-byte loads: row and
// bias must be 16-byte aligned), so group g is the 4 lanes 4g..4g+3 and lane order is expert
// order: 2 shuffle steps give all 8 group scores at once, and among equal keys the lowest lane
// holds the lowest expert.
template <typename LE>
__device__ __forceinline__ int select_grouped256(const typename LE::T* __restrict__ row,
                                                 const void* __restrict__ bias_, int lane) {
    constexpr int LPG = 4;  // lanes per group
    const int e0 = lane * 8;
    float x[8];
    typedef VecIO<LOGIT_DT, 16> LV;
#pragma unroll
    for (int i = 0; i < 8 / LV::N; ++i) LV::unpack(ROUTE_ROW_LOAD16((const uint4*)(row + e0) + i), x + i * LV::N);
#if HAS_BIAS
    float b[8];
    typedef VecIO<BIAS_DT, 16> BV;
    const typename Elem<BIAS_DT>::T* bias = (const typename Elem<BIAS_DT>::T*)bias_;
#pragma unroll
    for (int i = 0; i < 8 / BV::N; ++i) BV::unpack(__ldg((const uint4*)(bias + e0) + i), b + i * BV::N);
#endif

    // Selection keys, then this lane's (key, slot) pairs sorted: larger key first, lower slot first
    // among equal keys (Batcher's odd-even merge sort, 19 compare-exchanges). Then keep the keys, and
    // the slots in that order as 3-bit fields of `order` (first in the low bits), stored as 7 - slot.
    float s[8];
    sigmoid8(x, s);
    u64 c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#if HAS_BIAS
        s[i] += b[i];
#endif
        c[i] = ((u64)float_key(s[i]) << 32) | (u32)(7 - i);
    }
    constexpr int NET[19][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 2}, {1, 3}, {4, 6}, {5, 7}, {1, 2}, {5, 6},
                                {0, 4}, {1, 5}, {2, 6}, {3, 7}, {2, 4}, {3, 5}, {1, 2}, {3, 4}, {5, 6}};
#pragma unroll
    for (int i = 0; i < 19; ++i) cx(c[NET[i][0]], c[NET[i][1]]);
    u32 key[8];
    u32 order = 0u;
#pragma unroll
    for (int i = 7; i >= 0; --i) {
        key[i] = (u32)(c[i] >> 32);
        order = order * 8u + (u32)c[i];
    }

    // Group score in all 4 lanes of the group: its best two keys (a multiset, as in select_generic),
    // merged over the lanes by xor shuffles; their sum with a bias, else the best key.
    u32 k1 = key[0];
#if HAS_BIAS
    u32 k2 = key[1];
#endif
#pragma unroll
    for (int o = 1; o < LPG; o <<= 1) {
        const u32 o1 = __shfl_xor_sync(FULL_MASK, k1, o);
#if HAS_BIAS
        const u32 o2 = __shfl_xor_sync(FULL_MASK, k2, o);
        const u32 lo1 = k1 < o1 ? k1 : o1;
        const u32 hi2 = k2 > o2 ? k2 : o2;
        k2 = lo1 > hi2 ? lo1 : hi2;
#endif
        k1 = k1 > o1 ? k1 : o1;
    }
#if HAS_BIAS
    const u32 gk = float_key(key_float(k1) + key_float(k2));
#else
    const u32 gk = k1;
#endif

    // Keep the group if fewer than TOPK_GROUPS groups beat it (larger score, or equal score and lower
    // index). Lane 4g + s compares groups 2s and 2s + 1 with its group g; two ballots count them.
    const int g = lane / LPG, sub = lane % LPG;
    int beaten = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int og = sub * 2 + h;
        const u32 ok = __shfl_sync(FULL_MASK, gk, og * LPG);
        const u32 beats = __ballot_sync(FULL_MASK, ok > gk || (ok == gk && og < g));
        beaten += __popc(beats & (0xfu << (g * LPG)));
    }
    // A dropped lane gets head 0, which never wins: the kept groups hold >= TOP_K keys, all > 0.
    if (beaten >= TOPK_GROUPS) key[0] = 0u;

    // TOP_K rounds: the best head wins, the lowest expert among equal heads (= the lowest expert among
    // equal remaining keys: lanes and each lane's ties are in expert order); its lane pops it.
    const u32 last = (u32)e0 | 7u;  // expert id = last - (7 - slot) = last ^ (7 - slot)
    int my_id = 0;
#pragma unroll
    for (int j = 0; j < TOP_K; ++j) {
        const u32 head_id = last ^ (order & 7u);
        const u32 best = __reduce_max_sync(FULL_MASK, key[0]);
        const u32 win = __reduce_min_sync(FULL_MASK, key[0] == best ? head_id : 0xffffffffu);
        if (head_id == win) {
#pragma unroll
            for (int i = 0; i < 7; ++i) key[i] = key[i + 1];
            key[7] = 0u;
            order >>= 3;
        }
        if (lane == j) my_id = (int)win;
    }
    return my_id;
}
#endif

// Routes token t with one warp: writes its TOP_K weights and ids, returns lane's id (lanes < TOP_K).
__device__ __forceinline__ int route_token(const void* __restrict__ logits_, i64 row_stride, const void* __restrict__ bias_,
                                           float scaling, float* __restrict__ out_w, int* __restrict__ out_ids, int t,
                                           int lane, int warp) {
    typedef Elem<LOGIT_DT> LE;
    const typename LE::T* row = (const typename LE::T*)logits_ + (i64)t * row_stride;
    float m = 0.f, sum = 1.f;  // softmax max and denominator (set by select_generic for softmax)
    int my_id;
#if GROUPED256
    // 16-byte loads; rows (e.g. of a strided view) need only be element-aligned: generic path
    if ((((u64)row | (u64)bias_) & 15u) == 0)  // warp-uniform
        my_id = select_grouped256<LE>(row, bias_, lane);
    else
#endif
        my_id = select_generic<LE>(row, bias_, lane, warp, m, sum);

    // Weight = unbiased score of the selected expert, recomputed bit-exactly from its logit.
    float my_w = lane < TOP_K ? score_of(LE::to_f32(row[min(my_id, NUM_E - 1)]), m, sum) : 0.f;
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
    return my_id;
}
