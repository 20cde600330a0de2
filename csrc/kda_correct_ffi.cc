// The FFI handler of the segment correction (jax_kda/segments.py): checks the buffers and launches the
// kernel on XLA's stream. No allocation and no host synchronisation, so it can be captured in CUDA graphs.

#include "kda_ffi.h"

#include <string>

#include "ffi_helpers.h"
#include "kda_correct.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_kda {
namespace {

using ffi_helpers::dims_str;
using ffi_helpers::launch_result;

ffi::Error CorrectImpl(cudaStream_t stream, ffi::AnyBuffer o_aug, ffi::AnyBuffer entry_hi, ffi::AnyBuffer entry_lo,
                       ffi::AnyBuffer cu_seqlens, ffi::Result<ffi::AnyBuffer> o) {
  auto ad = o_aug.dimensions(), sd = entry_hi.dimensions(), od = o->dimensions();
  if (ad.size() != 4 || sd.size() != 4 || od.size() != 4 || cu_seqlens.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("jax_kda segment correction: expected o_aug [B, T, HV, V + K], entry "
                                       "[N, HV, V, K], cu_seqlens [N + 1], o [B, T, HV, V]; got " +
                                       dims_str(o_aug) + ", " + dims_str(entry_hi) + ", " +
                                       dims_str(cu_seqlens) + ", " + dims_str(*o));
  }
  CorrectParams p{};
  p.tokens = int32_t(ad[0] * ad[1]);
  p.value_heads = int32_t(ad[2]);
  p.head_dim_k = int32_t(sd[3]);
  p.head_dim_v = int32_t(sd[2]);
  p.num_segments = int32_t(cu_seqlens.dimensions()[0]) - 1;
  bool shapes_agree = ad[3] == p.head_dim_v + p.head_dim_k && sd[0] == p.num_segments && sd[1] == p.value_heads &&
                      entry_lo.dimensions().size() == 4 && od[0] * od[1] == p.tokens && od[2] == p.value_heads &&
                      od[3] == p.head_dim_v && p.num_segments >= 1;
  for (size_t i = 0; shapes_agree && i < 4; ++i) shapes_agree = entry_lo.dimensions()[i] == sd[i];
  if (!shapes_agree) {
    return ffi::Error::InvalidArgument("jax_kda segment correction: inconsistent shapes " + dims_str(o_aug) + ", " +
                                       dims_str(entry_hi) + ", " + dims_str(entry_lo) + ", " +
                                       dims_str(cu_seqlens) + ", " + dims_str(*o));
  }
  if (const char *why = correct_unsupported(p.head_dim_k, p.head_dim_v)) {
    return ffi::Error::InvalidArgument(std::string("jax_kda segment correction: ") + why);
  }
  if (o_aug.element_type() != ffi::DataType::BF16 || entry_hi.element_type() != ffi::DataType::BF16 ||
      entry_lo.element_type() != ffi::DataType::BF16 || o->element_type() != ffi::DataType::BF16 ||
      cu_seqlens.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("jax_kda segment correction: bf16 arrays and int32 cu_seqlens expected");
  }
  p.o_aug = o_aug.untyped_data();
  p.entry_hi = entry_hi.untyped_data();
  p.entry_lo = entry_lo.untyped_data();
  p.cu_seqlens = static_cast<const int32_t *>(cu_seqlens.untyped_data());
  p.o = o->untyped_data();
  return launch_result(correct_launch(p, stream), "jax_kda segment correction");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdaSegmentCorrectCuda, CorrectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // o_aug
                                  .Arg<ffi::AnyBuffer>()  // entry_hi
                                  .Arg<ffi::AnyBuffer>()  // entry_lo
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens
                                  .Ret<ffi::AnyBuffer>(),  // o
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_kda
