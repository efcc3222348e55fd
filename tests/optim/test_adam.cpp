// Schedules and clipping; the Adam arithmetic itself is checked against
// torch.optim in the golden test.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/dist/grad_sync.hpp"
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

// dist.shard_optimizer: three slices (plan_shards' partition of 3 ranks, simulated in
// one process) updated by their own Adam, clipping with the global norm that NormSum
// completes, give the whole-buffer Adam's parameters and moments, and each slice's
// NormSum receives exactly its own ranges' squared norm.
TEST(Adam, SlicesWithTheGlobalNormEqualTheWholeBuffer) {
  CpuBackend<float> be;
  OptimSpec o;
  o.lr = 0.01;
  o.grad_clip = 1.0;  // well below the gradient norm: clipping scales every slice
  const size_t n = 1009;
  const int N = 3;
  const ShardPlan plan = plan_shards(n, 100, N);
  std::vector<float> whole_p(n), g0(n);
  for (size_t i = 0; i < n; ++i) {
    whole_p[i] = std::sin(0.1f * static_cast<float>(i));
    g0[i] = std::cos(0.37f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 7));
  }
  std::vector<float> slice_p = whole_p;
  Adam<float> whole(o, be, n);
  std::vector<Adam<float>> slices;
  std::vector<double> seen(N, -1.0);
  double total = 0;  // the all-reduced squared norm: here, the whole buffer's own
  for (int r = 0; r < N; ++r)
    slices.emplace_back(o, be, n, plan.owned(r), [&seen, &total, r](double local) {
      seen[static_cast<size_t>(r)] = local;
      return total;
    });
  for (int step = 0; step < 4; ++step) {
    std::vector<float> g = g0, gs = g0;
    for (float& x : g) x *= static_cast<float>(step + 1);
    for (float& x : gs) x *= static_cast<float>(step + 1);
    total = be.sum_squares(n, g.data());
    const double norm = whole.step(whole_p.data(), g.data(), o.lr);
    ASSERT_GT(norm, o.grad_clip) << "the test must clip";
    for (int r = 0; r < N; ++r) {
      double mine = 0;
      for (const auto& range : plan.owned(r))
        for (size_t i = range.begin; i < range.end; ++i) mine += double(gs[i]) * gs[i];
      EXPECT_NEAR(slices[static_cast<size_t>(r)].step(slice_p.data(), gs.data(), o.lr), norm, 0.0)
          << "every slice reports the global norm";
      EXPECT_NEAR(seen[static_cast<size_t>(r)], mine, 1e-9 * mine) << "slice " << r << " sums its own ranges";
    }
    for (size_t i = 0; i < n; ++i)
      ASSERT_NEAR(slice_p[i], whole_p[i], 1e-6f * std::max(1.0f, std::fabs(whole_p[i])))
          << "parameter " << i << " after step " << step + 1;
  }
  // The moments, reassembled from the packed slices as a checkpoint does, and loaded back.
  std::vector<float> wm(n), wv(n), fm(n, -1.0f), fv(n, -1.0f);
  whole.download_moments(wm.data(), wv.data());
  for (int r = 0; r < N; ++r) {
    auto& a = slices[static_cast<size_t>(r)];
    EXPECT_EQ(a.owned_elems(), plan.owned_elems(r)) << "moments only for the slice";
    std::vector<float> m(a.owned_elems()), v(a.owned_elems());
    a.download_moments(m.data(), v.data());
    unpack_ranges(plan.owned(r), m.data(), fm.data());
    unpack_ranges(plan.owned(r), v.data(), fv.data());
  }
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(fm[i], wm[i], 1e-6f * std::max(1e-3f, std::fabs(wm[i]))) << "first moment " << i;
    ASSERT_NEAR(fv[i], wv[i], 1e-6f * std::max(1e-6f, std::fabs(wv[i]))) << "second moment " << i;
  }
  Adam<float> resumed(o, be, n, plan.owned(1), [](double s) { return s; });
  resumed.load_moments(wm.data(), wv.data());
  std::vector<float> m(resumed.owned_elems()), v(resumed.owned_elems()), want(resumed.owned_elems());
  resumed.download_moments(m.data(), v.data());
  pack_ranges(plan.owned(1), wm.data(), want.data());
  EXPECT_EQ(m, want) << "load_moments takes this slice's ranges of the flat moments";
}

TEST(Adam, OwnedRangesMustBeIncreasingAndInside) {
  CpuBackend<float> be;
  OptimSpec o;
  const auto sum = [](double s) { return s; };
  EXPECT_THROW(Adam<float>(o, be, 10, {{5, 8}, {2, 4}}, sum), Error);
  EXPECT_THROW(Adam<float>(o, be, 10, {{5, 12}}, sum), Error);
  EXPECT_NO_THROW(Adam<float>(o, be, 10, {{0, 2}, {5, 10}}, sum));
}

}  // namespace
}  // namespace elbo
