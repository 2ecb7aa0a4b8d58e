// Router logits of one token (decode): out[e] = sum_h x[h] * w[e, h] in float32.
// One warp per expert reads w's row once with 16-byte loads and x (shared by all warps, so served
// from L1/L2); products of 16-bit values are exact in float32, each lane sums its vectors in
// ascending order and the warp adds the 32 partial sums in a fixed tree: deterministic.
// Measured on H200 at T=1 (perf/results/sm90_router): 1.9-3.2 us where torch.mm with float32 output
// takes 4.9-5.4 us for H <= 4096; at H = 7168 4.9 us vs 5.7 (routing.router_logits keeps torch.mm there).
//
// Defines: X_DT (bf16 or fp16; x and w), WARPS.
#include "common.cuh"

typedef VecIO<X_DT, 16> V;

extern "C" __global__ void __launch_bounds__(WARPS * 32)
router_logits(const void* __restrict__ x_, const void* __restrict__ w_, i64 w_stride, float* __restrict__ out,
              int num_experts, int hidden) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (e >= num_experts) return;  // warp-uniform; no block-level barrier
    typedef typename Elem<X_DT>::T T;
    const uint4* w = (const uint4*)((const T*)w_ + (i64)e * w_stride);
    const uint4* x = (const uint4*)x_;
    const int nv = hidden / V::N;
    float acc = 0.f;
#pragma unroll 4
    for (int v = lane; v < nv; v += 32) {
        float wf[V::N], xf[V::N];
        V::unpack(__ldg(w + v), wf);
        V::unpack(__ldg(x + v), xf);
#pragma unroll
        for (int i = 0; i < V::N; ++i) acc = fmaf(xf[i], wf[i], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[e] = acc;
}
