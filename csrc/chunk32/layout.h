// Shared by the kernel_next go/no-go microkernels (state_chain.cu, factor_build.cu) and the host-side
// layout check (common_layout_check.cu): problem sizes, the shared-memory image of one chunk's factors
// (the "factor stage" the state warpgroups read with wgmma), the swizzle that places an element in it,
// the wgmma shared-memory descriptors that read it, and the wgmma register-fragment maps.
//
// Everything here is plain arithmetic usable on host and device, so that the host builds and decodes
// exactly the bytes the kernels read and write.
//
// Layout facts relied on (checked against CuTe by common_layout_check.cu, which compiles and runs on a
// CPU):
//  * 128-byte swizzle: within each 1024-byte block (8 rows of 128 bytes), the 16-byte chunk index
//    (address bits 4-6) is XORed with the row index (address bits 7-9); CuTe Swizzle<3,4,3> on byte
//    addresses. 64-byte swizzle: bits 4-5 XOR bits 7-8 (Swizzle<2,4,3>). The hardware swizzles
//    absolute shared-memory addresses, so every tile base is 1024-byte aligned (descriptor base_offset 0).
//  * wgmma descriptor (PTX ISA "matrix descriptor format"; CuTe GmmaDescriptor): bits 0-13 start
//    address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset,
//    62-63 swizzle mode (1: 128B, 2: 64B, 3: 32B, 0: none).
//  * K-major swizzled operand: rows (M or N) 8 at a time, SBO = bytes from one 8-row group to the next,
//    LBO unused (CuTe writes 1, i.e. 16 bytes); the k16 step inside a swizzled row advances the start
//    address by 32 bytes (16 bf16).
//  * MN-major 128B-swizzled operand (bf16): 64 contiguous M elements per 128-byte row, one row per k;
//    SBO = bytes from one group of 8 k-rows to the next, LBO = bytes from one 64-element M block to the
//    next (unused for M = 64).
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define CHUNK32_HD __host__ __device__ __forceinline__
#else
#define CHUNK32_HD inline
#endif

namespace jax_kda {
namespace chunk32 {

// ---- sizes ------------------------------------------------------------------------------------
constexpr int kChunk = 32;                             // tokens per chunk

// The contract's three gates (docs/CONTRACT.md), natural-log decay of one channel of one token:
// bounded lower_bound sigmoid(A (g + b)), softplus -A softplus(g + b) (softplus(x) = x past 20), or g
// given as the log-decay. A = exp(A_log), b = dt_bias. The host references use it; the kernels have
// their own fast form of each (factor_group.cuh).
enum class GateMode : int { kBounded, kSoftplus, kLogDecay };
inline double gate_log_decay(GateMode mode, double g, double a_scale, double bias, double lower_bound) {
  const double x = g + bias;
  switch (mode) {
    case GateMode::kSoftplus: return -a_scale * (x > 20.0 ? x : std::log1p(std::exp(x)));
    case GateMode::kLogDecay: return g;
    default: return lower_bound / (1.0 + std::exp(-a_scale * x));
  }
}
constexpr int kSubBlock = 16;                          // tokens per sub-block (anchor at its boundary)
constexpr int kDimK = 128;                             // key channels
constexpr int kDimV = 128;                             // value channels
constexpr int kWarpgroupThreads = 128;
constexpr int kStateGroups = 2;                        // state warpgroups per CTA
constexpr int kGroupRows = kDimV / kStateGroups;       // 64 V rows per state warpgroup (wgmma M)
constexpr int kBf16Bytes = 2;

// ---- swizzles ---------------------------------------------------------------------------------
constexpr uint32_t kSwizzleRowBytes128 = 128;  // one swizzled row of the 128B mode
constexpr uint32_t kSwizzleAtomBytes128 = 1024;
constexpr uint32_t kSwizzleRowBytes64 = 64;
constexpr uint32_t kSwizzleAtomBytes64 = 512;
constexpr uint32_t kSwizzleAlign = 1024;       // tile bases: absolute address bits 7-9 must be the row

CHUNK32_HD uint32_t swizzle_128b(uint32_t byte) { return byte ^ (((byte >> 7) & 7u) << 4); }
// swizzle_128b(row * 128 + column_byte) for a column byte below 128, written out: the column's 16-byte
// chunk XOR row % 8. The same offset, but the compiler sees the XOR fold to a constant for a
// compile-time row (through swizzle_128b's shifts it cannot bound the column).
CHUNK32_HD uint32_t swizzle_128b_at(uint32_t row, uint32_t column_byte) {
  return row * kSwizzleRowBytes128 + (column_byte ^ (row % 8 * 16));
}
CHUNK32_HD uint32_t swizzle_64b(uint32_t byte) { return byte ^ (((byte >> 7) & 3u) << 4); }

// ---- the factor stage: one chunk's factors, as the state warpgroups read them --------------------
// Tile WQ (bf16, 64 rows x 128 channels, K-major, 128B swizzle): rows 0-31 hold W' = -W (token-major),
//   rows 32-63 hold Qd (or Qd' = Qd + Aqk W' in the fused-output variant). Rows go in groups of 8; a
//   group is 2048 bytes: channels 0-63 (one 1024-byte swizzle atom), then channels 64-127.
// Tile TA (bf16, 64 rows x 32 tokens, K-major, 64B swizzle): rows 0-31 hold T beta = (I + L)^-1 diag(beta),
//   rows 32-63 hold Aqk (or Aqk T beta in the fused variant). One 64-byte row per matrix row.
// Tile KendT (bf16, 128 channel rows x 32 tokens, K-major, 64B swizzle): Kend transposed.
// decay (fp32 x 128): exp(Gamma_C) per key channel.
// Tile V (bf16, [state group][32 tokens][64 values], MN-major, 128B swizzle): the chunk's values as a
//   bulk tensor copy (64 x 32 box, 128B swizzle) would place them; read as the A operand V^T.
constexpr uint32_t kWqRows = 64, kWqGroupBytes = 2048;
constexpr uint32_t kTaRows = 64, kKendRows = kDimK;
constexpr uint32_t kWRow0 = 0, kQdRow0 = 32;       // rows of W' and Qd inside WQ
constexpr uint32_t kTbetaRow0 = 0, kAqkRow0 = 32;  // rows of T beta and Aqk inside TA
constexpr uint32_t kVGroupBytes = kChunk * kSwizzleRowBytes128;  // 4096: one state group's 64 columns

constexpr uint32_t kStageWq = 0;
constexpr uint32_t kStageTa = kStageWq + kWqRows * kDimK * kBf16Bytes;          // 16384
constexpr uint32_t kStageKend = kStageTa + kTaRows * kChunk * kBf16Bytes;       // 20480
constexpr uint32_t kStageDecay = kStageKend + kKendRows * kChunk * kBf16Bytes;  // 28672
constexpr uint32_t kFactorBytes = kStageDecay + kDimK * 4;                      // 29184: what the factor build writes
constexpr uint32_t kStageV = (kFactorBytes + kSwizzleAlign - 1) / kSwizzleAlign * kSwizzleAlign;  // 29696
constexpr uint32_t kStageBytes = kStageV + kStateGroups * kVGroupBytes;                            // 37888
static_assert(kStageWq % kSwizzleAlign == 0 && kStageTa % kSwizzleAlign == 0 && kStageKend % kSwizzleAlign == 0 &&
                  kStageV % kSwizzleAlign == 0 && kStageBytes % kSwizzleAlign == 0,
              "swizzled tiles start 1024-byte aligned");

// Byte offset of element (row, channel) inside tile WQ.
CHUNK32_HD uint32_t wq_offset(int row, int channel) {
  const uint32_t r = uint32_t(row), c = uint32_t(channel);
  return r / 8 * kWqGroupBytes + c / 64 * kSwizzleAtomBytes128 + swizzle_128b_at(r % 8, c % 64 * kBf16Bytes);
}
// Byte offset of element (row, col) inside a K-major tile of 32 bf16 per row (TA, KendT).
CHUNK32_HD uint32_t k32_offset(int row, int col) {
  return swizzle_64b(uint32_t(row) * kSwizzleRowBytes64 + uint32_t(col) * kBf16Bytes);
}
// Byte offset of V[token][value] inside tile V.
CHUNK32_HD uint32_t v_offset(int token, int value) {
  const uint32_t v = uint32_t(value);
  return v / kGroupRows * kVGroupBytes + swizzle_128b_at(uint32_t(token), v % kGroupRows * kBf16Bytes);
}

// ---- wgmma shared-memory descriptors ------------------------------------------------------------
constexpr uint64_t kDescSwizzle128 = 1, kDescSwizzle64 = 2;
constexpr uint32_t kDescUnusedLeading = 16;  // LBO of swizzled K-major operands: unused, CuTe writes 1 (x16 B)

CHUNK32_HD uint64_t make_descriptor(uint32_t smem_address, uint32_t leading_bytes, uint32_t stride_bytes,
                               uint64_t swizzle) {
  return uint64_t((smem_address >> 4) & 0x3FFFu) | (uint64_t((leading_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFFu) << 32) | (swizzle << 62);
}
// B operand from WQ: rows first_row.. (N = 32 or 64 of them), k16 step `k_step` (0..7) over the channels.
CHUNK32_HD uint64_t wq_descriptor(uint32_t tile_address, uint32_t first_row, int k_step) {
  const uint32_t start = tile_address + first_row / 8 * kWqGroupBytes + uint32_t(k_step / 4) * kSwizzleAtomBytes128 +
                         uint32_t(k_step % 4) * 16 * kBf16Bytes;
  return make_descriptor(start, kDescUnusedLeading, kWqGroupBytes, kDescSwizzle128);
}
// B operand from a 32-column K-major tile (TA, KendT): rows first_row.., k16 step `k_step` (0..1).
CHUNK32_HD uint64_t k32_descriptor(uint32_t tile_address, uint32_t first_row, int k_step) {
  const uint32_t start = tile_address + first_row * kSwizzleRowBytes64 + uint32_t(k_step) * 16 * kBf16Bytes;
  return make_descriptor(start, kDescUnusedLeading, kSwizzleAtomBytes64, kDescSwizzle64);
}
// A operand V^T (M = 64 values of state group `group`, K = 16 tokens of k16 step `k_step`), MN-major.
CHUNK32_HD uint64_t v_descriptor(uint32_t tile_address, int group, int k_step) {
  const uint32_t start = tile_address + uint32_t(group) * kVGroupBytes + uint32_t(k_step) * 16 * kSwizzleRowBytes128;
  return make_descriptor(start, kVGroupBytes, kSwizzleAtomBytes128, kDescSwizzle128);
}

// ---- wgmma register fragments (PTX ISA figures "WGMMA .m64nNk16 register fragment layout"; CuTe
// CLayout_64xN and ALayout_64x16) ------------------------------------------------------------------
// Accumulator (f32): thread t of the warpgroup, value i (0 .. N/2-1).
CHUNK32_HD int acc_row(int thread, int i) { return 16 * (thread / 32) + (thread % 32) / 4 + 8 * ((i / 2) % 2); }
CHUNK32_HD int acc_col(int thread, int i) { return 8 * (i / 4) + 2 * (thread % 4) + (i % 2); }
// Register A operand (bf16, 64 x 16): element j (0..7; register j/2, low half for even j).
CHUNK32_HD int a_row(int thread, int j) { return 16 * (thread / 32) + (thread % 32) / 4 + 8 * ((j / 2) % 2); }
CHUNK32_HD int a_col(int thread, int j) { return 8 * (j / 4) + 2 * (thread % 4) + (j % 2); }
// Hence (compare the two maps): accumulator values 8 kb .. 8 kb + 7 of a thread are its A elements
// 0..7 for the k16 block kb of the same rows: the conversion accumulator -> A operand is register-local,
// A register r of block kb = bf16x2(acc[8 kb + 2 r], acc[8 kb + 2 r + 1]) (low half first).

}  // namespace chunk32
}  // namespace jax_kda
