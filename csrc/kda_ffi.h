// XLA FFI handlers of the KDA kernels (CUDA platform).
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_kda {

inline constexpr const char *kPrefillTarget = "jax_kda_prefill_cuda";

// Operands: q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens (absent ones as empty arrays,
// flagged by the has_* attributes). Results: o, final_state (empty unless write_final_state).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaPrefillCuda);

}  // namespace jax_kda
