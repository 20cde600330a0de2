// Issue 10: the harness of the two-pass chunk-32 KDA prefill (csrc/chunk32/two_pass.cuh, the library's
// kernel; full-V case, K = V = 128): its variants (gate math, inverse spread, raw slots), windows of
// chunks (serial and overlapped on two streams), the state pass's transition slice, on the inputs and
// against the checks of fused_prefill.cu.
//
// Checks (outputs and the factor buffer poisoned with NaN first): o and the final state of chains
// against the float64 recurrence (< 5e-3 relative RMS passes) and the CPU emulation (fused_prefill_host.h);
// pass 1's factors of a few whole chunks against the float64 factors of common_host.h (< 1e-2 each);
// every output written; windows bit for bit against one pass. Timings (cudaEvents, median after
// warm-up) of pass 1, pass 2 and both, window by window, and with the transition slice.
// `--host-check 1`: CPU-only checks (layouts, the pass-1 schedule, what pass 2 copies, the emulation).
#include <climits>
#include <map>
#include <memory>
#include <string>

#include "fused_prefill_host.h"
#include "two_pass.cuh"

namespace jax_kda {
namespace chunk32 {
namespace two_pass {

// ---- host --------------------------------------------------------------------------------------------
using FactorKernel = void (*)(FusedParams, TensorMaps, uint8_t *, Window);
struct Variant {
  const char *name;
  FactorKernel kernel;
  int same_factors_as;  // -1, or the variant whose factors this one's must equal bit for bit
  GateMode gate = GateMode::kBounded;  // the gate of the problems it is checked on
  uint32_t smem_bytes = kF1SmBytes;
  int ctas_per_sm = kFactorCtasPerSm;  // planned; the grid uses the occupancy found at start-up
  int groups = 1;                      // factor groups a CTA
  FactorKernel streamed = nullptr;     // its streamed instance (Window::ready; one CTA a SM), where the harness runs one
  int threads() const { return kFactorThreads * groups; }
};
// The bounded-gate variants are timed; the softplus and log-decay ones (with the 4-warp inverse) are
// checked on the short shapes.
const Variant kVariants[] = {
    {"ex2+rcp gate", factor_pass_kernel<GateMath::kExp2Reciprocal, true, true>, -1},
    {"tanh gate", factor_pass_kernel<GateMath::kTanh, true, true>, -1},
    {"ex2+rcp inv4w", factor_pass_kernel<GateMath::kExp2Reciprocal, true, true, 4>, 0},  // the inverse on 4 warps
    {"inv4w lean", factor_pass_kernel<GateMath::kExp2Reciprocal, true, true, 4, kLeanSlots, kLeanCtasPerSm>, 0,
     GateMode::kBounded, f1_smem_bytes(kLeanSlots), kLeanCtasPerSm},  // one raw slot, four CTAs a SM
    // Three groups a CTA, one CTA a SM (the library's), and its streamed instance.
    {"inv4w 3 groups", factor_pass_kernel<GateMath::kExp2Reciprocal, true, true, 4, kRawSlots, 1, kGroupsPerCta>, 2,
     GateMode::kBounded, f1_smem_bytes(kRawSlots, kGroupsPerCta), 1, kGroupsPerCta,
     factor_pass_kernel<GateMath::kExp2Reciprocal, true, true, 4, kRawSlots, 1, kGroupsPerCta, true>},
    // The library's windows' pass (the tanh gate, the factors stored by bulk copies: kStores; its factors
    // bit for bit the tanh gate's).
    {"library", factor_pass_kernel<GateMath::kTanh, true, true, 4, kRawSlots, 1, kGroupsPerCta, false,
                                   FactorStores::kBulk>,
     1, GateMode::kBounded, f1_smem_bytes(kRawSlots, kGroupsPerCta, true), 1, kGroupsPerCta},
    {"softplus gate", factor_pass_kernel<GateMath::kSoftplus, true, true, 4>, -1, GateMode::kSoftplus},
    {"log-decay gate", factor_pass_kernel<GateMath::kLogDecay, true, true, 4>, -1, GateMode::kLogDecay},
};
constexpr size_t kVariantCount = sizeof(kVariants) / sizeof(kVariants[0]);
// The library's windows' pass among them (D's reference).
const Variant &library_variant() {
  for (const Variant &v : kVariants)
    if (std::string(v.name) == "library") return v;
  std::fprintf(stderr, "two_pass: no variant named \"library\"\n");
  std::exit(2);
}

struct Launcher {
  int sms = 132;
  int resident[kVariantCount] = {};  // factor CTAs resident per SM, by variant (found at start-up)
  uint8_t *factors = nullptr;
  size_t factor_capacity = 0;  // bytes
  TransitionOutputs transition{};  // set: pass 2 runs each chain's transition slice too
  // Pass 1 with one CTA an item instead of a persistent grid: its CTAs retire every item, so that the
  // overlapped schedule's pass 2 (higher priority) can take multiprocessors as they free up.
  bool pass1_per_item = false;

  static int chunks_in(int tokens) { return (tokens + kChunk - 1) / kChunk; }
  // Chunks of the longest sequence: the windows' range.
  static int chunks_of(const DeviceProblem &d) {
    int longest = d.shape.tokens;
    if (d.packed()) longest = *std::max_element(d.seqlens.begin(), d.seqlens.end());
    return chunks_in(longest);
  }
  static size_t chains_of(const DeviceProblem &d) { return size_t(d.sequences()) * d.shape.heads; }
  static size_t items_of(const DeviceProblem &d) {
    if (!d.packed()) return chains_of(d) * chunks_of(d);
    size_t items = 0;
    for (int len : d.seqlens) items += size_t(chunks_in(len)) * d.shape.heads;
    return items;
  }
  // A window's items (packed: at most; the plan on the device has the exact count).
  static size_t items_in(const DeviceProblem &d, const Window &w) {
    return w.is_packed() ? size_t(w.count) : chains_of(d) * w.count;
  }

  // The windows of `window` chunks per chain (0: one window of all; packed: of as many items as
  // `window` chunks of every chain), with packed problems' plan on the device (plan_packed_kernel);
  // kept for the last problem and window size asked.
  std::vector<Window> plan;
  PackedItems packed_plan;
  uint8_t *plan_buffer = nullptr;
  size_t plan_capacity = 0;  // bytes
  std::vector<int> planned_lengths;
  int planned_tokens = -1, planned_heads = -1, planned_window = -1;
  const std::vector<Window> &windows(const DeviceProblem &d, int window = 0) {
    const int chunks = chunks_of(d);
    if (window <= 0) window = std::max(chunks, 1);
    if (planned_lengths == d.seqlens && planned_tokens == d.shape.tokens && planned_heads == d.shape.heads &&
        planned_window == window)
      return plan;
    KN_CHECK(cudaDeviceSynchronize());  // launches of the last plan may still read it
    plan.clear();
    if (d.packed()) {  // the library's plan: items in chunk-major order, windows of `capacity` items
      const int sequences = d.sequences(), heads = d.shape.heads, chains = sequences * heads;
      const size_t bound = size_t(heads) * (chunks_in(d.shape.tokens) + sequences);  // items at most
      const size_t bytes = bound * (sizeof(int2) + sizeof(int)) + (chains + 2) * sizeof(int);
      if (bytes > plan_capacity) {
        if (plan_buffer != nullptr) KN_CHECK(cudaFree(plan_buffer));
        KN_CHECK(cudaMalloc(&plan_buffer, bytes));
        plan_capacity = bytes;
      }
      packed_plan.chain_chunk = reinterpret_cast<int2 *>(plan_buffer);
      packed_plan.item_of = reinterpret_cast<int *>(plan_buffer + bound * sizeof(int2));
      packed_plan.chain_first = packed_plan.item_of + bound;
      packed_plan.items = packed_plan.chain_first + chains + 1;
      const int pairs = chunks_in(d.shape.tokens) + sequences;
      // Chunk-major in every window (the streamed schedule needs it; the library's one serial window
      // takes chain-major).
      plan_packed_kernel<<<(pairs * heads + kPlanThreads - 1) / kPlanThreads, kPlanThreads>>>(d.cu, sequences,
                                                                                             heads, false, packed_plan);
      KN_CHECK(cudaGetLastError());
      const int capacity = int(std::min<size_t>(bound, size_t(chains) * window));
      for (size_t first = 0; first < bound; first += capacity) {
        Window w;
        w.first = int(first);
        w.count = capacity;
        w.packed = packed_plan;
        plan.push_back(w);
      }
    } else {
      for (int first = 0; first < chunks || (first == 0 && chunks == 0); first += window) {
        Window w;
        w.first = first;
        w.count = std::max(0, std::min(window, chunks - first));
        plan.push_back(w);
        if (chunks == 0) break;
      }
    }
    planned_lengths = d.seqlens;
    planned_tokens = d.shape.tokens;
    planned_heads = d.shape.heads;
    planned_window = window;
    return plan;
  }
  // The window (chunks per chain) whose factors fill at most `bytes` (one chunk at least).
  static int window_for(const DeviceProblem &d, size_t bytes) {
    return int(std::max<size_t>(1, std::min<size_t>(chunks_of(d), bytes / (chains_of(d) * kFactorPitch))));
  }
  void reserve(const DeviceProblem &d, int window = 0) {
    const size_t bytes = chains_of(d) * (window > 0 ? window : chunks_of(d)) * kFactorPitch;
    if (bytes <= factor_capacity) return;
    if (factors != nullptr) KN_CHECK(cudaFree(factors));
    KN_CHECK(cudaMalloc(&factors, bytes));
    factor_capacity = bytes;
  }
  int factor_grid(const Variant &v, const DeviceProblem &d, const Window &w) const {
    const int per_sm = resident[&v - kVariants] > 0 ? resident[&v - kVariants] : v.ctas_per_sm;
    const size_t ctas = (items_in(d, w) + v.groups - 1) / v.groups;  // a group an item at least
    if (pass1_per_item) return int(ctas);
    return int(std::min<size_t>(ctas, size_t(sms) * per_sm));
  }
  void pass1(const Variant &v, const DeviceProblem &d) { pass1(v, d, windows(d)[0], factors, nullptr); }
  void pass2(const DeviceProblem &d) { pass2(d, windows(d)[0], factors, nullptr); }
  void pass1(const Variant &v, const DeviceProblem &d, Window w, uint8_t *buffer, cudaStream_t stream) const {
    const int grid = factor_grid(v, d, w);
    if (grid == 0) return;
    v.kernel<<<grid, v.threads(), v.smem_bytes, stream>>>(make_params(d), d.maps, buffer, w);
    KN_CHECK(cudaGetLastError());
  }
  // After the first window the state enters from the final-state buffer, where the last one left it.
  void pass2(const DeviceProblem &d, Window w, const uint8_t *buffer, cudaStream_t stream) const {
    const int ctas = int(chains_of(d));
    if (ctas == 0 || d.shape.tokens == 0) return;
    FusedParams p = make_params(d);
    if (w.first > 0) p.initial_state = p.final_state;
    const dim3 grid(ctas, transition.o != nullptr ? 2 : 1);
    state_pass_kernel<<<grid, kStateCtaThreads, kS2SmBytes, stream>>>(p, d.maps, buffer, w, transition);
    KN_CHECK(cudaGetLastError());
  }
  // Both passes window by window, `window` chunks per chain at a time (reserve(d, window) first).
  void windowed(const Variant &v, const DeviceProblem &d, int window) {
    for (const Window &w : windows(d, window)) {
      pass1(v, d, w, factors, nullptr);
      pass2(d, w, factors, nullptr);
    }
  }

  // Streamed (one window): the flags and the claim counter zeroed, the streamed factor pass on the
  // multiprocessors the state pass leaves, the state pass launched as its programmatic dependent (it
  // starts once every factor CTA is running and waits for each item's flag).
  int *flags = nullptr;
  size_t flag_capacity = 0;  // ints
  void streamed(const Variant &v, const DeviceProblem &d) {
    Window w = windows(d)[0];
    const size_t items = items_in(d, w);
    if (items + 1 > flag_capacity) {
      if (flags != nullptr) KN_CHECK(cudaFree(flags));
      KN_CHECK(cudaMalloc(&flags, (items + 1) * sizeof(int)));
      flag_capacity = items + 1;
    }
    KN_CHECK(cudaMemsetAsync(flags, 0, (items + 1) * sizeof(int)));
    w.ready = flags;
    w.claims = flags + items;
    const int state_ctas = int(chains_of(d)) * (transition.o != nullptr ? 2 : 1);
    if (state_ctas == 0 || d.shape.tokens == 0) return;
    const int per_sm = resident[&v - kVariants] > 0 ? resident[&v - kVariants] : v.ctas_per_sm;
    const int grid = int(std::min<size_t>((items + v.groups - 1) / v.groups, size_t(std::max(1, sms - state_ctas)) * per_sm));
    const FusedParams p = make_params(d);
    v.streamed<<<grid, v.threads(), v.smem_bytes>>>(p, d.maps, factors, w);
    KN_CHECK(cudaGetLastError());
    cudaLaunchAttribute programmatic{};
    programmatic.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    programmatic.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(state_ctas / (transition.o != nullptr ? 2 : 1), transition.o != nullptr ? 2 : 1);
    config.blockDim = dim3(kStateCtaThreads);
    config.dynamicSmemBytes = kS2SmBytes;
    config.attrs = &programmatic;
    config.numAttrs = 1;
    KN_CHECK(cudaLaunchKernelEx(&config, state_pass_kernel, p, d.maps, static_cast<const uint8_t *>(factors), w,
                                transition));
  }

  // Overlapped windows: pass 1 of window n + 1 runs on a side stream while pass 2 of window n runs on
  // a main stream of higher priority (its CTAs take multiprocessors first as they free up), through two
  // factor buffers: pass 1 of window n waits until pass 2 of window n - 2 has read its buffer.
  cudaStream_t main_stream = nullptr, side_stream = nullptr;
  cudaEvent_t fork{}, join_main{}, join_side{}, ready[2]{}, read[2]{};
  uint8_t *window_buffers[2] = {nullptr, nullptr};
  size_t window_capacity = 0;  // bytes of each
  void reserve_overlapped(const DeviceProblem &d, int window) {
    if (main_stream == nullptr) {
      int least = 0, greatest = 0;  // CUDA's priorities: the greatest is the numerically least
      KN_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      KN_CHECK(cudaStreamCreateWithPriority(&main_stream, cudaStreamNonBlocking, greatest));
      KN_CHECK(cudaStreamCreateWithPriority(&side_stream, cudaStreamNonBlocking, least));
      for (cudaEvent_t *e : {&fork, &join_main, &join_side, &ready[0], &ready[1], &read[0], &read[1]})
        KN_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    }
    const size_t bytes = chains_of(d) * window * kFactorPitch;
    if (bytes <= window_capacity) return;
    for (uint8_t *&b : window_buffers) {
      if (b != nullptr) KN_CHECK(cudaFree(b));
      KN_CHECK(cudaMalloc(&b, bytes));
    }
    window_capacity = bytes;
  }
  // Enqueued behind the legacy default stream's work, and that stream waits for all of it.
  void overlapped(const Variant &v, const DeviceProblem &d, int window) {
    KN_CHECK(cudaEventRecord(fork, nullptr));
    KN_CHECK(cudaStreamWaitEvent(main_stream, fork));
    KN_CHECK(cudaStreamWaitEvent(side_stream, fork));
    int n = 0;
    for (const Window &w : windows(d, window)) {
      const int b = n++ % 2;
      if (n >= 2) KN_CHECK(cudaStreamWaitEvent(side_stream, read[b]));
      pass1(v, d, w, window_buffers[b], side_stream);
      KN_CHECK(cudaEventRecord(ready[b], side_stream));
      KN_CHECK(cudaStreamWaitEvent(main_stream, ready[b]));
      pass2(d, w, window_buffers[b], main_stream);
      KN_CHECK(cudaEventRecord(read[b], main_stream));
    }
    KN_CHECK(cudaEventRecord(join_main, main_stream));
    KN_CHECK(cudaEventRecord(join_side, side_stream));
    KN_CHECK(cudaStreamWaitEvent(nullptr, join_main));
    KN_CHECK(cudaStreamWaitEvent(nullptr, join_side));
  }
};

// Pass 1's factors of whole chunk `chunk` of chain (b, h) against the float64 factors (common_host.h).
struct FactorErrors {
  ErrorStats w, qd, tbeta, aqk, kend, decay;
  double worst() const {
    double m = 0;
    for (const ErrorStats *e : {&w, &qd, &tbeta, &aqk, &kend, &decay}) m = std::max(m, e->relative_rms());
    return m;
  }
};
void check_factors(const DeviceProblem &d, const Launcher &l, const ChainInputs &in, int b, int h, int chunk,
                   FactorErrors &e) {
  const int chunks = Launcher::chunks_of(d);
  const size_t item = (size_t(b) * d.shape.heads + h) * chunks + chunk;
  std::vector<uint8_t> st(kPassFactorBytes);
  KN_CHECK(cudaMemcpy(st.data(), l.factors + item * kFactorPitch, kPassFactorBytes, cudaMemcpyDeviceToHost));
  static ChunkInputs ci;
  for (int t = 0; t < kChunk; ++t) {
    const size_t at = size_t(chunk) * kChunk + t;
    for (int c = 0; c < kDimK; ++c) {
      ci.q[t][c] = in.q[at * kDimK + c];
      ci.k[t][c] = in.k[at * kDimK + c];
      ci.g[t][c] = in.g[at * kDimK + c];
    }
    ci.beta[t] = in.beta[at];
  }
  static GateParams gp;
  gp.a_log = in.a_log;
  for (int c = 0; c < kDimK; ++c) gp.dt_bias[c] = in.dt_bias[c];
  gp.lower_bound = kLowerBound;
  gp.mode = in.gate;
  gp.scale = 1.0 / std::sqrt(double(kDimK));
  static ChunkFactors f;
  reference_factors(ci, gp, f);
  auto f16_at = [&](uint32_t off) {
    __half_raw r;
    memcpy(&r.x, st.data() + off, 2);
    return double(__half2float(__half(r)));
  };
  auto bf16_at = [&](uint32_t off) {
    uint16_t bits;
    memcpy(&bits, st.data() + off, 2);
    return double(bf16_value(bits));
  };
  for (int t = 0; t < kChunk; ++t)
    for (int c = 0; c < kDimK; ++c) {
      e.w.add(-f16_at(kStWq + wq_offset(kWRow0 + t, c)), f.w[t][c]);
      e.qd.add(f16_at(kStWq + wq_offset(kQdRow0 + t, c)), f.qd[t][c]);
      e.kend.add(f16_at(kStKend + k32_offset(c, t)), f.kend[t][c]);
    }
  for (int i = 0; i < kChunk; ++i)
    for (int j = 0; j < kChunk; ++j) {
      e.tbeta.add(bf16_at(kStTa + k32_offset(kTbetaRow0 + i, j)) + bf16_at(kStTbetaLo + k32_offset(i, j)),
                  f.tbeta[i][j]);
      e.aqk.add(f16_at(kStTa + k32_offset(kAqkRow0 + i, j)), f.aqk[i][j]);
    }
  for (int c = 0; c < kDimK; ++c) {
    float x;
    memcpy(&x, st.data() + kStDecay + 4 * c, 4);
    e.decay.add(x, f.decay[c]);
  }
}

constexpr double kFactorTolerance = 1e-2;

struct TwoPassCheck {
  CheckResult r;
  FactorErrors fe;
  int factor_chunks = 0;
  bool pass = false;
};

// Poisons o, the final state and the factor buffer; runs pass 1 then pass 2; checks `chains` (all when
// empty) end to end and the factors of up to `factor_chunks` whole chunks of the first checked chain.
TwoPassCheck check(const Variant &v, Launcher &l, const DeviceProblem &d, std::vector<std::pair<int, int>> chains,
                   int factor_chunks) {
  l.reserve(d);
  poison_outputs(d);
  KN_CHECK(cudaMemset(l.factors, 0xFF, Launcher::items_of(d) * kFactorPitch));
  l.pass1(v, d);
  l.pass2(d);
  KN_CHECK(cudaDeviceSynchronize());
  TwoPassCheck out;
  if (chains.empty())
    for (int b = 0; b < d.sequences(); ++b)
      for (int h = 0; h < d.shape.heads; ++h) chains.push_back({b, h});
  const int whole = d.shape.tokens / kChunk;
  if (!d.packed() && !chains.empty() && whole > 0 && factor_chunks > 0) {  // the item index of a B x T problem
    const ChainInputs in = fetch_chain(d, chains[0].first, chains[0].second);
    const int step = std::max(1, whole / factor_chunks);
    for (int c = 0; c < whole && out.factor_chunks < factor_chunks; c += step, ++out.factor_chunks)
      check_factors(d, l, in, chains[0].first, chains[0].second, c, out.fe);
  }
  out.r = evaluate(d, std::move(chains));
  out.pass = out.r.pass && (out.factor_chunks == 0 || out.fe.worst() < kFactorTolerance);
  return out;
}

// The transition slice: pass 2 with `l.transition` set, against the float64 recurrence of each chain with
// v = 0 from the identity (a problem `dt` that differs from `d` in v, the initial state and the outputs),
// and the value slice against `d`'s; one pass (window 0) or overlapped windows of `window` chunks.
struct TransitionCheck {
  CheckResult values, transition;
  bool pass = false;
};
TransitionCheck check_transition(const Variant &v, Launcher &l, const DeviceProblem &d, int window) {
  DeviceProblem dt = d;
  std::vector<float> identity(d.state_elems(), 0.f);
  for (size_t chain = 0; chain < Launcher::chains_of(d); ++chain)
    for (int i = 0; i < kDimK; ++i) identity[(chain * kDimV + i) * kDimK + i] = 1.f;
  KN_CHECK(cudaMalloc(&dt.v, d.token_elems() * kBf16Bytes));
  KN_CHECK(cudaMemset(dt.v, 0, d.token_elems() * kBf16Bytes));
  KN_CHECK(cudaMalloc(&dt.initial_state, d.state_elems() * 4));
  KN_CHECK(cudaMemcpy(dt.initial_state, identity.data(), d.state_elems() * 4, cudaMemcpyHostToDevice));
  KN_CHECK(cudaMalloc(&dt.o, d.token_elems() * kBf16Bytes));
  KN_CHECK(cudaMalloc(&dt.final_state, d.state_elems() * 4));
  poison_outputs(d);
  poison_outputs(dt);
  l.transition = TransitionOutputs{dt.o, dt.final_state};
  if (window > 0) {
    l.reserve_overlapped(d, window);
    l.overlapped(v, d, window);
  } else {
    l.reserve(d);
    l.pass1(v, d);
    l.pass2(d);
  }
  KN_CHECK(cudaDeviceSynchronize());
  l.transition = TransitionOutputs{};
  TransitionCheck out;
  out.values = evaluate(d, {});
  // The transition's state maps the entry state: judged against the identity's scale (its RMS, K^-1/2),
  // since over a few chunks of these gates it decays below fp32's (and the f16 operands') range while
  // float64 still resolves it (relative to its own RMS, every decayed transition would fail).
  out.transition = evaluate(dt, {}, 1.0 / std::sqrt(double(kDimK)));
  out.pass = out.values.pass && out.transition.pass;
  for (void *ptr : {static_cast<void *>(dt.v), static_cast<void *>(dt.initial_state), static_cast<void *>(dt.o),
                    static_cast<void *>(dt.final_state)})
    KN_CHECK(cudaFree(ptr));
  return out;
}

// Runs one pass (pass 1, then pass 2) and then `candidate` (run(1)), each after `prepare(r)` and with
// o, the final state and `extra` (device buffers of that many bytes) poisoned, and counts the bytes of
// them that differ between the two runs: a schedule must change nothing.
template <class Prepare, class Run>
long long outputs_differing(const Variant &v, Launcher &l, const DeviceProblem &d, Prepare prepare, Run candidate,
                            const std::vector<std::pair<void *, size_t>> &extra, size_t &compared) {
  std::vector<std::pair<void *, size_t>> buffers = {{d.o, d.token_elems() * kBf16Bytes},
                                                    {d.final_state, d.state_elems() * 4}};
  buffers.insert(buffers.end(), extra.begin(), extra.end());
  compared = 0;
  for (const auto &b : buffers) compared += b.second;
  std::vector<uint8_t> out[2];
  for (int r = 0; r < 2; ++r) {
    prepare(r);
    poison_outputs(d);
    for (const auto &b : extra) KN_CHECK(cudaMemset(b.first, 0xFF, b.second));
    if (r == 0) {
      l.pass1(v, d);
      l.pass2(d);
    } else {
      candidate();
    }
    KN_CHECK(cudaDeviceSynchronize());
    out[r].resize(compared);
    size_t at = 0;
    for (const auto &b : buffers) {
      KN_CHECK(cudaMemcpy(out[r].data() + at, b.first, b.second, cudaMemcpyDeviceToHost));
      at += b.second;
    }
  }
  long long differ = 0;
  for (size_t i = 0; i < compared; ++i) differ += out[0][i] != out[1][i];
  return differ;
}

// Both passes window by window (`window` chunks per chain) against one pass over all chunks, byte for
// byte (o and the final state; outputs poisoned before each run): the windows must change nothing.
long long windows_differing(const Variant &v, Launcher &l, const DeviceProblem &d, int window, bool overlap,
                            size_t &compared) {
  const bool per_item = l.pass1_per_item;  // the windows' pass 1 grid; the one pass runs persistent
  const long long differ = outputs_differing(
      v, l, d,
      [&](int r) {
        l.pass1_per_item = r == 1 && per_item;
        l.reserve(d, r == 0 ? 0 : window);
      },
      [&] {
        if (overlap) {
          l.reserve_overlapped(d, window);
          l.overlapped(v, d, window);
        } else {
          l.windowed(v, d, window);
        }
      },
      {}, compared);
  l.pass1_per_item = per_item;
  return differ;
}
// The streamed schedule against one pass (pass 1, then pass 2), byte for byte: o and the final state,
// and with `transition` the transition slice's outputs too (outputs poisoned before each run).
long long streamed_differing(const Variant &v, Launcher &l, const DeviceProblem &d, bool transition,
                             size_t &compared) {
  const size_t o_bytes = d.token_elems() * kBf16Bytes, s_bytes = d.state_elems() * 4;
  uint16_t *o_t = nullptr;
  float *state_t = nullptr;
  std::vector<std::pair<void *, size_t>> extra;
  if (transition) {
    KN_CHECK(cudaMalloc(&o_t, o_bytes));
    KN_CHECK(cudaMalloc(&state_t, s_bytes));
    l.transition = TransitionOutputs{o_t, state_t};
    extra = {{o_t, o_bytes}, {state_t, s_bytes}};
  }
  const long long differ = outputs_differing(
      v, l, d,
      [&](int) {
        l.reserve(d);
        KN_CHECK(cudaMemset(l.factors, 0xFF, Launcher::items_of(d) * kFactorPitch));
      },
      [&] { l.streamed(v, d); }, extra, compared);
  if (transition) {
    l.transition = TransitionOutputs{};
    KN_CHECK(cudaFree(o_t));
    KN_CHECK(cudaFree(state_t));
  }
  return differ;
}
bool check_streamed(const char *label, const Variant &v, Launcher &l, const DeviceProblem &d, bool transition) {
  if (v.streamed == nullptr) return true;
  size_t compared = 0;
  const long long differ = streamed_differing(v, l, d, transition, compared);
  printf("check %-6s streamed (%s%s) vs one pass, bit for bit: %lld of %zu bytes differ  %s\n", label, v.name,
         transition ? ", with the transition slice" : "", differ, compared, differ == 0 ? "PASS" : "FAIL");
  return differ == 0;
}

// Pass 1 of `v` against pass 1 of `ref` on `d`, byte for byte (the buffer poisoned alike before each): the
// first and the last up to kCompareItems items. Returns the bytes that differ; `compared` the bytes compared.
long long factors_differing(const Variant &v, const Variant &ref, Launcher &l, const DeviceProblem &d,
                            size_t &compared) {
  constexpr size_t kCompareItems = 2048;
  l.reserve(d);
  const size_t items = Launcher::items_of(d), head = std::min(items, kCompareItems),
               tail = std::min(items - head, kCompareItems);
  std::vector<uint8_t> out[2];
  const Variant *both[2] = {&v, &ref};
  for (int r = 0; r < 2; ++r) {
    KN_CHECK(cudaMemset(l.factors, 0xFF, items * kFactorPitch));
    l.pass1(*both[r], d);
    KN_CHECK(cudaDeviceSynchronize());
    out[r].resize((head + tail) * kFactorPitch);
    KN_CHECK(cudaMemcpy(out[r].data(), l.factors, head * kFactorPitch, cudaMemcpyDeviceToHost));
    if (tail > 0)
      KN_CHECK(cudaMemcpy(out[r].data() + head * kFactorPitch, l.factors + (items - tail) * kFactorPitch,
                          tail * kFactorPitch, cudaMemcpyDeviceToHost));
  }
  long long bad = 0;
  for (size_t i = 0; i < out[0].size(); ++i) bad += out[0][i] != out[1][i];
  compared = out[0].size();
  return bad;
}
bool check_same_factors(const char *label, const Variant &v, Launcher &l, const DeviceProblem &d) {
  if (v.same_factors_as < 0) return true;
  const Variant &ref = kVariants[v.same_factors_as];
  size_t compared = 0;
  const long long bad = factors_differing(v, ref, l, d, compared);
  printf("check %-6s factors of %s vs %s, bit for bit: %lld of %zu bytes differ  %s\n", label, v.name, ref.name, bad,
         compared, bad == 0 ? "PASS" : "FAIL");
  return bad == 0;
}

void print_check(const char *label, const Shape &s, const Variant &v, const TwoPassCheck &c) {
  const CheckResult &r = c.r;
  printf("check %-6s B %d T %6d H %3d %-13s chains %3d: o %.2e state %.2e | vs emulation o %.2e state %.2e | "
         "bad %lld",
         label, s.batch, s.tokens, s.heads, v.name, r.chains, r.o_ref, r.s_ref, r.o_emu, r.s_emu, r.bad);
  if (c.factor_chunks > 0)
    printf(" | factors (%d chunks) W %.1e Qd %.1e Tb %.1e Aqk %.1e Kend %.1e decay %.1e", c.factor_chunks,
           c.fe.w.relative_rms(), c.fe.qd.relative_rms(), c.fe.tbeta.relative_rms(), c.fe.aqk.relative_rms(),
           c.fe.kend.relative_rms(), c.fe.decay.relative_rms());
  printf("  %s\n", c.pass ? "PASS" : "FAIL");
}

// ---- CPU-only checks ------------------------------------------------------------------------------
// The pass-1 schedule covers every item exactly once, in contiguous ranges, for the timed shapes and
// several grid sizes, with one group a CTA and with kGroupsPerCta (units = CTAs x groups, as the kernel
// numbers them).
long long host_check_schedule() {
  long long bad = 0;
  for (int groups : {1, kGroupsPerCta})
    for (int items : {1, 7, 16, 2048, 24576, 32768, 24577})
      for (int ctas : {1, 3, 132 * 3, 114 * 3, 100000}) {
        const int grid = std::min((items + groups - 1) / groups, ctas), units = grid * groups;
        std::vector<int> seen(items, 0);
        int prev_last = 0;
        for (int u = 0; u < units; ++u) {
          const ItemRange r = items_of(u, units, items);
          bad += r.first != prev_last || r.last < r.first;
          prev_last = r.last;
          for (int i = r.first; i < r.last; ++i) ++seen[i];
        }
        for (int x : seen) bad += x != 1;
        bad += prev_last != items;
      }
  return bad;
}

// Every byte the state step reads (through its descriptors, and the decay vector) lies in the part of
// the stage that pass 2 copies from the factor buffer (or in V, which its tensor copy fills), and every
// factor byte the factor group writes lies inside the copied part.
long long host_check_copied_part() {
  long long bad = 0;
  auto in_factors = [](uint32_t off) { return off < kPassFactorBytes; };
  for (int kb = 0; kb < kDimK / 16; ++kb)
    for (int n = 0; n < 64; ++n)
      for (int k = 0; k < 16; ++k) bad += !in_factors(k_major_address(wq_descriptor(kStWq, kWRow0, kb), n, k) + 1);
  for (int kb = 0; kb < kChunk / 16; ++kb) {
    for (int n = 0; n < 64; ++n)
      for (int k = 0; k < 16; ++k) bad += !in_factors(k_major_address(k32_descriptor(kStTa, 0, kb), n, k) + 1);
    for (int n = 0; n < 32; ++n)
      for (int k = 0; k < 16; ++k) bad += !in_factors(k_major_address(k32_descriptor(kStTbetaLo, 0, kb), n, k) + 1);
    for (int n = 0; n < kDimK; ++n)
      for (int k = 0; k < 16; ++k) bad += !in_factors(k_major_address(k32_descriptor(kStKend, 0, kb), n, k) + 1);
    for (int grp = 0; grp < kStateGroups; ++grp)
      for (int m = 0; m < kGroupRows; ++m)
        for (int k = 0; k < 16; ++k) {
          const uint32_t a = mn_major_address(v_descriptor(kStV, grp, kb), m, k);
          bad += a < kStV || a + 2 > kStBytes;
        }
  }
  bad += !in_factors(kStDecay + kDimK * 4 - 1);
  for (int r = 0; r < 64; ++r)  // the writers
    for (int c = 0; c < kDimK; ++c) bad += !in_factors(kStWq + wq_offset(r, c) + 1);
  for (int r = 0; r < kDimK; ++r)
    for (int t = 0; t < kChunk; ++t) {
      bad += !in_factors(kStKend + k32_offset(r, t) + 1);
      if (r < 64) bad += !in_factors(kStTa + k32_offset(r, t) + 1);
      if (r < 32) bad += !in_factors(kStTbetaLo + k32_offset(r, t) + 1);
    }
  return bad;
}

// The state pass's prologue and epilogue: over both state groups, the threads' value pairs reach every
// (v, d) of a chain's state exactly once, at (v, d) and (v, d + 1), in either layout.
long long host_check_state_layouts() {
  long long bad = 0;
  FusedParams p{};
  p.heads = 3;
  const Chain chain = chain_of(4, p.heads, kChunk, 1);  // sequence 1, head 1
  const size_t base = (size_t(chain.sequence) * p.heads + chain.head) * kDimV * kDimK;
  for (const bool v_first : {true, false}) {
    p.state_v_first = v_first;
    std::vector<int> seen(kDimV * kDimK, 0);
    for (int group = 0; group < kStateGroups; ++group)
      for (int thread = 0; thread < kWarpgroupThreads; ++thread)
        for (int i = 0; i < kStateValues; i += 2) {
          const StatePair at = state_pair(p, chain, group, thread, i);
          const int v = group * kGroupRows + acc_row(thread, i), d = acc_col(thread, i);
          for (int e = 0; e < 2; ++e) {
            const size_t want = base + (v_first ? size_t(v) * kDimK + d + e : size_t(d + e) * kDimV + v);
            bad += at.at + e * at.stride != want;
            ++seen[v * kDimK + d + e];
          }
        }
    for (int n : seen) bad += n != 1;
  }
  return bad;
}

int host_check(int tokens) {
  const long long layout_bad = host_check_layouts();
  const long long state_bad = host_check_state_layouts();
  const long long schedule_bad = host_check_schedule();
  const long long copied_bad = host_check_copied_part();
  printf("layouts: %lld mismatches (raw tiles, stage tiles through the descriptors)\n", layout_bad);
  printf("pass-1 schedule: %lld items missed or repeated (1 and 3 groups a CTA x 7 item counts x 5 grid sizes)\n", schedule_bad);
  printf("state layouts: %lld values misplaced or not covered once (V-first and K-first)\n", state_bad);
  printf("pass-2 copies: %lld stage bytes read or written outside the copied %u B (factors) / V\n", copied_bad,
         kPassFactorBytes);
  printf("pass 1: CTA = 1 factor group, %d threads, %u B shared memory, %d CTAs per SM (%u B of %u with the "
         "%u B reserved per CTA); factor buffer %u B per chunk\n",
         kFactorThreads, kF1SmBytes, kFactorCtasPerSm, kFactorCtasPerSm * (kF1SmBytes + kSmReservedPerCta), kSmPerSm,
         kSmReservedPerCta, kFactorPitch);
  printf("pass 2: CTA = 2 state warpgroups + 1 loader warp (%d threads), %d stages x %u B, %u B shared memory\n",
         kStateCtaThreads, kPassStages, kStBytes, kS2SmBytes);
  bool ok = layout_bad == 0 && schedule_bad == 0 && copied_bad == 0 && state_bad == 0;
  ok = host_check_emulation(tokens) && ok;
  printf("host check: %s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

// ---- timing -------------------------------------------------------------------------------------
struct PassBytes {
  double pass1 = 0, pass2 = 0;
};
// Bytes each pass moves at least: pass 1 reads q, k, g, beta and writes the factors; pass 2 reads the
// factors, v and the initial state and writes o and the final state.
PassBytes pass_bytes(const DeviceProblem &d) {
  const double tokens = double(d.token_elems()) * kBf16Bytes, factors = double(Launcher::items_of(d)) * kFactorPitch;
  const double state = double(d.state_elems()) * 4;
  PassBytes b;
  b.pass1 = 3 * tokens + double(d.beta_elems()) * kBf16Bytes + factors;
  b.pass2 = factors + 2 * tokens + 2 * state;
  return b;
}

// ---- phase report (a CHUNK32_PHASE_CLOCKS build, --phases 1) ----------------------------------------------
#define KN_PHASE_NAME(id, name, what) name,
#define KN_PHASE_WHAT(id, name, what) what,
inline const char *phase_name(int k) {
  static const char *const names[kPass1Phases] = {CHUNK32_PASS1_PHASES(KN_PHASE_NAME)};
  return names[k];
}
inline const char *phase_what(int k) {
  static const char *const what[kPass1Phases] = {CHUNK32_PASS1_PHASES(KN_PHASE_WHAT)};
  return what[k];
}
#undef KN_PHASE_NAME
#undef KN_PHASE_WHAT

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[size_t(q * double(v.size() - 1) + 0.5)];
}
double mean_of(const std::vector<double> &v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? NAN : s / double(v.size());
}

// Pass 1 of `v` on `d` with the clocks on: its instrumented time, a factor check of two chunks, then the
// per-phase table over the items that are not a CTA's first (whose raw wait is the cold load), the first
// items apart, the effective clock, and per SM the CTAs resident at once and the cycles per item.
// The short cases of the full run (every chain checked).
struct ShortCase {
  Shape shape;
  std::vector<int> seqlens;  // packed (shape: batch 1, tokens their sum); empty: B x T
};
const ShortCase kShortCases[] = {{{"T64", 2, 64, 4}, {}},
                                 {{"T96", 2, 96, 4}, {}},
                                 {{"T50", 3, 50, 4}, {}},
                                 {{"T7", 2, 7, 4}, {}},
                                 {{"T1", 1, 1, 2}, {}},
                                 {{"T1024", 1, 1024, 3}, {}},
                                 {{"T96gva", 2, 96, 6, GateMode::kBounded, 3}, {}},  // 6 value heads, 2 q/k heads
                                 {{"P5", 1, 283, 4}, {50, 0, 96, 7, 130}},
                                 {{"P3gva", 1, 98, 6, GateMode::kBounded, 3}, {33, 64, 1}}};

bool phase_report(const char *label, const Variant &v, Launcher &l, const DeviceProblem &d, int warmup, int reps) {
#ifndef CHUNK32_PHASE_CLOCKS
  (void)label, (void)v, (void)l, (void)d, (void)warmup, (void)reps;
  printf("phase report: this binary was built without -DKN_PHASE_CLOCKS\n");
  return false;
#else
  l.reserve(d);
  const size_t items = Launcher::items_of(d);
  const int grid = l.factor_grid(v, d, l.windows(d)[0]);
  long long *clocks = nullptr;
  KN_CHECK(cudaMalloc(&clocks, items * kClockSlots * sizeof(long long)));
  KN_CHECK(cudaMemcpyToSymbol(g_phase_clocks, &clocks, sizeof(clocks)));
  const Timing t = timing_of(time_launches([&] { l.pass1(v, d); }, warmup, reps));
  KN_CHECK(cudaMemset(clocks, 0, items * kClockSlots * sizeof(long long)));
  KN_CHECK(cudaMemset(l.factors, 0xFF, items * kFactorPitch));
  l.pass1(v, d);
  KN_CHECK(cudaDeviceSynchronize());
  std::vector<long long> h(items * kClockSlots);
  KN_CHECK(cudaMemcpy(h.data(), clocks, h.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  KN_CHECK(cudaFree(clocks));
  FactorErrors fe;
  const int whole = d.shape.tokens / kChunk;
  int checked = 0;
  if (whole > 0) {
    const ChainInputs in = fetch_chain(d, 0, 0);
    for (int c : {0, whole - 1}) {
      check_factors(d, l, in, 0, 0, c, fe);
      ++checked;
      if (whole == 1) break;
    }
  }
  const bool factors_ok = checked == 0 || fe.worst() < kFactorTolerance;

  std::vector<char> first(items, 0);
  for (int b = 0; b < grid; ++b) first[items_of(b, grid, int(items)).first] = 1;
  std::vector<std::vector<double>> dur(kPass1Phases + 1);  // [kPass1Phases]: the whole item
  std::vector<double> first_total, first_wait;
  long long bad = 0;
  auto row_ok = [&](const long long *r) {
    if (r[0] == 0 || r[kSlotNsBegin] == 0 || r[kSlotNsEnd] < r[kSlotNsBegin]) return false;
    for (int k = 0; k < kPass1Phases; ++k)
      if (r[k + 1] < r[k]) return false;
    return true;
  };
  for (size_t i = 0; i < items; ++i) {
    const long long *r = &h[i * kClockSlots];
    if (!row_ok(r)) {
      ++bad;
      continue;
    }
    if (first[i]) {
      first_total.push_back(double(r[kPass1Phases] - r[0]));
      first_wait.push_back(double(r[1 + kPhWaitRaw] - r[kPhWaitRaw]));
      continue;
    }
    for (int k = 0; k < kPass1Phases; ++k) dur[k].push_back(double(r[k + 1] - r[k]));
    dur[kPass1Phases].push_back(double(r[kPass1Phases] - r[0]));
  }
  // Per CTA: clock and ns from its first item's start to its last item's end; per SM: the CTAs' spans.
  struct Span {
    long long c0, c1;
    int items;
  };
  std::vector<double> mhz;
  std::map<long long, std::vector<Span>> per_sm;
  for (int b = 0; b < grid; ++b) {
    const ItemRange rg = items_of(b, grid, int(items));
    const long long *r0 = &h[size_t(rg.first) * kClockSlots], *r1 = &h[size_t(rg.last - 1) * kClockSlots];
    if (!row_ok(r0) || !row_ok(r1) || r0[kSlotSm] != r1[kSlotSm]) continue;
    const double ns = double(r1[kSlotNsEnd] - r0[kSlotNsBegin]);
    if (ns > 0) mhz.push_back(double(r1[kPass1Phases] - r0[0]) / ns * 1e3);
    per_sm[r0[kSlotSm]].push_back(Span{r0[0], r1[kPass1Phases], rg.last - rg.first});
  }
  std::vector<double> overlap, per_item;
  for (auto &kv : per_sm) {
    std::vector<std::pair<long long, int>> ev;
    long long lo = LLONG_MAX, hi = LLONG_MIN;
    int n = 0;
    for (const Span &sp : kv.second) {
      ev.push_back({sp.c0, 1});
      ev.push_back({sp.c1, -1});
      lo = std::min(lo, sp.c0);
      hi = std::max(hi, sp.c1);
      n += sp.items;
    }
    std::sort(ev.begin(), ev.end());
    int cur = 0, most = 0;
    for (auto &e : ev) most = std::max(most, cur += e.second);
    overlap.push_back(most);
    per_item.push_back(double(hi - lo) / n);
  }
  const double clock_mhz = quantile(mhz, 0.5);
  const std::vector<double> &total = dur[kPass1Phases];
  const double total_mean = mean_of(total);

  printf("\nphases of pass 1, %s (B %d T %d H %d), %s: %zu items on %d CTAs; %zu steady items (each CTA's first "
         "item apart), %lld bad rows; factors (%d chunks) worst %.1e %s\n",
         label, d.shape.batch, d.shape.tokens, d.shape.heads, v.name, items, grid, total.size(), bad, checked,
         checked ? fe.worst() : 0.0, factors_ok ? "PASS" : "FAIL");
  printf("  instrumented pass 1: %.4f ms (median of %d; the uninstrumented time is in two_pass.log); effective SM "
         "clock %.0f MHz (clock64 / globaltimer, median over CTAs)\n",
         t.ms, reps, clock_mhz);
  printf("  %-14s %8s %8s %8s %8s %6s  %s\n", "phase", "median", "mean", "p10", "p90", "share", "(cycles per item; "
         "share of the mean item; thread 0 = warp 0's view)");
  for (int k = 0; k <= kPass1Phases; ++k) {
    const bool all = k == kPass1Phases;
    printf("  %-14s %8.0f %8.0f %8.0f %8.0f %5.1f%%  %s\n", all ? "item total" : phase_name(k),
           quantile(dur[k], 0.5), mean_of(dur[k]), quantile(dur[k], 0.1), quantile(dur[k], 0.9),
           100.0 * mean_of(dur[k]) / total_mean, all ? "" : phase_what(k));
  }
  // The group-level steps (from one barrier's release to the next): the phases up to and including each barrier.
  struct Step {
    const char *name;
    int last;  // its last phase
  };
  const Step kSteps[] = {{"wait+A", kPhBarA}, {"B", kPhBarB}, {"C", kPhBarC}, {"D", kPhBarD}, {"E", kPhBarE}};
  printf("  steps (barrier to barrier, share of the mean item):");
  int from = 0;
  for (const Step &st : kSteps) {
    double m = 0;
    for (int k = from; k <= st.last; ++k) m += mean_of(dur[k]);
    printf(" %s %.0f (%.1f%%)", st.name, m, 100.0 * m / total_mean);
    from = st.last + 1;
  }
  printf("\n  item: median %.0f cycles = %.2f us at %.0f MHz\n", quantile(total, 0.5),
         quantile(total, 0.5) / clock_mhz, clock_mhz);
  printf("  first item of each CTA (%zu): median %.0f cycles, of which wait raw %.0f\n", first_total.size(),
         quantile(first_total, 0.5), quantile(first_wait, 0.5));
  printf("  per SM (%zu SMs): CTAs resident at once min %.0f median %.0f max %.0f; SM span per item median %.0f "
         "cycles = %.2f us per chunk per SM (p10 %.0f, p90 %.0f)\n",
         per_sm.size(), quantile(overlap, 0), quantile(overlap, 0.5), quantile(overlap, 1), quantile(per_item, 0.5),
         quantile(per_item, 0.5) / clock_mhz, quantile(per_item, 0.1), quantile(per_item, 0.9));
  return factors_ok && bad == 0;
#endif
}

}  // namespace two_pass
}  // namespace chunk32
}  // namespace jax_kda

int main(int argc, char **argv) {
  using namespace jax_kda::chunk32;
  using namespace jax_kda::chunk32::two_pass;
  if (int_option(argc, argv, "--host-check", 0)) return host_check(int_option(argc, argv, "--tokens", 256));
  const DeviceInfo info = device_info();
  const int reps = std::max(10, int_option(argc, argv, "--reps", 20));
  const int warmup = int_option(argc, argv, "--warmup", 3);
  const int tiny = int_option(argc, argv, "--tiny", 0);  // a small check only (for compute-sanitizer)
  const int skip_timing = int_option(argc, argv, "--no-timing", 0);
  const int timing_only = int_option(argc, argv, "--timing-only", 0);  // no float64 checks (they take minutes)
  Launcher l;
  l.sms = info.multiprocessors;
  printf("two_pass: %s, %d SMs, max SM clock %.0f MHz\n", info.name.c_str(), info.multiprocessors,
         info.clock_khz / 1e3);
  for (size_t i = 0; i < kVariantCount; ++i) {
    const Variant &v = kVariants[i];
    KN_CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(v.smem_bytes)));
    KN_CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    if (v.streamed != nullptr) {
      KN_CHECK(cudaFuncSetAttribute(v.streamed, cudaFuncAttributeMaxDynamicSharedMemorySize, int(v.smem_bytes)));
      KN_CHECK(cudaFuncSetAttribute(v.streamed, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    }
    int resident = 0;
    KN_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, v.kernel, v.threads(), v.smem_bytes));
    l.resident[i] = std::max(1, resident);
    printf("pass 1, %-15s %d threads, %u B shared memory a CTA, %d CTAs resident per SM (planned %d)\n", v.name,
           v.threads(), v.smem_bytes, resident, v.ctas_per_sm);
  }
  KN_CHECK(cudaFuncSetAttribute(state_pass_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kS2SmBytes)));
  printf("pass 2: %d threads, %u B, %d stages\n", kStateCtaThreads, kS2SmBytes, kPassStages);
  bool all_pass = true;

  if (int_option(argc, argv, "--phases", 0)) {  // the CHUNK32_PHASE_CLOCKS build: per-phase clocks of pass 1 only
    const Shape shapes[] = {{"A", 1, 8192, 96}, {"F", 1, 2048, 32}};
    for (const Shape &s : shapes) {
      DeviceProblem d = make_problem(s, 29);
      for (const Variant &v : kVariants) {
        if (v.gate != GateMode::kBounded) continue;  // the problem's gate
        all_pass = phase_report(s.name, v, l, d, warmup, reps) && all_pass;
        if (s.heads < 96) break;  // the other shape: the first variant only
      }
      free_problem(d);
    }
    if (l.factors != nullptr) KN_CHECK(cudaFree(l.factors));
    printf("two_pass phases: %s\n", all_pass ? "ALL CHECKS PASS" : "SOME CHECKS FAIL");
    return all_pass ? 0 : 1;
  }

  // 1. Short cases, every chain: whole chunks (T 64, 96, 1024) and partial last chunks (50, 7, 1); T96
  // once more with a zero initial state (initial_state = nullptr: the buffer zeroed for the reference).
  // Packed: P5 (an empty sequence, partial last chunks, the longest 5 chunks) and P3gva.
  for (const ShortCase &sc : kShortCases) {
    const Shape &s = sc.shape;
    if (timing_only) break;
    if (tiny && std::strcmp(s.name, "T96") != 0 && std::strcmp(s.name, "T50") != 0 && std::strcmp(s.name, "P5") != 0)
      continue;
    DeviceProblem d = make_problem(s, 11, sc.seqlens);
    for (const Variant &v : kVariants) {
      if (tiny && &v != &kVariants[0] && v.same_factors_as < 0) continue;  // tiny: the 1- and 4-warp inverse
      if (v.gate != d.shape.gate) {  // the variant's gate on the same shape (and the same q, k, v, beta)
        free_problem(d);
        Shape gated = s;
        gated.gate = v.gate;
        d = make_problem(gated, 11, sc.seqlens);
      }
      const TwoPassCheck r = check(v, l, d, {}, 2);
      print_check(s.name, s, v, r);
      all_pass = all_pass && r.pass;
      all_pass = check_same_factors(s.name, v, l, d) && all_pass;
      for (const bool transition : {false, true}) all_pass = check_streamed(s.name, v, l, d, transition) && all_pass;
      if (&v != &kVariants[0]) continue;
      for (const int window : {0, 5}) {  // the transition slice in one pass, then in overlapped windows of 5
        if (window >= Launcher::chunks_of(d)) continue;
        const TransitionCheck t = check_transition(v, l, d, window);
        printf("check %-6s transition slice%s: values o %.2e state %.2e bad %lld | transition columns o %.2e "
               "state %.2e (of the identity's RMS; the float64 one is %.1e of it) bad %lld  %s\n",
               s.name, window > 0 ? ", overlapped windows of 5" : "", t.values.o_ref, t.values.s_ref, t.values.bad,
               t.transition.o_ref, t.transition.s_ref, t.transition.s_rms * std::sqrt(double(kDimK)), t.transition.bad,
               t.pass ? "PASS" : "FAIL");
        all_pass = all_pass && t.pass;
      }
      for (const int window : {1, 5}) {  // windows of 1 and 5 chunks (a short last one where 5 does not divide)
        if (window >= Launcher::chunks_of(d)) continue;
        for (const int schedule : {0, 1, 2}) {  // serial, overlapped, overlapped with pass 1 one item a CTA
          const bool overlap = schedule > 0;
          l.pass1_per_item = schedule == 2;
          size_t compared = 0;
          const long long differ = windows_differing(v, l, d, window, overlap, compared);
          l.pass1_per_item = false;
          printf("check %-6s %s windows of %d chunks vs one pass, o and state bit for bit: %lld of %zu bytes "
                 "differ  %s\n",
                 s.name, schedule == 0 ? "serial" : schedule == 1 ? "overlapped" : "overlapped (pass 1 one item a CTA)",
                 window, differ, compared, differ == 0 ? "PASS" : "FAIL");
          all_pass = all_pass && differ == 0;
        }
      }
    }
    free_problem(d);
  }
  if (!timing_only) {
    const Shape s{"T96z", 2, 96, 4};
    DeviceProblem d = make_problem(s, 13);
    KN_CHECK(cudaMemset(d.initial_state, 0, d.state_elems() * 4));
    float *given = d.initial_state;
    d.initial_state = nullptr;  // make_params passes nullptr: the kernel starts from zeros
    l.reserve(d);
    poison_outputs(d);
    KN_CHECK(cudaMemset(l.factors, 0xFF, Launcher::items_of(d) * kFactorPitch));
    l.pass1(kVariants[0], d);
    l.pass2(d);
    KN_CHECK(cudaDeviceSynchronize());
    d.initial_state = given;  // the host reference reads the (zeroed) buffer
    TwoPassCheck r;
    r.r = evaluate(d, {});
    r.pass = r.r.pass;
    print_check(s.name, s, kVariants[0], r);
    all_pass = all_pass && r.pass;
    free_problem(d);
  }
  if (tiny) {
    printf("two_pass: %s\n", all_pass ? "ALL CHECKS PASS" : "SOME CHECKS FAIL");
    return all_pass ? 0 : 1;
  }

  // 2. Case A (three chains checked) and the shapes of E and F (one chain each), then timings; D's shape
  // (8 x 1024 tokens, 96 heads: 768 chains, six waves of the state pass) with the library's variant only.
  const Shape timed[] = {{"A", 1, 8192, 96}, {"E", 1, 32768, 32}, {"F", 1, 2048, 32}, {"D", 8, 1024, 96}};
  constexpr int kTimedShapes = sizeof(timed) / sizeof(timed[0]);
  struct Peers {
    double fused, best_peer, target;
    const char *peer;
  };
  const Peers peers[] = {{1.18, 1.387, 0.93, "jax_kda 1.387, FlashKDA 1.401"},
                         {4.55, 3.168, 2.11, "best peer 3.168"},
                         {0.297, 0.241, 0.161, "best peer 0.241"},
                         {0.909, 1.207, 0.80, "FlashKDA 1.207"}};
  struct Row {
    const char *name, *variant;
    Timing p1, p2, both;
    PassBytes bytes;
    int chunks, chains;
    int shape;
  };
  std::vector<Row> rows;
  // Both passes window by window with the 4-warp-inverse variant, the window sized by a factor budget.
  struct WindowRow {
    const char *name;
    int megabytes, window, windows;
    Timing serial, overlapped, overlapped_per_item;
  };
  std::vector<WindowRow> window_rows;
  struct TransitionRow {
    const char *name;
    Timing p2, p2_transition;
  };
  std::vector<TransitionRow> transition_rows;  // pass 2 with the transition slice (the segment cut's cost)
  struct StreamedRow {
    const char *name, *variant;
    Timing both;
  };
  std::vector<StreamedRow> streamed_rows;  // both passes at once (flags' reset included)
  const Variant &windowed_variant = kVariants[2];
  for (int si = 0; si < kTimedShapes; ++si) {
    const Shape &s = timed[si];
    const bool library_only = s.batch > 1;  // D
    DeviceProblem d = make_problem(s, 29);
    l.reserve(d);
    for (const Variant &v : kVariants) {
      if (v.gate != GateMode::kBounded) continue;  // checked on the short shapes only
      if (library_only && &v != &library_variant()) continue;
      std::vector<std::pair<int, int>> chains;
      if (s.heads >= 96) chains = {{0, 0}, {s.batch / 2, 41}, {s.batch - 1, s.heads - 1}};
      else chains = {{0, s.heads / 2}};
      if (!timing_only) {  // float64 checks of long chains take a while on the CPU: variants with factors
                           // of their own only; the others must equal theirs bit for bit
        if (v.same_factors_as < 0 || library_only) {
          const TwoPassCheck r = check(v, l, d, chains, 4);
          print_check(s.name, s, v, r);
          all_pass = all_pass && r.pass;
        }
        all_pass = check_same_factors(s.name, v, l, d) && all_pass;
        all_pass = check_streamed(s.name, v, l, d, false) && all_pass;
      }
      if (skip_timing) continue;
      if (v.streamed != nullptr)
        streamed_rows.push_back({s.name, v.name, timing_of(time_launches([&] { l.streamed(v, d); }, warmup, reps))});
      Row row{s.name, v.name, {}, {}, {}, pass_bytes(d), Launcher::chunks_of(d), s.batch * s.heads, si};
      row.p1 = timing_of(time_launches([&] { l.pass1(v, d); }, warmup, reps));
      row.p2 = timing_of(time_launches([&] { l.pass2(d); }, warmup, reps));
      row.both = timing_of(time_launches(
          [&] {
            l.pass1(v, d);
            l.pass2(d);
          },
          warmup, reps));
      rows.push_back(row);
    }
    if (!skip_timing && !library_only) {
      uint16_t *o_t = nullptr;
      float *state_t = nullptr;
      KN_CHECK(cudaMalloc(&o_t, d.token_elems() * kBf16Bytes));
      KN_CHECK(cudaMalloc(&state_t, d.state_elems() * 4));
      l.pass1(windowed_variant, d);
      const Timing alone = timing_of(time_launches([&] { l.pass2(d); }, warmup, reps));
      l.transition = TransitionOutputs{o_t, state_t};
      const Timing with = timing_of(time_launches([&] { l.pass2(d); }, warmup, reps));
      l.transition = TransitionOutputs{};
      transition_rows.push_back({s.name, alone, with});
      KN_CHECK(cudaFree(o_t));
      KN_CHECK(cudaFree(state_t));
    }
    for (const int megabytes : {16, 32, 64, 128}) {
      if (skip_timing || library_only) break;
      const int window = Launcher::window_for(d, size_t(megabytes) << 20);
      const int windows = (Launcher::chunks_of(d) + window - 1) / window;
      l.reserve_overlapped(d, window);
      window_rows.push_back(
          {s.name, megabytes, window, windows,
           timing_of(time_launches([&] { l.windowed(windowed_variant, d, window); }, warmup, reps)),
           timing_of(time_launches([&] { l.overlapped(windowed_variant, d, window); }, warmup, reps)), {}});
      l.pass1_per_item = true;
      window_rows.back().overlapped_per_item =
          timing_of(time_launches([&] { l.overlapped(windowed_variant, d, window); }, warmup, reps));
      l.pass1_per_item = false;
      if (windows == 1) break;
    }
    free_problem(d);
  }

  if (!rows.empty()) {
    printf("\nmedians of %d launches (ms); GB moved at least and TB/s per pass; us per chunk: pass 1 per SM, "
           "pass 2 per chain step (one wave of chains at a time)\n",
           reps);
    printf("case variant        pass1 ms   GB  TB/s  us/chunk/SM | pass2 ms   GB  TB/s  us/step | both ms  spread | "
           "fused  peers (H200, ms)\n");
    for (const Row &r : rows) {
      const double items = double(r.chunks) * r.chains;
      printf("%-4s %-13s %8.4f %5.2f %5.2f %8.2f     | %8.4f %5.2f %5.2f %7.3f | %7.4f %6.4f | %5.3f  %s, target %.3f\n",
             r.name, r.variant, r.p1.ms, r.bytes.pass1 / 1e9, r.bytes.pass1 / (r.p1.ms * 1e-3) / 1e12,
             r.p1.ms * 1e3 * l.sms / items, r.p2.ms, r.bytes.pass2 / 1e9, r.bytes.pass2 / (r.p2.ms * 1e-3) / 1e12,
             r.p2.ms * 1e3 / (r.chunks * ((r.chains + l.sms - 1) / l.sms)), r.both.ms, r.both.spread,
             peers[r.shape].fused, peers[r.shape].peer, peers[r.shape].target);
    }
    printf("fused = the fused chunk-32 prototype measured on an H200 (fused_prefill.cu); target = 1.5x the best "
           "peer / FlashKDA on A and D\n");
  }
  if (!streamed_rows.empty()) {
    printf("\nstreamed: both passes at once (the flags' memset, pass 1 on the multiprocessors pass 2 leaves, pass 2 "
           "its programmatic dependent): medians of %d (ms)\n", reps);
    for (const StreamedRow &r : streamed_rows)
      printf("streamed: %-4s %-15s %8.4f  spread %6.4f\n", r.name, r.variant, r.both.ms, r.both.spread);
  }
  if (!transition_rows.empty()) {
    printf("\npass 2 alone and with each chain's transition slice (2 CTAs a chain): medians of %d (ms)\n", reps);
    for (const TransitionRow &r : transition_rows)
      printf("%-4s  pass 2 %8.4f  with transition %8.4f  (x%.2f)\n", r.name, r.p2.ms, r.p2_transition.ms,
             r.p2_transition.ms / r.p2.ms);
  }
  if (!window_rows.empty()) {
    printf("\nboth passes window by window (%s; each factor buffer at most the budget; overlapped: two buffers, "
           "pass 1 of the next window beside pass 2): medians of %d (ms)\n",
           windowed_variant.name, reps);
    printf("case  budget MB  chunks/window  windows  serial ms  spread  overlapped ms  spread  "
           "overlapped, pass 1 one item a CTA  spread\n");
    for (const WindowRow &r : window_rows)
      printf("%-4s  %9d  %13d  %7d  %9.4f %6.4f  %13.4f %6.4f  %33.4f %6.4f\n", r.name, r.megabytes, r.window,
             r.windows, r.serial.ms, r.serial.spread, r.overlapped.ms, r.overlapped.spread, r.overlapped_per_item.ms,
             r.overlapped_per_item.spread);
  }
  if (l.factors != nullptr) KN_CHECK(cudaFree(l.factors));
  if (l.flags != nullptr) KN_CHECK(cudaFree(l.flags));
  printf("two_pass: %s\n", all_pass ? "ALL CHECKS PASS" : "SOME CHECKS FAIL");
  return all_pass ? 0 : 1;
}
