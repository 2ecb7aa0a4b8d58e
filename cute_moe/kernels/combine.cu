// Combine: out[t] = sum_{j=0..k-1} w[t, j] * y[token_rows[t, j]] (+ addend[t]), one warp per (token,
// row segment): rows are cut into `segs` segments of whole 32-vector steps so that few tokens (decode)
// still spread over many warps.
// float32 accumulation with fmaf in the fixed slot order j = 0..k-1 and no atomics, so results are
// bitwise reproducible. Slots whose row is -1 (dropped) contribute nothing. Output dtype = y's.
//
// Defines: Y_DT, ADD_DT (-1: no addend), TOP_K (<= 32), HAS_W, VB (vector bytes of y), WARPS.
#include "common.cuh"

typedef VecIO<Y_DT, VB> YIO;
typedef typename YIO::R YR;
#define NV_ELEMS (VB / Elem<Y_DT>::SIZE)  // elements per vector

#if ADD_DT >= 0
// NV_ELEMS elements of the addend (its own dtype) at element offset `first` of row p, added to acc.
__device__ __forceinline__ void add_addend(const char* __restrict__ p, int first, float* acc) {
    constexpr int SIZE = Elem<ADD_DT>::SIZE;
    constexpr int BYTES = NV_ELEMS * SIZE;
    constexpr int PIECE = BYTES > 16 ? 16 : BYTES;
    constexpr int PER = PIECE / SIZE;
    const typename RawVec<PIECE>::T* a = (const typename RawVec<PIECE>::T*)(p + (i64)first * SIZE);
#pragma unroll
    for (int piece = 0; piece < BYTES / PIECE; ++piece) {
        float f[PER];
        VecIO<ADD_DT, PIECE>::unpack(a[piece], f);
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[piece * PER + i] += f[i];
    }
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32)
combine_rows(const void* __restrict__ y, const int* __restrict__ token_rows, const float* __restrict__ w,
             const void* __restrict__ addend, i64 add_row_bytes, void* __restrict__ out, i64 out_row_bytes,
             int num_tokens, int hidden, int segs) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const i64 y_row_bytes = (i64)hidden * Elem<Y_DT>::SIZE;
    const int nv = (int)(y_row_bytes / VB);
    const int seg_len = (nv + 32 * segs - 1) / (32 * segs) * 32;  // vectors per segment
    const i64 items = (i64)num_tokens * segs;
    for (i64 item = blockIdx.x * WARPS + (threadIdx.x >> 5); item < items; item += (i64)gridDim.x * WARPS) {
        const int t = (int)(item / segs);
        const int v_begin = (int)(item - (i64)t * segs) * seg_len;
        const int v_end = min(nv, v_begin + seg_len);
        const int my_row = lane < TOP_K ? token_rows[(i64)t * TOP_K + lane] : -1;
#if HAS_W
        const float my_w = lane < TOP_K ? w[(i64)t * TOP_K + lane] : 0.f;
#else
        const float my_w = 1.f;
#endif
        int rows[TOP_K];
        float wts[TOP_K];
#pragma unroll
        for (int j = 0; j < TOP_K; ++j) {
            rows[j] = __shfl_sync(FULL_MASK, my_row, j);
            wts[j] = __shfl_sync(FULL_MASK, my_w, j);
        }
        YR* o = (YR*)((char*)out + (i64)t * out_row_bytes);
        for (int v = v_begin + lane; v < v_end; v += 32) {
            YR buf[TOP_K];
#pragma unroll
            for (int j = 0; j < TOP_K; ++j)
                buf[j] = rows[j] >= 0 ? ((const YR*)((const char*)y + (i64)rows[j] * y_row_bytes))[v] : zero_raw<YR>();
            float acc[NV_ELEMS];
#pragma unroll
            for (int i = 0; i < NV_ELEMS; ++i) acc[i] = 0.f;
#pragma unroll
            for (int j = 0; j < TOP_K; ++j) {
                if (rows[j] < 0) continue;
                float f[NV_ELEMS];
                YIO::unpack(buf[j], f);
#pragma unroll
                for (int i = 0; i < NV_ELEMS; ++i) acc[i] = fmaf(wts[j], f[i], acc[i]);
            }
#if ADD_DT >= 0
            add_addend((const char*)addend + (i64)t * add_row_bytes, v * NV_ELEMS, acc);
#endif
            o[v] = YIO::pack(acc);
        }
    }
}
