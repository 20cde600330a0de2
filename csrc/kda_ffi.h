// XLA FFI handlers of the KDA kernels (CUDA platform), registered under kda_contract.h's target names.
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_kda {

// kPrefillTarget. Operands: q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens (absent ones as
// empty arrays, flagged by the has_* attributes). Results: o, final_state (empty unless write_final_state),
// workspace (uint8, two_pass_workspace_bytes of kda_contract.h when two_pass, else empty).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaPrefillCuda);

// kSegmentCorrectTarget. Operands: o_aug (a prefill's output with transition columns), entry_hi,
// entry_lo (the state entering each segment as a bf16 pair, V-first), cu_seqlens of the segments.
// Result: o.
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaSegmentCorrectCuda);

// kDecodeTarget. Operands: q, k [N, H, K], v [N, HV, V], g [N, HV, K], beta [N, HV], A_log, dt_bias
// (absent ones as empty arrays, flagged by the has_* attributes), state. Results: o [N, HV, V],
// new_state (the layout and dtype of state).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KdaDecodeCuda);

}  // namespace jax_kda
