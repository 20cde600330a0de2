// The factor group of the chunk-32 KDA prefill (issue 10): one warpgroup builds one 32-token chunk's
// factors from its raw q, k, g (bulk tensor copies into a swizzled raw slot) and beta, and writes them
// in the stage layout of stage.h. Shared by the fused prototype (fused_prefill_kernel.cuh: the
// stage is in shared memory) and the two-pass program (two_pass.cu: the stage is a slice of a global
// buffer). The group writes its stage through generic pointers only and never reads it back, so either
// space works.
//
// Per chunk of 32 tokens (two sub-blocks of 16), Gamma the chunk-local cumulative log2-decay
// (the microkernel factor_build.cu's algorithm with the rounding that emulate_rounding.py chose):
//     A  gate (bounded: a = lower_bound sigmoid(exp(A_log) (g + dt_bias)), log2 units), x_t = Gamma_t -
//        Gamma_15 by sums within the sub-blocks; inverse L2 norms as the diagonals of 16 x 16 Gram blocks
//        (mma); beta sigmoid. Tokens past the sequence's end (zeros from the bulk copy) get a = beta = 0.
//     B  per element R = 2^x, C = 1/R: Qr = q R, Kr = k R (bf16), Kc = k C as a bf16 hi + lo pair;
//        Qd = scale rq q 2^Gamma (f16), Kend^T = rk k 2^(Gamma_C - Gamma) (f16), decay 2^Gamma_C.
//     C  scores (mma.sync bf16): Aqk = scale rq_i rk_j Qr Kc^T (j <= i) -> f16; L = beta_i rk_i rk_j Kr Kc^T
//        (j < i) -> f32. The two 16 x 16 diagonal blocks, where one factor reaches 2^115, take Kc's lo
//        part too (Qr Kc_lo, Kr Kc_lo; Kr_lo Kc as well cost the pass 7% and changed o's float64 error in
//        its third digit at most: PERFLOG, fourteenth session); the off-diagonal block (both factors
//        <= 1) is hi x hi.
//     D  (I + L)^-1: both 16 x 16 diagonal blocks by f32 forward substitution on one warp, merged by two
//        bf16 mma; T beta as bf16 hi + lo, T diag(beta rk) bf16.
//     E  W' = -(T diag(beta rk)) Kr diag(2^Gamma_15) (mma) -> f16.
// Non-finite inputs: the 0 x NaN of the chunk's products would carry a non-finite k, g or beta to the
// earlier tokens of the chunk. Phase A marks such tokens with a compare on values it computes anyway
// (Σ k², beta, each sub-block's decay sum; q reaches only its own row and is not marked); only a chunk
// with a mark takes the slower paths: its marked tokens run as padding (k, beta and the bad decays
// zero), and Qd from the first marked row on and the chunk's decay are NaN, so that those outputs and
// the state leave as NaN. (A non-finite V the state pass's scanner warp finds: two_pass.cuh.)
#pragma once

#include <cuda.h>

#include "ptx.cuh"
#include "stage.h"

namespace jax_kda {
namespace chunk32 {

struct TensorMaps {
  CUtensorMap q, k, g, v;  // 4-D (channel, head, token, sequence), box 64 x 1 x 32 x 1, 128B swizzle
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kSoftplusThreshold = 20.f;  // softplus(x) = x past it (docs/CONTRACT.md)
constexpr float kNormEpsilon = 1e-6f;

// ---- swizzled raw tiles: ldmatrix operands ------------------------------------------------------
// A operand (16 x 16) of rows r0.., channels c0.. of a raw tile.
__device__ __forceinline__ void raw_load_a(const uint8_t *tile, int r0, int c0, int lane, uint32_t (&a)[4]) {
  const int row = r0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = c0 + (lane >> 4) * 8;
  ldmatrix_x4(tile + raw_offset(row, col), a);
}
// B operands of two n8 tiles (n0.., n0 + 8..) at k-block k0 of a raw tile stored [n][k].
__device__ __forceinline__ void raw_load_b_nk(const uint8_t *tile, int n0, int k0, int lane, uint32_t (&b)[4]) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8, col = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(tile + raw_offset(row, col), b);
}
// The same from a raw tile stored [k][n] (transposed load).
__device__ __forceinline__ void raw_load_b_kn(const uint8_t *tile, int n0, int k0, int lane, uint32_t (&b)[4]) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = n0 + (lane >> 4) * 8;
  ldmatrix_x4_transposed(tile + raw_offset(row, col), b);
}

// Two floats as bf16 hi + lo pairs (x ~ hi + lo to ~2^-17 relative).
__device__ __forceinline__ void split_bf16(float x0, float x1, uint32_t &hi, uint32_t &lo) {
  hi = pack_bf16(x0, x1);
  lo = pack_bf16(x0 - bf16_low(hi), x1 - bf16_high(hi));
}

// ---- load role (thread kLoaderThread of a factor group) -------------------------------------------
// Raw q, k, g of `chunk` into a raw slot: six boxes completing on `bar`.
__device__ __forceinline__ void issue_raw_loads(const TensorMaps &maps, const Chain &chain, int chunk, uint8_t *slot,
                                                uint64_t *bar) {
  mbarrier_arrive_expect_bytes(bar, kRawLoadBytes);
  const int t0 = chain.token0 + chunk * kChunk;  // rows past the sequence: the next one's, or zeros past T
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c0 = h * kRawBoxChannels;
    tensor_copy_4d_to_shared(slot + kRawQ + h * kRawHalfBytes, &maps.q, c0, chain.qk_head, t0, chain.row, bar);
    tensor_copy_4d_to_shared(slot + kRawK + h * kRawHalfBytes, &maps.k, c0, chain.qk_head, t0, chain.row, bar);
    tensor_copy_4d_to_shared(slot + kRawG + h * kRawHalfBytes, &maps.g, c0, chain.head, t0, chain.row, bar);
  }
}
// V of `chunk` into its stage (the two state groups' 64-value halves), completing on the stage's full
// barrier, whose single arrival comes when the factors are published.
__device__ __forceinline__ void issue_v_loads(const TensorMaps &maps, const Chain &chain, int chunk, uint8_t *stage,
                                              uint64_t *full) {
  mbarrier_expect_bytes(full, kVLoadBytes);
#pragma unroll
  for (int grp = 0; grp < kStateGroups; ++grp)
    tensor_copy_4d_to_shared(stage + kStV + grp * kVGroupBytes, &maps.v, grp * kGroupRows, chain.head,
                             chain.token0 + chunk * kChunk, chain.row, full);
}
// The bf16 bits of the beta logit of token `lane` of `chunk` (threads 0-31), a chunk ahead. Kept as
// loaded: their first use is then the next item's write_betas, not a conversion right after the load,
// which made warp 0 wait the load's whole latency at every item's head (the others at its first barrier).
__device__ __forceinline__ uint32_t load_beta_bits(const FusedParams &p, const Chain &chain, int chunk, int lane) {
  const int t = chunk * kChunk + lane;
  if (lane >= kChunk || t >= chain.tokens) return 0u;
  return __ldg(p.beta + (size_t(chain.row) * p.tokens + chain.token0 + t) * p.heads + chain.head);
}

// ---- factor build ------------------------------------------------------------------------------
// The gate of a thread's channel pair (d0, d0 + 1), so that the log2 decay is one fma and the gate's
// function of z = g mul + add: bounded lower_bound log2(e) sigmoid(A (g + b)); softplus -A log2(1 + 2^z)
// with z = (g + b) log2(e) (-A z past softplus's threshold); log-decay z = g log2(e). A value, so that
// the out-of-line rare paths take it as an argument.
template <GateMath kGate>
struct Gate {
  float mul, add[2], out;
  __device__ __forceinline__ float log2_decay(float g, int ch) const {
    const float z = fmaf(g, mul, add[ch]);
    if (kGate == GateMath::kTanh) return fmaf(tanh_approx(z), out, out);  // sigmoid = (1 + tanh(z/2)) / 2
    if (kGate == GateMath::kSoftplus) return out * (z > kSoftplusThreshold * kLog2e ? z : log2_approx(1.f + exp2_approx(z)));
    if (kGate == GateMath::kLogDecay) return z;
    return out * reciprocal_approx(1.f + exp2_approx(z));                 // sigmoid = 1 / (1 + e^-z)
  }
  // The log2 decays of token t's two channels (d0, d0 + 1). Past the end (zeros past T, or the next
  // packed sequence's rows) nothing decays: g is taken as 0 there (a select on its bits, so that a
  // non-finite g cannot enter the sums) and its decay times 0 (straight-line code: a select of the
  // decay itself compiles to a branch per token).
  __device__ __forceinline__ float2 decays(const uint8_t *raw, int t, int d0, int valid) const {
    const bool live = t < valid;
    const uint32_t loaded = *reinterpret_cast<const uint32_t *>(raw + kRawG + raw_offset(t, d0));
    const uint32_t bits = live ? loaded : 0u;
    const float mask = live ? 1.f : 0.f;
    return make_float2(log2_decay(bf16_low(bits), 0) * mask, log2_decay(bf16_high(bits), 1) * mask);
  }
};

template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
struct FactorGroup {
  uint8_t *base;  // this group's area
  int group, tid, warp, lane;
  int half, d0;   // elementwise role: sub-block (tokens 16 half ..) and channel pair (d0, d0 + 1)
  Gate<kGate> gate;
  float scale;
  float beta_max;  // the beta sigmoid's upper bound: 1, or 2 to allow negative eigenvalues

  __device__ float *sums() const { return reinterpret_cast<float *>(base + kGrSums); }
  __device__ float *norms() const { return reinterpret_cast<float *>(base + kGrNorms); }
  __device__ float *betas() const { return reinterpret_cast<float *>(base + kGrBeta); }
  __device__ float *lmat() const { return reinterpret_cast<float *>(base + kGrL); }
  __device__ float *t00t() const { return reinterpret_cast<float *>(base + kGrT00t); }
  __device__ float *t11() const { return reinterpret_cast<float *>(base + kGrT11); }
  __device__ bf16 *tb() const { return reinterpret_cast<bf16 *>(base + kGrTb); }
  __device__ float *anchor_scale() const { return reinterpret_cast<float *>(base + kGrAnchor); }
  __device__ uint32_t *marks() const { return reinterpret_cast<uint32_t *>(base + kGrMarks); }
  // The kernel clears the marks before its first chunk and after each chunk's phase B has read them.
  __device__ void clear_marks() const {
    if (tid == 0) *marks() = 0u;
  }
  __device__ void sync() const { named_barrier(1 + group, kWarpgroupThreads); }
  // Opaque to the compiler once an item: what derives from lane and tid is recomputed in each item
  // instead of held across the loop (at 3 CTAs a multiprocessor, 170 registers, holding it spills).
  // d0 is not laundered: the addresses from it stay in registers (the item loop 4,211 -> 4,054
  // instructions, no spills; laundering nothing spills 584 bytes).
  __device__ __forceinline__ void launder_indices() {
    asm volatile("" : "+r"(lane), "+r"(tid));
  }

  // The gate constants of this thread's channel pair for `head`.
  __device__ void load_gate(const FusedParams &p, int head) {
    const float a = p.a_log != nullptr ? expf(p.a_log[head]) : 1.f;  // absent: A = 1, no bias
#pragma unroll
    for (int ch = 0; ch < 2; ++ch) {
      const float bias = p.dt_bias != nullptr ? p.dt_bias[head * kDimK + d0 + ch] : 0.f;
      gate.add[ch] = kGate == GateMath::kTanh             ? 0.5f * a * bias
                     : kGate == GateMath::kExp2Reciprocal ? -a * kLog2e * bias
                     : kGate == GateMath::kSoftplus       ? kLog2e * bias
                                                          : 0.f;
    }
    gate.mul = kGate == GateMath::kTanh ? 0.5f * a : kGate == GateMath::kExp2Reciprocal ? -a * kLog2e : kLog2e;
    gate.out = kGate == GateMath::kTanh ? 0.5f * p.lower_bound * kLog2e
               : kGate == GateMath::kSoftplus ? -a
                                              : p.lower_bound * kLog2e;
    scale = p.scale;
    beta_max = p.beta_max;
  }

  // A. Gate and x_t = Gamma_t - Gamma_15 for this thread's 16 tokens (sub-block 1 sums forward from
  // token 16, sub-block 0 backward from token 15). Tokens >= valid decay by nothing. A NaN decay leaves
  // its sub-block's sum NaN: the sums are then taken again with the NaN decays as zero, and those tokens
  // marked (sanitized_sums).
  __device__ void gate_and_offsets(const uint8_t *raw, int valid, float (&x)[kSubBlock][2]) const {
    float2 run = sub_block_sums(raw, valid, x);
    if (run.x != run.x || run.y != run.y) run = sanitized_sums(raw, valid, x);
    *reinterpret_cast<float2 *>(sums() + half * kDimK + d0) = run;
  }
  __device__ __forceinline__ float2 sub_block_sums(const uint8_t *raw, int valid, float (&x)[kSubBlock][2]) const {
    const int t0 = kSubBlock * half;
    float run0 = 0.f, run1 = 0.f;
    if (half == 1) {
#pragma unroll
      for (int j = 0; j < kSubBlock; ++j) {
        const float2 a = gate.decays(raw, t0 + j, d0, valid);
        run0 += a.x;
        run1 += a.y;
        x[j][0] = run0;
        x[j][1] = run1;
      }
    } else {
#pragma unroll
      for (int j = kSubBlock - 1; j >= 0; --j) {
        x[j][0] = run0;
        x[j][1] = run1;
        const float2 a = gate.decays(raw, t0 + j, d0, valid);
        run0 -= a.x;
        run1 -= a.y;
      }
      run0 = -run0;  // Gamma_15
      run1 = -run1;
    }
    return make_float2(run0, run1);
  }
  // The same sums with NaN decays as zero, marking their tokens: the rare path, out of line (its code
  // inside the item loop cost the factor pass 6% on the card) and through this thread's 128 bytes of
  // the lo tiles (free in phase A), from where x is read back.
  __device__ float2 sanitized_sums(const uint8_t *raw, int valid, float (&x)[kSubBlock][2]) const {
    static_assert(kWarpgroupThreads * kSubBlock * sizeof(float2) <= 2 * kRawTileBytes, "scratch in the lo tiles");
    float2 *scratch = reinterpret_cast<float2 *>(base + kGrLo) + tid * kSubBlock;
    const float2 run = sanitized_sums_into(raw, scratch, marks(), gate, half, d0, valid);
#pragma unroll
    for (int j = 0; j < kSubBlock; ++j) {
      x[j][0] = scratch[j].x;
      x[j][1] = scratch[j].y;
    }
    return run;
  }
  static __device__ __noinline__ float2 sanitized_sums_into(const uint8_t *raw, float2 *scratch, uint32_t *marks,
                                                            Gate<kGate> gt, int half, int d0, int valid) {
    const int t0 = kSubBlock * half;
    float run0 = 0.f, run1 = 0.f;
    uint32_t bad = 0u;
#pragma unroll 1
    for (int n = 0; n < kSubBlock; ++n) {
      const int j = half == 1 ? n : kSubBlock - 1 - n;
      float2 a = gt.decays(raw, t0 + j, d0, valid);
      if (a.x != a.x || a.y != a.y) {
        bad |= 1u << (t0 + j);
        a.x = a.x != a.x ? 0.f : a.x;
        a.y = a.y != a.y ? 0.f : a.y;
      }
      if (half == 1) {
        run0 += a.x;
        run1 += a.y;
        scratch[j] = make_float2(run0, run1);
      } else {
        scratch[j] = make_float2(run0, run1);
        run0 -= a.x;
        run1 -= a.y;
      }
    }
    if (bad != 0u) atomicOr(marks, bad);
    return half == 1 ? make_float2(run0, run1) : make_float2(-run0, -run1);
  }

  // A. Inverse L2 norms: warp (tile, row block) forms the 16 x 16 Gram block X X^T of its rows on the
  // tensor cores and keeps the diagonal (B fragments of X^T are the A fragment registers).
  // norms[0..31] = scale rq, norms[32..63] = rk. Zero rows (past T) give finite norms. A k row whose
  // Σ k² is not finite is marked (past `valid` too: the next packed sequence's row, zeroed in phase B
  // without poisoning anything) and its norm is zero.
  __device__ void row_norms(const uint8_t *raw) const {
    const int tile = warp >> 1, row_block = warp & 1;
    const uint8_t *x = raw + (tile ? kRawK : kRawQ);
    float acc[2][4] = {};
#pragma unroll
    for (int kb = 0; kb < kDimK / 16; ++kb) {
      uint32_t a[4];
      raw_load_a(x, kSubBlock * row_block, 16 * kb, lane, a);
      mma_m16n8k16(acc[0], a, a[0], a[2]);
      mma_m16n8k16(acc[1], a, a[1], a[3]);
    }
    const int g = lane >> 2, t = lane & 3, e = g - 2 * t;
    if (e == 0 || e == 1) {
      const float top = e ? acc[0][1] : acc[0][0], bottom = e ? acc[1][3] : acc[1][2];
      const float factor = tile == 0 ? scale : 1.f;
      const int row = kSubBlock * row_block + g;
      float *dst = norms() + tile * kChunk + row;
      float n_top = (kL2Norm ? rsqrt_approx(top + kNormEpsilon) : 1.f) * factor;
      float n_bottom = (kL2Norm ? rsqrt_approx(bottom + kNormEpsilon) : 1.f) * factor;
      const bool bad_top = tile == 1 && !(top < INFINITY), bad_bottom = tile == 1 && !(bottom < INFINITY);
      if (bad_top || bad_bottom) {
        atomicOr(marks(), (bad_top ? 1u << row : 0u) | (bad_bottom ? 1u << (row + 8) : 0u));
        n_top = bad_top ? 0.f : n_top;
        n_bottom = bad_bottom ? 0.f : n_bottom;
      }
      dst[0] = n_top;
      dst[8] = n_bottom;
    }
  }

  __device__ void write_betas(uint32_t logit_bits, int valid) const {
    if (tid < kChunk) {
      const float logit = __uint_as_float(logit_bits << 16);  // bf16 -> f32
      float b = kBetaSigmoid ? beta_max * reciprocal_approx(1.f + exp2_approx(-logit * kLog2e)) : logit;
      if (tid < valid && !(fabsf(b) < INFINITY)) {  // runs as padding
        atomicOr(marks(), 1u << tid);
        b = 0.f;
      }
      betas()[tid] = tid < valid ? b : 0.f;
    }
  }

  // B. The elementwise factors of this thread's 16 tokens x 2 channels. A chunk with marked tokens
  // (a group-uniform branch: every thread reads the word after the same group barrier) then has them
  // overwritten by `isolate`: a rare, compact second step instead of a second copy of this code.
  template <bool kPairedKend = false>
  __device__ void elementwise_factors(uint8_t *raw, uint8_t *stage, const float (&x)[kSubBlock][2], int valid) const {
    elementwise<kPairedKend>(raw, stage, x);
    const uint32_t marked = *marks();
    if (marked != 0u) {
      if (kPairedKend) __syncwarp();  // isolate rewrites Kend elements the partner lane stored
      const uint32_t poisoned = valid_rows(marked, valid);
      isolate(raw, stage, base, half, d0, marked, poisoned != 0u ? __ffs(poisoned) - 1 : kChunk);
    }
  }
  // The factors of marked tokens as padding's (every product of their k is zero), and, from the first
  // marked token among the valid ones on, Qd and the chunk's decay NaN. The same thread's elements as
  // `elementwise`, which it wrote (paired Kend: its warp's, after a __syncwarp). Out of line, as sanitized_sums_into.
  static __device__ __noinline__ void isolate(uint8_t *raw, uint8_t *stage, uint8_t *base, int half, int d0,
                                              uint32_t marked, int poisoned_from) {
    uint8_t *kr = raw + kRawK, *kc = raw + kRawG, *kc_lo = base + kGrKcLo;
    if (half == 1 && poisoned_from < kChunk)
      *reinterpret_cast<float2 *>(stage + kStDecay + 4 * d0) = make_float2(NAN, NAN);
#pragma unroll 1
    for (int j = 0; j < kSubBlock; ++j) {
      const int t = kSubBlock * half + j;
      const uint32_t at = raw_offset(t, d0);
      if ((marked >> t) & 1u) {
        *reinterpret_cast<uint32_t *>(kr + at) = 0u;
        *reinterpret_cast<uint32_t *>(kc + at) = 0u;
        *reinterpret_cast<uint32_t *>(kc_lo + at) = 0u;
        for (int ch = 0; ch < 2; ++ch) *reinterpret_cast<uint16_t *>(stage + kStKend + k32_offset(d0 + ch, t)) = 0u;
      }
      if (t >= poisoned_from) *reinterpret_cast<uint32_t *>(stage + kStWq + wq_offset(kQdRow0 + t, d0)) = pack_f16(NAN, NAN);
    }
  }
  template <bool kPairedKend>
  __device__ void elementwise(uint8_t *raw, uint8_t *stage, const float (&x)[kSubBlock][2]) const {
    uint8_t *q = raw + kRawQ, *k = raw + kRawK, *kc = raw + kRawG;  // Kc over the consumed g
    uint8_t *kc_lo = base + kGrKcLo;
    const float2 first = *reinterpret_cast<const float2 *>(sums() + d0);           // Gamma_15
    const float2 second = *reinterpret_cast<const float2 *>(sums() + kDimK + d0);  // Gamma_31 - Gamma_15
    const float e15[2] = {exp2_approx(first.x), exp2_approx(first.y)};
    const float e_rest[2] = {exp2_approx(second.x), exp2_approx(second.y)};
    if (half == 1) {
      *reinterpret_cast<float2 *>(stage + kStDecay + 4 * d0) = make_float2(e15[0] * e_rest[0], e15[1] * e_rest[1]);
    } else {
      *reinterpret_cast<float2 *>(anchor_scale() + d0) = make_float2(e15[0], e15[1]);
    }
    float rq[kSubBlock], rk[kSubBlock];
#pragma unroll
    for (int j = 0; j < kSubBlock; j += 4) {
      *reinterpret_cast<float4 *>(rq + j) = *reinterpret_cast<const float4 *>(norms() + kSubBlock * half + j);
      *reinterpret_cast<float4 *>(rk + j) = *reinterpret_cast<const float4 *>(norms() + kChunk + kSubBlock * half + j);
    }
    float kend_even[2] = {0.f, 0.f};
    uint32_t kend[2][kSubBlock / 2];
#pragma unroll
    for (int j = 0; j < kSubBlock; ++j) {
      const int t = kSubBlock * half + j;
      const uint32_t at = raw_offset(t, d0);
      const float x0 = x[j][0], x1 = x[j][1];  // Gamma_t - Gamma_15 (log2)
      const float r0 = exp2_approx(x0), r1 = exp2_approx(x1), c0 = exp2_approx(-x0), c1 = exp2_approx(-x1);
      const uint32_t qb = *reinterpret_cast<const uint32_t *>(q + at);
      const uint32_t kb = *reinterpret_cast<const uint32_t *>(k + at);
      const float qr0 = bf16_low(qb) * r0, qr1 = bf16_high(qb) * r1;
      const float kr0 = bf16_low(kb) * r0, kr1 = bf16_high(kb) * r1;
      const float kc0 = bf16_low(kb) * c0, kc1 = bf16_high(kb) * c1;
      uint32_t hi, lo;
      *reinterpret_cast<uint32_t *>(q + at) = pack_bf16(qr0, qr1);
      *reinterpret_cast<uint32_t *>(k + at) = pack_bf16(kr0, kr1);
      split_bf16(kc0, kc1, hi, lo);
      *reinterpret_cast<uint32_t *>(kc + at) = hi;
      *reinterpret_cast<uint32_t *>(kc_lo + at) = lo;
      const float qs = rq[j], ks = rk[j];
      *reinterpret_cast<uint32_t *>(stage + kStWq + wq_offset(kQdRow0 + t, d0)) =
          pack_f16(qr0 * e15[0] * qs, qr1 * e15[1] * qs);
      const float kend0 = kc0 * e_rest[0] * ks, kend1 = kc1 * e_rest[1] * ks;
      if (j % 2 == 0) {
        kend_even[0] = kend0;
        kend_even[1] = kend1;
      } else {
        kend[0][j / 2] = pack_f16(kend_even[0], kend0);
        kend[1][j / 2] = pack_f16(kend_even[1], kend1);
      }
    }
    // Kend^T rows d0, d0 + 1: this thread's 16 tokens are two 16-byte chunks of each row, the two halves
    // of one 32-byte sector (the 64-byte swizzle keeps the pair in it).
    if (!kPairedKend) {
#pragma unroll
      for (int ch = 0; ch < 2; ++ch)
#pragma unroll
        for (int m = 0; m < 2; ++m)
          *reinterpret_cast<uint4 *>(stage + kStKend + k32_offset(d0 + ch, kSubBlock * half + 8 * m)) =
              make_uint4(kend[ch][4 * m], kend[ch][4 * m + 1], kend[ch][4 * m + 2], kend[ch][4 * m + 3]);
      return;
    }
    // Paired: lanes 2i and 2i + 1 (rows d0 .. d0 + 3 between them) trade halves so that each store writes
    // whole sectors: the even lane the first 8 tokens of each of the four rows, the odd lane the last 8.
    const bool odd = lane & 1;
    uint32_t mine[2][4], other[2][4];  // the half this lane stores of its own rows, and of its partner's
#pragma unroll
    for (int ch = 0; ch < 2; ++ch)
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        mine[ch][u] = odd ? kend[ch][4 + u] : kend[ch][u];
        other[ch][u] = __shfl_xor_sync(0xFFFFFFFFu, odd ? kend[ch][u] : kend[ch][4 + u], 1);
      }
    const int even_row = d0 - (odd ? 2 : 0), token = kSubBlock * half + (odd ? 8 : 0);
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // row even_row + r: the even lane's rows first, then the odd lane's
      const int ch = r & 1;
      const bool own = (r < 2) != odd;
      uint32_t v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = own ? mine[ch][u] : other[ch][u];
      *reinterpret_cast<uint4 *>(stage + kStKend + k32_offset(even_row + r, token)) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  }

  // C. Scores. Warp (product, row block): product 0 = Q, 1 = K; rows 16 rb..; columns 0-15 (rb 0) or
  // 0-31 (rb 1). Diagonal blocks (rb 0: columns 0-15; rb 1: columns 16-31) add the Kc lo products;
  // the row block is a template parameter so that the accumulators are indexed by constants. Aqk into
  // the stage, or with kAqkImage into `dst` as a shared-memory image of the stage's Aqk rows (kStAqk)
  // that a bulk copy stores.
  template <int kRowBlock, bool kAqkImage>
  __device__ void scores_rows(const uint8_t *raw, uint8_t *dst, int product) const {
    const uint8_t *rows = raw + (product ? kRawK : kRawQ);
    const uint8_t *cols = raw + kRawG, *cols_lo = base + kGrKcLo;
    constexpr int kDiag = kSubBlock * kRowBlock;  // first column (and n tile pair) of the diagonal block
    constexpr int kDiagTile = 2 * kRowBlock;
    float acc[4][4] = {};
#pragma unroll
    for (int kb = 0; kb < kDimK / 16; ++kb) {
      uint32_t a[4], b[4], b_lo[4];
      raw_load_a(rows, kSubBlock * kRowBlock, 16 * kb, lane, a);
      // Off-diagonal block (rows 16-31, columns 0-15): hi x hi.
      if (kRowBlock == 1) {
        raw_load_b_nk(cols, 0, 16 * kb, lane, b);
        mma_m16n8k16(acc[0], a, b[0], b[1]);
        mma_m16n8k16(acc[1], a, b[2], b[3]);
      }
      raw_load_b_nk(cols, kDiag, 16 * kb, lane, b);
      raw_load_b_nk(cols_lo, kDiag, 16 * kb, lane, b_lo);
      mma_m16n8k16(acc[kDiagTile], a, b[0], b[1]);
      mma_m16n8k16(acc[kDiagTile + 1], a, b[2], b[3]);
      mma_m16n8k16(acc[kDiagTile], a, b_lo[0], b_lo[1]);
      mma_m16n8k16(acc[kDiagTile + 1], a, b_lo[2], b_lo[3]);
    }
    const int g = lane >> 2, t = lane & 3;
    const float *rq = norms(), *rk = norms() + kChunk;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = kSubBlock * kRowBlock + g + 8 * h, j = 8 * nt + 2 * t;  // rb 0, nt >= 2: j > i, zeros
        const float v0 = acc[nt][2 * h], v1 = acc[nt][2 * h + 1];
        if (product == 0) {
          const float s = rq[i];
          if constexpr (kAqkImage) {  // two statements: one with a select rescheduled the stage's form
            *reinterpret_cast<uint32_t *>(dst + k32_offset(i, j)) =
                pack_f16(j <= i ? v0 * s * rk[j] : 0.f, j + 1 <= i ? v1 * s * rk[j + 1] : 0.f);
          } else {
            *reinterpret_cast<uint32_t *>(dst + kStTa + k32_offset(kAqkRow0 + i, j)) =
                pack_f16(j <= i ? v0 * s * rk[j] : 0.f, j + 1 <= i ? v1 * s * rk[j + 1] : 0.f);
          }
        } else {
          const float s = betas()[i] * rk[i];
          *reinterpret_cast<float2 *>(lmat() + i * kLRow + j) =
              make_float2(j < i ? v0 * s * rk[j] : 0.f, j + 1 < i ? v1 * s * rk[j + 1] : 0.f);
        }
      }
    }
  }
  template <bool kAqkImage = false>
  __device__ void scores(const uint8_t *raw, uint8_t *dst) const {
    const int product = warp >> 1;
    if ((warp & 1) == 0) {
      scores_rows<0, kAqkImage>(raw, dst, product);
    } else {
      scores_rows<1, kAqkImage>(raw, dst, product);
    }
  }
  // D. (I + L)^-1 (warp 0 only). Lanes 0-15: column j of T00, lanes 16-31: column j of T11; then the
  // merge T10 = -T11 (L10 T00) by two mma. Writes T beta (hi, lo) into the stage and T diag(beta rk).
  __device__ void invert_and_merge(uint8_t *stage) const {
    const int block = lane >> 4, j = lane & 15, b0 = kSubBlock * block;
    float col[kSubBlock];
    substitute(col, block);
    const float bj = betas()[b0 + j], rkj = norms()[kChunk + b0 + j];
    uint8_t *ta = stage + kStTa, *ta_lo = stage + kStTbetaLo;
    bf16 *tbm = tb();
#pragma unroll
    for (int i = 0; i < kSubBlock; ++i) {
      const float tv = col[i], tbeta = tv * bj;
      const bf16 hi = __float2bfloat16_rn(tbeta);
      *reinterpret_cast<bf16 *>(ta + k32_offset(kTbetaRow0 + b0 + i, b0 + j)) = hi;
      *reinterpret_cast<bf16 *>(ta_lo + k32_offset(b0 + i, b0 + j)) = __float2bfloat16_rn(tbeta - __bfloat162float(hi));
      tbm[(b0 + i) * kTbRow + b0 + j] = __float2bfloat16_rn(tbeta * rkj);
      if (block == 0) {
        t00t()[j * kTRow + i] = tv;
      } else {
        t11()[i * kTRow + j] = tv;
      }
    }
    // The upper-right 16 x 16 block of T beta is zero: lanes 0-15 clear row `lane` of the hi part,
    // lanes 16-31 row `lane - 16` of the lo part (32 bytes each, columns 16-31).
    {
      uint8_t *tile = block ? ta_lo : ta;
#pragma unroll
      for (int m = 0; m < 2; ++m)
        *reinterpret_cast<uint4 *>(tile + k32_offset(j, kSubBlock + 8 * m)) = make_uint4(0u, 0u, 0u, 0u);
    }
    __syncwarp();
    merge(ta, ta_lo);
  }

  // D, spread over the group's four warps (two_pass.cu's kInverseWarps = 4; every thread calls it, and it
  // holds one group barrier): warp 0 the forward substitution only, into T00^T and T11 (f32); then warp 0
  // the merge, warp 1 the zero block, warps 2-3 the diagonal blocks' T beta hi + lo and T diag(beta rk),
  // a row and 8 columns per thread, from the f32 T. The same operations on the same values as
  // invert_and_merge: the stage is bit-identical. T beta hi and lo go to `ta` and `ta_lo`: the stage's
  // (kStTa, kStTbetaLo), or a shared-memory image of them that a bulk copy stores. `substituted()` runs
  // on every thread after the substitution, before the barrier (two_pass.cuh's phase clock).
  template <typename Mark>
  __device__ void invert_and_merge_spread(uint8_t *ta, uint8_t *ta_lo, Mark substituted) const {
    if (warp == 0) {
      float col[kSubBlock];
      substitute(col, lane >> 4);
      store_column(col, lane >> 4);
    }
    substituted();
    sync();
    merge_and_spread(ta, ta_lo);
  }
  // Column lane % 16 of T00 (block 0, transposed: T00^T) or T11 (block 1) into shared memory.
  __device__ __forceinline__ void store_column(const float (&col)[kSubBlock], int block) const {
    const int j = lane & 15;
#pragma unroll
    for (int i = 0; i < kSubBlock; ++i) {
      if (block == 0) {
        t00t()[j * kTRow + i] = col[i];
      } else {
        t11()[i * kTRow + j] = col[i];
      }
    }
  }
  // D after the substitution (every warp; T00^T and T11 in shared memory): warp 0 the merge, warp 1 the
  // zero block, warps 2-3 the diagonal blocks' T beta hi + lo and T diag(beta rk).
  __device__ __forceinline__ void merge_and_spread(uint8_t *ta, uint8_t *ta_lo) const {
    if (warp == 0) {
      merge(ta, ta_lo);
    } else if (warp == 1) {  // rows 0-15, columns 16-31 of T beta hi (lanes 0-15) and lo (lanes 16-31)
      uint8_t *tile = lane >> 4 ? ta_lo : ta;
      const int row = (lane & 15) + (lane >> 4 ? 0 : kTbetaRow0);
#pragma unroll
      for (int m = 0; m < 2; ++m)
        *reinterpret_cast<uint4 *>(tile + k32_offset(row, kSubBlock + 8 * m)) = make_uint4(0u, 0u, 0u, 0u);
    } else {  // thread q: block q / 32, row (q / 2) % 16, columns 8 (q % 2) .. + 7 of that block
      const int q = tid - 64, block = q >> 5, i = (q >> 1) & 15, j0 = 8 * (q & 1), b0 = kSubBlock * block;
      const float *beta = betas() + b0 + j0, *rk = norms() + kChunk + b0 + j0;
      uint32_t hi[4], lo[4], tbm[4];
#pragma unroll
      for (int u = 0; u < 8; u += 2) {
        const int j = j0 + u;
        const float tv0 = block ? t11()[i * kTRow + j] : t00t()[j * kTRow + i];
        const float tv1 = block ? t11()[i * kTRow + j + 1] : t00t()[(j + 1) * kTRow + i];
        const float tb0 = tv0 * beta[u], tb1 = tv1 * beta[u + 1];
        split_bf16(tb0, tb1, hi[u / 2], lo[u / 2]);
        tbm[u / 2] = pack_bf16(tb0 * rk[u], tb1 * rk[u + 1]);
      }
      *reinterpret_cast<uint4 *>(ta + k32_offset(kTbetaRow0 + b0 + i, b0 + j0)) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
      *reinterpret_cast<uint4 *>(ta_lo + k32_offset(b0 + i, b0 + j0)) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      *reinterpret_cast<uint4 *>(tb() + (b0 + i) * kTbRow + b0 + j0) = make_uint4(tbm[0], tbm[1], tbm[2], tbm[3]);
    }
  }

  // D, the forward substitution (one warp): lane `lane` computes column lane % 16 of T00 (block 0) or T11
  // (block 1) in f32.
  __device__ __forceinline__ void substitute(float (&col)[kSubBlock], int block) const {
    const int j = lane & 15, b0 = kSubBlock * block;
    const float *L = lmat();
#pragma unroll
    for (int i = 0; i < kSubBlock; ++i) {
      const float4 *row = reinterpret_cast<const float4 *>(L + (b0 + i) * kLRow + b0);
      float acc[4] = {i == j ? 1.f : 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int m4 = 0; 4 * m4 < i; ++m4) {
        const float4 l = row[m4];
        const float lv[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (4 * m4 + u < i) acc[u] -= lv[u] * col[4 * m4 + u];
      }
      col[i] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  }

  // D, the merge (one warp, T00^T and T11 in shared memory): T10 = -T11 (L10 T00), its T beta hi + lo
  // (into `ta`, `ta_lo`) and T diag(beta rk) rows 16-31, columns 0-15.
  __device__ __forceinline__ void merge(uint8_t *ta, uint8_t *ta_lo) const {
    bf16 *tbm = tb();
    const float *L = lmat();
    // M^T = T00^T L10^T (A = T00^T row-major, B[k][n] = L10[n][k]); then T10 = -T11 M with B = M taken
    // from the M^T accumulators (register-local: b0/b1 of n tile nb = rows 8 nb + g of M^T).
    const int g = lane >> 2, t = lane & 3;
    auto pair = [](const float *p) { return pack_bf16(p[0], p[1]); };
    const float *T0 = t00t(), *T1 = t11(), *L10 = L + kSubBlock * kLRow;
    const uint32_t a0[4] = {pair(T0 + g * kTRow + 2 * t), pair(T0 + (g + 8) * kTRow + 2 * t),
                            pair(T0 + g * kTRow + 2 * t + 8), pair(T0 + (g + 8) * kTRow + 2 * t + 8)};
    float mt[2][4] = {};
    mma_m16n8k16(mt[0], a0, pair(L10 + g * kLRow + 2 * t), pair(L10 + g * kLRow + 2 * t + 8));
    mma_m16n8k16(mt[1], a0, pair(L10 + (g + 8) * kLRow + 2 * t), pair(L10 + (g + 8) * kLRow + 2 * t + 8));
    const uint32_t a1[4] = {pair(T1 + g * kTRow + 2 * t), pair(T1 + (g + 8) * kTRow + 2 * t),
                            pair(T1 + g * kTRow + 2 * t + 8), pair(T1 + (g + 8) * kTRow + 2 * t + 8)};
    float t10[2][4] = {};
    mma_m16n8k16(t10[0], a1, pack_bf16(mt[0][0], mt[0][1]), pack_bf16(mt[1][0], mt[1][1]));
    mma_m16n8k16(t10[1], a1, pack_bf16(mt[0][2], mt[0][3]), pack_bf16(mt[1][2], mt[1][3]));
    const float *beta = betas(), *rk = norms() + kChunk;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = kSubBlock + g + 8 * h, jj = 8 * nb + 2 * t;
        const float v0 = -t10[nb][2 * h] * beta[jj], v1 = -t10[nb][2 * h + 1] * beta[jj + 1];
        uint32_t hi, lo;
        split_bf16(v0, v1, hi, lo);
        *reinterpret_cast<uint32_t *>(ta + k32_offset(kTbetaRow0 + i, jj)) = hi;
        *reinterpret_cast<uint32_t *>(ta_lo + k32_offset(i, jj)) = lo;
        *reinterpret_cast<uint32_t *>(tbm + i * kTbRow + jj) = pack_bf16(v0 * rk[jj], v1 * rk[jj + 1]);
      }
    }
  }

  // E. W' = -(T diag(beta rk)) Kr diag(2^Gamma_15): warp w owns channels 32 w .. 32 w + 31 of all 32
  // rows. The upper-right block of T diag(beta rk) is zero and not stored: its product is skipped. Into
  // `wq`: the stage's WQ tile (kStWq), or a shared-memory image of its W' rows that a bulk copy stores.
  __device__ void w_product(const uint8_t *raw, uint8_t *wq) const {
    const uint8_t *kr = raw + kRawK;
    const int n0 = 32 * warp, g = lane >> 2, t = lane & 3;
    uint32_t a[2][2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
        if (mt == 1 || ks == 0) load_a_rows(tb() + 16 * mt * kTbRow, kTbRow, 16 * ks, lane, a[mt][ks]);
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        raw_load_b_kn(kr, n0 + 16 * np, 16 * ks, lane, b);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          if (mt == 0 && ks == 1) continue;
          mma_m16n8k16(acc[mt][2 * np], a[mt][ks], b[0], b[1]);
          mma_m16n8k16(acc[mt][2 * np + 1], a[mt][ks], b[2], b[3]);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int d = n0 + 8 * nt + 2 * t;
      const float2 e = *reinterpret_cast<const float2 *>(anchor_scale() + d);
      const float s0 = -e.x, s1 = -e.y;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<uint32_t *>(wq + wq_offset(kWRow0 + 16 * mt + g + 8 * h, d)) =
              pack_f16(acc[mt][nt][2 * h] * s0, acc[mt][nt][2 * h + 1] * s1);
    }
  }
};

}  // namespace chunk32
}  // namespace jax_kda
