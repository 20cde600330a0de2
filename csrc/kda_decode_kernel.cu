// Fused KDA decode step (see kda_decode.h): one token per sequence against the K x V state of every
// value head, in one pass over the state.
//
// Memory-bound: each state element is read once and written once, with 16-byte accesses; the rest of
// a step (the token's q, k, v, g, beta) is a few hundred bytes per head. A CTA takes one (sequence,
// value head) and kSliceColumns of its V value columns, a K x 64 tile of the state:
//   1. every thread issues the loads of its kPieces 16-byte pieces of the tile, which stay in
//      registers until they are written back, and threads of the first two warps fetch the tile's
//      values v;
//   2. meanwhile warp 0 forms the head's channel table in shared memory: per key channel the decay
//      e^a, k̂, scale q̂ and β k̂ (the contract's L2 norm, gate and beta), and the scalar β k̂ · (scale q̂);
//   3. after one barrier, each thread decays its pieces, S' = diag(e^a) S, and forms its share of
//      both products per value column, S'ᵀ k̂ and S'ᵀ (scale q̂), which are reduced over K;
//   4. r = v - S'ᵀ k̂, o = S'ᵀ (scale q̂) + r β k̂ · (scale q̂), which equals S_newᵀ (scale q̂) and so
//      needs no second reduction, and S_new = S' + β k̂ rᵀ, stored where the pieces were loaded from
//      in new_state. XLA passes the state's buffer as new_state (an alias): each piece is read and
//      written by one thread, so the update in place is safe.
// Layouts (a template parameter): V-first, a state row is one value column (K contiguous channels),
// reduced by the lanes that hold it with shuffles; K-first, a row is one key channel (V contiguous
// columns), so the reduction over K runs down the rows: in each lane's registers, across the lanes of
// a warp, then across the CTA's warps through shared memory (a second barrier).

#include "device_helpers.cuh"
#include "kda_decode.h"

namespace jax_kda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMinBlocksPerSM = 4;  // caps registers at 128 a thread: 16 warps of loads in flight per SM
constexpr int kSliceColumns = 64;   // value columns of a CTA's tile
constexpr int kPieceBytes = 16;
constexpr unsigned kFullMask = 0xffffffffu;

using device::bf16;
using device::load_scalar;
using device::load_scalar_bits;
using device::scalar_of_bits;
using device::pack_bf16;
using device::store_scalar;

// A 16-byte piece of a state row as floats: 4 fp32 or 8 bf16 elements.
template <typename T>
struct Piece;

template <>
struct Piece<float> {
  static constexpr int kElements = 4;
  __device__ static void unpack(const uint4 &raw, float (&x)[kElements]) {
    x[0] = __uint_as_float(raw.x);
    x[1] = __uint_as_float(raw.y);
    x[2] = __uint_as_float(raw.z);
    x[3] = __uint_as_float(raw.w);
  }
  __device__ static uint4 pack(const float (&x)[kElements]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
};

template <>
struct Piece<bf16> {
  static constexpr int kElements = 8;
  __device__ static void unpack(const uint4 &raw, float (&x)[kElements]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&words[i]));
      x[2 * i] = pair.x;
      x[2 * i + 1] = pair.y;
    }
  }
  __device__ static uint4 pack(const float (&x)[kElements]) {
    return make_uint4(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]), pack_bf16(x[4], x[5]), pack_bf16(x[6], x[7]));
  }
};

// One 16-byte store. Written out because the compiler splits a plain uint4 store into four when the
// output's scalar stores, which might alias it, follow.
template <typename T>
__device__ __forceinline__ void store_piece(T *at, const uint4 &piece) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(at), "r"(piece.x), "r"(piece.y), "r"(piece.z),
               "r"(piece.w)
               : "memory");
}

// How a CTA's K x kSliceColumns tile maps onto its threads. A row is contiguous in memory: one value
// column of K channels (V-first) or one key channel of the tile's kSliceColumns columns (K-first).
// kLanesPerRow lanes hold a row's pieces, so one warp-wide access covers kRowsPerStep whole rows
// (whole 128-byte lines); each warp owns kRowsPerWarp consecutive rows, a lane kPieces of them.
// Either way a lane holds K / 2 elements: 64 floats of registers at K = 128.
template <int K, typename T, bool kVFirst>
struct Tile {
  static constexpr int kElements = Piece<T>::kElements;
  static constexpr int kRowElements = kVFirst ? K : kSliceColumns;
  static constexpr int kLanesPerRow = kRowElements / kElements;
  static constexpr int kRowsPerStep = kWarpSize / kLanesPerRow;
  static constexpr int kRows = kVFirst ? kSliceColumns : K;
  static constexpr int kRowsPerWarp = kRows / kWarps;
  static constexpr int kPieces = kRowsPerWarp / kRowsPerStep;
  static_assert(kElements * sizeof(T) == kPieceBytes, "16-byte accesses");
  static_assert(kLanesPerRow * kElements == kRowElements && kLanesPerRow <= kWarpSize, "rows of whole pieces");
  static_assert(kPieces * kRowsPerStep * kWarps == kRows, "the warps cover the tile");
};

// Per key channel: decay e^a, k̂, scale q̂ and β k̂ (one 16-byte shared-memory read per channel).
struct alignas(16) Channel {
  float decay, khat, qhat, beta_khat;
};

template <int K>
struct Shared {
  Channel channel[K];
  float value[kSliceColumns];  // v of the tile's columns
  float beta_kq;               // β k̂ · (scale q̂)
  float partial[kWarps][2][kSliceColumns];  // K-first: each warp's share of S'ᵀ k̂ and S'ᵀ (scale q̂)
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int lanes_apart = kWarpSize / 2; lanes_apart > 0; lanes_apart /= 2) x += __shfl_xor_sync(kFullMask, x, lanes_apart);
  return x;
}

// Warp 0 of the CTA: the channel table of value head `vhead` of sequence `seq` (docs/CONTRACT.md's
// pre-processing; each lane takes K / 32 consecutive channels).
template <int K>
__device__ void channel_table(const DecodeParams &p, int seq, int vhead, Shared<K> &smem) {
  constexpr int kPerLane = K / kWarpSize;
  const int lane = threadIdx.x;
  const int head = vhead / (p.value_heads / p.heads);  // grouped value heads share q and k
  const int64_t qk_row = (int64_t(seq) * p.heads + head) * K + lane * kPerLane;
  const int64_t g_row = (int64_t(seq) * p.value_heads + vhead) * K + lane * kPerLane;
  // Every input's load issued before any value is used (kept as loaded bits until then): converted or
  // used right after it, each load waited its latency in turn, and this is the kernel's prologue.
  uint32_t q_bits[kPerLane], k_bits[kPerLane], g_bits[kPerLane];
  float bias[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    q_bits[j] = load_scalar_bits(p.q, qk_row + j, p.qkv_is_f32);
    k_bits[j] = load_scalar_bits(p.k, qk_row + j, p.qkv_is_f32);
    g_bits[j] = load_scalar_bits(p.g, g_row + j, p.g_is_f32);
    bias[j] = p.gate != GateMode::kGiven && p.dt_bias != nullptr ? p.dt_bias[vhead * K + lane * kPerLane + j] : 0.f;
  }
  const uint32_t beta_bits = load_scalar_bits(p.beta, int64_t(seq) * p.value_heads + vhead, p.beta_is_f32);
  const float a_log = p.A_log != nullptr ? p.A_log[vhead] : 0.f;  // 0 without A_log: a scale of expf(0) = 1
  float q[kPerLane], k[kPerLane];
  float q_squares = 0.f, k_squares = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    q[j] = scalar_of_bits(q_bits[j], p.qkv_is_f32);
    k[j] = scalar_of_bits(k_bits[j], p.qkv_is_f32);
    q_squares += q[j] * q[j];
    k_squares += k[j] * k[j];
  }
  const float q_norm = p.l2norm ? rsqrtf(warp_sum(q_squares) + kL2NormEps) : 1.f;
  const float k_norm = p.l2norm ? rsqrtf(warp_sum(k_squares) + kL2NormEps) : 1.f;
  float beta = scalar_of_bits(beta_bits, p.beta_is_f32);
  if (p.beta_sigmoid) beta = (p.allow_neg_eigval ? 2.f : 1.f) / (1.f + expf(-beta));
  const float a_scale = expf(a_log);

  float beta_kq = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane * kPerLane + j;
    float a = scalar_of_bits(g_bits[j], p.g_is_f32);
    if (p.gate != GateMode::kGiven) {
      const float x = a + bias[j];
      if (p.gate == GateMode::kSoftplus) {
        a = -a_scale * (x > kSoftplusThreshold ? x : log1pf(expf(x)));
      } else {
        a = p.lower_bound / (1.f + expf(-a_scale * x));
      }
    }
    const float khat = k[j] * k_norm, qhat = q[j] * (q_norm * p.scale);
    smem.channel[c] = Channel{expf(a), khat, qhat, beta * khat};
    beta_kq += beta * khat * qhat;
  }
  beta_kq = warp_sum(beta_kq);
  if (lane == 0) smem.beta_kq = beta_kq;
}

template <int K, typename T, bool kVFirst>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) decode_kernel(const __grid_constant__ DecodeParams p) {
  using G = Tile<K, T, kVFirst>;
  constexpr int E = G::kElements;
  __shared__ Shared<K> smem;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int head_state = blockIdx.x;  // sequence * HV + value head
  const int seq = head_state / p.value_heads, vhead = head_state % p.value_heads;
  const int V = p.head_dim_v, column0 = blockIdx.y * kSliceColumns;
  const int64_t base = int64_t(head_state) * K * V;

  // Where piece i of this lane lies: its row of the tile, and its first element within the row.
  const int row_in_step = lane / G::kLanesPerRow, element0 = (lane % G::kLanesPerRow) * E;
  auto tile_row = [&](int i) { return warp * G::kRowsPerWarp + i * G::kRowsPerStep + row_in_step; };
  // V-first: row = value column (valid below V); K-first: row = key channel, columns element0.. valid.
  auto offset = [&](int i) {
    return kVFirst ? base + int64_t(column0 + tile_row(i)) * K + element0 : base + int64_t(tile_row(i)) * V + column0 + element0;
  };
  auto valid = [&](int i) { return (kVFirst ? column0 + tile_row(i) : column0 + element0) < V; };

  // 1. The state pieces (kept as loaded) and the values; their latency overlaps step 2.
  const T *state = static_cast<const T *>(p.state);
  uint4 raw[G::kPieces];
#pragma unroll
  for (int i = 0; i < G::kPieces; ++i) {
    raw[i] = valid(i) ? *reinterpret_cast<const uint4 *>(state + offset(i)) : make_uint4(0u, 0u, 0u, 0u);
  }
  // The values by the last warps, so that warp 0 starts the channel table's loads without waiting for them.
  static_assert(kSliceColumns <= kThreads - kWarpSize, "the values are not warp 0's");
  if (const int column = int(threadIdx.x) - (kThreads - kSliceColumns); column >= 0) {
    smem.value[column] = column0 + column < V
                             ? load_scalar(p.v, int64_t(head_state) * V + column0 + column, p.qkv_is_f32)
                             : 0.f;
  }
  // 2. The channel table.
  if (warp == 0) channel_table<K>(p, seq, vhead, smem);
  __syncthreads();

  // 3. S' = diag(e^a) S in registers, and this lane's share of S'ᵀ k̂ and S'ᵀ (scale q̂).
  float s[G::kPieces][E];
#pragma unroll
  for (int i = 0; i < G::kPieces; ++i) Piece<T>::unpack(raw[i], s[i]);
  T *new_state = static_cast<T *>(p.new_state);
  const float beta_kq = smem.beta_kq;

  if constexpr (kVFirst) {
    // A lane's channels are the same in every piece it holds.
    Channel ch[E];
#pragma unroll
    for (int e = 0; e < E; ++e) ch[e] = smem.channel[element0 + e];
#pragma unroll
    for (int i = 0; i < G::kPieces; ++i) {
      float dot_k = 0.f, dot_q = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        s[i][e] *= ch[e].decay;
        dot_k += s[i][e] * ch[e].khat;
        dot_q += s[i][e] * ch[e].qhat;
      }
      // The row's lanes are consecutive: the butterfly stays within them.
#pragma unroll
      for (int lanes_apart = G::kLanesPerRow / 2; lanes_apart > 0; lanes_apart /= 2) {
        dot_k += __shfl_xor_sync(kFullMask, dot_k, lanes_apart);
        dot_q += __shfl_xor_sync(kFullMask, dot_q, lanes_apart);
      }
      // 4. The row's residual, output and new state.
      const int row = tile_row(i);
      const float r = smem.value[row] - dot_k;
#pragma unroll
      for (int e = 0; e < E; ++e) s[i][e] += ch[e].beta_khat * r;
      if (valid(i)) {
        store_piece(new_state + offset(i), Piece<T>::pack(s[i]));
        if (element0 == 0) store_scalar(p.o, int64_t(head_state) * V + column0 + row, p.qkv_is_f32, dot_q + r * beta_kq);
      }
    }
  } else {
    float dot_k[E] = {}, dot_q[E] = {};
#pragma unroll
    for (int i = 0; i < G::kPieces; ++i) {
      const Channel ch = smem.channel[tile_row(i)];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        s[i][e] *= ch.decay;
        dot_k[e] += s[i][e] * ch.khat;
        dot_q[e] += s[i][e] * ch.qhat;
      }
    }
    // Lanes kLanesPerRow apart hold the same columns of other rows.
#pragma unroll
    for (int lanes_apart = G::kLanesPerRow; lanes_apart < kWarpSize; lanes_apart *= 2) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        dot_k[e] += __shfl_xor_sync(kFullMask, dot_k[e], lanes_apart);
        dot_q[e] += __shfl_xor_sync(kFullMask, dot_q[e], lanes_apart);
      }
    }
    if (row_in_step == 0) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        smem.partial[warp][0][element0 + e] = dot_k[e];
        smem.partial[warp][1][element0 + e] = dot_q[e];
      }
    }
    __syncthreads();
    // 4. Every lane sums the warps' shares for its columns (in a fixed order: deterministic).
    float r[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      float total_k = 0.f, total_q = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        total_k += smem.partial[w][0][element0 + e];
        total_q += smem.partial[w][1][element0 + e];
      }
      r[e] = smem.value[element0 + e] - total_k;
      dot_q[e] = total_q + r[e] * beta_kq;
    }
#pragma unroll
    for (int i = 0; i < G::kPieces; ++i) {
      const float beta_khat = smem.channel[tile_row(i)].beta_khat;
#pragma unroll
      for (int e = 0; e < E; ++e) s[i][e] += beta_khat * r[e];
      if (valid(i)) store_piece(new_state + offset(i), Piece<T>::pack(s[i]));
    }
    if (warp == 0 && row_in_step == 0 && valid(0)) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        store_scalar(p.o, int64_t(head_state) * V + column0 + element0 + e, p.qkv_is_f32, dot_q[e]);
      }
    }
  }
}

template <int K, typename T, bool kVFirst>
cudaError_t launch(const DecodeParams &p, cudaStream_t stream) {
  const dim3 grid(p.sequences * p.value_heads, (p.head_dim_v + kSliceColumns - 1) / kSliceColumns);
  decode_kernel<K, T, kVFirst><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int K, typename T>
cudaError_t launch_layout(const DecodeParams &p, cudaStream_t stream) {
  return p.state_v_first ? launch<K, T, true>(p, stream) : launch<K, T, false>(p, stream);
}

template <int K>
cudaError_t launch_dtype(const DecodeParams &p, cudaStream_t stream) {
  return p.state_is_f32 ? launch_layout<K, float>(p, stream) : launch_layout<K, bf16>(p, stream);
}

}  // namespace

cudaError_t decode_launch(const DecodeParams &p, cudaStream_t stream) {
  if (decode_unsupported(p.head_dim_k, p.head_dim_v) != nullptr) return cudaErrorInvalidValue;
  if (p.sequences == 0 || p.value_heads == 0) return cudaSuccess;
  return p.head_dim_k == 128 ? launch_dtype<128>(p, stream) : launch_dtype<64>(p, stream);
}

}  // namespace jax_kda
