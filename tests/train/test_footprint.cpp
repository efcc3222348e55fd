// What a run needs, checked before it starts: step counts that overflow name the keys,
// the memory estimate matches what the buffers really take, and an estimate beyond the
// limit (or a failed allocation) is a config error naming the buffer and the keys.
#include <gtest/gtest.h>

#include <cmath>
#include <malloc.h>

#include <climits>
#include <new>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/hvae.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/train/evaluate.hpp"
#include "elbo/train/footprint.hpp"

namespace elbo {
namespace {

ExperimentSpec spec_with(const std::vector<std::string>& sets) {
  return parse_spec("data:\n  train: /tmp/train\n", "exp.yaml", sets);
}

std::string config_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a config error";
  return "";
}

TEST(Steps, CountsEpochsOfBatchesCappedByMaxSteps) {
  StepPlan p = plan_steps(spec_with({"train.batch_size=128", "train.epochs=10"}), 60000);
  EXPECT_EQ(p.per_epoch, 469);
  EXPECT_EQ(p.total, 4690);
  p = plan_steps(spec_with({"train.batch_size=128", "train.epochs=10", "train.drop_last=true"}), 60000);
  EXPECT_EQ(p.per_epoch, 468);
  p = plan_steps(spec_with({"train.batch_size=128", "train.epochs=10", "train.max_steps=100"}), 60000);
  EXPECT_EQ(p.total, 100);
  // Rounding up without forming n + B - 1, which would wrap for n near INT64_MAX.
  const int64_t huge = INT64_MAX - 1;
  p = plan_steps(spec_with({"train.batch_size=2000000000", "train.max_steps=1"}), huge);
  EXPECT_EQ(p.per_epoch, huge / 2000000000 + 1);
  EXPECT_EQ(p.total, 1);
}

TEST(Steps, OverflowIsAConfigErrorNamingTheKeys) {
  // 469 x 2e17 steps wrap around int64: the run used to train 0 steps and exit 0.
  std::string e = config_error_of([] { plan_steps(spec_with({"train.epochs=200000000000000000"}), 60000); });
  EXPECT_NE(e.find("--set train.epochs=200000000000000000: train.epochs"), std::string::npos) << e;
  EXPECT_NE(e.find("train.max_steps"), std::string::npos) << e;
  // With a step cap the epochs never run out: fine.
  EXPECT_EQ(plan_steps(spec_with({"train.epochs=200000000000000000", "train.max_steps=1000"}), 60000).total, 1000);
  // The steps fit but the samples seen would not.
  e = config_error_of([] { plan_steps(spec_with({"train.epochs=10000000000000000"}), 60000); });
  EXPECT_NE(e.find("samples"), std::string::npos) << e;
  // More rows per rank than a pass holds.
  e = config_error_of([] { plan_steps(spec_with({"train.batch_size=4000000000"}), 60000, 1); });
  EXPECT_NE(e.find("train.batch_size: 4000000000 over 1 rank(s)"), std::string::npos) << e;
  EXPECT_NO_THROW(plan_steps(spec_with({"train.batch_size=4000000000"}), 60000, 2));
}

// Bytes this process has allocated (glibc: the heap in use plus mmap'd blocks).
double allocated_bytes() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<double>(m.uordblks) + static_cast<double>(m.hblkhd);
}

ModelSpec conv_model() {
  return spec_with({"model={type: conv, latent: 8, encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, "
                    "padding: 1}, relu, {type: group_norm, groups: 4}, flatten], decoder: [{type: linear, features: "
                    "392}, relu, {type: reshape, shape: [8, 7, 7]}, {type: conv_transpose2d, channels: 4, kernel: 4, "
                    "stride: 2, padding: 1}, relu, {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, "
                    "padding: 1}]}"})
      .model;
}

TEST(Memory, ActivationEstimateIsWhatTheModelAllocates) {
  CpuBackend<float> be;
  for (const ModelSpec& m : {spec_with({"model.encoder=[400, 200]"}).model, conv_model()}) {
    const VaeLayout layout(m, std::vector<int>{1, 28, 28});
    const double before = allocated_bytes();
    for (int k : {0, 1, 5}) {  // loss.type: iwae sizes the decoder's side for k samples per input
      Vae<float> model(layout, be, 512, k);
      const double used = allocated_bytes() - before, est = vae_activation_bytes(layout, 512, k);
      EXPECT_GE(est, 0.98 * used) << m.type << " k=" << k;
      EXPECT_LE(est, 1.02 * used + 4096) << m.type << " k=" << k;
    }
  }
}

// The hierarchical model's estimate against what Hvae<float> allocates, for a model
// with pooling at two resolutions and several groups per stage; activation_bytes picks
// it by the layout's type, and the Vae's estimate stays the one above.
TEST(Memory, HierarchicalActivationEstimateIsWhatTheModelAllocates) {
  CpuBackend<float> be;
  const ModelSpec m = spec_with({"model={type: hierarchical, width: 8, bottleneck: 4, stages: [{down: 1, blocks: 1, "
                                 "groups: 1, latent: 2}, {down: 2, blocks: 2, groups: 2, latent: 3}, {down: 7, "
                                 "blocks: 1, groups: 1, latent: 4}]}"})
                          .model;
  const HvaeLayout layout(m, std::vector<int>{1, 28, 28});
  const double before = allocated_bytes();
  {
    Hvae<float> model(layout, be, 64);
    const double used = allocated_bytes() - before, est = hvae_activation_bytes(layout, 64);
    EXPECT_GE(est, 0.98 * used);
    EXPECT_LE(est, 1.02 * used + 4096);
    EXPECT_DOUBLE_EQ(activation_bytes(layout, 64), est);
  }
  const VaeLayout vae(spec_with({}).model, std::vector<int>{1, 28, 28});
  EXPECT_DOUBLE_EQ(activation_bytes(vae, 64, 3), vae_activation_bytes(vae, 64, 3));
}

// The same with per-stage widths (growing and shrinking, so the resize buffers of both
// directions exist, and the stream's widest tensor is a mixed shape), decoder-only
// blocks at full resolution and lower down, and a learned resampling to the top stage.
TEST(Memory, HierarchicalEstimateWithPerStageWidthsAndDecoderBlocks) {
  CpuBackend<float> be;
  const ModelSpec m =
      spec_with({"model={type: hierarchical, width: 8, bottleneck: 4, stages: [{down: 1, blocks: 1, groups: 0, "
                 "dec_blocks: 2, width: 4, bottleneck: 2}, {down: 2, blocks: 2, groups: 2, latent: 3, dec_blocks: 1, "
                 "width: 24}, {down: 7, blocks: 1, groups: 1, latent: 4, width: 6, bottleneck: 8, resample: conv}]}"})
          .model;
  const HvaeLayout layout(m, std::vector<int>{1, 28, 28});
  // W_1 = 24 channels at the input's resolution (d(pooling input)) outgrows every stream.
  EXPECT_EQ(layout.max_stream(), 24u * 28 * 28);
  const double before = allocated_bytes();
  Hvae<float> model(layout, be, 64);
  const double used = allocated_bytes() - before, est = hvae_activation_bytes(layout, 64);
  EXPECT_GE(est, 0.98 * used);
  EXPECT_LE(est, 1.02 * used + 4096);
}

TEST(Memory, TrainEstimateCountsStateActivationsAndHostBuffers) {
  const VaeLayout layout(spec_with({}).model, 784);
  const MemoryEstimate e = estimate_train_memory(layout, 128, DeviceKind::Cpu);
  EXPECT_DOUBLE_EQ(e.items[MemoryEstimate::kModelState].bytes, 16.0 * layout.num_params());
  // dist.shard_optimizer on 3 ranks: the moments of a third of the parameters.
  const double P = static_cast<double>(layout.num_params());
  EXPECT_DOUBLE_EQ(estimate_train_memory(layout, 128, DeviceKind::Cpu, 3).items[MemoryEstimate::kModelState].bytes,
                   4.0 * (2 * P + 2 * std::ceil(P / 3)));
  EXPECT_GE(e.items[MemoryEstimate::kActivations].bytes, vae_activation_bytes(layout, 128));
  // On a GPU only the host items stay in RAM.
  const MemoryEstimate g = estimate_train_memory(layout, 128, DeviceKind::Cuda);
  EXPECT_DOUBLE_EQ(g.host_total(DeviceKind::Cuda), g.host_bytes());
  EXPECT_GT(e.host_total(DeviceKind::Cpu), e.host_bytes());
  // Evaluation with a large k: buffers bounded by eval.batch_size, not by k.
  MemoryEstimate a = e, b = e;
  add_eval_memory(a, layout, 5000, 5000, 500, "eval.batch_size");
  add_eval_memory(b, layout, 5000, 1000000000, 500, "eval.batch_size");
  EXPECT_DOUBLE_EQ(a.host_total(DeviceKind::Cpu), b.host_total(DeviceKind::Cpu));
}

TEST(Memory, AccumulationSizesTheActivationsByTheMicroBatchAndTheHostBatchByTheSlice) {
  const VaeLayout layout(spec_with({}).model, 784);
  const MemoryEstimate whole = estimate_train_memory(layout, 128, DeviceKind::Cpu);
  const MemoryEstimate micro = estimate_train_memory(layout, 128, DeviceKind::Cpu, 1, 32);  // train.accumulate: 4
  const MemoryEstimate small = estimate_train_memory(layout, 32, DeviceKind::Cpu);
  EXPECT_DOUBLE_EQ(micro.items[MemoryEstimate::kActivations].bytes, small.items[MemoryEstimate::kActivations].bytes);
  EXPECT_LT(micro.items[MemoryEstimate::kActivations].bytes, whole.items[MemoryEstimate::kActivations].bytes);
  EXPECT_EQ(micro.items[MemoryEstimate::kActivations].what, "activations for 32 rows per rank");
  EXPECT_NE(micro.items[MemoryEstimate::kActivations].keys.find("train.accumulate"), std::string::npos);
  EXPECT_DOUBLE_EQ(micro.host_bytes(), whole.host_bytes());  // the prepared batches hold the rank's whole slice
  EXPECT_LT(micro.device_bytes(), whole.device_bytes());
}

TEST(Memory, BeyondTheLimitIsAConfigErrorNamingTheBufferAndKeys) {
  const VaeLayout layout(spec_with({}).model, 784);
  MemoryEstimate e = estimate_train_memory(layout, 1000000000, DeviceKind::Cpu);
  std::string msg = config_error_of([&] { check_memory(e, DeviceKind::Cpu, 64e9, "exp.yaml"); });
  EXPECT_NE(msg.find("exp.yaml: the run needs about "), std::string::npos) << msg;
  EXPECT_NE(msg.find(" TB of memory per rank"), std::string::npos) << msg;
  EXPECT_NE(msg.find("64 GB"), std::string::npos) << msg;
  EXPECT_NE(msg.find("activations for 1000000000 rows per rank"), std::string::npos) << msg;
  EXPECT_NE(msg.find("train.batch_size"), std::string::npos) << msg;
  // A huge model names the model keys.
  const VaeLayout wide(spec_with({"model.encoder=[100000000]"}).model, 784);
  msg = config_error_of([&] {
    check_memory(estimate_train_memory(wide, 128, DeviceKind::Cpu), DeviceKind::Cpu, 64e9, "exp.yaml");
  });
  EXPECT_NE(msg.find("model.encoder"), std::string::npos) << msg;
  // Within the limit, or with no known limit: no error.
  EXPECT_NO_THROW(check_memory(estimate_train_memory(layout, 128, DeviceKind::Cpu), DeviceKind::Cpu, 64e9, "x"));
  EXPECT_NO_THROW(check_memory(e, DeviceKind::Cpu, 0, "x"));
  EXPECT_GT(host_memory_per_rank(1), 0);
  EXPECT_NEAR(host_memory_per_rank(4), host_memory_per_rank(1) / 4, 1.0);
}

TEST(Memory, AFailedAllocationNamesTheBufferNotStdBadAlloc) {
  const MemoryItem item{"activations for 7 rows per rank", "train.batch_size", 3e9, true};
  std::string msg = config_error_of([&] { allocating(item, "exp.yaml", []() -> int { throw std::bad_alloc(); }); });
  EXPECT_EQ(msg, "exp.yaml: cannot allocate the activations for 7 rows per rank (3 GB; out of memory); reduce "
                 "train.batch_size");
  EXPECT_EQ(allocating(item, "exp.yaml", [] { return 42; }), 42);
}

TEST(Eval, ChunksBoundRowsPerPassByTheBatchSize) {
  EvalChunks c = eval_chunks(0, 500, 10000);
  EXPECT_EQ(c.kc, 1);
  EXPECT_EQ(c.cap, 500);
  c = eval_chunks(5000, 500, 10000);  // k > batch: one input per pass, 500 samples of it
  EXPECT_EQ(c.kc, 500);
  EXPECT_EQ(c.xb, 1);
  c = eval_chunks(20, 500, 10000);
  EXPECT_EQ(c.kc, 20);
  EXPECT_EQ(c.xb, 25);
  c = eval_chunks(1000000000, 1000000000000, 3);  // absurd sizes stay representable
  EXPECT_EQ(c.cap, 3000000000);
}

}  // namespace
}  // namespace elbo
