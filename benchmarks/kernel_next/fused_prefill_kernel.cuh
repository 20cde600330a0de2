// The fused chunk-32 KDA prefill kernel (issue 10, stage 2), device code. Layout and schedule in
// stage.h; the host program (inputs, checks, timings) in fused_prefill.cu.
//
// Per chunk of 32 tokens (two sub-blocks of 16), Gamma the chunk-local cumulative log2-decay:
//   factor group (one warpgroup, the microkernel factor_build.cu's algorithm with the rounding that
//   emulate_rounding.py chose):
//     A  gate (bounded: a = lower_bound sigmoid(exp(A_log) (g + dt_bias)), log2 units), x_t = Gamma_t -
//        Gamma_15 by sums within the sub-blocks; inverse L2 norms as the diagonals of 16 x 16 Gram blocks
//        (mma); beta sigmoid. Tokens past the sequence's end (zeros from the bulk copy) get a = beta = 0.
//     B  per element R = 2^x, C = 1/R: Qr = q R, Kr = k R (bf16), Kc = k C as a bf16 hi + lo pair;
//        Qd = scale rq q 2^Gamma (f16), Kend^T = rk k 2^(Gamma_C - Gamma) (f16), decay 2^Gamma_C.
//     C  scores (mma.sync bf16): Aqk = scale rq_i rk_j Qr Kc^T (j <= i) -> f16; L = beta_i rk_i rk_j Kr Kc^T
//        (j < i) -> f32. The two 16 x 16 diagonal blocks, where one factor reaches 2^115, take Kc's lo
//        part too (Qr Kc_lo, Kr Kc_lo); the off-diagonal block (both factors <= 1) is hi x hi.
//     D  (I + L)^-1: both 16 x 16 diagonal blocks by f32 forward substitution on one warp, merged by two
//        bf16 mma; T beta as bf16 hi + lo, T diag(beta rk) bf16.
//     E  W' = -(T diag(beta rk)) Kr diag(2^Gamma_15) (mma) -> f16.
//   (factor_group.cuh: FactorGroup, the loads; state_step.cuh: state_step and the epilogues)
//   state warpgroup (S^T f32 in wgmma accumulators, fed back as the f16 register A operand):
//     [R | O]^T  = S^T [W' ; Qd]^T                (8 x m64n64k16 RS, f16)
//     R^T       += V^T (T beta hi + T beta lo)^T   (4 x m64n32k16 SS, bf16: V is bf16)
//     S^T        = S^T diag(decay) + R^T Kend      (2 x m64n128k16 RS, f16)
//     O^T       += R^T Aqk^T                       (2 x m64n32k16 RS, f16)
//     o (bf16) stored from the O^T accumulators; final state (f32, V-first) at the end.
#pragma once

#include "factor_group.cuh"
#include "state_step.cuh"

namespace jax_kda {
namespace chunk32 {

struct Barriers {
  uint64_t *full;      // [kStages]: the stage's factors published (1 arrival) and its V arrived (bytes)
  uint64_t *empty;     // [kStages]: the state warpgroups are done with the stage (kStateThreads arrivals)
  uint64_t *raw_full;  // [kFactorGroups][kRawSlots]: a raw slot's copies arrived
};

// The factor group's loop: chunks group, group + kFactorGroups, ...
template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__device__ void run_factor_group(const FusedParams &p, const TensorMaps &maps, uint8_t *smem, const Barriers &bars,
                                 const Chain &chain, int group) {
  FactorGroup<kGate, kL2Norm, kBetaSigmoid> fg;
  fg.base = smem + kSmGroups + group * kGrBytes;
  fg.group = group;
  fg.tid = threadIdx.x % kWarpgroupThreads;
  fg.warp = fg.tid / 32;
  fg.lane = fg.tid % 32;
  fg.half = fg.warp >> 1;
  fg.d0 = 2 * (((fg.warp & 1) << 5) | fg.lane);
  fg.load_gate(p, chain.head);
  const bool loader = fg.tid == kLoaderThread;
  uint64_t *raw_full = bars.raw_full + group * kRawSlots;
  auto slot_of = [&](int it) { return fg.base + kGrRaw + (it % kRawSlots) * kRawSlotBytes; };
  fg.clear_marks();
  fg.sync();
  uint32_t beta_bits = 0u;
  if (group < chain.chunks) {
    if (loader) issue_raw_loads(maps, chain, group, slot_of(0), &raw_full[0]);
    beta_bits = load_beta_bits(p, chain, group, fg.tid);
  }
  for (int c = group, it = 0; c < chain.chunks; c += kFactorGroups, ++it) {
    // Loads of this group's next chunk into the other slot (freed at the end of the previous iteration).
    const int next = c + kFactorGroups;
    uint32_t next_beta_bits = 0u;
    if (next < chain.chunks) {
      if (loader) issue_raw_loads(maps, chain, next, slot_of(it + 1), &raw_full[(it + 1) % kRawSlots]);
      next_beta_bits = load_beta_bits(p, chain, next, fg.tid);
    }
    // Per-thread indices made opaque each chunk: otherwise the compiler hoists dozens of swizzled
    // addresses out of the loop and, at 96 registers, spills them.
    fg.launder_indices();
    uint8_t *raw = slot_of(it);
    const int valid = valid_tokens(c, p.tokens);
    mbarrier_wait(&raw_full[it % kRawSlots], uint32_t(it / kRawSlots) & 1u);
    float x[kSubBlock][2];
    fg.gate_and_offsets(raw, valid, x);
    fg.row_norms(raw);
    fg.write_betas(beta_bits, valid);
    fg.sync();
    // The stage: free once the state warpgroups are done with chunk c - kStages; its V comes by copy.
    const int s = stage_of(c);
    uint8_t *stage = smem + kSmStages + s * kStBytes;
    if (c >= kStages) mbarrier_wait(&bars.empty[s], stage_parity(c - kStages));
    if (loader) issue_v_loads(maps, chain, c, stage, &bars.full[s]);
    fg.elementwise_factors(raw, stage, x, valid);
    fg.sync();
    fg.clear_marks();
    fg.scores(raw, stage);
    fg.sync();
    if (fg.warp == 0) fg.invert_and_merge(stage);
    fg.sync();
    fg.w_product(raw, stage + kStWq);
    // The stage is read by wgmma and the raw slot refilled by the copy engine (async proxy).
    fence_proxy_async();
    fg.sync();
    if (loader) mbarrier_arrive(&bars.full[s]);
    beta_bits = next_beta_bits;
  }
}

__device__ void run_state_group(const FusedParams &p, uint8_t *smem, const Barriers &bars, const Chain &chain,
                                int group) {
  const int thread = threadIdx.x % kWarpgroupThreads;
  float s[kStateValues], o[kHalfRo];
  load_initial_state(p, chain, group, thread, s);
  const uint32_t stages = smem_address(smem + kSmStages);
  for (int c = 0; c < chain.chunks; ++c) {
    const int st = stage_of(c);
    const float *decay = reinterpret_cast<const float *>(smem + kSmStages + st * kStBytes + kStDecay);
    mbarrier_wait(&bars.full[st], stage_parity(c));
    state_step(stages + st * kStBytes, decay, group, thread, s, o);
    mbarrier_arrive(&bars.empty[st]);  // every wgmma reading the stage has completed (wait_group 0)
    store_outputs(p, chain, c, group, thread, o);
  }
  store_final_state(p, chain, group, thread, s);
}

// ---- the kernel: roles by warpgroup -------------------------------------------------------------------
template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__global__ void __launch_bounds__(kThreads, 1)
    fused_prefill_kernel(const __grid_constant__ FusedParams p, const __grid_constant__ TensorMaps maps) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = smem_raw + ((kSwizzleAlign - (smem_address(smem_raw) & (kSwizzleAlign - 1))) & (kSwizzleAlign - 1));
  uint64_t *bar_base = reinterpret_cast<uint64_t *>(smem + kSmBarriers);
  const Barriers bars{bar_base, bar_base + kStages, bar_base + 2 * kStages};
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&bars.full[i], 1);
      mbarrier_init(&bars.empty[i], kStateThreads);
    }
    for (int i = 0; i < kFactorGroups * kRawSlots; ++i) mbarrier_init(&bars.raw_full[i], 1);
    fence_barrier_init();
  }
  __syncthreads();
  const Chain chain = chain_of(blockIdx.x, p.heads, p.tokens);
  // The role as a warp-uniform value (a broadcast): a plain threadIdx test makes ptxas treat the wgmma
  // code as divergent (C7518).
  const int warpgroup = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / kWarpgroupThreads, 0);
  if (warpgroup < kStateGroups) {
    warpgroup_registers_increase<kStateRegisters>();
    run_state_group(p, smem, bars, chain, warpgroup);
  } else {
    warpgroup_registers_decrease<kFactorRegisters>();
    run_factor_group<kGate, kL2Norm, kBetaSigmoid>(p, maps, smem, bars, chain, warpgroup - kStateGroups);
  }
}

}  // namespace chunk32
}  // namespace jax_kda
