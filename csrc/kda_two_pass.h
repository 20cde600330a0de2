// The two-pass chunk-32 KDA prefill on Hopper (kda_two_pass_kernel.cu): the launcher the FFI handler calls.
#pragma once

#include <cuda_runtime.h>

#include "kda_prefill.h"

namespace jax_kda {

// Why the two-pass prefill cannot take the call of `p`, or nullptr (kda_contract.h's rule on its fields).
inline const char *two_pass_unsupported(const PrefillParams &p) {
  const bool fp32_states = (p.initial_state == nullptr || p.initial_is_f32) && (p.final_state == nullptr || p.final_is_f32);
  return two_pass_unsupported(p.head_dim_k, p.v_columns, p.cu_seqlens != nullptr, p.num_sequences, int32_t(p.gate),
                              p.lower_bound, !p.g_is_f32 && !p.beta_is_f32, fp32_states);
}

// Runs the prefill of `params` (a call two_pass_unsupported takes: kda_contract.h) in windows of chunks,
// serially or not (two_pass_serial, as the caller planned it), with `workspace` (two_pass_layout of
// kda_contract.h: its bytes at least) for the factors of a window, the fp32 state carried between windows
// when the call writes no final state, and the plan of packed sequences. Allocates nothing. The FFI
// handler checks both preconditions, with the error the caller sees.
cudaError_t two_pass_launch(const PrefillParams &params, bool serial, void *workspace, cudaStream_t stream);

}  // namespace jax_kda
