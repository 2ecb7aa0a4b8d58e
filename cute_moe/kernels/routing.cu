// Top-k routing: one warp per token (selection and semantics in route_select.cuh).
#include "route_select.cuh"

extern "C" __global__ void __launch_bounds__(WARPS * 32)
route_topk(const void* __restrict__ logits_, i64 row_stride, const void* __restrict__ bias_, float scaling,
           float* __restrict__ out_w, int* __restrict__ out_ids, int num_tokens) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * WARPS + warp;
    if (t >= num_tokens) return;  // warp-uniform; the kernel has no block-level barrier
    route_token(logits_, row_stride, bias_, scaling, out_w, out_ids, t, lane, warp);
}
