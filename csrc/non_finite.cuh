// The bit test of the kernels' non-finite isolation. No dependencies, so that csrc/chunk32 (which the
// prototypes of benchmarks/kernel_next build without CUTLASS) includes it as well.
#pragma once

#include <cstdint>

namespace jax_kda {

// Bit 15 of each half set where that bf16 of the pair is an Inf or a NaN (all exponent bits set; the
// masked add carries into bit 15 only then, and never across the halves).
__device__ __forceinline__ uint32_t non_finite_bf16x2(uint32_t pair) {
  return ((pair & 0x7F807F80u) + 0x00800080u) & 0x80008000u;
}

}  // namespace jax_kda
