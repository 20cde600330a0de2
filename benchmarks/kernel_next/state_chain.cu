// Go/no-go microkernel 1 of issue 10: the serial state chain of the planned chunk-32 KDA kernel.
//
// One CTA per chain (grid = one CTA per SM), 1024 steps of 32 tokens. Two state warpgroups each hold
// 64 rows (values) x 128 columns (key channels) of S^T in wgmma accumulators (64 f32 registers a
// thread) and feed it back as the register A operand (RS wgmma). A loader warp supplies each step's
// factors (a "factor stage", layout.h) by bulk copy into a two-stage ring: either once at the start
// (resident: the chain waits only for the tensor cores) or every step from a pool in global memory
// (streamed). Per step and state warpgroup (S^T: 64 x 128, tokens t, t' in 0..31):
//   two-products form (the design note's):
//     R^T = V^T (T beta)^T + S^T W'^T          m64n32k16: 2 with A = V^T from shared memory, 8 RS
//     S^T <- S^T diag(decay) + R^T Kend         m64n128k16: 2 RS (A = R^T converted to bf16)
//     O^T = S^T Qd^T + R^T Aqk^T                m64n32k16: 8 RS + 2 RS
//   fused-output form (Qd' = Qd + Aqk W', (Aqk T beta) precomputed by the factor build):
//     [R | O]^T = V^T [T beta ; Aqk T beta]^T + S^T [W' ; Qd']^T     m64n64k16: 2 SS + 8 RS
//     S^T <- S^T diag(decay) + R^T Kend                              m64n128k16: 2 RS
// W' = -W is stored negated so every product accumulates. bf16 operands, f32 accumulation.
//
// The accumulator -> A operand conversion is register-local (layout.h, checked against CuTe's
// CLayout_64xN / ALayout_64x16 by common_layout_check.cu): A register r of k-block kb is
// bf16x2(acc[8 kb + 2 r], acc[8 kb + 2 r + 1]).
//
// Checks: outputs and final state are poisoned (NaN) first; CTA 0's outputs of every step and its
// final state are compared with a float64 host evaluation of the same products that rounds S and R to
// bf16 where the kernel does (tolerance 1e-2 relative RMS), and with an unrounded float64 chain
// (reported); every CTA must reproduce CTA 0 bit for bit (all chains run the same factors).
// Timing: cudaEvents around whole launches after warm-up, median of several; cycles per step from
// %clock64 in each CTA.
#include <cstdio>
#include <memory>

#include "ptx.cuh"
#include "common_host.h"

namespace jax_kda {
namespace chunk32 {
namespace {

constexpr int kStages = 2;                                       // factor stages in the ring
constexpr int kStateThreads = kStateGroups * kWarpgroupThreads;  // 256
constexpr int kThreads = kStateThreads + 32;                     // + one loader warp
constexpr int kStateValues = kGroupRows * kDimK / kWarpgroupThreads;  // 64 accumulators a thread
constexpr int kKBlocksState = kDimK / 16;                        // 8 k16 blocks over the key channels
constexpr int kKBlocksChunk = kChunk / 16;                       // 2 k16 blocks over the tokens
constexpr int kOutputValues = kGroupRows * kChunk / kWarpgroupThreads;  // 16 (O^T: 64 x 32)
constexpr uint32_t kBarrierBytes = 2 * kStages * sizeof(uint64_t);
constexpr uint32_t kSharedBytes = kStages * kStageBytes + kBarrierBytes + kSwizzleAlign;  // + alignment slack
constexpr uint32_t kOneCtaPerSmBytes = 116 * 1024;  // over half of an SM's 228 KB: at most one CTA per SM

struct ChainParams {
  const uint8_t *pool;          // factor stages [pool_sets][kStageBytes]
  int pool_sets;                // streamed: step c uses set c % pool_sets; resident: set c % kStages
  int steps;
  int store_outputs;            // write O of every step (fragment order, bf16)
  const float *initial_state;   // [group][thread][64] fragment order (the same for every CTA)
  float *final_state;           // [cta][group][thread][64]
  uint16_t *outputs;            // [cta][step][group][thread][16] bf16
  long long *cycles;            // [cta]: %clock64 cycles of the step loop
};

// ---- state warpgroup roles --------------------------------------------------------------------

// S^T -> bf16 A fragments of the 8 k-blocks (register-local, see the header comment).
__device__ __forceinline__ void state_to_operand(const float (&s)[kStateValues], uint32_t (&sa)[kKBlocksState][4]) {
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb)
#pragma unroll
    for (int r = 0; r < 4; ++r) sa[kb][r] = pack_bf16(s[8 * kb + 2 * r], s[8 * kb + 2 * r + 1]);
}

// R^T (accumulator values 0..15 of a 64 x 32 or the first half of a 64 x 64 tile) -> 2 A fragments.
template <int N>
__device__ __forceinline__ void residual_to_operand(const float (&r)[N], uint32_t (&ra)[kKBlocksChunk][4]) {
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb)
#pragma unroll
    for (int j = 0; j < 4; ++j) ra[kb][j] = pack_bf16(r[8 * kb + 2 * j], r[8 * kb + 2 * j + 1]);
}

// S^T <- S^T diag(decay): value i sits in column 8 (i / 4) + 2 (thread % 4) + (i % 2).
__device__ __forceinline__ void decay_state(float (&s)[kStateValues], const float *decay, int thread) {
  const int c0 = 2 * (thread % 4);
#pragma unroll
  for (int j = 0; j < kStateValues / 4; ++j) {
    const float2 dd = *reinterpret_cast<const float2 *>(decay + 8 * j + c0);
    s[4 * j + 0] *= dd.x;
    s[4 * j + 1] *= dd.y;
    s[4 * j + 2] *= dd.x;
    s[4 * j + 3] *= dd.y;
  }
}

__device__ __forceinline__ void load_state(const float *src, int group, int thread, float (&s)[kStateValues]) {
  const float4 *p = reinterpret_cast<const float4 *>(src + (size_t(group) * kWarpgroupThreads + thread) * kStateValues);
#pragma unroll
  for (int i = 0; i < kStateValues / 4; ++i) {
    const float4 x = p[i];
    s[4 * i] = x.x, s[4 * i + 1] = x.y, s[4 * i + 2] = x.z, s[4 * i + 3] = x.w;
  }
}

__device__ __forceinline__ void store_state(float *dst, int group, int thread, const float (&s)[kStateValues]) {
  float4 *p = reinterpret_cast<float4 *>(
      dst + ((size_t(blockIdx.x) * kStateGroups + group) * kWarpgroupThreads + thread) * kStateValues);
#pragma unroll
  for (int i = 0; i < kStateValues / 4; ++i) p[i] = make_float4(s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
}

// O^T values (16 floats from `first`) of step c -> outputs, bf16, fragment order (two 16-byte stores).
template <int N>
__device__ __forceinline__ void store_outputs(const ChainParams &p, int c, int group, int thread,
                                              const float (&acc)[N], int first) {
  uint32_t packed[kOutputValues / 2];
#pragma unroll
  for (int i = 0; i < kOutputValues / 2; ++i) packed[i] = pack_bf16(acc[first + 2 * i], acc[first + 2 * i + 1]);
  uint4 *dst = reinterpret_cast<uint4 *>(
      p.outputs +
      (((size_t(blockIdx.x) * p.steps + c) * kStateGroups + group) * kWarpgroupThreads + thread) * kOutputValues);
  dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// One step, the design note's four products. `stage` is the shared address of the step's factor stage.
__device__ __forceinline__ void step_two_products(const ChainParams &p, int c, uint32_t stage, const float *decay,
                                                  int group, int thread, float (&s)[kStateValues]) {
  uint32_t sa[kKBlocksState][4], ra[kKBlocksChunk][4];
  float r[kOutputValues], o[kOutputValues];
  state_to_operand(s, sa);
  // S^T diag(decay) now, before any wgmma is in flight: ptxas injects a wait (C7517) when ordinary
  // instructions touch registers a wgmma wrote while another wgmma is in flight, so overlapping these
  // multiplies with the R group is not possible; here the other state warpgroup fills the tensor cores.
  decay_state(s, decay, thread);
  wgmma_fence();
  // R^T = V^T (T beta)^T + S^T W'^T
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb)
    wgmma_m64n32k16_ss_a_mn_major(r, v_descriptor(stage + kStageV, group, kb),
                                  k32_descriptor(stage + kStageTa, kTbetaRow0, kb), kb > 0);
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb)
    wgmma_m64n32k16_rs(r, sa[kb], wq_descriptor(stage + kStageWq, kWRow0, kb), 1);
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(r);
  residual_to_operand(r, ra);
  wgmma_fence();
  // S^T += R^T Kend (first: it is the chain), then O^T = S_old^T Qd^T + R^T Aqk^T
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb) wgmma_m64n128k16_rs(s, ra[kb], k32_descriptor(stage + kStageKend, 0, kb), 1);
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb)
    wgmma_m64n32k16_rs(o, sa[kb], wq_descriptor(stage + kStageWq, kQdRow0, kb), kb > 0);
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb) wgmma_m64n32k16_rs(o, ra[kb], k32_descriptor(stage + kStageTa, kAqkRow0, kb), 1);
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(s);
  pin_registers(o);
  if (p.store_outputs) store_outputs(p, c, group, thread, o, 0);
}

// One step, fused-output form: R and O from one N = 64 accumulator (values 0..15: R, 16..31: O).
__device__ __forceinline__ void step_fused_output(const ChainParams &p, int c, uint32_t stage, const float *decay,
                                                  int group, int thread, float (&s)[kStateValues]) {
  uint32_t sa[kKBlocksState][4], ra[kKBlocksChunk][4];
  float ro[2 * kOutputValues];
  state_to_operand(s, sa);
  decay_state(s, decay, thread);
  wgmma_fence();
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb)
    wgmma_m64n64k16_ss_a_mn_major(ro, v_descriptor(stage + kStageV, group, kb),
                                  k32_descriptor(stage + kStageTa, kTbetaRow0, kb), kb > 0);
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb)
    wgmma_m64n64k16_rs(ro, sa[kb], wq_descriptor(stage + kStageWq, kWRow0, kb), 1);
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(ro);
  residual_to_operand(ro, ra);
  wgmma_fence();
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb) wgmma_m64n128k16_rs(s, ra[kb], k32_descriptor(stage + kStageKend, 0, kb), 1);
  wgmma_commit();
  if (p.store_outputs) store_outputs(p, c, group, thread, ro, kOutputValues);  // overlaps the state update
  wgmma_wait<0>();
  pin_registers(s);
}

template <bool kFusedOutput>
__device__ void run_state_group(const ChainParams &p, uint8_t *smem, uint64_t *full, uint64_t *empty, int group) {
  const int thread = threadIdx.x % kWarpgroupThreads;
  float s[kStateValues];
  load_state(p.initial_state, group, thread, s);
  const uint32_t stages = smem_address(smem);
  const long long start = clock_cycles();
  for (int c = 0; c < p.steps; ++c) {
    const int st = c % kStages;
    const float *decay = reinterpret_cast<const float *>(smem + st * kStageBytes + kStageDecay);
    mbarrier_wait(&full[st], (c / kStages) & 1);
    if (kFusedOutput) {
      step_fused_output(p, c, stages + st * kStageBytes, decay, group, thread, s);
    } else {
      step_two_products(p, c, stages + st * kStageBytes, decay, group, thread, s);
    }
    mbarrier_arrive(&empty[st]);  // every wgmma reading the stage has completed (wait_group 0)
  }
  const long long stop = clock_cycles();
  if (threadIdx.x == 0) p.cycles[blockIdx.x] = stop - start;
  store_state(p.final_state, group, thread, s);
}

// ---- loader role -------------------------------------------------------------------------------
template <bool kStreamed>
__device__ void load_factor_stages(const ChainParams &p, uint8_t *smem, uint64_t *full, uint64_t *empty) {
  for (int c = 0; c < p.steps; ++c) {
    const int st = c % kStages;
    if (c >= kStages) mbarrier_wait(&empty[st], (c / kStages - 1) & 1);
    if (kStreamed || c < kStages) {
      const int set = kStreamed ? c % p.pool_sets : c;
      mbarrier_arrive_expect_bytes(&full[st], kStageBytes);
      bulk_copy_to_shared(smem + st * kStageBytes, p.pool + size_t(set) * kStageBytes, kStageBytes, &full[st]);
    } else {
      mbarrier_arrive(&full[st]);  // resident factors: the stage already holds set c % kStages
    }
  }
}

template <bool kFusedOutput, bool kStreamed>
__global__ void __launch_bounds__(kThreads, 1) state_chain_kernel(const __grid_constant__ ChainParams p) {
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte aligned by pointer arithmetic on the shared array (keeps loads in the shared state space).
  uint8_t *smem = smem_raw + ((kSwizzleAlign - (smem_address(smem_raw) & (kSwizzleAlign - 1))) & (kSwizzleAlign - 1));
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + kStages * kStageBytes);
  uint64_t *empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&full[i], 1);
      mbarrier_init(&empty[i], kStateThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();
  // The role as a value the compiler knows to be warp-uniform (a broadcast): with a plain threadIdx
  // test, ptxas treats the wgmma code as divergent and serializes it (warning C7518).
  const int warpgroup = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / kWarpgroupThreads, 0);
  if (warpgroup == kStateGroups) {
    if (threadIdx.x == kStateThreads) load_factor_stages<kStreamed>(p, smem, full, empty);
    return;
  }
  run_state_group<kFusedOutput>(p, smem, full, empty, warpgroup);
}

// ---- host: factors, reference, runs ----------------------------------------------------------------

struct StageValues {  // one factor stage as the kernel reads it (bf16 values, decay fp32), as doubles
  double wq[kWqRows][kDimK];   // rows 0-31: W' = -W; rows 32-63: Qd (fused: Qd')
  double ta[kTaRows][kChunk];  // rows 0-31: T beta; rows 32-63: Aqk (fused: Aqk T beta)
  double kend[kChunk][kDimK];  // Kend (the tile stores its transpose)
  double decay[kDimK];
  double v[kChunk][kDimV];
};

// `fused`: rows 32-63 hold Qd' = Qd + Aqk W' and Aqk T beta instead of Qd and Aqk.
void make_stage(const ChunkFactors &f, const float (&v)[kChunk][kDimV], bool fused, StageValues &s) {
  for (int t = 0; t < kChunk; ++t) {
    for (int d = 0; d < kDimK; ++d) {
      s.wq[kWRow0 + t][d] = round_bf16(-f.w[t][d]);
      double qd = f.qd[t][d];
      if (fused)
        for (int m = 0; m < kChunk; ++m) qd -= f.aqk[t][m] * f.w[m][d];
      s.wq[kQdRow0 + t][d] = round_bf16(qd);
      s.kend[t][d] = round_bf16(f.kend[t][d]);
    }
    for (int j = 0; j < kChunk; ++j) {
      s.ta[kTbetaRow0 + t][j] = round_bf16(f.tbeta[t][j]);
      double a = f.aqk[t][j];
      if (fused) {
        a = 0.0;
        for (int m = 0; m < kChunk; ++m) a += f.aqk[t][m] * f.tbeta[m][j];
      }
      s.ta[kAqkRow0 + t][j] = round_bf16(a);
    }
    for (int x = 0; x < kDimV; ++x) s.v[t][x] = v[t][x];
  }
  for (int d = 0; d < kDimK; ++d) s.decay[d] = double(float(f.decay[d]));
}

void encode_stage(const StageValues &s, uint8_t *image) {
  memset(image, 0, kStageBytes);
  auto put = [&](uint32_t offset, double x) {
    const uint16_t b = bf16_bits(float(x));
    memcpy(image + offset, &b, 2);
  };
  for (int r = 0; r < kWqRows; ++r)
    for (int d = 0; d < kDimK; ++d) put(kStageWq + wq_offset(r, d), s.wq[r][d]);
  for (int r = 0; r < kTaRows; ++r)
    for (int j = 0; j < kChunk; ++j) put(kStageTa + k32_offset(r, j), s.ta[r][j]);
  for (int t = 0; t < kChunk; ++t)
    for (int d = 0; d < kDimK; ++d) put(kStageKend + k32_offset(d, t), s.kend[t][d]);
  for (int d = 0; d < kDimK; ++d) {
    const float x = float(s.decay[d]);
    memcpy(image + kStageDecay + 4 * d, &x, 4);
  }
  for (int t = 0; t < kChunk; ++t)
    for (int x = 0; x < kDimV; ++x) put(kStageV + v_offset(t, x), s.v[t][x]);
}

struct Problem {
  int pool_sets = 0;
  std::vector<ChunkFactors> factors;             // exact factors of each set
  std::vector<std::vector<float>> values;        // V of each set [32 * 128]
  std::vector<StageValues> two_products, fused;  // as stored
  std::vector<uint8_t> image_two_products, image_fused;
  std::vector<double> initial_state;             // S^T [128 v][128 d]
};

void build_problem(Problem &pb, int pool_sets) {
  pb.pool_sets = pool_sets;
  pb.factors.resize(pool_sets);
  pb.values.assign(pool_sets, std::vector<float>(kChunk * kDimV));
  pb.two_products.resize(pool_sets);
  pb.fused.resize(pool_sets);
  pb.image_two_products.resize(size_t(pool_sets) * kStageBytes);
  pb.image_fused.resize(size_t(pool_sets) * kStageBytes);
  Generator gen(20261201);
  GateParams gp;
  for (int d = 0; d < kDimK; ++d) gp.dt_bias[d] = gen.uniform(-6.0, -1.0);  // per-chunk decays e^-0.1 .. e^-60
  auto in = std::make_unique<ChunkInputs>();
  for (int s = 0; s < pool_sets; ++s) {
    for (int t = 0; t < kChunk; ++t) {
      for (int d = 0; d < kDimK; ++d) {
        in->q[t][d] = gen.uniform_bf16(-1, 1);
        in->k[t][d] = gen.uniform_bf16(-1, 1);
        in->g[t][d] = gen.uniform_bf16(-2, 2);
      }
      in->beta[t] = gen.uniform_bf16(-2, 2);
    }
    reference_factors(*in, gp, pb.factors[s]);
    float v[kChunk][kDimV];
    for (int t = 0; t < kChunk; ++t)
      for (int x = 0; x < kDimV; ++x) v[t][x] = pb.values[s][t * kDimV + x] = gen.uniform_bf16(-1, 1);
    make_stage(pb.factors[s], v, false, pb.two_products[s]);
    make_stage(pb.factors[s], v, true, pb.fused[s]);
    encode_stage(pb.two_products[s], pb.image_two_products.data() + size_t(s) * kStageBytes);
    encode_stage(pb.fused[s], pb.image_fused.data() + size_t(s) * kStageBytes);
  }
  pb.initial_state.resize(kDimV * kDimK);
  for (auto &x : pb.initial_state) x = double(float(gen.uniform(-0.5, 0.5)));
}

std::vector<float> state_fragment_order(const std::vector<double> &st) {
  std::vector<float> out(size_t(kStateGroups) * kWarpgroupThreads * kStateValues);
  for (int g = 0; g < kStateGroups; ++g)
    for (int t = 0; t < kWarpgroupThreads; ++t)
      for (int i = 0; i < kStateValues; ++i)
        out[(size_t(g) * kWarpgroupThreads + t) * kStateValues + i] =
            float(st[(g * kGroupRows + acc_row(t, i)) * kDimK + acc_col(t, i)]);
  return out;
}

// The chain in float64 for `steps` steps. `mirror`: the kernel's products and rounding points (S and R
// rounded to bf16 as A operands, the stored bf16 factors, fused or not); otherwise the exact chunked
// recurrence on the exact factors. outputs: [steps][128 v][32 t] (O^T); state: S^T at the end.
void reference_chain(const Problem &pb, bool fused, bool mirror, bool resident, int steps, std::vector<double> &outputs,
                     std::vector<double> &state) {
  state = pb.initial_state;
  outputs.assign(size_t(steps) * kDimV * kChunk, 0.0);
  std::vector<double> sa(kDimV * kDimK), r(kDimV * kChunk), ra(kDimV * kChunk);
  for (int c = 0; c < steps; ++c) {
    const int set = resident ? c % kStages : c % pb.pool_sets;
    const StageValues &st = fused ? pb.fused[set] : pb.two_products[set];
    const ChunkFactors &f = pb.factors[set];
    const std::vector<float> &vv = pb.values[set];
    for (int i = 0; i < kDimV * kDimK; ++i) sa[i] = mirror ? round_bf16(state[i]) : state[i];
    for (int x = 0; x < kDimV; ++x) {
      for (int t = 0; t < kChunk; ++t) {
        double acc = 0.0;
        for (int u = 0; u < kChunk; ++u) acc += double(vv[u * kDimV + x]) * (mirror ? st.ta[kTbetaRow0 + t][u] : f.tbeta[t][u]);
        for (int d = 0; d < kDimK; ++d) acc += sa[x * kDimK + d] * (mirror ? st.wq[kWRow0 + t][d] : -f.w[t][d]);
        r[x * kChunk + t] = acc;
        ra[x * kChunk + t] = mirror ? round_bf16(acc) : acc;
      }
    }
    double *o = outputs.data() + size_t(c) * kDimV * kChunk;
    for (int x = 0; x < kDimV; ++x) {
      for (int t = 0; t < kChunk; ++t) {
        double acc = 0.0;
        for (int d = 0; d < kDimK; ++d) acc += sa[x * kDimK + d] * (mirror ? st.wq[kQdRow0 + t][d] : f.qd[t][d]);
        if (mirror && fused) {
          for (int u = 0; u < kChunk; ++u) acc += double(vv[u * kDimV + x]) * st.ta[kAqkRow0 + t][u];
        } else {
          for (int u = 0; u < kChunk; ++u) acc += ra[x * kChunk + u] * (mirror ? st.ta[kAqkRow0 + t][u] : f.aqk[t][u]);
        }
        o[x * kChunk + t] = acc;
      }
    }
    for (int x = 0; x < kDimV; ++x) {
      for (int d = 0; d < kDimK; ++d) {
        double acc = state[x * kDimK + d] * (mirror ? st.decay[d] : f.decay[d]);
        for (int t = 0; t < kChunk; ++t) acc += ra[x * kChunk + t] * (mirror ? st.kend[t][d] : f.kend[t][d]);
        state[x * kDimK + d] = acc;
      }
    }
  }
}

// ---- CPU self-check: what the kernel's descriptors read from the encoded stage ---------------------
// Reads element (n, k) of a K-major B operand, or (m, k) of an MN-major A operand, the way the
// hardware resolves a descriptor (canonical layouts of the PTX ISA / CuTe's make_gmma_desc comment):
// address before swizzling = start + (row / 8) SBO + (row % 8) row_bytes + k-offset, then the swizzle
// XORs address bits 4-6 (128B) or 4-5 (64B) with bits 7-9 / 7-8 (tile bases are 1024-aligned, so the
// image offset stands in for the address).
double read_k_major(const uint8_t *image, uint64_t desc, int n, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const bool sw128 = (desc >> 62) == kDescSwizzle128;
  const uint32_t row_bytes = sw128 ? 128 : 64;
  uint32_t a = start + uint32_t(n / 8) * sbo + uint32_t(n % 8) * row_bytes + uint32_t(k) * 2;
  a = sw128 ? swizzle_128b(a) : swizzle_64b(a);
  uint16_t b;
  memcpy(&b, image + a, 2);
  return bf16_value(b);
}
double read_mn_major(const uint8_t *image, uint64_t desc, int m, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, lbo = uint32_t((desc >> 16) & 0x3FFF) << 4,
                 sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  uint32_t a = start + uint32_t(m / 64) * lbo + uint32_t(k / 8) * sbo + uint32_t(k % 8) * 128 + uint32_t(m % 64) * 2;
  uint16_t b;
  memcpy(&b, image + swizzle_128b(a), 2);
  return bf16_value(b);
}

// Every operand of both step forms, decoded through the descriptors the kernel builds, must equal the
// stage values the host reference uses. Returns the number of mismatches.
long long host_check_operands(const Problem &pb) {
  long long bad = 0;
  auto expect = [&](double got, double want) { bad += got != want; };
  for (int set = 0; set < pb.pool_sets; ++set) {
    for (int fused = 0; fused < 2; ++fused) {
      const StageValues &st = fused ? pb.fused[set] : pb.two_products[set];
      const uint8_t *img = (fused ? pb.image_fused.data() : pb.image_two_products.data()) + size_t(set) * kStageBytes;
      for (int kb = 0; kb < kDimK / 16; ++kb)  // B = [W' ; Qd] (N = 64 covers both N = 32 halves)
        for (int n = 0; n < 64; ++n)
          for (int k = 0; k < 16; ++k) {
            expect(read_k_major(img, wq_descriptor(kStageWq, 0, kb), n, k), st.wq[n][16 * kb + k]);
            if (n < 32) expect(read_k_major(img, wq_descriptor(kStageWq, kQdRow0, kb), n, k), st.wq[32 + n][16 * kb + k]);
          }
      for (int kb = 0; kb < kChunk / 16; ++kb) {
        for (int n = 0; n < 64; ++n)
          for (int k = 0; k < 16; ++k) {
            expect(read_k_major(img, k32_descriptor(kStageTa, 0, kb), n, k), st.ta[n][16 * kb + k]);
            if (n < 32) expect(read_k_major(img, k32_descriptor(kStageTa, kAqkRow0, kb), n, k), st.ta[32 + n][16 * kb + k]);
          }
        for (int n = 0; n < kDimK; ++n)  // B = Kend: B[k = token][n = channel]
          for (int k = 0; k < 16; ++k)
            expect(read_k_major(img, k32_descriptor(kStageKend, 0, kb), n, k), st.kend[16 * kb + k][n]);
        for (int g = 0; g < kStateGroups; ++g)  // A = V^T: A[m = value][k = token]
          for (int m = 0; m < kGroupRows; ++m)
            for (int k = 0; k < 16; ++k)
              expect(read_mn_major(img, v_descriptor(kStageV, g, kb), m, k), st.v[16 * kb + k][g * kGroupRows + m]);
      }
      for (int d = 0; d < kDimK; ++d) {
        float x;
        memcpy(&x, img + kStageDecay + 4 * d, 4);
        expect(x, st.decay[d]);
      }
    }
  }
  return bad;
}

struct DeviceBuffers {
  uint8_t *pool_two_products = nullptr, *pool_fused = nullptr;
  float *initial_state = nullptr, *final_state = nullptr;
  uint16_t *outputs = nullptr;
  long long *cycles = nullptr;
};

using KernelFn = void (*)(ChainParams);

struct Variant {
  const char *name;
  bool fused, streamed;
  KernelFn kernel;
};

ChainParams make_params(const DeviceBuffers &b, const Problem &pb, const Variant &v, int steps, bool store) {
  ChainParams p;
  p.pool = v.fused ? b.pool_fused : b.pool_two_products;
  p.pool_sets = pb.pool_sets;
  p.steps = steps;
  p.store_outputs = store ? 1 : 0;
  p.initial_state = b.initial_state;
  p.final_state = b.final_state;
  p.outputs = b.outputs;
  p.cycles = b.cycles;
  return p;
}

void launch(const Variant &v, const ChainParams &p, int ctas) {
  const uint32_t shared = std::max(kSharedBytes, kOneCtaPerSmBytes);
  v.kernel<<<ctas, kThreads, shared>>>(p);
  KN_CHECK(cudaGetLastError());
}

struct CheckResult {
  double o_mirror = INFINITY, s_mirror = INFINITY, o_exact = INFINITY, s_exact = INFINITY;
  long long unwritten = 0, cta_mismatches = 0;
  bool pass = false;
};

CheckResult check_variant(const Variant &v, const DeviceBuffers &b, const Problem &pb, int ctas, int steps) {
  CheckResult res;
  const size_t out_elems = size_t(ctas) * steps * kStateGroups * kWarpgroupThreads * kOutputValues;
  const size_t state_elems = size_t(ctas) * kStateGroups * kWarpgroupThreads * kStateValues;
  KN_CHECK(cudaMemset(b.outputs, 0xFF, out_elems * sizeof(uint16_t)));
  KN_CHECK(cudaMemset(b.final_state, 0xFF, state_elems * sizeof(float)));
  launch(v, make_params(b, pb, v, steps, true), ctas);
  KN_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(out_elems);
  std::vector<float> fin(state_elems);
  KN_CHECK(cudaMemcpy(out.data(), b.outputs, out_elems * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  KN_CHECK(cudaMemcpy(fin.data(), b.final_state, state_elems * sizeof(float), cudaMemcpyDeviceToHost));
  const size_t per_cta_out = out_elems / ctas, per_cta_state = state_elems / ctas;
  for (int cta = 1; cta < ctas; ++cta) {
    if (memcmp(out.data(), out.data() + cta * per_cta_out, per_cta_out * 2) != 0 ||
        memcmp(fin.data(), fin.data() + cta * per_cta_state, per_cta_state * 4) != 0)
      ++res.cta_mismatches;
  }
  std::vector<double> o_ref, s_ref, o_exact, s_exact;
  reference_chain(pb, v.fused, true, !v.streamed, steps, o_ref, s_ref);
  reference_chain(pb, v.fused, false, !v.streamed, steps, o_exact, s_exact);
  ErrorStats om, oe, sm, se;
  for (int c = 0; c < steps; ++c)
    for (int g = 0; g < kStateGroups; ++g)
      for (int t = 0; t < kWarpgroupThreads; ++t)
        for (int i = 0; i < kOutputValues; ++i) {
          const uint16_t bits = out[((size_t(c) * kStateGroups + g) * kWarpgroupThreads + t) * kOutputValues + i];
          if (bits == kBf16Poison) ++res.unwritten;
          const size_t at = (size_t(c) * kDimV + g * kGroupRows + acc_row(t, i)) * kChunk + acc_col(t, i);
          om.add(bf16_value(bits), o_ref[at]);
          oe.add(bf16_value(bits), o_exact[at]);
        }
  for (int g = 0; g < kStateGroups; ++g)
    for (int t = 0; t < kWarpgroupThreads; ++t)
      for (int i = 0; i < kStateValues; ++i) {
        const float x = fin[(size_t(g) * kWarpgroupThreads + t) * kStateValues + i];
        const size_t at = size_t(g * kGroupRows + acc_row(t, i)) * kDimK + acc_col(t, i);
        sm.add(x, s_ref[at]);
        se.add(x, s_exact[at]);
      }
  res.o_mirror = om.relative_rms();
  res.s_mirror = sm.relative_rms();
  res.o_exact = oe.relative_rms();
  res.s_exact = se.relative_rms();
  constexpr double kTolerance = 1e-2;
  res.pass = res.unwritten == 0 && res.cta_mismatches == 0 && res.o_mirror < kTolerance && res.s_mirror < kTolerance;
  return res;
}

}  // namespace
}  // namespace chunk32
}  // namespace jax_kda

int main(int argc, char **argv) {
  using namespace jax_kda::chunk32;
  if (int_option(argc, argv, "--host-check", 0)) {  // CPU only: operands as the descriptors read them, reference
    Problem pb;
    build_problem(pb, int_option(argc, argv, "--pool", 8));
    const long long bad = host_check_operands(pb);
    const int steps = int_option(argc, argv, "--check-steps", 64);
    std::vector<double> o_m, s_m, o_x, s_x;
    for (int fused = 0; fused < 2; ++fused) {
      reference_chain(pb, fused, true, false, steps, o_m, s_m);
      reference_chain(pb, fused, false, false, steps, o_x, s_x);
      ErrorStats eo, es;
      for (size_t i = 0; i < o_m.size(); ++i) eo.add(o_m[i], o_x[i]);
      for (size_t i = 0; i < s_m.size(); ++i) es.add(s_m[i], s_x[i]);
      double s_rms = 0;
      for (double x : s_m) s_rms += x * x;
      printf("host reference (%s, %d steps): bf16-rounded vs exact chain: O %.2e, S %.2e; RMS(S) %.3f\n",
             fused ? "fused-output" : "two-products", steps, eo.relative_rms(), es.relative_rms(),
             std::sqrt(s_rms / s_m.size()));
    }
    printf("host check: %lld operand mismatches: %s\n", bad, bad == 0 ? "PASS" : "FAIL");
    return bad == 0 ? 0 : 1;
  }
  const DeviceInfo info = device_info();
  const int steps = int_option(argc, argv, "--steps", 1024);
  const int check_steps = int_option(argc, argv, "--check-steps", 256);
  const int pool_sets = int_option(argc, argv, "--pool", 64);
  const int ctas = int_option(argc, argv, "--ctas", info.multiprocessors);
  const int reps = int_option(argc, argv, "--reps", 10);
  const int warmup = int_option(argc, argv, "--warmup", 3);
  const int only_check = int_option(argc, argv, "--only-check", 0);
  printf("state_chain: %s, %d SMs, max SM clock %.0f MHz; %d CTAs x %d steps (check: %d steps), pool %d sets\n",
         info.name.c_str(), info.multiprocessors, info.clock_khz / 1e3, ctas, steps, check_steps, pool_sets);

  Problem pb;
  build_problem(pb, std::max(pool_sets, kStages));
  DeviceBuffers b;
  const size_t pool_bytes = size_t(pb.pool_sets) * kStageBytes;
  const int max_steps = std::max(steps, check_steps);
  KN_CHECK(cudaMalloc(&b.pool_two_products, pool_bytes));
  KN_CHECK(cudaMalloc(&b.pool_fused, pool_bytes));
  KN_CHECK(cudaMemcpy(b.pool_two_products, pb.image_two_products.data(), pool_bytes, cudaMemcpyHostToDevice));
  KN_CHECK(cudaMemcpy(b.pool_fused, pb.image_fused.data(), pool_bytes, cudaMemcpyHostToDevice));
  const std::vector<float> init = state_fragment_order(pb.initial_state);
  KN_CHECK(cudaMalloc(&b.initial_state, init.size() * sizeof(float)));
  KN_CHECK(cudaMemcpy(b.initial_state, init.data(), init.size() * sizeof(float), cudaMemcpyHostToDevice));
  KN_CHECK(cudaMalloc(&b.final_state, size_t(ctas) * init.size() * sizeof(float)));
  KN_CHECK(cudaMalloc(&b.outputs, size_t(ctas) * max_steps * kStateGroups * kWarpgroupThreads * kOutputValues * 2));
  KN_CHECK(cudaMalloc(&b.cycles, size_t(ctas) * sizeof(long long)));

  const Variant variants[] = {
      {"two-products, resident", false, false, state_chain_kernel<false, false>},
      {"two-products, streamed", false, true, state_chain_kernel<false, true>},
      {"fused-output, resident", true, false, state_chain_kernel<true, false>},
      {"fused-output, streamed", true, true, state_chain_kernel<true, true>},
  };
  const uint32_t shared = std::max(kSharedBytes, kOneCtaPerSmBytes);
  for (const Variant &v : variants)
    KN_CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));

  bool all_pass = true;
  printf("\n%-24s %-8s %10s %10s %10s %10s %9s %5s\n", "variant", "o-store", "us/step", "cyc/step", "O err", "S err",
         "O exact", "check");
  for (const Variant &v : variants) {
    const CheckResult chk = check_variant(v, b, pb, ctas, check_steps);
    all_pass = all_pass && chk.pass;
    if (chk.unwritten || chk.cta_mismatches)
      printf("  %s: %lld unwritten outputs, %lld CTAs differ from CTA 0\n", v.name, chk.unwritten, chk.cta_mismatches);
    for (int store = 0; store < 2 && !only_check; ++store) {
      const ChainParams p = make_params(b, pb, v, steps, store != 0);
      const std::vector<double> ms = time_launches([&] { launch(v, p, ctas); }, warmup, reps);
      std::vector<long long> cyc(ctas);
      KN_CHECK(cudaMemcpy(cyc.data(), b.cycles, ctas * sizeof(long long), cudaMemcpyDeviceToHost));
      std::vector<double> per_step;
      for (long long x : cyc) per_step.push_back(double(x) / steps);
      printf("%-24s %-8s %10.3f %10.0f %10.2e %10.2e %9.2e %5s\n", v.name, store ? "yes" : "no",
             median(ms) * 1e3 / steps, median(per_step), chk.o_mirror, chk.s_mirror, chk.o_exact,
             chk.pass ? "PASS" : "FAIL");
    }
    if (only_check)
      printf("%-24s %-8s %10s %10s %10.2e %10.2e %9.2e %5s\n", v.name, "-", "-", "-", chk.o_mirror, chk.s_mirror,
             chk.o_exact, chk.pass ? "PASS" : "FAIL");
  }
  printf("\ngo criterion: <= 0.7 us per 32-token step (resident factors, no o stores is the chain alone)\n");
  printf("state_chain: %s\n", all_pass ? "ALL CHECKS PASS" : "SOME CHECKS FAIL");
  return all_pass ? 0 : 1;
}
