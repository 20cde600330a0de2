// The chunk-32 KDA prefill in two passes (K = V = 128): the factor pass and the state pass, and their
// schedule. The library's launcher (csrc/kda_two_pass_kernel.cu) and the prototype's harness
// (benchmarks/kernel_next/two_pass.cu: checks against float64, timings, variants) both include it.
//
//   pass 1  factor_pass_kernel: every (chain, chunk) item of a window in parallel over the whole GPU. A
//           CTA holds one or more factor groups (128 threads each, factor_group.cuh), each with its raw
//           slots (the next item's q, k, g arrive by bulk tensor copy while it builds the current one).
//           Each group takes a contiguous range of items (the chains' chunks in order, so the gate
//           constants change rarely), or, streamed, claims them one by one in chunk-major order and
//           flags each one done. The group writes the chunk's factors (the first kPassFactorBytes of stage.h's
//           stage: W' | Qd, T beta hi | Aqk, T beta lo, Kend^T, decay) to factors[item] in global
//           memory through the same generic stores that write a shared-memory stage in the fused
//           prototype.
//   pass 2  state_pass_kernel: one CTA per chain, two state warpgroups (state_step.cuh) and a loader
//           warp streaming each chunk's factors (one bulk copy) and V (two bulk tensor boxes) into a
//           kPassStages-deep ring, and a scanner warp that finds V rows holding non-finite values
//           beside the state warps' products; writes o (bf16) and the final state (fp32). A window
//           after the first starts from the final state the last one left. Streamed, it runs beside
//           pass 1 and its loader waits for each item's flag.
// Any T >= 1: pass 1 masks the tokens past T, pass 2 stores only valid tokens.
#pragma once

#include "../non_finite.cuh"
#include "factor_group.cuh"
#include "state_step.cuh"

namespace jax_kda {
namespace chunk32 {
namespace two_pass {

// ---- layout and schedule ---------------------------------------------------------------------------

// Pass 1: one factor group per CTA; its area (two raw slots, lo tiles / inverse scratch, small vectors)
// as in the fused kernel, then the two raw-slot barriers.
constexpr int kFactorThreads = kWarpgroupThreads;
constexpr int kFactorCtasPerSm = 3;
// A factor group's area with `slots` raw slots (the group's scratch follows them), its barriers after
// the scratch, then, with `aqk_image` (FactorStores::kBulk), the image of the chunk's Aqk rows;
// a CTA of `groups` groups holds their areas one after the other (each aligned), + slack to align the base.
CHUNK32_HD constexpr uint32_t f1_barriers(int slots) { return kGrBytes - (kRawSlots - slots) * kRawSlotBytes; }
CHUNK32_HD constexpr uint32_t f1_aqk_image(int slots) { return align_up(f1_barriers(slots) + slots * 8, 128); }
CHUNK32_HD constexpr uint32_t f1_group_end(int slots, bool aqk_image) {
  return aqk_image ? f1_aqk_image(slots) + kAqkBytes : f1_barriers(slots) + slots * 8;
}
CHUNK32_HD constexpr uint32_t f1_group_stride(int slots, bool aqk_image = false) {
  return align_up(f1_group_end(slots, aqk_image), kSwizzleAlign);
}
CHUNK32_HD constexpr uint32_t f1_smem_bytes(int slots, int groups = 1, bool aqk_image = false) {
  return (groups - 1) * f1_group_stride(slots, aqk_image) + f1_group_end(slots, aqk_image) + kSwizzleAlign;
}
constexpr uint32_t kF1SmBytes = f1_smem_bytes(kRawSlots);
// Three groups a CTA, one CTA a multiprocessor (the library's factor pass: PERFLOG, eleventh session).
constexpr int kGroupsPerCta = 3;
// One raw slot (the next item's loads wait for this item's last read) leaves room for four CTAs a SM:
// more warps to hide latency with, at 128 registers.
constexpr int kLeanSlots = 1, kLeanCtasPerSm = 4;
constexpr uint32_t kSmPerSm = 228 * 1024, kSmReservedPerCta = 1024;         // sm_90
static_assert(kFactorCtasPerSm * (kF1SmBytes + kSmReservedPerCta) <= kSmPerSm, "three factor CTAs per SM");
static_assert(kLeanCtasPerSm * (f1_smem_bytes(kLeanSlots) + kSmReservedPerCta) <= kSmPerSm, "four lean CTAs per SM");
static_assert(f1_smem_bytes(kRawSlots, kGroupsPerCta, true) <= kSmLimit, "three factor groups a CTA, Aqk images");

// Items (chain, chunk) -> factor groups: group u of `units` (CTA b's g-th: u = b x groups + g) takes the
// contiguous range [first, last).
struct ItemRange {
  int first, last;
};
CHUNK32_HD ItemRange items_of(int unit, int units, int items) {
  const int per = items / units, extra = items % units;
  const int first = unit * per + (unit < extra ? unit : extra);
  return ItemRange{first, first + per + (unit < extra ? 1 : 0)};
}

// Packed sequences (FusedParams::cu_seqlens; their lengths only on the device): the items in chunk-major
// order (chunk j of every sequence that has one, sequence by sequence, each one's heads in order), so
// that a window, a range of that order, holds a band of chunks of every chain that is that long: the
// state pass still runs every chain at once, and the windows' items are as many as their factors fill.
// A call of one window run serially takes them chain-major instead (each chain's chunks in a row, as
// sequences of one length are): a group's items then share their chain's gate constants and sequence
// bounds, and a chain's factors lie together. Written on the device by plan_packed_kernel.
struct PackedItems {
  int2 *chain_chunk = nullptr;  // [item]: (chain, chunk) of each item; nullptr: not packed
  int *item_of = nullptr;       // chain c's chunk j is item item_of[chain_first[c] + j]
  int *chain_first = nullptr;   // [chains + 1]: chain-major offsets of the chains' chunks
  int *items = nullptr;         // [1]: the items in all
};

// A window of the passes: not packed, chunks [first, first + count) of every chain; packed, items
// [first, first + count) of the chunk-major order. The passes run window by window so that the factor
// buffer holds one window (bounded workspace, and small enough to be read back from the L2); the state
// crosses windows through the final-state buffer (fp32), which the next window's state pass reads as
// its initial state. A window's factors sit at the item's index in the window (chain-major when not packed).
//
// Streamed (one window, few chains): both passes at once. The factor groups claim positions from a
// counter (`claims`) in chunk-major order, so that chunk c of every chain is built before chunk c + 1,
// and set `ready[item]` once an item's factors are written; the state pass, launched beside them, waits
// for each item's flag before it copies its factors. Both are zero before the factor pass.
struct Window {
  int first = 0, count = 0;
  PackedItems packed;
  int *ready = nullptr;   // streamed: [items] flags; nullptr: the state pass runs after the factor pass
  int *claims = nullptr;  // streamed: the positions claimed so far
  CHUNK32_HD bool is_packed() const { return packed.chain_chunk != nullptr; }
};

// Item `item` of window `w`: its chain and chunk (place_of); packed, from its entry of the plan, which
// the factor pass loads an item ahead (plan_entry) so that no warp waits for it at an item's head.
struct ItemPlace {
  Chain chain;
  int chunk;
};
__device__ __forceinline__ int2 plan_entry(const Window &w, int item) {
  return w.is_packed() ? w.packed.chain_chunk[w.first + item] : make_int2(0, 0);
}
__device__ __forceinline__ ItemPlace place_of(const FusedParams &p, const Window &w, int item, int2 entry) {
  if (!w.is_packed()) return {chain_of(item / w.count, p.heads, p.tokens, p.group), w.first + item % w.count};
  return {packed_chain_of(entry.x, p.heads, p.cu_seqlens, p.group), entry.y};
}
// Streamed: the item at claim position `position`, chunk-major (packed, the plan's order is already).
__device__ __forceinline__ int streamed_item(const FusedParams &p, const Window &w, int position) {
  if (w.is_packed()) return position;
  const int chains = p.batch * p.heads;
  return position % chains * w.count + position / chains;
}
// The items of window `w` (packed: read from the plan).
__device__ __forceinline__ int items_in(const FusedParams &p, const Window &w) {
  if (!w.is_packed()) return p.batch * p.heads * w.count;
  return max(0, min(w.count, *w.packed.items - w.first));
}

// The plan of packed sequences: one thread per (sequence, chunk, head), consecutive heads on consecutive
// threads so that the items' writes coalesce. Chunk-major, item (j, n, h) = heads x (the chunks below j
// of all sequences + the sequences before n that reach j) + h; chain-major, its chain-major offset.
constexpr int kPlanThreads = 256;
__global__ void __launch_bounds__(kPlanThreads)
    plan_packed_kernel(const int *cu_seqlens, int sequences, int heads, bool chain_major, PackedItems plan) {
  __shared__ int chunks[kMaxPackedSequences], start[kMaxPackedSequences + 1];
  for (int n = threadIdx.x; n < sequences; n += blockDim.x) {
    chunks[n] = max(0, (cu_seqlens[n + 1] - cu_seqlens[n] + kChunk - 1) / kChunk);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    start[0] = 0;
    for (int n = 0; n < sequences; ++n) start[n + 1] = start[n] + chunks[n];
  }
  __syncthreads();
  const int pairs = start[sequences];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs * heads; i += gridDim.x * blockDim.x) {
    const int pair = i / heads, h = i % heads;
    int n = 0;
    while (start[n + 1] <= pair) ++n;  // the pair's sequence (empty ones skipped)
    const int j = pair - start[n], offset = heads * start[n] + h * chunks[n] + j;  // chain-major
    int below = 0;
    if (!chain_major)
      for (int m = 0; m < sequences; ++m) below += min(chunks[m], j) + (m < n && chunks[m] > j ? 1 : 0);
    const int item = chain_major ? offset : heads * below + h;
    plan.chain_chunk[item] = make_int2(n * heads + h, j);
    plan.item_of[offset] = item;
  }
  if (blockIdx.x == 0) {
    for (int c = threadIdx.x; c <= sequences * heads; c += blockDim.x) {
      const int n = c / heads;
      plan.chain_first[c] = heads * start[n] + (n < sequences ? (c % heads) * chunks[n] : 0);
    }
    if (threadIdx.x == 0) *plan.items = heads * pairs;
  }
}

// Pass 2's optional second slice of each chain: K transition columns, the chain run again with v = 0
// from the identity (K = V), so that a sequence cut into segments can be joined (jax_kda/segments.py):
// its outputs are the effective queries scale q^T Phi_t, its final state Phi. Same factors, no V loads.
// Its o and state have the V slice's layout and row width (FusedParams::columns): separate tensors
// (columns V), or the V slice's own with the K columns after the V ones (columns V + K; the pointers
// at the first transition column).
struct TransitionOutputs {
  uint16_t *o = nullptr;   // bf16 o of the transition columns; nullptr: no transition slice
  float *state = nullptr;  // fp32 state of the transition columns (the initial one of a later window too)
};

// Pass 2: two state warpgroups, a loader warp and a scanner warp; a ring of kPassStages stages. The
// scanner is a warp of its own so that the loader's copies wait for nothing but a free stage.
constexpr int kPassStages = 5;  // 4 chunks of lookahead (~3 us, ~190 KB in flight at 0.75 us a step) cover the HBM latency
constexpr int kLoaderWarp = kStateThreads / 32, kScannerWarp = kLoaderWarp + 1;
constexpr int kStateCtaThreads = kStateThreads + 2 * 32;  // 320
constexpr uint32_t kS2Barriers = kPassStages * kStBytes;
constexpr uint32_t kS2BadRows = kS2Barriers + 3 * kPassStages * 8;  // after the full, empty, scanned barriers
constexpr uint32_t kS2SmBytes = kS2BadRows + kPassStages * 4 + kSwizzleAlign;
static_assert(kS2SmBytes <= kSmLimit, "state pass shared memory");

CHUNK32_HD int ring_stage(int chunk) { return chunk % kPassStages; }
CHUNK32_HD uint32_t ring_parity(int chunk) { return uint32_t(chunk / kPassStages) & 1u; }

__device__ __forceinline__ uint8_t *aligned_smem(uint8_t *raw) {
  return raw + ((kSwizzleAlign - (smem_address(raw) & (kSwizzleAlign - 1))) & (kSwizzleAlign - 1));
}

// ---- phase clocks of pass 1 (build flag CHUNK32_PHASE_CLOCKS; without it nothing below is compiled in) ----
// Thread 0 of each pass-1 CTA (warp 0, also the loader) reads %clock64 at each boundary of an item's
// phases into row `item` of a global buffer: slot 0 at the item's start, slot 1 + p at the end of phase
// p, then %globaltimer at the start and the end (ns, for the effective clock), %smid and the CTA. The
// "barrier" phases are warp 0 waiting at the group's named barrier for the slowest warp; the others are
// warp 0's own work (in the inverse phase the other three warps wait). The phase list lives here only.
#define CHUNK32_PASS1_PHASES(X)                                                                  \
  X(kPhIssue, "issue", "next item's raw loads + beta, gate constants")                     \
  X(kPhWaitRaw, "wait raw", "mbarrier wait: this item's q, k, g in the slot")              \
  X(kPhGate, "A gate", "gate, x_t = Gamma_t - Gamma_15 (warp 0)")                          \
  X(kPhNorms, "A norms", "row norms (mma), betas (warp 0)")                                \
  X(kPhBarA, "A barrier", "warp 0 waits for the group")                                    \
  X(kPhElementwise, "B elementwise", "Qr, Kr, Kc hi + lo, Qd, Kend, decay (warp 0)")       \
  X(kPhBarB, "B barrier", "warp 0 waits for the group")                                    \
  X(kPhScores, "C scores", "Aqk, L (mma, warp 0)")                                         \
  X(kPhBarC, "C barrier", "warp 0 waits for the group")                                    \
  X(kPhSubstitute, "D substitute", "(I + L)^-1's diagonal blocks (warp 0; 4-warp inverse only)") \
  X(kPhMerge, "D merge", "merge, T beta hi + lo, T diag(beta rk) (warp 0; all of D: 1-warp inverse)") \
  X(kPhBarD, "D barrier", "warp 0 waits for the group")                                    \
  X(kPhWProduct, "E W product", "W' (mma) and its stores (warp 0)")                        \
  X(kPhBarE, "E barrier", "proxy fence, warp 0 waits for the group")
#define CHUNK32_PHASE_ENUM(id, name, what) id,
enum Pass1Phase : int { CHUNK32_PASS1_PHASES(CHUNK32_PHASE_ENUM) kPass1Phases };
#undef CHUNK32_PHASE_ENUM
enum ClockSlot : int {  // long long slots of an item's row: 0 .. kPass1Phases clock64, then these
  kSlotNsBegin = kPass1Phases + 1, kSlotNsEnd, kSlotSm, kSlotCta, kClockSlots
};

#ifdef CHUNK32_PHASE_CLOCKS
__device__ long long *g_phase_clocks;  // [items][kClockSlots], set by cudaMemcpyToSymbol
#endif

// The marks; empty (no code) without CHUNK32_PHASE_CLOCKS. The "memory" clobber keeps shared and global accesses
// on their side of a mark (arithmetic may still move across it).
struct PhaseClock {
  long long *row = nullptr;
  bool on = false;
  __device__ __forceinline__ static long long clock_now() {
    long long c;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c)::"memory");
    return c;
  }
  __device__ __forceinline__ static long long ns_now() {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    return t;
  }
  __device__ __forceinline__ void begin(int item, int tid) {
#ifdef CHUNK32_PHASE_CLOCKS
    on = tid == 0;
    if (on) {
      row = g_phase_clocks + size_t(item) * kClockSlots;
      uint32_t sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      row[kSlotSm] = sm;
      row[kSlotCta] = blockIdx.x;
      row[kSlotNsBegin] = ns_now();
      row[0] = clock_now();
    }
#endif
  }
  __device__ __forceinline__ void mark(int phase) const {
#ifdef CHUNK32_PHASE_CLOCKS
    if (on) row[1 + phase] = clock_now();
#endif
  }
  __device__ __forceinline__ void end() const {
#ifdef CHUNK32_PHASE_CLOCKS
    if (on) row[kSlotNsEnd] = ns_now();
#endif
  }
};

// ---- pass 1 ------------------------------------------------------------------------------------------
// kInverseWarps: 1 = FactorGroup::invert_and_merge on warp 0 (the fused kernel's form), 4 =
// invert_and_merge_spread (substitution on warp 0, then the merge and the stores over the four warps;
// one more group barrier; bit-identical factors).
// kSlots: raw slots (2: the next item loads while this one builds; 1: it loads after, and the other
// CTAs of the SM cover the wait); kCtasPerSm: the launch bound (registers).
// kGroups: factor groups a CTA (warps 4g .. 4g + 3 the g-th, with its own area, raw-slot barriers, named
// barrier and items, as if it were a CTA of its own; they run free: CTA barriers between them, to keep
// them in lockstep, cost 7-8%, PERFLOG).
// kStreamed: the window is streamed (Window::ready): items claimed one ahead, each one's flag set after
// its last barrier; otherwise each group takes a contiguous range of the window's items.
// kStores: how the factors reach global memory. kThreads: each thread's stores; W', T beta, Aqk and
// Kend^T then write half sectors (16 bytes of a 32-byte sector an instruction), 1.6x the item's
// sectors on the L2's input (the streamed pass keeps them: its flags need the stores complete).
// kBulk: W' and T beta hi + lo (12 KB of the item's 31) are written into the item's raw slot (its q and
// g tiles, free after the scores) as images of their stage bytes, Aqk into an image of its 2 KB after
// the group's barriers (f1_aqk_image), and the loader stores the four with bulk copies after the
// item's last barrier (whole lines); the slot's next raw loads wait for the copies' reads (issued after
// the next item's first barrier); Kend^T by lane pairs, whole sectors (A -10%, C, D -15% on the factor
// pass, thirteenth session; Aqk's copy -1.3% more, fourteenth: PERFLOG). The windows' schedule with two
// raw slots and the 4-warp inverse only.
enum class FactorStores { kThreads, kBulk };
template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid, int kInverseWarps = 1, int kSlots = kRawSlots,
          int kCtasPerSm = kFactorCtasPerSm, int kGroups = 1, bool kStreamed = false,
          FactorStores kStores = FactorStores::kThreads>
__global__ void __launch_bounds__(kFactorThreads * kGroups, kCtasPerSm)
    factor_pass_kernel(const __grid_constant__ FusedParams p, const __grid_constant__ TensorMaps maps,
                       uint8_t *factors, Window w) {
  // Launched programmatically after the call's earlier work (the first window): nothing of it is read or
  // written before that work is complete. Then every CTA of the pass is resident and past that point:
  // the state pass may start on the multiprocessors the pass's tail frees (its prologue reads inputs),
  // or, streamed, on those the pass leaves.
  constexpr bool kBulkStores = kStores == FactorStores::kBulk;
  static_assert(!kBulkStores || (!kStreamed && kSlots == 2 && kInverseWarps == 4), "bulk stores: windows, two slots");
  wait_for_prior_grid();
  launch_dependents();
  extern __shared__ uint8_t smem_raw[];
  const int group = kGroups > 1 ? int(threadIdx.x / kFactorThreads) : 0;
  uint8_t *smem = aligned_smem(smem_raw) + group * f1_group_stride(kSlots, kBulkStores);  // the group's area
  uint64_t *raw_full = reinterpret_cast<uint64_t *>(smem + f1_barriers(kSlots));
  const int tid = kGroups > 1 ? int(threadIdx.x % kFactorThreads) : int(threadIdx.x);
  if (tid == 0) {
    for (int i = 0; i < kSlots; ++i) mbarrier_init(&raw_full[i], 1);
    fence_barrier_init();
  }
  __syncthreads();
  // Items: (chain, chunk) of the window (place_of); the factors at the item's index; -1: none.
  const int items = items_in(p, w);
  const ItemRange range = items_of(blockIdx.x * kGroups + group, gridDim.x * kGroups, items);
  FactorGroup<kGate, kL2Norm, kBetaSigmoid> fg;
  fg.base = smem - (kRawSlots - kSlots) * kRawSlotBytes;  // the group's scratch right after the slots in use
  fg.group = group;
  fg.tid = tid;
  fg.warp = fg.tid / 32;
  fg.lane = fg.tid % 32;
  fg.half = fg.warp >> 1;
  fg.d0 = 2 * (((fg.warp & 1) << 5) | fg.lane);
  const bool loader = fg.tid == kLoaderThread;
  // Streamed: the loader's claims, for the group: iteration it's item in slot it % 2, written at the start
  // of iteration it - 1 and read after its first barrier; the next write to that slot comes an iteration
  // later, after the group's barriers of the one between.
  auto claimed = [&](int it) { return reinterpret_cast<int *>(fg.base + kGrClaims) + (it & 1); };
  auto claim = [&] {
    const int position = atomicAdd(w.claims, 1);
    return position < items ? streamed_item(p, w, position) : -1;
  };
  fg.clear_marks();
  if (kStreamed && loader) *claimed(0) = claim();
  fg.sync();
  auto slot_of = [&](int it) { return smem + kGrRaw + (it % kSlots) * kRawSlotBytes; };
  // The next item's raw loads (place `nx`) into the slot of iteration it + 1, once that slot is free:
  // with two slots at the item's head (bulk stores: after its first barrier), with one after its last.
  auto load_next_raw = [&](int it, const ItemPlace &nx) {
    issue_raw_loads(maps, nx.chain, nx.chunk, slot_of(it + 1), &raw_full[(it + 1) % kSlots]);
  };
  int item = kStreamed ? *claimed(0) : range.first < range.last ? range.first : -1;
  uint32_t beta_bits = 0u;
  ItemPlace here{};  // the item's place, worked out once: as the next item's in the iteration before
  int2 next_entry{};  // not streamed: the next item's plan entry (packed), loaded in the iteration before
  if (item >= 0) {
    here = place_of(p, w, item, plan_entry(w, item));
    if (!kStreamed && item + 1 < range.last) next_entry = plan_entry(w, item + 1);
    if (loader) issue_raw_loads(maps, here.chain, here.chunk, slot_of(0), &raw_full[0]);
    beta_bits = load_beta_bits(p, here.chain, here.chunk, fg.tid);
  }
  int gate_head = -1;
  for (int it = 0; item >= 0; ++it) {
    PhaseClock clk;
    int next = -1;  // streamed: known to the loader now, to the group after the first barrier
    uint32_t next_beta_bits = 0u;
    ItemPlace nx{};
    float x[kSubBlock][2];
    uint8_t *raw = slot_of(it);
    uint8_t *stage = factors + size_t(item) * kFactorPitch;  // global: factors[chain][chunk]
    int2 after_entry{};
    clk.begin(item, fg.tid);
    if (kStreamed) {
      if (loader) {
        next = claim();
        *claimed(it + 1) = next;
      }
    } else {
      next = item + 1 < range.last ? item + 1 : -1;
      after_entry = next >= 0 && next + 1 < range.last ? plan_entry(w, next + 1) : int2{};  // used an item later
    }
    if (next >= 0) {  // the next item's loads into the other slot (freed at the end of the last one)
      nx = place_of(p, w, next, kStreamed ? plan_entry(w, next) : next_entry);
      if (kSlots > 1 && !kBulkStores && loader) load_next_raw(it, nx);
      if (!kStreamed) next_beta_bits = load_beta_bits(p, nx.chain, nx.chunk, fg.tid);
    }
    fg.launder_indices();
    const Chain &chain = here.chain;
    const int c = here.chunk;
    if (chain.head != gate_head) {
      fg.load_gate(p, chain.head);
      gate_head = chain.head;
    }
    const int valid = valid_tokens(c, chain.tokens);
    clk.mark(kPhIssue);
    mbarrier_wait(&raw_full[it % kSlots], uint32_t(it / kSlots) & 1u);
    clk.mark(kPhWaitRaw);
    fg.gate_and_offsets(raw, valid, x);
    clk.mark(kPhGate);
    fg.row_norms(raw);
    fg.write_betas(beta_bits, valid);
    clk.mark(kPhNorms);
    fg.sync();
    clk.mark(kPhBarA);
    // Once the last item's bulk stores have read the other slot, its raw loads may go; and the Aqk image,
    // which this item's scores write after the group's next barrier.
    if (kBulkStores && loader) {
      bulk_wait_read();
      if (next >= 0) load_next_raw(it, nx);
    }
    if (kStreamed) {  // the loader's claim
      next = *claimed(it + 1);
      if (next >= 0) {
        nx = place_of(p, w, next, plan_entry(w, next));
        next_beta_bits = load_beta_bits(p, nx.chain, nx.chunk, fg.tid);
      }
    }
    fg.template elementwise_factors<kBulkStores>(raw, stage, x, valid);
    clk.mark(kPhElementwise);
    fg.sync();
    fg.clear_marks();  // read by every thread before the barrier; set again from the next chunk's phase A
    clk.mark(kPhBarB);
    uint8_t *const aqk = smem + f1_aqk_image(kSlots);  // the Aqk image (bulk stores)
    fg.template scores<kBulkStores>(raw, kBulkStores ? aqk : stage);
    clk.mark(kPhScores);
    fg.sync();
    clk.mark(kPhBarC);
    // Bulk stores: T beta into the g tile, W' into the q tile (both read last by the scores).
    uint8_t *const ta = kBulkStores ? raw + kRawG : stage + kStTa;
    uint8_t *const ta_lo = kBulkStores ? raw + kRawG + kTbetaBytes : stage + kStTbetaLo;
    uint8_t *const wq = kBulkStores ? raw + kRawQ : stage + kStWq;
    if (kInverseWarps == 4) {
      fg.invert_and_merge_spread(ta, ta_lo, [&] { clk.mark(kPhSubstitute); });
    } else {
      clk.mark(kPhSubstitute);
      if (fg.warp == 0) fg.invert_and_merge(stage);
    }
    clk.mark(kPhMerge);
    fg.sync();
    clk.mark(kPhBarD);
    fg.w_product(raw, wq);
    clk.mark(kPhWProduct);
    // The raw slot is refilled by the copy engine (async proxy) after these generic accesses.
    fence_proxy_async();
    fg.sync();
    if (kStreamed && loader) release_flag(&w.ready[item], 1);  // every thread's factor stores are before the barrier
    if (kBulkStores && loader) {  // W' rows (the WQ tile's first 8 KB), T beta hi and lo (2 KB each), Aqk
      bulk_copy_to_global(stage + kStWq, wq, kWBytes);
      bulk_copy_to_global(stage + kStTa, ta, kTbetaBytes);
      bulk_copy_to_global(stage + kStAqk, aqk, kAqkBytes);
      bulk_copy_to_global(stage + kStTbetaLo, ta_lo, kTbetaBytes);
      bulk_commit();
    }
    if (kSlots == 1 && loader && next >= 0) load_next_raw(it, nx);  // the one slot is free now
    clk.mark(kPhBarE);
    clk.end();
    beta_bits = next_beta_bits;
    here = nx;
    next_entry = after_entry;
    item = next;
  }
  if (kBulkStores && loader) bulk_wait_all();  // the slots stay allocated until the copies have read them
}

// ---- pass 2 ------------------------------------------------------------------------------------------
struct RingBarriers {
  uint64_t *full;     // [kPassStages]: factors and V of the stage's chunk arrived (1 arrival + bytes)
  uint64_t *scanned;  // [kPassStages]: the scanner warp has scanned its V (1 arrival)
  uint64_t *empty;    // [kPassStages]: the state warpgroups are done with it (kStateThreads arrivals)
  uint32_t *bad_rows;  // [kPassStages]: the stage's token rows of V holding a non-finite value
};

// A chain's part of a window: its chunks [first, first + count), and where their factors sit.
struct ChainWindow {
  int first, count;
  size_t factor0;                // not packed: the i-th chunk's factors at factor0 + i
  const int *items = nullptr;    // packed: its items (the i-th chunk's at items[i] - item0)
  int item0 = 0;
  __device__ __forceinline__ size_t factor_of(int i) const {
    return items != nullptr ? size_t(items[i] - item0) : factor0 + i;
  }
};

// The first of `count` increasing values at or past `value` (its index; count if none), by a whole warp
// (every lane calls it): each round the lanes sample 32 evenly spaced values at once, so the search
// takes log32(count) rounds of loads in flight together, not log2(count) loads each waiting for the last.
__device__ __forceinline__ int warp_lower_bound(const int *values, int count, int value) {
  const int lane = threadIdx.x % 32;
  int lo = 0, hi = count;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int at = lo + lane * step;
    const bool below = at < hi && values[at] < value;
    const int k = __popc(__ballot_sync(0xFFFFFFFFu, below));  // the samples below `value`: lanes 0 .. k - 1
    const int next_lo = k > 0 ? lo + (k - 1) * step + 1 : lo;
    hi = min(hi, lo + k * step);
    lo = next_lo;
  }
  return lo;
}

// Every thread of the CTA calls it (the packed search is a warp's).
__device__ __forceinline__ ChainWindow chain_window(const Window &w, const Chain &chain, int index) {
  if (!w.is_packed()) return {w.first, max(0, min(w.count, chain.chunks - w.first)), size_t(index) * w.count};
  const int *items = w.packed.item_of + w.packed.chain_first[index];
  const int first = warp_lower_bound(items, chain.chunks, w.first);
  return {first, warp_lower_bound(items, chain.chunks, w.first + w.count) - first, 0, items + first, w.first};
}

// A non-finite V row would reach the earlier tokens of its chunk through R^T = V^T (T beta)^T (0 x NaN).
// The scanner warp reads each chunk's V (both state groups' halves, token rows of 128 bytes) once its
// copies have landed, while the state warps already run the chunk's products, and publishes the rows
// holding a non-finite value (past the sequence too: a packed batch's next sequence). Only then, and
// only where there are such rows, the state warps zero them, form R again and make the outputs from the
// first valid one on and the state NaN (run_state). Measured, the check still costs the state pass 6-11%
// on A-D (docs/PERFLOG.md); waiting for the verdict before the products cost 29%.
__device__ void run_scanner(uint8_t *smem, const RingBarriers &bars, const ChainWindow &cw, bool load_v, int lane) {
  for (int i = 0; i < cw.count; ++i) {
    const int s = ring_stage(i);
    mbarrier_wait(&bars.full[s], ring_parity(i));
    uint32_t bad = 0u;
    if (load_v) {
      const uint4 *v = reinterpret_cast<const uint4 *>(smem + s * kStBytes + kStV);
      constexpr int kPieces = int(kVBytes / 16), kRowPieces = int(kSwizzleRowBytes128 / 16);
#pragma unroll
      for (int u = lane; u < kPieces; u += 32) {
        const uint4 x = v[u];
        if (non_finite_bf16x2(x.x) | non_finite_bf16x2(x.y) | non_finite_bf16x2(x.z) | non_finite_bf16x2(x.w))
          bad |= 1u << (u / kRowPieces % kChunk);
      }
      bad = __reduce_or_sync(0xFFFFFFFFu, bad);
    }
    if (lane == 0) {
      bars.bad_rows[s] = bad;
      mbarrier_arrive(&bars.scanned[s]);
    }
  }
}

// The state warpgroup `group`'s half of V in a stage: the token rows in `rows` zeroed, for wgmma to read.
__device__ void zero_v_rows(uint8_t *stage, int group, uint32_t rows, int thread) {
  named_barrier(1 + group, kWarpgroupThreads);  // the group's products that read them are done
  uint4 *v = reinterpret_cast<uint4 *>(stage + kStV + group * kVGroupBytes);
  constexpr int kRowPieces = int(kSwizzleRowBytes128 / 16);
  for (int u = thread; u < kChunk * kRowPieces; u += kWarpgroupThreads)
    if ((rows >> (u / kRowPieces)) & 1u) v[u] = make_uint4(0u, 0u, 0u, 0u);
  fence_proxy_async();
  named_barrier(1 + group, kWarpgroupThreads);
}

// Streamed: waits for an item's flag (then its factors are in global memory, and the bulk copy after
// reads them). A flag never set (a bug) traps after about ten seconds instead of hanging the GPU.
constexpr long long kReadyPollLimit = 10000000;
__device__ __noinline__ void wait_until_ready(const int *flag) {
  for (long long polls = 0; acquire_load(flag) == 0; ++polls)
    if (polls == kReadyPollLimit) __trap();
  fence_proxy_async_global();
}

// Lane 0 of the loader warp: the chain's chunks of the window, each one's factors (one bulk copy) and V
// (two boxes) into stage i % kPassStages. The factors are the factor pass's, which may still run when
// this grid starts (programmatic dependent launch): the only thread to read them waits for it first,
// or, streamed, for each item's flag.
__device__ void run_loader(const TensorMaps &maps, const uint8_t *factors, uint8_t *smem, const RingBarriers &bars,
                           const Chain &chain, const ChainWindow &cw, bool load_v, const int *ready) {
  if (ready == nullptr) wait_for_prior_grid();  // streamed: item by item instead
  for (int i = 0; i < cw.count; ++i) {  // the window's i-th chunk of the chain, cw.first + i
    const int s = ring_stage(i);
    uint8_t *stage = smem + s * kStBytes;
    if (i >= kPassStages) mbarrier_wait(&bars.empty[s], ring_parity(i - kPassStages));
    if (load_v) issue_v_loads(maps, chain, cw.first + i, stage, &bars.full[s]);  // expects its bytes; arrival next
    if (ready != nullptr) wait_until_ready(&ready[cw.factor_of(i)]);
    mbarrier_arrive_expect_bytes(&bars.full[s], kPassFactorBytes);
    bulk_copy_to_shared(stage, factors + cw.factor_of(i) * kFactorPitch, kPassFactorBytes, &bars.full[s]);
  }
}

// A chunk whose V had a non-finite row among its valid ones (`poisoned`): its outputs from the first
// such token on and the state are NaN, as the float64 recurrence's are (there only in that row's value
// columns).
__device__ __forceinline__ void poison(uint32_t poisoned, int thread, float (&s)[kStateValues], float (&o)[kHalfRo]) {
  const int from = __ffs(poisoned) - 1;
#pragma unroll
  for (int i = 0; i < kHalfRo; ++i)
    if (acc_col(thread, i) >= from) o[i] = NAN;
#pragma unroll
  for (int i = 0; i < kStateValues; ++i) s[i] = NAN;
}

__device__ void run_state(const FusedParams &p, uint8_t *smem, const RingBarriers &bars, const Chain &chain,
                          int group, int first, int count, bool from_identity) {
  const int thread = threadIdx.x % kWarpgroupThreads;
  float s[kStateValues], o[kHalfRo];
  load_initial_state(p, chain, group, thread, s);
  if (from_identity) {
#pragma unroll
    for (int i = 0; i < kStateValues; ++i)
      s[i] = group * kGroupRows + acc_row(thread, i) == acc_col(thread, i) ? 1.f : 0.f;
  }
  const uint32_t stages = smem_address(smem);
  for (int i = 0; i < count; ++i) {
    const int st = ring_stage(i);
    const float *decay = reinterpret_cast<const float *>(smem + st * kStBytes + kStDecay);
    mbarrier_wait(&bars.full[st], ring_parity(i));
    uint32_t bad = 0u;
    auto rewrote_v = [&] {  // once R is formed: the scanner's verdict on this chunk's V
      mbarrier_wait(&bars.scanned[st], ring_parity(i));
      bad = bars.bad_rows[st];  // rewritten only after this stage is released
      if (bad == 0u) return false;
      zero_v_rows(smem + st * kStBytes, group, bad, thread);
      return true;
    };
    state_step(stages + st * kStBytes, decay, group, thread, s, o, rewrote_v);
    mbarrier_arrive(&bars.empty[st]);  // every wgmma reading the stage has completed (wait_group 0)
    const uint32_t poisoned = valid_rows(bad, valid_tokens(first + i, chain.tokens));
    if (poisoned != 0u) poison(poisoned, thread, s, o);
    store_outputs(p, chain, first + i, group, thread, o);
  }
  store_final_state(p, chain, group, thread, s);
}

__global__ void __launch_bounds__(kStateCtaThreads, 1)
    state_pass_kernel(const __grid_constant__ FusedParams p, const __grid_constant__ TensorMaps maps,
                      const uint8_t *factors, Window w, TransitionOutputs tr) {
  const Chain chain = p.cu_seqlens != nullptr ? packed_chain_of(blockIdx.x, p.heads, p.cu_seqlens, p.group)
                                               : chain_of(blockIdx.x, p.heads, p.tokens, p.group);
  const ChainWindow cw = chain_window(w, chain, blockIdx.x);
  // Nothing of the chain in a later window: its state stays where the last one left it. (The first
  // window writes every chain's state, from its initial state when none of its chunks is there.)
  if (cw.count == 0 && w.first > 0) return;
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = aligned_smem(smem_raw);
  uint64_t *bar_base = reinterpret_cast<uint64_t *>(smem + kS2Barriers);
  // blockIdx.y 1: the chain's transition slice: v = 0 (the stages' V stays zero, never loaded), the
  // state from the identity in the first window, its outputs and final state to `tr`.
  const bool transition = blockIdx.y == 1;
  FusedParams q = p;
  if (transition) {
    q.o = tr.o;
    q.final_state = tr.state;
    q.initial_state = w.first > 0 ? tr.state : nullptr;
    for (int i = threadIdx.x; i < kPassStages * int(kVBytes / 16); i += blockDim.x) {
      const int stage = i / int(kVBytes / 16), piece = i % int(kVBytes / 16);
      reinterpret_cast<uint4 *>(smem + stage * kStBytes + kStV)[piece] = make_uint4(0u, 0u, 0u, 0u);
    }
    fence_proxy_async();  // the zeros are read by wgmma (the async proxy)
  }
  const RingBarriers bars{bar_base, bar_base + kPassStages, bar_base + 2 * kPassStages,
                          reinterpret_cast<uint32_t *>(smem + kS2BadRows)};
  if (threadIdx.x == 0) {
    for (int i = 0; i < kPassStages; ++i) {
      mbarrier_init(&bars.full[i], 1);
      mbarrier_init(&bars.scanned[i], 1);
      mbarrier_init(&bars.empty[i], kStateThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();
  // The role as a warp-uniform value (a broadcast): a plain threadIdx test makes ptxas treat the wgmma
  // code as divergent (C7518).
  const int warp = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / 32, 0);
  if (warp < kLoaderWarp) {
    run_state(q, smem, bars, chain, warp / (kWarpgroupThreads / 32), cw.first, cw.count, transition && w.first == 0);
  } else if (warp == kScannerWarp) {
    run_scanner(smem, bars, cw, !transition, int(threadIdx.x % 32));
  } else if (threadIdx.x % 32 == 0) {
    run_loader(maps, factors, smem, bars, chain, cw, !transition, w.ready);
  }
}

}  // namespace two_pass
}  // namespace chunk32
}  // namespace jax_kda
