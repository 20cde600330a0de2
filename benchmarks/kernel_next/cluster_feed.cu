// Go/no-go for D's cluster kernel (docs/PERFLOG.md, "Next", item 3 (b), and the design after it; the
// kernel: cluster_pass.cuh): can two factor CTAs feed one state CTA through distributed shared memory
// at the state step's rate, so that a chunk's 31 KB of factors never leave the cluster?
//
// The protocol of the design (docs/PERFLOG.md, "D's cluster kernel: the design"). A cluster of three
// CTAs, one a multiprocessor: rank 0 the consumer (the state CTA's stand-in), ranks 1 and 2 the
// producers, each with three groups of 128 threads (the factor groups' stand-ins). The consumer's
// shared memory holds the state pass's kStages = 5 stages (one chunk's factors, then its V); chunk j of
// the cluster's sequence is built by producer group j % 6 into stage j % 5. Its full barrier completes
// on the consumer's V copy from global memory (its loader's arrival announces the bytes), the
// producer's bulk copy (thread 0's arrival announces those) and the producer group's 128 arrivals. Per
// chunk, a producer group:
//   waits (chunks 5 and later) until the consumer has released chunk j - 5's stage (an mbarrier in
//   the producer's own shared memory, on which the consumer arrives remotely: each group's barrier
//   receives exactly the releases of the stages its chunks take), spins `work` cycles (the factor
//   build's place; the library's groups take ~12,500 cycles an item, three at once a multiprocessor),
//   writes its bulk image (W', T beta, Aqk: kBulkBytes) into its own shared memory, stores the rest
//   (Qd, Kend^T, decay: kThreadBytes) by st.shared::cluster into the consumer's stage, copies the image
//   there by cp.async.bulk.shared::cluster completing on the stage's full mbarrier, and arrives on it
//   remotely (release, cluster scope).
// The consumer waits for chunk j's stage, reads all of it (each word checked against the pattern the
// producer wrote and V's: the acquire/release order and the copies' completion made visible, or
// counted as bad), spins `step` cycles (the state step's place: ~2,400 cycles, 1.36 us), releases the
// stage to group (j + 5) % 6 and loads chunk j + 5's V into it.
// Timed (cudaEvents, median of 5 after a warm-up that also checks) for each (work, step) pair on one
// cluster and on as many as fit at once: microseconds a chunk a cluster, and the factors' rate into a
// consumer. Go: with both sides' work at the design's figures (12,500 and 2,400 cycles) the consumer
// takes a chunk every <= 1.25x its step alone on every cluster at once, and with no work the feed
// carries 2x or more the 23 GB/s a consumer needs (31 KB every 1.36 us).
//
// On the card, from this folder (a few seconds; the checks run in every launch):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I../../csrc/chunk32 cluster_feed.cu -o /tmp/cluster_feed
//   compute-sanitizer --tool memcheck /tmp/cluster_feed --chunks 24 --clusters 1 && /tmp/cluster_feed
// Options: --chunks N (each cluster's; default 2048), --clusters N (default: as many as fit at once).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ptx.cuh"

namespace jax_kda {
namespace chunk32 {
namespace cluster_feed {

constexpr int kClusterCtas = 3, kProducerCtas = 2, kGroupsPerProducer = 3;
constexpr int kGroups = kProducerCtas * kGroupsPerProducer;  // producer groups: chunk j from group j % 6
constexpr int kStages = 5;                                    // the state pass's stages: chunk j in stage j % 5
constexpr int kGroupThreads = 128, kCtaThreads = kGroupsPerProducer * kGroupThreads;
constexpr uint32_t kBulkBytes = 8192 + 2 * 2048 + 2048;  // W' 8 KB, T beta hi + lo, Aqk
constexpr uint32_t kThreadBytes = 8192 + 8192 + 512;     // Qd, Kend^T, decay
constexpr uint32_t kFactorBytes = kBulkBytes + kThreadBytes;  // 31232: the factor buffer's bytes a chunk
constexpr uint32_t kVOffset = 31744, kVBytes = 8192, kStageBytes = kVOffset + kVBytes;  // stage.h's layout
constexpr int kVChunks = 1024;  // V's chunks a cluster in global memory (chunk j reads j % kVChunks)
static_assert(kBulkBytes % 16 == 0 && kThreadBytes % 16 == 0 && kFactorBytes <= kVOffset, "stage layout");
// Consumer: the stages, then the full barriers. Producer: the groups' bulk images, then the free barriers.
constexpr uint32_t kConsumerBarriers = kStages * kStageBytes;
constexpr uint32_t kProducerBarriers = kGroupsPerProducer * kBulkBytes;
constexpr uint32_t kSmemBytes = kConsumerBarriers + kStages * 8;
static_assert(kProducerBarriers + kGroupsPerProducer * 8 <= kSmemBytes, "one size for both roles");
constexpr long long kWatchdogPolls = 1ll << 22;  // seconds of polls: a bug, recorded rather than hung on

struct Counters {
  unsigned long long bad_words;  // words the consumer read that were not the producer's pattern
  unsigned long long checksum;   // keeps the consumer's reads
  int hung;                      // a wait ran past the watchdog
};

__host__ __device__ inline uint32_t pattern(int chunk, uint32_t word) {
  return (uint32_t(chunk) * 2654435761u) ^ (word * 40503u) ^ 0x5bd1e995u;
}
__global__ void fill_v(uint32_t *v, size_t words) {  // V's chunk c (of its cluster's kVChunks): pattern(-1 - c, w)
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words; i += size_t(gridDim.x) * blockDim.x) {
    const size_t chunk = i / (kVBytes / 4) % kVChunks;
    v[i] = pattern(-1 - int(chunk), uint32_t(i % (kVBytes / 4)));
  }
}

// A wait on a barrier other CTAs complete; a wait past the watchdog is recorded, not hung on.
__device__ __forceinline__ bool wait_cluster_phase(uint64_t *bar, uint32_t parity, int *hung) {
  if (mbarrier_wait_cluster(bar, parity, kWatchdogPolls)) return true;
  atomicExch(hung, 1);
  return false;
}
__device__ __forceinline__ void spin(long long cycles) {
  const long long until = clock_cycles() + cycles;
  while (clock_cycles() < until) {
  }
}

// chunks: each cluster's sequence of chunks; work, step: the producers' and the consumer's cycles a chunk;
// v: kVChunks chunks of V a cluster.
__global__ void __launch_bounds__(kCtaThreads, 1) feed_kernel(int chunks, long long work, long long step,
                                                             const uint8_t *v, Counters *counters) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t rank = cluster_rank();
  const int tid = threadIdx.x, group = tid / kGroupThreads, gtid = tid % kGroupThreads;
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + kConsumerBarriers);  // consumer: [kStages]
  uint64_t *free_ = reinterpret_cast<uint64_t *>(smem + kProducerBarriers);  // producer: [groups]
  const uint8_t *cluster_v = v + size_t(blockIdx.x / kClusterCtas) * kVChunks * kVBytes;
  if (tid == 0) {
    if (rank == 0) {
      for (int s = 0; s < kStages; ++s) mbarrier_init(&full[s], kGroupThreads + 1);
    } else {
      for (int g = 0; g < kGroupsPerProducer; ++g) mbarrier_init(&free_[g], 1);
    }
    fence_barrier_init();
  }
  cluster_sync();  // every barrier initialised before any CTA touches another's
  // The consumer's loader (thread 0): chunk j's V into its stage, announced on the stage's full barrier.
  auto load_v = [&](int j) {
    uint8_t *stage = smem + (j % kStages) * kStageBytes;
    mbarrier_arrive_expect_bytes(&full[j % kStages], kVBytes);
    bulk_copy_to_shared(stage + kVOffset, cluster_v + size_t(j % kVChunks) * kVBytes, kVBytes, &full[j % kStages]);
  };
  if (rank == 0) {
    if (group == 0) {  // the consumer: one warpgroup
      if (gtid == 0)
        for (int j = 0; j < kStages && j < chunks; ++j) load_v(j);
      unsigned long long bad = 0, sum = 0;
      for (int j = 0; j < chunks; ++j) {
        const int s = j % kStages;
        if (!wait_cluster_phase(&full[s], uint32_t(j / kStages) & 1u, &counters->hung)) break;
        const uint4 *stage = reinterpret_cast<const uint4 *>(smem + s * kStageBytes);
        for (uint32_t i = gtid; i < kStageBytes / 16; i += kGroupThreads) {
          if (i >= kFactorBytes / 16 && i < kVOffset / 16) continue;  // the gap before V
          const uint4 x = stage[i];
          const bool is_v = i >= kVOffset / 16;
          const int tag = is_v ? -1 - j % kVChunks : j;
          const uint32_t w = is_v ? 4 * i - kVOffset / 4 : 4 * i;
          bad += (x.x != pattern(tag, w)) + (x.y != pattern(tag, w + 1)) + (x.z != pattern(tag, w + 2)) +
                 (x.w != pattern(tag, w + 3));
          sum += x.x ^ x.w;
        }
        spin(step);
        named_barrier(1, kGroupThreads);  // every read of the stage done before it is released
        if (gtid == 0 && j + kStages < chunks) {  // to the group of chunk j + 5, then its V
          const int next = (j + kStages) % kGroups;
          const uint32_t producer = 1 + next / kGroupsPerProducer;
          remote_arrive(remote_address(smem_address(&free_[next % kGroupsPerProducer]), producer));
          load_v(j + kStages);
        }
      }
      atomicAdd(&counters->bad_words, bad);
      atomicAdd(&counters->checksum, sum);
    }
  } else {  // a producer: three groups
    const int g = int(rank - 1) * kGroupsPerProducer + group;
    uint8_t *image = smem + group * kBulkBytes;
    int waits = 0;
    for (int j = g; j < chunks; j += kGroups) {
      if (j >= kStages && !wait_cluster_phase(&free_[group], uint32_t(waits++) & 1u, &counters->hung)) break;
      const int s = j % kStages;
      const uint32_t stage = remote_address(smem_address(smem + s * kStageBytes), 0);
      const uint32_t stage_full = remote_address(smem_address(&full[s]), 0);
      if (gtid == 0) bulk_wait_read();  // the last chunk's copy has read the image
      named_barrier(1 + group, kGroupThreads);
      spin(work);
      uint4 *img = reinterpret_cast<uint4 *>(image);
      for (uint32_t i = gtid; i < kBulkBytes / 16; i += kGroupThreads) {
        const uint32_t w = 4 * i;
        img[i] = make_uint4(pattern(j, w), pattern(j, w + 1), pattern(j, w + 2), pattern(j, w + 3));
      }
      for (uint32_t i = gtid; i < kThreadBytes / 16; i += kGroupThreads) {
        const uint32_t w = (kBulkBytes / 4) + 4 * i;
        remote_store(stage + kBulkBytes + 16 * i,
                     make_uint4(pattern(j, w), pattern(j, w + 1), pattern(j, w + 2), pattern(j, w + 3)));
      }
      // The image's writes before the copy engine reads it, and the remote stores (as the kernel's).
      fence_proxy_async_cluster();
      named_barrier(1 + group, kGroupThreads);
      if (gtid == 0) {
        remote_arrive_expect_bytes(stage_full, kBulkBytes);
        bulk_copy_to_cluster(stage, image, kBulkBytes, stage_full);
        bulk_commit();
      } else {
        remote_arrive(stage_full);
      }
    }
    if (gtid == 0) bulk_wait_all();
  }
  cluster_sync();  // no CTA leaves while another may still arrive on its barriers
}

}  // namespace cluster_feed
}  // namespace chunk32
}  // namespace jax_kda

using namespace jax_kda::chunk32::cluster_feed;

#define CHECK(call)                                                                            \
  do {                                                                                         \
    cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

// A launch of `clusters` clusters (its attribute kept beside the config that points at it).
struct ClusterLaunch {
  cudaLaunchAttribute attribute[1];
  cudaLaunchConfig_t config = {};
  explicit ClusterLaunch(int clusters) {
    config.gridDim = dim3(clusters * kClusterCtas);
    config.blockDim = dim3(kCtaThreads);
    config.dynamicSmemBytes = kSmemBytes;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = kClusterCtas;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch &) = delete;
};

static cudaError_t launch(int clusters, int chunks, long long work, long long step, const uint8_t *v,
                          Counters *counters) {
  ClusterLaunch l(clusters);
  return cudaLaunchKernelEx(&l.config, feed_kernel, chunks, work, step, v, counters);
}

int main(int argc, char **argv) {
  int chunks = 2048, clusters_arg = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--chunks")) chunks = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--clusters")) clusters_arg = std::atoi(argv[i + 1]);
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  CHECK(cudaFuncSetAttribute(feed_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  int fit = 0;
  {
    ClusterLaunch one(1);
    CHECK(cudaOccupancyMaxActiveClusters(&fit, feed_kernel, &one.config));
  }
  std::printf("cluster_feed: %s, %d SMs; clusters of %d CTAs (%u B shared memory each) resident at once: %d\n",
              prop.name, prop.multiProcessorCount, kClusterCtas, kSmemBytes, fit);
  std::printf("a chunk: %u B of factors (%u by bulk copy, %u by remote stores) from %d producer groups into %d "
              "stages, and %u B of V from global memory\n", kFactorBytes, kBulkBytes, kThreadBytes, kGroups, kStages,
              kVBytes);
  const int most = std::max(1, clusters_arg > 0 ? clusters_arg : fit);
  uint8_t *v;
  const size_t v_bytes = size_t(most) * kVChunks * kVBytes;
  CHECK(cudaMalloc(&v, v_bytes));
  fill_v<<<1024, 256>>>(reinterpret_cast<uint32_t *>(v), v_bytes / 4);
  CHECK(cudaGetLastError());
  Counters *counters;
  CHECK(cudaMalloc(&counters, sizeof(Counters)));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  struct Setting {
    long long work, step;
    const char *what;
  };
  const Setting settings[] = {{0, 0, "transport alone"},
                              {0, 2400, "consumer step only"},
                              {12500, 0, "producer work only"},
                              {12500, 2400, "both (the design's figures)"},
                              {15000, 2400, "both, producers 20% slower"}};
  bool ok = true;
  double step_alone = 0;  // us a chunk of "consumer step only" on one cluster: the step's own time
  std::printf("%-30s %8s %9s %10s %14s %10s %8s\n", "setting", "clusters", "ms", "us/chunk", "GB/s/consumer",
              "x step", "bad words");
  for (const Setting &s : settings) {
    for (int clusters : {1, most}) {
      CHECK(cudaMemset(counters, 0, sizeof(Counters)));
      CHECK(launch(clusters, chunks, s.work, s.step, v, counters));  // warm-up, and the checks
      CHECK(cudaDeviceSynchronize());
      Counters host;
      CHECK(cudaMemcpy(&host, counters, sizeof(Counters), cudaMemcpyDeviceToHost));
      std::vector<float> ms;
      for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(start));
        CHECK(launch(clusters, chunks, s.work, s.step, v, counters));
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float t;
        CHECK(cudaEventElapsedTime(&t, start, stop));
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      const double median = ms[ms.size() / 2], us_per_chunk = median * 1e3 / chunks;
      if (s.work == 0 && s.step > 0 && clusters == 1) step_alone = us_per_chunk;
      const bool good = host.bad_words == 0 && !host.hung;
      ok = ok && good;
      char ratio[16] = "-";
      if (s.step > 0 && step_alone > 0) std::snprintf(ratio, sizeof(ratio), "%.3f", us_per_chunk / step_alone);
      std::printf("%-30s %8d %9.3f %10.3f %14.1f %10s %8llu%s\n", s.what, clusters, median, us_per_chunk,
                  kFactorBytes / (us_per_chunk * 1e3), ratio, host.bad_words, host.hung ? " HUNG" : "");
    }
  }
  std::printf("%s\n", ok ? "cluster_feed: ALL CHECKS PASS" : "cluster_feed: SOME CHECKS FAIL");
  return ok ? 0 : 1;
}
