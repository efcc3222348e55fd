// Helpers shared by the C++ tests: random inputs and the finite-difference check.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace elbo::test_util {

using Vec = std::vector<double>;

inline Vec random_vec(size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  Vec v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// Checks the analytic gradient `g` of the scalar f at `x` against central differences:
// |fd - g| / max(1, |fd|) < tol for every element.
inline void expect_gradient(const std::function<double(const Vec&)>& f, Vec x, const Vec& g, const std::string& what,
                            double h = 1e-6, double tol = 1e-6) {
  ASSERT_EQ(x.size(), g.size());
  double max_err = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double fp = f(x);
    x[i] = keep - h;
    const double fm = f(x);
    x[i] = keep;
    const double fd = (fp - fm) / (2 * h);
    const double err = std::abs(fd - g[i]) / std::max(1.0, std::abs(fd));
    max_err = std::max(max_err, err);
    EXPECT_LT(err, tol) << what << "[" << i << "]: finite difference " << fd << " vs analytic " << g[i];
  }
  ::testing::Test::RecordProperty(what + "_max_err", std::to_string(max_err));
}

}  // namespace elbo::test_util
