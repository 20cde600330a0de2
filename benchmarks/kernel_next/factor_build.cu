// Go/no-go microkernel 2 of issue 10: the factor build of the planned chunk-32 KDA kernel.
//
// One CTA per chain (grid = one CTA per SM) builds the factors of 1024 chunks of 32 tokens. Two factor
// warpgroups take the chunks in turn (group f builds chunks f, f + 2, ...); a loader warp brings each
// chunk's raw bf16 q, k, g (raw gate) and beta logits into a two-slot ring per group by bulk copies
// (one 256-byte row per copy, into rows padded to 272 bytes so ldmatrix is conflict-free). Every
// feature is a template parameter: the gate (bounded, lower_bound from the launch, A_log, dt_bias;
// sigmoid as one tanh.approx or as ex2 + rcp), the L2 norm and the beta sigmoid.
//
// Per chunk and warpgroup, with Gamma the chunk-local cumulative log2-decay and one anchor, Gamma_15
// (the boundary of the two 16-token sub-blocks):
//   A  gate (1 or 2 special-function ops an element) and x_t = Gamma_t - Gamma_15 by cumulative sums
//      within each sub-block (backwards in sub-block 0), thread = (channel pair, sub-block); the inverse L2 norms of the 64 q/k rows as the diagonals of
//      16 x 16 Gram blocks on the tensor cores (raw bf16 rows, exact products); sigmoid(beta).
//   B  per element: R = 2^(Gamma_t - Gamma_15), C = 1 / R (two ex2), and the tiles
//        Qr = q R, Kr = k R, Kc = k C (bf16, written in place over the raw q, k, g),
//        Qd = scale rq q 2^Gamma_t, Kend^T = rk k 2^(Gamma_C - Gamma_t), decay 2^Gamma_C, 2^Gamma_15.
//      Off the diagonal (rows of sub-block 1, columns of sub-block 0) both exponents are <= 0; on the
//      diagonal blocks one is >= 0, at most 16 x 5 nats (2^115) with lower_bound >= -5: in range.
//      L2 norms enter the small products as row/column scales (rq_i rk_j), not per element, except
//      in Qd and Kend which are stored normalized.
//   C  scores on the tensor cores (mma.sync m16n8k16, bf16, f32 accumulate): QK and KK over 128
//      channels, the three lower 16 x 16 blocks each, one warp per (product, row block):
//        Aqk = scale rq_i rk_j (Qr Kc^T) masked j <= i  -> factor tile TA rows 32-63
//        L   = beta_i rk_i rk_j (Kr Kc^T) masked j < i  -> f32 scratch
//   D  (I + L)^-1: both 16 x 16 diagonal blocks at once on one warp (a column per lane, forward
//      substitution in f32), merged by mma: T10 = -T11 (L10 T00) (bf16 operands, two 16x16x16 products).
//      T beta -> TA rows 0-31, T diag(beta rk) -> scratch.
//   E  W' = -(T diag(beta rk)) Kr diag(2^Gamma_15) on the tensor cores (W = T beta k̂ 2^Gamma), 32 columns
//      x 32 rows a warp -> WQ rows 0-31. The raw slot is released to the loader after this phase.
// The outputs land in the factor-stage layout of layout.h (the tiles the state warpgroups read by
// wgmma); checked chunks are copied to global memory by a bulk store.
//
// Checks: the stored factors are poisoned first; the factors of chunks 0-3 and the last two of
// several CTAs are compared with the float64 reference (common_host.h, SPEC.md's chunked form),
// tolerance 1e-2 relative RMS per factor, and with a CPU emulation of this algorithm (reported).
// Timing: cudaEvents around whole launches after warm-up (median); cycles per chunk from %clock64.
#include <cstdio>
#include <memory>

#include "ptx.cuh"
#include "common_host.h"

namespace jax_kda {
namespace chunk32 {
namespace {

constexpr int kFactorGroups = 2;
constexpr int kGroupThreads = kWarpgroupThreads;
constexpr int kThreads = kFactorGroups * kGroupThreads + 32;  // + one loader warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEpsilon = 1e-6f;

// Raw inputs of one chunk (one ring slot): q, k, g rows padded to 136 bf16 (272 bytes: 16-byte
// aligned for the bulk copies, 4 banks apart for ldmatrix), then the 32 beta logits.
constexpr int kRawRow = kDimK + 8;
constexpr uint32_t kRawTileBytes = kChunk * kRawRow * kBf16Bytes;  // 8704
constexpr uint32_t kRawQ = 0, kRawK = kRawTileBytes, kRawG = 2 * kRawTileBytes, kRawBeta = 3 * kRawTileBytes;
constexpr uint32_t kRawSlotBytes = (kRawBeta + kChunk * kBf16Bytes + 127) / 128 * 128;
constexpr uint32_t kRawLoadBytes = 3 * kChunk * kDimK * kBf16Bytes + kChunk * kBf16Bytes;  // per chunk
constexpr int kRawSlots = 2;

// Scratch of a group (f32 rows padded to 16-byte multiples).
constexpr int kLRow = 36;   // L (32 x 32 f32)
constexpr int kTRow = 20;   // T00^T and T11 (16 x 16 f32)
constexpr int kTbRow = 40;  // T diag(beta rk) (32 x 32 bf16): 80-byte rows for ldmatrix
constexpr uint32_t kGroupOut = 0;  // the factor stage (1024-aligned)
constexpr uint32_t kGroupRaw = (kFactorBytes + 127) / 128 * 128;
constexpr uint32_t kGroupAnchor = kGroupRaw + kRawSlots * kRawSlotBytes;  // [128] f32: 2^Gamma_15
constexpr uint32_t kGroupSums = kGroupAnchor + kDimK * 4;        // [2 sub-blocks][128] f32, log2 units
constexpr uint32_t kGroupNorms = kGroupSums + 2 * kDimK * 4;   // [0..31] scale rq, [32..63] rk
constexpr uint32_t kGroupBeta = kGroupNorms + 2 * kChunk * 4;
constexpr uint32_t kGroupL = kGroupBeta + kChunk * 4;
constexpr uint32_t kGroupT00t = kGroupL + kChunk * kLRow * 4;
constexpr uint32_t kGroupT11 = kGroupT00t + kSubBlock * kTRow * 4;
constexpr uint32_t kGroupTb = kGroupT11 + kSubBlock * kTRow * 4;
constexpr uint32_t kGroupBytes = (kGroupTb + kChunk * kTbRow * kBf16Bytes + kSwizzleAlign - 1) / kSwizzleAlign * kSwizzleAlign;
constexpr uint32_t kBarriers = kFactorGroups * kGroupBytes;
constexpr uint32_t kSharedBytes = kBarriers + 2 * kFactorGroups * kRawSlots * 8 + kSwizzleAlign;
static_assert(kSharedBytes <= 227 * 1024, "shared memory");
static_assert(kGroupRaw % 128 == 0 && kGroupAnchor % 16 == 0 && kGroupNorms % 16 == 0 && kGroupL % 16 == 0 && kGroupTb % 16 == 0, "alignment");

constexpr int kFirstChecked = 4, kLastChecked = 2, kCheckSlots = kFirstChecked + kLastChecked;

enum class GateMath { kTanh, kExp2Reciprocal };

struct BuildParams {
  const uint16_t *q, *k, *g, *beta;  // bf16 [cta][pool_chunks][32][128] ([cta][pool_chunks][32] for beta)
  int pool_chunks;                   // chunk c reads entry c % pool_chunks of its CTA
  int chunks;                        // chunks per CTA (>= kCheckSlots)
  const float *dt_bias;              // [128]
  float a_log, lower_bound, scale;
  uint8_t *factors;                  // [cta][kCheckSlots][kFactorBytes]: stages of the checked chunks
  long long *cycles;                 // [cta]
};

__device__ __forceinline__ int check_slot(int c, int chunks) {
  if (c < kFirstChecked) return c;
  if (c >= chunks - kLastChecked) return kFirstChecked + c - (chunks - kLastChecked);
  return -1;
}

template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
struct FactorGroup {
  uint8_t *base;  // this group's shared memory
  int group, tid, warp, lane;
  int half, d0;   // elementwise role: sub-block (tokens 16 half ..) and channel pair (d0, d0 + 1)
  float gate_mul, gate_add[2], gate_out;
  float scale;

  __device__ uint8_t *out() const { return base + kGroupOut; }
  __device__ float *sums() const { return reinterpret_cast<float *>(base + kGroupSums); }
  __device__ float *norms() const { return reinterpret_cast<float *>(base + kGroupNorms); }
  __device__ float *betas() const { return reinterpret_cast<float *>(base + kGroupBeta); }
  __device__ float *lmat() const { return reinterpret_cast<float *>(base + kGroupL); }
  __device__ float *t00t() const { return reinterpret_cast<float *>(base + kGroupT00t); }
  __device__ float *t11() const { return reinterpret_cast<float *>(base + kGroupT11); }
  __device__ bf16 *tb() const { return reinterpret_cast<bf16 *>(base + kGroupTb); }
  __device__ float *anchor_scale() const { return reinterpret_cast<float *>(base + kGroupAnchor); }  // 2^Gamma_15
  __device__ void sync() const { named_barrier(1 + group, kGroupThreads); }

  // Gate constants of this thread's two channels, in log2 units: a2 = lower_bound log2(e) sigmoid(A (g + b)).
  __device__ void load_gate(const BuildParams &p) {
    const float a = expf(p.a_log);
    for (int ch = 0; ch < 2; ++ch) {
      const float bias = p.dt_bias[d0 + ch];
      if (kGate == GateMath::kTanh) {  // sigmoid(z) = (1 + tanh(z / 2)) / 2
        gate_add[ch] = 0.5f * a * bias;
      } else {  // sigmoid(z) = 1 / (1 + 2^(-z log2 e))
        gate_add[ch] = -a * kLog2e * bias;
      }
    }
    gate_mul = kGate == GateMath::kTanh ? 0.5f * a : -a * kLog2e;
    gate_out = kGate == GateMath::kTanh ? 0.5f * p.lower_bound * kLog2e : p.lower_bound * kLog2e;
    scale = p.scale;
  }
  __device__ __forceinline__ float log2_decay(float g, int ch) const {
    const float z = fmaf(g, gate_mul, gate_add[ch]);
    if (kGate == GateMath::kTanh) return fmaf(tanh_approx(z), gate_out, gate_out);
    return gate_out * reciprocal_approx(1.f + exp2_approx(z));
  }

  // A. Gate, and x_t = Gamma_t - Gamma_15 (log2) for this thread's 16 tokens: sub-block 1 sums forward
  // from token 16, sub-block 0 sums backward from token 15 (x_t = -(a_{t+1} + ... + a_15)), so neither
  // needs a subtraction per element. Sub-block totals (Gamma_15, Gamma_31 - Gamma_15) -> sums.
  __device__ void gate_and_offsets(const uint8_t *raw, float (&x)[kSubBlock][2]) const {
    const bf16 *g = reinterpret_cast<const bf16 *>(raw + kRawG) + (kSubBlock * half) * kRawRow + d0;
    float run0 = 0.f, run1 = 0.f;
    if (half == 1) {
#pragma unroll
      for (int j = 0; j < kSubBlock; ++j) {
        const uint32_t bits = *reinterpret_cast<const uint32_t *>(g + j * kRawRow);
        run0 += log2_decay(bf16_low(bits), 0);
        run1 += log2_decay(bf16_high(bits), 1);
        x[j][0] = run0;
        x[j][1] = run1;
      }
    } else {
#pragma unroll
      for (int j = kSubBlock - 1; j >= 0; --j) {
        x[j][0] = run0;
        x[j][1] = run1;
        const uint32_t bits = *reinterpret_cast<const uint32_t *>(g + j * kRawRow);
        run0 -= log2_decay(bf16_low(bits), 0);
        run1 -= log2_decay(bf16_high(bits), 1);
      }
      run0 = -run0;  // Gamma_15
      run1 = -run1;
    }
    *reinterpret_cast<float2 *>(sums() + half * kDimK + d0) = make_float2(run0, run1);
  }

  // A. Inverse L2 norms: warp (tile, row block) forms the 16 x 16 Gram block X X^T of its rows
  // (B fragments of X^T are the A fragment registers: b0/b1 of n tile 0 = a0/a2, of n tile 1 = a1/a3)
  // and keeps the diagonal. norms[0..31] = scale rq, norms[32..63] = rk.
  __device__ void row_norms(const uint8_t *raw) const {
    const int tile = warp >> 1, row_block = warp & 1;
    const bf16 *x = reinterpret_cast<const bf16 *>(raw + (tile ? kRawK : kRawQ)) + kSubBlock * row_block * kRawRow;
    float acc[2][4] = {};
#pragma unroll
    for (int kb = 0; kb < kDimK / 16; ++kb) {
      uint32_t a[4];
      load_a_rows(x, kRawRow, 16 * kb, lane, a);
      mma_m16n8k16(acc[0], a, a[0], a[2]);
      mma_m16n8k16(acc[1], a, a[1], a[3]);
    }
    // Diagonal element (r, r): row g = lane / 4 (+8), column 2 (lane % 4) + e (+8): held where g - 2 t = e in {0, 1}.
    const int g = lane >> 2, t = lane & 3, e = g - 2 * t;
    if (e == 0 || e == 1) {
      const float top = e ? acc[0][1] : acc[0][0], bottom = e ? acc[1][3] : acc[1][2];
      const float factor = tile == 0 ? scale : 1.f;
      float *dst = norms() + tile * kChunk + kSubBlock * row_block + g;
      dst[0] = (kL2Norm ? rsqrt_approx(top + kNormEpsilon) : 1.f) * factor;
      dst[8] = (kL2Norm ? rsqrt_approx(bottom + kNormEpsilon) : 1.f) * factor;
    }
  }

  __device__ void write_betas(const uint8_t *raw) const {
    if (tid < kChunk) {
      const float x = __bfloat162float(reinterpret_cast<const bf16 *>(raw + kRawBeta)[tid]);
      betas()[tid] = kBetaSigmoid ? reciprocal_approx(1.f + exp2_approx(-x * kLog2e)) : x;
    }
  }

  // B. The elementwise factors of this thread's 16 tokens x 2 channels.
  __device__ void elementwise_factors(uint8_t *raw, const float (&x)[kSubBlock][2]) const {
    bf16 *q = reinterpret_cast<bf16 *>(raw + kRawQ) + kSubBlock * half * kRawRow + d0;
    bf16 *k = reinterpret_cast<bf16 *>(raw + kRawK) + kSubBlock * half * kRawRow + d0;
    bf16 *kc = reinterpret_cast<bf16 *>(raw + kRawG) + kSubBlock * half * kRawRow + d0;  // over the consumed g
    uint8_t *o = out();
    const float2 first = *reinterpret_cast<const float2 *>(sums() + d0);           // Gamma_15
    const float2 second = *reinterpret_cast<const float2 *>(sums() + kDimK + d0);  // Gamma_31 - Gamma_15
    const float e15[2] = {exp2_approx(first.x), exp2_approx(first.y)};
    const float e_rest[2] = {exp2_approx(second.x), exp2_approx(second.y)};
    if (half == 1) {
      *reinterpret_cast<float2 *>(o + kStageDecay + 4 * d0) = make_float2(e15[0] * e_rest[0], e15[1] * e_rest[1]);
    } else {
      *reinterpret_cast<float2 *>(anchor_scale() + d0) = make_float2(e15[0], e15[1]);
    }
    float rq[kSubBlock], rk[kSubBlock];  // 16-byte loads (the group's scratch is 16-byte aligned)
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
      const float x0 = x[j][0], x1 = x[j][1];  // Gamma_t - Gamma_15 (log2)
      const float r0 = exp2_approx(x0), r1 = exp2_approx(x1), c0 = exp2_approx(-x0), c1 = exp2_approx(-x1);
      const uint32_t qb = *reinterpret_cast<const uint32_t *>(q + j * kRawRow);
      const uint32_t kb = *reinterpret_cast<const uint32_t *>(k + j * kRawRow);
      const float qr0 = bf16_low(qb) * r0, qr1 = bf16_high(qb) * r1;
      const float kr0 = bf16_low(kb) * r0, kr1 = bf16_high(kb) * r1;
      const float kc0 = bf16_low(kb) * c0, kc1 = bf16_high(kb) * c1;
      *reinterpret_cast<uint32_t *>(q + j * kRawRow) = pack_bf16(qr0, qr1);
      *reinterpret_cast<uint32_t *>(k + j * kRawRow) = pack_bf16(kr0, kr1);
      *reinterpret_cast<uint32_t *>(kc + j * kRawRow) = pack_bf16(kc0, kc1);
      const float qs = rq[j], ks = rk[j];
      *reinterpret_cast<uint32_t *>(o + kStageWq + wq_offset(kQdRow0 + t, d0)) =
          pack_bf16(qr0 * e15[0] * qs, qr1 * e15[1] * qs);
      const float kend0 = kc0 * e_rest[0] * ks, kend1 = kc1 * e_rest[1] * ks;
      if (j % 2 == 0) {
        kend_even[0] = kend0;
        kend_even[1] = kend1;
      } else {
        kend[0][j / 2] = pack_bf16(kend_even[0], kend0);
        kend[1][j / 2] = pack_bf16(kend_even[1], kend1);
      }
    }
    // Kend^T rows d0, d0 + 1: this thread's 16 tokens are two 16-byte chunks of each row.
#pragma unroll
    for (int ch = 0; ch < 2; ++ch)
#pragma unroll
      for (int m = 0; m < 2; ++m)
        *reinterpret_cast<uint4 *>(o + kStageKend + k32_offset(d0 + ch, kSubBlock * half + 8 * m)) =
            make_uint4(kend[ch][4 * m], kend[ch][4 * m + 1], kend[ch][4 * m + 2], kend[ch][4 * m + 3]);
  }

  // C. Scores. Warp (product, row block): product 0 = Q, 1 = K; rows 16 rb..; columns 0-15 (rb 0) or 0-31.
  __device__ void scores(const uint8_t *raw) const {
    const int product = warp >> 1, row_block = warp & 1;
    const bf16 *rows = reinterpret_cast<const bf16 *>(raw + (product ? kRawK : kRawQ)) + kSubBlock * row_block * kRawRow;
    const bf16 *cols = reinterpret_cast<const bf16 *>(raw + kRawG);
    float acc[4][4] = {};
#pragma unroll
    for (int kb = 0; kb < kDimK / 16; ++kb) {
      uint32_t a[4], b[4];
      load_a_rows(rows, kRawRow, 16 * kb, lane, a);
      load_b_from_nk(cols, kRawRow, 0, 16 * kb, lane, b);
      mma_m16n8k16(acc[0], a, b[0], b[1]);
      mma_m16n8k16(acc[1], a, b[2], b[3]);
      if (row_block == 1) {
        load_b_from_nk(cols, kRawRow, kSubBlock, 16 * kb, lane, b);
        mma_m16n8k16(acc[2], a, b[0], b[1]);
        mma_m16n8k16(acc[3], a, b[2], b[3]);
      }
    }
    const int g = lane >> 2, t = lane & 3;
    const float *rq = norms(), *rk = norms() + kChunk;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = kSubBlock * row_block + g + 8 * h, j = 8 * nt + 2 * t;  // j > i whenever nt >= 2, rb 0
        const float v0 = acc[nt][2 * h], v1 = acc[nt][2 * h + 1];
        if (product == 0) {
          const float s = rq[i];
          *reinterpret_cast<uint32_t *>(out() + kStageTa + k32_offset(kAqkRow0 + i, j)) =
              pack_bf16(j <= i ? v0 * s * rk[j] : 0.f, j + 1 <= i ? v1 * s * rk[j + 1] : 0.f);
        } else {
          const float s = betas()[i] * rk[i];
          *reinterpret_cast<float2 *>(lmat() + i * kLRow + j) =
              make_float2(j < i ? v0 * s * rk[j] : 0.f, j + 1 < i ? v1 * s * rk[j + 1] : 0.f);
        }
      }
    }
  }

  // The upper-right 16 x 16 blocks of T beta (tile TA) and of T diag(beta rk) are zero in every chunk
  // and nothing else writes them: written once, before the first chunk.
  __device__ void zero_upper_blocks() const {
    for (int e = tid; e < kSubBlock * kSubBlock; e += kGroupThreads) {
      const int i = e / kSubBlock, j = kSubBlock + e % kSubBlock;
      *reinterpret_cast<bf16 *>(out() + kStageTa + k32_offset(kTbetaRow0 + i, j)) = __float2bfloat16_rn(0.f);
      tb()[i * kTbRow + j] = __float2bfloat16_rn(0.f);
    }
  }

  // D. (I + L)^-1 (warp 0 only). Lanes 0-15: column j of T00, lanes 16-31: column j of T11.
  __device__ void invert_and_merge() const {
    const int block = lane >> 4, j = lane & 15, b0 = kSubBlock * block;
    const float *L = lmat();
    float col[kSubBlock];
#pragma unroll
    for (int i = 0; i < kSubBlock; ++i) {
      const float4 *row = reinterpret_cast<const float4 *>(L + (b0 + i) * kLRow + b0);  // 16-byte aligned rows
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
    const float bj = betas()[b0 + j], rkj = norms()[kChunk + b0 + j];
    uint8_t *ta = out() + kStageTa;
    bf16 *tbm = tb();
#pragma unroll
    for (int i = 0; i < kSubBlock; ++i) {
      const float tv = col[i];
      *reinterpret_cast<bf16 *>(ta + k32_offset(kTbetaRow0 + b0 + i, b0 + j)) = __float2bfloat16_rn(tv * bj);
      tbm[(b0 + i) * kTbRow + b0 + j] = __float2bfloat16_rn(tv * bj * rkj);
      if (block == 0) {
        t00t()[j * kTRow + i] = tv;
      } else {
        t11()[i * kTRow + j] = tv;
      }
    }
    __syncwarp();
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
        *reinterpret_cast<uint32_t *>(ta + k32_offset(kTbetaRow0 + i, jj)) = pack_bf16(v0, v1);
        *reinterpret_cast<uint32_t *>(tbm + i * kTbRow + jj) = pack_bf16(v0 * rk[jj], v1 * rk[jj + 1]);
      }
    }
  }

  // E. W' = -(T diag(beta rk)) Kr diag(2^Gamma_15) (Kr = k 2^(Gamma_t - Gamma_15), in place over the raw k):
  // warp w owns channels 32 w .. 32 w + 31 of all 32 rows.
  __device__ void w_product(const uint8_t *raw) const {
    const bf16 *kr = reinterpret_cast<const bf16 *>(raw + kRawK);
    const int n0 = 32 * warp, g = lane >> 2, t = lane & 3;
    uint32_t a[2][2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) load_a_rows(tb() + 16 * mt * kTbRow, kTbRow, 16 * ks, lane, a[mt][ks]);
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        load_b_from_kn(kr, kRawRow, n0 + 16 * np, 16 * ks, lane, b);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
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
          *reinterpret_cast<uint32_t *>(out() + kStageWq + wq_offset(kWRow0 + 16 * mt + g + 8 * h, d)) =
              pack_bf16(acc[mt][nt][2 * h] * s0, acc[mt][nt][2 * h + 1] * s1);
    }
  }
};

template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__device__ void run_factor_group(const BuildParams &p, uint8_t *smem, uint64_t *raw_full, uint64_t *raw_empty,
                                 int group) {
  FactorGroup<kGate, kL2Norm, kBetaSigmoid> fg;
  fg.base = smem + group * kGroupBytes;
  fg.group = group;
  fg.tid = threadIdx.x % kGroupThreads;
  fg.warp = fg.tid / 32;
  fg.lane = fg.tid % 32;
  fg.half = fg.warp >> 1;
  fg.d0 = 2 * (((fg.warp & 1) << 5) | fg.lane);
  fg.load_gate(p);
  fg.zero_upper_blocks();  // ordered before their readers by the group barriers of the first chunk
  const long long start = clock_cycles();
  for (int c = group, it = 0; c < p.chunks; c += kFactorGroups, ++it) {
    const int slot = it % kRawSlots;
    uint8_t *raw = fg.base + kGroupRaw + slot * kRawSlotBytes;
    mbarrier_wait(&raw_full[group * kRawSlots + slot], (it / kRawSlots) & 1);
    float x[kSubBlock][2];
    fg.gate_and_offsets(raw, x);
    fg.row_norms(raw);
    fg.write_betas(raw);
    fg.sync();
    fg.elementwise_factors(raw, x);
    fence_proxy_async();  // raw (rewritten in place) is refilled by the copy engine; outputs are bulk-stored
    fg.sync();
    fg.scores(raw);
    fg.sync();
    if (fg.warp == 0) fg.invert_and_merge();
    fg.sync();
    fg.w_product(raw);
    fence_proxy_async();
    fg.sync();
    if (fg.tid == 0) mbarrier_arrive(&raw_empty[group * kRawSlots + slot]);  // raw slot free for the loader
    const int check = check_slot(c, p.chunks);
    if (fg.tid == 0 && check >= 0) {
      bulk_copy_to_global(p.factors + (size_t(blockIdx.x) * kCheckSlots + check) * kFactorBytes, fg.out(), kFactorBytes);
      bulk_commit();
      bulk_wait_read();  // the next chunk rewrites the outputs after the group's next barrier
    }
  }
  if (fg.tid == 0) bulk_wait_all();
  const long long stop = clock_cycles();
  if (threadIdx.x == 0) p.cycles[blockIdx.x] = stop - start;
}

__device__ void load_raw_chunks(const BuildParams &p, uint8_t *smem, uint64_t *raw_full, uint64_t *raw_empty) {
  const int lane = threadIdx.x % 32;
  for (int c = 0; c < p.chunks; ++c) {
    const int group = c % kFactorGroups, it = c / kFactorGroups, slot = it % kRawSlots, use = it / kRawSlots;
    uint64_t *full = &raw_full[group * kRawSlots + slot];
    if (use > 0) mbarrier_wait(&raw_empty[group * kRawSlots + slot], (use - 1) & 1);
    if (lane == 0) mbarrier_arrive_expect_bytes(full, kRawLoadBytes);
    __syncwarp();
    const size_t chunk = size_t(blockIdx.x) * p.pool_chunks + c % p.pool_chunks;
    uint8_t *raw = smem + group * kGroupBytes + kGroupRaw + slot * kRawSlotBytes;
    const size_t row = (chunk * kChunk + lane) * kDimK;
    constexpr uint32_t kRowBytes = kDimK * kBf16Bytes;
    bulk_copy_to_shared(raw + kRawQ + lane * kRawRow * kBf16Bytes, p.q + row, kRowBytes, full);
    bulk_copy_to_shared(raw + kRawK + lane * kRawRow * kBf16Bytes, p.k + row, kRowBytes, full);
    bulk_copy_to_shared(raw + kRawG + lane * kRawRow * kBf16Bytes, p.g + row, kRowBytes, full);
    if (lane == 0) bulk_copy_to_shared(raw + kRawBeta, p.beta + chunk * kChunk, kChunk * kBf16Bytes, full);
  }
}

// KN_FACTOR_MAX_REGS (a build flag) caps the registers a thread, as two factor warpgroups beside two
// state warpgroups would have them in the full kernel (setmaxnreg), to see the cost of that budget.
#if defined(KN_FACTOR_MAX_REGS)
#define KN_FACTOR_BOUNDS __maxnreg__(KN_FACTOR_MAX_REGS)
#else
#define KN_FACTOR_BOUNDS __launch_bounds__(kThreads, 1)
#endif

template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__global__ void KN_FACTOR_BOUNDS factor_build_kernel(const __grid_constant__ BuildParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = smem_raw + ((kSwizzleAlign - (smem_address(smem_raw) & (kSwizzleAlign - 1))) & (kSwizzleAlign - 1));
  uint64_t *raw_full = reinterpret_cast<uint64_t *>(smem + kBarriers);
  uint64_t *raw_empty = raw_full + kFactorGroups * kRawSlots;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kFactorGroups * kRawSlots; ++i) {
      mbarrier_init(&raw_full[i], 1);
      mbarrier_init(&raw_empty[i], 1);
    }
    fence_barrier_init();
  }
  __syncthreads();
  const int warpgroup = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / kGroupThreads, 0);
  if (warpgroup == kFactorGroups) {
    load_raw_chunks(p, smem, raw_full, raw_empty);
    return;
  }
  run_factor_group<kGate, kL2Norm, kBetaSigmoid>(p, smem, raw_full, raw_empty, warpgroup);
}

// Deterministic inputs: uniform in [lo, hi), as bf16, from a hash of the element index.
__global__ void fill_uniform_bf16(uint16_t *dst, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9E3779B1u ^ uint32_t(i >> 32) * 0x85EBCA77u ^ seed;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    const float u = lo + (hi - lo) * float(h >> 8) * (1.f / 16777216.f);
    const __nv_bfloat16 b = __float2bfloat16_rn(u);
    dst[i] = *reinterpret_cast<const uint16_t *>(&b);
  }
}

// ---- host ---------------------------------------------------------------------------------------

// The kernel's algorithm on the CPU in float (same anchor, same bf16 rounding points, same merge),
// exact exp2/tanh instead of the approximate instructions. Output in reference units (W, not W').
void emulate_factor_build(const ChunkInputs &in, const GateParams &gp, GateMath gate, ChunkFactors &f) {
  static thread_local float lc[kChunk][kDimK], qr[kChunk][kDimK], kr[kChunk][kDimK], kc[kChunk][kDimK];
  float anchor[kDimK];  // 2^Gamma_15
  auto r16 = [](float x) { return bf16_value(bf16_bits(x)); };
  const float a = std::exp(float(gp.a_log)), lb2 = float(gp.lower_bound) * kLog2e;
  float sums[2][kDimK], rq[kChunk], rk[kChunk], beta[kChunk];
  for (int d = 0; d < kDimK; ++d) {
    for (int h = 0; h < 2; ++h) {
      float run = 0.f;
      for (int j = 0; j < kSubBlock; ++j) {
        const float z = a * (in.g[kSubBlock * h + j][d] + float(gp.dt_bias[d]));
        run += gate == GateMath::kTanh ? 0.5f * lb2 * (1.f + std::tanh(0.5f * z)) : lb2 / (1.f + std::exp2(-z * kLog2e));
        lc[kSubBlock * h + j][d] = run;
      }
      sums[h][d] = run;
    }
  }
  for (int t = 0; t < kChunk; ++t) {
    float sq = 0.f, sk = 0.f;
    for (int d = 0; d < kDimK; ++d) sq += in.q[t][d] * in.q[t][d], sk += in.k[t][d] * in.k[t][d];
    rq[t] = (gp.l2norm ? 1.f / std::sqrt(sq + kNormEpsilon) : 1.f) * float(gp.scale);
    rk[t] = gp.l2norm ? 1.f / std::sqrt(sk + kNormEpsilon) : 1.f;
    beta[t] = gp.beta_sigmoid ? 1.f / (1.f + std::exp(-in.beta[t])) : in.beta[t];
  }
  for (int t = 0; t < kChunk; ++t) {
    for (int d = 0; d < kDimK; ++d) {
      const float x = t >= kSubBlock ? lc[t][d] : lc[t][d] - sums[0][d];
      const float r = std::exp2(x), c = std::exp2(-x), e15 = std::exp2(sums[0][d]), e_rest = std::exp2(sums[1][d]);
      qr[t][d] = r16(in.q[t][d] * r);
      kr[t][d] = r16(in.k[t][d] * r);
      kc[t][d] = r16(in.k[t][d] * c);
      f.qd[t][d] = r16(in.q[t][d] * r * e15 * rq[t]);
      f.kend[t][d] = r16(in.k[t][d] * c * e_rest * rk[t]);
      if (t == 0) f.decay[d] = e15 * e_rest, anchor[d] = e15;
    }
  }
  float L[kChunk][kChunk] = {}, T[kChunk][kChunk] = {};
  for (int i = 0; i < kChunk; ++i) {
    for (int j = 0; j < kChunk; ++j) {
      float qk = 0.f, kk = 0.f;
      for (int d = 0; d < kDimK; ++d) qk += qr[i][d] * kc[j][d], kk += kr[i][d] * kc[j][d];
      f.aqk[i][j] = j <= i ? r16(qk * rq[i] * rk[j]) : 0.0;
      L[i][j] = j < i ? kk * beta[i] * rk[i] * rk[j] : 0.f;
    }
  }
  for (int b = 0; b < 2; ++b) {  // diagonal blocks, forward substitution
    const int o = kSubBlock * b;
    for (int j = 0; j < kSubBlock; ++j)
      for (int i = 0; i < kSubBlock; ++i) {
        float x = i == j ? 1.f : 0.f;
        for (int m = 0; m < i; ++m) x -= L[o + i][o + m] * T[o + m][o + j];
        T[o + i][o + j] = x;
      }
  }
  float M[kSubBlock][kSubBlock];  // M = L10 T00 with bf16 operands, then T10 = -T11 M likewise
  for (int i = 0; i < kSubBlock; ++i)
    for (int j = 0; j < kSubBlock; ++j) {
      float x = 0.f;
      for (int m = 0; m < kSubBlock; ++m) x += r16(L[kSubBlock + i][m]) * r16(T[m][j]);
      M[i][j] = x;
    }
  for (int i = 0; i < kSubBlock; ++i)
    for (int j = 0; j < kSubBlock; ++j) {
      float x = 0.f;
      for (int m = 0; m < kSubBlock; ++m) x += r16(T[kSubBlock + i][kSubBlock + m]) * r16(M[m][j]);
      T[kSubBlock + i][j] = -x;
    }
  for (int i = 0; i < kChunk; ++i)
    for (int j = 0; j < kChunk; ++j) f.tbeta[i][j] = r16(T[i][j] * beta[j]);
  for (int i = 0; i < kChunk; ++i)
    for (int d = 0; d < kDimK; ++d) {
      float x = 0.f;
      for (int j = 0; j < kChunk; ++j) x += r16(T[i][j] * beta[j] * rk[j]) * kr[j][d];
      f.w[i][d] = r16(x * anchor[d]);
    }
}

// The stored factors of one chunk (a factor-stage image) in reference units.
void decode_factors(const uint8_t *image, ChunkFactors &f, long long &poisoned) {
  auto get = [&](uint32_t offset) {
    uint16_t b;
    memcpy(&b, image + offset, 2);
    poisoned += b == kBf16Poison;
    return double(bf16_value(b));
  };
  for (int t = 0; t < kChunk; ++t) {
    for (int d = 0; d < kDimK; ++d) {
      f.w[t][d] = -get(kStageWq + wq_offset(kWRow0 + t, d));
      f.qd[t][d] = get(kStageWq + wq_offset(kQdRow0 + t, d));
      f.kend[t][d] = get(kStageKend + k32_offset(d, t));
    }
    for (int j = 0; j < kChunk; ++j) {
      f.tbeta[t][j] = get(kStageTa + k32_offset(kTbetaRow0 + t, j));
      f.aqk[t][j] = get(kStageTa + k32_offset(kAqkRow0 + t, j));
    }
  }
  for (int d = 0; d < kDimK; ++d) {
    float x;
    memcpy(&x, image + kStageDecay + 4 * d, 4);
    poisoned += !std::isfinite(x);
    f.decay[d] = x;
  }
}

struct FactorErrors {
  ErrorStats w, qd, kend, decay, tbeta, aqk;
  void add(const ChunkFactors &got, const ChunkFactors &want) {
    for (int t = 0; t < kChunk; ++t) {
      for (int d = 0; d < kDimK; ++d) {
        w.add(got.w[t][d], want.w[t][d]);
        qd.add(got.qd[t][d], want.qd[t][d]);
        kend.add(got.kend[t][d], want.kend[t][d]);
      }
      for (int j = 0; j < kChunk; ++j) {
        tbeta.add(got.tbeta[t][j], want.tbeta[t][j]);
        aqk.add(got.aqk[t][j], want.aqk[t][j]);
      }
    }
    for (int d = 0; d < kDimK; ++d) decay.add(got.decay[d], want.decay[d]);
  }
  double worst() const {
    return std::max({w.relative_rms(), qd.relative_rms(), kend.relative_rms(), decay.relative_rms(),
                     tbeta.relative_rms(), aqk.relative_rms()});
  }
  void print(const char *label) const {
    printf("  %-22s W %.2e  Qd %.2e  Kend %.2e  decay %.2e  Tbeta %.2e  Aqk %.2e\n", label, w.relative_rms(),
           qd.relative_rms(), kend.relative_rms(), decay.relative_rms(), tbeta.relative_rms(), aqk.relative_rms());
  }
};

GateParams make_gate_params() {
  GateParams gp;
  Generator gen(7);
  gp.a_log = 0.3;  // A = 1.35
  for (int d = 0; d < kDimK; ++d) gp.dt_bias[d] = gen.uniform(-2.0, 2.0);
  return gp;
}

void random_chunk(Generator &gen, ChunkInputs &in) {
  for (int t = 0; t < kChunk; ++t) {
    for (int d = 0; d < kDimK; ++d) {
      in.q[t][d] = gen.uniform_bf16(-1, 1);
      in.k[t][d] = gen.uniform_bf16(-1, 1);
      in.g[t][d] = gen.uniform_bf16(-3, 3);
    }
    in.beta[t] = gen.uniform_bf16(-3, 3);
  }
}

using KernelFn = void (*)(BuildParams);
struct Variant {
  const char *name;
  GateMath gate;
  KernelFn kernel;
};

}  // namespace
}  // namespace chunk32
}  // namespace jax_kda

int main(int argc, char **argv) {
  using namespace jax_kda::chunk32;
  const GateParams gp = make_gate_params();
  if (int_option(argc, argv, "--host-check", 0)) {  // CPU only: the algorithm (emulated) against float64
    Generator gen(11);
    auto in = std::make_unique<ChunkInputs>();
    auto ref = std::make_unique<ChunkFactors>(), emu = std::make_unique<ChunkFactors>();
    bool ok = true;
    for (GateMath gate : {GateMath::kTanh, GateMath::kExp2Reciprocal}) {
      FactorErrors err;
      for (int c = 0; c < int_option(argc, argv, "--chunks", 16); ++c) {
        random_chunk(gen, *in);
        reference_factors(*in, gp, *ref);
        emulate_factor_build(*in, gp, gate, *emu);
        err.add(*emu, *ref);
      }
      err.print(gate == GateMath::kTanh ? "emulated (tanh) vs f64" : "emulated (ex2) vs f64");
      ok = ok && err.worst() < 1e-2;
    }
    printf("host check: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }

  const DeviceInfo info = device_info();
  const int chunks = int_option(argc, argv, "--chunks", 1024);
  const int ctas = int_option(argc, argv, "--ctas", info.multiprocessors);
  const int reps = int_option(argc, argv, "--reps", 10);
  const int warmup = int_option(argc, argv, "--warmup", 3);
  const int small_pool = int_option(argc, argv, "--small-pool", 8);
  const int only_check = int_option(argc, argv, "--only-check", 0);
  if (chunks < kCheckSlots) {
    fprintf(stderr, "--chunks must be at least %d\n", kCheckSlots);
    return 2;
  }
  printf("factor_build: %s, %d SMs, max SM clock %.0f MHz; %d CTAs x %d chunks, %u B shared memory\n",
         info.name.c_str(), info.multiprocessors, info.clock_khz / 1e3, ctas, chunks, kSharedBytes);

  // Inputs: every CTA its own chain of `chunks` chunks (HBM traffic as in the real kernel).
  const size_t tile_elems = size_t(ctas) * chunks * kChunk * kDimK, beta_elems = size_t(ctas) * chunks * kChunk;
  uint16_t *q, *k, *g, *beta;
  KN_CHECK(cudaMalloc(&q, tile_elems * 2));
  KN_CHECK(cudaMalloc(&k, tile_elems * 2));
  KN_CHECK(cudaMalloc(&g, tile_elems * 2));
  KN_CHECK(cudaMalloc(&beta, beta_elems * 2));
  fill_uniform_bf16<<<1024, 256>>>(q, tile_elems, 1, -1.f, 1.f);
  fill_uniform_bf16<<<1024, 256>>>(k, tile_elems, 2, -1.f, 1.f);
  fill_uniform_bf16<<<1024, 256>>>(g, tile_elems, 3, -3.f, 3.f);
  fill_uniform_bf16<<<1024, 256>>>(beta, beta_elems, 4, -3.f, 3.f);
  KN_CHECK(cudaGetLastError());
  std::vector<float> dt_bias_host(kDimK);
  for (int d = 0; d < kDimK; ++d) dt_bias_host[d] = float(gp.dt_bias[d]);
  float *dt_bias;
  KN_CHECK(cudaMalloc(&dt_bias, kDimK * 4));
  KN_CHECK(cudaMemcpy(dt_bias, dt_bias_host.data(), kDimK * 4, cudaMemcpyHostToDevice));
  uint8_t *factors;
  const size_t factor_bytes = size_t(ctas) * kCheckSlots * kFactorBytes;
  KN_CHECK(cudaMalloc(&factors, factor_bytes));
  long long *cycles;
  KN_CHECK(cudaMalloc(&cycles, ctas * sizeof(long long)));

  BuildParams p;
  p.q = q, p.k = k, p.g = g, p.beta = beta;
  p.pool_chunks = chunks;
  p.chunks = chunks;
  p.dt_bias = dt_bias;
  p.a_log = float(gp.a_log), p.lower_bound = float(gp.lower_bound), p.scale = float(gp.scale);
  p.factors = factors;
  p.cycles = cycles;

  const Variant variants[] = {
      {"tanh gate", GateMath::kTanh, factor_build_kernel<GateMath::kTanh, true, true>},
      {"ex2+rcp gate", GateMath::kExp2Reciprocal, factor_build_kernel<GateMath::kExp2Reciprocal, true, true>},
  };
  for (const Variant &v : variants)
    KN_CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSharedBytes)));
  auto launch = [&](const Variant &v, const BuildParams &bp) {
    v.kernel<<<ctas, kThreads, kSharedBytes>>>(bp);
    KN_CHECK(cudaGetLastError());
  };

  bool all_pass = true;
  const int check_ctas[] = {0, ctas / 2, ctas - 1};
  printf("\n%-14s %-12s %11s %11s %10s %10s %5s\n", "variant", "inputs", "us/chunk/SM", "cyc/chunk", "err f64",
         "err emul", "check");
  for (const Variant &v : variants) {
    // Correctness: poison, one launch, compare the checked chunks of three CTAs.
    KN_CHECK(cudaMemset(factors, 0xFF, factor_bytes));
    launch(v, p);
    KN_CHECK(cudaDeviceSynchronize());
    std::vector<uint8_t> image(factor_bytes);
    KN_CHECK(cudaMemcpy(image.data(), factors, factor_bytes, cudaMemcpyDeviceToHost));
    FactorErrors vs_ref, vs_emu;
    long long poisoned = 0;
    auto in = std::make_unique<ChunkInputs>();
    auto ref = std::make_unique<ChunkFactors>(), emu = std::make_unique<ChunkFactors>(),
         got = std::make_unique<ChunkFactors>();
    for (int cta : check_ctas) {
      for (int slot = 0; slot < kCheckSlots; ++slot) {
        const int c = slot < kFirstChecked ? slot : chunks - kLastChecked + (slot - kFirstChecked);
        const size_t chunk = size_t(cta) * chunks + c;
        std::vector<uint16_t> tq(kChunk * kDimK), tk(kChunk * kDimK), tg(kChunk * kDimK), tb(kChunk);
        KN_CHECK(cudaMemcpy(tq.data(), q + chunk * kChunk * kDimK, tq.size() * 2, cudaMemcpyDeviceToHost));
        KN_CHECK(cudaMemcpy(tk.data(), k + chunk * kChunk * kDimK, tk.size() * 2, cudaMemcpyDeviceToHost));
        KN_CHECK(cudaMemcpy(tg.data(), g + chunk * kChunk * kDimK, tg.size() * 2, cudaMemcpyDeviceToHost));
        KN_CHECK(cudaMemcpy(tb.data(), beta + chunk * kChunk, tb.size() * 2, cudaMemcpyDeviceToHost));
        for (int t = 0; t < kChunk; ++t) {
          for (int d = 0; d < kDimK; ++d) {
            in->q[t][d] = bf16_value(tq[t * kDimK + d]);
            in->k[t][d] = bf16_value(tk[t * kDimK + d]);
            in->g[t][d] = bf16_value(tg[t * kDimK + d]);
          }
          in->beta[t] = bf16_value(tb[t]);
        }
        reference_factors(*in, gp, *ref);
        emulate_factor_build(*in, gp, v.gate, *emu);
        decode_factors(image.data() + (size_t(cta) * kCheckSlots + slot) * kFactorBytes, *got, poisoned);
        vs_ref.add(*got, *ref);
        vs_emu.add(*got, *emu);
      }
    }
    constexpr double kTolerance = 1e-2;
    const bool pass = poisoned == 0 && vs_ref.worst() < kTolerance;
    all_pass = all_pass && pass;
    if (poisoned) printf("  %s: %lld outputs unwritten or not finite\n", v.name, poisoned);
    vs_ref.print("device vs float64");
    vs_emu.print("device vs emulation");

    for (int mode = 0; mode < 2 && !only_check; ++mode) {  // inputs from HBM, or a small L2-resident pool
      BuildParams bp = p;
      bp.pool_chunks = mode == 0 ? chunks : std::min(small_pool, chunks);
      const std::vector<double> ms = time_launches([&] { launch(v, bp); }, warmup, reps);
      std::vector<long long> cyc(ctas);
      KN_CHECK(cudaMemcpy(cyc.data(), cycles, ctas * sizeof(long long), cudaMemcpyDeviceToHost));
      std::vector<double> per_chunk;
      for (long long x : cyc) per_chunk.push_back(double(x) / chunks);
      printf("%-14s %-12s %11.3f %11.0f %10.2e %10.2e %5s\n", v.name, mode == 0 ? "HBM" : "L2 pool",
             median(ms) * 1e3 / chunks, median(per_chunk), vs_ref.worst(), vs_emu.worst(), pass ? "PASS" : "FAIL");
    }
    if (only_check)
      printf("%-14s %-12s %11s %11s %10.2e %10.2e %5s\n", v.name, "-", "-", "-", vs_ref.worst(), vs_emu.worst(),
             pass ? "PASS" : "FAIL");
  }
  printf("\ngo criterion: <= 1.6 us per 32 tokens per SM with two factor warpgroups\n");
  printf("factor_build: %s\n", all_pass ? "ALL CHECKS PASS" : "SOME CHECKS FAIL");
  return all_pass ? 0 : 1;
}
