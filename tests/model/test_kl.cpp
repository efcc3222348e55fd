// The closed-form KL(q(z|x) || N(0, I)) against a Monte Carlo estimate built from
// the same reparameterization and log-density ratio the IWAE bound uses.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"

namespace elbo {
namespace {

TEST(Kl, ClosedFormMatchesMonteCarlo) {
  CpuBackend<double> be;
  const int L = 3, S = 200000;
  const std::vector<double> mu = {0.5, -1.2, 0.0}, logvar = {-0.7, 0.3, 1.1};
  std::vector<double> mulv(static_cast<size_t>(S) * 2 * L);
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < L; ++j) {
      mulv[static_cast<size_t>(s) * 2 * L + j] = mu[j];
      mulv[static_cast<size_t>(s) * 2 * L + L + j] = logvar[j];
    }
  std::vector<double> eps(static_cast<size_t>(S) * L), z(eps.size()), kl(S), ratio(S);
  be.normal(99, RngStream::Eps, 0, 0, S, L, eps.data());
  be.posterior_forward(S, L, mulv.data(), eps.data(), z.data(), kl.data());
  be.posterior_log_ratio(S, L, mulv.data(), eps.data(), z.data(), ratio.data());
  double mean = 0, sq = 0;
  for (double r : ratio) {
    mean += r;
    sq += r * r;
  }
  mean /= S;
  double stderr_mc = std::sqrt((sq / S - mean * mean) / S);
  double closed = 0;
  for (int j = 0; j < L; ++j) closed += -0.5 * (1 + logvar[j] - mu[j] * mu[j] - std::exp(logvar[j]));
  EXPECT_NEAR(kl[0], closed, 1e-12);
  EXPECT_NEAR(mean, closed, 4 * stderr_mc) << "MC " << mean << " +- " << stderr_mc << " vs closed form " << closed;
  EXPECT_LT(stderr_mc, 0.01);  // the estimate is sharp enough for the check to mean something
}

TEST(Rng, NormalsHaveUnitMomentsAndDependOnlyOnTheirKey) {
  CpuBackend<double> be;
  const int rows = 5000, cols = 7;
  std::vector<double> a(rows * cols), b(3 * cols);
  be.normal(5, RngStream::Eps, 17, 0, rows, cols, a.data());
  double m = 0, v = 0;
  for (double x : a) m += x;
  m /= a.size();
  for (double x : a) v += (x - m) * (x - m);
  v /= a.size();
  EXPECT_NEAR(m, 0.0, 0.02);
  EXPECT_NEAR(v, 1.0, 0.03);
  // Rows 100..102 drawn on their own (as another rank would) equal the same rows drawn in bulk.
  be.normal(5, RngStream::Eps, 17, 100, 3, cols, b.data());
  for (int i = 0; i < 3 * cols; ++i) EXPECT_EQ(b[i], a[100 * cols + i]);
  // Float and double backends draw the same numbers (to float rounding).
  CpuBackend<float> bf;
  std::vector<float> f(3 * cols);
  bf.normal(5, RngStream::Eps, 17, 100, 3, cols, f.data());
  for (int i = 0; i < 3 * cols; ++i) EXPECT_FLOAT_EQ(f[i], static_cast<float>(b[i]));
  // Another step or stream gives other numbers.
  be.normal(5, RngStream::Eps, 18, 100, 3, cols, b.data());
  EXPECT_NE(b[0], a[100 * cols]);
}

}  // namespace
}  // namespace elbo
