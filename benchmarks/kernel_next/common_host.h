// Host side of the kernel_next microkernels: error checks, bf16 rounding, a deterministic generator,
// the float64 evaluation of one 32-token chunk's factors (SPEC.md's chunked form, bounded gate), error
// metrics and timing statistics.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "layout.h"

#define KN_CHECK(call)                                                                            \
  do {                                                                                            \
    const cudaError_t kn_status = (call);                                                         \
    if (kn_status != cudaSuccess) {                                                               \
      fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(kn_status)); \
      exit(2);                                                                                    \
    }                                                                                             \
  } while (0)

namespace jax_kda {
namespace chunk32 {

// ---- bf16 ----------------------------------------------------------------------------------------
constexpr uint16_t kBf16Poison = 0xFFFF;  // a NaN: an output element left unwritten stays NaN
constexpr uint32_t kF32Poison = 0xFFFFFFFFu;

inline uint16_t bf16_bits(float x) {  // round to nearest even, NaN kept
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline double round_bf16(double x) { return bf16_value(bf16_bits(float(x))); }

// ---- deterministic generator (splitmix64) ----------------------------------------------------
struct Generator {
  uint64_t state;
  explicit Generator(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * (1.0 / 9007199254740992.0); }
  float uniform_bf16(double lo, double hi) { return bf16_value(bf16_bits(float(uniform(lo, hi)))); }
};

// ---- one chunk's factors in float64 ------------------------------------------------------------
struct GateParams {
  double a_log = 0.0;            // A = exp(a_log)
  double dt_bias[kDimK] = {};
  GateMode mode = GateMode::kBounded;
  double lower_bound = -5.0;     // bounded gate: a = lower_bound * sigmoid(A (g + dt_bias))
  double scale = 0.08838834764831845;  // 128 ** -0.5
  bool l2norm = true;
  bool beta_sigmoid = true;
};

struct ChunkInputs {  // the bf16 inputs of one chunk, as floats
  float q[kChunk][kDimK], k[kChunk][kDimK], g[kChunk][kDimK], beta[kChunk];
};

struct ChunkFactors {
  double w[kChunk][kDimK];       // W = (I + L)^-1 diag(beta) (k̂ e^Gamma); the kernels store W' = -W
  double qd[kChunk][kDimK];      // scale q̂ e^Gamma
  double kend[kChunk][kDimK];    // k̂ e^(Gamma_C - Gamma)
  double decay[kDimK];           // e^Gamma_C
  double tbeta[kChunk][kChunk];  // (I + L)^-1 diag(beta)
  double aqk[kChunk][kChunk];    // scale q̂_i . (k̂_j e^(Gamma_i - Gamma_j)) for j <= i, else 0
};

// SPEC.md "Chunked form", evaluated directly (exp of every difference, forward substitution for the inverse).
inline void reference_factors(const ChunkInputs &in, const GateParams &gp, ChunkFactors &f) {
  static thread_local double gamma[kChunk][kDimK], qh[kChunk][kDimK], kh[kChunk][kDimK], lmat[kChunk][kChunk],
      tmat[kChunk][kChunk];
  double beta[kChunk];
  const double a_scale = std::exp(gp.a_log);
  for (int d = 0; d < kDimK; ++d) {
    double run = 0.0;
    for (int t = 0; t < kChunk; ++t) {
      run += gate_log_decay(gp.mode, double(in.g[t][d]), a_scale, gp.dt_bias[d], gp.lower_bound);
      gamma[t][d] = run;
    }
  }
  for (int t = 0; t < kChunk; ++t) {
    beta[t] = gp.beta_sigmoid ? 1.0 / (1.0 + std::exp(-double(in.beta[t]))) : double(in.beta[t]);
    double sq = 0.0, sk = 0.0;
    for (int d = 0; d < kDimK; ++d) {
      sq += double(in.q[t][d]) * in.q[t][d];
      sk += double(in.k[t][d]) * in.k[t][d];
    }
    const double rq = gp.l2norm ? 1.0 / std::sqrt(sq + 1e-6) : 1.0, rk = gp.l2norm ? 1.0 / std::sqrt(sk + 1e-6) : 1.0;
    for (int d = 0; d < kDimK; ++d) {
      qh[t][d] = in.q[t][d] * rq;
      kh[t][d] = in.k[t][d] * rk;
    }
  }
  for (int d = 0; d < kDimK; ++d) f.decay[d] = std::exp(gamma[kChunk - 1][d]);
  for (int t = 0; t < kChunk; ++t) {
    for (int d = 0; d < kDimK; ++d) {
      f.qd[t][d] = gp.scale * qh[t][d] * std::exp(gamma[t][d]);
      f.kend[t][d] = kh[t][d] * std::exp(gamma[kChunk - 1][d] - gamma[t][d]);
    }
  }
  for (int i = 0; i < kChunk; ++i) {
    for (int j = 0; j < kChunk; ++j) {
      double kk = 0.0, qk = 0.0;
      if (j <= i) {
        for (int d = 0; d < kDimK; ++d) {
          const double e = std::exp(gamma[i][d] - gamma[j][d]);
          kk += kh[i][d] * kh[j][d] * e;
          qk += qh[i][d] * kh[j][d] * e;
        }
      }
      lmat[i][j] = j < i ? beta[i] * kk : 0.0;
      f.aqk[i][j] = j <= i ? gp.scale * qk : 0.0;
    }
  }
  for (int j = 0; j < kChunk; ++j) {  // column j of (I + L)^-1
    for (int i = 0; i < kChunk; ++i) {
      double x = i == j ? 1.0 : 0.0;
      for (int m = 0; m < i; ++m) x -= lmat[i][m] * tmat[m][j];
      tmat[i][j] = x;
    }
  }
  for (int i = 0; i < kChunk; ++i)
    for (int j = 0; j < kChunk; ++j) f.tbeta[i][j] = tmat[i][j] * beta[j];
  for (int i = 0; i < kChunk; ++i) {
    for (int d = 0; d < kDimK; ++d) {
      double x = 0.0;
      for (int j = 0; j <= i; ++j) x += f.tbeta[i][j] * kh[j][d] * std::exp(gamma[j][d]);
      f.w[i][d] = x;
    }
  }
}

// ---- metrics ----------------------------------------------------------------------------------
struct ErrorStats {
  double sum_sq_err = 0.0, sum_sq_ref = 0.0, max_abs_err = 0.0;
  long long count = 0, non_finite = 0;
  void add(double got, double want) {
    ++count;
    if (!std::isfinite(got)) {
      ++non_finite;
      return;
    }
    const double e = got - want;
    sum_sq_err += e * e;
    sum_sq_ref += want * want;
    max_abs_err = std::max(max_abs_err, std::fabs(e));
  }
  // RMS(x - ref) / RMS(ref) (SPEC.md "Accuracy metric"); infinite when anything was not finite. With a
  // floor, RMS(ref) counts as at least `floor_rms` (a quantity whose natural scale is known, such as a
  // transition that maps an O(1) state: decayed to nothing, its entries are only judged against that).
  double relative_rms(double floor_rms = 0.0) const {
    if (non_finite > 0) return INFINITY;
    if (count == 0) return 0.0;
    const double ref = std::max(std::sqrt(sum_sq_ref / count), floor_rms);
    return ref > 0 ? std::sqrt(sum_sq_err / count) / ref : std::sqrt(sum_sq_err);
  }
};

inline double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct DeviceInfo {
  int multiprocessors = 0;
  int clock_khz = 0;  // maximum SM clock
  std::string name;
};
inline DeviceInfo device_info() {
  DeviceInfo info;
  int device = 0;
  KN_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  KN_CHECK(cudaGetDeviceProperties(&prop, device));
  info.multiprocessors = prop.multiProcessorCount;
  info.name = prop.name;
  KN_CHECK(cudaDeviceGetAttribute(&info.clock_khz, cudaDevAttrClockRate, device));
  return info;
}

// Times `launch` (which must check its own launch) `reps` times after `warmup` launches with CUDA
// events; returns the per-launch times in milliseconds.
template <class Launch>
std::vector<double> time_launches(Launch launch, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) launch();
  KN_CHECK(cudaDeviceSynchronize());
  cudaEvent_t begin, end;
  KN_CHECK(cudaEventCreate(&begin));
  KN_CHECK(cudaEventCreate(&end));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    KN_CHECK(cudaEventRecord(begin));
    launch();
    KN_CHECK(cudaEventRecord(end));
    KN_CHECK(cudaEventSynchronize(end));
    float t = 0.f;
    KN_CHECK(cudaEventElapsedTime(&t, begin, end));
    ms.push_back(t);
  }
  KN_CHECK(cudaEventDestroy(begin));
  KN_CHECK(cudaEventDestroy(end));
  return ms;
}

inline int int_option(int argc, char **argv, const char *name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

}  // namespace chunk32
}  // namespace jax_kda
