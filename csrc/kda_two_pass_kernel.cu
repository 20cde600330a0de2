// The two-pass chunk-32 KDA prefill for Hopper (sm_90a): the launcher of the factor pass and the state
// pass of chunk32/two_pass.cuh, window by window over the caller's workspace.
//
// Per window (chunks [first, first + count) of every chain; packed sequences: a range of items in the
// chunk-major order a first small kernel plans from cu_seqlens on the device, chain-major in one window run
// serially): the factor pass builds every item's factors into a buffer of the workspace across the whole
// GPU, then the state pass runs each chain's chunks of the window in order from them. Where the chains
// leave less than half of the multiprocessors idle that is all (kda_contract.h's two_pass_serial: windows
// of its larger budget, one after the other). Otherwise, with several windows, the workspace holds two buffers (a long enough
// call of one window runs as two halves of its one buffer: kda_contract.h's TwoPassSchedule), and the
// passes overlap: the factor pass of window i + 1 (XLA's stream, one item a group so that its CTAs retire)
// runs beside the state pass of window i (a stream of the highest priority, which takes the multiprocessors
// they free), so the multiprocessors the chains leave idle build factors. Events order them: a state pass
// after its window's factors, a factor pass into a buffer after the state pass that read it, and XLA's
// stream after the last state pass (CUDA graph capture records them as edges). A call of one window with
// few chains runs streamed instead: the factor pass on the multiprocessors the chains leave builds the
// items chunk by chunk of every chain and flags each one, and the state pass runs beside it from the start,
// waiting for each item's flag (kda_contract.h's TwoPassSchedule). The state crosses windows in fp32
// through the final-state buffer (or the workspace's carry when the call writes no final state), so the
// outputs are bit for bit those of one window. Both kernels read q, k, g and v by bulk tensor copies, whose
// tensor maps are built here on the host per call (the kernels take them by value: nothing is allocated,
// and a captured graph keeps them).

#include <cuda.h>
#include <cudaTypedefs.h>

#include <vector>

#include "chunk32/two_pass.cuh"
#include "kda_contract.h"
#include "kda_two_pass.h"

namespace jax_kda {
namespace {

using namespace jax_kda::chunk32;
using namespace jax_kda::chunk32::two_pass;

constexpr int kInverseWarps = 4;  // the inverse's merge spread over the group (measured fastest, PERFLOG)
// The factor pass's CTA: three factor groups running free, one CTA a multiprocessor (against three CTAs
// of one group: the calls of A, C, D level, E's overlapped windows 13% faster; PERFLOG, eleventh
// session). Streamed, its one CTA a multiprocessor leaves whole multiprocessors to the state pass.
constexpr int kFactorCtaThreads = kFactorThreads * kGroupsPerCta;
// The factor pass's build (two_pass.cuh, factor_group.cuh): the bounded gate's sigmoid by tanh.approx (ex2
// + rcp: the harness's pass 1 6% slower, fourteenth session), the windows' pass storing its factors by
// bulk copies (the streamed one each thread's own stores).
constexpr GateMath kFactorGate = GateMath::kTanh;
constexpr uint32_t kFactorSmBytes = f1_smem_bytes(kRawSlots, kGroupsPerCta, true);  // with the Aqk images

// The driver's tensor-map encoder, through the runtime (no link to libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A [B, T, heads, 128] bf16 tensor as the 4-D map (channel, head, token, sequence) the kernels copy from:
// boxes of 64 channels x 32 tokens with the 128-byte swizzle; rows past T arrive as zeros.
bool encode_token_map(CUtensorMap *map, const void *base, int batch, int tokens, int heads) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t row = cuuint64_t(kDimK) * kBf16Bytes;
  const cuuint64_t dims[4] = {cuuint64_t(kDimK), cuuint64_t(heads), cuuint64_t(tokens), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {row, row * heads, row * heads * tokens};
  const cuuint32_t box[4] = {cuuint32_t(kRawBoxChannels), 1, cuuint32_t(kChunk), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void *>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The state pass's stream and the events of the overlapped windows, one set per host thread and device,
// created on first use and kept: a stream joined to a CUDA graph capture stays in it until the capture
// ends, so no other thread's call may share it.
struct OverlapStreams {
  cudaStream_t state = nullptr;  // at the device's highest priority
  cudaEvent_t start, factors_ready[2], state_done[2], end;
};

cudaError_t overlap_streams(int device, OverlapStreams **out) {
  thread_local std::vector<OverlapStreams> per_device;
  if (device >= int(per_device.size())) per_device.resize(device + 1);
  OverlapStreams &o = per_device[device];
  if (o.state == nullptr) {
    // In the relaxed capture mode, the thread's mode put back after: the first call may come inside
    // XLA's CUDA graph capture, which refuses some runtime calls; creating these records nothing in it.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaError_t err = cudaThreadExchangeStreamCaptureMode(&mode);
    if (err != cudaSuccess) return err;
    int least = 0, greatest = 0;
    err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    for (cudaEvent_t *e : {&o.start, &o.factors_ready[0], &o.factors_ready[1], &o.state_done[0], &o.state_done[1],
                           &o.end}) {
      if (err == cudaSuccess) err = cudaEventCreateWithFlags(e, cudaEventDisableTiming);
    }
    if (err == cudaSuccess) err = cudaStreamCreateWithPriority(&o.state, cudaStreamNonBlocking, greatest);
    cudaThreadExchangeStreamCaptureMode(&mode);
    if (err != cudaSuccess) {
      o.state = nullptr;
      return err;
    }
  }
  *out = &o;
  return cudaSuccess;
}

// A launch of `grid` CTAs of `threads` threads with `smem_bytes` of dynamic shared memory on `stream`, with
// `attribute` as its one attribute, or none where null (the attribute must outlive the launch call).
cudaLaunchConfig_t launch_config(dim3 grid, int threads, uint32_t smem_bytes, cudaStream_t stream,
                                 cudaLaunchAttribute *attribute) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = attribute != nullptr ? 1 : 0;
  return config;
}

// Programmatic dependent launch (griddepcontrol in the kernels): the launch may start once every CTA of
// the grid before it on the stream has triggered.
cudaLaunchAttribute programmatic_launch() {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

// The items' plan of packed sequences, from their lengths on the device (PackedItems: chain-major for one
// window run serially).
void launch_plan(const FusedParams &p, const PackedItems &packed, bool chain_major, int multiprocessors,
                 cudaStream_t stream) {
  const int64_t pairs = (p.tokens + kChunk - 1) / kChunk + p.sequences;  // at most
  const int ctas = int((pairs * p.heads + kPlanThreads - 1) / kPlanThreads);
  plan_packed_kernel<<<ctas < 4 * multiprocessors ? ctas : 4 * multiprocessors, kPlanThreads, 0, stream>>>(
      p.cu_seqlens, p.sequences, p.heads, chain_major, packed);
}

// The one window streamed: the flags and the claim counter zeroed, the factor pass on the
// multiprocessors the state pass leaves (one CTA each), then the state pass as its programmatic
// dependent: it starts once every factor CTA runs, on the multiprocessors left, and its loader waits for
// each item's flag instead of the whole factor pass. Should it start only after the factor pass (no
// early launch, a tool serializing grids), every flag is set: the same outputs, later.
template <typename FactorKernel>
cudaError_t launch_streamed(FactorKernel factor_kernel, const FusedParams &p, const TensorMaps &maps,
                            const TransitionOutputs &transition, uint8_t *factors, const TwoPassLayout &layout,
                            const PackedItems &packed, dim3 state_grid, int multiprocessors, cudaStream_t stream) {
  if (p.cu_seqlens != nullptr) launch_plan(p, packed, false, multiprocessors, stream);
  int *flags = reinterpret_cast<int *>(factors + layout.flags);
  cudaError_t err = cudaMemsetAsync(flags, 0, layout.flag_count * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  Window w;
  w.count = int(layout.window);
  w.packed = packed;
  w.ready = flags;
  w.claims = flags + (layout.flag_count - 1);
  const int64_t items = layout.flag_count - 1, state_ctas = int64_t(state_grid.x) * state_grid.y;
  const int64_t item_ctas = (items + kGroupsPerCta - 1) / kGroupsPerCta;
  const int64_t free_ctas = multiprocessors > state_ctas ? multiprocessors - state_ctas : 1;
  const cudaLaunchConfig_t factor_config = launch_config(dim3(unsigned(item_ctas < free_ctas ? item_ctas : free_ctas)),
                                                         kFactorCtaThreads, kFactorSmBytes, stream, nullptr);
  if ((err = cudaLaunchKernelEx(&factor_config, factor_kernel, p, maps, factors, w)) != cudaSuccess) return err;
  cudaLaunchAttribute programmatic = programmatic_launch();
  const cudaLaunchConfig_t config = launch_config(state_grid, kStateCtaThreads, kS2SmBytes, stream, &programmatic);
  if ((err = cudaLaunchKernelEx(&config, state_pass_kernel, p, maps, static_cast<const uint8_t *>(factors), w,
                                transition)) != cudaSuccess) {
    return err;
  }
  return cudaGetLastError();
}

// The two passes window by window (layout: kda_contract.h's TwoPassLayout of the call), streamed,
// serial or overlapped as its TwoPassSchedule says.
template <bool kL2Norm, bool kBetaSigmoid>
cudaError_t launch_windows(const FusedParams &p, const TensorMaps &maps, const TransitionOutputs &transition,
                           uint8_t *factors, const TwoPassLayout &layout, const PackedItems &packed,
                           cudaStream_t stream) {
  auto factor_kernel = factor_pass_kernel<kFactorGate, kL2Norm, kBetaSigmoid, kInverseWarps, kRawSlots, 1,
                                          kGroupsPerCta, false, FactorStores::kBulk>;
  auto streamed_kernel = factor_pass_kernel<kFactorGate, kL2Norm, kBetaSigmoid, kInverseWarps, kRawSlots, 1,
                                            kGroupsPerCta, true, FactorStores::kThreads>;
  cudaError_t err = cudaFuncSetAttribute(factor_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFactorSmBytes);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(streamed_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFactorSmBytes);
  }
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(state_pass_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kS2SmBytes);
  }
  int device = 0, multiprocessors = 0, resident = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, factor_kernel, kFactorCtaThreads, kFactorSmBytes);
  }
  if (err != cudaSuccess) return err;
  if (resident < 1) return cudaErrorInvalidConfiguration;
  const int chains = (p.cu_seqlens != nullptr ? p.sequences : p.batch) * p.heads;
  const dim3 state_grid(chains, transition.o != nullptr ? 2 : 1);  // y = 1: the transition slice
  const TwoPassSchedule schedule =
      two_pass_schedule(layout, p.tokens, int64_t(state_grid.x) * state_grid.y, multiprocessors);
  if (schedule.streamed) return launch_streamed(streamed_kernel, p, maps, transition, factors, layout, packed,
                                                state_grid, multiprocessors, stream);
  const bool overlapped = schedule.overlapped;
  OverlapStreams *o = nullptr;
  if (overlapped && (err = overlap_streams(device, &o)) != cudaSuccess) return err;
  const cudaStream_t state_stream = overlapped ? o->state : stream;
  const int chunks = (p.tokens + kChunk - 1) / kChunk, window = int(schedule.window);
  if (p.cu_seqlens != nullptr) launch_plan(p, packed, schedule.windows == 1, multiprocessors, stream);
  if (overlapped) {  // the state pass's stream after what came before on XLA's (inputs, the plan)
    if ((err = cudaEventRecord(o->start, stream)) != cudaSuccess) return err;
    if ((err = cudaStreamWaitEvent(o->state, o->start, 0)) != cudaSuccess) return err;
  }
  cudaLaunchAttribute programmatic = programmatic_launch();
  for (int i = 0; i < int(schedule.windows); ++i) {
    const int b = i % int(schedule.buffers);
    uint8_t *buffer = factors + b * schedule.buffer;
    Window w;
    w.first = i * window;
    w.count = packed.chain_chunk != nullptr || window < chunks - w.first ? window : chunks - w.first;
    w.packed = packed;
    const int items = packed.chain_chunk != nullptr ? window : chains * w.count;  // at most
    // Beside a state pass (overlapped, after the first window): one item a group, so that its CTAs retire
    // and the state pass takes their multiprocessors; otherwise every resident CTA, each group a range of
    // items (its next item's loads beside this one's build).
    const bool beside_state_pass = overlapped && i > 0;
    const int item_ctas = (items + kGroupsPerCta - 1) / kGroupsPerCta;
    const int factor_ctas =
        beside_state_pass || item_ctas < multiprocessors * resident ? item_ctas : multiprocessors * resident;
    if (overlapped && i >= 2 && (err = cudaStreamWaitEvent(stream, o->state_done[b], 0)) != cudaSuccess) return err;
    // The first window's factor pass starts while the work before it on XLA's stream ends (it waits for
    // that work before touching memory); a later one runs after its buffer's readers, as ordered above.
    const cudaLaunchConfig_t factor_config =
        launch_config(dim3(factor_ctas), kFactorCtaThreads, kFactorSmBytes, stream, i == 0 ? &programmatic : nullptr);
    if ((err = cudaLaunchKernelEx(&factor_config, factor_kernel, p, maps, buffer, w)) != cudaSuccess) return err;
    if (overlapped) {
      if ((err = cudaEventRecord(o->factors_ready[b], stream)) != cudaSuccess) return err;
      if ((err = cudaStreamWaitEvent(o->state, o->factors_ready[b], 0)) != cudaSuccess) return err;
    }
    FusedParams state_params = p;
    if (i > 0) state_params.initial_state = p.final_state;  // where the last window left each state
    // Serial: launched programmatically after its factor pass on the same stream, so that its CTAs start
    // (barriers, initial states, V) on the multiprocessors the factor pass's tail frees; its loader waits
    // for the factors. Everything else it reads was complete before that factor pass's CTAs went on.
    const cudaLaunchConfig_t config =
        launch_config(state_grid, kStateCtaThreads, kS2SmBytes, state_stream, overlapped ? nullptr : &programmatic);
    if ((err = cudaLaunchKernelEx(&config, state_pass_kernel, state_params, maps,
                                  static_cast<const uint8_t *>(buffer), w, transition)) != cudaSuccess) {
      return err;
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (overlapped && (err = cudaEventRecord(o->state_done[b], o->state)) != cudaSuccess) return err;
  }
  if (overlapped) {  // XLA's stream after the last state pass
    if ((err = cudaEventRecord(o->end, o->state)) != cudaSuccess) return err;
    if ((err = cudaStreamWaitEvent(stream, o->end, 0)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t two_pass_launch(const PrefillParams &p, bool serial, void *workspace, cudaStream_t stream) {
  const bool packed = p.cu_seqlens != nullptr;
  const int64_t sequences = packed ? p.num_sequences : p.batch;
  const bool carries_state = p.final_state == nullptr;
  const TwoPassLayout layout =
      two_pass_layout(sequences, p.tokens, p.value_heads, packed, carries_state ? p.head_dim_v : 0, serial);
  if (layout.windows == 0) return cudaSuccess;
  uint8_t *factors = static_cast<uint8_t *>(workspace);

  FusedParams fp;
  fp.batch = p.batch;
  fp.tokens = p.tokens;
  fp.heads = p.value_heads;
  fp.group = p.value_heads / p.heads;
  fp.cu_seqlens = p.cu_seqlens;
  fp.sequences = packed ? p.num_sequences : 0;
  fp.beta = static_cast<const uint16_t *>(p.beta);
  fp.a_log = p.A_log;
  fp.dt_bias = p.dt_bias;
  fp.lower_bound = p.lower_bound;
  fp.scale = p.scale;
  fp.beta_max = p.allow_neg_eigval ? 2.f : 1.f;
  fp.initial_state = static_cast<const float *>(p.initial_state);
  fp.state_v_first = p.state_v_first;  // the carry between windows too
  fp.final_state = carries_state ? reinterpret_cast<float *>(factors + layout.carry) : static_cast<float *>(p.final_state);
  fp.o = static_cast<uint16_t *>(p.o);
  fp.columns = p.head_dim_v;  // V, or V + K with transition columns
  TransitionOutputs transition;
  if (p.head_dim_v != p.v_columns) {  // their K columns follow the V ones in o and in the state's rows
    transition.o = fp.o + p.v_columns;
    transition.state = fp.final_state + (p.state_v_first ? size_t(p.v_columns) * kDimK : size_t(p.v_columns));
  }
  PackedItems plan;
  if (packed) {  // the plan's arrays after the carry: chain_chunk, item_of, chain_first, items
    uint8_t *at = factors + layout.plan;
    plan.chain_chunk = reinterpret_cast<int2 *>(at);
    plan.item_of = reinterpret_cast<int *>(at + layout.items * sizeof(int2));
    plan.chain_first = plan.item_of + layout.items;
    plan.items = plan.chain_first + sequences * p.value_heads + 1;
  }

  TensorMaps maps;
  if (!encode_token_map(&maps.q, p.q, p.batch, p.tokens, p.heads) ||
      !encode_token_map(&maps.k, p.k, p.batch, p.tokens, p.heads) ||
      !encode_token_map(&maps.g, p.g, p.batch, p.tokens, p.value_heads) ||
      !encode_token_map(&maps.v, p.v, p.batch, p.tokens, p.value_heads)) {
    return cudaErrorInvalidValue;
  }
  if (p.l2norm) {
    return p.beta_sigmoid ? launch_windows<true, true>(fp, maps, transition, factors, layout, plan, stream)
                          : launch_windows<true, false>(fp, maps, transition, factors, layout, plan, stream);
  }
  return p.beta_sigmoid ? launch_windows<false, true>(fp, maps, transition, factors, layout, plan, stream)
                        : launch_windows<false, false>(fp, maps, transition, factors, layout, plan, stream);
}

}  // namespace jax_kda
