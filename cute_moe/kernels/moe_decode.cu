// The expert stage of the MoE layer for a few tokens, in one kernel (decode).
//
// At decode sizes the layer is a stream of weights: each active expert's 3*I*H weights are read
// once and each weight does 2 FLOPs per token that chose the expert, so CUDA cores keep up with
// HBM and what matters is reading every byte once at full bandwidth, with as few launches and
// fixed costs as possible. One cooperative launch (one CTA per SM, all resident) does:
//
// 0. every CTA: the distinct valid experts of topk_ids in order of first appearance ("u") and the
//    flat entries t*k+j grouped by u; x's rows into shared memory.
// 1. GEMM1 + gated activation, warp-strided over (u, j): gate row j and up row I+j of w1[e] dotted
//    with each member's x row, act(gate, up) rounded to X_DT into h[entry, j] (global scratch).
// 2. grid barrier (GEMM2's first weight loads are already in flight); each CTA copies h into
//    shared memory.
// 3. GEMM2 + router weight + combine, warp-strided over output columns c: row c of w2[e] of every
//    active expert dotted with its members' h rows, times the router weight, summed per token in
//    float32 in a fixed order (bitwise reproducible), plus w2_bias and shared_output; one rounding.
//
// Weights stream through per-thread cp.async rings (STAGES steps in flight), so memory-level
// parallelism does not cost registers. Ids outside [0, E) are dropped (contribute nothing), as in
// the plan.
//
// Defines: X_DT (x, weights, h, out), TW_DT (topk weights), B1_DT / B2_DT (biases), SH_DT (shared_output), IDS_I64,
// TOP_K, TMAX (tokens at most), ACT (0 silu, 1 gelu, 2 swiglu_oai), HAS_B1, HAS_B2, HAS_SHARED,
// NW (warps per CTA), UNROLL (16-byte vectors per row, lane and step), STAGES (ring depth),
// TMAX * TOP_K <= NW * 32.
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
    int groups;         // ceil(most entries of one expert / TMAX): GEMM1 units per (expert, j)
    float weight[MAXR]; // entry -> router weight
};

// Weights are read once: marked first to evict from L2, fetched in 256-byte L2 sectors.
__device__ __forceinline__ u64 evict_first_policy() {
    u64 p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// Each thread streams weights through its own ring of STAGES steps x SLOTS 16-byte shared-memory
// slots (cp.async: no registers held while loads are in flight). A thread reads only slots it
// filled itself, so cp.async.wait_group alone makes them visible (no barriers).
#define NT (NW * 32)
#define SLOTS (2 * UNROLL)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(const uint4* dst, const uint4* src, u64 policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "l"(policy) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Every step but the newest STAGES - 1 has landed.
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory"); }

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
    if (tid == 0) {
        S.num_u = 0;
        S.groups = 1;
    }
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
        atomicMax(&S.groups, ceil_div(count, TMAX));
    }
    __syncthreads();
    if (e >= 0) {
        const int u = S.rank[S.first[tid]];
        S.order[S.start[u] + S.before[tid]] = tid;
    }
    __syncthreads();
}

// GEMM1 work of one warp: units gw, gw + num_warps, ... of (pair p = u * I + j, member group g), each
// streamed in steps of UNROLL vectors of the gate and the up row per lane.
struct Gemm1Cursor {
    int k, b;  // unit index (of this warp's), step within the unit
    const uint4 *gate, *up;
};

__device__ __forceinline__ void gemm1_issue(Gemm1Cursor& c, int steps, int s, const DecodeShared& S, const XT* w1,
                                            int gw, int num_warps, int inter, int v1, int nb, uint4* ring,
                                            u64 policy) {
    if (s < steps) {
        if (c.b == 0) {
            const int p = (gw + c.k * num_warps) / S.groups, u = p / inter, j = p - u * inter;
            c.gate = (const uint4*)(w1 + ((i64)S.expert[u] * 2 * inter + j) * (i64)(v1 * 8));
            c.up = c.gate + (i64)inter * v1;
        }
        uint4* slot = ring + (s % STAGES) * SLOTS * NT + threadIdx.x;
#pragma unroll
        for (int i = 0; i < UNROLL; ++i) {
            const int v = (c.b * UNROLL + i) * 32 + (threadIdx.x & 31);
            if (v < v1) {
                cp_async16(slot + i * NT, c.gate + v, policy);
                cp_async16(slot + (UNROLL + i) * NT, c.up + v, policy);
            }
        }
        if (++c.b == nb) {
            c.b = 0;
            ++c.k;
        }
    }
    cp_commit();
}

// GEMM2 work of one warp: output columns gw, gw + num_warps, ..., each streamed in steps of SLOTS
// items q = u * (I / 8) + v (row c of expert u's w2, vector v) per lane.
__device__ __forceinline__ void gemm2_issue(int& k, int& b, int steps, int s, const DecodeShared& S, const XT* w2,
                                            int gw, int num_warps, int hidden, int v2, int num_q, int nb,
                                            uint4* ring, u64 policy) {
    if (s < steps) {
        const int c = gw + k * num_warps;
        int q = b * SLOTS * 32 + (threadIdx.x & 31), u = q / v2, v = q - u * v2;
        uint4* slot = ring + (s % STAGES) * SLOTS * NT + threadIdx.x;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            if (q < num_q)
                cp_async16(slot + i * NT, (const uint4*)(w2 + ((i64)S.expert[u] * hidden + c) * (i64)(v2 * 8)) + v,
                           policy);
            q += 32;
            for (v += 32; v >= v2; v -= v2) ++u;
        }
        if (++b == nb) {
            b = 0;
            ++k;
        }
    }
    cp_commit();
}

extern "C" __global__ void __launch_bounds__(NT, 1)
moe_decode(const XT* __restrict__ x, const XT* __restrict__ w1, const XT* __restrict__ w2,
           const typename Elem<B1_DT>::T* __restrict__ b1, const typename Elem<B2_DT>::T* __restrict__ b2,
           const typename Elem<TW_DT>::T* __restrict__ topk_w, const IdT* __restrict__ topk_ids,
           const typename Elem<SH_DT>::T* __restrict__ shared, XT* __restrict__ out, XT* __restrict__ h,
           int num_tokens, int hidden, int inter, int num_experts) {
    __shared__ DecodeShared S;
    // dynamic shared memory: the rings [STAGES][SLOTS][NT] 16-byte slots, then x's rows [T, H]
    // (GEMM1), later the activations' rows [T*k, I] (GEMM2)
    extern __shared__ __align__(16) unsigned char dsm[];
    uint4* const ring = (uint4*)dsm;
    uint4* const rows = ring + STAGES * SLOTS * NT;
    PDL_ENTER();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int num_entries = num_tokens * TOP_K;
    const int v1 = hidden / 8, v2 = inter / 8;  // 16-byte vectors per w1 / w2 row
    for (int i = tid; i < num_tokens * v1; i += NT) rows[i] = ((const uint4*)x)[i];
    group_entries(topk_ids, topk_w, num_entries, num_experts, S);

    const int gw = blockIdx.x * NW + warp, num_warps = gridDim.x * NW;
    const int num_u = S.num_u, groups = S.groups;
    const u64 policy = evict_first_policy();

    // ---- GEMM1 + activation
    const int nb1 = ceil_div(v1, 32 * UNROLL);
    const int units1 = num_u * inter * groups;
    const int steps1 = (units1 > gw ? ceil_div(units1 - gw, num_warps) : 0) * nb1;
    Gemm1Cursor ic{0, 0, nullptr, nullptr};
    for (int s = 0; s < STAGES - 1; ++s) gemm1_issue(ic, steps1, s, S, w1, gw, num_warps, inter, v1, nb1, ring, policy);
    float ag[TMAX], au[TMAX];
    int tok[TMAX];
    int b = 0, k = 0, u = 0, j = 0, nm = 0, first = 0;
    for (int s = 0; s < steps1; ++s) {
        gemm1_issue(ic, steps1, s + STAGES - 1, S, w1, gw, num_warps, inter, v1, nb1, ring, policy);
        if (b == 0) {
            const int unit = gw + k * num_warps, p = unit / groups;
            u = p / inter;
            j = p - u * inter;
            first = S.start[u] + (unit - p * groups) * TMAX;  // this member group's first position in order[]
            nm = min(TMAX, S.start[u] + S.count[u] - first);  // may be <= 0: a group past this expert's members
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                tok[m] = m < nm ? S.order[first + m] / TOP_K : 0;
                ag[m] = au[m] = 0.f;
            }
        }
        cp_wait();
        const uint4* slot = ring + (s % STAGES) * SLOTS * NT + tid;
#pragma unroll
        for (int i = 0; i < UNROLL; ++i) {
            const int v = (b * UNROLL + i) * 32 + lane;
            if (v < v1) {
                float fg[8], fu[8];
                V16::unpack(slot[i * NT], fg);
                V16::unpack(slot[(UNROLL + i) * NT], fu);
#pragma unroll
                for (int m = 0; m < TMAX; ++m) {
                    if (m < nm) {
                        float fx[8];
                        V16::unpack(rows[tok[m] * v1 + v], fx);
                        ag[m] = dot8(fg, fx, ag[m]);
                        au[m] = dot8(fu, fx, au[m]);
                    }
                }
            }
        }
        if (++b == nb1) {
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
                const i64 row = (i64)S.expert[u] * 2 * inter + j;
                g += Elem<B1_DT>::to_f32(b1[row]);
                up += Elem<B1_DT>::to_f32(b1[row + inter]);
#endif
                h[(i64)S.order[first + lane] * inter + j] = EX::from_f32(gated_act(g, up));
            }
            b = 0;
            ++k;
        }
    }

    // ---- GEMM2 + router weight + combine; its first weight steps load during the grid barrier
    const int num_q = num_u * v2;
    const int nb2 = ceil_div(num_q, 32 * SLOTS);
    const int steps2 = (hidden > gw ? ceil_div(hidden - gw, num_warps) : 0) * (num_q ? nb2 : 0);
    int ik = 0, ib = 0;
    for (int s = 0; s < STAGES - 1; ++s)
        gemm2_issue(ik, ib, steps2, s, S, w2, gw, num_warps, hidden, v2, num_q, nb2, ring, policy);
    grid_barrier();
    for (int i = tid; i < num_entries * v2; i += NT)
        if (S.ids[i / v2] >= 0) rows[i] = __ldcg((const uint4*)h + i);
    __syncthreads();

    float acc[TMAX];
    b = k = 0;
    for (int s = 0; s < steps2; ++s) {
        gemm2_issue(ik, ib, steps2, s + STAGES - 1, S, w2, gw, num_warps, hidden, v2, num_q, nb2, ring, policy);
        if (b == 0) {
#pragma unroll
            for (int t = 0; t < TMAX; ++t) acc[t] = 0.f;
        }
        cp_wait();
        const uint4* slot = ring + (s % STAGES) * SLOTS * NT + tid;
        int q = b * SLOTS * 32 + lane, uq = q / v2, v = q - uq * v2;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            if (q < num_q) {
                float fw[8];
                V16::unpack(slot[i * NT], fw);
                const int s0 = S.start[uq], n = S.count[uq];
                for (int m = 0; m < n; ++m) {
                    const int entry = S.order[s0 + m];
                    float fh[8];
                    V16::unpack(rows[entry * v2 + v], fh);
                    add_to(acc, entry / TOP_K, S.weight[entry] * dot8(fw, fh, 0.f));
                }
            }
            q += 32;
            for (v += 32; v >= v2; v -= v2) ++uq;
        }
        if (++b == nb2) {
            const int c = gw + k * num_warps;
#pragma unroll
            for (int t = 0; t < TMAX; ++t)
                if (t < num_tokens) acc[t] = warp_sum(acc[t]);
            if (lane < num_tokens) {
                float r = pick(acc, lane);
#if HAS_B2
#pragma unroll
                for (int sl = 0; sl < TOP_K; ++sl) {
                    const int entry = lane * TOP_K + sl, e = S.ids[entry];
                    if (e >= 0) r += S.weight[entry] * Elem<B2_DT>::to_f32(b2[(i64)e * hidden + c]);
                }
#endif
#if HAS_SHARED
                r += Elem<SH_DT>::to_f32(shared[(i64)lane * hidden + c]);
#endif
                out[(i64)lane * hidden + c] = EX::from_f32(r);
            }
            b = 0;
            ++k;
        }
    }
    if (num_q == 0) {  // every id dropped: out = bias terms (none) + shared_output
        for (int i = blockIdx.x * NT + tid; i < num_tokens * hidden; i += gridDim.x * NT) {
            float r = 0.f;
#if HAS_SHARED
            r = Elem<SH_DT>::to_f32(shared[i]);
#endif
            out[i] = EX::from_f32(r);
        }
    }
}
