// Shared helpers for the cute-moe CuPy kernels. No CUDA headers: conversions use PTX directly so
// NVRTC compiles these sources anywhere (see cute_moe/_nvrtc.py).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (sm_90+; the host launches every kernel with it where the driver
// allows): a kernel's first statement waits for the previous kernel in the stream to finish and
// flush (so no read or write may come before it), then lets the next kernel launch and run its own
// prologue while this one works.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTER()                                                   \
    do {                                                              \
        asm volatile("griddepcontrol.wait;" ::: "memory");            \
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); \
    } while (0)
#else
#define PDL_ENTER() do {} while (0)
#endif

// Barrier across every CTA of a cooperative launch (CU_LAUNCH_ATTRIBUTE_COOPERATIVE: all CTAs
// resident). The counter is the driver's per-launch grid workspace (address in %envreg1:%envreg2,
// the ABI cooperative_groups uses), so concurrent launches never share it. CTA 0 adds
// 2^31 - (CTAs - 1), the others 1: the top bit flips when the last CTA arrives, and the low bits
// return to their start value for the next barrier. Writes before the barrier (any thread) are
// visible to reads after it (any CTA). (Measured on H200: as fast as a counter of our own.)
__device__ __forceinline__ void grid_barrier() {
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 hi, lo;
        asm volatile("mov.u32 %0, %%envreg1;" : "=r"(hi));
        asm volatile("mov.u32 %0, %%envreg2;" : "=r"(lo));
        const u64 ws = ((u64)hi << 32) | lo;
        if (ws == 0) __trap();  // not a cooperative launch: fail loudly rather than hang
        u32* bar = (u32*)(ws + 4);  // struct { u32 size; u32 barrier; }
        const u32 nb = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        u32 old, cur;
        asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;" : "=r"(old) : "l"(bar), "r"(nb) : "memory");
        do {
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(cur) : "l"(bar) : "memory");
        } while (((old ^ cur) & 0x80000000u) == 0);
    }
    __syncthreads();
}

// Element dtype codes used by every -D<NAME>_DT define.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float pos_inf() { return __uint_as_float(0x7f800000u); }
__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two floats -> two e4m3 bytes (lo in the low byte), round-to-nearest-even, saturating to +-448.
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return (u32)r;
}

// Element traits for the DT_* codes: storage type, size, load/store as float.
template <int kDt> struct Elem;
template <> struct Elem<DT_F32> {
    typedef float T;
    static constexpr int SIZE = 4;
    __device__ __forceinline__ static float to_f32(T v) { return v; }
    __device__ __forceinline__ static T from_f32(float v) { return v; }
};
template <> struct Elem<DT_F16> {
    typedef u16 T;
    static constexpr int SIZE = 2;
    __device__ __forceinline__ static float to_f32(T v) { return f16_to_f32(v); }
    __device__ __forceinline__ static T from_f32(float v) { return f32_to_f16(v); }
};
template <> struct Elem<DT_BF16> {
    typedef u16 T;
    static constexpr int SIZE = 2;
    __device__ __forceinline__ static float to_f32(T v) { return bf16_to_f32(v); }
    __device__ __forceinline__ static T from_f32(float v) { return f32_to_bf16(v); }
};

// Raw vector of kBytes bytes (16, 8, 4 or 2) for vectorized global memory access.
template <int kBytes> struct RawVec;
template <> struct RawVec<16> { typedef uint4 T; };
template <> struct RawVec<8> { typedef uint2 T; };
template <> struct RawVec<4> { typedef u32 T; };
template <> struct RawVec<2> { typedef u16 T; };

// kBytes bytes of kDt elements unpacked to / packed from floats (N = kBytes / element size).
template <int kDt, int kBytes> struct VecIO {
    typedef typename Elem<kDt>::T T;
    typedef typename RawVec<kBytes>::T R;
    static constexpr int N = kBytes / Elem<kDt>::SIZE;
    union U {
        R raw;
        T e[N];
    };
    __device__ __forceinline__ static void unpack(const R& raw, float* out) {
        U u;
        u.raw = raw;
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = Elem<kDt>::to_f32(u.e[i]);
    }
    __device__ __forceinline__ static R pack(const float* in) {
        U u;
#pragma unroll
        for (int i = 0; i < N; ++i) u.e[i] = Elem<kDt>::from_f32(in[i]);
        return u.raw;
    }
};

template <typename R> __device__ __forceinline__ R zero_raw();
template <> __device__ __forceinline__ uint4 zero_raw<uint4>() { return make_uint4(0u, 0u, 0u, 0u); }
template <> __device__ __forceinline__ uint2 zero_raw<uint2>() { return make_uint2(0u, 0u); }
template <> __device__ __forceinline__ u32 zero_raw<u32>() { return 0u; }
template <> __device__ __forceinline__ u16 zero_raw<u16>() { return (u16)0; }

__device__ __forceinline__ u32 lanemask_lt() {
    u32 m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Compile-time loop: f(IntC<B>{}), f(IntC<B + 1>{}), ..., f(IntC<E - 1>{}) (indices usable as constants).
template <int V> struct IntC {
    static constexpr int value = V;
};
template <int B, int E, typename F> __device__ __forceinline__ void static_for(F&& f) {
    if constexpr (B < E) {
        f(IntC<B>{});
        static_for<B + 1, E>(f);
    }
}

// ---- fp8 e4m3, cute_moe.quant semantics: scale = max(amax, 1e-10) / 448 over a group, q = x / scale
// (IEEE division) rounded to nearest even and saturated to +-448. Rows are processed in chunks of
// FP8_CHUNK elements per lane (one 16-byte fp8 store); a 1x128 group is FP8_GROUP / FP8_CHUNK lanes.
#define FP8_MAX 448.0f
#define AMAX_EPS 1e-10f
#define FP8_GROUP 128
#define FP8_CHUNK 16

// max that propagates NaN (like torch's amax)
__device__ __forceinline__ float nanmax(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float fp8_scale(float amax) { return (amax < AMAX_EPS ? AMAX_EPS : amax) / FP8_MAX; }

// FP8_CHUNK elements of dtype kDt starting at element c * FP8_CHUNK of row `src` as floats (zeros if
// c >= nchunk). The row must be 16-byte aligned.
template <int kDt>
__device__ __forceinline__ void load_chunk(const char* __restrict__ src, int c, int nchunk, float* f) {
    constexpr int PER = 16 / Elem<kDt>::SIZE;  // elements per 16-byte load
    if (c < nchunk) {
        const uint4* p = (const uint4*)(src + (i64)c * FP8_CHUNK * Elem<kDt>::SIZE);
#pragma unroll
        for (int i = 0; i < FP8_CHUNK / PER; ++i) VecIO<kDt, 16>::unpack(p[i], f + i * PER);
    } else {
#pragma unroll
        for (int i = 0; i < FP8_CHUNK; ++i) f[i] = 0.f;
    }
}

__device__ __forceinline__ float chunk_amax(const float* f) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < FP8_CHUNK; ++i) amax = nanmax(amax, fabsf(f[i]));
    return amax;
}

// Sum over the 32 lanes of a warp, the same in every lane (butterfly order: bitwise reproducible).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Max over the 32 lanes of a warp (NaN wins).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nanmax(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Max over the FP8_GROUP / FP8_CHUNK adjacent lanes that hold one 1x128 group (NaN wins).
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int o = 1; o < FP8_GROUP / FP8_CHUNK; o <<= 1) v = nanmax(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// This lane's share of the amax of row `src`: chunks lane, lane + 32, ... < nchunk (warp_max completes it).
template <int kDt>
__device__ __forceinline__ float lane_row_amax(const char* __restrict__ src, int lane, int nchunk) {
    float amax = 0.f;
    for (int c = lane; c < nchunk; c += 32) {
        float f[FP8_CHUNK];
        load_chunk<kDt>(src, c, nchunk, f);
        amax = nanmax(amax, chunk_amax(f));
    }
    return amax;
}

// FP8_CHUNK floats divided by `scale` as 16 e4m3 bytes.
__device__ __forceinline__ uint4 quantize_chunk(const float* f, float scale) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 lo = f32x2_to_e4m3x2(f[4 * i] / scale, f[4 * i + 1] / scale);
        const u32 hi = f32x2_to_e4m3x2(f[4 * i + 2] / scale, f[4 * i + 3] / scale);
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Index of row r's group g in group-major scales: scale[slab][g][r % slab_rows], slab = r / slab_rows.
__device__ __forceinline__ i64 group_scale_index(int r, int g, int num_groups, int slab_rows) {
    const int slab = r / slab_rows;
    return ((i64)slab * num_groups + g) * slab_rows + (r - slab * slab_rows);
}

// *p = max(*p, v) for v >= 0 or NaN: such floats order like their bit patterns, and a positive NaN
// (0x7fc00000) sorts above +inf, so NaN wins as in torch's amax. *p must start at a value >= 0.
__device__ __forceinline__ void atomic_max_abs(float* p, float v) {
    atomicMax((unsigned int*)p, __float_as_uint(v));
}
