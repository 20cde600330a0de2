// Fused KDA prefill for Hopper (sm_90a).
//
// One CTA runs the whole recurrence of one (sequence, value head, slice of V) in chunks of 16 tokens.
//   - Three producer warpgroups take chunks in turn. Each loads its chunk (cp.async, zero-filled past
//     the sequence's end), applies L2 norm, gate and beta, and forms the chunk's state-independent
//     factors in shared memory:
//       Qd = scale q̂ e^Γ, Kend = k̂ e^(Γ_C - Γ), W = (I + L)^-1 diag(β) k̂ e^Γ, Ab = (I + L)^-1 diag(β),
//       Aqk = tril(scale q̂ k̂ᵀ ⊙ decay), dlast = e^(Γ_C)
//     with Γ the chunk-local cumulative log-decay. Pairwise decays exp(Γ_i - Γ_j) are factored around
//     the chunk's row 7, exp(Γ_i - Γ_7) exp(Γ_7 - Γ_j); each per-token log-decay is clamped at
//     -kMaxLogDecay so both factors stay inside fp32/bf16 range (|exponent| <= 8 * 10). The clamp keeps
//     e^-10 = 4.5e-5 of a state row that should have been wiped, below the bf16 rounding (2^-9) of the
//     operands: harmless for any gate, and exact for the bounded gate with lower_bound >= -10. The
//     k-side factors of the scores enter as hi + lo bf16 pairs, as accurate as fp32 factors. Gate
//     inputs and beta are fetched into registers a chunk ahead; q, k, v through cp.async.
//   - Consumer warps each own 16 rows of the transposed state Sᵀ (V x K, fp32) as mma accumulators, so
//     the state never leaves registers: per chunk
//       Uᵀ = Vᵀ Abᵀ - Sᵀ Wᵀ,   Oᵀ = Sᵀ Qdᵀ + Uᵀ Aqkᵀ,   Sᵀ = Sᵀ diag(dlast) + Uᵀ Kend
//     (bf16 operands, fp32 accumulation; the accumulators turn into A operands in registers).
//   - Producers and consumers meet on mbarriers over a ring of kStages chunk buffers.
//   - A token whose k, V slice, decay or beta is not finite would reach the earlier outputs of its chunk
//     through the tensor-core products (the masked-out entries multiply it: 0 x NaN = NaN). The producer
//     marks such tokens with a few compares on values it computes anyway, and only for a chunk with a
//     mark takes a slower path: the token runs as padding (k, beta, its bad decay channels and its bad
//     V row zero), and the rows of Qd from the first marked token on and dlast are NaN, so that the
//     outputs from it on and the state leave as NaN (as jax_kda/chunked.py's step does). Warps 2 and 3
//     scan the V slice while warp 1 inverts. q needs no care: it reaches only its own output.

#include <cute/arch/copy_sm80.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "device_helpers.cuh"
#include "kda_contract.h"
#include "kda_prefill.h"
#include "non_finite.cuh"

namespace jax_kda {
namespace {

constexpr int kChunk = 16;
constexpr int kGroups = 3;                 // producer warpgroups, taking chunks in turn
constexpr int kStages = 2 * kGroups;       // each group fills one stage while its previous one is consumed
constexpr int kGroupThreads = 128;
constexpr int kProducerThreads = kGroups * kGroupThreads;
constexpr int kMaxConsumerWarps = 8;       // 128 state rows (values) per CTA
constexpr int kProducerRegs = 80, kConsumerRegs = 120;  // setmaxnreg split of the 640 x 96 registers
constexpr float kMaxLogDecay = 10.f;

constexpr int kLmatRow = 20;  // fp32 row of L: 16-byte aligned, rows 4 banks apart
constexpr int kScanThreads = 64;  // warps 2 and 3 of a producer group scan the V slice during step 3
constexpr uint32_t kSomeDecayMarked = 1u << kChunk;  // a half's running log-decay sum is not finite

using device::bf16;
using device::ldsm_x4;
using device::ldsm_x4_trans;
using device::load_scalar_bits;
using device::scalar_of_bits;
using device::mma;
using device::pack_bf16;
using device::store_scalar;
using cute::uint128_t;
using Barrier = cutlass::arch::ClusterBarrier;

// ---- small device helpers ------------------------------------------------------------------

// Named barrier of one producer group (id 0 is __syncthreads), and of its two V-scanning warps.
__device__ __forceinline__ void group_sync(int group) { asm volatile("bar.sync %0, %1;" ::"r"(group + 1), "n"(kGroupThreads)); }
__device__ __forceinline__ void scan_sync(int group) {
  asm volatile("bar.sync %0, %1;" ::"r"(kGroups + 1 + group), "n"(kScanThreads));
}

// A operand (16 x 16) of a row-major tile: rows r0.., cols c0..
__device__ __forceinline__ void load_a(const bf16 *tile, int stride, int c0, int lane, uint32_t (&a)[4]) {
  int row = (lane & 7) + ((lane >> 3) & 1) * 8;
  int col = c0 + (lane >> 4) * 8;
  ldsm_x4(tile + row * stride + col, a);
}
// A operand (16 x 16, M x K) stored K-major as tile[k][m]: transposed load.
__device__ __forceinline__ void load_a_trans(const bf16 *tile, int stride, int m0, int lane, uint32_t (&a)[4]) {
  int mi = lane >> 3;
  int row = (lane & 7) + (mi >> 1) * 8;
  int col = m0 + (mi & 1) * 8;
  ldsm_x4_trans(tile + row * stride + col, a);
}
// B operands of two n8 tiles (n0.., n0+8..) for k-block k0, from a tile stored [n][k]:
// b[0], b[1] for the first n tile, b[2], b[3] for the second.
__device__ __forceinline__ void load_b_nk(const bf16 *tile, int stride, int n0, int k0, int lane, uint32_t (&b)[4]) {
  int row = n0 + (lane & 7) + (lane >> 4) * 8;
  int col = k0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(tile + row * stride + col, b);
}
// The same from a tile stored [k][n] (transposed load).
__device__ __forceinline__ void load_b_kn(const bf16 *tile, int stride, int n0, int k0, int lane, uint32_t (&b)[4]) {
  int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  int col = n0 + (lane >> 4) * 8;
  ldsm_x4_trans(tile + row * stride + col, b);
}
// Accumulators of two adjacent n8 tiles as the bf16 A operand of one k16 block.
__device__ __forceinline__ void acc_to_a(const float (&lo)[4], const float (&hi)[4], uint32_t (&a)[4]) {
  a[0] = pack_bf16(lo[0], lo[1]);
  a[1] = pack_bf16(lo[2], lo[3]);
  a[2] = pack_bf16(hi[0], hi[1]);
  a[3] = pack_bf16(hi[2], hi[3]);
}

// ---- shared memory layout ------------------------------------------------------------------

template <int K>
struct Layout {
  static constexpr int kRow = K + 8;     // padded bf16 row: ldmatrix rows fall in distinct banks
  static constexpr int kSmall = 16 + 8;  // padded row of the 16 x 16 tiles
  static constexpr int kTile = kChunk * kRow * 2;
  int v_row;                             // padded row of the V slice
  // A stage of the ring the consumers read (byte offsets within the stage).
  int v, qd, kend, w, ab, aqk, dlast, stage_bytes;
  // A producer group's own buffers (offsets within its part): the raw q, k tiles, double-buffered
  // (they become the hi parts of q̂ e^(Γ-Γ_7), k̂ e^(Γ-Γ_7)), the lo part of the latter, k̂ e^(Γ_7-Γ)
  // in hi and lo parts, L, and small per-chunk vectors.
  int raw_q, raw_k, k_lo, kinv_hi, kinv_lo, lmat, norms, beta, sums, e_anchor, marks, group_bytes;
  // After the stages: the groups' buffers, the consumers' output staging, the barriers.
  int groups, out, barriers, total;

  __host__ __device__ explicit Layout(int v_slice) {
    v_row = v_slice + 8;
    int off = 0;
    auto take = [&](int bytes) { int at = off; off += (bytes + 127) / 128 * 128; return at; };
    v = take(kChunk * v_row * 2);
    qd = take(kTile);
    kend = take(kTile);
    w = take(kTile);
    ab = take(kChunk * kSmall * 2);
    aqk = take(kChunk * kSmall * 2);
    dlast = take(K * 4);
    stage_bytes = off;
    off = 0;
    raw_q = take(2 * kTile);
    raw_k = take(2 * kTile);
    k_lo = take(kTile);
    kinv_hi = take(kTile);
    kinv_lo = take(kTile);
    lmat = take(kChunk * kLmatRow * 4);
    norms = take(2 * kChunk * 4);
    beta = take(kChunk * 4);
    sums = take(2 * K * 4);
    e_anchor = take(K * 4);
    marks = take(3 * 4);  // tokens marked in step 1 (k, beta; kSomeDecayMarked), by the V scan, by decay
    group_bytes = off;
    off = stage_bytes * kStages;
    groups = take(group_bytes * kGroups);
    out = take(kMaxConsumerWarps * kChunk * 24 * 2);
    barriers = take(2 * kStages * 8);
    total = off;
  }
};

struct Sequence {
  int64_t begin;  // first token, counted over B * T
  int length;
};

__device__ __forceinline__ Sequence sequence_of(const PrefillParams &p, int n) {
  if (p.cu_seqlens != nullptr) {
    int b = p.cu_seqlens[n], e = p.cu_seqlens[n + 1];
    return {b, e > b ? e - b : 0};
  }
  return {int64_t(n) * p.tokens, p.tokens};
}

// Two adjacent values as bf16, and the hi/lo split that keeps a float's precision in two bf16s.
__device__ __forceinline__ void store_pair(bf16 *base, int i, float x0, float x1) {
  *reinterpret_cast<__nv_bfloat162 *>(base + i) = __floats2bfloat162_rn(x0, x1);
}
__device__ __forceinline__ void store_split(bf16 *hi, bf16 *lo, int i, float x0, float x1) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  *reinterpret_cast<__nv_bfloat162 *>(hi + i) = h;
  *reinterpret_cast<__nv_bfloat162 *>(lo + i) = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
}

// exp and log through the special-function unit, flushing denormals (single instructions).
__device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ float log_ftz(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y * 0.6931471805599453f;
}

// ---- producer --------------------------------------------------------------------------------

// What a producer thread fetches into registers a chunk ahead: its gate inputs (two key channels,
// half of the tokens; bf16 pairs in .x, or fp32 pairs) and its beta (threads 0-15), all as loaded.
template <int K>
struct Prefetch {
  uint2 g[kChunk / 2];
  uint32_t beta_bits;
};

template <int K>
struct Producer {
  const PrefillParams &p;
  const Layout<K> &lay;
  char *smem;
  char *own;  // this group's buffers
  int group, tid, head, vhead, v_slice, v_begin;
  Sequence seq;
  float2 bias = {0.f, 0.f};  // dt_bias of this thread's two key channels
  float a_scale = 1.f;       // exp(A_log) of the head

  static constexpr int kPairs = K / 2, kHalf = kChunk / 2;
  __device__ int pair() const { return tid % kPairs; }
  __device__ int half() const { return tid / kPairs; }  // 0: tokens 0-7, 1: tokens 8-15 (tid < K)

  __device__ void load_gate_parameters() {
    const int d = 2 * pair();
    if (p.dt_bias != nullptr && tid < K) bias = make_float2(p.dt_bias[vhead * K + d], p.dt_bias[vhead * K + d + 1]);
    if (p.A_log != nullptr) a_scale = exp_ftz(p.A_log[vhead]);
    clear_marks();
  }
  // Every compute() leaves the marks clear, after its last group_sync.
  __device__ void clear_marks() {
    if (tid < 3) reinterpret_cast<uint32_t *>(own + lay.marks)[tid] = 0u;
  }

  // Starts the copies of chunk `c`: q, k (cp.async) into raw buffer `buffer`, the V slice into stage
  // `s`, the gate inputs and beta into registers. Rows past the sequence read as zeros.
  __device__ Prefetch<K> load(int c, int s, int buffer) {
    char *st = smem + s * lay.stage_bytes;
    const int valid = min(kChunk, seq.length - c * kChunk);
    const int64_t t0 = seq.begin + int64_t(c) * kChunk;
    const int hv = p.value_heads;
    auto copy = [](const char *src, char *dst, bool ok) {
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t *>(src),
                                                             *reinterpret_cast<uint128_t *>(dst), ok);
    };
    constexpr int kPieces = K * 2 / 16;  // 16-byte pieces per bf16 row
    for (int i = tid; i < kChunk * kPieces; i += kGroupThreads) {
      const int r = i / kPieces, piece = i % kPieces;
      const bool ok = r < valid;
      const int64_t src = (ok ? ((t0 + r) * p.heads + head) * K * 2 : 0) + piece * 16;
      const int dst = buffer * Layout<K>::kTile + (r * Layout<K>::kRow) * 2 + piece * 16;
      copy(static_cast<const char *>(p.q) + src, own + lay.raw_q + dst, ok);
      copy(static_cast<const char *>(p.k) + src, own + lay.raw_k + dst, ok);
    }
    const int v_pieces = v_slice * 2 / 16;
    for (int i = tid; i < kChunk * v_pieces; i += kGroupThreads) {
      const int r = i / v_pieces, piece = i % v_pieces;
      const bool ok = r < valid && v_begin + piece * 8 < p.v_columns;  // transition columns read zeros
      const int64_t at = ok ? ((t0 + r) * hv + vhead) * p.v_columns + v_begin + piece * 8 : 0;
      copy(static_cast<const char *>(p.v) + at * 2,
           st + lay.v + (r * lay.v_row) * 2 + piece * 16, ok);
    }
    Prefetch<K> f;
    const int d = 2 * pair();
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const int t = half() * kHalf + j;
      f.g[j] = make_uint2(0u, 0u);
      if (tid < K && t < valid) {
        const int64_t at = ((t0 + t) * hv + vhead) * K + d;
        if (p.g_is_f32) {
          f.g[j] = *reinterpret_cast<const uint2 *>(static_cast<const float *>(p.g) + at);
        } else {
          f.g[j].x = *reinterpret_cast<const uint32_t *>(static_cast<const bf16 *>(p.g) + at);
        }
      }
    }
    f.beta_bits = tid < valid ? load_scalar_bits(p.beta, (t0 + tid) * hv + vhead, p.beta_is_f32) : 0u;
    return f;
  }

  __device__ float log_decay(float x, float channel_bias) const {
    if (p.gate == GateMode::kGiven) return x;
    x += channel_bias;
    if (p.gate == GateMode::kSoftplus) return -a_scale * (x > kSoftplusThreshold ? x : log_ftz(1.f + exp_ftz(x)));
    return __fdividef(p.lower_bound, 1.f + exp_ftz(-a_scale * x));
  }

  // A running log-decay sum turns NaN or +Inf at the first NaN or +Inf log-decay and stays so (-Inf is
  // clamped). Those tokens are marked in `marked`, and their sums continue the last finite one, as if
  // they did not decay: only rows before the first mark of the chunk are kept, and these see finite
  // sums (Γ_7 included, through which every row's factors pass). Returns the half's sanitized total.
  __device__ float2 sanitize_sums(float2 (&lam)[kHalf], uint32_t &marked) const {
    float2 last = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const bool bad0 = !(lam[j].x < INFINITY), bad1 = !(lam[j].y < INFINITY);
      if (bad0 || bad1) marked |= 1u << (half() * kHalf + j);
      lam[j].x = bad0 ? last.x : lam[j].x;
      lam[j].y = bad1 ? last.y : lam[j].y;
      last = lam[j];
    }
    return last;
  }

  // Step 2 of compute(), by the threads of the key channels: the factored tiles, two channels and half
  // of the tokens a thread (bf16x2 accesses). Anchor: row 7, the last of the first half. Isolating
  // (`tokens` marked): marked tokens run as padding (k zero), and the rows of Qd from the first of them
  // on and dlast are NaN.
  template <bool kIsolate>
  __device__ __forceinline__ void store_factors(char *st, int buffer, const float2 (&lam)[kHalf], uint32_t tokens) {
    constexpr int R = Layout<K>::kRow;
    const int half = this->half(), d = 2 * pair();
    bf16 *q_hi = reinterpret_cast<bf16 *>(own + lay.raw_q + buffer * Layout<K>::kTile);
    bf16 *k_hi = reinterpret_cast<bf16 *>(own + lay.raw_k + buffer * Layout<K>::kTile);
    bf16 *k_lo = reinterpret_cast<bf16 *>(own + lay.k_lo);
    bf16 *kinv_hi = reinterpret_cast<bf16 *>(own + lay.kinv_hi);
    bf16 *kinv_lo = reinterpret_cast<bf16 *>(own + lay.kinv_lo);
    const float *norms = reinterpret_cast<const float *>(own + lay.norms);
    const float *sums = reinterpret_cast<const float *>(own + lay.sums);
    float *e_anchor_all = reinterpret_cast<float *>(own + lay.e_anchor);
    bf16 *qd = reinterpret_cast<bf16 *>(st + lay.qd);
    bf16 *kend = reinterpret_cast<bf16 *>(st + lay.kend);
    float *dlast = reinterpret_cast<float *>(st + lay.dlast);
    const int poisoned_from = kIsolate && tokens != 0u ? __ffs(tokens) - 1 : kIsolate ? 0 : kChunk;
    const float2 first = *reinterpret_cast<const float2 *>(sums + d);       // Γ_7
    const float2 second = *reinterpret_cast<const float2 *>(sums + K + d);  // Γ_15 - Γ_7
    const float2 e_anchor = {exp_ftz(first.x), exp_ftz(first.y)};
    const float2 e_last = {exp_ftz(second.x), exp_ftz(second.y)};
    if (half == 1) {
      *reinterpret_cast<float2 *>(dlast + d) = kIsolate ? make_float2(NAN, NAN)
                                                        : make_float2(e_anchor.x * e_last.x, e_anchor.y * e_last.y);
      *reinterpret_cast<float2 *>(e_anchor_all + d) = e_anchor;
    }
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const int t = half * kHalf + j, i = t * R + d;
      const float r0 = half ? lam[j].x : lam[j].x - first.x, r1 = half ? lam[j].y : lam[j].y - first.y;  // Γ_t - Γ_7
      const float e0 = exp_ftz(r0), e1 = exp_ftz(r1), ie0 = exp_ftz(-r0), ie1 = exp_ftz(-r1);
      const float2 qv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(q_hi + i));
      const float2 kv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(k_hi + i));
      const float nq = norms[t], nk = norms[kChunk + t];
      const bool dropped = kIsolate && ((tokens >> t) & 1u);
      const float q0 = qv.x * nq, q1 = qv.y * nq;
      const float k0 = dropped ? 0.f : kv.x * nk, k1 = dropped ? 0.f : kv.y * nk;
      store_pair(q_hi, i, q0 * e0, q1 * e1);
      store_split(k_hi, k_lo, i, k0 * e0, k1 * e1);
      store_split(kinv_hi, kinv_lo, i, k0 * ie0, k1 * ie1);
      if (kIsolate && t >= poisoned_from) {
        store_pair(qd, i, NAN, NAN);
      } else {
        store_pair(qd, i, q0 * p.scale * e0 * e_anchor.x, q1 * p.scale * e1 * e_anchor.y);
      }
      store_pair(kend, i, k0 * ie0 * e_last.x, k1 * ie1 * e_last.y);
    }
  }

  // Forms the factors of chunk `c` into stage `s` from raw buffer `buffer` and the prefetched inputs.
  __device__ void compute(int c, int s, int buffer, const Prefetch<K> &in) {
    char *st = smem + s * lay.stage_bytes;
    constexpr int R = Layout<K>::kRow;
    constexpr int RS = Layout<K>::kSmall;
    const int lane = tid & 31, warp = tid >> 5;
    const int valid = min(kChunk, seq.length - c * kChunk);
    bf16 *q_hi = reinterpret_cast<bf16 *>(own + lay.raw_q + buffer * Layout<K>::kTile);
    bf16 *k_hi = reinterpret_cast<bf16 *>(own + lay.raw_k + buffer * Layout<K>::kTile);
    bf16 *k_lo = reinterpret_cast<bf16 *>(own + lay.k_lo);
    bf16 *kinv_hi = reinterpret_cast<bf16 *>(own + lay.kinv_hi);
    bf16 *kinv_lo = reinterpret_cast<bf16 *>(own + lay.kinv_lo);
    float *lmat = reinterpret_cast<float *>(own + lay.lmat);
    float *norms = reinterpret_cast<float *>(own + lay.norms);
    float *beta = reinterpret_cast<float *>(own + lay.beta);
    float *sums = reinterpret_cast<float *>(own + lay.sums);  // [half][K]: Σ a over each half
    float *e_anchor_all = reinterpret_cast<float *>(own + lay.e_anchor);
    uint32_t *marks = reinterpret_cast<uint32_t *>(own + lay.marks);
    bf16 *qd = reinterpret_cast<bf16 *>(st + lay.qd);
    bf16 *kend = reinterpret_cast<bf16 *>(st + lay.kend);
    bf16 *w = reinterpret_cast<bf16 *>(st + lay.w);
    bf16 *ab = reinterpret_cast<bf16 *>(st + lay.ab);
    bf16 *aqk = reinterpret_cast<bf16 *>(st + lay.aqk);
    float *dlast = reinterpret_cast<float *>(st + lay.dlast);
    const bool active = tid < K;
    const int half = this->half(), d = 2 * pair();

    // 1. Inverse L2 norms of the 32 q/k rows (4 threads a row, 16-byte loads), the write strengths,
    //    and (threads of the key channels) the gate and each half's cumulative log-decay. Marks: a k
    //    row whose Σ k² is not finite, a beta that is not, a half whose decay sum is not.
    {
      const int r = tid >> 2, quarter = tid & 3;
      const bf16 *row = (r < kChunk ? q_hi + r * R : k_hi + (r - kChunk) * R) + quarter * (K / 4);
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < K / 4; i += 8) {
        const uint128_t raw = *reinterpret_cast<const uint128_t *>(row + i);
        const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __bfloat1622float2(pairs[j]);
          ss += f.x * f.x + f.y * f.y;
        }
      }
      ss += __shfl_xor_sync(0xffffffffu, ss, 1);
      ss += __shfl_xor_sync(0xffffffffu, ss, 2);
      if (quarter == 0) {
        norms[r] = p.l2norm ? rsqrtf(ss + kL2NormEps) : 1.f;
        if (r >= kChunk && !isfinite(ss)) atomicOr(marks, 1u << (r - kChunk));
      }
      if (tid < kChunk) {
        float b = scalar_of_bits(in.beta_bits, p.beta_is_f32);
        if (p.beta_sigmoid) b = __fdividef(p.allow_neg_eigval ? 2.f : 1.f, 1.f + exp_ftz(-b));
        if (!isfinite(b)) atomicOr(marks, 1u << tid);
        beta[tid] = tid < valid ? b : 0.f;
      }
    }
    float2 lam[kHalf];  // Σ a from the half's first token to each of its tokens
    if (active) {
      float2 acc = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        const float2 x = p.g_is_f32 ? make_float2(__uint_as_float(in.g[j].x), __uint_as_float(in.g[j].y))
                                    : __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&in.g[j].x));
        // Rows past the sequence: no decay. The clamp keeps NaN.
        const bool ok = half * kHalf + j < valid;
        float a0 = ok ? log_decay(x.x, bias.x) : 0.f, a1 = ok ? log_decay(x.y, bias.y) : 0.f;
        acc.x += a0 < -kMaxLogDecay ? -kMaxLogDecay : a0;
        acc.y += a1 < -kMaxLogDecay ? -kMaxLogDecay : a1;
        lam[j] = acc;
      }
      if (!(acc.x < INFINITY && acc.y < INFINITY)) atomicOr(marks, kSomeDecayMarked);
      *reinterpret_cast<float2 *>(sums + half * K + d) = acc;
    }
    group_sync(group);

    // 2. The factored tiles, two key channels and half of the tokens per thread (bf16x2 accesses).
    //    Anchor: row 7, the last of the first half. Isolating (`tokens` marked): marked tokens run as
    //    padding (k zero), and the rows of Qd from the first of them on and dlast are NaN.
    const uint32_t marked = marks[0];
    if (marked == 0u) {  // group-uniform: every thread read the word after the same group_sync
      if (active) store_factors<false>(st, buffer, lam, 0u);
    } else {
      if (marked & kSomeDecayMarked) {  // which tokens, from the running sums
        if (active) {
          uint32_t by_decay = 0u;
          *reinterpret_cast<float2 *>(sums + half * K + d) = sanitize_sums(lam, by_decay);
          if (by_decay != 0u) atomicOr(marks + 2, by_decay);
        }
        group_sync(group);
      }
      const uint32_t tokens = (marked & (kSomeDecayMarked - 1u)) | marks[2];
      if (tid < kChunk && ((tokens >> tid) & 1u)) beta[tid] = 0.f;  // read from step 3 on
      if (active) store_factors<true>(st, buffer, lam, tokens);
    }
    group_sync(group);

    // 3. Scores: Aqk = scale tril(q kᵀ ⊙ decay) (warp 0); warp 1 forms L = diag(β) strict_tril(k kᵀ ⊙
    //    decay) and inverts I + L by forward substitution. The k-side factors enter as hi + lo parts.
    if (warp < 2) {
      const bool keys = warp == 1;
      const bf16 *rows = keys ? k_hi : q_hi;
      float acc[2][4] = {};
#pragma unroll
      for (int kb = 0; kb < K / 16; ++kb) {
        uint32_t a_hi[4], b_hi[4], b_lo[4];
        load_a(rows, R, kb * 16, lane, a_hi);
        load_b_nk(kinv_hi, R, 0, kb * 16, lane, b_hi);
        load_b_nk(kinv_lo, R, 0, kb * 16, lane, b_lo);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma(acc[nt], a_hi, b_hi[2 * nt], b_hi[2 * nt + 1]);
          mma(acc[nt], a_hi, b_lo[2 * nt], b_lo[2 * nt + 1]);
        }
        if (keys) {
          uint32_t a_lo[4];
          load_a(k_lo, R, kb * 16, lane, a_lo);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma(acc[nt], a_lo, b_hi[2 * nt], b_hi[2 * nt + 1]);
        }
      }
      const int gid = lane >> 2, tq = lane & 3;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = gid + (e >> 1) * 8, j = nt * 8 + tq * 2 + (e & 1);
          if (keys) {
            lmat[i * kLmatRow + j] = j < i ? acc[nt][e] * beta[i] : 0.f;
          } else {
            aqk[i * RS + j] = __float2bfloat16_rn(j <= i ? acc[nt][e] * p.scale : 0.f);
          }
        }
      }
      if (keys) {
        __syncwarp();
        // Lane j < 16 keeps column j of (I + L)^-1 in registers; each row of L is read as four
        // broadcast 16-byte loads, and its dot product runs in two independent chains.
        const int j = lane & 15;
        float col[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          float row[kChunk];
#pragma unroll
          for (int m = 0; m < kChunk; m += 4) {
            *reinterpret_cast<float4 *>(row + m) = *reinterpret_cast<const float4 *>(lmat + i * kLmatRow + m);
          }
          float even = i == j ? 1.f : 0.f, odd = 0.f;
#pragma unroll
          for (int m = 0; m + 1 < i; m += 2) {
            even -= row[m] * col[m];
            odd -= row[m + 1] * col[m + 1];
          }
          if (i % 2 == 1) even -= row[i - 1] * col[i - 1];
          col[i] = even + odd;
        }
        if (lane < kChunk) {
          const float bj = beta[j];
#pragma unroll
          for (int i = 0; i < kChunk; ++i) ab[i * RS + j] = __float2bfloat16_rn(col[i] * bj);
        }
      }
    } else {
      scan_v(st, tid - 2 * 32, marks + 1, qd, dlast);
    }
    group_sync(group);

    // 4. W = Ab k̂ e^Γ = (Ab (k̂ e^(Γ-Γ_7))) diag(e^Γ_7), stored negated; a quarter of the channels a warp.
    {
      uint32_t a[4];
      load_a(ab, RS, 0, lane, a);
      const int gid = lane >> 2, tq = lane & 3;
      constexpr int kCols = K / 4;
#pragma unroll
      for (int np = 0; np < kCols / 16; ++np) {
        const int n0 = warp * kCols + np * 16;
        uint32_t b[4];
        load_b_kn(k_hi, R, n0, 0, lane, b);
        float acc[2][4] = {};
        mma(acc[0], a, b[0], b[1]);
        mma(acc[1], a, b[2], b[3]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = n0 + nt * 8 + tq * 2;
          const float2 ea = *reinterpret_cast<const float2 *>(e_anchor_all + col);
          *reinterpret_cast<uint32_t *>(w + gid * R + col) = pack_bf16(-acc[nt][0] * ea.x, -acc[nt][1] * ea.y);
          *reinterpret_cast<uint32_t *>(w + (gid + 8) * R + col) = pack_bf16(-acc[nt][2] * ea.x, -acc[nt][3] * ea.y);
        }
      }
    }
    group_sync(group);  // the raw buffer is refilled next; every warp is done reading it
    clear_marks();
  }

  // Warps 2 and 3 in step 3 (while warps 0 and 1 form the scores and invert): the rows of the V slice
  // (64 or 128 columns) holding an Inf or a NaN. Where there is one, its row becomes zero, and the rows
  // of Qd from it on and dlast NaN (step 2 has written them; the consumers read them after the stage's
  // full barrier).
  __device__ void scan_v(char *st, int sub, uint32_t *v_marks, bf16 *qd, float *dlast) {
    constexpr int R = Layout<K>::kRow;
    bf16 *v_tile = reinterpret_cast<bf16 *>(st + lay.v);
    const int shift = v_slice == 128 ? 4 : 3;  // log2 of a row's 16-byte pieces
    const int piece_mask = (1 << shift) - 1;
    uint32_t rows = 0u;
#pragma unroll 1
    for (int i = sub; i < (kChunk << shift); i += kScanThreads) {
      const uint4 x = *reinterpret_cast<const uint4 *>(v_tile + (i >> shift) * lay.v_row + (i & piece_mask) * 8);
      if (non_finite_bf16x2(x.x) | non_finite_bf16x2(x.y) | non_finite_bf16x2(x.z) | non_finite_bf16x2(x.w)) {
        rows |= 1u << (i >> shift);
      }
    }
    rows = __reduce_or_sync(0xFFFFFFFFu, rows);
    if ((sub & 31) == 0 && rows != 0u) atomicOr(v_marks, rows);
    scan_sync(group);
    const uint32_t bad_rows = *v_marks;
    if (bad_rows == 0u) return;
    for (int i = sub; i < (kChunk << shift); i += kScanThreads) {
      if ((bad_rows >> (i >> shift)) & 1u) {
        *reinterpret_cast<uint4 *>(v_tile + (i >> shift) * lay.v_row + (i & piece_mask) * 8) = uint4{};
      }
    }
    const int poisoned_from = __ffs(bad_rows) - 1;
    for (int i = sub; i < kChunk * kPairs; i += kScanThreads) {
      const int t = i / kPairs;
      if (t >= poisoned_from) store_pair(qd, t * R + 2 * (i % kPairs), NAN, NAN);
    }
    for (int c = sub; c < K; c += kScanThreads) dlast[c] = NAN;
  }
};

// ---- consumer --------------------------------------------------------------------------------

template <int K>
struct Consumer {
  const PrefillParams &p;
  const Layout<K> &lay;
  char *smem;
  int lane, warp_index, vhead, v_row0;  // v_row0: first value column (of V) this warp owns
  Sequence seq;
  float state[K / 8][4];  // Sᵀ rows v_row0 + (lane/4) and + 8, columns 8 nt + 2 (lane%4) + {0, 1}

  __device__ int64_t state_index(int n, int v, int d) const {
    int64_t head = int64_t(n) * p.value_heads + vhead;
    return p.state_v_first ? (head * p.head_dim_v + v) * K + d : (head * K + d) * p.head_dim_v + v;
  }

  // Every element's load issued before any is used, each into its own register (unconditional loads:
  // one behind a branch was moved into place right after it, and a bf16 state converted right after
  // each load waited each load's latency in turn).
  __device__ void load_state(int n) {
    const int gid = lane >> 2, tq = lane & 3;
    uint32_t bits[K / 8][4] = {};
    if (p.initial_state != nullptr) {
      if (p.initial_is_f32) {
        load_state_bits<uint32_t>(n, bits);
      } else {
        load_state_bits<uint16_t>(n, bits);
      }
    }
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = v_row0 + gid + (e >> 1) * 8, d = nt * 8 + tq * 2 + (e & 1);
        if (v >= p.v_columns) {
          state[nt][e] = v - p.v_columns == d ? 1.f : 0.f;  // transition columns start as the identity
        } else {
          state[nt][e] = scalar_of_bits(bits[nt][e], p.initial_is_f32);  // 0 bits: 0.f either way
        }
      }
    }
  }
  // The initial state's elements of this thread as stored (fp32 or bf16); a transition column's reads
  // element 0 instead (the identity replaces it).
  template <typename Element>
  __device__ void load_state_bits(int n, uint32_t (&bits)[K / 8][4]) const {
    const Element *initial = static_cast<const Element *>(p.initial_state);
    const int gid = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = v_row0 + gid + (e >> 1) * 8, d = nt * 8 + tq * 2 + (e & 1);
        bits[nt][e] = initial[v < p.v_columns ? state_index(n, v, d) : 0];
      }
    }
  }

  __device__ void store_state(int n) const {
    if (p.final_state == nullptr) return;
    const int gid = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int v = v_row0 + gid + (e >> 1) * 8, d = nt * 8 + tq * 2 + (e & 1);
        store_scalar(p.final_state, state_index(n, v, d), p.final_is_f32, state[nt][e]);
      }
    }
  }

  __device__ void chunk(int c, int s) {
    const char *st = smem + s * lay.stage_bytes;
    constexpr int R = Layout<K>::kRow;
    constexpr int RS = Layout<K>::kSmall;
    const bf16 *v = reinterpret_cast<const bf16 *>(st + lay.v);
    const bf16 *qd = reinterpret_cast<const bf16 *>(st + lay.qd);
    const bf16 *kend = reinterpret_cast<const bf16 *>(st + lay.kend);
    const bf16 *w = reinterpret_cast<const bf16 *>(st + lay.w);
    const bf16 *ab = reinterpret_cast<const bf16 *>(st + lay.ab);
    const bf16 *aqk = reinterpret_cast<const bf16 *>(st + lay.aqk);
    const float *dlast = reinterpret_cast<const float *>(st + lay.dlast);
    const int m0 = warp_index * 16;  // this warp's rows within the V slice

    // Uᵀ = Vᵀ Abᵀ - Sᵀ Wᵀ and Oᵀ = Sᵀ Qdᵀ, both 16 (values) x 16 (tokens).
    float u[2][4] = {}, o[2][4] = {};
    {
      uint32_t a[4], b[4];
      load_a_trans(v, lay.v_row, m0, lane, a);
      load_b_nk(ab, RS, 0, 0, lane, b);
      mma(u[0], a, b[0], b[1]);
      mma(u[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int kb = 0; kb < K / 16; ++kb) {
      uint32_t a[4], bw[4], bq[4];
      acc_to_a(state[2 * kb], state[2 * kb + 1], a);
      load_b_nk(w, R, 0, kb * 16, lane, bw);
      load_b_nk(qd, R, 0, kb * 16, lane, bq);
      mma(u[0], a, bw[0], bw[1]);
      mma(u[1], a, bw[2], bw[3]);
      mma(o[0], a, bq[0], bq[1]);
      mma(o[1], a, bq[2], bq[3]);
    }
    uint32_t ua[4];
    acc_to_a(u[0], u[1], ua);
    {
      uint32_t b[4];
      load_b_nk(aqk, RS, 0, 0, lane, b);
      mma(o[0], ua, b[0], b[1]);
      mma(o[1], ua, b[2], b[3]);
    }

    // Sᵀ = Sᵀ diag(dlast) + Uᵀ Kend.
    const int tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt) {
      float2 dl = *reinterpret_cast<const float2 *>(dlast + nt * 8 + tq * 2);
      state[nt][0] *= dl.x;
      state[nt][1] *= dl.y;
      state[nt][2] *= dl.x;
      state[nt][3] *= dl.y;
    }
#pragma unroll
    for (int np = 0; np < K / 16; ++np) {
      uint32_t b[4];
      load_b_kn(kend, R, np * 16, 0, lane, b);
      mma(state[2 * np], ua, b[0], b[1]);
      mma(state[2 * np + 1], ua, b[2], b[3]);
    }

    // Oᵀ -> o[t][v] through this warp's staging tile, then 16-byte stores of the valid rows.
    bf16 *stage = reinterpret_cast<bf16 *>(smem + lay.out) + warp_index * kChunk * 24;
    const int gid = lane >> 2;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int vv = gid + (e >> 1) * 8, t = nt * 8 + tq * 2 + (e & 1);
        stage[t * 24 + vv] = __float2bfloat16_rn(o[nt][e]);
      }
    }
    __syncwarp();
    const int t = lane >> 1, half = lane & 1;
    if (t < seq.length - c * kChunk) {
      int64_t row = (seq.begin + int64_t(c) * kChunk + t) * p.value_heads + vhead;
      *reinterpret_cast<uint128_t *>(static_cast<bf16 *>(p.o) + row * p.head_dim_v + v_row0 + half * 8) =
          *reinterpret_cast<const uint128_t *>(stage + t * 24 + half * 8);
    }
    __syncwarp();
  }
};

// ---- the kernel --------------------------------------------------------------------------------

template <int K>
__global__ void __launch_bounds__(kProducerThreads + kMaxConsumerWarps * 32, 1)
    kda_prefill_kernel(const __grid_constant__ PrefillParams p, int v_slices) {
  extern __shared__ __align__(128) char smem[];
  const int v_slice = p.head_dim_v / v_slices;
  const Layout<K> lay(v_slice);
  const int n = blockIdx.x;
  const int vhead = blockIdx.y / v_slices, slice = blockIdx.y % v_slices;
  const int head = vhead / (p.value_heads / p.heads);
  const Sequence seq = sequence_of(p, n);
  const int num_chunks = (seq.length + kChunk - 1) / kChunk;
  const int consumers = (blockDim.x - kProducerThreads) / 32;
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + lay.barriers);
  uint64_t *empty = full + kStages;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&full[s], kGroupThreads);
      Barrier::init(&empty[s], consumers * 32);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < kProducerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    const int group = threadIdx.x / kGroupThreads;
    Producer<K> prod{p, lay, smem, smem + lay.groups + group * lay.group_bytes, group,
                     int(threadIdx.x % kGroupThreads), head, vhead, v_slice, slice * v_slice, seq};
    prod.load_gate_parameters();
    // Group g produces chunks g, g + kGroups, ...; it loads its next chunk while computing this one.
    Prefetch<K> next_in{};
    if (group < num_chunks) {
      next_in = prod.load(group, group % kStages, 0);
      cute::cp_async_fence();
    }
    for (int c = group, it = 0; c < num_chunks; c += kGroups, ++it) {
      const int s = c % kStages, next = c + kGroups;
      const Prefetch<K> in = next_in;
      if (next < num_chunks) {
        if (next >= kStages) Barrier::wait(&empty[next % kStages], (next / kStages - 1) & 1);
        next_in = prod.load(next, next % kStages, (it + 1) & 1);
        cute::cp_async_fence();
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      group_sync(group);
      prod.compute(c, s, it & 1, in);
      Barrier::arrive(&full[s]);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    const int warp_index = (threadIdx.x - kProducerThreads) / 32;
    Consumer<K> cons{p, lay, smem, int(threadIdx.x & 31), warp_index, vhead, slice * v_slice + warp_index * 16, seq};
    cons.load_state(n);
    for (int c = 0; c < num_chunks; ++c) {
      const int s = c % kStages;
      Barrier::wait(&full[s], (c / kStages) & 1);
      cons.chunk(c, s);
      Barrier::arrive(&empty[s]);
    }
    cons.store_state(n);
  }
}

template <int K>
cudaError_t launch(const PrefillParams &p, cudaStream_t stream) {
  int device = 0, multiprocessors = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int v_slice = prefill_v_slice(p.num_sequences, p.value_heads, p.head_dim_v, multiprocessors);
  const int slices = p.head_dim_v / v_slice;
  const Layout<K> lay(v_slice);
  err = cudaFuncSetAttribute(kda_prefill_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, lay.total);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_sequences, p.value_heads * slices);
  dim3 block(kProducerThreads + 32 * (v_slice / 16));
  kda_prefill_kernel<K><<<grid, block, lay.total, stream>>>(p, slices);
  return cudaGetLastError();
}

}  // namespace

cudaError_t prefill_launch(const PrefillParams &p, cudaStream_t stream) {
  if (prefill_unsupported(p.head_dim_k, p.head_dim_v) != nullptr) return cudaErrorInvalidValue;
  if (p.num_sequences == 0 || p.value_heads == 0) return cudaSuccess;
  return p.head_dim_k == 128 ? launch<128>(p, stream) : launch<64>(p, stream);
}

}  // namespace jax_kda
