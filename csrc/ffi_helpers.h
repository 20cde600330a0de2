// Helpers shared by the FFI handlers: describing buffers in error messages, dtype checks, launch errors.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_kda {
namespace ffi_helpers {

namespace ffi = xla::ffi;

// "[d0, d1, ...]" of a buffer's dimensions.
inline std::string dims_str(const ffi::AnyBuffer &b) {
  std::string s = "[";
  for (auto d : b.dimensions()) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

// bfloat16, or float32 where `allow_f32`.
inline bool is_bf16_or(ffi::DataType t, bool allow_f32) {
  return t == ffi::DataType::BF16 || (allow_f32 && t == ffi::DataType::F32);
}

// Success, or an Internal error naming what failed to launch.
inline ffi::Error launch_result(cudaError_t err, const char *what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace ffi_helpers
}  // namespace jax_kda
