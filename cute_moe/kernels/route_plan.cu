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
// T < 65536 (the histograms hold 8- or 16-bit counts where E allows 16-byte vectors of them).
#include "route_select.cuh"
#include "plan_common.cuh"

// ids kept in shared memory for the plan steps (else read back from global memory) while a CTA's
// tokens * k fit (E <= 256: room left in the 48 KiB of static shared memory)
#define IDS_SMEM (NUM_E <= 256 ? 256 : 0)

// The CTA histograms as 16-bit counts (8 experts per 16-byte vector), or 8-bit ones (16 per vector)
// while a CTA routes at most 255 tokens: lanes of a warp read one row (or several, for small E) at
// consecutive addresses, so E / (experts per vector) must divide 32 or be a multiple of 32.
#define VEC_OK(epv) (NUM_E % (epv) == 0 && (32 % (NUM_E / (epv)) == 0 || (NUM_E / (epv)) % 32 == 0))
#define VEC_HIST VEC_OK(8)

#if VEC_HIST
// S.total / S.before from the CTAs' histograms hist [chunks, E] (every CTA reads them all): warps
// stride over the rows, each lane sums its EPV experts' counts two per 32-bit word (no carry between
// the halves: every sum is at most T < 65536), and the warps' sums meet in shared memory by packed
// atomic adds, unpacked at the end. `packed` holds NUM_E words, zeroed by the caller.
template <int EPV>
__device__ __forceinline__ void chunk_sums(const void* hist_, int num_chunks, u32* packed, PlanShared& S) {
    constexpr int LPR = NUM_E / EPV < 32 ? NUM_E / EPV : 32;  // lanes per row
    constexpr int RPS = 32 / LPR;                             // rows per warp step
    constexpr int W = EPV / 2;                                // packed words per lane
    const char* hist = (const char*)hist_;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LPR, eg0 = lane % LPR;
    for (int eg = eg0; eg < NUM_E / EPV; eg += LPR) {
        u32 tot[W], bef[W];
#pragma unroll
        for (int j = 0; j < W; ++j) tot[j] = bef[j] = 0u;
#pragma unroll 4
        for (int c = warp * RPS + sub; c < num_chunks; c += NW * RPS) {
            const uint4 v = __ldcg((const uint4*)(hist + (i64)c * NUM_E * (16 / EPV)) + eg);
            const u32 m = c < (int)blockIdx.x ? 0xffffffffu : 0u;
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if constexpr (EPV == 8) {  // halves: experts 2i, 2i + 1
                    tot[i] += w[i];
                    bef[i] += w[i] & m;
                } else {         // bytes 0, 2 -> word 2i; bytes 1, 3 -> word 2i + 1
                    const u32 lo = w[i] & 0x00ff00ffu, hi = (w[i] >> 8) & 0x00ff00ffu;
                    tot[2 * i] += lo;
                    tot[2 * i + 1] += hi;
                    bef[2 * i] += lo & m;
                    bef[2 * i + 1] += hi & m;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < W; ++j) {
            if (tot[j]) atomicAdd(&packed[eg * W + j], tot[j]);
            if (bef[j]) atomicAdd(&packed[NUM_E / 2 + eg * W + j], bef[j]);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
        const int r = e % EPV;
        const int j = EPV == 8 ? r / 2 : 2 * (r / 4) + (r % 2);
        const int shift = EPV == 8 ? 16 * (r % 2) : 16 * ((r % 4) / 2);
        const int word = (e / EPV) * W + j;
        S.total[e] = (int)((packed[word] >> shift) & 0xffffu);
        S.before[e] = (int)((packed[NUM_E / 2 + word] >> shift) & 0xffffu);
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
    __shared__ u32 packed[NUM_E];  // chunk_sums' packed sums
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
#if VEC_HIST
    const bool narrow = VEC_OK(16) && tokens_per_cta <= 255;  // 8-bit counts; uniform
#endif
    if (num_chunks > 1) {
        __syncthreads();
        for (int e = threadIdx.x; e < NUM_E; e += NW * 32) {
            int c = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) c += S.warp_off[e][w];
#if VEC_HIST
            if (narrow)
                ((u8*)block_hist)[(i64)blockIdx.x * NUM_E + e] = (u8)c;
            else
                ((u16*)block_hist)[(i64)blockIdx.x * NUM_E + e] = (u16)c;
#else
            block_hist[(i64)blockIdx.x * NUM_E + e] = c;
#endif
        }
        grid_barrier();
#if VEC_HIST
        if (narrow)
            chunk_sums<VEC_OK(16) ? 16 : 8>(block_hist, num_chunks, packed, S);
        else
            chunk_sums<8>(block_hist, num_chunks, packed, S);
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
