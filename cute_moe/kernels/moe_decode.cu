// The MoE layer (ROUTE) or its expert stage for a few tokens, in one kernel (decode).
//
// At decode sizes the layer is a stream of weights: each active expert's 3*I*H weights are read
// once and each weight does 2 FLOPs per token that chose the expert, so CUDA cores keep up with
// HBM and what matters is reading every byte once at full bandwidth, with as few launches and
// fixed costs as possible. One cooperative launch (one CTA per SM, all resident) does:
//
// R. (ROUTE only: the whole layer from x) router logits x @ router_weight.T in float32, warp-strided
//    over (expert, slice of H) into per-slice partial sums; grid barrier; every CTA adds the slices in
//    order into shared memory and routes each token with one warp (route_select.cuh): the same ids
//    and weights in every CTA, and no routing kernels or top-k tensors between router and experts.
// 0. every CTA: the distinct valid experts of topk_ids in order of first appearance ("u") and the
//    flat entries t*k+j grouped by u; x's rows into shared memory (cp.async, issued at the start).
// 1. GEMM1 + gated activation, warp-strided over (u, j): gate row j and up row I+j of w1[e] dotted
//    with each member's x row, act(gate, up) rounded to X_DT into h[entry, j] (global scratch).
// 2. grid barrier (GEMM2's first weight loads are already in flight); each CTA copies h into
//    shared memory.
// 3. GEMM2 + router weight + combine, warp-strided over output columns c: row c of w2[e] of every
//    active expert dotted with its members' h rows, times the router weight, summed per token in
//    float32 in a fixed order (bitwise reproducible), plus w2_bias and shared_output; one rounding.
//
// Weights stream through per-warp shared-memory rings filled by 1-D bulk copies (STAGES steps in
// flight per warp), so memory-level parallelism costs neither registers nor per-thread requests.
// Ids outside [0, E) are dropped (contribute nothing), as in the plan.
//
// Defines: X_DT (x, weights, h, out), TW_DT (topk weights), B1_DT / B2_DT (biases), SH_DT (shared_output), IDS_I64,
// TOP_K, TMAX (tokens at most), ACT (0 silu, 1 gelu, 2 swiglu_oai), HAS_B1, HAS_B2, HAS_SHARED,
// NW (warps per CTA), CHUNK (bytes of a weight row per bulk copy), STAGES (ring depth),
// TMAX * TOP_K <= NW * 32. ROUTE (0/1), and with it RW_DT (router weight) and route_select.cuh's
// defines (LOGIT_DT = fp32, WARPS = NW; groups, if any, of a multiple of 32 experts).
#include "common.cuh"
#if ROUTE
#define ROUTE_ROW_LOAD16(p) (*(p))  // the logits rows are in shared memory
#include "route_select.cuh"
#endif

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

// Weights are read once: marked first to evict from L2.
__device__ __forceinline__ u64 evict_first_policy() {
    u64 p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// Each warp streams its weights through its own ring of STAGES shared-memory stages of STAGE_BYTES,
// filled by 1-D bulk copies (TMA: one instruction per row chunk, completion counted in bytes on
// the stage's mbarrier), so the bytes in flight do not depend on registers or per-thread requests.
// Lane 0 issues; the whole warp waits on the stage's phase, reads it, and hands it back with __syncwarp.
#define NT (NW * 32)
#define STAGE_BYTES (2 * CHUNK)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void mbar_init(u64* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    const u32 a = smem_addr(bar);
    u32 done = 0;
    while (!done) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(a), "r"(parity) : "memory");
    }
}

// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), counted on bar
__device__ __forceinline__ void bulk_load(void* dst, const void* src, u32 bytes, u64* bar, u64 policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy) : "memory");
}

// 16 bytes from global src to shared dst without a register round trip (cp.async; waited for by
// cp_async_wait_all before the rows are read)
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

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

// Phase 0: S's expert groups from S.ids, written before the call by this CTA's threads
// (num_entries <= MAXR <= blockDim.x): valid entries grouped by expert, experts in order of first
// appearance, entries ascending within a group.
__device__ __forceinline__ void group_entries(int num_entries, DecodeShared& S) {
#if MAXR <= 32
    // One warp, lane = entry: lanes with the same expert found by __match_any_sync, experts ranked by
    // their first entry, starts by a warp scan of the counts (one barrier instead of four; at Qwen3
    // T=1 the block-wide version below took about 1 us).
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int e = lane < num_entries ? S.ids[lane] : -1;
        const u32 same = __match_any_sync(FULL_MASK, e);  // (dropped ids and idle lanes share -1)
        const int first = __ffs(same) - 1, before = __popc(same & lanemask_lt()), count = __popc(same);
        const bool lead = e >= 0 && first == lane;  // the expert's first entry
        const u32 leads = __ballot_sync(FULL_MASK, lead);
        int start = lead ? count : 0;  // inclusive scan of the leads' counts, then exclusive
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(FULL_MASK, start, o);
            if (lane >= o) start += v;
        }
        start -= lead ? count : 0;
        const int my_start = __shfl_sync(FULL_MASK, start, first);
        if (lead) {
            const int u = __popc(leads & lanemask_lt());
            S.expert[u] = e;
            S.start[u] = start;
            S.count[u] = count;
        }
        if (e >= 0) S.order[my_start + before] = lane;
        const int groups = __reduce_max_sync(FULL_MASK, lead ? (u32)ceil_div(count, TMAX) : 1u);
        if (lane == 0) {
            S.num_u = __popc(leads);
            S.groups = groups;
        }
    }
    __syncthreads();
#else
    const int tid = threadIdx.x;
    if (tid == 0) {
        S.num_u = 0;
        S.groups = 1;
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
#endif
}

#if ROUTE
// Phase R: router logits and top-k of every token, into S.ids / S.weight (the same in every CTA).
// Warp gw computes the partial logits of the units gw, gw + num_warps, ... of (expert, slice of H):
// its slice of the router weight row dotted with every token's x row (both read from global memory,
// in flight together, while x's rows copy into shared memory for GEMM1; float32, lanes then the
// warp tree), into parts[(t * NUM_E + e) * slices + s]. After the grid barrier each CTA adds an expert's
// slices in order into lg [T, NUM_E] (shared memory, in the idle weight rings) and warp t routes
// token t. Slices: enough (expert, slice) units for every warp, each at least 256 elements of H.
__device__ __forceinline__ void route_tokens(const void* __restrict__ router_w, const void* __restrict__ bias,
                                             float scaling, float* __restrict__ parts, const uint4* __restrict__ xv,
                                             float* lg,
                                             int num_tokens, int hidden, int gw, int num_warps, DecodeShared& S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, v1 = hidden / 8;
    const int slices = max(1, min(num_warps / NUM_E, ceil_div(hidden, 256)));
    const int slice_v = ceil_div(v1, slices);  // 16-byte x vectors per slice
    typedef typename Elem<RW_DT>::T RT;
    typedef VecIO<RW_DT, 16> RV;
    for (int unit = gw; unit < NUM_E * slices; unit += num_warps) {
        const int e = unit / slices, sl = unit - e * slices;
        const int vend = min(v1, (sl + 1) * slice_v);
        const uint4* w = (const uint4*)((const RT*)router_w + (i64)e * hidden);
        float acc[TMAX];
#pragma unroll
        for (int m = 0; m < TMAX; ++m) acc[m] = 0.f;
#pragma unroll 2
        for (int v = sl * slice_v + lane; v < vend; v += 32) {
            float fw[8];
#pragma unroll
            for (int i = 0; i < 8 / RV::N; ++i) RV::unpack(__ldg(w + v * (8 / RV::N) + i), fw + i * RV::N);
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                if (m < num_tokens) {
                    float fx[8];
                    V16::unpack(__ldg(xv + m * v1 + v), fx);
                    acc[m] = dot8(fw, fx, acc[m]);
                }
            }
        }
#pragma unroll
        for (int m = 0; m < TMAX; ++m)
            if (m < num_tokens) acc[m] = warp_sum(acc[m]);
        if (lane < num_tokens) parts[((i64)lane * NUM_E + e) * slices + sl] = pick(acc, lane);
    }
    grid_barrier();
    for (int i = threadIdx.x; i < num_tokens * NUM_E; i += NT) {
        const float* p = parts + (i64)i * slices;
        float r = 0.f;
        for (int s0 = 0; s0 < slices; s0 += 16) {  // 16 loads in flight, then the sums in slice order
            float v[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] = s0 + j < slices ? __ldcg(p + s0 + j) : 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) r += v[j];
        }
        lg[i] = r;
    }
    __syncthreads();
    if (warp < num_tokens) route_token(lg, NUM_E, bias, scaling, S.weight, S.ids, warp, lane, warp);
}
#endif

// The weight steps of one warp, in order: GEMM1's units gw, gw + num_warps, ... of (pair p = u * I + j,
// member group g), each in chunks of CHUNK bytes of the gate row and of the up row; then GEMM2's
// output columns gw, gw + num_warps, ..., each in chunks of STAGE_BYTES of row c of every active
// expert's w2. Only lane 0 issues (and tracks this cursor).
struct Issuer {
    int n;                   // next step
    int k, u, ch;            // GEMM1: unit, -, chunk; GEMM2: column, expert, chunk (of this warp's)
    const unsigned char* row;  // GEMM1: the unit's gate row
};

__device__ __forceinline__ void issue(Issuer& it, int steps1, int steps2, const DecodeShared& S, const XT* w1,
                                      const XT* w2, int gw, int num_warps, int hidden, int inter, unsigned char* ring,
                                      u64* bars, u64 policy) {
    const int n = it.n;
    if (n >= steps1 + steps2) return;
    unsigned char* stage = ring + (n % STAGES) * STAGE_BYTES;
    u64* bar = bars + n % STAGES;
    if (n < steps1) {
        const int row = hidden * EX::SIZE;
        if (it.ch == 0) {
            const int p = (gw + it.k * num_warps) / S.groups, u = p / inter, j = p - u * inter;
            it.row = (const unsigned char*)(w1 + ((i64)S.expert[u] * 2 * inter + j) * hidden);
        }
        const unsigned char* gate = it.row + it.ch * CHUNK;
        const u32 bytes = min(CHUNK, row - it.ch * CHUNK);
        mbar_expect(bar, 2 * bytes);
        bulk_load(stage, gate, bytes, bar, policy);
        bulk_load(stage + CHUNK, gate + (i64)inter * row, bytes, bar, policy);
        if (++it.ch * CHUNK >= row) {
            it.ch = 0;
            if (++it.k * num_warps + gw >= S.num_u * inter * S.groups) it.k = it.u = 0;  // GEMM2 next
        }
    } else {
        const int row = inter * EX::SIZE;
        const unsigned char* src = (const unsigned char*)(w2 + ((i64)S.expert[it.u] * hidden + gw + it.k * num_warps) * inter)
                                   + it.ch * STAGE_BYTES;
        const u32 bytes = min(STAGE_BYTES, row - it.ch * STAGE_BYTES);
        mbar_expect(bar, bytes);
        bulk_load(stage, src, bytes, bar, policy);
        if (++it.ch * STAGE_BYTES >= row) {
            it.ch = 0;
            if (++it.u == S.num_u) {
                it.u = 0;
                ++it.k;
            }
        }
    }
    ++it.n;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
moe_decode(const XT* __restrict__ x, const XT* __restrict__ w1, const XT* __restrict__ w2,
           const typename Elem<B1_DT>::T* __restrict__ b1, const typename Elem<B2_DT>::T* __restrict__ b2,
           const typename Elem<TW_DT>::T* __restrict__ topk_w, const IdT* __restrict__ topk_ids,
           const typename Elem<SH_DT>::T* __restrict__ shared, XT* __restrict__ out, XT* __restrict__ h,
           const void* __restrict__ router_w, const void* __restrict__ route_bias, double route_scaling,
           float* __restrict__ logit_parts, int num_tokens, int hidden, int inter, int num_experts) {
    __shared__ DecodeShared S;
    __shared__ u64 bars_all[NW * STAGES];
    // dynamic shared memory: each warp's ring of STAGES stages, then x's rows [T, H] (GEMM1), later
    // the activations' rows [T*k, I] (GEMM2)
    extern __shared__ __align__(128) unsigned char dsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    unsigned char* const ring = dsm + warp * STAGES * STAGE_BYTES;
    u64* const bars = bars_all + warp * STAGES;
    uint4* const rows = (uint4*)(dsm + NW * STAGES * STAGE_BYTES);
    if (tid < NW * STAGES) mbar_init(bars_all + tid);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    PDL_ENTER();
    const int num_entries = num_tokens * TOP_K;
    const int v1 = hidden / 8, v2 = inter / 8;  // 16-byte vectors per w1 / w2 row
    for (int i = tid; i < num_tokens * v1; i += NT) cp_async16(rows + i, (const uint4*)x + i);  // x's rows, for GEMM1
    const int gw = blockIdx.x * NW + warp, num_warps = gridDim.x * NW;
#if ROUTE
    route_tokens(router_w, route_bias, (float)route_scaling, logit_parts, (const uint4*)x, (float*)dsm, num_tokens,
                 hidden, gw, num_warps, S);
#else
    if (tid < num_entries) {
        const i64 e = (i64)topk_ids[tid];
        S.ids[tid] = (e >= 0 && e < num_experts) ? (int)e : -1;
        S.weight[tid] = Elem<TW_DT>::to_f32(topk_w[tid]);
    }
#endif
    cp_async_wait_all();
#if ROUTE
    if (num_tokens == 1) {  // one token's k experts are distinct: group u = selection slot u (the routing lanes)
        if (tid < TOP_K) {
            S.expert[tid] = S.ids[tid];
            S.start[tid] = S.order[tid] = tid;
            S.count[tid] = 1;
        }
        if (tid == 0) {
            S.num_u = TOP_K;
            S.groups = 1;
        }
        __syncthreads();  // (publishes the mbarrier inits and x's rows)
    } else
#endif
    group_entries(num_entries, S);  // (its barriers publish the mbarrier inits and x's rows)

    const int num_u = S.num_u, groups = S.groups;
    const int nch1 = ceil_div(hidden * EX::SIZE, CHUNK), nch2 = ceil_div(inter * EX::SIZE, STAGE_BYTES);
    const int units1 = num_u * inter * groups;
    const int steps1 = (units1 > gw ? ceil_div(units1 - gw, num_warps) : 0) * nch1;
    const int steps2 = (hidden > gw ? ceil_div(hidden - gw, num_warps) : 0) * num_u * nch2;
    Issuer it{0, 0, 0, 0, nullptr};
    const u64 policy = evict_first_policy();
    if (lane == 0)
        for (int i = 0; i < STAGES; ++i) issue(it, steps1, steps2, S, w1, w2, gw, num_warps, hidden, inter, ring, bars, policy);

    // ---- GEMM1 + activation
    float ag[TMAX], au[TMAX];
    int tok[TMAX];
    int k = 0, ch = 0, u = 0, j = 0, nm = 0, first = 0;
    for (int n = 0; n < steps1; ++n) {
        if (ch == 0) {
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
        mbar_wait(bars + n % STAGES, (n / STAGES) & 1);
        const uint4* stage = (const uint4*)(ring + (n % STAGES) * STAGE_BYTES);
        const int vb = ch * (CHUNK / 16), nvec = min(CHUNK / 16, v1 - vb);
#pragma unroll 4
        for (int i = lane; i < nvec; i += 32) {
            float fg[8], fu[8];
            V16::unpack(stage[i], fg);
            V16::unpack(stage[CHUNK / 16 + i], fu);
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                if (m < nm) {
                    float fx[8];
                    V16::unpack(rows[tok[m] * v1 + vb + i], fx);
                    ag[m] = dot8(fg, fx, ag[m]);
                    au[m] = dot8(fu, fx, au[m]);
                }
            }
        }
        __syncwarp();
        if (lane == 0) issue(it, steps1, steps2, S, w1, w2, gw, num_warps, hidden, inter, ring, bars, policy);
        if (++ch == nch1) {
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
            ch = 0;
            ++k;
        }
    }

    // ---- GEMM2 + router weight + combine (its first steps are already loading)
    grid_barrier();
    for (int i = tid; i < num_entries * v2; i += NT)
        if (S.ids[i / v2] >= 0) rows[i] = __ldcg((const uint4*)h + i);
    __syncthreads();

    float acc[TMAX];
#pragma unroll
    for (int t = 0; t < TMAX; ++t) acc[t] = 0.f;
    k = ch = u = 0;
    for (int n = steps1; n < steps1 + steps2; ++n) {
        mbar_wait(bars + n % STAGES, (n / STAGES) & 1);
        const uint4* stage = (const uint4*)(ring + (n % STAGES) * STAGE_BYTES);
        const int vb = ch * (STAGE_BYTES / 16), nvec = min(STAGE_BYTES / 16, v2 - vb);
        const int s0 = S.start[u], cnt = S.count[u];
        for (int m = 0; m < cnt; ++m) {
            const int entry = S.order[s0 + m];
            const uint4* hrow = rows + entry * v2 + vb;
            float d = 0.f;
#pragma unroll 4
            for (int i = lane; i < nvec; i += 32) {
                float fw[8], fh[8];
                V16::unpack(stage[i], fw);
                V16::unpack(hrow[i], fh);
                d = dot8(fw, fh, d);
            }
            add_to(acc, entry / TOP_K, S.weight[entry] * d);
        }
        __syncwarp();
        if (lane == 0) issue(it, steps1, steps2, S, w1, w2, gw, num_warps, hidden, inter, ring, bars, policy);
        if (++ch == nch2) {
            ch = 0;
            if (++u == num_u) {
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
#pragma unroll
                for (int t = 0; t < TMAX; ++t) acc[t] = 0.f;
                u = 0;
                ++k;
            }
        }
    }
    if (num_u == 0) {  // every id dropped: out = shared_output (or zeros)
        for (int i = blockIdx.x * NT + tid; i < num_tokens * hidden; i += gridDim.x * NT) {
            float r = 0.f;
#if HAS_SHARED
            r = Elem<SH_DT>::to_f32(shared[i]);
#endif
            out[i] = EX::from_f32(r);
        }
    }
}
