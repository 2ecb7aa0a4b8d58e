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
// Defines: X_DT (x, weights unless W_FP8, h, out), W_FP8 + QMODE (fp8 weights, see below), TW_DT (topk weights), B1_DT / B2_DT (biases), SH_DT (shared_output), IDS_I64,
// TOP_K, TMAX (tokens at most), ACT (0 silu, 1 gelu, 2 swiglu_oai), HAS_B1, HAS_B2, HAS_SHARED,
// NW (warps per CTA), UNROLL (16-byte vectors per row, lane and step), STAGES (ring depth),
// TMAX * TOP_K <= NW * 32.
#include "common.cuh"

#define MAXR (TMAX * TOP_K)

typedef Elem<X_DT> EX;
typedef EX::T XT;
typedef VecIO<X_DT, 16> V16;
#if W_FP8
// fp8 e4m3 weights with QMODE scales (1 per expert, 2 per output channel, 3 per 128 x 128 block);
// x and the activations are fake-quantized in the same mode (cute_moe.quant) into float rows.
typedef u8 WT;
#define WSIZE 1
#else
typedef XT WT;
#define WSIZE 2
#endif
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

#if W_FP8
// 16 e4m3 codes -> floats
__device__ __forceinline__ void e4m3x16_to_f32(const uint4& v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            u32 h2;
            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((u16)(w[i] >> (16 * half))));
            f[4 * i + 2 * half] = f16_to_f32((u16)(h2 & 0xffffu));
            f[4 * i + 2 * half + 1] = f16_to_f32((u16)(h2 >> 16));
        }
    }
}

// v quantized to e4m3 with `scale` (IEEE division, round to nearest even, saturated) and back
__device__ __forceinline__ float fake_quant(float v, float scale) {
    u16 b;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(b) : "f"(0.f), "f"(v / scale));
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(b));
    return f16_to_f32((u16)(h2 & 0xffffu)) * scale;
}

__device__ __forceinline__ float dot16(const float* w, const float* x) {
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) d = fmaf(w[i], x[i], d);
    return d;
}

// dst [rows, cols] floats (shared memory) = src [rows, cols] (global, X_DT) fake-quantized in QMODE's
// activation scheme: one scale over every used row (1), per row (2), per 1 x 128 group (3). Rows with
// used(r) false are skipped (and do not count in the per-tensor amax).
template <typename Used>
__device__ __forceinline__ void fake_quant_rows(const XT* __restrict__ src, int rows, int cols, float* dst, Used used,
                                                float* red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#if QMODE == 1
    float amax = 0.f;
    for (int i = tid; i < rows * cols; i += NT)
        if (used(i / cols)) amax = nanmax(amax, fabsf(EX::to_f32(__ldcg(src + i))));
    amax = warp_max(amax);
    if (lane == 0) red[warp] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < NW; ++w) amax = nanmax(amax, red[w]);
    const float scale = fp8_scale(amax);
    for (int i = tid; i < rows * cols; i += NT)
        if (used(i / cols)) dst[i] = fake_quant(EX::to_f32(__ldcg(src + i)), scale);
#else
    const int group = QMODE == 2 ? cols : FP8_GROUP, per_row = ceil_div(cols, group);
    for (int g = warp; g < rows * per_row; g += NW) {
        const int r = g / per_row, c0 = (g - r * per_row) * group, c1 = min(c0 + group, cols);
        if (!used(r)) continue;
        float amax = 0.f;
        for (int c = c0 + lane; c < c1; c += 32) amax = nanmax(amax, fabsf(EX::to_f32(__ldcg(src + (i64)r * cols + c))));
        const float scale = fp8_scale(warp_max(amax));
        for (int c = c0 + lane; c < c1; c += 32)
            dst[(i64)r * cols + c] = fake_quant(EX::to_f32(__ldcg(src + (i64)r * cols + c)), scale);
    }
#endif
    __syncthreads();
}
#endif

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

// The weight steps of one warp, in order: GEMM1's units gw, gw + num_warps, ... of (pair p = u * I + j,
// member group g), each in chunks of CHUNK bytes of the gate row and of the up row; then GEMM2's
// output columns gw, gw + num_warps, ..., each in chunks of STAGE_BYTES of row c of every active
// expert's w2. Only lane 0 issues (and tracks this cursor).
struct Issuer {
    int n;                   // next step
    int k, u, ch;            // GEMM1: unit, -, chunk; GEMM2: column, expert, chunk (of this warp's)
    const unsigned char* row;  // GEMM1: the unit's gate row
};

__device__ __forceinline__ void issue(Issuer& it, int steps1, int steps2, const DecodeShared& S, const WT* w1,
                                      const WT* w2, int gw, int num_warps, int hidden, int inter, unsigned char* ring,
                                      u64* bars, u64 policy) {
    const int n = it.n;
    if (n >= steps1 + steps2) return;
    unsigned char* stage = ring + (n % STAGES) * STAGE_BYTES;
    u64* bar = bars + n % STAGES;
    if (n < steps1) {
        const int row = hidden * WSIZE;
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
        const int row = inter * WSIZE;
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
moe_decode(const XT* __restrict__ x, const WT* __restrict__ w1, const WT* __restrict__ w2,
           const float* __restrict__ s1, const float* __restrict__ s2, const typename Elem<B1_DT>::T* __restrict__ b1, const typename Elem<B2_DT>::T* __restrict__ b2,
           const typename Elem<TW_DT>::T* __restrict__ topk_w, const IdT* __restrict__ topk_ids,
           const typename Elem<SH_DT>::T* __restrict__ shared, XT* __restrict__ out, XT* __restrict__ h,
           int num_tokens, int hidden, int inter, int num_experts) {
    __shared__ DecodeShared S;
    __shared__ u64 bars_all[NW * STAGES];
    // dynamic shared memory: each warp's ring of STAGES stages, then x's rows [T, H] (GEMM1), later
    // the activations' rows [T*k, I] (GEMM2); X_DT, or float (fake-quantized) with W_FP8
    extern __shared__ __align__(128) unsigned char dsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    unsigned char* const ring = dsm + warp * STAGES * STAGE_BYTES;
    u64* const bars = bars_all + warp * STAGES;
    uint4* const rows = (uint4*)(dsm + NW * STAGES * STAGE_BYTES);
    if (tid < NW * STAGES) mbar_init(bars_all + tid);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    PDL_ENTER();
    const int num_entries = num_tokens * TOP_K;
    const int v1 = hidden * WSIZE / 16, v2 = inter * WSIZE / 16;  // 16-byte weight vectors per w1 / w2 row
#if W_FP8
    __shared__ float red[NW];
    float* const rowsf = (float*)rows;
    fake_quant_rows(x, num_tokens, hidden, rowsf, [](int) { return true; }, red);
#else
    for (int i = tid; i < num_tokens * v1; i += NT) rows[i] = ((const uint4*)x)[i];
#endif
    group_entries(topk_ids, topk_w, num_entries, num_experts, S);  // (its barriers publish the mbarrier inits)

    const int gw = blockIdx.x * NW + warp, num_warps = gridDim.x * NW;
    const int num_u = S.num_u, groups = S.groups;
    const int nch1 = ceil_div(hidden * WSIZE, CHUNK), nch2 = ceil_div(inter * WSIZE, STAGE_BYTES);
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
#if W_FP8
#if QMODE == 3
        const int nbh = ceil_div(hidden, 128), nbi = ceil_div(inter, 128);
        const float* sgate = s1 + ((i64)S.expert[u] * 2 * nbi + j / 128) * nbh;  // gate, up blocked apart
        const float* sup = sgate + (i64)nbi * nbh;
#endif
#pragma unroll 2
        for (int i = lane; i < nvec; i += 32) {
            float fg[16], fu[16];
            e4m3x16_to_f32(stage[i], fg);
            e4m3x16_to_f32(stage[CHUNK / 16 + i], fu);
            const int kk = (vb + i) * 16;
#if QMODE == 3
            const float sg = __ldg(sgate + kk / 128), su = __ldg(sup + kk / 128);
#else
            const float sg = 1.f, su = 1.f;
#endif
#pragma unroll
            for (int m = 0; m < TMAX; ++m) {
                if (m < nm) {
                    float fx[16];
                    const float4* xr = (const float4*)(rowsf + (i64)tok[m] * hidden + kk);
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float4 v = xr[q];
                        fx[4 * q] = v.x;
                        fx[4 * q + 1] = v.y;
                        fx[4 * q + 2] = v.z;
                        fx[4 * q + 3] = v.w;
                    }
                    ag[m] = fmaf(sg, dot16(fg, fx), ag[m]);
                    au[m] = fmaf(su, dot16(fu, fx), au[m]);
                }
            }
        }
#else
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
#endif
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
#if W_FP8 && QMODE == 1
                g *= s1[S.expert[u]];
                up *= s1[S.expert[u]];
#elif W_FP8 && QMODE == 2
                g *= s1[(i64)S.expert[u] * 2 * inter + j];
                up *= s1[(i64)S.expert[u] * 2 * inter + inter + j];
#endif
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
#if W_FP8
    fake_quant_rows(h, num_entries, inter, rowsf, [&](int r) { return S.ids[r] >= 0; }, red);
#else
    for (int i = tid; i < num_entries * v2; i += NT)
        if (S.ids[i / v2] >= 0) rows[i] = __ldcg((const uint4*)h + i);
    __syncthreads();
#endif

    float acc[TMAX];
#pragma unroll
    for (int t = 0; t < TMAX; ++t) acc[t] = 0.f;
    k = ch = u = 0;
    for (int n = steps1; n < steps1 + steps2; ++n) {
        mbar_wait(bars + n % STAGES, (n / STAGES) & 1);
        const uint4* stage = (const uint4*)(ring + (n % STAGES) * STAGE_BYTES);
        const int vb = ch * (STAGE_BYTES / 16), nvec = min(STAGE_BYTES / 16, v2 - vb);
        const int s0 = S.start[u], cnt = S.count[u];
#if W_FP8 && QMODE == 3
        const float* srow = s2 + ((i64)S.expert[u] * ceil_div(hidden, 128) + (gw + k * num_warps) / 128) *
                                     ceil_div(inter, 128);
#elif W_FP8 && QMODE == 2
        const float sc = s2[(i64)S.expert[u] * hidden + gw + k * num_warps];
#elif W_FP8
        const float sc = s2[S.expert[u]];
#endif
        for (int m = 0; m < cnt; ++m) {
            const int entry = S.order[s0 + m];
            float d = 0.f;
#if W_FP8
            const float* hrow = rowsf + (i64)entry * inter;
#pragma unroll 2
            for (int i = lane; i < nvec; i += 32) {
                float fw[16], fh[16];
                e4m3x16_to_f32(stage[i], fw);
                const int kk = (vb + i) * 16;
                const float4* hr = (const float4*)(hrow + kk);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float4 v = hr[q];
                    fh[4 * q] = v.x;
                    fh[4 * q + 1] = v.y;
                    fh[4 * q + 2] = v.z;
                    fh[4 * q + 3] = v.w;
                }
#if QMODE == 3
                d = fmaf(__ldg(srow + kk / 128), dot16(fw, fh), d);
#else
                d += dot16(fw, fh);
#endif
            }
#if QMODE != 3
            d *= sc;
#endif
#else
            const uint4* hrow = rows + entry * v2 + vb;
#pragma unroll 4
            for (int i = lane; i < nvec; i += 32) {
                float fw[8], fh[8];
                V16::unpack(stage[i], fw);
                V16::unpack(hrow[i], fh);
                d = dot8(fw, fh, d);
            }
#endif
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
