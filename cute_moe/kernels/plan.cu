// Token -> expert plan: a stable counting sort of the flat (token, slot) indices by expert id.
//
// The flat index space [0, n) (n = T * k, index t*k + j) is cut into chunks of `chunk` indices, one
// per CTA, and each chunk into NW contiguous per-warp spans. Row of index i inside its expert's
// segment = (count of that expert in earlier chunks) + (count in earlier spans of this chunk)
// + (count in earlier 32-index steps of this span) + (lanes to the left in this step with the same
// expert) -- i.e. ascending flat index, deterministic. Chunk histograms are combined in one of three
// ways: one chunk (plan_scatter, grid 1) needs none; several chunks of plan_scatter read block_hist
// [chunks, E] written by plan_count; plan_cluster (sm_90+) is one thread-block cluster of CLUSTER
// CTAs that read each other's histograms from distributed shared memory (one launch, no global
// scratch). Ids outside [0, E) are dropped (their token rows are -1), e.g. experts of another rank.
//
// When a chunk fits in STAGE_ROWS, its flat indices are first placed in shared memory in (expert,
// index) order and then written to row_src (and the padded / masked row_src) one expert run per
// warp: contiguous stores instead of one scattered 4-byte store per index.
//
// Defines: NUM_E, NW (warps per CTA), IDS_I64, HAS_PADDED, HAS_MASKED, STAGE_ROWS (0 = no
// staging), CLUSTER (CTAs of plan_cluster).
#include "common.cuh"

#define WSTRIDE (NW + 1 + NW % 2)  // odd, > NW

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

// Cluster barrier halves and distributed shared memory loads (PTX; sm_90+, no-ops below).
__device__ __forceinline__ void cluster_arrive_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
// *p in the shared memory of cluster CTA `rank` (p: an address in this CTA's shared memory).
__device__ __forceinline__ int ld_cluster(const int* p, u32 rank) {
    int v = 0;
#if __CUDA_ARCH__ >= 900
    u32 local, remote;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(remote) : "memory");
#endif
    return v;
}

extern "C" __global__ void __launch_bounds__(NW * 32)
plan_count(const expert_id_t* __restrict__ ids, int n, int chunk, int* __restrict__ block_hist) {
    __shared__ int hist[NUM_E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) hist[e] = 0;
    __syncthreads();
    const int start = blockIdx.x * chunk;
    const int end = min(n, start + chunk);
    for (int base = start + warp * 32; base < end; base += NW * 32) {
        const int e = load_expert(ids, base + lane, end);
        const u32 peers = __match_any_sync(FULL_MASK, e);
        if (e >= 0 && (__ffs(peers) - 1) == lane) atomicAdd(&hist[e], __popc(peers));
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) block_hist[(i64)blockIdx.x * NUM_E + e] = hist[e];
}

// Exclusive scan of three values over the CTA's threads in thread order; returns the CTA totals.
// Every thread must call it; tmp holds 3 * 32 ints.
__device__ __forceinline__ void cta_exclusive_scan3(const int (&v)[3], int (&ex)[3], int (&tot)[3], int* tmp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inc[3] = {v[0], v[1], v[2]};
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
        for (int q = 0; q < 3; ++q) {
            const int x = __shfl_up_sync(FULL_MASK, inc[q], o);
            if (lane >= o) inc[q] += x;
        }
    }
    if (lane == 31) {
#pragma unroll
        for (int q = 0; q < 3; ++q) tmp[32 * q + warp] = inc[q];
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 3; ++q) {
        int p = 0, t = 0;
        for (int w = 0; w < NW; ++w) {
            const int x = tmp[32 * q + w];
            p += w < warp ? x : 0;
            t += x;
        }
        ex[q] = p + inc[q] - v[q];
        tot[q] = t;
    }
    __syncthreads();  // tmp is reused by the next call
}

#define PLAN_PARAMS                                                                                          \
    const expert_id_t *__restrict__ ids, int n, int chunk, int num_chunks, const int *__restrict__ block_hist, \
        int *__restrict__ counts, int *__restrict__ cu_seqlens, int *__restrict__ row_src,                    \
        int *__restrict__ token_rows, int block_m, int padded_rows, int num_blocks_cap,                       \
        int *__restrict__ padded_cu_seqlens, int *__restrict__ padded_row_src,                               \
        int *__restrict__ padded_token_rows, int *__restrict__ expert_of_block, int max_m,                    \
        int *__restrict__ masked_m, int *__restrict__ masked_row_src, int *__restrict__ masked_token_rows,    \
        int *__restrict__ overflow
#define PLAN_ARGS                                                                                              \
    ids, n, chunk, num_chunks, block_hist, counts, cu_seqlens, row_src, token_rows, block_m, padded_rows,      \
        num_blocks_cap, padded_cu_seqlens, padded_row_src, padded_token_rows, expert_of_block, max_m, masked_m, \
        masked_row_src, masked_token_rows, overflow

// The plan of chunk blockIdx.x. kCluster: chunk histograms come from the other CTAs of the cluster
// (grid = one cluster, num_chunks = CLUSTER); else from block_hist when num_chunks > 1.
template <bool kCluster>
__device__ __forceinline__ void plan_body(PLAN_PARAMS) {
    // per-span counts, then each span's offset in this chunk's run of its expert; [expert][span], odd
    // row stride so lanes touching different experts hit different banks
    __shared__ int warp_off[NUM_E][WSTRIDE];
    __shared__ int cnt[NUM_E];           // rows of each expert in this chunk
    __shared__ int total[NUM_E];         // rows of each expert over all chunks
    __shared__ int before[NUM_E];        // rows of each expert in earlier chunks
    __shared__ int cu_s[NUM_E + 1];
#if HAS_PADDED
    __shared__ int pcu_s[NUM_E + 1];
#endif
#if STAGE_ROWS > 0
    __shared__ int cx_s[NUM_E + 1];      // start of each expert's run in stage
    __shared__ int stage[STAGE_ROWS];    // this chunk's flat indices in (expert, index) order
#endif
    __shared__ int scan_tmp[96];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nthreads = NW * 32;
    for (int i = threadIdx.x; i < NUM_E * WSTRIDE; i += nthreads) (&warp_off[0][0])[i] = 0;
    for (int e = threadIdx.x; e < NUM_E; e += nthreads) {
        total[e] = 0;
        before[e] = 0;
    }
    __syncthreads();

    // 1. per-span histograms
    const int start = blockIdx.x * chunk;
    const int end = min(n, start + chunk);
    const int span = (chunk + NW - 1) / NW;
    const int span_start = min(end, start + warp * span);
    const int span_end = min(end, span_start + span);
    for (int base = span_start; base < span_end; base += 32) {
        const int e = load_expert(ids, base + lane, span_end);
        const u32 peers = __match_any_sync(FULL_MASK, e);
        if (e >= 0 && (__ffs(peers) - 1) == lane) warp_off[e][warp] += __popc(peers);
        __syncwarp();
    }
    if (!kCluster && num_chunks > 1) {
        for (int i = threadIdx.x; i < num_chunks * NUM_E; i += nthreads) {
            const int c = block_hist[i];
            const int e = i % NUM_E;
            atomicAdd(&total[e], c);
            if (i / NUM_E < (int)blockIdx.x) atomicAdd(&before[e], c);
        }
    }
    __syncthreads();

    // 2. span offsets within this chunk's run of each expert, and the chunk's counts: one warp per
    //    expert, lane w scans span w
    for (int e = warp; e < NUM_E; e += NW) {
        const int c = lane < NW ? warp_off[e][lane] : 0;
        int incl = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int x = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o) incl += x;
        }
        if (lane < NW) warp_off[e][lane] = incl - c;
        if (lane == 31) {
            cnt[e] = incl;
            if (!kCluster && num_chunks == 1) total[e] = incl;
        }
    }
    if (kCluster) {
        // every CTA's cnt is complete after the barrier; sum them in cluster rank (= chunk) order
        cluster_arrive_release();
        cluster_wait();
        for (int e = threadIdx.x; e < NUM_E; e += nthreads) {
            int tot = 0, bef = 0;
#pragma unroll
            for (int r = 0; r < CLUSTER; ++r) {
                const int c = ld_cluster(&cnt[e], (u32)r);
                tot += c;
                bef += r < (int)blockIdx.x ? c : 0;
            }
            total[e] = tot;
            before[e] = bef;
        }
        cluster_arrive_relaxed();  // done reading the other CTAs' shared memory (waited for at exit)
    }
    __syncthreads();

    // 3. segment starts: exclusive scans of the counts, of the block_m-padded counts and of this
    //    chunk's counts (its staging runs)
    int carry[3] = {0, 0, 0};
    for (int base = 0; base < NUM_E; base += nthreads) {
        const int e = base + threadIdx.x;
        const int c = e < NUM_E ? total[e] : 0;
#if HAS_PADDED
        const int pc = (c + block_m - 1) / block_m * block_m;
#else
        const int pc = 0;
#endif
        const int v[3] = {c, pc, e < NUM_E ? cnt[e] : 0};
        int ex[3], tot[3];
        cta_exclusive_scan3(v, ex, tot, scan_tmp);
        if (e < NUM_E) {
            cu_s[e] = carry[0] + ex[0];
#if HAS_PADDED
            pcu_s[e] = carry[1] + ex[1];
#endif
#if STAGE_ROWS > 0
            cx_s[e] = carry[2] + ex[2];
#endif
        }
#pragma unroll
        for (int q = 0; q < 3; ++q) carry[q] += tot[q];
    }
    if (threadIdx.x == 0) {
        cu_s[NUM_E] = carry[0];
#if HAS_PADDED
        pcu_s[NUM_E] = carry[1];
#endif
#if STAGE_ROWS > 0
        cx_s[NUM_E] = carry[2];
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

    // 5. stable scatter: each warp walks its span in order; token rows go straight out, row sources
    //    to the staging runs (or straight out when the chunk does not fit)
    const bool staged = STAGE_ROWS > 0 && chunk <= STAGE_ROWS;
    const u32 lt = lanemask_lt();
    for (int base = span_start; base < span_end; base += 32) {
        const int i = base + lane;
        const int e = load_expert(ids, i, span_end);
        const u32 peers = __match_any_sync(FULL_MASK, e);
        if (e >= 0) {
            const int in_chunk = warp_off[e][warp] + __popc(peers & lt);
            const int local = before[e] + in_chunk;
            const int row = cu_s[e] + local;
#if STAGE_ROWS > 0
            if (staged) stage[cx_s[e] + in_chunk] = i;
#endif
            if (!staged) row_src[row] = i;
            token_rows[i] = row;
#if HAS_PADDED
            const int prow = pcu_s[e] + local;
            if (!staged) padded_row_src[prow] = i;
            padded_token_rows[i] = prow;
#endif
#if HAS_MASKED
            int mrow = -1;
            if (local < max_m) {
                mrow = e * max_m + local;
                if (!staged) masked_row_src[mrow] = i;
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

#if STAGE_ROWS > 0
    // 6. staged row sources out, one expert run per group of WPE warps (contiguous stores)
    if (staged) {
        __syncthreads();
        constexpr int WPE = NW / NUM_E > 0 ? NW / NUM_E : 1;  // warps per expert run
        for (int e = warp / WPE; e < NUM_E; e += NW / WPE) {
            const int p0 = cx_s[e], c = cx_s[e + 1] - p0, b = before[e];
            for (int q = (warp % WPE) * 32 + lane; q < c; q += WPE * 32) {
                const int i = stage[p0 + q];
                const int local = b + q;
                row_src[cu_s[e] + local] = i;
#if HAS_PADDED
                padded_row_src[pcu_s[e] + local] = i;
#endif
#if HAS_MASKED
                if (local < max_m) masked_row_src[e * max_m + local] = i;
#endif
            }
        }
    }
#endif
    if (kCluster) cluster_wait();  // no CTA leaves while another may still read its cnt
}

extern "C" __global__ void __launch_bounds__(NW * 32) plan_scatter(PLAN_PARAMS) { plan_body<false>(PLAN_ARGS); }

#if __CUDA_ARCH__ >= 900
extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(NW * 32) plan_cluster(PLAN_PARAMS) {
    plan_body<true>(PLAN_ARGS);
}
#endif
