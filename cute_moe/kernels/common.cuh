// Shared helpers for the cute-moe CuPy kernels. No CUDA headers: conversions use PTX directly so
// NVRTC compiles these sources anywhere (see cute_moe/_nvrtc.py).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

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
