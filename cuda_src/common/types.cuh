// Scalar types and conversions shared by every w4kern kernel.
//
// w4kern compiles with NVRTC and no CUDA toolkit headers on the include path
// (the device machines and CI have NVRTC but not always the toolkit), so this
// header defines the few integer and 16-bit float types the kernels need
// itself, inside namespace w4kern so they never clash with a toolkit's.
// 16-bit floats are carried as raw bits and converted with PTX `cvt`, which
// rounds to nearest even exactly like NumPy/ml_dtypes on the host.
#pragma once

namespace w4kern {

typedef signed char        i8;
typedef unsigned char      u8;
typedef short              i16;
typedef unsigned short     u16;
typedef int                i32;
typedef unsigned int       u32;
typedef long long          i64;
typedef unsigned long long u64;

static_assert(sizeof(i8) == 1 && sizeof(i16) == 2 && sizeof(i32) == 4 && sizeof(i64) == 8,
              "w4kern assumes LP64-style integer widths");

// A bfloat16 / float16 value held as its bit pattern. Template parameters
// name these types, so `bf16_t` and `f16_t` are distinct even though both
// hold 16 bits.
struct bf16_t { u16 bits; };
struct f16_t  { u16 bits; };
static_assert(sizeof(bf16_t) == 2 && sizeof(f16_t) == 2, "16-bit float carriers must be 2 bytes");

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<u32>(x.bits) << 16);  // bf16 is the top half of an fp32
}
__device__ __forceinline__ float to_float(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

// from_float<T>(x): round to nearest even (the rounding of ml_dtypes/NumPy casts).
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));  // sm_80+
    return r;
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// A 16-byte aligned vector of N elements of T, for one 128-bit load or store.
template <typename T, int N>
struct alignas(16) Vec {
    T v[N];
};

#endif  // device code

}  // namespace w4kern
