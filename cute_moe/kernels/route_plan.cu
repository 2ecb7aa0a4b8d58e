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
// T < 65536 (the histograms hold 16-bit counts where E allows 16-byte vectors of them).
#include "route_select.cuh"
#include "plan_common.cuh"

// 16-byte vectors of 8 experts' 16-bit counts: lanes of a warp read one histogram row (or several,
// for E < 256) at consecutive addresses; needs E / 8 to divide 32 or be a multiple of 32.
// ids kept in shared memory for the plan steps (else read back from global memory) while a CTA's
// tokens * k fit (E <= 256: room left in the 48 KiB of static shared memory)
#define IDS_SMEM (NUM_E <= 256 ? 256 : 0)

#define VEC_HIST (NUM_E % 8 == 0 && (32 % (NUM_E / 8) == 0 || (NUM_E / 8) % 32 == 0))
#if VEC_HIST
#define LANES_PER_ROW ((NUM_E / 8) < 32 ? (NUM_E / 8) : 32)
#define ROWS_PER_STEP (32 / LANES_PER_ROW)

// S.total / S.before from the CTAs' 16-bit histograms hist [chunks, E] (every CTA reads them all):
// warps stride over the rows, each lane sums its 8 experts' counts two per 32-bit word (no carry
// between the halves: every sum is at most T < 65536), and the warps' sums meet in shared memory
// by packed atomic adds, unpacked at the end. `packed` holds NUM_E words, zeroed by the caller.
__device__ __forceinline__ void chunk_sums_u16(const u16* hist, int num_chunks, u32* packed, PlanShared& S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LANES_PER_ROW, eg0 = lane % LANES_PER_ROW;
    for (int eg = eg0; eg < NUM_E / 8; eg += LANES_PER_ROW) {
        u32 tot[4] = {0u, 0u, 0u, 0u}, bef[4] = {0u, 0u, 0u, 0u};
#pragma unroll 4
        for (int c = warp * ROWS_PER_STEP + sub; c < num_chunks; c += NW * ROWS_PER_STEP) {
            const uint4 v = __ldcg((const uint4*)(hist + (i64)c * NUM_E) + eg);
            const u32 m = c < (int)blockIdx.x ? 0xffffffffu : 0u;
            tot[0] += v.x; tot[1] += v.y; tot[2] += v.z; tot[3] += v.w;
            bef[0] += v.x & m; bef[1] += v.y & m; bef[2] += v.z & m; bef[3] += v.w & m;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (tot[j]) atomicAdd(&packed[eg * 4 + j], tot[j]);
            if (bef[j]) atomicAdd(&packed[NUM_E / 2 + eg * 4 + j], bef[j]);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
        const int shift = 16 * (e % 2);
        S.total[e] = (int)((packed[e / 2] >> shift) & 0xffffu);
        S.before[e] = (int)((packed[NUM_E / 2 + e / 2] >> shift) & 0xffffu);
    }
}
#endif

extern "C" __global__ void __launch_bounds__(NW * 32, 1)
route_plan(const void* __restrict__ logits, i64 row_stride, const void* __restrict__ bias, float scaling,
           float* __restrict__ out_w, int* __restrict__ out_ids, int num_tokens, int tokens_per_cta,
           int* __restrict__ block_hist, PLAN_OUT_PARAMS) {
    __shared__ PlanShared S;
    plan_init(S);
#if IDS_SMEM
    __shared__ int ids_s[IDS_SMEM];  // this CTA's ids, when they fit
#endif
#if VEC_HIST
    __shared__ u32 packed[NUM_E];  // chunk_sums_u16's packed sums
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) packed[e] = 0u;
#endif
    PDL_ENTER();
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t0 = blockIdx.x * tokens_per_cta;
    const int t1 = min(num_tokens, t0 + tokens_per_cta);
    const int per_warp = (tokens_per_cta + NW - 1) / NW;
    const int w0 = min(t1, t0 + warp * per_warp);
    const int w1 = min(t1, w0 + per_warp);
#if IDS_SMEM
    const bool ids_here = tokens_per_cta * TOP_K <= IDS_SMEM;  // uniform
#endif
    for (int t = w0; t < w1; ++t) {
        const int e = route_token(logits, row_stride, bias, scaling, out_w, out_ids, t, lane, warp);
        if (lane < TOP_K) {
            atomicAdd(&S.warp_off[e][warp], 1);
#if IDS_SMEM
            if (ids_here) ids_s[(t - t0) * TOP_K + lane] = e;
#endif
        }
    }
    const int num_chunks = gridDim.x;
    if (num_chunks > 1) {
        __syncthreads();
        for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
            int c = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) c += S.warp_off[e][w];
#if VEC_HIST
            ((u16*)block_hist)[(i64)blockIdx.x * NUM_E + e] = (u16)c;
#else
            block_hist[(i64)blockIdx.x * NUM_E + e] = c;
#endif
        }
        grid_barrier();
#if VEC_HIST
        chunk_sums_u16((const u16*)block_hist, num_chunks, packed, S);
#else
        plan_chunks_sum<true>(block_hist, num_chunks, plan_chunks_load<true>(block_hist, num_chunks), S);
#endif
    }
    const PlanOut o = PLAN_OUT(num_tokens * TOP_K);
#if IDS_SMEM
    if (ids_here) {
        plan_finish(SharedIds{ids_s, t0 * TOP_K}, num_chunks, w0 * TOP_K, w1 * TOP_K, S, o);
        return;
    }
#endif
    plan_finish(GlobalIds<true>{out_ids}, num_chunks, w0 * TOP_K, w1 * TOP_K, S, o);
}
