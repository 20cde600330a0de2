// Correction of segmented prefill outputs (jax_kda/segments.py): the parameters and the launcher.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kda_contract.h"

namespace jax_kda {

// o[t, h, v] = o_aug[t, h, v] + Σ_k o_aug[t, h, V + k] S[seg(t), h, v, k] for the tokens t of a packed
// batch whose segments start at cu_seqlens. o_aug: [T, HV, V + K] bf16 (a prefill with transition
// columns); S, the state entering each segment, as an exact bf16 pair S_hi + S_lo: [N, HV, V, K].
struct CorrectParams {
  const void *o_aug;
  const void *entry_hi, *entry_lo;
  const int32_t *cu_seqlens;  // [N + 1]
  void *o;                    // [T, HV, V] bf16
  int32_t tokens, value_heads, head_dim_k, head_dim_v, num_segments;
};

cudaError_t correct_launch(const CorrectParams &params, cudaStream_t stream);

}  // namespace jax_kda
