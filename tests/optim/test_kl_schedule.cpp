// The KL weight's schedules (linear warm-up, cyclical annealing) and the free-bits
// per-dimension weights, as pure functions.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "elbo/optim/kl.hpp"

namespace elbo {
namespace {

TEST(KlSchedule, LinearWarmupRampsToBeta) {
  LossSpec l;
  l.beta = 2.0;
  l.kl_warmup_steps = 4;
  EXPECT_DOUBLE_EQ(kl_weight(l, 0, 100), 0.5);
  EXPECT_DOUBLE_EQ(kl_weight(l, 3, 100), 2.0);
  EXPECT_DOUBLE_EQ(kl_weight(l, 100, 100), 2.0);
  l.kl_warmup_steps = 0;
  EXPECT_DOUBLE_EQ(kl_weight(l, 0, 100), 2.0);
}

TEST(KlSchedule, CyclicalRampsOverTheFirstRofEachCycleThenHoldsBeta) {
  LossSpec l;
  l.beta = 2.0;
  l.kl_schedule = KlSchedule::Cyclical;
  l.kl_cycles = 4;
  l.kl_ramp = 0.5;
  const int64_t T = 100;  // cycles of 25 steps; the ramp covers tau < 0.5, 12.5 steps
  for (int c = 0; c < 4; ++c) {
    const int64_t s0 = 25 * c;
    EXPECT_EQ(kl_weight(l, s0, T), 0.0) << "cycle " << c << " starts at 0";
    EXPECT_DOUBLE_EQ(kl_weight(l, s0 + 5, T), 2.0 * (5.0 / 25.0) / 0.5);  // tau = 0.2
    EXPECT_DOUBLE_EQ(kl_weight(l, s0 + 12, T), 2.0 * (12.0 / 25.0) / 0.5);  // tau = 0.48: still ramping
    EXPECT_EQ(kl_weight(l, s0 + 13, T), 2.0) << "tau = 0.52 > R: beta exactly";
    EXPECT_EQ(kl_weight(l, s0 + 24, T), 2.0) << "the cycle's last step";
    for (int64_t s = s0 + 1; s <= s0 + 12; ++s) EXPECT_GT(kl_weight(l, s, T), kl_weight(l, s - 1, T));
  }
  EXPECT_EQ(kl_weight(l, T - 1, T), 2.0);
  // The paper's tau = mod(t - 1, ceil(T/M)) / (T/M) when M does not divide T: T = 10,
  // M = 3 wraps every 4 steps with T/M = 10/3, so tau runs 0, 0.3, 0.6, 0.9.
  l.kl_cycles = 3;
  const double want[10] = {0, 0.3 / 0.5 * 2, 2, 2, 0, 0.3 / 0.5 * 2, 2, 2, 0, 0.3 / 0.5 * 2};
  for (int s = 0; s < 10; ++s) EXPECT_NEAR(kl_weight(l, s, 10), want[s], 1e-12) << "step " << s;
  // R = 1: the whole cycle ramps, beta is reached only in the limit.
  l.kl_cycles = 1;
  l.kl_ramp = 1.0;
  EXPECT_DOUBLE_EQ(kl_weight(l, 50, 100), 1.0);
  EXPECT_LT(kl_weight(l, 99, 100), 2.0);
  // A pure function of (step, total): the same value whenever it is asked (resume).
  EXPECT_EQ(kl_weight(l, 37, 100), kl_weight(l, 37, 100));
}

TEST(FreeBits, ClampsGroupsAtOrBelowTheirFloorAndWeighsTheRest) {
  LossSpec l;
  l.free_bits = 0.5;
  // Per-dimension KL sums over a global batch of 4 rows: means 0.25, 1.0, 0.5, 2.0, 0.1.
  const std::vector<double> sums = {1.0, 4.0, 2.0, 8.0, 0.4};
  const float active = 0.8f * (1.0f / 4.0f);
  FreeBits fb = free_bits(l, sums.data(), 5, 4);
  EXPECT_EQ(fb.weights(active), (std::vector<float>{0.0f, active, 0.0f, active, 0.0f}))
      << "0.5 is at the floor: clamped";
  EXPECT_EQ(fb.clamped_dims, 3);
  EXPECT_DOUBLE_EQ(fb.objective_kl, 0.5 + 1.0 + 0.5 + 2.0 + 0.5);
  // Groups of 2 (the last one short): means 1.25 vs floor 1, 2.5 vs 1, 0.1 vs 0.5.
  l.free_bits_group = 2;
  fb = free_bits(l, sums.data(), 5, 4);
  EXPECT_EQ(fb.weights(active), (std::vector<float>{active, active, active, active, 0.0f}));
  EXPECT_EQ(fb.clamped_dims, 1);
  EXPECT_DOUBLE_EQ(fb.objective_kl, 1.25 + 2.5 + 0.5);
  // One group of all five: mean 3.85 against a floor of 2.5.
  l.free_bits_group = 5;
  fb = free_bits(l, sums.data(), 5, 4);
  EXPECT_EQ(fb.clamped_dims, 0);
  EXPECT_DOUBLE_EQ(fb.objective_kl, 3.85);
}

// A hierarchical model's free-bits groups are its latent groups, each floored at
// free_bits times its elements; one weight per group, clamped_dims in elements.
TEST(FreeBits, HierarchicalGroupsFloorAtFreeBitsTimesTheirElements) {
  LossSpec l;
  l.free_bits = 0.25;
  // Global batch of 2 rows; group means 3.0, 1.0, 8.0 against floors 2.0, 2.0, 8.0.
  const std::vector<double> sums = {6.0, 2.0, 16.0};
  const std::vector<int> sizes = {8, 8, 32};
  const FreeBits fb = free_bits_groups(l, sums.data(), sizes, 2);
  EXPECT_EQ(fb.weights(0.5f), (std::vector<float>{0.5f, 0.0f, 0.0f})) << "8.0 is at its floor: clamped";
  EXPECT_EQ(fb.clamped_dims, 8 + 32);
  EXPECT_DOUBLE_EQ(fb.objective_kl, 3.0 + 2.0 + 8.0);
  l.free_bits = 0;
  EXPECT_EQ(free_bits_groups(l, sums.data(), sizes, 2).clamped_dims, 0);
}

TEST(FreeBits, PerDimensionKlSumsToTheClosedForm) {
  const int rows = 3, L = 2;
  const std::vector<float> mulv = {0.5f, -1.0f, -0.2f, 0.3f,  0.0f, 2.0f,
                                   1.0f, 0.1f,  0.0f, -1.5f, 0.4f, 0.0f};
  std::vector<double> sums(L, 0.0);
  add_kl_per_dim(rows, L, mulv.data(), sums.data());
  double want0 = 0, want1 = 0;
  for (int r = 0; r < rows; ++r) {
    auto kl = [](double m, double v) { return -0.5 * (1 + v - m * m - std::exp(v)); };
    want0 += kl(mulv[r * 4 + 0], mulv[r * 4 + 2]);
    want1 += kl(mulv[r * 4 + 1], mulv[r * 4 + 3]);
  }
  EXPECT_NEAR(sums[0], want0, 1e-12);
  EXPECT_NEAR(sums[1], want1, 1e-12);
  EXPECT_GT(sums[1], 0.5);  // the numbers are not trivially zero
}

}  // namespace
}  // namespace elbo
