// The FFI handler of the prefill: checks the buffers against the kernels' contract and launches the
// chunk-16 kernel or, where the caller chose it (`two_pass`), the two-pass kernel over the workspace
// result, on XLA's stream. No allocation and no host synchronisation, so it can be captured in CUDA graphs.

#include "kda_ffi.h"

#include <string>

#include "ffi_helpers.h"
#include "kda_prefill.h"
#include "kda_two_pass.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_kda {
namespace {

using ffi_helpers::dims_str;
using ffi_helpers::is_bf16_or;
using ffi_helpers::launch_result;

ffi::Error PrefillImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer g, ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                       ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                       ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> final_state,
                       ffi::Result<ffi::AnyBuffer> workspace, float scale, int32_t gate, float lower_bound,
                       bool l2norm, bool beta_sigmoid, bool allow_neg_eigval, bool state_v_first, bool has_A_log,
                       bool has_dt_bias, bool has_initial_state, bool has_cu_seqlens, bool write_final_state,
                       bool transition_columns, bool two_pass, bool two_pass_serial) {
  auto qd = q.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("jax_kda prefill: q must be [B, T, H, K] and v [B, T, HV, V], got " +
                                       dims_str(q) + " and " + dims_str(v));
  }
  PrefillParams p{};
  p.batch = int32_t(qd[0]);
  p.tokens = int32_t(qd[1]);
  p.heads = int32_t(qd[2]);
  p.head_dim_k = int32_t(qd[3]);
  p.value_heads = int32_t(vd[2]);
  p.v_columns = int32_t(vd[3]);
  p.head_dim_v = p.v_columns + (transition_columns ? p.head_dim_k : 0);
  p.num_sequences = has_cu_seqlens ? int32_t(cu_seqlens.dimensions()[0]) - 1 : p.batch;
  if (const char *why = prefill_unsupported(p.head_dim_k, p.head_dim_v)) {
    return ffi::Error::InvalidArgument(std::string("jax_kda prefill: ") + why);
  }
  if (o->dimensions().size() != 4 || o->dimensions()[3] != p.head_dim_v) {
    return ffi::Error::InvalidArgument("jax_kda prefill: o must be [B, T, HV, " + std::to_string(p.head_dim_v) +
                                       "], got " + dims_str(*o));
  }
  if (q.element_type() != ffi::DataType::BF16 || k.element_type() != ffi::DataType::BF16 ||
      v.element_type() != ffi::DataType::BF16 || o->element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("jax_kda prefill: q, k, v and o must be bfloat16");
  }
  if (!is_bf16_or(g.element_type(), true) || !is_bf16_or(beta.element_type(), true)) {
    return ffi::Error::InvalidArgument("jax_kda prefill: g and beta must be bfloat16 or float32");
  }
  if ((has_A_log && A_log.element_type() != ffi::DataType::F32) ||
      (has_dt_bias && dt_bias.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("jax_kda prefill: A_log and dt_bias must be float32");
  }
  if ((has_initial_state && !is_bf16_or(initial_state.element_type(), true)) ||
      (write_final_state && !is_bf16_or(final_state->element_type(), true))) {
    return ffi::Error::InvalidArgument("jax_kda prefill: states must be float32 or bfloat16");
  }
  if (has_cu_seqlens && cu_seqlens.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("jax_kda prefill: cu_seqlens must be int32");
  }
  if (gate < int(GateMode::kGiven) || gate > int(GateMode::kBounded) || p.heads == 0 || p.value_heads % p.heads != 0) {
    return ffi::Error::InvalidArgument("jax_kda prefill: bad gate mode or head counts");
  }

  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.g_is_f32 = g.element_type() == ffi::DataType::F32;
  p.beta = beta.untyped_data();
  p.beta_is_f32 = beta.element_type() == ffi::DataType::F32;
  p.A_log = has_A_log ? static_cast<const float *>(A_log.untyped_data()) : nullptr;
  p.dt_bias = has_dt_bias ? static_cast<const float *>(dt_bias.untyped_data()) : nullptr;
  p.initial_state = has_initial_state ? initial_state.untyped_data() : nullptr;
  p.initial_is_f32 = initial_state.element_type() == ffi::DataType::F32;
  p.cu_seqlens = has_cu_seqlens ? static_cast<const int32_t *>(cu_seqlens.untyped_data()) : nullptr;
  p.o = o->untyped_data();
  p.final_state = write_final_state ? final_state->untyped_data() : nullptr;
  p.final_is_f32 = final_state->element_type() == ffi::DataType::F32;
  p.scale = scale;
  p.gate = static_cast<GateMode>(gate);
  p.lower_bound = lower_bound;
  p.l2norm = l2norm;
  p.beta_sigmoid = beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.state_v_first = state_v_first;
  if (p.tokens == 0 || p.batch == 0) return ffi::Error::Success();

  if (two_pass) {
    if (const char *why = two_pass_unsupported(p)) {
      return ffi::Error::InvalidArgument(std::string("jax_kda prefill: ") + why);
    }
    const int64_t needed = two_pass_layout(p.num_sequences, p.tokens, p.value_heads, has_cu_seqlens,
                                           write_final_state ? 0 : p.head_dim_v, two_pass_serial).bytes;
    if (workspace->element_type() != ffi::DataType::U8 || int64_t(workspace->size_bytes()) < needed) {
      return ffi::Error::InvalidArgument("jax_kda prefill: the two-pass kernel needs a uint8 workspace of " +
                                         std::to_string(needed) + " bytes, got " + dims_str(*workspace));
    }
    return launch_result(two_pass_launch(p, two_pass_serial, workspace->untyped_data(), stream),
                         "jax_kda two-pass prefill kernel");
  }
  return launch_result(prefill_launch(p, stream), "jax_kda prefill kernel");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdaPrefillCuda, PrefillImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Arg<ffi::AnyBuffer>()  // A_log
                                  .Arg<ffi::AnyBuffer>()  // dt_bias
                                  .Arg<ffi::AnyBuffer>()  // initial_state
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // final_state
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8; empty unless two_pass)
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("gate")
                                  .Attr<float>("lower_bound")
                                  .Attr<bool>("l2norm")
                                  .Attr<bool>("beta_sigmoid")
                                  .Attr<bool>("allow_neg_eigval")
                                  .Attr<bool>("state_v_first")
                                  .Attr<bool>("has_A_log")
                                  .Attr<bool>("has_dt_bias")
                                  .Attr<bool>("has_initial_state")
                                  .Attr<bool>("has_cu_seqlens")
                                  .Attr<bool>("write_final_state")
                                  .Attr<bool>("transition_columns")
                                  .Attr<bool>("two_pass")
                                  .Attr<bool>("two_pass_serial"),  // kda_contract.h's two_pass_serial, at lowering
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_kda
