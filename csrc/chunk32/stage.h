// The fused chunk-32 KDA prefill prototype (issue 10, stage 2): sizes, shared-memory layout, parameters.
// Shared by the kernel (fused_prefill.cu) and its host checks; plain arithmetic, host and device.
//
// One CTA per (sequence, head) chain, four warpgroups:
//   warpgroups 0, 1  state: S^T (64 V rows x 128 K each) in wgmma accumulators, one chunk step each chunk
//   warpgroups 2, 3  factor: take chunks in turn (group f builds chunks f, f + 2, ...); thread 0 of each
//                    also issues that group's bulk tensor copies (TMA) and so plays the load role
// The factor groups write a chunk's factors into a *stage* (the state warpgroups read it by wgmma);
// stages form a ring (chunk c -> stage c % kStages) with a full and an empty mbarrier each.
#pragma once

#include <cstdint>

#include "layout.h"

namespace jax_kda {
namespace chunk32 {

constexpr int kFactorGroups = 2;
constexpr int kStages = 2;     // factor stages in the ring (shared memory allows two beside the raw slots)
constexpr int kRawSlots = 2;   // raw-input slots per factor group: the group's next chunk loads while it builds
constexpr int kThreads = (kStateGroups + kFactorGroups) * kWarpgroupThreads;  // 512
constexpr int kStateThreads = kStateGroups * kWarpgroupThreads;              // 256
// setmaxnreg split of the 64K registers: 2 x 128 x 160 + 2 x 128 x 96 = 65536 (the launch cap is 128).
constexpr int kRegisterFile = 65536;
constexpr int kStateRegisters = 160, kFactorRegisters = 96;
static_assert(kStateGroups * kStateRegisters + kFactorGroups * kFactorRegisters <= kRegisterFile / kWarpgroupThreads,
              "register budget");
constexpr int kLoaderThread = 0;  // thread of a factor group that issues its copies and publishes its stages

constexpr int kF16Bytes = 2, kF32Bytes = 4;
CHUNK32_HD constexpr uint32_t align_up(uint32_t x, uint32_t a) { return (x + a - 1) / a * a; }

// ---- a stage (one chunk's factors, what the state warpgroups read) --------------------------------
// WQ   64 x 128 f16, K-major, 128B swizzle (layout.h wq_offset): rows 0-31 W' = -W, rows 32-63 Qd
// TA   64 x 32, K-major, 64B swizzle (k32_offset): rows 0-31 T beta hi part (bf16), rows 32-63 Aqk (f16)
// TBLO 32 x 32 bf16, like TA: T beta lo part (T beta = hi + lo: the V^T (T beta)^T product is bf16, V's type)
// KEND 128 x 32 f16 (Kend transposed), like TA
// DECAY 128 f32: 2^Gamma_C per key channel
// V    [2 state groups][32 tokens][64 values] bf16, 128B swizzle, as the bulk tensor copy writes a 64 x 32 box
constexpr uint32_t kStWq = 0;
constexpr uint32_t kStTa = kStWq + kWqRows * kDimK * kF16Bytes;          // 16384
constexpr uint32_t kStTbetaLo = kStTa + kTaRows * kChunk * kF16Bytes;    // 20480
constexpr uint32_t kTbetaBytes = kChunk * kChunk * kBf16Bytes;           // 2048: T beta hi (TA's rows 0-31) or lo
constexpr uint32_t kStKend = kStTbetaLo + kTbetaBytes;                   // 22528
constexpr uint32_t kStDecay = kStKend + kDimK * kChunk * kF16Bytes;      // 30720
constexpr uint32_t kStV = align_up(kStDecay + kDimK * kF32Bytes, kSwizzleAlign);  // 31744
constexpr uint32_t kVBytes = kStateGroups * kVGroupBytes;                // 8192
constexpr uint32_t kStBytes = kStV + kVBytes;                            // 39936
static_assert(kStTa % kSwizzleAlign == 0 && kStTbetaLo % kSwizzleAlign == 0 && kStKend % kSwizzleAlign == 0 &&
                  kStV % kSwizzleAlign == 0 && kStBytes % kSwizzleAlign == 0,
              "swizzled tiles start 1024-byte aligned");

// What the two-pass prefill's factor pass writes per chunk to global memory (two_pass.cuh): the stage up
// to V, at this pitch.
constexpr uint32_t kPassFactorBytes = kStDecay + kDimK * kF32Bytes;  // 31232
constexpr uint32_t kFactorPitch = kPassFactorBytes;
static_assert(kFactorPitch % 16 == 0, "bulk copies and the 16-byte Kend stores need 16-byte alignment");

// ---- raw inputs of one chunk (a slot of a factor group) -----------------------------------------
// q, k, g: [32 tokens][128 channels] bf16 as two bulk-tensor boxes of 32 x 64 (channels 0-63, 64-127), each
// 32 rows of 128 bytes with the 128B swizzle (the 16-byte chunk index XOR row % 8): conflict-free ldmatrix
// and 16-byte accesses without padding. The factor build rewrites them in place (q -> Qr, k -> Kr hi,
// g -> Kc hi).
constexpr int kRawBoxChannels = 64;
constexpr uint32_t kRawHalfBytes = kChunk * kRawBoxChannels * kBf16Bytes;  // 4096: one box
constexpr uint32_t kRawTileBytes = 2 * kRawHalfBytes;                      // 8192
constexpr uint32_t kRawQ = 0, kRawK = kRawTileBytes, kRawG = 2 * kRawTileBytes;
constexpr uint32_t kRawSlotBytes = 3 * kRawTileBytes;  // 24576 (beta is prefetched into registers instead)
// W' (WQ's rows 0-31) and T beta hi (TA's rows 0-31) are their tiles' first bytes, Aqk (TA's rows 32-63)
// its last 2 KB: the pieces of a stage that a bulk copy can store from a shared-memory image
// (two_pass.cuh, FactorStores). The 64-byte swizzle repeats every 8 rows, so Aqk's rows are laid out in
// their 2 KB as rows 0-31 of a TA tile (k32_offset(i, j)).
constexpr uint32_t kWBytes = kChunk / 8 * kWqGroupBytes;  // 8192
constexpr uint32_t kStAqk = kStTa + kAqkRow0 * kSwizzleRowBytes64;       // 18432
constexpr uint32_t kAqkBytes = kChunk * kChunk * kF16Bytes;              // 2048
static_assert(kWRow0 == 0 && kTbetaRow0 == 0 && kWBytes <= kRawTileBytes && 2 * kTbetaBytes <= kRawTileBytes,
              "W' and T beta images fit a raw tile");
static_assert(kAqkRow0 % 8 == 0 && kStAqk + kAqkBytes == kStTbetaLo, "Aqk: TA's last rows, whole swizzle periods");

CHUNK32_HD uint32_t raw_offset(int row, int channel) {
  const uint32_t c = uint32_t(channel);
  return c / kRawBoxChannels * kRawHalfBytes + swizzle_128b_at(uint32_t(row), c % kRawBoxChannels * kBf16Bytes);
}

// ---- a factor group's own area ----------------------------------------------------------------------
constexpr int kLRow = 36;   // L (32 x 32 f32), rows padded to 16-byte multiples
constexpr int kTRow = 20;   // T00^T and T11 (16 x 16 f32)
constexpr int kTbRow = 40;  // T diag(beta rk) (32 x 32 bf16): 80-byte rows for ldmatrix
constexpr uint32_t kGrRaw = 0;
constexpr uint32_t kGrLo = kRawSlots * kRawSlotBytes;  // 49152: two tiles, (A: rare scratch) Kc lo (B, C) ...
constexpr uint32_t kGrKcLo = kGrLo + kRawTileBytes;
constexpr uint32_t kGrT00t = kGrLo;                     // ... T00^T, T11, Tb (phases D, E)
constexpr uint32_t kGrT11 = kGrT00t + kSubBlock * kTRow * kF32Bytes;
constexpr uint32_t kGrTb = kGrT11 + kSubBlock * kTRow * kF32Bytes;
static_assert(kGrTb + kChunk * kTbRow * kBf16Bytes <= kGrLo + 2 * kRawTileBytes, "overlay fits in the lo tiles");
constexpr uint32_t kGrAnchor = kGrLo + 2 * kRawTileBytes;    // [128] f32: 2^Gamma_15
constexpr uint32_t kGrSums = kGrAnchor + kDimK * kF32Bytes;  // [2][128] f32: sub-block sums (log2)
constexpr uint32_t kGrNorms = kGrSums + 2 * kDimK * kF32Bytes;  // [0..31] scale rq, [32..63] rk
constexpr uint32_t kGrBeta = kGrNorms + 2 * kChunk * kF32Bytes;
constexpr uint32_t kGrL = kGrBeta + kChunk * kF32Bytes;
constexpr uint32_t kGrMarks = kGrL + kChunk * kLRow * kF32Bytes;  // u32: the chunk's non-finite tokens (bits)
constexpr uint32_t kGrClaims = kGrMarks + 4;  // i32[2]: the items the group's loader claimed (streamed pass 1)
constexpr uint32_t kGrBytes = align_up(kGrClaims + 8, kSwizzleAlign);  // 72704
static_assert(kGrKcLo % kSwizzleAlign == 0 && kGrAnchor % 16 == 0 &&
                  kGrNorms % 16 == 0 && kGrL % 16 == 0 && kGrTb % 16 == 0 && kGrT11 % 16 == 0,
              "alignment");

// ---- the CTA's shared memory ----------------------------------------------------------------------
constexpr uint32_t kSmStages = 0;
constexpr uint32_t kSmGroups = kSmStages + kStages * kStBytes;
constexpr uint32_t kSmBarriers = kSmGroups + kFactorGroups * kGrBytes;
constexpr int kBarrierCount = 2 * kStages + kFactorGroups * kRawSlots;  // full, empty, raw_full
constexpr uint32_t kSmUsed = kSmBarriers + kBarrierCount * 8;
constexpr uint32_t kSmBytes = kSmUsed + kSwizzleAlign;  // + slack to align the dynamic base to 1024
constexpr uint32_t kSmLimit = 227 * 1024;               // sm_90 opt-in maximum per block
static_assert(kSmBytes <= kSmLimit, "shared memory");

// Bytes the copies of one chunk bring: q, k, g boxes into the raw slot; V boxes into the stage.
constexpr uint32_t kRawLoadBytes = kRawSlotBytes;
constexpr uint32_t kVLoadBytes = kVBytes;

// ---- the schedule: which CTA runs which chain, which group/stage/slot a chunk uses ----------------
struct Chain {
  int sequence, head, chunks;
  int qk_head;  // the q/k head it reads: head / group (grouped value heads)
  int row;      // the sequence's index on the tensors' batch axis (0 when packed)
  int token0;   // its first token on their token axis (packed: cu_seqlens[sequence])
  int tokens;   // its length
};
// Chain `index` (sequence-major: sequence * heads + head) of B sequences of T tokens.
CHUNK32_HD Chain chain_of(int index, int heads, int tokens, int group = 1) {
  return Chain{index / heads, index % heads, (tokens + kChunk - 1) / kChunk, (index % heads) / group,
               index / heads, 0, tokens};
}
// Chain `index` of packed sequences (batch 1, sequence n on tokens [cu[n], cu[n + 1])).
CHUNK32_HD Chain packed_chain_of(int index, int heads, const int *cu, int group = 1) {
  const int n = index / heads, head = index % heads, first = cu[n], tokens = cu[n + 1] - first;
  return Chain{n, head, (tokens + kChunk - 1) / kChunk, head / group, 0, first, tokens};
}
CHUNK32_HD int factor_group_of(int chunk) { return chunk % kFactorGroups; }
CHUNK32_HD int stage_of(int chunk) { return chunk % kStages; }
CHUNK32_HD uint32_t stage_parity(int chunk) { return uint32_t(chunk / kStages) & 1u; }
// Tokens of chunk c inside the sequence (the last chunk may be partial).
CHUNK32_HD int valid_tokens(int chunk, int tokens) {
  const int left = tokens - chunk * kChunk;
  return left < kChunk ? left : kChunk;
}
// The rows of a chunk's row mask (bit t: token t) that are among its `valid` tokens.
CHUNK32_HD uint32_t valid_rows(uint32_t rows, int valid) {
  return valid < kChunk ? rows & ((1u << valid) - 1u) : rows;
}

// ---- parameters --------------------------------------------------------------------------------------
// Compile-time features (template parameters of the kernel). Only the bounded gate is built here; the
// softplus gate, a given log-decay, varlen, GVA, K = 64, a bf16 state and transition columns are next steps.
// The factor build's gate: the bounded gate's sigmoid by tanh.approx or by ex2 + rcp; the softplus gate
// (ex2 + lg2); the log-decay given.
enum class GateMath { kTanh, kExp2Reciprocal, kSoftplus, kLogDecay };

// Packed sequences the two-pass plan takes (two_pass.cuh: it keeps their chunk counts in shared memory).
constexpr int kMaxPackedSequences = 64;

struct FusedParams {
  int batch, tokens, heads;        // B, T, HV (value heads; K = V = 128)
  int group = 1;                   // value heads per q/k head: q, k have heads / group heads
  const int *cu_seqlens = nullptr;  // packed sequences (then batch 1): [sequences + 1] offsets into T
  int sequences = 0;               // packed: their number
  const uint16_t *beta;            // bf16 [B, T, H] (logits with the beta sigmoid)
  const float *a_log;              // [H]; nullptr: A = 1
  const float *dt_bias;            // [H, K]; nullptr: no bias
  float lower_bound, scale;
  float beta_max = 1.f;            // the beta sigmoid's upper bound: 2 allows negative eigenvalues
  const float *initial_state;      // fp32 [B, H, C, K] (state_v_first) or [B, H, K, C]; nullptr: zeros
  float *final_state;              // fp32, the same layout
  bool state_v_first = true;
  uint16_t *o;                     // bf16 [B, T, H, C]
  // C, the V extent of o and the states: V, or V + K where a transition slice (two_pass.cuh) writes
  // its K columns beside the V ones.
  int columns = kDimV;
};

}  // namespace chunk32
}  // namespace jax_kda
