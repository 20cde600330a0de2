// KDA prefill on Hopper: the parameters the FFI handler passes to the CUDA launcher.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kda_contract.h"

namespace jax_kda {

struct PrefillParams {
  // Inputs. q, k: [B, T, H, K] bf16; v: [B, T, HV, V] bf16; g: [B, T, HV, K]; beta: [B, T, HV].
  const void *q, *k, *v, *g, *beta;
  bool g_is_f32, beta_is_f32;
  const float *A_log;          // [HV] or null
  const float *dt_bias;        // [HV, K] or null
  const void *initial_state;   // [N, HV, K, V] ([N, HV, V, K] when state_v_first) or null
  bool initial_is_f32;
  const int32_t *cu_seqlens;   // [N + 1] or null (then N = B sequences of T tokens)
  // Outputs. o: [B, T, HV, V] bf16; final_state like initial_state, or null.
  void *o;
  void *final_state;
  bool final_is_f32;

  int32_t batch, tokens, heads, value_heads, head_dim_k, head_dim_v, num_sequences;
  // Columns of v; head_dim_v (o and the states) exceeds it by K with transition columns: value
  // columns v_columns.. read zeros and their state starts as the identity (see jax_kda/segments.py).
  int32_t v_columns;
  float scale;
  GateMode gate;
  float lower_bound;
  bool l2norm, beta_sigmoid, allow_neg_eigval, state_v_first;
};

cudaError_t prefill_launch(const PrefillParams &params, cudaStream_t stream);

}  // namespace jax_kda
