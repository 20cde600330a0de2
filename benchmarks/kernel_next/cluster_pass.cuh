// D's cluster kernel, the prototype (docs/PERFLOG.md, "D's cluster kernel: the design"; written in the
// fourteenth session before its go/no-go, cluster_feed.cu, ran): both passes at once, the factors never
// leaving a cluster of three CTAs. Rank 0 runs the state pass's roles (two state warpgroups, the scanner
// and the loader warps: two_pass.cuh's run_state and run_scanner, chain after chain); ranks 1 and 2 run
// three factor groups each (FactorGroup, as the windows' factor pass with bulk stores). The cluster's
// chunks, in order: its chains c, c + C, c + 2C, ... (C clusters), chunk by chunk; chunk j is built by
// producer group j % 6 into stage j % 5 of rank 0:
//   - rank 0's loader, for chunk j: waits until chunk j - 5 has left the stage (its empty barrier),
//     releases the stage to group j % 6 (a remote arrival on that group's free barrier), loads j's V
//     into it and arrives on its full barrier;
//   - the group waits for that release before its phase B (the first writes into the stage: Qd,
//     Kend^T and the decay, by generic stores through a pointer into rank 0's shared memory), and after
//     its last barrier its loader thread copies the bulk images (W', T beta hi + lo, Aqk) into the
//     stage by cp.async.bulk.shared::cluster, completing on the stage's full barrier, while each of its
//     threads arrives there (release, cluster scope, after a proxy fence: rank 0's wgmma reads the stage
//     through the async proxy; the loader's arrival announces the copies' bytes).
// A stage's full barrier thus counts 1 + 128 arrivals and V's and the images' bytes; rank 0 waits on it
// with acquire at cluster scope (run_state<true>, run_scanner<true>). Sequences of equal length or
// packed (a cluster's chains then from a plan, longest first onto the least loaded cluster); no
// transition slice; bounded gate, L2 norm and beta sigmoid as the library's windows' pass. The outputs
// must equal one pass's of the same factor code bit for bit.
#pragma once

#include "two_pass.cuh"

namespace jax_kda {
namespace chunk32 {
namespace two_pass {

constexpr int kClusterCtas = 3;
constexpr int kClusterGroups = (kClusterCtas - 1) * kGroupsPerCta;  // the producer groups of a cluster
constexpr int kClusterThreads = kFactorThreads * kGroupsPerCta;     // 384: a factor CTA's; rank 0 uses 320
static_assert(kClusterThreads >= kStateCtaThreads, "rank 0's roles fit the CTA");
// A factor CTA's layout is the windows' factor pass's (bulk stores: the Aqk images), its groups' free
// barriers after it; rank 0's is the state pass's. Offsets from the aligned base, alike in every CTA, so
// that a producer finds rank 0's stages and full barriers at its own offsets.
constexpr uint32_t kClusterFreeBars =
    align_up((kGroupsPerCta - 1) * f1_group_stride(kRawSlots, true) + f1_group_end(kRawSlots, true), 8);
constexpr uint32_t kClusterSmBytes = kClusterFreeBars + kGroupsPerCta * 8 + kSwizzleAlign > kS2SmBytes
                                         ? kClusterFreeBars + kGroupsPerCta * 8 + kSwizzleAlign
                                         : kS2SmBytes;
static_assert(kClusterSmBytes <= kSmLimit, "cluster kernel shared memory");
constexpr uint32_t kClusterImageBytes = kWBytes + 2 * kTbetaBytes + kAqkBytes;  // the bulk copies of a chunk

// Which chains each cluster runs: cluster c's are order[first[c] .. first[c + 1]) (made on the host), or,
// without a plan, chains c, c + C, c + 2C, ... (C clusters).
struct ClusterPlan {
  const int *order = nullptr;
  const int *first = nullptr;  // [clusters + 1]
};
// The cluster's chains, its k-th one, and how many.
struct ClusterChains {
  ClusterPlan plan;
  int cluster, clusters, count;
  __device__ ClusterChains(const FusedParams &p, ClusterPlan plan_, int cluster_, int clusters_)
      : plan(plan_), cluster(cluster_), clusters(clusters_) {
    const int chains = p.batch * p.heads;
    count = plan.order != nullptr ? plan.first[cluster + 1] - plan.first[cluster]
            : cluster < chains    ? (chains - cluster + clusters - 1) / clusters
                                  : 0;
  }
  __device__ __forceinline__ Chain chain(const FusedParams &p, int k) const {
    const int index = plan.order != nullptr ? plan.order[plan.first[cluster] + k] : cluster + k * clusters;
    return p.cu_seqlens != nullptr ? packed_chain_of(index, p.heads, p.cu_seqlens, p.group)
                                   : chain_of(index, p.heads, p.tokens, p.group);
  }
};
// Chunk j of the cluster's sequence (chain by chain, chunk by chunk), for a reader whose j only grows:
// the chain holding it, found by walking on from the last one.
struct ChainCursor {
  int k = -1, ring0 = 0, chunks = 0;  // the chain, its first chunk's position in the sequence, its chunks
  __device__ __forceinline__ ItemPlace at(const FusedParams &p, const ClusterChains &cc, int j) {
    if (k < 0) chunks = cc.chain(p, k = 0).chunks;
    while (j >= ring0 + chunks) {
      ring0 += chunks;
      chunks = cc.chain(p, ++k).chunks;
    }
    return {cc.chain(p, k), j - ring0};
  }
};

// Rank 0's loader (lane 0 of its loader warp): every chunk of the cluster's sequence.
__device__ void run_cluster_loader(const FusedParams &p, const TensorMaps &maps, uint8_t *smem,
                                   const RingBarriers &bars, const ClusterChains &cc) {
  for (int k = 0, j = 0; k < cc.count; ++k) {
    const Chain chain = cc.chain(p, k);
    for (int i = 0; i < chain.chunks; ++i, ++j) {
      const int s = ring_stage(j), g = j % kClusterGroups;
      if (j >= kPassStages) mbarrier_wait(&bars.empty[s], ring_parity(j - kPassStages));
      uint64_t *free_bar = reinterpret_cast<uint64_t *>(smem + kClusterFreeBars) + g % kGroupsPerCta;
      remote_arrive(remote_address(smem_address(free_bar), 1 + g / kGroupsPerCta));
      issue_v_loads(maps, chain, i, smem + s * kStBytes, &bars.full[s]);  // expects its bytes
      mbarrier_arrive(&bars.full[s]);
    }
  }
}

// A producer group (`unit` of kClusterGroups): chunks unit, unit + 6, ... of the cluster's sequence, built
// as the windows' factor pass builds an item, into rank 0's stages.
template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__device__ void run_cluster_factors(const FusedParams &p, const TensorMaps &maps, uint8_t *smem, int group,
                                    int unit, const ClusterChains &cc, int total) {
  uint8_t *area = smem + group * f1_group_stride(kRawSlots, true);
  uint64_t *raw_full = reinterpret_cast<uint64_t *>(area + f1_barriers(kRawSlots));
  uint64_t *free_bar = reinterpret_cast<uint64_t *>(smem + kClusterFreeBars) + group;
  uint8_t *const aqk = area + f1_aqk_image(kRawSlots);
  FactorGroup<kGate, kL2Norm, kBetaSigmoid> fg;
  fg.base = area;
  fg.group = group;
  fg.tid = int(threadIdx.x % kFactorThreads);
  fg.warp = fg.tid / 32;
  fg.lane = fg.tid % 32;
  fg.half = fg.warp >> 1;
  fg.d0 = 2 * (((fg.warp & 1) << 5) | fg.lane);
  const bool loader = fg.tid == kLoaderThread;
  fg.clear_marks();
  fg.sync();
  auto slot_of = [&](int it) { return area + kGrRaw + (it % kRawSlots) * kRawSlotBytes; };
  ChainCursor cursor;
  int j = unit;
  uint32_t beta_bits = 0u;
  ItemPlace here{};
  if (j < total) {
    here = cursor.at(p, cc, j);
    if (loader) issue_raw_loads(maps, here.chain, here.chunk, slot_of(0), &raw_full[0]);
    beta_bits = load_beta_bits(p, here.chain, here.chunk, fg.tid);
  }
  int gate_head = -1;
  for (int it = 0; j < total; ++it, j += kClusterGroups) {
    const int next = j + kClusterGroups < total ? j + kClusterGroups : -1;
    ItemPlace nx{};
    uint32_t next_beta_bits = 0u;
    if (next >= 0) {
      nx = cursor.at(p, cc, next);
      next_beta_bits = load_beta_bits(p, nx.chain, nx.chunk, fg.tid);
    }
    fg.launder_indices();
    uint8_t *raw = slot_of(it);
    const int s = ring_stage(j);
    uint8_t *stage = remote_pointer(smem + s * kStBytes, 0);  // rank 0's stage, for generic stores
    const uint32_t stage_at = remote_address(smem_address(smem + s * kStBytes), 0);
    const uint32_t stage_full = remote_address(smem_address(smem + kS2Barriers + s * 8), 0);  // bars.full[s]
    if (here.chain.head != gate_head) {
      fg.load_gate(p, here.chain.head);
      gate_head = here.chain.head;
    }
    const int valid = valid_tokens(here.chunk, here.chain.tokens);
    float x[kSubBlock][2];
    mbarrier_wait(&raw_full[it % kRawSlots], uint32_t(it / kRawSlots) & 1u);
    fg.gate_and_offsets(raw, valid, x);
    fg.row_norms(raw);
    fg.write_betas(beta_bits, valid);
    fg.sync();
    if (loader) {  // the last chunk's copies have read the other slot and the Aqk image: the next loads
      bulk_wait_read();
      if (next >= 0) issue_raw_loads(maps, nx.chain, nx.chunk, slot_of(it + 1), &raw_full[(it + 1) % kRawSlots]);
    }
    mbarrier_wait_cluster(free_bar, uint32_t(it) & 1u);  // rank 0 has given the stage to this chunk
    fg.template elementwise_factors<true>(raw, stage, x, valid);
    fg.sync();
    fg.clear_marks();
    fg.template scores<true>(raw, aqk);
    fg.sync();
    uint8_t *const ta = raw + kRawG, *const ta_lo = raw + kRawG + kTbetaBytes, *const wq = raw + kRawQ;
    fg.invert_and_merge_spread(ta, ta_lo, [] {});
    fg.sync();
    fg.w_product(raw, wq);
    // The images' generic writes before the copy engine reads them, and this thread's stores into rank
    // 0's stage before its wgmma reads them (both the async proxy).
    fence_proxy_async_cluster();
    fg.sync();
    if (loader) {
      remote_arrive_expect_bytes(stage_full, kClusterImageBytes);
      bulk_copy_to_cluster(stage_at + kStWq, wq, kWBytes, stage_full);
      bulk_copy_to_cluster(stage_at + kStTa, ta, kTbetaBytes, stage_full);
      bulk_copy_to_cluster(stage_at + kStAqk, aqk, kAqkBytes, stage_full);
      bulk_copy_to_cluster(stage_at + kStTbetaLo, ta_lo, kTbetaBytes, stage_full);
      bulk_commit();
    } else {
      remote_arrive(stage_full);  // after this thread's stores into the stage
    }
    beta_bits = next_beta_bits;
    here = nx;
  }
  if (loader) bulk_wait_all();  // the slots stay allocated until the copies have read them
}

// Grid: clusters x 3 CTAs (`clusters` of them), one a multiprocessor.
template <GateMath kGate, bool kL2Norm, bool kBetaSigmoid>
__global__ void __cluster_dims__(kClusterCtas, 1, 1) __launch_bounds__(kClusterThreads, 1)
    cluster_pass_kernel(const __grid_constant__ FusedParams p, const __grid_constant__ TensorMaps maps, int clusters,
                        ClusterPlan plan) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = aligned_smem(smem_raw);
  const uint32_t rank = __shfl_sync(0xFFFFFFFFu, cluster_rank(), 0);  // warp-uniform (wgmma below)
  const ClusterChains cc(p, plan, int(blockIdx.x) / kClusterCtas, clusters);
  uint64_t *bar_base = reinterpret_cast<uint64_t *>(smem + kS2Barriers);
  const RingBarriers bars{bar_base, bar_base + kPassStages, bar_base + 2 * kPassStages,
                          reinterpret_cast<uint32_t *>(smem + kS2BadRows)};
  const int warp = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / 32, 0);
  if (rank == 0 && threadIdx.x == 0) {
    for (int i = 0; i < kPassStages; ++i) {
      mbarrier_init(&bars.full[i], 1 + kFactorThreads);
      mbarrier_init(&bars.scanned[i], 1);
      mbarrier_init(&bars.empty[i], kStateThreads);
    }
  }
  if (rank != 0 && threadIdx.x % kFactorThreads == 0) {
    const int group = int(threadIdx.x / kFactorThreads);
    uint64_t *raw_full = reinterpret_cast<uint64_t *>(smem + group * f1_group_stride(kRawSlots, true) +
                                                      f1_barriers(kRawSlots));
    for (int i = 0; i < kRawSlots; ++i) mbarrier_init(&raw_full[i], 1);
    mbarrier_init(reinterpret_cast<uint64_t *>(smem + kClusterFreeBars) + group, 1);
  }
  fence_barrier_init();
  cluster_sync();  // every barrier of the cluster initialised before any CTA uses another's
  if (rank == 0) {
    if (warp < kLoaderWarp) {
      for (int k = 0, ring0 = 0; k < cc.count; ++k) {
        const Chain chain = cc.chain(p, k);
        run_state<true>(p, smem, bars, chain, warp / (kWarpgroupThreads / 32), 0, chain.chunks, false, ring0);
        ring0 += chain.chunks;
      }
    } else if (warp == kScannerWarp) {
      for (int k = 0, ring0 = 0; k < cc.count; ++k) {
        const int chunks = cc.chain(p, k).chunks;
        run_scanner<true>(smem, bars, ChainWindow{0, chunks, 0}, true, int(threadIdx.x % 32), ring0);
        ring0 += chunks;
      }
    } else if (warp == kLoaderWarp && threadIdx.x % 32 == 0) {
      run_cluster_loader(p, maps, smem, bars, cc);
    }
  } else {
    int total = 0;  // the cluster's chunks
    for (int k = 0; k < cc.count; ++k) total += cc.chain(p, k).chunks;
    const int group = int(threadIdx.x / kFactorThreads);
    run_cluster_factors<kGate, kL2Norm, kBetaSigmoid>(p, maps, smem, group,
                                                      int(rank - 1) * kGroupsPerCta + group, cc, total);
  }
  cluster_sync();  // no CTA leaves while another may still write into it or arrive on its barriers
}

}  // namespace two_pass
}  // namespace chunk32
}  // namespace jax_kda
