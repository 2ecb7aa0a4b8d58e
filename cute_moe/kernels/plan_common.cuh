// The stable counting sort behind the routing plan, as CTA-level steps shared by plan.cu (ids from
// memory) and route_plan.cu (ids from the router in the same kernel).
//
// The flat index space [0, n) (n = T * k, index t*k + j) is cut into chunks, one per CTA, and each
// chunk into NW contiguous per-warp spans. Row of index i inside its expert's segment = (count of
// that expert in earlier chunks) + (count in earlier spans of this chunk) + (count in earlier
// 32-index steps of this span) + (lanes to the left in this step with the same expert) -- i.e.
// ascending flat index, deterministic. A CTA needs every chunk's histogram (block_hist [chunks, E])
// for its offsets and the expert totals. Ids outside [0, E) are dropped (their token rows are -1),
// e.g. experts of another rank.
// Latency, not bandwidth, bounds these steps: ids are loaded IDS_BATCH steps ahead of their use,
// counting uses shared-memory atomics (order-free; measured on H200, counting with __match_any_sync
// made E=128 plans 1.2-1.3x slower; it stays for the scatter's stable ranks, where one ballot per id
// bit measured no faster), chunk histograms can be loaded before the span counting so that their
// latencies overlap, and per-expert sums run one thread per expert with independent loads.
//
// Defines: NUM_E, NW (warps per CTA), IDS_I64, HAS_PADDED, HAS_MASKED.
#pragma once
#include "common.cuh"

#define WSTRIDE (NW + 1 + NW % 2)  // odd, > NW
#define IDS_BATCH 8                // 32-index steps whose ids one warp loads before using them
// threads per expert in the span-offset scan: a power of two dividing NW (and 32) with
// NUM_E * SPAN_PARTS <= NW * 32 (all experts in one pass), else 1
#define SPAN_PARTS_FIT(p) (NW % (p) == 0 && NUM_E * (p) <= NW * 32)
#define SPAN_PARTS (SPAN_PARTS_FIT(8) ? 8 : SPAN_PARTS_FIT(4) ? 4 : SPAN_PARTS_FIT(2) ? 2 : 1)

#if IDS_I64
typedef long long expert_id_t;
#else
typedef int expert_id_t;
#endif

// A global load; COHERENT: of data written earlier in this kernel, so through L2 rather than the
// read-only path.
template <bool COHERENT, class T>
__device__ __forceinline__ T load_global(const T* p) {
    return COHERENT ? __ldcg(p) : __ldg(p);
}

// Where the plan steps read the ids: global memory, or shared memory holding [base, base + n).
template <bool COHERENT>
struct GlobalIds {
    const expert_id_t* p;
    __device__ __forceinline__ expert_id_t operator()(int i) const { return load_global<COHERENT>(p + i); }
};

struct SharedIds {
    const int* s;
    int base;
    __device__ __forceinline__ int operator()(int i) const { return s[i - base]; }
};

template <class Ids>
__device__ __forceinline__ int load_expert(const Ids& ids, int i, int end) {
    if (i >= end) return -1;
    const expert_id_t e = ids(i);
    return (e >= 0 && e < NUM_E) ? (int)e : -1;
}

struct PlanShared {
    // per-span counts, then each span's offset in its expert segment; [expert][span], odd row stride
    // so lanes touching different experts hit different banks
    int warp_off[NUM_E][WSTRIDE];
    int total[NUM_E];   // rows of each expert over all chunks
    int before[NUM_E];  // rows of each expert in earlier chunks
    int cu_s[NUM_E + 1];
#if HAS_PADDED
    int pcu_s[NUM_E + 1];
#endif
    int scan_tmp[64];
};

// The plan's outputs (see cute_moe/plan.py).
struct PlanOut {
    int n;
    int* counts;
    int* cu_seqlens;
    int* row_src;
    int* token_rows;
    int block_m, padded_rows, num_blocks_cap;
    int* padded_cu_seqlens;
    int* padded_row_src;
    int* padded_token_rows;
    int* expert_of_block;
    int max_m;
    int* masked_m;
    int* masked_row_src;
    int* masked_token_rows;
    int* overflow;
};

__device__ __forceinline__ void plan_init(PlanShared& S) {
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
#pragma unroll
        for (int w = 0; w < NW; ++w) S.warp_off[e][w] = 0;
        S.total[e] = 0;
        S.before[e] = 0;
    }
}

// This warp's span histogram into S.warp_off[.][warp].
template <class Ids>
__device__ __forceinline__ void plan_count_span(const Ids& ids, int span_start, int span_end, PlanShared& S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int b0 = span_start; b0 < span_end; b0 += 32 * IDS_BATCH) {
        int ev[IDS_BATCH];
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) ev[u] = load_expert(ids, b0 + 32 * u + lane, span_end);
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u)
            if (ev[u] >= 0) atomicAdd(&S.warp_off[ev[u]][warp], 1);
    }
}

// Sums of the chunk histograms: S.total (all chunks) and S.before (chunks before this CTA's).
// Thread (hg, he) sums chunks hg, hg + G, ... of expert he; plan_chunks_load issues the first
// IDS_BATCH loads (call it early so their latency overlaps other work), plan_chunks_sum the rest.
struct ChunkLoads {
    int v[IDS_BATCH];
};

template <bool COHERENT>
__device__ __forceinline__ ChunkLoads plan_chunks_load(const int* block_hist, int num_chunks) {
    ChunkLoads h{};
#if (NW * 32) % NUM_E == 0
    constexpr int G = NW * 32 / NUM_E;
    const int he = threadIdx.x % NUM_E, hg = threadIdx.x / NUM_E;
#pragma unroll
    for (int u = 0; u < IDS_BATCH; ++u) {
        const int c = hg + u * G;
        h.v[u] = num_chunks > 1 && c < num_chunks ? load_global<COHERENT>(block_hist + (i64)c * NUM_E + he) : 0;
    }
#endif
    return h;
}

template <bool COHERENT>
__device__ __forceinline__ void plan_chunks_sum(const int* block_hist, int num_chunks, const ChunkLoads& h,
                                                PlanShared& S) {
#if (NW * 32) % NUM_E == 0
    constexpr int G = NW * 32 / NUM_E;
    const int he = threadIdx.x % NUM_E, hg = threadIdx.x / NUM_E;
    int tot = 0, bef = 0;
#pragma unroll
    for (int u = 0; u < IDS_BATCH; ++u) {
        tot += h.v[u];
        bef += hg + u * G < (int)blockIdx.x ? h.v[u] : 0;
    }
#pragma unroll 8
    for (int c = hg + IDS_BATCH * G; c < num_chunks; c += G) {
        const int v = load_global<COHERENT>(block_hist + (i64)c * NUM_E + he);
        tot += v;
        bef += c < (int)blockIdx.x ? v : 0;
    }
    if (G == 1) {
        S.total[he] = tot;
        S.before[he] = bef;
    } else {
        atomicAdd(&S.total[he], tot);
        atomicAdd(&S.before[he], bef);
    }
#else
    for (int i = threadIdx.x; i < num_chunks * NUM_E; i += NW * 32) {
        const int c = load_global<COHERENT>(block_hist + i);
        const int e = i % NUM_E;
        atomicAdd(&S.total[e], c);
        if (i / NUM_E < (int)blockIdx.x) atomicAdd(&S.before[e], c);
    }
#endif
}

// Exclusive scan of (a, b) over the CTA's threads in thread order; returns the CTA totals.
// Every thread must call it; tmp holds 2 * 32 ints. Warp scans by shuffles, then every warp reduces
// the warp totals itself (lane w holds warp w's: no serial loop over the warps).
__device__ __forceinline__ void cta_exclusive_scan2(int a, int b, int& ea, int& eb, int& ta, int& tb,
                                                    int* tmp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int ia = a, ib = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int xa = __shfl_up_sync(FULL_MASK, ia, o);
        const int xb = __shfl_up_sync(FULL_MASK, ib, o);
        if (lane >= o) {
            ia += xa;
            ib += xb;
        }
    }
    if (lane == 31) {
        tmp[warp] = ia;
        tmp[32 + warp] = ib;
    }
    __syncthreads();
    const int wa = lane < NW ? tmp[lane] : 0, wb = lane < NW ? tmp[32 + lane] : 0;
    ta = __reduce_add_sync(FULL_MASK, wa);
    tb = __reduce_add_sync(FULL_MASK, wb);
    ea = __reduce_add_sync(FULL_MASK, lane < warp ? wa : 0) + ia - a;
    eb = __reduce_add_sync(FULL_MASK, lane < warp ? wb : 0) + ib - b;
    __syncthreads();  // tmp is reused by the next call
}

// Everything after the counting: span offsets, segment starts, the per-expert outputs (CTA 0), the
// -1 fills, and the stable scatter of this warp's span [span_start, span_end). Expects the span
// histograms in S.warp_off and, with several chunks, S.total / S.before (not yet synchronized).
template <class Ids>
__device__ __forceinline__ void plan_finish(const Ids& ids, int num_chunks, int span_start, int span_end,
                                            PlanShared& S, const PlanOut& o) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int nthreads = NW * 32;
    __syncthreads();

    // span offsets within each expert segment (and totals when this is the only chunk): SPAN_PARTS
    // consecutive threads per expert each run over NW / SPAN_PARTS spans, then scan their sums by
    // shuffles (odd row stride: no bank conflicts)
    for (int t0 = 0; t0 < NUM_E * SPAN_PARTS; t0 += nthreads) {  // uniform trip count: full-warp shuffles
        const int t = t0 + threadIdx.x;
        const bool valid = t < NUM_E * SPAN_PARTS;
        const int e = valid ? t / SPAN_PARTS : 0, part = t % SPAN_PARTS;
        constexpr int per = NW / SPAN_PARTS;
        int c[per], sum = 0;
#pragma unroll
        for (int w = 0; w < per; ++w) {
            c[w] = valid ? S.warp_off[e][part * per + w] : 0;
            sum += c[w];
        }
        int incl = sum;
#pragma unroll
        for (int o = 1; o < SPAN_PARTS; o <<= 1) {
            const int x = __shfl_up_sync(FULL_MASK, incl, o, SPAN_PARTS);
            if (part >= o) incl += x;
        }
        if (valid) {
            int run = S.before[e] + incl - sum;
#pragma unroll
            for (int w = 0; w < per; ++w) {
                S.warp_off[e][part * per + w] = run;
                run += c[w];
            }
            if (num_chunks == 1 && part == SPAN_PARTS - 1) S.total[e] = run;
        }
    }
    __syncthreads();

    // segment starts: exclusive scans of the counts and of the block_m-padded counts
    int carry = 0, pcarry = 0;
    for (int base = 0; base < NUM_E; base += nthreads) {
        const int e = base + threadIdx.x;
        const int c = e < NUM_E ? S.total[e] : 0;
#if HAS_PADDED
        const int pc = (c + o.block_m - 1) / o.block_m * o.block_m;
#else
        const int pc = 0;
#endif
        int ex, pex, tot, ptot;
        cta_exclusive_scan2(c, pc, ex, pex, tot, ptot, S.scan_tmp);
        if (e < NUM_E) {
            S.cu_s[e] = carry + ex;
#if HAS_PADDED
            S.pcu_s[e] = pcarry + pex;
#endif
        }
        carry += tot;
        pcarry += ptot;
    }
    if (threadIdx.x == 0) {
        S.cu_s[NUM_E] = carry;
#if HAS_PADDED
        S.pcu_s[NUM_E] = pcarry;
#endif
    }
    __syncthreads();

    // per-expert outputs (CTA 0) and the -1 fills of rows/blocks that hold no (token, slot)
    if (blockIdx.x == 0) {
#if HAS_MASKED
        int over = 0;
#endif
        for (int e = threadIdx.x; e <= NUM_E; e += nthreads) {
            o.cu_seqlens[e] = S.cu_s[e];
#if HAS_PADDED
            o.padded_cu_seqlens[e] = S.pcu_s[e];
#endif
            if (e < NUM_E) {
                o.counts[e] = S.total[e];
#if HAS_MASKED
                o.masked_m[e] = min(S.total[e], o.max_m);
                over |= S.total[e] > o.max_m;
#endif
            }
        }
#if HAS_MASKED
        over = __syncthreads_or(over);
        if (threadIdx.x == 0) o.overflow[0] = over;
#endif
    }
    const int gwarp = blockIdx.x * NW + warp;
    const int nwarps = gridDim.x * NW;
    for (int e = gwarp; e < NUM_E; e += nwarps) {
#if HAS_PADDED
        for (int r = S.pcu_s[e] + S.total[e] + lane; r < S.pcu_s[e + 1]; r += 32) o.padded_row_src[r] = -1;
        for (int b = S.pcu_s[e] / o.block_m + lane; b < S.pcu_s[e + 1] / o.block_m; b += 32) o.expert_of_block[b] = e;
#endif
#if HAS_MASKED
        const i64 mbase = (i64)e * o.max_m;
        for (int r = min(S.total[e], o.max_m) + lane; r < o.max_m; r += 32) o.masked_row_src[mbase + r] = -1;
#endif
    }
    const int gtid = blockIdx.x * nthreads + threadIdx.x;
    const int gthreads = gridDim.x * nthreads;
    for (int r = S.cu_s[NUM_E] + gtid; r < o.n; r += gthreads) o.row_src[r] = -1;
#if HAS_PADDED
    for (int r = S.pcu_s[NUM_E] + gtid; r < o.padded_rows; r += gthreads) o.padded_row_src[r] = -1;
    for (int b = S.pcu_s[NUM_E] / o.block_m + gtid; b < o.num_blocks_cap; b += gthreads) o.expert_of_block[b] = -1;
#endif

    // stable scatter: each warp walks its span in order
    const u32 lt = lanemask_lt();
    for (int b0 = span_start; b0 < span_end; b0 += 32 * IDS_BATCH) {
        int ev[IDS_BATCH];
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) ev[u] = load_expert(ids, b0 + 32 * u + lane, span_end);
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) {
            if (b0 + 32 * u >= span_end) break;  // warp-uniform
            const int i = b0 + 32 * u + lane;
            const int e = ev[u];
            const u32 peers = __match_any_sync(FULL_MASK, e);
            if (e >= 0) {
                const int local = S.warp_off[e][warp] + __popc(peers & lt);
                const int row = S.cu_s[e] + local;
                o.row_src[row] = i;
                o.token_rows[i] = row;
#if HAS_PADDED
                const int prow = S.pcu_s[e] + local;
                o.padded_row_src[prow] = i;
                o.padded_token_rows[i] = prow;
#endif
#if HAS_MASKED
                int mrow = -1;
                if (local < o.max_m) {
                    mrow = e * o.max_m + local;
                    o.masked_row_src[mrow] = i;
                }
                o.masked_token_rows[i] = mrow;
#endif
            } else if (i < span_end) {
                o.token_rows[i] = -1;
#if HAS_PADDED
                o.padded_token_rows[i] = -1;
#endif
#if HAS_MASKED
                o.masked_token_rows[i] = -1;
#endif
            }
            __syncwarp();
            if (e >= 0 && (__ffs(peers) - 1) == lane) S.warp_off[e][warp] += __popc(peers);
            __syncwarp();
        }
    }
}

// The kernel parameters that make up a PlanOut (the same list in plan_scatter and route_plan).
#define PLAN_OUT_PARAMS                                                                                  \
    int *__restrict__ counts, int *__restrict__ cu_seqlens, int *__restrict__ row_src,                   \
        int *__restrict__ token_rows, int block_m, int padded_rows, int num_blocks_cap,                  \
        int *__restrict__ padded_cu_seqlens, int *__restrict__ padded_row_src,                           \
        int *__restrict__ padded_token_rows, int *__restrict__ expert_of_block, int max_m,               \
        int *__restrict__ masked_m, int *__restrict__ masked_row_src, int *__restrict__ masked_token_rows, \
        int *__restrict__ overflow
#define PLAN_OUT(n)                                                                                      \
    PlanOut{n, counts, cu_seqlens, row_src, token_rows, block_m, padded_rows, num_blocks_cap,            \
            padded_cu_seqlens, padded_row_src, padded_token_rows, expert_of_block, max_m, masked_m,      \
            masked_row_src, masked_token_rows, overflow}
