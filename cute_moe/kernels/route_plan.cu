// Routing and plan in one kernel (one launch instead of route_topk + plan_count + plan_scatter).
//
// CTA c routes tokens [c * tpc, (c + 1) * tpc) (tpc = tokens_per_cta), each warp a contiguous run of
// them, counting its experts into its span histogram as it goes; so the plan's chunks are the CTAs'
// token ranges and its spans the warps'. With several CTAs (a cooperative launch: all resident),
// each publishes its histogram, waits at a grid barrier, and sums every CTA's histogram for its
// offsets; then the plan's steps run as in plan_scatter (plan_common.cuh), reading back the ids
// this CTA wrote.
//
// Defines: those of route_select.cuh (with WARPS == NW) and of plan_common.cuh (IDS_I64 = 0).
#include "route_select.cuh"
#include "plan_common.cuh"

extern "C" __global__ void __launch_bounds__(NW * 32, 1)
route_plan(const void* __restrict__ logits, i64 row_stride, const void* __restrict__ bias, float scaling,
           float* __restrict__ out_w, int* __restrict__ out_ids, int num_tokens, int tokens_per_cta,
           int* __restrict__ block_hist, u32* barrier, PLAN_OUT_PARAMS) {
    __shared__ PlanShared S;
    plan_init(S);
    PDL_ENTER();
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t0 = blockIdx.x * tokens_per_cta;
    const int t1 = min(num_tokens, t0 + tokens_per_cta);
    const int per_warp = (tokens_per_cta + NW - 1) / NW;
    const int w0 = min(t1, t0 + warp * per_warp);
    const int w1 = min(t1, w0 + per_warp);
    for (int t = w0; t < w1; ++t) {
        const int e = route_token(logits, row_stride, bias, scaling, out_w, out_ids, t, lane, warp);
        if (lane < TOP_K) atomicAdd(&S.warp_off[e][warp], 1);
    }
    const int num_chunks = gridDim.x;
    if (num_chunks > 1) {
        __syncthreads();
        for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
            int c = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) c += S.warp_off[e][w];
            block_hist[(i64)blockIdx.x * NUM_E + e] = c;
        }
        grid_barrier(barrier);
        plan_chunks_sum<true>(block_hist, num_chunks, plan_chunks_load<true>(block_hist, num_chunks), S);
    }
    plan_finish<true>(out_ids, num_chunks, w0 * TOP_K, w1 * TOP_K, S, PLAN_OUT(num_tokens * TOP_K));
}
