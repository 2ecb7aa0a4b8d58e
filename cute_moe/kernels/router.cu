// Router logits for a few tokens (decode): out[t, e] = sum_h x[t, h] * w[e, h] in float32.
// One warp per expert reads w's row once with 16-byte loads and each token's row of x (shared by all
// warps, so served from L1/L2); products of 16-bit values are exact in float32, each lane sums its
// vectors in ascending order and the warp adds the 32 partial sums in a fixed tree: deterministic.
// A cuBLAS GEMV with float32 output costs ~5 us here (H200, T=1); this kernel streams the router
// weight (0.5-3.7 MB for the reference shapes) in about a launch's time.
//
// Defines: X_DT (bf16 or fp16; x and w), MAX_T (tokens per launch, <= 16), WARPS.
#include "common.cuh"

typedef VecIO<X_DT, 16> V;

extern "C" __global__ void __launch_bounds__(WARPS * 32)
router_logits(const void* __restrict__ x_, i64 x_stride, const void* __restrict__ w_, i64 w_stride,
              float* __restrict__ out, int num_tokens, int num_experts, int hidden) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (e >= num_experts) return;  // warp-uniform; no block-level barrier
    typedef typename Elem<X_DT>::T T;
    const uint4* w = (const uint4*)((const T*)w_ + (i64)e * w_stride);
    const int nv = hidden / V::N;
    float acc[MAX_T];
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) acc[t] = 0.f;
#pragma unroll 4
    for (int v = lane; v < nv; v += 32) {
        float wf[V::N];
        V::unpack(__ldg(w + v), wf);
#pragma unroll
        for (int t = 0; t < MAX_T; ++t) {
            if (t < num_tokens) {
                float xf[V::N];
                V::unpack(__ldg((const uint4*)((const T*)x_ + (i64)t * x_stride) + v), xf);
#pragma unroll
                for (int i = 0; i < V::N; ++i) acc[t] = fmaf(xf[i], wf[i], acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) {
        float s = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        if (lane == 0 && t < num_tokens) out[(i64)t * num_experts + e] = s;
    }
}
