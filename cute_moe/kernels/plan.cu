// Token -> expert plan from topk ids in memory: a stable counting sort of the flat (token, slot)
// indices by expert id (steps in plan_common.cuh). With one chunk, plan_scatter counts by itself;
// with several, plan_count first writes each chunk's histogram to block_hist [chunks, E]. Shared
// memory is set up before the PDL wait (so it overlaps the routing kernel's tail).
//
// Defines: NUM_E, NW (warps per CTA), IDS_I64, HAS_PADDED, HAS_MASKED.
#include "plan_common.cuh"

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
        for (int u = 0; u < IDS_BATCH; ++u) ev[u] = load_expert(GlobalIds<false>{ids}, b0 + u * NW * 32 + lane, end);
#pragma unroll
        for (int u = 0; u < IDS_BATCH; ++u)
            if (ev[u] >= 0) atomicAdd(&hist[ev[u]], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) block_hist[(i64)blockIdx.x * NUM_E + e] = hist[e];
}

extern "C" __global__ void __launch_bounds__(NW * 32)
plan_scatter(const expert_id_t* __restrict__ ids, int n, int chunk, int num_chunks, const int* __restrict__ block_hist,
             PLAN_OUT_PARAMS) {
    __shared__ PlanShared S;
    plan_init(S);
    PDL_ENTER();
    __syncthreads();
    const ChunkLoads h = plan_chunks_load<false>(block_hist, num_chunks);
    const int warp = threadIdx.x >> 5;
    const int start = blockIdx.x * chunk;
    const int end = min(n, start + chunk);
    const int span = (chunk + NW - 1) / NW;
    const int span_start = min(end, start + warp * span);
    const int span_end = min(end, span_start + span);
    plan_count_span(GlobalIds<false>{ids}, span_start, span_end, S);
    if (num_chunks > 1) plan_chunks_sum<false>(block_hist, num_chunks, h, S);
    plan_finish(GlobalIds<false>{ids}, num_chunks, span_start, span_end, S, PLAN_OUT(n));
}
