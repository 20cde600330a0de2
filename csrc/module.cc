// The Python extension: hands the XLA FFI handlers to jax_kda as capsules (see jax_kda/cuda.py).
// Built without CUDA it registers nothing, and jax_kda runs its pure-JAX paths.

#include <nanobind/nanobind.h>

#ifdef JAX_KDA_WITH_CUDA
#include "kda_ffi.h"
#endif

namespace nb = nanobind;

NB_MODULE(_kda_ext, m) {
  m.doc() = "jax_kda native extension";
#ifdef JAX_KDA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cuda_registrations", []() {
    nb::dict targets;
#ifdef JAX_KDA_WITH_CUDA
    targets[jax_kda::kPrefillTarget] = nb::capsule(reinterpret_cast<void *>(jax_kda::KdaPrefillCuda));
    targets[jax_kda::kSegmentCorrectTarget] = nb::capsule(reinterpret_cast<void *>(jax_kda::KdaSegmentCorrectCuda));
#endif
    return targets;
  }, "FFI target name -> handler capsule, for the CUDA platform.");
}
