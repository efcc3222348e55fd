// The parameters' moving average (optim.ema) as the replica computes it: Backend::axpby
// with a = 1 - d, b = d after each update, starting from the initial parameters.
// Checked on the CPU backend against the same recurrence written as a plain loop (bit
// for bit) and against its closed form in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"

namespace elbo {
namespace {

TEST(Ema, RecurrenceOnTheCpuBackendMatchesADirectLoopAndTheClosedForm) {
  CpuBackend<float> be(1);
  const size_t n = 1000;
  const int steps = 200;
  const double d = 0.99;
  std::mt19937 rng(5);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  // A parameter trajectory: p_0 (the initial parameters), then one per update.
  std::vector<std::vector<float>> p(steps + 1, std::vector<float>(n));
  for (size_t i = 0; i < n; ++i) p[0][i] = noise(rng);
  for (int t = 1; t <= steps; ++t)
    for (size_t i = 0; i < n; ++i) p[t][i] = p[t - 1][i] + 0.05f * noise(rng);

  Buffer<float> ema(be, n);
  be.upload(ema.data(), p[0].data(), n);  // as the replica starts it
  std::vector<float> loop = p[0];
  const float a = static_cast<float>(1.0 - d), b = static_cast<float>(d);
  for (int t = 1; t <= steps; ++t) {
    be.axpby(n, a, p[t].data(), b, ema.data());
    for (size_t i = 0; i < n; ++i) {
      const float kept = b * loop[i], added = a * p[t][i];  // each product rounded, then the sum
      loop[i] = added + kept;
    }
  }
  std::vector<float> got(n);
  be.download(got.data(), ema.data(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], loop[i]) << "element " << i;

  // ema_T = d^T p_0 + sum_{t=1..T} (1 - d) d^(T-t) p_t, in double.
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    double want = std::pow(d, steps) * p[0][i];
    for (int t = 1; t <= steps; ++t) want += (1 - d) * std::pow(d, steps - t) * p[t][i];
    worst = std::max(worst, std::abs(want - got[i]) / std::max(1.0, std::abs(want)));
  }
  EXPECT_LT(worst, 1e-5) << "float recurrence against the closed form";
  // The average lags the parameters: it is not simply the last one.
  double moved = 0;
  for (size_t i = 0; i < n; ++i) moved = std::max(moved, std::abs(double(got[i]) - p[steps][i]));
  EXPECT_GT(moved, 0.1);
}

TEST(Ema, AxpbyWritesOnlyY) {
  CpuBackend<double> be(1);
  std::vector<double> x = {1, 2, 3}, y = {10, 20, 30};
  be.axpby(3, 0.5, x.data(), 2.0, y.data());
  EXPECT_EQ(y, (std::vector<double>{20.5, 41, 61.5}));
  EXPECT_EQ(x, (std::vector<double>{1, 2, 3}));
}

}  // namespace
}  // namespace elbo
