// XLA FFI handlers of the KDA kernels (CUDA platform).
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_kda {

inline constexpr const char *kPrefillTarget = "jax_kda_prefill_cuda";

// Operands: q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens (absent ones as empty arrays,
// flagged by the has_* attributes). Results: o, final_state (empty unless write_final_state).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaPrefillCuda);

inline constexpr const char *kSegmentCorrectTarget = "jax_kda_segment_correct_cuda";

// Operands: o_aug (a prefill's output with transition columns), entry_hi, entry_lo (the state entering
// each segment as a bf16 pair, V-first), cu_seqlens of the segments. Result: o.
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaSegmentCorrectCuda);

}  // namespace jax_kda
