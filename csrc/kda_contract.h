// The kernels' contract with jax_kda's Python side, stated once: FFI target names, the gate enum, the
// shapes the kernels take, how a launch slices V, and the pre-processing's numeric constants.
// module.cc exports all of it to Python (jax_kda/contract.py); tests/test_contract.py checks that the
// pure-JAX path and the kernels agree on it. Plain C++17, so the CPU-only extension carries it too.
#pragma once

#include <cstdint>

#include "chunk32/stage.h"

namespace jax_kda {

inline constexpr const char *kPrefillTarget = "jax_kda_prefill_cuda";
inline constexpr const char *kSegmentCorrectTarget = "jax_kda_segment_correct_cuda";
inline constexpr const char *kDecodeTarget = "jax_kda_decode_cuda";

// The gate modes of docs/CONTRACT.md (jax_kda.options.GATE_*).
enum class GateMode : int32_t { kGiven = 0, kSoftplus = 1, kBounded = 2 };

// q̂ = q / sqrt(Σ q² + kL2NormEps); softplus(x) = x above kSoftplusThreshold (PyTorch's default).
inline constexpr float kL2NormEps = 1e-6f;
inline constexpr float kSoftplusThreshold = 20.f;

// Head sizes of the prefill kernel: K in {64, 128}; V (value columns, transition columns included) a
// multiple of kValueStep up to kMaxValueColumns. The correction takes K in {64, 128} and any multiple
// of kValueStep.
inline constexpr int kValueStep = 64;
inline constexpr int kMaxValueColumns = 512;

constexpr bool kernel_takes_head_dim_k(int head_dim_k) { return head_dim_k == 64 || head_dim_k == 128; }

// Why the prefill kernel cannot take these sizes, or nullptr when it can.
constexpr const char *prefill_unsupported(int head_dim_k, int head_dim_v) {
  if (!kernel_takes_head_dim_k(head_dim_k)) return "the kernels take K = 64 or 128";
  if (head_dim_v <= 0 || head_dim_v % kValueStep != 0 || head_dim_v > kMaxValueColumns) {
    return "the kernels take V = 64, 128, ..., 512";
  }
  return nullptr;
}

// Why the segment correction cannot take these sizes, or nullptr when it can.
constexpr const char *correct_unsupported(int head_dim_k, int head_dim_v) {
  if (!kernel_takes_head_dim_k(head_dim_k)) return "the correction takes K = 64 or 128";
  if (head_dim_v <= 0 || head_dim_v % kValueStep != 0) return "the correction takes V a multiple of 64";
  return nullptr;
}

// Head sizes of the decode kernel: K in {64, 128}; V any positive multiple of kDecodeValueStep, so
// that every 16-byte piece of a state row, of either dtype, is whole.
inline constexpr int kDecodeValueStep = 16;

// Why the decode kernel cannot take these sizes, or nullptr when it can.
constexpr const char *decode_unsupported(int head_dim_k, int head_dim_v) {
  if (!kernel_takes_head_dim_k(head_dim_k)) return "the decode kernel takes K = 64 or 128";
  if (head_dim_v <= 0 || head_dim_v % kDecodeValueStep != 0) return "the decode kernel takes V a multiple of 16";
  return nullptr;
}

// The two-pass chunk-32 prefill (kda_two_pass_kernel.cu): what it takes today (the chunk-16 kernel serves
// every other call), and its workspace (TwoPassLayout).
inline constexpr int kTwoPassChunk = chunk32::kChunk;
inline constexpr int kTwoPassHeadDim = chunk32::kDimK;  // K = V = 128
inline constexpr int64_t kTwoPassFactorBytes = chunk32::kFactorPitch;  // one chunk of one chain
// The factors' workspace: up to kTwoPassOverlapBudget where the next window's factor pass runs beside a
// state pass (overlapped, streamed), up to kTwoPassSerialBudget where the passes run one after the other
// (two_pass_serial).
inline constexpr int64_t kTwoPassOverlapBudget = int64_t(512) << 20;
inline constexpr int64_t kTwoPassSerialBudget = int64_t(1) << 30;
inline constexpr int kTwoPassMaxPackedSequences = chunk32::kMaxPackedSequences;
// The factor pass anchors each chunk's exponents at its row 15: 16 tokens of the bounded gate's decay
// stay inside fp32 (2^(16 x 5 x log2 e) = 2^115) from this lower bound up. Softplus and given decays can
// be stronger: the chunk-16 kernel runs them (it clamps at kMaxLogDecay = 10 nats over 8 tokens).
inline constexpr float kTwoPassMinLowerBound = -5.f;

// Why the two-pass prefill cannot take a call, or nullptr when it can. `head_dim_v`: v's columns
// (transition columns, when asked for, add K more to o and the state); `sequences`: how many, when
// packed; `gate` a GateMode code; `plain_inputs`: g and beta bfloat16; `fp32_states`: the initial state
// (if any) and the final state (if written) float32, in either layout.
constexpr const char *two_pass_unsupported(int head_dim_k, int head_dim_v, bool packed, int64_t sequences, int gate,
                                           float lower_bound, bool plain_inputs, bool fp32_states) {
  if (head_dim_k != kTwoPassHeadDim || head_dim_v != kTwoPassHeadDim) return "the two-pass kernel takes K = V = 128";
  static_assert(kTwoPassMaxPackedSequences == 64, "the message below names the limit");
  if (packed && sequences > kTwoPassMaxPackedSequences) return "the two-pass kernel takes at most 64 packed sequences";
  if (gate != int32_t(GateMode::kBounded) || !(lower_bound >= kTwoPassMinLowerBound)) {
    return "the two-pass kernel takes the bounded gate with lower_bound >= -5";
  }
  if (!plain_inputs) return "the two-pass kernel takes g and beta in bfloat16";
  if (!fp32_states) return "the two-pass kernel takes float32 states";
  return nullptr;
}

// Whether the two passes run one after the other: where the state pass's CTAs (one a multiprocessor) leave
// less than half of the multiprocessors idle, the next window's factor pass gains too little beside a
// state pass to pay for windows: the whole call's factors in one window (up to kTwoPassSerialBudget) and
// the factor pass on the whole GPU. On an H200 (docs/PERFLOG.md, sixteenth session; GPU busy a call): case
// A, 96 chains, 0.779 ms in one window against 0.862 in three overlapped ones; D, 768 chains, 0.770 (its
// packed items chain-major) against 0.885 in two windows; E, 32 chains, 1.53 ms overlapped.
constexpr bool two_pass_serial(int64_t state_ctas, int64_t multiprocessors) {
  return 2 * state_ctas > multiprocessors;
}

// The two-pass prefill's workspace, and the windows it runs in. The passes run window by window; a
// window is a range of chunks of every chain, or, packed, of items (chain, chunk) in chunk-major order,
// planned on the device (chain-major in one serial window). When every item's factors fit the budget
// (`serial`: kTwoPassSerialBudget, else kTwoPassOverlapBudget), one window; otherwise, serial, windows of
// the whole budget, else two buffers of half of it alternate, so that the factor pass of the next window
// fills one while the state pass of this one reads the other (one chunk of every chain a window at
// least). After the factors: when the call writes no final state, an fp32 state per chain
// (`carried_columns` wide: V, or V + K with transition columns; 0 when the final state carries it); when
// packed, the plan (an int2 and an int per item, an int per chain and two more); with one window, not
// serial, a flag per item and a counter for the streamed schedule (TwoPassSchedule).
struct TwoPassLayout {
  bool serial = false;  // the passes one after the other (two_pass_serial)
  int64_t window = 0;   // chunks of every chain a window (packed: items)
  int64_t windows = 0;  // windows to run (packed: some may hold no items)
  int64_t items = 0;    // packed: items at most
  int64_t buffers = 0, buffer = 0;  // factor buffers (1, or 2 alternating) and the bytes of one
  int64_t carry = 0, plan = 0, flags = 0, bytes = 0;  // offsets of the state carry, the plan, the flags; the size
  int64_t flag_count = 0;  // ints at `flags`: items of the one window + the counter (0: several windows)
};
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr TwoPassLayout two_pass_layout(int64_t sequences, int64_t tokens, int64_t value_heads, bool packed,
                                        int64_t carried_columns, bool serial) {
  TwoPassLayout l{};
  l.serial = serial;
  const int64_t chains = sequences * value_heads, chunks = ceil_div(tokens, kTwoPassChunk);
  if (chains <= 0 || chunks <= 0) return l;  // nothing to run
  if (packed) l.items = value_heads * (chunks + sequences);  // every sequence may end in a partial chunk
  const int64_t whole = (serial ? kTwoPassSerialBudget : kTwoPassOverlapBudget) / kTwoPassFactorBytes;  // items
  l.buffers = serial || (packed ? l.items : chains * chunks) <= whole ? 1 : 2;
  const int64_t fit = whole / l.buffers;
  if (packed) {
    l.window = fit < l.items ? fit : l.items;
    l.buffer = l.window * kTwoPassFactorBytes;
  } else {
    l.window = fit / chains < 1 ? 1 : fit / chains < chunks ? fit / chains : chunks;
    l.buffer = chains * l.window * kTwoPassFactorBytes;
  }
  l.windows = ceil_div(packed ? l.items : chunks, l.window);
  if (l.windows == 1) l.buffers = 1;  // one chunk of more chains than the budget holds
  l.carry = l.buffers * l.buffer;
  l.plan = l.carry + chains * kTwoPassHeadDim * carried_columns * int64_t(sizeof(float));
  l.flags = l.plan + (packed ? l.items * int64_t(sizeof(int32_t) * 3) + (chains + 2) * int64_t(sizeof(int32_t)) : 0);
  l.flag_count = l.windows == 1 && !serial ? (packed ? l.items : chains * chunks) + 1 : 0;
  l.bytes = l.flags + l.flag_count * int64_t(sizeof(int32_t));
  return l;
}

// A call whose factors fit one window is still cut in two overlapped halves from this many chunks of
// its longest sequence (packed: of all tokens) on, where it does not run serially (two_pass_serial):
// the first half's state steps then run beside the second half's factors on the idle multiprocessors. Below it the second window's launches and events cost what the overlap saves (on an H200:
// case B, 256 chunks, 0.773 -> 0.727 ms a call; case F, 64 chunks, its kernels 4% shorter but its call
// 0.156 -> 0.161 ms).
inline constexpr int64_t kTwoPassSplitMinChunks = 128;

// A call of one window whose state pass takes at most this share of the multiprocessors (a CTA a
// chain) runs streamed: both passes at once, the factor pass on the other multiprocessors building the
// items chunk by chunk of every chain, the state pass waiting for each item's flag. With more chains the
// factor pass's share is too small to keep ahead of the chains (on an H200: F, 32 chains of 132).
inline constexpr int64_t kTwoPassStreamedSharePercent = 30;

// The windows as the launcher runs them (kda_two_pass_kernel.cu): serial where the layout is; otherwise
// streamed (above), or overlapped where there are two buffers (or one window long enough to be cut in
// two halves, which its buffer holds), or else one window, its passes one after the other.
struct TwoPassSchedule {
  bool streamed = false, overlapped = false;
  int64_t buffers = 0, window = 0, windows = 0;  // buffers taken in turn; chunks (packed: items) a window
  int64_t buffer = 0;                            // bytes from one buffer to the next
};
constexpr TwoPassSchedule two_pass_schedule(const TwoPassLayout &l, int64_t tokens, int64_t state_ctas,
                                            int64_t multiprocessors) {
  TwoPassSchedule s{};
  if (l.windows == 0) return s;
  const int64_t chunks = ceil_div(tokens, kTwoPassChunk), units = l.items > 0 ? l.items : chunks;  // items: packed
  s.streamed = !l.serial && l.windows == 1 && 100 * state_ctas <= kTwoPassStreamedSharePercent * multiprocessors;
  const bool split = !l.serial && !s.streamed && l.windows == 1 && chunks >= kTwoPassSplitMinChunks;
  s.overlapped = !l.serial && (l.buffers > 1 || split);
  s.buffers = s.overlapped ? 2 : 1;
  s.window = split ? ceil_div(l.window, 2) : l.window;
  s.windows = ceil_div(units, s.window);
  s.buffer = l.buffer / l.window * s.window;  // the split's second half is the shorter: one buffer holds both
  return s;
}

// Value columns one CTA of the prefill owns (128 or 64 state rows: one or two consumer warpgroups);
// 64 when 128 would leave most of the GPU's multiprocessors idle. The launch runs
// sequences x value_heads x (head_dim_v / slice) CTAs.
constexpr int prefill_v_slice(int64_t sequences, int64_t value_heads, int head_dim_v, int multiprocessors) {
  if (head_dim_v % 128 != 0) return 64;
  return sequences * value_heads * (head_dim_v / 128) * 2 <= multiprocessors ? 64 : 128;
}

}  // namespace jax_kda
