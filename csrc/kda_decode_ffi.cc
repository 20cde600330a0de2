// The FFI handler of the decode step: checks the buffers against the kernel's contract and launches it
// on XLA's stream. No allocation and no host synchronisation, so it can be captured in CUDA graphs.

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#include "ffi_helpers.h"
#include "kda_decode.h"
#include "kda_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_kda {
namespace {

using ffi_helpers::dims_str;
using ffi_helpers::is_bf16_or;
using ffi_helpers::launch_result;

// Whether the buffer's dimensions are exactly `want`.
bool has_dims(const ffi::AnyBuffer &b, std::initializer_list<int64_t> want) {
  auto d = b.dimensions();
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (d[i++] != w) return false;
  }
  return true;
}

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                      ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer state,
                      ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> new_state, float scale, int32_t gate,
                      float lower_bound, bool l2norm, bool beta_sigmoid, bool allow_neg_eigval, bool state_v_first,
                      bool has_A_log, bool has_dt_bias) {
  auto qd = q.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || vd.size() != 3) {
    return ffi::Error::InvalidArgument("jax_kda decode: q must be [N, H, K] and v [N, HV, V], got " + dims_str(q) +
                                       " and " + dims_str(v));
  }
  const int64_t n = qd[0], h = qd[1], kd = qd[2], hv = vd[1], vdim = vd[2];
  if (const char *why = decode_unsupported(int(kd), int(vdim))) {
    return ffi::Error::InvalidArgument(std::string("jax_kda decode: ") + why);
  }
  auto state_shaped = [&](const ffi::AnyBuffer &b) {
    return state_v_first ? has_dims(b, {n, hv, vdim, kd}) : has_dims(b, {n, hv, kd, vdim});
  };
  const bool shapes_agree = vd[0] == n && h > 0 && hv % h == 0 && n * hv <= std::numeric_limits<int32_t>::max() &&
                            has_dims(k, {n, h, kd}) && has_dims(g, {n, hv, kd}) && has_dims(beta, {n, hv}) &&
                            (!has_A_log || has_dims(A_log, {hv})) && (!has_dt_bias || has_dims(dt_bias, {hv, kd})) &&
                            state_shaped(state) && state_shaped(*new_state) && has_dims(*o, {n, hv, vdim});
  if (!shapes_agree) {
    return ffi::Error::InvalidArgument("jax_kda decode: inconsistent shapes q " + dims_str(q) + ", k " + dims_str(k) +
                                       ", v " + dims_str(v) + ", g " + dims_str(g) + ", beta " + dims_str(beta) +
                                       ", state " + dims_str(state) + " (state_v_first " +
                                       (state_v_first ? "true" : "false") + "), o " + dims_str(*o) +
                                       ", new_state " + dims_str(*new_state));
  }
  const ffi::DataType qkv = q.element_type();
  if (!is_bf16_or(qkv, true) || k.element_type() != qkv || v.element_type() != qkv || o->element_type() != qkv) {
    return ffi::Error::InvalidArgument("jax_kda decode: q, k, v and o must share one dtype, bfloat16 or float32");
  }
  if (!is_bf16_or(g.element_type(), true) || !is_bf16_or(beta.element_type(), true)) {
    return ffi::Error::InvalidArgument("jax_kda decode: g and beta must be bfloat16 or float32");
  }
  if ((has_A_log && A_log.element_type() != ffi::DataType::F32) ||
      (has_dt_bias && dt_bias.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("jax_kda decode: A_log and dt_bias must be float32");
  }
  if (!is_bf16_or(state.element_type(), true) || new_state->element_type() != state.element_type()) {
    return ffi::Error::InvalidArgument("jax_kda decode: state and new_state must share one dtype, float32 or bfloat16");
  }
  if (gate < int(GateMode::kGiven) || gate > int(GateMode::kBounded)) {
    return ffi::Error::InvalidArgument("jax_kda decode: bad gate mode");
  }

  DecodeParams p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.qkv_is_f32 = qkv == ffi::DataType::F32;
  p.g_is_f32 = g.element_type() == ffi::DataType::F32;
  p.beta_is_f32 = beta.element_type() == ffi::DataType::F32;
  p.A_log = has_A_log ? static_cast<const float *>(A_log.untyped_data()) : nullptr;
  p.dt_bias = has_dt_bias ? static_cast<const float *>(dt_bias.untyped_data()) : nullptr;
  p.state = state.untyped_data();
  p.state_is_f32 = state.element_type() == ffi::DataType::F32;
  p.o = o->untyped_data();
  p.new_state = new_state->untyped_data();
  p.sequences = int32_t(n);
  p.heads = int32_t(h);
  p.value_heads = int32_t(hv);
  p.head_dim_k = int32_t(kd);
  p.head_dim_v = int32_t(vdim);
  p.scale = scale;
  p.gate = static_cast<GateMode>(gate);
  p.lower_bound = lower_bound;
  p.l2norm = l2norm;
  p.beta_sigmoid = beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.state_v_first = state_v_first;
  return launch_result(decode_launch(p, stream), "jax_kda decode kernel");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdaDecodeCuda, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Arg<ffi::AnyBuffer>()  // A_log
                                  .Arg<ffi::AnyBuffer>()  // dt_bias
                                  .Arg<ffi::AnyBuffer>()  // state
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // new_state
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("gate")
                                  .Attr<float>("lower_bound")
                                  .Attr<bool>("l2norm")
                                  .Attr<bool>("beta_sigmoid")
                                  .Attr<bool>("allow_neg_eigval")
                                  .Attr<bool>("state_v_first")
                                  .Attr<bool>("has_A_log")
                                  .Attr<bool>("has_dt_bias"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_kda
