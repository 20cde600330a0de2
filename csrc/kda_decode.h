// KDA decode step (one token per sequence): the parameters the FFI handler passes to the launcher.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kda_contract.h"

namespace jax_kda {

struct DecodeParams {
  // Inputs. q, k: [N, H, K]; v: [N, HV, V] (bf16, or fp32 when qkv_is_f32); g: [N, HV, K];
  // beta: [N, HV].
  const void *q, *k, *v, *g, *beta;
  bool qkv_is_f32, g_is_f32, beta_is_f32;
  const float *A_log;    // [HV] or null
  const float *dt_bias;  // [HV, K] or null
  const void *state;     // [N, HV, V, K] when state_v_first, else [N, HV, K, V]; fp32 or bf16
  bool state_is_f32;
  // Outputs. o: [N, HV, V] in q's dtype; new_state: the layout and dtype of state.
  void *o;
  void *new_state;

  int32_t sequences, heads, value_heads, head_dim_k, head_dim_v;
  float scale;
  GateMode gate;
  float lower_bound;
  bool l2norm, beta_sigmoid, allow_neg_eigval, state_v_first;
};

cudaError_t decode_launch(const DecodeParams &params, cudaStream_t stream);

}  // namespace jax_kda
