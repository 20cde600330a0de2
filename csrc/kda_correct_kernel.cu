// Correction of segmented prefill outputs (see jax_kda/segments.py and kda_correct.h).
//
// A prefill with transition columns leaves, for every token t of a segment, its output from a zero
// state and its effective query q_eff(t) = scale q̂ᵀ Φ_t. Once the state S entering each segment is
// known, o(t) = o_local(t) + q_eff(t) S. Memory-bound: each token row of o_aug is read once and o
// written once, all with 16-byte accesses. A CTA takes 1024 tokens x 64 value columns of one head:
// the 64 columns of S (an exact pair S_hi + S_lo of bf16, so the product keeps fp32 accuracy) sit in
// shared memory; each warp streams 16-token tiles of queries and outputs through a two-stage cp.async
// pipeline (the next tile in flight while this one is multiplied with mma.sync, bf16 operands, fp32
// accumulation). The CTAs of one token range's heads and column blocks are adjacent in the grid, so
// the second column block's queries come from L2.

#include <cute/arch/copy_sm80.hpp>
#include <type_traits>

#include "device_helpers.cuh"
#include "kda_correct.h"

namespace jax_kda {
namespace {

constexpr int kTile = 16;           // tokens per warp tile
constexpr int kWarps = 4;
constexpr int kTilesPerWarp = 16;   // a CTA covers kWarps * kTilesPerWarp * kTile = 1024 tokens
constexpr int kTokensPerBlock = kWarps * kTilesPerWarp * kTile;
constexpr int kStages = 2;          // tiles a warp holds: one multiplied, one loading
constexpr int kColumns = kValueStep;  // value columns per CTA: V in steps of 64 (kda_contract.h)
constexpr int kPad = 8;             // bf16 elements of row padding: rows 16 bytes apart in banks

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
  struct Tile {
    bf16 queries[kTile * kQueryRow];
    bf16 out[kTile * kOutRow];
  };
  Tile warp[kWarps][kStages];
};

// Starts the copies of one tile (rows t0 .. t0 + 15) into `tile`: the K effective-query columns and
// this CTA's 64 output columns of each token row. Rows at or past `end` read as zeros.
template <int K>
__device__ void load_tile(const CorrectParams &p, int head, int c0, int t0, int end, int lane,
                          typename Smem<K>::Tile &tile) {
  using S = Smem<K>;
  const bf16 *o_aug = static_cast<const bf16 *>(p.o_aug);
  const int width = p.head_dim_v + K;
  // Columns [col, col + 8 kPieces) of the tile's token rows into dst (rows `row_elements` apart).
  auto copy_rows = [&](auto pieces, int col, bf16 *dst, int row_elements) {
    constexpr int kPieces = decltype(pieces)::value;  // 16-byte pieces per row
#pragma unroll
    for (int i = lane; i < kTile * kPieces; i += 32) {
      const int r = i / kPieces, piece = i % kPieces, t = t0 + r;
      const bool ok = t < end;
      const bf16 *src = o_aug + (ok ? (int64_t(t) * p.value_heads + head) * width + col : 0) + piece * 8;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
          *reinterpret_cast<const uint128_t *>(src),
          *reinterpret_cast<uint128_t *>(dst + r * row_elements + piece * 8), ok);
    }
  };
  copy_rows(std::integral_constant<int, K / 8>(), p.head_dim_v, tile.queries, S::kQueryRow);
  copy_rows(std::integral_constant<int, kColumns / 8>(), c0, tile.out, S::kOutRow);
}

// Starts the copies of the CTA's 64 columns of the state entering segment `seg` into shared memory (all
// threads; asynchronous, so that a thread's pieces are all in flight at once: loaded into registers
// and stored, each store waited for its load in turn).
template <int K>
__device__ void load_state(const CorrectParams &p, int seg, int head, int c0, Smem<K> &smem) {
  using S = Smem<K>;
  constexpr int kPieces = K / 8;  // 16-byte pieces per state row
  const int64_t state = (int64_t(seg) * p.value_heads + head) * p.head_dim_v * K + int64_t(c0) * K;
  for (int i = threadIdx.x; i < kColumns * kPieces; i += kWarps * 32) {
    const int row = i / kPieces, piece = i % kPieces;
    const int64_t at = state + int64_t(row) * K + piece * 8;
    cute::SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(
        *reinterpret_cast<const uint128_t *>(static_cast<const bf16 *>(p.entry_hi) + at),
        *reinterpret_cast<uint128_t *>(smem.state_hi + row * S::kStateRow + piece * 8));
    cute::SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(
        *reinterpret_cast<const uint128_t *>(static_cast<const bf16 *>(p.entry_lo) + at),
        *reinterpret_cast<uint128_t *>(smem.state_lo + row * S::kStateRow + piece * 8));
  }
}

// o = o_local + q_eff S for one staged tile, then 16-byte stores of the rows in [lo, hi).
template <int K>
__device__ void correct_tile(const CorrectParams &p, const Smem<K> &smem, typename Smem<K>::Tile &tile, int head,
                             int c0, int t0, int lo, int hi, int lane) {
  using S = Smem<K>;
  const int gid = lane >> 2, tq = lane & 3;
  float acc[kColumns / 8][4] = {};
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t a[4];
    ldsm_x4(tile.queries + ((lane & 7) + ((lane >> 3) & 1) * 8) * S::kQueryRow + ks * 16 + (lane >> 4) * 8, a);
#pragma unroll
    for (int pair = 0; pair < kColumns / 16; ++pair) {  // two 8-column n-tiles per ldmatrix
      const int row = pair * 16 + (lane & 7) + (lane >> 4) * 8, col = ks * 16 + ((lane >> 3) & 1) * 8;
      uint32_t s_hi[4], s_lo[4];
      ldsm_x4(smem.state_hi + row * S::kStateRow + col, s_hi);
      ldsm_x4(smem.state_lo + row * S::kStateRow + col, s_lo);
      mma(acc[2 * pair], a, s_hi[0], s_hi[1]);
      mma(acc[2 * pair], a, s_lo[0], s_lo[1]);
      mma(acc[2 * pair + 1], a, s_hi[2], s_hi[3]);
      mma(acc[2 * pair + 1], a, s_lo[2], s_lo[3]);
    }
  }
  // In place in the staging tile, then out by rows.
#pragma unroll
  for (int j = 0; j < kColumns / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      auto *at = reinterpret_cast<__nv_bfloat162 *>(tile.out + (gid + r * 8) * S::kOutRow + j * 8 + 2 * tq);
      const float2 local = __bfloat1622float2(*at);
      *at = __floats2bfloat162_rn(local.x + acc[j][2 * r], local.y + acc[j][2 * r + 1]);
    }
  }
  __syncwarp();
  constexpr int kOutPieces = kColumns / 8;
  bf16 *o = static_cast<bf16 *>(p.o);
#pragma unroll
  for (int i = lane; i < kTile * kOutPieces; i += 32) {
    const int r = i / kOutPieces, piece = i % kOutPieces, t = t0 + r;
    if (t < lo || t >= hi) continue;
    *reinterpret_cast<uint128_t *>(o + (int64_t(t) * p.value_heads + head) * p.head_dim_v + c0 + piece * 8) =
        *reinterpret_cast<const uint128_t *>(tile.out + r * S::kOutRow + piece * 8);
  }
}

template <int K>
__global__ void __launch_bounds__(kWarps * 32) correct_kernel(const __grid_constant__ CorrectParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  auto &smem = *reinterpret_cast<Smem<K> *>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // blockIdx.x = (token block, head, column block), the column block fastest.
  const int column_blocks = p.head_dim_v / kColumns;
  const int c0 = int(blockIdx.x % column_blocks) * kColumns;
  const int head = int(blockIdx.x / column_blocks % p.value_heads);
  const int begin = int(blockIdx.x / column_blocks / p.value_heads) * kTokensPerBlock;
  const int end = min(begin + kTokensPerBlock, p.tokens);

  const int first = segment_of(p.cu_seqlens, p.num_segments, begin);
  const int last = segment_of(p.cu_seqlens, p.num_segments, end - 1);
  for (int seg = first; seg <= last; ++seg) {  // almost always one
    const int lo = max(p.cu_seqlens[seg], begin), hi = min(p.cu_seqlens[seg + 1], end);
    if (lo >= hi) continue;
    // This warp's tiles overlapping [lo, hi): t0 = begin + (it * kWarps + warp) * kTile.
    const int tile_lo = (lo - begin) / kTile, tile_hi = (hi - 1 - begin) / kTile;  // CTA tile indices
    const int it_first = max(0, (tile_lo - warp + kWarps - 1) / kWarps);
    const int it_end = tile_hi >= warp ? min(kTilesPerWarp, (tile_hi - warp) / kWarps + 1) : 0;
    auto tile_start = [&](int it) { return begin + (it * kWarps + warp) * kTile; };
    __syncthreads();  // the previous segment's state and tiles are no longer read
    if (it_first < it_end) load_tile<K>(p, head, c0, tile_start(it_first), hi, lane, smem.warp[warp][0]);
    load_state<K>(p, seg, head, c0, smem);
    cute::cp_async_fence();
    cute::cp_async_wait<0>();  // this thread's pieces of the state (and of its first tile) have landed
    __syncthreads();
    for (int it = it_first; it < it_end; ++it) {
      const int stage = (it - it_first) % kStages;
      if (it + 1 < it_end) load_tile<K>(p, head, c0, tile_start(it + 1), hi, lane, smem.warp[warp][stage ^ 1]);
      cute::cp_async_fence();  // an empty group at the last tile keeps the count
      cute::cp_async_wait<1>();
      __syncwarp();
      correct_tile<K>(p, smem, smem.warp[warp][stage], head, c0, tile_start(it), lo, hi, lane);
      __syncwarp();  // this stage is refilled two tiles on
    }
    cute::cp_async_wait<0>();
  }
}

template <int K>
cudaError_t launch(const CorrectParams &p, cudaStream_t stream) {
  const int64_t blocks = int64_t((p.tokens + kTokensPerBlock - 1) / kTokensPerBlock) * p.value_heads *
                         (p.head_dim_v / kColumns);
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const int bytes = sizeof(Smem<K>);
  cudaError_t err = cudaFuncSetAttribute(correct_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  correct_kernel<K><<<unsigned(blocks), kWarps * 32, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t correct_launch(const CorrectParams &p, cudaStream_t stream) {
  if (correct_unsupported(p.head_dim_k, p.head_dim_v) != nullptr) return cudaErrorInvalidValue;
  if (p.tokens == 0 || p.value_heads == 0) return cudaSuccess;
  return p.head_dim_k == 128 ? launch<128>(p, stream) : launch<64>(p, stream);
}

}  // namespace jax_kda
