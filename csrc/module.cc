// The Python extension (jax_kda._kda_ext): the kernels' contract (kda_contract.h) and, when built with
// CUDA, the XLA FFI handlers as capsules. jax_kda/contract.py is its only reader. Built without CUDA it
// still exports the contract, and jax_kda runs its pure-JAX paths.

#include <nanobind/nanobind.h>

#include "kda_contract.h"

#ifdef JAX_KDA_WITH_CUDA
#include "kda_ffi.h"
#endif

namespace nb = nanobind;

NB_MODULE(_kda_ext, m) {
  using namespace jax_kda;
  m.doc() = "jax_kda native extension: the kernels' contract and their XLA FFI handlers";
#ifdef JAX_KDA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  m.attr("prefill_target") = kPrefillTarget;
  m.attr("segment_correct_target") = kSegmentCorrectTarget;
  m.attr("decode_target") = kDecodeTarget;
  nb::dict gates;
  gates["given"] = int32_t(GateMode::kGiven);
  gates["softplus"] = int32_t(GateMode::kSoftplus);
  gates["bounded"] = int32_t(GateMode::kBounded);
  m.attr("gate_codes") = gates;
  m.attr("l2norm_eps") = kL2NormEps;
  m.attr("softplus_threshold") = kSoftplusThreshold;
  m.attr("value_step") = kValueStep;
  m.attr("max_value_columns") = kMaxValueColumns;

  auto reason = [](const char *why) -> nb::object { return why ? nb::object(nb::str(why)) : nb::none(); };
  m.def("prefill_unsupported", [reason](int k, int v) { return reason(prefill_unsupported(k, v)); },
        nb::arg("head_dim_k"), nb::arg("head_dim_v"),
        "Why the prefill kernel cannot take these head sizes, or None.");
  m.def("correct_unsupported", [reason](int k, int v) { return reason(correct_unsupported(k, v)); },
        nb::arg("head_dim_k"), nb::arg("head_dim_v"),
        "Why the segment correction kernel cannot take these head sizes, or None.");
  m.def("decode_unsupported", [reason](int k, int v) { return reason(decode_unsupported(k, v)); },
        nb::arg("head_dim_k"), nb::arg("head_dim_v"),
        "Why the decode kernel cannot take these head sizes, or None.");
  m.attr("two_pass_chunk") = kTwoPassChunk;
  m.attr("two_pass_factor_bytes") = kTwoPassFactorBytes;
  m.attr("two_pass_overlap_budget") = kTwoPassOverlapBudget;
  m.attr("two_pass_serial_budget") = kTwoPassSerialBudget;
  m.attr("two_pass_max_packed_sequences") = kTwoPassMaxPackedSequences;
  m.attr("two_pass_split_min_chunks") = kTwoPassSplitMinChunks;
  m.attr("two_pass_streamed_share_percent") = kTwoPassStreamedSharePercent;
  m.def("two_pass_unsupported",
        [reason](int k, int v, bool packed, int64_t sequences, int gate, float lower_bound, bool plain_inputs,
                 bool fp32_states) {
          return reason(two_pass_unsupported(k, v, packed, sequences, gate, lower_bound, plain_inputs, fp32_states));
        },
        nb::arg("head_dim_k"), nb::arg("head_dim_v"), nb::arg("packed"), nb::arg("sequences"), nb::arg("gate"),
        nb::arg("lower_bound"), nb::arg("plain_inputs"), nb::arg("fp32_states"),
        "Why the two-pass prefill cannot take this call, or None.");
  m.def("two_pass_serial", &two_pass_serial, nb::arg("state_ctas"), nb::arg("multiprocessors"),
        "Whether the two-pass prefill runs its passes one after the other, its factors in one window.");
  m.def("two_pass_layout",
        [](int64_t sequences, int64_t tokens, int64_t value_heads, bool packed, int64_t carried_columns, bool serial) {
          const TwoPassLayout l = two_pass_layout(sequences, tokens, value_heads, packed, carried_columns, serial);
          nb::dict d;
          d["serial"] = l.serial;
          d["window"] = l.window;
          d["windows"] = l.windows;
          d["items"] = l.items;
          d["buffers"] = l.buffers;
          d["buffer"] = l.buffer;
          d["carry"] = l.carry;
          d["plan"] = l.plan;
          d["flags"] = l.flags;
          d["flag_count"] = l.flag_count;
          d["bytes"] = l.bytes;
          return d;
        },
        nb::arg("sequences"), nb::arg("tokens"), nb::arg("value_heads"), nb::arg("packed"), nb::arg("carried_columns"),
        nb::arg("serial"), "The two-pass prefill's windows and workspace (kda_contract.h's TwoPassLayout) as a dict.");
  m.def("two_pass_schedule",
        [](int64_t sequences, int64_t tokens, int64_t value_heads, bool packed, int64_t state_ctas,
           int64_t multiprocessors) {
          const TwoPassLayout l = two_pass_layout(sequences, tokens, value_heads, packed, 0,
                                                  two_pass_serial(state_ctas, multiprocessors));
          const TwoPassSchedule s = two_pass_schedule(l, tokens, state_ctas, multiprocessors);
          nb::dict d;
          d["streamed"] = s.streamed;
          d["overlapped"] = s.overlapped;
          d["buffers"] = s.buffers;
          d["window"] = s.window;
          d["windows"] = s.windows;
          d["buffer"] = s.buffer;
          return d;
        },
        nb::arg("sequences"), nb::arg("tokens"), nb::arg("value_heads"), nb::arg("packed"), nb::arg("state_ctas"),
        nb::arg("multiprocessors"),
        "How the two-pass prefill runs its windows (kda_contract.h's TwoPassSchedule) as a dict.");
  m.def("prefill_v_slice", &prefill_v_slice, nb::arg("sequences"), nb::arg("value_heads"), nb::arg("head_dim_v"),
        nb::arg("multiprocessors"), "Value columns one CTA of the prefill owns (64 or 128).");

  m.def("cuda_registrations", []() {
    nb::dict targets;
#ifdef JAX_KDA_WITH_CUDA
    targets[kPrefillTarget] = nb::capsule(reinterpret_cast<void *>(KdaPrefillCuda));
    targets[kSegmentCorrectTarget] = nb::capsule(reinterpret_cast<void *>(KdaSegmentCorrectCuda));
    targets[kDecodeTarget] = nb::capsule(reinterpret_cast<void *>(KdaDecodeCuda));
#endif
    return targets;
  }, "FFI target name -> handler capsule, for the CUDA platform.");
}
