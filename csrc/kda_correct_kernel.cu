// Correction of segmented prefill outputs (see jax_kda/segments.py and kda_correct.h).
//
// A prefill with transition columns leaves, for every token t of a segment, its output from a zero
// state and its effective query q_eff(t) = scale q̂ᵀ Φ_t. Once the state S entering each segment is
// known, o(t) = o_local(t) + q_eff(t) S. Memory-bound: each token row of o_aug is read once and o
// written once, all with 16-byte accesses. A CTA takes 256 tokens x 64 value columns of one head:
// the 64 columns of S (an exact pair S_hi + S_lo of bf16, so the product keeps fp32 accuracy) sit in
// shared memory; each warp stages 16-token tiles of queries and outputs there and multiplies with
// mma.sync (bf16 operands, fp32 accumulation).

#include "device_helpers.cuh"
#include "kda_correct.h"

namespace jax_kda {
namespace {

constexpr int kTile = 16;          // tokens per warp tile
constexpr int kWarps = 4;
constexpr int kTilesPerWarp = 4;   // a CTA covers kWarps * kTilesPerWarp * kTile = 256 tokens
constexpr int kColumns = kValueStep;  // value columns per CTA: V in steps of 64 (kda_contract.h)
constexpr int kPad = 8;            // bf16 elements of row padding: rows 16 bytes apart in banks

using device::bf16;
using device::ldsm_x4;
using device::mma;
using cute::uint128_t;

// The segment holding token t: the last s < n with cu[s] <= t (empty segments are skipped).
__device__ int segment_of(const int32_t *cu, int n, int t) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <int K>
struct Smem {
  static constexpr int kStateRow = K + kPad, kQueryRow = K + kPad, kOutRow = kColumns + kPad;
  bf16 state_hi[kColumns * kStateRow], state_lo[kColumns * kStateRow];  // S[v][k] of the CTA's columns
  struct {
    bf16 queries[kTile * kQueryRow];
    bf16 out[kTile * kOutRow];
  } warp[kWarps];
};

template <int K>
__global__ void __launch_bounds__(kWarps * 32) correct_kernel(const __grid_constant__ CorrectParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  auto &smem = *reinterpret_cast<Smem<K> *>(smem_raw);
  using S = Smem<K>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int head = blockIdx.y, c0 = blockIdx.z * kColumns;
  const int V = p.head_dim_v, width = V + K;
  const int begin = blockIdx.x * kWarps * kTilesPerWarp * kTile;
  const int end = min(begin + kWarps * kTilesPerWarp * kTile, p.tokens);
  const bf16 *o_aug = static_cast<const bf16 *>(p.o_aug);
  bf16 *o = static_cast<bf16 *>(p.o);
  bf16 *queries = smem.warp[warp].queries, *out = smem.warp[warp].out;
  const int gid = lane >> 2, tq = lane & 3;

  const int first = segment_of(p.cu_seqlens, p.num_segments, begin);
  const int last = segment_of(p.cu_seqlens, p.num_segments, end - 1);
  for (int seg = first; seg <= last; ++seg) {  // almost always one
    const int seg_begin = p.cu_seqlens[seg], seg_end = p.cu_seqlens[seg + 1];
    if (seg_begin == seg_end) continue;
    __syncthreads();  // the previous segment's state is no longer read
    {
      const int64_t state = (int64_t(seg) * p.value_heads + head) * V * K + int64_t(c0) * K;
      constexpr int kPieces = K / 8;  // 16-byte pieces per state row
      for (int i = threadIdx.x; i < kColumns * kPieces; i += kWarps * 32) {
        const int row = i / kPieces, piece = i % kPieces;
        const int64_t at = state + int64_t(row) * K + piece * 8;
        *reinterpret_cast<uint128_t *>(smem.state_hi + row * S::kStateRow + piece * 8) =
            *reinterpret_cast<const uint128_t *>(static_cast<const bf16 *>(p.entry_hi) + at);
        *reinterpret_cast<uint128_t *>(smem.state_lo + row * S::kStateRow + piece * 8) =
            *reinterpret_cast<const uint128_t *>(static_cast<const bf16 *>(p.entry_lo) + at);
      }
    }
    __syncthreads();

    for (int it = 0; it < kTilesPerWarp; ++it) {
      const int t0 = begin + (it * kWarps + warp) * kTile;
      if (t0 >= end || t0 >= seg_end || t0 + kTile <= seg_begin) continue;
      // Stage this tile's effective queries (16 x K) and outputs from a zero state (16 x 64).
      constexpr int kQueryPieces = K / 8, kOutPieces = kColumns / 8;
      for (int i = lane; i < kTile * kQueryPieces; i += 32) {
        const int r = i / kQueryPieces, piece = i % kQueryPieces, t = t0 + r;
        uint128_t value{};
        if (t < end) value = *reinterpret_cast<const uint128_t *>(o_aug + (int64_t(t) * p.value_heads + head) * width + V + piece * 8);
        *reinterpret_cast<uint128_t *>(queries + r * S::kQueryRow + piece * 8) = value;
      }
      for (int i = lane; i < kTile * kOutPieces; i += 32) {
        const int r = i / kOutPieces, piece = i % kOutPieces, t = t0 + r;
        uint128_t value{};
        if (t < end) value = *reinterpret_cast<const uint128_t *>(o_aug + (int64_t(t) * p.value_heads + head) * width + c0 + piece * 8);
        *reinterpret_cast<uint128_t *>(out + r * S::kOutRow + piece * 8) = value;
      }
      __syncwarp();

      float acc[kColumns / 8][4] = {};
#pragma unroll
      for (int ks = 0; ks < K / 16; ++ks) {
        uint32_t a[4];
        ldsm_x4(queries + ((lane & 7) + ((lane >> 3) & 1) * 8) * S::kQueryRow + ks * 16 + (lane >> 4) * 8, a);
#pragma unroll
        for (int pair = 0; pair < kColumns / 16; ++pair) {  // two 8-column n-tiles per ldmatrix
          const int row = pair * 16 + (lane & 7) + (lane >> 4) * 8, col = ks * 16 + ((lane >> 3) & 1) * 8;
          uint32_t hi[4], lo[4];
          ldsm_x4(smem.state_hi + row * S::kStateRow + col, hi);
          ldsm_x4(smem.state_lo + row * S::kStateRow + col, lo);
          mma(acc[2 * pair], a, hi[0], hi[1]);
          mma(acc[2 * pair], a, lo[0], lo[1]);
          mma(acc[2 * pair + 1], a, hi[2], hi[3]);
          mma(acc[2 * pair + 1], a, lo[2], lo[3]);
        }
      }
      // o = o_local + correction, in place in the staging tile, then 16-byte stores of this segment's rows.
#pragma unroll
      for (int j = 0; j < kColumns / 8; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          auto *at = reinterpret_cast<__nv_bfloat162 *>(out + (gid + r * 8) * S::kOutRow + j * 8 + 2 * tq);
          const float2 local = __bfloat1622float2(*at);
          *at = __floats2bfloat162_rn(local.x + acc[j][2 * r], local.y + acc[j][2 * r + 1]);
        }
      }
      __syncwarp();
      for (int i = lane; i < kTile * kOutPieces; i += 32) {
        const int r = i / kOutPieces, piece = i % kOutPieces, t = t0 + r;
        if (t < seg_begin || t >= seg_end || t >= end) continue;
        *reinterpret_cast<uint128_t *>(o + (int64_t(t) * p.value_heads + head) * V + c0 + piece * 8) =
            *reinterpret_cast<const uint128_t *>(out + r * S::kOutRow + piece * 8);
      }
      __syncwarp();  // the staging tiles are rewritten by the next tile
    }
  }
}

template <int K>
cudaError_t launch(const CorrectParams &p, cudaStream_t stream) {
  const int tokens_per_block = kWarps * kTilesPerWarp * kTile;
  dim3 grid((p.tokens + tokens_per_block - 1) / tokens_per_block, p.value_heads, p.head_dim_v / kColumns);
  const int bytes = sizeof(Smem<K>);
  cudaError_t err = cudaFuncSetAttribute(correct_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  correct_kernel<K><<<grid, kWarps * 32, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t correct_launch(const CorrectParams &p, cudaStream_t stream) {
  if (correct_unsupported(p.head_dim_k, p.head_dim_v) != nullptr) return cudaErrorInvalidValue;
  if (p.tokens == 0 || p.value_heads == 0) return cudaSuccess;
  return p.head_dim_k == 128 ? launch<128>(p, stream) : launch<64>(p, stream);
}

}  // namespace jax_kda
