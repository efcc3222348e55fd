// The hierarchical model's ops on the CPU reference backend, in double precision:
// channel copies, average pooling and nearest unpooling (values, and backward against
// finite differences), and the softplus-scaled Gaussian groups: sampling, KL and the
// log-ratio against their textbook forms, the KL backward against finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "test_util.hpp"

namespace elbo {
namespace {

using test_util::expect_gradient;
using test_util::random_vec;
using test_util::Vec;

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double softplus(double x) { return std::log1p(std::exp(x)); }

TEST(HierOps, ChannelCopyConcatenatesSplitsAndAccumulates) {
  CpuBackend<double> be;
  std::mt19937_64 rng(1);
  const int n = 2, hw = 3, ca = 2, cb = 3;
  const Vec a = random_vec(n * ca * hw, rng), b = random_vec(n * cb * hw, rng);
  Vec cat(n * (ca + cb) * hw, 0.0);
  be.channel_copy(n, hw, ca, a.data(), ca, 0, cat.data(), ca + cb, 0, false);
  be.channel_copy(n, hw, cb, b.data(), cb, 0, cat.data(), ca + cb, ca, false);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < ca + cb; ++c)
      for (int p = 0; p < hw; ++p) {
        const double want = c < ca ? a[(r * ca + c) * hw + p] : b[(r * cb + c - ca) * hw + p];
        EXPECT_EQ(cat[(r * (ca + cb) + c) * hw + p], want) << r << " " << c << " " << p;
      }
  // Split the second part back out, added onto b: 2 b.
  Vec twice = b;
  be.channel_copy(n, hw, cb, cat.data(), ca + cb, ca, twice.data(), cb, 0, true);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(twice[i], 2 * b[i]);
}

TEST(HierOps, AvgPoolValuesAndBackward) {
  CpuBackend<double> be;
  std::mt19937_64 rng(2);
  const int n = 2, c = 3, h = 6, w = 4, f = 2, oh = 3, ow = 2;
  Vec x = random_vec(n * c * h * w, rng);
  Vec y(n * c * oh * ow);
  be.avg_pool_forward(n, c, h, w, f, x.data(), y.data());
  // Plane 4 (sample 1, channel 1), output (2, 1): the mean of rows 4-5, columns 2-3.
  const double* xp = x.data() + 4 * h * w;
  EXPECT_NEAR(y[4 * oh * ow + 2 * ow + 1], (xp[4 * w + 2] + xp[4 * w + 3] + xp[5 * w + 2] + xp[5 * w + 3]) / 4, 1e-15);
  const Vec g = random_vec(y.size(), rng);
  Vec dx(x.size());
  be.avg_pool_backward(n, c, h, w, f, g.data(), dx.data());
  expect_gradient(
      [&](const Vec& v) {
        Vec out(y.size());
        be.avg_pool_forward(n, c, h, w, f, v.data(), out.data());
        return dot(out, g);
      },
      x, dx, "avg_pool dx");
}

TEST(HierOps, UnpoolValuesAndBackward) {
  CpuBackend<double> be;
  std::mt19937_64 rng(3);
  const int n = 2, c = 2, h = 2, w = 3, f = 3, oh = 6, ow = 9;
  Vec x = random_vec(n * c * h * w, rng);
  Vec y(n * c * oh * ow);
  be.unpool_forward(n, c, h, w, f, x.data(), y.data());
  for (int i = 0; i < oh; ++i)
    for (int j = 0; j < ow; ++j) EXPECT_EQ(y[3 * oh * ow + i * ow + j], x[3 * h * w + (i / 3) * w + j / 3]);
  const Vec g = random_vec(y.size(), rng);
  Vec dx(x.size());
  be.unpool_backward(n, c, h, w, f, g.data(), dx.data());
  expect_gradient(
      [&](const Vec& v) {
        Vec out(y.size());
        be.unpool_forward(n, c, h, w, f, v.data(), out.data());
        return dot(out, g);
      },
      x, dx, "unpool dx");
}

// A group of zc = 2 channels over hw = 3 positions, q and p inside wider rows (q: 2
// extra values per sample, p: the prior block's extra feature channels), eps rows
// wider than the group: the strides the model uses.
struct Group {
  int n = 3, zc = 2, hw = 3;
  size_t len() const { return size_t(zc) * hw; }
  size_t q_stride() const { return 2 * len() + 2; }
  size_t p_stride() const { return 2 * len() + 5; }
  size_t eps_stride() const { return len() + 4; }
};

TEST(HierOps, GaussianSampleKlAndLogRatioMatchTheirDefinitions) {
  CpuBackend<double> be;
  std::mt19937_64 rng(4);
  const Group G;
  const Vec q = random_vec(G.n * G.q_stride(), rng, -1.5, 1.5), p = random_vec(G.n * G.p_stride(), rng, -1.5, 1.5);
  const Vec eps = random_vec(G.n * G.eps_stride(), rng, -2, 2);
  Vec z(G.n * G.len());
  be.gaussian_sample(G.n, G.zc, G.hw, q.data(), G.q_stride(), eps.data(), G.eps_stride(), z.data());
  Vec kl(2 * G.n, -7.0), ratio(2 * G.n, -7.0);  // out_stride 2: column 1 of (n, 2)
  be.gaussian_kl_forward(G.n, G.zc, G.hw, q.data(), G.q_stride(), p.data(), G.p_stride(), eps.data(), G.eps_stride(),
                         kl.data() + 1, ratio.data() + 1, 2);
  const double kHalfLog2Pi = 0.5 * std::log(2 * M_PI);
  for (int r = 0; r < G.n; ++r) {
    double want_kl = 0, log_q = 0, log_p = 0;
    for (size_t i = 0; i < G.len(); ++i) {
      const double mq = q[r * G.q_stride() + i], sq = softplus(q[r * G.q_stride() + G.len() + i]);
      const double mp = p[r * G.p_stride() + i], sp = softplus(p[r * G.p_stride() + G.len() + i]);
      const double zi = mq + sq * eps[r * G.eps_stride() + i];
      EXPECT_NEAR(z[r * G.len() + i], zi, 1e-14);
      // KL of two Gaussians in terms of variances: (log(vp/vq) + (vq + (mq-mp)^2)/vp - 1) / 2.
      const double vq = sq * sq, vp = sp * sp;
      want_kl += 0.5 * (std::log(vp / vq) + (vq + (mq - mp) * (mq - mp)) / vp - 1);
      log_q += -std::log(sq) - kHalfLog2Pi - 0.5 * (zi - mq) * (zi - mq) / vq;
      log_p += -std::log(sp) - kHalfLog2Pi - 0.5 * (zi - mp) * (zi - mp) / vp;
    }
    EXPECT_NEAR(kl[2 * r + 1], want_kl, 1e-12);
    EXPECT_NEAR(ratio[2 * r + 1], log_q - log_p, 1e-12);
    EXPECT_EQ(kl[2 * r], -7.0);  // the other column is left alone
    EXPECT_GT(kl[2 * r + 1], 0.0);
  }
  // KL(q || q) = 0 and the log-ratio vanishes too.
  Vec same(G.n * G.p_stride());
  for (int r = 0; r < G.n; ++r)
    for (size_t i = 0; i < 2 * G.len(); ++i) same[r * G.p_stride() + i] = q[r * G.q_stride() + i];
  be.gaussian_kl_forward(G.n, G.zc, G.hw, q.data(), G.q_stride(), same.data(), G.p_stride(), eps.data(),
                         G.eps_stride(), kl.data(), ratio.data(), 1);
  for (int r = 0; r < G.n; ++r) {
    EXPECT_NEAR(kl[r], 0.0, 1e-13);
    EXPECT_NEAR(ratio[r], 0.0, 1e-13);
  }
}

TEST(HierOps, GaussianKlBackwardAgainstFiniteDifferences) {
  CpuBackend<double> be;
  std::mt19937_64 rng(5);
  const Group G;
  const Vec q = random_vec(G.n * G.q_stride(), rng, -1.5, 1.5), p = random_vec(G.n * G.p_stride(), rng, -1.5, 1.5);
  const Vec eps = random_vec(G.n * G.eps_stride(), rng, -2, 2);
  const Vec dz = random_vec(G.n * G.len(), rng);
  const double weight = 0.7;
  // f = weight * sum_r KL_r + sum dz . z: what the backward differentiates.
  auto f = [&](const Vec& qv, const Vec& pv) {
    Vec z(G.n * G.len()), kl(G.n), ratio(G.n);
    be.gaussian_sample(G.n, G.zc, G.hw, qv.data(), G.q_stride(), eps.data(), G.eps_stride(), z.data());
    be.gaussian_kl_forward(G.n, G.zc, G.hw, qv.data(), G.q_stride(), pv.data(), G.p_stride(), eps.data(),
                           G.eps_stride(), kl.data(), ratio.data(), 1);
    double s = dot(z, dz);
    for (double k : kl) s += weight * k;
    return s;
  };
  Vec dq(q.size(), 9.0), dp(p.size(), 9.0);  // 9: what the op must not touch
  be.gaussian_kl_backward(G.n, G.zc, G.hw, q.data(), G.q_stride(), p.data(), G.p_stride(), eps.data(), G.eps_stride(),
                          dz.data(), &weight, dq.data(), dp.data());
  for (int r = 0; r < G.n; ++r) {
    for (size_t i = 2 * G.len(); i < G.q_stride(); ++i) EXPECT_EQ(dq[r * G.q_stride() + i], 9.0);
    for (size_t i = 2 * G.len(); i < G.p_stride(); ++i) EXPECT_EQ(dp[r * G.p_stride() + i], 9.0);
  }
  // The values outside the groups do not enter f: their "gradient" is 0 for the check.
  for (int r = 0; r < G.n; ++r) {
    for (size_t i = 2 * G.len(); i < G.q_stride(); ++i) dq[r * G.q_stride() + i] = 0;
    for (size_t i = 2 * G.len(); i < G.p_stride(); ++i) dp[r * G.p_stride() + i] = 0;
  }
  expect_gradient([&](const Vec& v) { return f(v, p); }, q, dq, "gaussian_kl dq");
  expect_gradient([&](const Vec& v) { return f(q, v); }, p, dp, "gaussian_kl dp");
}

TEST(HierOps, LogSoftplusStaysFiniteForVeryNegativeScales) {
  CpuBackend<double> be;
  const Vec q = {0.0, -700.0}, p = {0.0, -700.0}, eps = {0.5};
  Vec kl(1), ratio(1);
  be.gaussian_kl_forward(1, 1, 1, q.data(), 2, p.data(), 2, eps.data(), 1, kl.data(), ratio.data(), 1);
  EXPECT_TRUE(std::isfinite(kl[0])) << kl[0];
  EXPECT_NEAR(kl[0], 0.0, 1e-12);
}

}  // namespace
}  // namespace elbo
