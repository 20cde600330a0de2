// The state step of the chunk-32 KDA prefill (issue 10) for one warpgroup's 64 V rows of S^T (f32 wgmma
// accumulators, fed back as the f16 register A operand), and its epilogues (o stores, initial and final
// state). Shared by the fused prototype (fused_prefill_kernel.cuh) and the two-pass program's state pass
// (two_pass.cu). The stage it reads (stage.h's layout) holds the factor group's output
// (factor_group.cuh) and the chunk's V (bulk tensor copy). Per chunk ("two-products" form):
//     R^T  = V^T (T beta hi + T beta lo)^T + S^T W'^T  (4 x m64n32k16 SS bf16, 8 x m64n32k16 RS f16)
//     O^T  = S^T Qd^T                                   (8 x m64n32k16 RS, f16)
//     S^T  = S^T diag(decay) + R^T Kend                 (2 x m64n128k16 RS, f16)
//     O^T += R^T Aqk^T                                  (2 x m64n32k16 RS, f16)
//     o (bf16) stored from the O^T accumulators; final state (f32, V-first) at the end.
#pragma once

#include "ptx.cuh"
#include "stage.h"

namespace jax_kda {
namespace chunk32 {

// ---- state chain ----------------------------------------------------------------------------------
constexpr int kStateValues = kGroupRows * kDimK / kWarpgroupThreads;  // 64 accumulators a thread
constexpr int kKBlocksState = kDimK / 16;                             // 8
constexpr int kKBlocksChunk = kChunk / 16;                            // 2
constexpr int kRoValues = kGroupRows * 2 * kChunk / kWarpgroupThreads;  // 32: [R | O]^T, 64 x 64
constexpr int kHalfRo = kRoValues / 2;                                // 16: R part (columns 0-31), O part

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

// R^T = V^T (T beta hi + lo)^T + S^T W'^T into r (sa: S^T as f16 A fragments); with kWithO also
// O^T = S^T Qd^T into o, in the same batch.
template <bool kWithO>
__device__ __forceinline__ void r_products(uint32_t stage, int group, const uint32_t (&sa)[kKBlocksState][4],
                                          float (&r)[kHalfRo], float (&o)[kHalfRo]) {
  wgmma_fence();
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb) {
    wgmma_m64n32k16_ss_a_mn_major(r, v_descriptor(stage + kStV, group, kb),
                                  k32_descriptor(stage + kStTa, kTbetaRow0, kb), kb > 0);
    wgmma_m64n32k16_ss_a_mn_major(r, v_descriptor(stage + kStV, group, kb), k32_descriptor(stage + kStTbetaLo, 0, kb),
                                  1);
  }
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb) {
    wgmma_m64n32k16_rs_f16(r, sa[kb], wq_descriptor(stage + kStWq, kWRow0, kb), 1);
    if (kWithO) wgmma_m64n32k16_rs_f16(o, sa[kb], wq_descriptor(stage + kStWq, kQdRow0, kb), kb > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(r);
  pin_registers(o);
}

// The default between the two halves of a step: V stands as loaded.
struct VAsLoaded {
  __device__ __forceinline__ bool operator()() const { return false; }
};

// One chunk of the chain for this warpgroup's 64 V rows ("two-products" form of state_chain.cu, all
// accumulators m64n32 or the state): `stage` is the stage's shared address; O^T is left in o.
// Accumulators of different shapes must not alias (ptxas then serializes the wgmma pipeline, C7511).
// `rewrote_v` runs once R is formed; when it returns true it has changed this group's V in the stage
// (made visible to wgmma), and R is formed again from it.
template <typename RewroteV = VAsLoaded>
__device__ __forceinline__ void state_step(uint32_t stage, const float *decay, int group, int thread,
                                           float (&s)[kStateValues], float (&o)[kHalfRo],
                                           const RewroteV &rewrote_v = RewroteV()) {
  uint32_t sa[kKBlocksState][4];
#pragma unroll
  for (int kb = 0; kb < kKBlocksState; ++kb)
#pragma unroll
    for (int r = 0; r < 4; ++r) sa[kb][r] = pack_f16(s[8 * kb + 2 * r], s[8 * kb + 2 * r + 1]);
  // S^T diag(decay) before any wgmma is in flight (ptxas would otherwise insert a wait, C7517).
  decay_state(s, decay, thread);
  float r[kHalfRo];
  r_products<true>(stage, group, sa, r, o);
  if (rewrote_v()) r_products<false>(stage, group, sa, r, o);
  uint32_t ra[kKBlocksChunk][4];
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb)
#pragma unroll
    for (int j = 0; j < 4; ++j) ra[kb][j] = pack_f16(r[8 * kb + 2 * j], r[8 * kb + 2 * j + 1]);
  wgmma_fence();
  // S^T += R^T Kend (the chain first);  O^T += R^T Aqk^T
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb) wgmma_m64n128k16_rs_f16(s, ra[kb], k32_descriptor(stage + kStKend, 0, kb), 1);
#pragma unroll
  for (int kb = 0; kb < kKBlocksChunk; ++kb)
    wgmma_m64n32k16_rs_f16(o, ra[kb], k32_descriptor(stage + kStTa, kAqkRow0, kb), 1);
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(s);
  pin_registers(o);
}

// Thread values i, i + 1 (i even) of the 64 x 128 S^T tile of state group `group` sit at (row v, columns
// d, d + 1): their offsets in a state [sequence, head, C, K] (V-first), or [sequence, head, K, C].
struct StatePair {
  size_t at;      // offset of (v, d)
  size_t stride;  // from (v, d) to (v, d + 1): 1 V-first
};
CHUNK32_HD StatePair state_pair(const FusedParams &p, const Chain &chain, int group, int thread, int i) {
  const size_t head = size_t(chain.sequence) * p.heads + chain.head, columns = size_t(p.columns);
  const int v = group * kGroupRows + acc_row(thread, i), d = acc_col(thread, i);
  if (p.state_v_first) return {(head * columns + v) * kDimK + d, 1};
  return {(head * kDimK + d) * columns + v, columns};
}

__device__ void load_initial_state(const FusedParams &p, const Chain &chain, int group, int thread,
                                   float (&s)[kStateValues]) {
#pragma unroll
  for (int i = 0; i < kStateValues; i += 2) {
    float2 x = make_float2(0.f, 0.f);
    if (p.initial_state != nullptr) {
      const StatePair at = state_pair(p, chain, group, thread, i);
      x = at.stride == 1 ? __ldg(reinterpret_cast<const float2 *>(p.initial_state + at.at))
                         : make_float2(__ldg(p.initial_state + at.at), __ldg(p.initial_state + at.at + at.stride));
    }
    s[i] = x.x;
    s[i + 1] = x.y;
  }
}

// Epilogue of the chain: the final state, fp32, in the layout of p.state_v_first.
__device__ void store_final_state(const FusedParams &p, const Chain &chain, int group, int thread,
                                  const float (&s)[kStateValues]) {
#pragma unroll
  for (int i = 0; i < kStateValues; i += 2) {
    const StatePair at = state_pair(p, chain, group, thread, i);
    if (at.stride == 1) {
      *reinterpret_cast<float2 *>(p.final_state + at.at) = make_float2(s[i], s[i + 1]);
    } else {
      p.final_state[at.at] = s[i];
      p.final_state[at.at + at.stride] = s[i + 1];
    }
  }
}

// Epilogue of a chunk: o (bf16) of the valid tokens from O^T (m64n32 accumulator order: value i at V row
// 64 group + acc_row(i), token acc_col(i)).
__device__ __forceinline__ void store_outputs(const FusedParams &p, const Chain &chain, int chunk, int group,
                                              int thread, const float (&o)[kHalfRo]) {
  const int valid = valid_tokens(chunk, chain.tokens);
  const size_t token_stride = size_t(p.heads) * p.columns;
  bf16 *base = reinterpret_cast<bf16 *>(p.o) +
               ((size_t(chain.row) * p.tokens + chain.token0 + size_t(chunk) * kChunk) * p.heads + chain.head) *
                   p.columns +
               group * kGroupRows;
#pragma unroll
  for (int i = 0; i < kHalfRo; ++i) {
    const int token = acc_col(thread, i), v = acc_row(thread, i);
    if (token < valid) base[token * token_stride + v] = __float2bfloat16_rn(o[i]);
  }
}

}  // namespace chunk32
}  // namespace jax_kda
