// Device and communicator resolution, and the bucket plan: the rules that decide
// where a replica runs and how gradients travel, checked without a GPU by feeding
// resolve_placement the facts a machine would report.
#include <gtest/gtest.h>

#include "elbo/config/spec.hpp"
#include "elbo/dist/grad_sync.hpp"
#include "elbo/dist/placement.hpp"

namespace elbo {
namespace {

ExperimentSpec spec_with(const std::string& device, const std::string& communicator) {
  ExperimentSpec s = parse_spec("data: {train: x}\ndevice: " + device + "\ndist: {communicator: " + communicator + "}\n",
                                "t.yaml");
  return s;
}

WorldInfo node(int local_rank, int local_size) {
  WorldInfo w;
  w.rank = local_rank;
  w.size = local_size;
  w.local_rank = local_rank;
  w.local_size = local_size;
  w.host = "node7";
  return w;
}

BackendReport gpus(int n, bool compiled = true) {
  BackendReport r;
  r.cuda_compiled = compiled;
  r.cuda_devices = n;
  r.cuda_detail = n == 0 ? "cudaGetDeviceCount failed: no CUDA-capable device is detected" : "H100";
  return r;
}

std::string error_of(const ExperimentSpec& s, const WorldInfo& w, const BackendReport& r) {
  try {
    resolve_placement(s, w, r);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config);
    return e.what();
  }
  return "";
}

TEST(Placement, AutoPicksTheGpuWhenOneIsVisibleAndTheCpuOtherwise) {
  Placement p = resolve_placement(spec_with("auto", "auto"), node(0, 1), gpus(0));
  EXPECT_EQ(p.device, DeviceKind::Cpu);
  EXPECT_EQ(p.communicator, CommKind::Mpi);
  p = resolve_placement(spec_with("auto", "auto"), node(0, 1), gpus(2, false));
  EXPECT_EQ(p.device, DeviceKind::Cpu) << "a CPU-only build never picks CUDA";
  p = resolve_placement(spec_with("auto", "auto"), node(1, 2), gpus(2));
  EXPECT_EQ(p.device, DeviceKind::Cuda);
  EXPECT_EQ(p.gpu, 1);
  EXPECT_EQ(p.communicator, CommKind::Nccl);
}

TEST(Placement, AutoWithOneRankSyncsNothingButAnExplicitNcclStillRunsIt) {
  Placement p = resolve_placement(spec_with("cuda", "auto"), node(0, 1), gpus(1));
  EXPECT_EQ(p.device, DeviceKind::Cuda);
  EXPECT_EQ(p.communicator, CommKind::None) << "one replica's gradient already is the sum";
  p = resolve_placement(spec_with("cuda", "nccl"), node(0, 1), gpus(1));
  EXPECT_EQ(p.communicator, CommKind::Nccl) << "asked for by name, NCCL runs even with one rank";
  WorldInfo two_nodes = node(0, 1);
  two_nodes.size = 2;  // one rank on this node, another elsewhere
  p = resolve_placement(spec_with("cuda", "auto"), two_nodes, gpus(1));
  EXPECT_EQ(p.communicator, CommKind::Nccl);
}

TEST(Placement, RanksMapToGpusByLocalRankAndShareThemRoundRobin) {
  for (int lr = 0; lr < 6; ++lr) {
    Placement p = resolve_placement(spec_with("cuda", "mpi"), node(lr, 6), gpus(4));
    EXPECT_EQ(p.gpu, lr % 4);
    EXPECT_EQ(p.communicator, CommKind::Mpi);
  }
  Placement p = resolve_placement(spec_with("cuda", "auto"), node(2, 3), gpus(1));
  EXPECT_EQ(p.gpu, 0);
  EXPECT_EQ(p.communicator, CommKind::Mpi) << "auto falls back to MPI staging when ranks share a GPU";
  EXPECT_NE(p.why.find("3 ranks share 1 GPU(s) on node7"), std::string::npos) << p.why;
}

TEST(Placement, ImpossibleRequestsNameTheKey) {
  EXPECT_NE(error_of(spec_with("cuda", "auto"), node(0, 1), gpus(0)).find("device: cuda, but rank 0 on node7 sees no usable GPU"),
            std::string::npos);
  EXPECT_NE(error_of(spec_with("cuda", "auto"), node(0, 1), gpus(0, false)).find("has no CUDA backend"),
            std::string::npos);
  EXPECT_NE(error_of(spec_with("cpu", "nccl"), node(0, 1), gpus(1)).find("dist.communicator: nccl reduces GPU buffers"),
            std::string::npos);
  EXPECT_NE(error_of(spec_with("auto", "nccl"), node(0, 2), gpus(1)).find("dist.communicator: nccl cannot run several "
                                                                          "ranks on one GPU (2 ranks share 1 GPU(s)"),
            std::string::npos);
  EXPECT_EQ(error_of(spec_with("cuda", "nccl"), node(0, 2), gpus(2)), "");
}

TEST(Placement, SpecRejectsUnknownChoices) {
  try {
    spec_with("tpu", "auto");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("device"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
  }
  EXPECT_THROW(spec_with("cpu", "gloo"), Error);
  EXPECT_THROW(parse_spec("data: {train: x}\ndist: {timeout_s: -1}\n", "t.yaml"), Error);
}

TEST(BucketPlan, CoversTheBufferFromTheEndWithoutGapsOrOverlap) {
  for (size_t n : {size_t{1}, size_t{10}, size_t{1009}}) {
    for (size_t b : {size_t{0}, size_t{1}, size_t{3}, size_t{10}, size_t{5000}}) {
      auto plan = plan_buckets(n, b);
      ASSERT_FALSE(plan.empty());
      EXPECT_EQ(plan.front().end, n);
      EXPECT_EQ(plan.back().begin, 0u);
      for (size_t k = 0; k + 1 < plan.size(); ++k) EXPECT_EQ(plan[k].begin, plan[k + 1].end);
      for (const auto& r : plan) {
        EXPECT_GT(r.size(), 0u);
        if (b > 0) EXPECT_LE(r.size(), b);
      }
      if (b == 0 || b >= n) EXPECT_EQ(plan.size(), 1u);
    }
  }
  EXPECT_TRUE(plan_buckets(0, 4).empty());
}

}  // namespace
}  // namespace elbo
