// Schedules and clipping; the Adam arithmetic itself is checked against
// torch.optim in the golden test.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/optim/adam.hpp"

namespace elbo {
namespace {

TEST(Schedule, WarmupThenCosineToMinLr) {
  OptimSpec o;
  o.lr = 1.0;
  o.min_lr = 0.1;
  o.warmup_steps = 10;
  o.schedule = LrSchedule::Cosine;
  EXPECT_DOUBLE_EQ(learning_rate(o, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(o, 9, 110), 1.0);
  EXPECT_NEAR(learning_rate(o, 10, 110), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(o, 109, 110), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(o, 10 + 99 / 2.0, 110), 0.55, 0.01);
  for (int s = 11; s < 110; ++s) EXPECT_LE(learning_rate(o, s, 110), learning_rate(o, s - 1, 110) + 1e-15);
  o.schedule = LrSchedule::Constant;
  EXPECT_DOUBLE_EQ(learning_rate(o, 50, 110), 1.0);
}

TEST(Schedule, KlWarmupRampsToBeta) {
  LossSpec l;
  l.beta = 2.0;
  l.kl_warmup_steps = 4;
  EXPECT_DOUBLE_EQ(kl_weight(l, 0), 0.5);
  EXPECT_DOUBLE_EQ(kl_weight(l, 3), 2.0);
  EXPECT_DOUBLE_EQ(kl_weight(l, 100), 2.0);
  l.kl_warmup_steps = 0;
  EXPECT_DOUBLE_EQ(kl_weight(l, 0), 2.0);
}

TEST(Adam, ClipsToGlobalNormAndReportsTheNormBeforeClipping) {
  CpuBackend<double> be;
  OptimSpec o;
  o.grad_clip = 1.0;
  o.lr = 0.1;
  Adam<double> opt(o, be, 2);
  std::vector<double> p = {0, 0}, g = {3, 4};
  double norm = opt.step(p.data(), g.data(), o.lr);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  EXPECT_NEAR(std::sqrt(g[0] * g[0] + g[1] * g[1]), 1.0, 1e-6);
  // First Adam step moves every coordinate by ~lr against the sign of its gradient.
  EXPECT_NEAR(p[0], -0.1, 1e-6);
  EXPECT_NEAR(p[1], -0.1, 1e-6);
}

TEST(Adam, AdamWDecaysWeightsWithoutGradient) {
  CpuBackend<double> be;
  OptimSpec o;
  o.type = OptimizerType::AdamW;
  o.lr = 0.1;
  o.weight_decay = 0.5;
  Adam<double> opt(o, be, 1);
  std::vector<double> p = {2.0}, g = {0.0};
  opt.step(p.data(), g.data(), o.lr);
  EXPECT_DOUBLE_EQ(p[0], 2.0 * (1 - 0.1 * 0.5));
}

}  // namespace
}  // namespace elbo
