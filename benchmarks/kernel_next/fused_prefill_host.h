// Host side of the chunk-32 prefill programs (fused_prefill.cu, two_pass.cu): recipe inputs on the GPU
// (ANCHORS.md: bf16 q, k = l2normalize(randn), v, g, beta = randn; fp32 A_log = rand(H), dt_bias =
// rand(H, K), initial state 0.1 randn, V-first; bounded gate with lower_bound -5, scale K^-0.5), the
// tensor maps of q, k, g, v, the float64 token-by-token recurrence (SPEC.md), the CPU emulation of the
// kernels' algorithm and rounding (factor_group.cuh + state_step.cuh), the checks of o and the final
// state of chains against both, and the CPU-only checks (stage layouts through the descriptors; the
// emulation against float64). Everything sits in an anonymous namespace: one program includes it once.
#pragma once

#include <cudaTypedefs.h>

#include <cstdio>
#include <utility>
#include <vector>

#include "common_host.h"
#include "factor_group.cuh"

namespace jax_kda {
namespace chunk32 {
namespace {

constexpr float kLowerBound = -5.f;
constexpr double kPassTolerance = 5e-3;       // SPEC.md: FLA's bar against float64
constexpr double kCopyBandwidth = 4.3e12;     // bytes/s, an H200's device-to-device copy (ANCHORS.md)
constexpr float kInitialStateScale = 0.1f;    // initial state = 0.1 randn (emulate_rounding.py's choice)

// ---- input generation on the GPU (hash-based, deterministic) ------------------------------------------
__host__ __device__ inline uint32_t mix32(uint64_t i, uint32_t seed) {
  uint32_t h = uint32_t(i) * 0x9E3779B1u ^ uint32_t(i >> 32) * 0x85EBCA77u ^ (seed * 0xC2B2AE3Du + 0x27D4EB2Fu);
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}
__device__ inline float uniform01(uint64_t i, uint32_t seed) {  // (0, 1)
  return (float(mix32(i, seed) >> 8) + 0.5f) * (1.f / 16777216.f);
}
__device__ inline float normal(uint64_t i, uint32_t seed) {  // Box-Muller on two hashed uniforms
  const float u1 = uniform01(2 * i, seed), u2 = uniform01(2 * i + 1, seed);
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}
__global__ void fill_normal_bf16(uint16_t *dst, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const bf16 b = __float2bfloat16_rn(normal(i, seed));
    dst[i] = *reinterpret_cast<const uint16_t *>(&b);
  }
}
__global__ void fill_f32(float *dst, size_t n, uint32_t seed, float scale, int is_normal) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = scale * (is_normal ? normal(i, seed) : uniform01(i, seed));
}
// Normal values x to log-decays -0.3 |x| (bf16).
__global__ void to_log_decay_bf16(uint16_t *x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const bf16 b = __float2bfloat16_rn(-0.3f * fabsf(__uint_as_float(uint32_t(x[i]) << 16)));
    x[i] = *reinterpret_cast<const uint16_t *>(&b);
  }
}
// Rows of 128 bf16 divided by their L2 norm (fp32), rounded back to bf16: one warp a row.
__global__ void l2_normalize_rows(uint16_t *x, size_t rows) {
  const size_t row = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  uint2 *p = reinterpret_cast<uint2 *>(x + row * kDimK) + lane;  // 4 values a lane
  const uint2 raw = *p;
  float v[4] = {bf16_low(raw.x), bf16_high(raw.x), bf16_low(raw.y), bf16_high(raw.y)};
  float ss = v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
  const float r = rsqrtf(ss);
  *p = make_uint2(pack_bf16(v[0] * r, v[1] * r), pack_bf16(v[2] * r, v[3] * r));
}

// ---- problems on the GPU --------------------------------------------------------------------------
struct Shape {
  const char *name;
  int batch, tokens, heads;
  GateMode gate = GateMode::kBounded;  // log-decay: g drawn as -0.3 |N(0, 1)| (a decay), else N(0, 1)
  int group = 1;                       // value heads per q/k head (grouped value heads)
  int qk_heads() const { return heads / group; }
};

struct DeviceProblem {
  Shape shape{};
  std::vector<int> seqlens;  // packed sequences (shape: batch 1, tokens their sum); empty: B x T
  int *cu = nullptr;         // their offsets on the device, [sequences + 1]
  uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr, *beta = nullptr, *o = nullptr;
  float *a_log = nullptr, *dt_bias = nullptr, *initial_state = nullptr, *final_state = nullptr;
  TensorMaps maps{};
  size_t token_elems() const { return size_t(shape.batch) * shape.tokens * shape.heads * kDimK; }
  size_t qk_elems() const { return size_t(shape.batch) * shape.tokens * shape.qk_heads() * kDimK; }
  size_t beta_elems() const { return size_t(shape.batch) * shape.tokens * shape.heads; }
  size_t state_elems() const { return size_t(sequences()) * shape.heads * kDimV * kDimK; }
  bool packed() const { return !seqlens.empty(); }
  int sequences() const { return packed() ? int(seqlens.size()) : shape.batch; }
  int length(int n) const { return packed() ? seqlens[n] : shape.tokens; }
  // Sequence n's first token as an index into the [B * T] token rows.
  size_t first_row(int n) const {
    if (!packed()) return size_t(n) * shape.tokens;
    size_t at = 0;
    for (int m = 0; m < n; ++m) at += seqlens[m];
    return at;
  }
  // Bytes the kernel must move at least: q, k, v, g, beta read once, o written, the state read and written.
  double floor_bytes() const {
    return (3.0 * token_elems() + 2.0 * qk_elems()) * kBf16Bytes + double(beta_elems()) * kBf16Bytes +
           2.0 * state_elems() * 4;
  }
};

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult status;
    KN_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status));
    if (status != cudaDriverEntryPointSuccess || p == nullptr) {
      fprintf(stderr, "cuTensorMapEncodeTiled not available\n");
      exit(2);
    }
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// A [B, T, heads, 128] bf16 tensor as a 4-D map (channel, head, token, sequence), box 64 x 1 x 32 x 1 with
// the 128B swizzle; boxes past T arrive as zeros.
CUtensorMap make_token_map(const uint16_t *base, const Shape &s, int heads) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {cuuint64_t(kDimK), cuuint64_t(heads), cuuint64_t(s.tokens), cuuint64_t(s.batch)};
  const cuuint64_t strides[3] = {cuuint64_t(kDimK) * kBf16Bytes, cuuint64_t(heads) * kDimK * kBf16Bytes,
                                 cuuint64_t(s.tokens) * heads * kDimK * kBf16Bytes};
  const cuuint32_t box[4] = {cuuint32_t(kRawBoxChannels), 1, cuuint32_t(kChunk), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<uint16_t *>(base),
                                          dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", int(r));
    exit(2);
  }
  return map;
}

void launch_blocks(size_t n, int &blocks) { blocks = int(std::min<size_t>((n + 255) / 256, 4096)); }

// B x T sequences, or `seqlens` packed (then s.batch is 1 and s.tokens their sum).
DeviceProblem make_problem(const Shape &s, uint32_t seed, const std::vector<int> &seqlens = {}) {
  DeviceProblem d;
  d.shape = s;
  d.seqlens = seqlens;
  if (d.packed()) {
    std::vector<int> cu(seqlens.size() + 1, 0);
    for (size_t n = 0; n < seqlens.size(); ++n) cu[n + 1] = cu[n] + seqlens[n];
    if (s.batch != 1 || cu.back() != s.tokens) {
      fprintf(stderr, "packed problem %s: batch 1 and T = the sum of the lengths expected\n", s.name);
      exit(2);
    }
    KN_CHECK(cudaMalloc(&d.cu, cu.size() * sizeof(int)));
    KN_CHECK(cudaMemcpy(d.cu, cu.data(), cu.size() * sizeof(int), cudaMemcpyHostToDevice));
  }
  const size_t n = d.token_elems(), nqk = d.qk_elems(), nb = d.beta_elems(), ns = d.state_elems();
  KN_CHECK(cudaMalloc(&d.q, nqk * 2));
  KN_CHECK(cudaMalloc(&d.k, nqk * 2));
  KN_CHECK(cudaMalloc(&d.v, n * 2));
  KN_CHECK(cudaMalloc(&d.g, n * 2));
  KN_CHECK(cudaMalloc(&d.o, n * 2));
  KN_CHECK(cudaMalloc(&d.beta, nb * 2));
  KN_CHECK(cudaMalloc(&d.a_log, s.heads * 4));
  KN_CHECK(cudaMalloc(&d.dt_bias, size_t(s.heads) * kDimK * 4));
  KN_CHECK(cudaMalloc(&d.initial_state, ns * 4));
  KN_CHECK(cudaMalloc(&d.final_state, ns * 4));
  int blocks = 0;
  launch_blocks(nqk, blocks);
  fill_normal_bf16<<<blocks, 256>>>(d.q, nqk, seed + 1);
  fill_normal_bf16<<<blocks, 256>>>(d.k, nqk, seed + 2);
  launch_blocks(n, blocks);
  fill_normal_bf16<<<blocks, 256>>>(d.v, n, seed + 3);
  fill_normal_bf16<<<blocks, 256>>>(d.g, n, seed + 4);
  if (s.gate == GateMode::kLogDecay) to_log_decay_bf16<<<blocks, 256>>>(d.g, n);
  const size_t rows = nqk / kDimK;
  l2_normalize_rows<<<int((rows * 32 + 255) / 256), 256>>>(d.q, rows);
  l2_normalize_rows<<<int((rows * 32 + 255) / 256), 256>>>(d.k, rows);
  launch_blocks(nb, blocks);
  fill_normal_bf16<<<blocks, 256>>>(d.beta, nb, seed + 5);
  fill_f32<<<1, 256>>>(d.a_log, s.heads, seed + 6, 1.f, 0);
  launch_blocks(size_t(s.heads) * kDimK, blocks);
  fill_f32<<<blocks, 256>>>(d.dt_bias, size_t(s.heads) * kDimK, seed + 7, 1.f, 0);
  launch_blocks(ns, blocks);
  fill_f32<<<blocks, 256>>>(d.initial_state, ns, seed + 8, kInitialStateScale, 1);
  KN_CHECK(cudaGetLastError());
  KN_CHECK(cudaDeviceSynchronize());
  d.maps.q = make_token_map(d.q, s, s.qk_heads());
  d.maps.k = make_token_map(d.k, s, s.qk_heads());
  d.maps.g = make_token_map(d.g, s, s.heads);
  d.maps.v = make_token_map(d.v, s, s.heads);
  return d;
}

void free_problem(DeviceProblem &d) {
  for (void *p : {(void *)d.q, (void *)d.k, (void *)d.v, (void *)d.g, (void *)d.o, (void *)d.beta, (void *)d.a_log,
                  (void *)d.dt_bias, (void *)d.initial_state, (void *)d.final_state, (void *)d.cu})
    KN_CHECK(cudaFree(p));
  d = DeviceProblem{};
}

FusedParams make_params(const DeviceProblem &d) {
  FusedParams p;
  p.batch = d.shape.batch;
  p.tokens = d.shape.tokens;
  p.heads = d.shape.heads;
  p.group = d.shape.group;
  p.cu_seqlens = d.cu;
  p.sequences = d.packed() ? d.sequences() : 0;
  p.beta = d.beta;
  p.a_log = d.a_log;
  p.dt_bias = d.dt_bias;
  p.lower_bound = kLowerBound;
  p.scale = 1.f / std::sqrt(float(kDimK));
  p.initial_state = d.initial_state;
  p.final_state = d.final_state;
  p.o = d.o;
  return p;
}

// ---- one chain on the host --------------------------------------------------------------------
struct ChainInputs {  // the inputs of one (sequence, head) chain, as floats (bf16 values)
  int tokens = 0;
  std::vector<float> q, k, v, g, beta;  // [T][128] ([T] for beta)
  float a_log = 0.f;
  std::vector<float> dt_bias;           // [128]
  std::vector<float> s0;                // [V][K]
  GateMode gate = GateMode::kBounded;
};

// SPEC.md's recurrence in float64, token by token, on the state transposed (st[v][d] = S[d][v]).
// o: [T][V]; st: [V][K] at the end.
void reference_chain(const ChainInputs &in, double lower_bound, double scale, std::vector<double> &o,
                     std::vector<double> &st) {
  const int T = in.tokens;
  st.assign(in.s0.begin(), in.s0.end());
  o.assign(size_t(T) * kDimV, 0.0);
  const double a_scale = std::exp(double(in.a_log));
  std::vector<double> qh(kDimK), kh(kDimK), decay(kDimK);
  for (int t = 0; t < T; ++t) {
    double sq = 0, sk = 0;
    for (int d = 0; d < kDimK; ++d) {
      sq += double(in.q[t * kDimK + d]) * in.q[t * kDimK + d];
      sk += double(in.k[t * kDimK + d]) * in.k[t * kDimK + d];
    }
    const double rq = 1.0 / std::sqrt(sq + 1e-6), rk = 1.0 / std::sqrt(sk + 1e-6);
    for (int d = 0; d < kDimK; ++d) {
      qh[d] = in.q[t * kDimK + d] * rq * scale;
      kh[d] = in.k[t * kDimK + d] * rk;
      decay[d] = std::exp(gate_log_decay(in.gate, double(in.g[t * kDimK + d]), a_scale, in.dt_bias[d], lower_bound));
    }
    const double beta = 1.0 / (1.0 + std::exp(-double(in.beta[t])));
    for (int v = 0; v < kDimV; ++v) {
      double *row = st.data() + size_t(v) * kDimK;
      double ks = 0;
      for (int d = 0; d < kDimK; ++d) {
        row[d] *= decay[d];
        ks += row[d] * kh[d];
      }
      const double r = beta * (double(in.v[t * kDimV + v]) - ks);
      double out = 0;
      for (int d = 0; d < kDimK; ++d) {
        row[d] += kh[d] * r;
        out += row[d] * qh[d];
      }
      o[size_t(t) * kDimV + v] = out;
    }
  }
}

inline float r16(float x) { return bf16_value(bf16_bits(x)); }                   // bf16 rounding
inline float h16(float x) { return __half2float(__float2half_rn(x)); }           // fp16 rounding

// The kernel's algorithm on the CPU in float with its rounding points (fused_prefill_kernel.cuh, phases
// A-E and the state step), exact exp2/sigmoid/rsqrt instead of the approximate instructions.
void emulate_chain(const ChainInputs &in, float lower_bound, float scale, std::vector<double> &o,
                   std::vector<double> &st_out) {
  const int T = in.tokens;
  const float a_scale = std::exp(in.a_log);
  std::vector<float> S(in.s0.begin(), in.s0.end());  // [V][K]
  o.assign(size_t(T) * kDimV, 0.0);
  static float q[kChunk][kDimK], k[kChunk][kDimK], v[kChunk][kDimV], x[kChunk][kDimK];
  static float qr[kChunk][kDimK], krh[kChunk][kDimK], kch[kChunk][kDimK], kcl[kChunk][kDimK];
  static float qd[kChunk][kDimK], kend[kChunk][kDimK], wq[kChunk][kDimK], sa[kDimV][kDimK];
  static float rr[kDimV][kChunk], oo[kDimV][kChunk];
  float beta[kChunk], rq[kChunk], rk[kChunk], decay[kDimK], anchor[kDimK];
  float aqk[kChunk][kChunk], L[kChunk][kChunk], Tm[kChunk][kChunk], tbh[kChunk][kChunk], tbl[kChunk][kChunk],
      tb[kChunk][kChunk];
  const int chunks = (T + kChunk - 1) / kChunk;
  for (int c = 0; c < chunks; ++c) {
    const int valid = std::min(kChunk, T - c * kChunk);
    for (int t = 0; t < kChunk; ++t) {
      const bool live = t < valid;
      const size_t at = size_t(c * kChunk + t);
      for (int d = 0; d < kDimK; ++d) {
        q[t][d] = live ? in.q[at * kDimK + d] : 0.f;
        k[t][d] = live ? in.k[at * kDimK + d] : 0.f;
        v[t][d] = live ? in.v[at * kDimV + d] : 0.f;
      }
      beta[t] = live ? 1.f / (1.f + std::exp(-in.beta[at])) : 0.f;
    }
    // A: gate (log2), offsets x_t = Gamma_t - Gamma_15, sub-block sums; norms.
    float sum0[kDimK], sum1[kDimK];
    for (int d = 0; d < kDimK; ++d) {
      float a2[kChunk];
      for (int t = 0; t < kChunk; ++t) {
        const size_t at = size_t(c * kChunk + t);
        a2[t] = t < valid ? kLog2e * float(gate_log_decay(in.gate, in.g[at * kDimK + d], a_scale,
                                                              in.dt_bias[d], lower_bound))
                          : 0.f;
      }
      float run = 0.f;
      for (int t = kSubBlock - 1; t >= 0; --t) {
        x[t][d] = run;
        run -= a2[t];
      }
      sum0[d] = -run;
      run = 0.f;
      for (int t = kSubBlock; t < kChunk; ++t) {
        run += a2[t];
        x[t][d] = run;
      }
      sum1[d] = run;
    }
    for (int t = 0; t < kChunk; ++t) {
      float sq = 0.f, sk = 0.f;
      for (int d = 0; d < kDimK; ++d) sq += q[t][d] * q[t][d], sk += k[t][d] * k[t][d];
      rq[t] = scale / std::sqrt(sq + kNormEpsilon);
      rk[t] = 1.f / std::sqrt(sk + kNormEpsilon);
    }
    // B: elementwise factors.
    for (int d = 0; d < kDimK; ++d) {
      const float e15 = std::exp2(sum0[d]), e_rest = std::exp2(sum1[d]);
      decay[d] = e15 * e_rest;
      anchor[d] = e15;
      for (int t = 0; t < kChunk; ++t) {
        const float r = std::exp2(x[t][d]), cc = std::exp2(-x[t][d]);
        const float qrf = q[t][d] * r, krf = k[t][d] * r, kcf = k[t][d] * cc;
        qr[t][d] = r16(qrf);
        krh[t][d] = r16(krf);
        kch[t][d] = r16(kcf);
        kcl[t][d] = r16(kcf - kch[t][d]);
        qd[t][d] = h16(qrf * e15 * rq[t]);
        kend[t][d] = h16(kcf * e_rest * rk[t]);
      }
    }
    // C: scores (diagonal blocks with Kc's lo part).
    for (int i = 0; i < kChunk; ++i) {
      for (int j = 0; j < kChunk; ++j) {
        float qk = 0.f, kk = 0.f;
        if (j <= i) {
          const bool diag = i / kSubBlock == j / kSubBlock;
          float qk_lo = 0.f, kk_lo = 0.f;
          for (int d = 0; d < kDimK; ++d) {
            qk += qr[i][d] * kch[j][d];
            kk += krh[i][d] * kch[j][d];
            if (diag) {
              qk_lo += qr[i][d] * kcl[j][d];
              kk_lo += krh[i][d] * kcl[j][d];
            }
          }
          qk += qk_lo;
          kk += kk_lo;
        }
        aqk[i][j] = j <= i ? h16(qk * rq[i] * rk[j]) : 0.f;
        L[i][j] = j < i ? kk * beta[i] * rk[i] * rk[j] : 0.f;
      }
    }
    // D: diagonal inverses by substitution, merged with bf16 products; T beta hi + lo; T diag(beta rk).
    for (int i = 0; i < kChunk; ++i)
      for (int j = 0; j < kChunk; ++j) Tm[i][j] = 0.f;
    for (int b = 0; b < 2; ++b) {
      const int o0 = kSubBlock * b;
      for (int j = 0; j < kSubBlock; ++j)
        for (int i = 0; i < kSubBlock; ++i) {
          float acc = i == j ? 1.f : 0.f;
          for (int m = 0; m < i; ++m) acc -= L[o0 + i][o0 + m] * Tm[o0 + m][o0 + j];
          Tm[o0 + i][o0 + j] = acc;
        }
    }
    float M[kSubBlock][kSubBlock];
    for (int i = 0; i < kSubBlock; ++i)
      for (int j = 0; j < kSubBlock; ++j) {
        float acc = 0.f;
        for (int m = 0; m < kSubBlock; ++m) acc += r16(L[kSubBlock + i][m]) * r16(Tm[m][j]);
        M[i][j] = acc;
      }
    for (int i = 0; i < kSubBlock; ++i)
      for (int j = 0; j < kSubBlock; ++j) {
        float acc = 0.f;
        for (int m = 0; m < kSubBlock; ++m) acc += r16(Tm[kSubBlock + i][kSubBlock + m]) * r16(M[m][j]);
        Tm[kSubBlock + i][j] = -acc;
      }
    for (int i = 0; i < kChunk; ++i)
      for (int j = 0; j < kChunk; ++j) {
        const float tbeta = Tm[i][j] * beta[j];
        tbh[i][j] = r16(tbeta);
        tbl[i][j] = r16(tbeta - tbh[i][j]);
        tb[i][j] = r16(tbeta * rk[j]);
      }
    // E: W'.
    for (int i = 0; i < kChunk; ++i)
      for (int d = 0; d < kDimK; ++d) {
        float acc = 0.f;
        for (int j = 0; j < kChunk; ++j) acc += tb[i][j] * krh[j][d];
        wq[i][d] = h16(-acc * anchor[d]);
      }
    // The state step.
    for (int vv = 0; vv < kDimV; ++vv)
      for (int d = 0; d < kDimK; ++d) sa[vv][d] = h16(S[size_t(vv) * kDimK + d]);
    for (int vv = 0; vv < kDimV; ++vv)
      for (int i = 0; i < kChunk; ++i) {
        float r = 0.f, oq = 0.f;
        for (int d = 0; d < kDimK; ++d) {
          r += sa[vv][d] * wq[i][d];
          oq += sa[vv][d] * qd[i][d];
        }
        float rv = 0.f;
        for (int j = 0; j < kChunk; ++j) rv += v[j][vv] * tbh[i][j] + v[j][vv] * tbl[i][j];
        rr[vv][i] = h16(r + rv);
        oo[vv][i] = oq;
      }
    for (int vv = 0; vv < kDimV; ++vv) {
      for (int d = 0; d < kDimK; ++d) {
        float acc = S[size_t(vv) * kDimK + d] * decay[d];
        for (int j = 0; j < kChunk; ++j) acc += rr[vv][j] * kend[j][d];
        S[size_t(vv) * kDimK + d] = acc;
      }
      for (int i = 0; i < valid; ++i) {
        float acc = oo[vv][i];
        for (int j = 0; j < kChunk; ++j) acc += rr[vv][j] * aqk[i][j];
        o[size_t(c * kChunk + i) * kDimV + vv] = r16(acc);
      }
    }
  }
  st_out.assign(S.begin(), S.end());
}

// The inputs of chain (b, h) of a device problem, copied back.
ChainInputs fetch_chain(const DeviceProblem &d, int b, int h) {
  const Shape &s = d.shape;
  ChainInputs in;
  in.tokens = d.length(b);
  in.gate = s.gate;
  const size_t T = size_t(in.tokens), row0 = d.first_row(b);
  auto rows = [&](const uint16_t *src, std::vector<float> &dst, int heads, int head) {
    std::vector<uint16_t> tmp(T * kDimK);
    if (T > 0)
      KN_CHECK(cudaMemcpy2D(tmp.data(), kDimK * 2, src + (row0 * heads + head) * kDimK,
                            size_t(heads) * kDimK * 2, kDimK * 2, T, cudaMemcpyDeviceToHost));
    dst.resize(tmp.size());
    for (size_t i = 0; i < tmp.size(); ++i) dst[i] = bf16_value(tmp[i]);
  };
  rows(d.q, in.q, s.qk_heads(), h / s.group);
  rows(d.k, in.k, s.qk_heads(), h / s.group);
  rows(d.v, in.v, s.heads, h);
  rows(d.g, in.g, s.heads, h);
  std::vector<uint16_t> bt(T);
  if (T > 0)
    KN_CHECK(cudaMemcpy2D(bt.data(), 2, d.beta + row0 * s.heads + h, size_t(s.heads) * 2, 2, T,
                          cudaMemcpyDeviceToHost));
  in.beta.resize(T);
  for (size_t t = 0; t < T; ++t) in.beta[t] = bf16_value(bt[t]);
  KN_CHECK(cudaMemcpy(&in.a_log, d.a_log + h, 4, cudaMemcpyDeviceToHost));
  in.dt_bias.resize(kDimK);
  KN_CHECK(cudaMemcpy(in.dt_bias.data(), d.dt_bias + size_t(h) * kDimK, kDimK * 4, cudaMemcpyDeviceToHost));
  in.s0.resize(size_t(kDimV) * kDimK);
  KN_CHECK(cudaMemcpy(in.s0.data(), d.initial_state + (size_t(b) * s.heads + h) * kDimV * kDimK,
                      in.s0.size() * 4, cudaMemcpyDeviceToHost));
  return in;
}

struct ChainErrors {
  ErrorStats o_ref, s_ref, o_emu, s_emu, emu_o_ref, emu_s_ref;
};

// Checks chain (b, h) of the last launch: device o and final state against float64 and the emulation.
void check_chain(const DeviceProblem &d, int b, int h, ChainErrors &e) {
  const Shape &s = d.shape;
  const ChainInputs in = fetch_chain(d, b, h);
  std::vector<double> o_ref, s_ref, o_emu, s_emu;
  const float scale = 1.f / std::sqrt(float(kDimK));
  reference_chain(in, kLowerBound, scale, o_ref, s_ref);
  emulate_chain(in, kLowerBound, scale, o_emu, s_emu);
  const size_t T = size_t(in.tokens);
  std::vector<uint16_t> o_dev(T * kDimV);
  if (T > 0)
    KN_CHECK(cudaMemcpy2D(o_dev.data(), kDimV * 2, d.o + (d.first_row(b) * s.heads + h) * kDimV,
                          size_t(s.heads) * kDimV * 2, kDimV * 2, T, cudaMemcpyDeviceToHost));
  std::vector<float> s_dev(size_t(kDimV) * kDimK);
  KN_CHECK(cudaMemcpy(s_dev.data(), d.final_state + (size_t(b) * s.heads + h) * kDimV * kDimK, s_dev.size() * 4,
                      cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < o_dev.size(); ++i) {
    const double x = bf16_value(o_dev[i]);
    e.o_ref.add(x, o_ref[i]);
    e.o_emu.add(x, o_emu[i]);
    e.emu_o_ref.add(o_emu[i], o_ref[i]);
  }
  for (size_t i = 0; i < s_dev.size(); ++i) {
    e.s_ref.add(s_dev[i], s_ref[i]);
    e.s_emu.add(s_dev[i], s_emu[i]);
    e.emu_s_ref.add(s_emu[i], s_ref[i]);
  }
}

// Every o element and every final-state element written (no NaN poison left) and finite.
long long unwritten_or_nonfinite(const DeviceProblem &d) {
  std::vector<uint16_t> o(d.token_elems());
  KN_CHECK(cudaMemcpy(o.data(), d.o, o.size() * 2, cudaMemcpyDeviceToHost));
  long long bad = 0;
  for (uint16_t x : o) bad += (x & 0x7F80u) == 0x7F80u;  // poison (0xFFFF) or any Inf/NaN
  std::vector<float> st(d.state_elems());
  KN_CHECK(cudaMemcpy(st.data(), d.final_state, st.size() * 4, cudaMemcpyDeviceToHost));
  for (float x : st) bad += !std::isfinite(x);
  return bad;
}

void poison_outputs(const DeviceProblem &d) {
  KN_CHECK(cudaMemset(d.o, 0xFF, d.token_elems() * 2));
  KN_CHECK(cudaMemset(d.final_state, 0xFF, d.state_elems() * 4));
}

struct CheckResult {
  double o_ref = INFINITY, s_ref = INFINITY, o_emu = INFINITY, s_emu = INFINITY, emu_o = INFINITY, emu_s = INFINITY;
  double s_rms = 0.0;  // RMS of the float64 final state
  long long bad = 0;
  int chains = 0;
  bool pass = false;
};

// The checks of `chains` (b, h) pairs (all of them when empty) after a launch on poisoned outputs.
CheckResult evaluate(const DeviceProblem &d, std::vector<std::pair<int, int>> chains, double state_floor_rms = 0.0) {
  if (chains.empty())
    for (int b = 0; b < d.sequences(); ++b)
      for (int h = 0; h < d.shape.heads; ++h) chains.push_back({b, h});
  ChainErrors e;
  for (const auto &c : chains) check_chain(d, c.first, c.second, e);
  CheckResult r;
  r.o_ref = e.o_ref.relative_rms();
  r.s_ref = e.s_ref.relative_rms(state_floor_rms);
  r.s_rms = e.s_ref.count > 0 ? std::sqrt(e.s_ref.sum_sq_ref / e.s_ref.count) : 0.0;
  r.o_emu = e.o_emu.relative_rms();
  r.s_emu = e.s_emu.relative_rms();
  r.emu_o = e.emu_o_ref.relative_rms();
  r.emu_s = e.emu_s_ref.relative_rms();
  r.bad = unwritten_or_nonfinite(d);
  r.chains = int(chains.size());
  r.pass = r.bad == 0 && r.o_ref < kPassTolerance && r.s_ref < kPassTolerance;
  return r;
}

// ---- CPU-only checks ------------------------------------------------------------------------------
// Element (n, k) of a K-major B operand / (m, k) of an MN-major A operand as the hardware resolves the
// descriptor (the same decoding as state_chain.cu's host check; common_layout_check.cu checks the
// layout functions against CuTe).
uint32_t k_major_address(uint64_t desc, int n, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const bool sw128 = (desc >> 62) == kDescSwizzle128;
  const uint32_t a = start + uint32_t(n / 8) * sbo + uint32_t(n % 8) * (sw128 ? 128 : 64) + uint32_t(k) * 2;
  return sw128 ? swizzle_128b(a) : swizzle_64b(a);
}
uint32_t mn_major_address(uint64_t desc, int m, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, lbo = uint32_t((desc >> 16) & 0x3FFF) << 4,
                 sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  return swizzle_128b(start + uint32_t(m / 64) * lbo + uint32_t(k / 8) * sbo + uint32_t(k % 8) * 128 +
                      uint32_t(m % 64) * 2);
}

// The stage's writers (offset functions of the factor build, the bulk tensor copy's 128B swizzle for V)
// against its readers (the state step's descriptors), element by element; raw_offset a bijection.
long long host_check_layouts() {
  long long bad = 0;
  std::vector<int> seen(kRawTileBytes / 2, 0);
  for (int r = 0; r < kChunk; ++r)
    for (int ch = 0; ch < kDimK; ++ch) {
      const uint32_t off = raw_offset(r, ch);
      bad += off % 2 != 0 || off >= kRawTileBytes;
      if (off < kRawTileBytes) ++seen[off / 2];
      // The bulk tensor copy of box h = ch / 64 writes row r, byte 2 (ch % 64) at swizzle_128b(128 r + ..).
      bad += off != uint32_t(ch / 64) * kRawHalfBytes + swizzle_128b(uint32_t(r) * 128 + uint32_t(ch % 64) * 2);
    }
  for (int x : seen) bad += x != 1;
  for (int kb = 0; kb < kDimK / 16; ++kb)  // [W' ; Qd] rows 0-63 (N = 64)
    for (int n = 0; n < 64; ++n)
      for (int k = 0; k < 16; ++k)
        bad += kStWq + k_major_address(wq_descriptor(kStWq, kWRow0, kb), n, k) != kStWq + wq_offset(n, 16 * kb + k);
  for (int kb = 0; kb < kChunk / 16; ++kb) {
    for (int n = 0; n < 32; ++n)
      for (int k = 0; k < 16; ++k) {
        bad += k_major_address(k32_descriptor(kStTa, kTbetaRow0, kb), n, k) != kStTa + k32_offset(n, 16 * kb + k);
        bad += k_major_address(k32_descriptor(kStTa, kAqkRow0, kb), n, k) !=
               kStTa + k32_offset(kAqkRow0 + n, 16 * kb + k);
        bad += k_major_address(k32_descriptor(kStTbetaLo, 0, kb), n, k) != kStTbetaLo + k32_offset(n, 16 * kb + k);
      }
    for (int n = 0; n < kDimK; ++n)
      for (int k = 0; k < 16; ++k)
        bad += k_major_address(k32_descriptor(kStKend, 0, kb), n, k) != kStKend + k32_offset(n, 16 * kb + k);
    for (int grp = 0; grp < kStateGroups; ++grp)
      for (int m = 0; m < kGroupRows; ++m)
        for (int k = 0; k < 16; ++k)  // V^T: the copy writes token t, value x of group grp at v_offset(t, x)
          bad += mn_major_address(v_descriptor(kStV, grp, kb), m, k) !=
                 kStV + v_offset(16 * kb + k, grp * kGroupRows + m);
  }
  return bad;
}

// Recipe-like inputs of one chain generated on the host (std normal via Box-Muller on the splitmix
// generator of common_host.h), for the CPU-only check.
ChainInputs host_chain(int tokens, uint64_t seed) {
  Generator gen(seed);
  auto normal = [&]() {
    const double u1 = gen.uniform(1e-12, 1.0), u2 = gen.uniform(0.0, 1.0);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  };
  ChainInputs in;
  in.tokens = tokens;
  auto rows = [&](std::vector<float> &dst, bool normalize) {
    dst.resize(size_t(tokens) * kDimK);
    for (int t = 0; t < tokens; ++t) {
      double ss = 0;
      for (int d = 0; d < kDimK; ++d) {
        dst[t * kDimK + d] = float(round_bf16(normal()));
        ss += double(dst[t * kDimK + d]) * dst[t * kDimK + d];
      }
      if (normalize)
        for (int d = 0; d < kDimK; ++d) dst[t * kDimK + d] = float(round_bf16(dst[t * kDimK + d] / std::sqrt(ss)));
    }
  };
  rows(in.q, true);
  rows(in.k, true);
  rows(in.v, false);
  rows(in.g, false);
  in.beta.resize(tokens);
  for (auto &b : in.beta) b = float(round_bf16(normal()));
  in.a_log = float(gen.uniform(0, 1));
  in.dt_bias.resize(kDimK);
  for (auto &x : in.dt_bias) x = float(gen.uniform(0, 1));
  in.s0.resize(size_t(kDimV) * kDimK);
  for (auto &x : in.s0) x = float(kInitialStateScale * normal());
  return in;
}

// The kernels' algorithm emulated on the CPU against float64: T = tokens, tokens - 6 and 7, two chains
// each (partial chunks included), for each gate (log-decay: g as -0.3 |g|). Returns whether all pass.
bool host_check_emulation(int tokens) {
  bool ok = true;
  const float scale = 1.f / std::sqrt(float(kDimK));
  const char *names[] = {"bounded", "softplus", "log-decay"};
  for (const GateMode gate : {GateMode::kBounded, GateMode::kSoftplus, GateMode::kLogDecay})
  for (int T : {tokens, tokens - 6, 7}) {
    ErrorStats eo, es;
    for (int chain = 0; chain < 2; ++chain) {
      ChainInputs in = host_chain(T, 1000 + 17 * chain + T);
      in.gate = gate;
      if (gate == GateMode::kLogDecay)
        for (auto &g : in.g) g = float(round_bf16(-0.3 * std::fabs(g)));
      std::vector<double> o_ref, s_ref, o_emu, s_emu;
      reference_chain(in, kLowerBound, scale, o_ref, s_ref);
      emulate_chain(in, kLowerBound, scale, o_emu, s_emu);
      for (size_t i = 0; i < o_ref.size(); ++i) eo.add(o_emu[i], o_ref[i]);
      for (size_t i = 0; i < s_ref.size(); ++i) es.add(s_emu[i], s_ref[i]);
    }
    const bool pass = eo.relative_rms() < kPassTolerance && es.relative_rms() < kPassTolerance;
    ok = ok && pass;
    printf("emulated kernel vs float64, %s gate, T = %d (2 chains): o %.2e, final state %.2e  %s\n",
           names[int(gate)], T, eo.relative_rms(), es.relative_rms(), pass ? "PASS" : "FAIL");
  }
  return ok;
}

struct Timing {
  double ms = NAN, spread = NAN;
};
inline Timing timing_of(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  Timing t;
  t.ms = median(ms);
  t.spread = ms.back() - ms.front();
  return t;
}

}  // namespace
}  // namespace chunk32
}  // namespace jax_kda
