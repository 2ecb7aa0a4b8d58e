// The expert stage of the MoE layer for a few tokens, in one kernel (decode).
//
// At decode sizes the layer is a stream of weights: each active expert's 3*I*H weights are read
// once and each weight does 2 FLOPs per token that chose the expert, so CUDA cores keep up with
// HBM and what matters is reading every byte once, at full bandwidth, with as few launches and
// fixed costs as possible. One cooperative launch (one CTA per SM, all resident) does:
//
// 0. every CTA: the distinct valid experts of topk_ids in order of first appearance ("u") and the
//    flat entries t*k+j grouped by u; x's rows into shared memory.
// 1. GEMM1 + gated activation, warp-strided over (u, j): gate row j and up row I+j of w1[e] (16-byte
//    streaming loads) dotted with each member's x row, act(gate, up) rounded to X_DT into h[entry, j].
//    A warp done with its pairs prefetches its GEMM2 weight rows into L2 (bulk prefetch) while the
//    other warps finish.
// 2. grid barrier; each CTA copies h into shared memory.
// 3. GEMM2 + router weight + combine, warp-strided over output columns c: row c of w2[e] of every
//    active expert dotted with its members' h rows, times the router weight, summed per token in
//    float32 in a fixed order (bitwise reproducible), plus w2_bias and shared_output; one rounding.
//
// Ids outside [0, E) are dropped (contribute nothing), as in the plan.
//
// Defines: X_DT (x, weights, h, out), TW_DT (topk weights), B1_DT / B2_DT (biases), SH_DT (shared_output), IDS_I64,
// TOP_K, TMAX (tokens at most), ACT (0 silu, 1 gelu, 2 swiglu_oai), HAS_B1, HAS_B2, HAS_SHARED,
// NW (warps per CTA), UNROLL (16-byte loads in flight per lane and row), MAXR = TMAX * TOP_K <= NW * 32.
#include "common.cuh"

#define MAXR (TMAX * TOP_K)

typedef Elem<X_DT> EX;
typedef EX::T XT;
typedef VecIO<X_DT, 16> V16;
#if IDS_I64
typedef i64 IdT;
#else
typedef int IdT;
#endif

struct DecodeShared {
    int num_u;
    int expert[MAXR];   // u -> expert id
    int start[MAXR];    // u -> its first position in order[]
    int count[MAXR];    // u -> its entries
    int order[MAXR];    // valid entries grouped by u, ascending within a group
    int ids[MAXR];      // entry -> expert id, -1 if dropped
    int first[MAXR];    // entry -> first entry with the same expert
    int before[MAXR];   // entry -> earlier entries with the same expert
    int rank[MAXR];     // first entry of an expert -> u
    float weight[MAXR]; // entry -> router weight
};

// Weights are read once: 16-byte loads that skip L1, are marked first to evict from L2 and fetch
// 256-byte L2 sectors ahead.
__device__ __forceinline__ u64 evict_first_policy() {
    u64 p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p, u64 policy) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(policy));
    return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float dot8(const float* a, const float* b, float acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc = fmaf(a[i], b[i], acc);
    return acc;
}

// The gated activation of cute_moe.reference.gated_activation_reference (NaN propagates).
__device__ __forceinline__ float gated_act(float g, float u) {
#if ACT == 0
    return g / (1.f + expf(-g)) * u;
#elif ACT == 1
    return 0.5f * g * (1.f + erff(g * 0.7071067811865476f)) * u;
#else
    g = g > 7.f ? 7.f : g;
    u = u > 7.f ? 7.f : (u < -7.f ? -7.f : u);
    return g / (1.f + expf(-1.702f * g)) * (u + 1.f);
#endif
}

// acc[t] += v for the token t == tok (acc stays in registers: static indices only).
__device__ __forceinline__ void add_to(float (&acc)[TMAX], int tok, float v) {
#pragma unroll
    for (int t = 0; t < TMAX; ++t)
        if (t == tok) acc[t] += v;
}

__device__ __forceinline__ float pick(const float (&acc)[TMAX], int t) {
    float r = 0.f;
#pragma unroll
    for (int i = 0; i < TMAX; ++i)
        if (i == t) r = acc[i];
    return r;
}

// Phase 0: S's expert groups from topk_ids / topk_weights (num_entries <= MAXR <= blockDim.x).
__device__ __forceinline__ void group_entries(const IdT* __restrict__ topk_ids,
                                              const typename Elem<TW_DT>::T* __restrict__ topk_w,
                                              int num_entries, int num_experts, DecodeShared& S) {
    const int tid = threadIdx.x;
    if (tid == 0) S.num_u = 0;
    if (tid < num_entries) {
        const i64 e = (i64)topk_ids[tid];
        S.ids[tid] = (e >= 0 && e < num_experts) ? (int)e : -1;
        S.weight[tid] = Elem<TW_DT>::to_f32(topk_w[tid]);
    }
    __syncthreads();
    const int e = tid < num_entries ? S.ids[tid] : -1;
    if (e >= 0) {
        int first = tid, before = 0;
        for (int j = tid - 1; j >= 0; --j)
            if (S.ids[j] == e) {
                first = j;
                ++before;
            }
        S.first[tid] = first;
        S.before[tid] = before;
    }
    __syncthreads();
    if (e >= 0 && S.first[tid] == tid) {  // the expert's first entry: its u, start and count
        int rank = 0, start = 0, count = 0;
        for (int j = 0; j < num_entries; ++j) {
            const int ej = S.ids[j];
            if (ej < 0) continue;
            const int fj = S.first[j];
            rank += (fj == j && j < tid);
            start += (fj < tid);
            count += (ej == e);
        }
        S.expert[rank] = e;
        S.start[rank] = start;
        S.count[rank] = count;
        S.rank[tid] = rank;
        atomicMax(&S.num_u, rank + 1);
    }
    __syncthreads();
    if (e >= 0) {
        const int u = S.rank[S.first[tid]];
        S.order[S.start[u] + S.before[tid]] = tid;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(NW * 32, 1)
moe_decode(const XT* __restrict__ x, const XT* __restrict__ w1, const XT* __restrict__ w2,
           const typename Elem<B1_DT>::T* __restrict__ b1,
           const typename Elem<B2_DT>::T* __restrict__ b2, const typename Elem<TW_DT>::T* __restrict__ topk_w,
           const IdT* __restrict__ topk_ids, const typename Elem<SH_DT>::T* __restrict__ shared,
           XT* __restrict__ out, XT* __restrict__ h, int num_tokens, int hidden, int inter, int num_experts,
           int prefetch_w2) {
    __shared__ DecodeShared S;
    extern __shared__ __align__(16) unsigned char dsm[];  // x rows [T, H], then h rows [T*k, I]
    uint4* const dsm4 = (uint4*)dsm;
    PDL_ENTER();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int num_entries = num_tokens * TOP_K;
    const int v1 = hidden / 8, v2 = inter / 8;  // 16-byte vectors per w1 / w2 row
    for (int i = tid; i < num_tokens * v1; i += NW * 32) dsm4[i] = ((const uint4*)x)[i];
    group_entries(topk_ids, topk_w, num_entries, num_experts, S);

    const int gw = blockIdx.x * NW + warp, num_warps = gridDim.x * NW;
    const int num_u = S.num_u;
    const u64 policy = evict_first_policy();

    // ---- GEMM1 + activation: pair p = (u, j)
    for (int p = gw; p < num_u * inter; p += num_warps) {
        const int u = p / inter, j = p - u * inter;
        const int e = S.expert[u], n = S.count[u], s0 = S.start[u];
        const uint4* g_row = (const uint4*)(w1 + ((i64)e * 2 * inter + j) * hidden);
        const uint4* u_row = g_row + (i64)inter * v1;
        for (int m0 = 0; m0 < n; m0 += TMAX) {  // more than TMAX members only with repeated ids
            const int nm = min(TMAX, n - m0);
            int tok[TMAX];
            float ag[TMAX], au[TMAX];
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                tok[m] = m < nm ? S.order[s0 + m0 + m] / TOP_K : 0;
                ag[m] = au[m] = 0.f;
            }
            for (int v0 = lane; v0 < v1; v0 += 32 * UNROLL) {
                uint4 gv[UNROLL], uv[UNROLL];
#pragma unroll
                for (int i = 0; i < UNROLL; ++i) {
                    const int v = v0 + 32 * i;
                    gv[i] = v < v1 ? ld_stream(g_row + v, policy) : zero_raw<uint4>();
                    uv[i] = v < v1 ? ld_stream(u_row + v, policy) : zero_raw<uint4>();
                }
#pragma unroll
                for (int i = 0; i < UNROLL; ++i) {
                    const int v = v0 + 32 * i;
                    if (v < v1) {
                        float fg[8], fu[8];
                        V16::unpack(gv[i], fg);
                        V16::unpack(uv[i], fu);
#pragma unroll
                        for (int m = 0; m < TMAX; ++m) {
                            if (m < nm) {
                                float fx[8];
                                V16::unpack(dsm4[tok[m] * v1 + v], fx);
                                ag[m] = dot8(fg, fx, ag[m]);
                                au[m] = dot8(fu, fx, au[m]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                if (m < nm) {
                    ag[m] = warp_sum(ag[m]);
                    au[m] = warp_sum(au[m]);
                }
            }
            if (lane < nm) {
                float g = pick(ag, lane), up = pick(au, lane);
#if HAS_B1
                g += Elem<B1_DT>::to_f32(b1[(i64)e * 2 * inter + j]);
                up += Elem<B1_DT>::to_f32(b1[(i64)e * 2 * inter + inter + j]);
#endif
                const int entry = S.order[s0 + m0 + lane];
                h[(i64)entry * inter + j] = EX::from_f32(gated_act(g, up));
            }
        }
    }
    if (prefetch_w2) {  // this warp's GEMM2 rows, while the other warps finish GEMM1
        for (int c = gw; c < hidden; c += num_warps)
            for (int u = lane; u < num_u; u += 32)
                prefetch_l2(w2 + ((i64)S.expert[u] * hidden + c) * inter, (u32)inter * EX::SIZE);
    }

    grid_barrier();
    for (int i = tid; i < num_entries * v2; i += NW * 32)
        if (S.ids[i / v2] >= 0) dsm4[i] = __ldcg((const uint4*)h + i);
    __syncthreads();

    // ---- GEMM2 + router weight + combine: output column c; items q = (u, v) over the active experts' rows
    const int num_q = num_u * v2;
    for (int c = gw; c < hidden; c += num_warps) {
        float acc[TMAX];
#pragma unroll
        for (int t = 0; t < TMAX; ++t) acc[t] = 0.f;
        for (int q0 = lane; q0 < num_q; q0 += 32 * UNROLL) {
            uint4 wv[UNROLL];
            int uq[UNROLL], vq[UNROLL];
#pragma unroll
            for (int i = 0; i < UNROLL; ++i) {
                const int q = min(q0 + 32 * i, num_q - 1);
                uq[i] = q / v2;
                vq[i] = q - uq[i] * v2;
                const uint4* row = (const uint4*)(w2 + ((i64)S.expert[uq[i]] * hidden + c) * inter);
                wv[i] = q0 + 32 * i < num_q ? ld_stream(row + vq[i], policy) : zero_raw<uint4>();
            }
#pragma unroll
            for (int i = 0; i < UNROLL; ++i) {
                if (q0 + 32 * i < num_q) {
                    float fw[8];
                    V16::unpack(wv[i], fw);
                    const int s0 = S.start[uq[i]], n = S.count[uq[i]];
                    for (int m = 0; m < n; ++m) {
                        const int entry = S.order[s0 + m];
                        float fh[8];
                        V16::unpack(dsm4[entry * v2 + vq[i]], fh);
                        add_to(acc, entry / TOP_K, S.weight[entry] * dot8(fw, fh, 0.f));
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TMAX; ++t)
            if (t < num_tokens) acc[t] = warp_sum(acc[t]);
        if (lane < num_tokens) {
            float r = pick(acc, lane);
#if HAS_B2
#pragma unroll
            for (int s = 0; s < TOP_K; ++s) {
                const int entry = lane * TOP_K + s, e = S.ids[entry];
                if (e >= 0) r += S.weight[entry] * Elem<B2_DT>::to_f32(b2[(i64)e * hidden + c]);
            }
#endif
#if HAS_SHARED
            r += Elem<SH_DT>::to_f32(shared[(i64)lane * hidden + c]);
#endif
            out[(i64)lane * hidden + c] = EX::from_f32(r);
        }
    }
}
