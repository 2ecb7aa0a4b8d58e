// Token -> expert plan: a stable counting sort of the flat (token, slot) indices by expert id.
//
// The flat index space [0, n) (n = T * k, index t*k + j) is cut into chunks of `chunk` indices, one
// per CTA, and each chunk into NW contiguous per-warp spans. Row of index i inside its expert's
// segment = (count of that expert in earlier chunks) + (count in earlier spans of this chunk)
// + (count in earlier 32-index steps of this span) + (lanes to the left in this step with the same
// expert) -- i.e. ascending flat index, deterministic. With one chunk, plan_scatter counts by
// itself; with several, plan_count first writes each chunk's histogram to block_hist [chunks, E].
// Ids outside [0, E) are dropped (their token rows are -1), e.g. experts of another rank.
// Latency, not bandwidth, bounds these kernels: ids are loaded IDS_BATCH steps ahead of their use,
// counting uses shared-memory atomics (order-free; measured on H200, counting with __match_any_sync
// made E=128 plans 1.2-1.3x slower; it stays for the scatter's stable ranks, where one ballot per id
// bit measured no faster), the chunk histograms' loads overlap the span counting,
// per-expert sums run one thread per expert with independent loads, and shared memory is set up
// before the PDL wait (so it overlaps the routing kernel's tail).
//
// Defines: NUM_E, NW (warps per CTA), IDS_I64, HAS_PADDED, HAS_MASKED.
#include "common.cuh"

#define WSTRIDE (NW + 1 + NW % 2)  // odd, > NW
#define IDS_BATCH 8                // 32-index steps whose ids one warp loads before using them

#if IDS_I64
typedef long long expert_id_t;
#else
typedef int expert_id_t;
#endif

__device__ __forceinline__ int load_expert(const expert_id_t* __restrict__ ids, int i, int end) {
    if (i >= end) return -1;
    const expert_id_t e = ids[i];
    return (e >= 0 && e < NUM_E) ? (int)e : -1;
}

extern "C" __global__ void __launch_bounds__(NW * 32)
plan_count(const expert_id_t* __restrict__ ids, int n, int chunk, int* __restrict__ block_hist) {
    __shared__ int hist[NUM_E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) hist[e] = 0;
    PDL_ENTER();
    __syncthreads();
    const int start = blockIdx.x * chunk;
    const int end = min(n, start + chunk);
    for (int b0 = start + warp * 32; b0 < end; b0 += NW * 32 * IDS_BATCH) {
        int ev[IDS_BATCH];
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) ev[u] = load_expert(ids, b0 + u * NW * 32 + lane, end);
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u)
            if (ev[u] >= 0) atomicAdd(&hist[ev[u]], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) block_hist[(i64)blockIdx.x * NUM_E + e] = hist[e];
}

// Exclusive scan of (a, b) over the CTA's threads in thread order; returns the CTA totals.
// Every thread must call it; tmp holds 2 * 32 ints.
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
    int pa = 0, pb = 0;
    ta = 0;
    tb = 0;
    for (int w = 0; w < NW; ++w) {
        const int wa = tmp[w], wb = tmp[32 + w];
        if (w < warp) {
            pa += wa;
            pb += wb;
        }
        ta += wa;
        tb += wb;
    }
    ea = pa + ia - a;
    eb = pb + ib - b;
    __syncthreads();  // tmp is reused by the next call
}

extern "C" __global__ void __launch_bounds__(NW * 32)
plan_scatter(const expert_id_t* __restrict__ ids, int n, int chunk, int num_chunks, const int* __restrict__ block_hist,
             int* __restrict__ counts, int* __restrict__ cu_seqlens, int* __restrict__ row_src,
             int* __restrict__ token_rows,
             int block_m, int padded_rows, int num_blocks_cap, int* __restrict__ padded_cu_seqlens,
             int* __restrict__ padded_row_src, int* __restrict__ padded_token_rows, int* __restrict__ expert_of_block,
             int max_m, int* __restrict__ masked_m, int* __restrict__ masked_row_src,
             int* __restrict__ masked_token_rows, int* __restrict__ overflow) {
    // per-span counts, then each span's offset in its expert segment; [expert][span], odd row stride so
    // lanes touching different experts hit different banks
    __shared__ int warp_off[NUM_E][WSTRIDE];
    __shared__ int total[NUM_E];         // rows of each expert over all chunks
    __shared__ int before[NUM_E];        // rows of each expert in earlier chunks
    __shared__ int cu_s[NUM_E + 1];
#if HAS_PADDED
    __shared__ int pcu_s[NUM_E + 1];
#endif
    __shared__ int scan_tmp[64];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nthreads = NW * 32;
    for (int e = threadIdx.x; e < NUM_E; e += nthreads) {
#pragma unroll
        for (int w = 0; w < NW; ++w) warp_off[e][w] = 0;
        total[e] = 0;
        before[e] = 0;
    }
    PDL_ENTER();
    __syncthreads();

#if (NW * 32) % NUM_E == 0
    // thread (hg, he) sums chunks hg, hg + G, ... of expert he's histogram; the first IDS_BATCH of them
    // are loaded here so that their latency overlaps the span histograms'
    constexpr int G = NW * 32 / NUM_E;
    const int he = threadIdx.x % NUM_E, hg = threadIdx.x / NUM_E;
    int hv[IDS_BATCH];
#pragma unroll
    for (int u = 0; u < IDS_BATCH; ++u) {
        const int c = hg + u * G;
        hv[u] = num_chunks > 1 && c < num_chunks ? block_hist[(i64)c * NUM_E + he] : 0;
    }
#endif

    // 1. per-span histograms
    const int start = blockIdx.x * chunk;
    const int end = min(n, start + chunk);
    const int span = (chunk + NW - 1) / NW;
    const int span_start = min(end, start + warp * span);
    const int span_end = min(end, span_start + span);
    for (int b0 = span_start; b0 < span_end; b0 += 32 * IDS_BATCH) {
        int ev[IDS_BATCH];
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) ev[u] = load_expert(ids, b0 + 32 * u + lane, span_end);
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u)
            if (ev[u] >= 0) atomicAdd(&warp_off[ev[u]][warp], 1);
    }
    // every chunk's histogram: expert totals and the rows of earlier chunks
    if (num_chunks > 1) {
#if (NW * 32) % NUM_E == 0
        int tot = 0, bef = 0;
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u) {
            tot += hv[u];
            bef += hg + u * G < (int)blockIdx.x ? hv[u] : 0;
        }
#pragma unroll 8
        for (int c = hg + IDS_BATCH * G; c < num_chunks; c += G) {
            const int v = block_hist[(i64)c * NUM_E + he];
            tot += v;
            bef += c < (int)blockIdx.x ? v : 0;
        }
        if (G == 1) {
            total[he] = tot;
            before[he] = bef;
        } else {
            atomicAdd(&total[he], tot);
            atomicAdd(&before[he], bef);
        }
#else
        for (int i = threadIdx.x; i < num_chunks * NUM_E; i += nthreads) {
            const int c = block_hist[i];
            const int e = i % NUM_E;
            atomicAdd(&total[e], c);
            if (i / NUM_E < (int)blockIdx.x) atomicAdd(&before[e], c);
        }
#endif
    }
    __syncthreads();

    // 2. span offsets within each expert segment (and totals when this is the only chunk): one thread
    //    per expert runs over the spans (odd row stride: no bank conflicts)
    for (int e = threadIdx.x; e < NUM_E; e += nthreads) {
        int run = before[e];
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const int c = warp_off[e][w];
            warp_off[e][w] = run;
            run += c;
        }
        if (num_chunks == 1) total[e] = run;
    }
    __syncthreads();

    // 3. segment starts: exclusive scans of the counts and of the block_m-padded counts
    int carry = 0, pcarry = 0;
    for (int base = 0; base < NUM_E; base += nthreads) {
        const int e = base + threadIdx.x;
        const int c = e < NUM_E ? total[e] : 0;
#if HAS_PADDED
        const int pc = (c + block_m - 1) / block_m * block_m;
#else
        const int pc = 0;
#endif
        int ex, pex, tot, ptot;
        cta_exclusive_scan2(c, pc, ex, pex, tot, ptot, scan_tmp);
        if (e < NUM_E) {
            cu_s[e] = carry + ex;
#if HAS_PADDED
            pcu_s[e] = pcarry + pex;
#endif
        }
        carry += tot;
        pcarry += ptot;
    }
    if (threadIdx.x == 0) {
        cu_s[NUM_E] = carry;
#if HAS_PADDED
        pcu_s[NUM_E] = pcarry;
#endif
    }
    __syncthreads();

    // 4. per-expert outputs (CTA 0) and the -1 fills of rows/blocks that hold no (token, slot)
    if (blockIdx.x == 0) {
#if HAS_MASKED
        int over = 0;
#endif
        for (int e = threadIdx.x; e <= NUM_E; e += nthreads) {
            cu_seqlens[e] = cu_s[e];
#if HAS_PADDED
            padded_cu_seqlens[e] = pcu_s[e];
#endif
            if (e < NUM_E) {
                counts[e] = total[e];
#if HAS_MASKED
                masked_m[e] = min(total[e], max_m);
                over |= total[e] > max_m;
#endif
            }
        }
#if HAS_MASKED
        over = __syncthreads_or(over);
        if (threadIdx.x == 0) overflow[0] = over;
#endif
    }
    const int gwarp = blockIdx.x * NW + warp;
    const int nwarps = gridDim.x * NW;
    for (int e = gwarp; e < NUM_E; e += nwarps) {
#if HAS_PADDED
        for (int r = pcu_s[e] + total[e] + lane; r < pcu_s[e + 1]; r += 32) padded_row_src[r] = -1;
        for (int b = pcu_s[e] / block_m + lane; b < pcu_s[e + 1] / block_m; b += 32) expert_of_block[b] = e;
#endif
#if HAS_MASKED
        const i64 mbase = (i64)e * max_m;
        for (int r = min(total[e], max_m) + lane; r < max_m; r += 32) masked_row_src[mbase + r] = -1;
#endif
    }
    const int gtid = blockIdx.x * nthreads + threadIdx.x;
    const int gthreads = gridDim.x * nthreads;
    for (int r = cu_s[NUM_E] + gtid; r < n; r += gthreads) row_src[r] = -1;
#if HAS_PADDED
    for (int r = pcu_s[NUM_E] + gtid; r < padded_rows; r += gthreads) padded_row_src[r] = -1;
    for (int b = pcu_s[NUM_E] / block_m + gtid; b < num_blocks_cap; b += gthreads) expert_of_block[b] = -1;
#endif

    // 5. stable scatter: each warp walks its span in order
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
                const int local = warp_off[e][warp] + __popc(peers & lt);
                const int row = cu_s[e] + local;
                row_src[row] = i;
                token_rows[i] = row;
#if HAS_PADDED
                const int prow = pcu_s[e] + local;
                padded_row_src[prow] = i;
                padded_token_rows[i] = prow;
#endif
#if HAS_MASKED
                int mrow = -1;
                if (local < max_m) {
                    mrow = e * max_m + local;
                    masked_row_src[mrow] = i;
                }
                masked_token_rows[i] = mrow;
#endif
            } else if (i < span_end) {
                token_rows[i] = -1;
#if HAS_PADDED
                padded_token_rows[i] = -1;
#endif
#if HAS_MASKED
                masked_token_rows[i] = -1;
#endif
            }
            __syncwarp();
            if (e >= 0 && (__ffs(peers) - 1) == lane) warp_off[e][warp] += __popc(peers);
            __syncwarp();
        }
    }
}
