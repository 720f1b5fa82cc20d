// Thin wrappers over the PTX instructions the GEMM-like kernels use:
// dp4a, cp.async, ldmatrix, mma.sync and packed 16-bit float FMA.
//
// Inline PTX rather than CUDA's intrinsic headers keeps the kernels
// compilable by a bare NVRTC (12.x and 13.x) with no toolkit headers.
// Everything here needs sm_80 or newer.
#pragma once

#include "types.cuh"

namespace w4kern {

// sum of the four signed byte products of a and b, plus c
__device__ __forceinline__ i32 dp4a(u32 a, u32 b, i32 c) {
    i32 d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// __byte_perm: byte i of the result is byte sel[4i+3:4i] of the 8-byte value {b, a}.
__device__ __forceinline__ u32 byte_perm(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// kBytes (4, 8 or 16) read-only bytes from global memory as words, in one load
// that skips L1 (L1::no_allocate): for weights streamed once, which would
// otherwise evict the small arrays (group scales, activations) that a kernel
// rereads from L1.
//
// kL2Fetch256: the 16-byte form also asks L2 to fetch the whole 256-byte block
// around the address (.L2::256B), i.e. bytes that neighbouring warps or the next
// steps of a row will read: 1-5% faster for matvec_a16, whose per-warp loads are
// small, and 1-4% slower for matvec_q8 (H200, scripts/compare_sources.py,
// benchmarks/results/2026-11-22-h200-session10/).
template <int kBytes, bool kL2Fetch256 = false>
__device__ __forceinline__ void load_streaming(u32 (&dst)[kBytes / 4], const void* p) {
    if constexpr (kBytes == 16 && kL2Fetch256) {
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3]) : "l"(p));
    } else if constexpr (kBytes == 16) {
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3]) : "l"(p));
    } else if constexpr (kBytes == 8) {
        asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(dst[0]), "=r"(dst[1]) : "l"(p));
    } else {
        static_assert(kBytes == 4, "4, 8 or 16 bytes");
        asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(dst[0]) : "l"(p));
    }
}

// LOP3 with both constant operands: ptxas keeps one of them in a register, so
// (a & kB) | kC is one instruction rather than an AND and an OR with immediates.
template <u32 kB, u32 kC, u32 kLut>
__device__ __forceinline__ u32 lop3(u32 a) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "n"(kB), "n"(kC), "n"(kLut));
    return d;
}
constexpr u32 kLutAndOr = (0xF0 & 0xCC) | 0xAA;   // (a & b) | c

__device__ __forceinline__ u32 smem_address(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// Shared memory is addressed with 32-bit shared-window addresses (u32) in the
// hot loops: generic 64-bit pointers would cost two integer ops per address.

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (0: all
// zeros, and `src` is not read).
__device__ __forceinline__ void cp_async16(u32 smem_dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_dst), "l"(src), "r"(src_bytes));
}

// 4-byte global -> shared copy with the same zero-fill rule.
__device__ __forceinline__ void cp_async4(u32 smem_dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(smem_dst), "l"(src), "r"(src_bytes));
}

// Shared loads at 32-bit addresses. Volatile, so they stay ordered after the
// cp.async waits and barriers that publish the data they read.
__device__ __forceinline__ u32 lds_u32(u32 address) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
    return v;
}
__device__ __forceinline__ u16 lds_u16(u32 address) {
    u16 v;
    asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(address));
    return v;
}
__device__ __forceinline__ float2 lds_f32x2(u32 address) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(address));
    return v;
}
__device__ __forceinline__ uint4 lds_u32x4(u32 address) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
    return v;
}
// A scale or zero of type T (float, f16_t or bf16_t) from shared memory, as float.
template <typename T> __device__ __forceinline__ float lds_scale(u32 address);
template <> __device__ __forceinline__ float lds_scale<float>(u32 address) { return __uint_as_float(lds_u32(address)); }
template <> __device__ __forceinline__ float lds_scale<f16_t>(u32 address) { return to_float(f16_t{lds_u16(address)}); }
template <> __device__ __forceinline__ float lds_scale<bf16_t>(u32 address) { return to_float(bf16_t{lds_u16(address)}); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(kPending) : "memory");
}

// Four 8x8 matrices of 16-bit elements (rows of 16 bytes) from shared memory.
// Lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, in
// r[i], bytes 4*(l%4)..4*(l%4)+3 of row l/4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_address));
}

// ldmatrix_x4 with each 8x8 matrix transposed: lane l receives, in r[i], the
// 16-bit elements (row 2*(l%4), column l/4) and (row 2*(l%4)+1, column l/4) of
// matrix i, packed low then high.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_address));
}

// Transposes an 8x8 matrix of 16-bit elements held across the warp: lane l
// holds (row l/4, columns 2*(l%4), 2*(l%4)+1) of the input and receives the
// same positions of its transpose (sm_75+).
__device__ __forceinline__ u32 movmatrix_trans(u32 a) {
    u32 d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

// mbarrier and bulk-copy (sm_90 copy engine) primitives, on CTA shared memory.
__device__ __forceinline__ void mbarrier_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}

#if __CUDA_ARCH__ >= 900
// Makes initialized mbarriers visible to the copy engine.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more bytes of copies on the barrier's phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global
// to shared memory on the copy engine; their arrival completes on `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
#endif

// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait_parity(u32 bar, u32 parity) {
    asm volatile("{\n"
                 ".reg .pred done;\n"
                 "WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n"
                 "}\n" :: "r"(bar), "r"(parity) : "memory");
}

// The MMAs are plain (not volatile) asm: they only read and write registers, so
// the compiler may schedule shared-memory loads around them.
// D = A (16x32 s8, row) * B (32x8 s8, col), int32 accumulators, C = 0.
__device__ __forceinline__ void mma_s8_m16n8k32(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

// D = A (16x32 s8, row) * B (32x8 s8, col) + c, int32 accumulators (every C element c).
__device__ __forceinline__ void mma_s8_m16n8k32_from(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, i32 c) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c));
}

// D += A (16x32 s8, row) * B (32x8 s8, col), int32 accumulators.
__device__ __forceinline__ void mma_s8_m16n8k32_acc(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A (16x16, row) * B (16x8, col) with fp32 accumulators; T is bf16_t or f16_t.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<bf16_t>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<f16_t>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Packed 16-bit float a * b + c on both halves (round to nearest even).
template <typename T>
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c);

template <>
__device__ __forceinline__ u32 fma2<bf16_t>(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

template <>
__device__ __forceinline__ u32 fma2<f16_t>(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// x rotated left by n (mod 32) bits: one funnel shift.
__device__ __forceinline__ u32 rotl(u32 x, u32 n) {
    u32 d;
    asm("shf.l.wrap.b32 %0, %1, %1, %2;" : "=r"(d) : "r"(x), "r"(n));
    return d;
}

// Two floats as one packed pair of 16-bit floats (lo in the low half), each
// rounded to nearest even; T is bf16_t or f16_t.
template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi);

template <>
__device__ __forceinline__ u32 pack2<bf16_t>(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

template <>
__device__ __forceinline__ u32 pack2<f16_t>(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// Store one float as the output element type chosen at run time (the
// epilogue is the only place that needs it, so it is not a template axis).
enum OutKind : i32 { kOutF32 = 0, kOutF16 = 1, kOutBf16 = 2 };

__device__ __forceinline__ float load_as_float(const void* p, i64 index, i32 kind) {
    if (kind == kOutF32) return static_cast<const float*>(p)[index];
    if (kind == kOutF16) return to_float(static_cast<const f16_t*>(p)[index]);
    return to_float(static_cast<const bf16_t*>(p)[index]);
}

__device__ __forceinline__ void store_from_float(void* p, i64 index, float v, i32 kind) {
    if (kind == kOutF32) static_cast<float*>(p)[index] = v;
    else if (kind == kOutF16) static_cast<f16_t*>(p)[index] = from_float<f16_t>(v);
    else static_cast<bf16_t*>(p)[index] = from_float<bf16_t>(v);
}

// Programmatic dependent launch (w4kern/_runtime.py, launch(pdl=True)); no-ops
// before sm_90 and for a grid launched without the attribute. A kernel that a
// later kernel of the same op may overlap calls pdl_launch_dependents early (its
// dependent's CTAs may then start and prefetch); a kernel launched with the
// attribute calls pdl_wait before it reads what an earlier kernel of the chain
// wrote and before its first global write.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The start of an op's first kernel (_runtime.FIRST_KERNEL_PDL): wait for the
// stream's previous kernel, whatever it is, before touching memory, then let this
// op's next kernel start. In this order, not the reverse: a trigger before the
// wait lets the op's next kernel (a matvec) start while the previous op's matvec
// still runs, measured up to 8% slower (gemma3-27b.down M=1).
__device__ __forceinline__ void pdl_first_kernel_start() {
    pdl_wait();
    pdl_launch_dependents();
}

}  // namespace w4kern
