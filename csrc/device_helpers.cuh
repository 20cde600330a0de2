// Device helpers shared by the kernels: fp32-or-bf16 scalar access, bf16 packing and the sm_80
// warp-level tensor-core path (ldmatrix, mma.sync m16n8k16 with bf16 operands and fp32 accumulation).
#pragma once

#include <cuda_bf16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace jax_kda {
namespace device {

using bf16 = __nv_bfloat16;

// Two floats as one register of bf16 pair (lo in the low half).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// One element of an fp32 or bf16 array (which one known only at run time): its bits as loaded (fp32,
// or bf16 in the low half), and their value. A value loaded ahead of its use stays bits until then,
// since a conversion right after the load makes the thread wait the load's whole latency there.
__device__ __forceinline__ uint32_t load_scalar_bits(const void *p, int64_t i, bool is_f32) {
  return is_f32 ? __float_as_uint(static_cast<const float *>(p)[i]) : uint32_t(static_cast<const uint16_t *>(p)[i]);
}
__device__ __forceinline__ float scalar_of_bits(uint32_t bits, bool is_f32) {
  return __uint_as_float(is_f32 ? bits : bits << 16);
}
// The element as a float, converted as soon as it is loaded.
__device__ __forceinline__ float load_scalar(const void *p, int64_t i, bool is_f32) {
  return scalar_of_bits(load_scalar_bits(p, i, is_f32), is_f32);
}
__device__ __forceinline__ void store_scalar(void *p, int64_t i, bool is_f32, float x) {
  if (is_f32) {
    static_cast<float *>(p)[i] = x;
  } else {
    static_cast<bf16 *>(p)[i] = __float2bfloat16_rn(x);
  }
}

// d += a b for one 16x8x16 tile: a the A fragment (4 registers), b0, b1 the B fragment.
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1],
                                             d[2], d[3]);
}

// Four 8x8 b16 matrices from shared memory; `row_ptr` is this lane's row address.
__device__ __forceinline__ void ldsm_x4(const bf16 *row_ptr, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t *>(row_ptr), r[0], r[1], r[2], r[3]);
}
// The same, each 8x8 matrix transposed.
__device__ __forceinline__ void ldsm_x4_trans(const bf16 *row_ptr, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t *>(row_ptr), r[0], r[1], r[2], r[3]);
}

}  // namespace device
}  // namespace jax_kda
