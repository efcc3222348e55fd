// Every op's backward, and the whole VAE loss gradient, against central finite
// differences in double precision on the CPU backend.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/util/error.hpp"

namespace elbo {
namespace {

using Vec = std::vector<double>;

Vec random_vec(size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  Vec v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// Checks analytic gradient `g` of scalar f at `x` against central differences.
void expect_gradient(const std::function<double(const Vec&)>& f, Vec x, const Vec& g, const std::string& what,
                     double h = 1e-6, double tol = 1e-6) {
  ASSERT_EQ(x.size(), g.size());
  double max_err = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double keep = x[i];
    x[i] = keep + h;
    double fp = f(x);
    x[i] = keep - h;
    double fm = f(x);
    x[i] = keep;
    double fd = (fp - fm) / (2 * h);
    double err = std::abs(fd - g[i]) / std::max(1.0, std::abs(fd));
    max_err = std::max(max_err, err);
    EXPECT_LT(err, tol) << what << "[" << i << "]: finite difference " << fd << " vs analytic " << g[i];
  }
  ::testing::Test::RecordProperty(what + "_max_err", std::to_string(max_err));
}

class OpGrad : public ::testing::TestWithParam<Activation> {};

TEST_P(OpGrad, BiasActivationBackwardMatchesFiniteDifferences) {
  CpuBackend<double> be;
  std::mt19937_64 rng(7);
  const int rows = 4, cols = 5;
  Vec pre0 = random_vec(rows * cols, rng, -2, 2), bias = random_vec(cols, rng), wout = random_vec(rows * cols, rng);
  const Activation act = GetParam();
  // f = sum(wout * act(pre0 + bias)) as a function of pre0 and of bias.
  auto run = [&](const Vec& pre_in, const Vec& b) {
    Vec pre = pre_in, out(pre.size());
    be.bias_act_forward(act, rows, cols, b.data(), pre.data(), out.data());
    double f = 0;
    for (size_t i = 0; i < out.size(); ++i) f += wout[i] * out[i];
    return std::make_pair(f, std::make_pair(pre, out));
  };
  auto [f0, po] = run(pre0, bias);
  Vec dpre(pre0.size()), db(cols, 0.0);
  be.bias_act_backward(act, rows, cols, po.first.data(), po.second.data(), wout.data(), dpre.data(), db.data());
  expect_gradient([&](const Vec& p) { return run(p, bias).first; }, pre0, dpre, "dpre");
  expect_gradient([&](const Vec& b) { return run(pre0, b).first; }, bias, db, "dbias");
}

INSTANTIATE_TEST_SUITE_P(Activations, OpGrad,
                         ::testing::Values(Activation::Identity, Activation::Relu, Activation::Tanh,
                                           Activation::Softplus),
                         [](const auto& info) { return std::string(activation_name(info.param)); });

TEST(OpGrad, GemmBothTransposesMatchFiniteDifferences) {
  CpuBackend<double> be;
  std::mt19937_64 rng(11);
  const int m = 3, n = 4, k = 5;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Vec a = random_vec(m * k, rng), b = random_vec(k * n, rng), w = random_vec(m * n, rng);
      auto f = [&](const Vec& av, const Vec& bv) {
        Vec c(m * n, 0.0);
        be.gemm(ta, tb, m, n, k, 1.0, av.data(), ta ? m : k, bv.data(), tb ? k : n, 0.0, c.data(), n);
        double s = 0;
        for (int i = 0; i < m * n; ++i) s += w[i] * c[i];
        return s;
      };
      // dA = W op(B)^T (in op(A) coordinates); compute with gemm and map back.
      Vec da(m * k, 0.0), db(k * n, 0.0);
      if (!ta) be.gemm(false, !tb, m, k, n, 1.0, w.data(), n, b.data(), tb ? k : n, 0.0, da.data(), k);
      else be.gemm(tb, true, k, m, n, 1.0, b.data(), tb ? k : n, w.data(), n, 0.0, da.data(), m);
      if (!tb) be.gemm(!ta, false, k, n, m, 1.0, a.data(), ta ? m : k, w.data(), n, 0.0, db.data(), n);
      else be.gemm(true, ta, n, k, m, 1.0, w.data(), n, a.data(), ta ? m : k, 0.0, db.data(), k);
      std::string tag = std::string("gemm_") + (ta ? "T" : "N") + (tb ? "T" : "N");
      expect_gradient([&](const Vec& av) { return f(av, b); }, a, da, tag + "_dA");
      expect_gradient([&](const Vec& bv) { return f(a, bv); }, b, db, tag + "_dB");
    }
}

TEST(OpGrad, PosteriorBackwardMatchesFiniteDifferences) {
  CpuBackend<double> be;
  std::mt19937_64 rng(3);
  const int rows = 3, L = 4;
  Vec mulv = random_vec(rows * 2 * L, rng), eps = random_vec(rows * L, rng, -2, 2), wz = random_vec(rows * L, rng);
  const double klw = 0.7;
  auto f = [&](const Vec& m) {
    Vec z(rows * L), kl(rows);
    be.posterior_forward(rows, L, m.data(), eps.data(), z.data(), kl.data());
    double s = 0;
    for (int i = 0; i < rows * L; ++i) s += wz[i] * z[i];
    for (int r = 0; r < rows; ++r) s += klw * kl[r];
    return s;
  };
  Vec dm(mulv.size());
  be.posterior_backward(rows, L, mulv.data(), eps.data(), wz.data(), klw, dm.data());
  expect_gradient(f, mulv, dm, "dmulv");
}

class LikGrad : public ::testing::TestWithParam<Likelihood> {};

TEST_P(LikGrad, LikelihoodBackwardMatchesFiniteDifferences) {
  CpuBackend<double> be;
  std::mt19937_64 rng(5);
  const int rows = 3, dim = 6;
  const Likelihood lik = GetParam();
  const int width = lik == Likelihood::GaussianLearned ? 2 * dim : dim;
  Vec out = random_vec(rows * width, rng, -3, 3), x = random_vec(rows * dim, rng, 0, 1);
  const double sigma = 0.4, w = 1.3;
  auto f = [&](const Vec& o) {
    Vec nll(rows);
    be.likelihood_forward(lik, sigma, rows, dim, o.data(), x.data(), nll.data());
    double s = 0;
    for (double v : nll) s += w * v;
    return s;
  };
  Vec dout(out.size());
  be.likelihood_backward(lik, sigma, rows, dim, out.data(), x.data(), w, dout.data());
  expect_gradient(f, out, dout, "dout");
}

TEST(Likelihood, BernoulliIsBinaryCrossEntropyWithLogits) {
  CpuBackend<double> be;
  Vec logits = {-30.0, -1.0, 0.0, 2.0, 40.0}, x = {0.0, 0.25, 1.0, 0.5, 1.0}, nll(1);
  be.likelihood_forward(Likelihood::Bernoulli, 1.0, 1, 5, logits.data(), x.data(), nll.data());
  double want = 0;
  for (int i = 0; i < 5; ++i) {
    double p = 1.0 / (1.0 + std::exp(-logits[i]));
    // log(1-p) for logits 40 underflows in the naive form: use the stable identity.
    double log_p = -std::log1p(std::exp(-logits[i])), log_1mp = -logits[i] - std::log1p(std::exp(-logits[i]));
    (void)p;
    want -= x[i] * log_p + (1 - x[i]) * log_1mp;
  }
  EXPECT_NEAR(nll[0], want, 1e-9);
  EXPECT_TRUE(std::isfinite(nll[0]));
}

INSTANTIATE_TEST_SUITE_P(Likelihoods, LikGrad,
                         ::testing::Values(Likelihood::Bernoulli, Likelihood::GaussianFixed,
                                           Likelihood::GaussianLearned),
                         [](const auto& info) { return std::string(likelihood_name(info.param)); });

struct VaeCase {
  const char* name;
  std::vector<int> enc, dec;
  int latent;
  Activation act;
  Likelihood lik;
};

void PrintTo(const VaeCase& c, std::ostream* os) { *os << c.name; }

class VaeGrad : public ::testing::TestWithParam<VaeCase> {};

TEST_P(VaeGrad, WholeLossGradientMatchesFiniteDifferences) {
  const VaeCase& c = GetParam();
  ModelSpec ms;
  ms.encoder = c.enc;
  ms.decoder = c.dec;
  ms.latent = c.latent;
  ms.activation = c.act;
  ms.likelihood = c.lik;
  ms.sigma = 0.5;
  const int D = 7, rows = 4;
  VaeLayout layout(ms, D);
  CpuBackend<double> be;
  Vae<double> vae(layout, be, rows);
  std::mt19937_64 rng(13);
  Vec params = layout.init_params(42);
  // Shift the biases off zero so relu kinks are unlikely to sit at a probe point.
  for (auto& p : params) p += 0.05;
  Vec x = random_vec(rows * D, rng, 0, 1), eps = random_vec(rows * c.latent, rng, -1.5, 1.5);
  const double rw = 1.0 / rows, kw = 0.8 / rows;
  auto loss = [&](const Vec& p) {
    vae.forward(p.data(), x.data(), eps.data(), rows);
    double s = 0;
    for (int r = 0; r < rows; ++r) s += rw * vae.rec()[r] + kw * vae.kl()[r];
    return s;
  };
  loss(params);
  Vec grads(params.size(), 0.0);
  vae.backward(params.data(), grads.data(), x.data(), eps.data(), rows, rw, kw);
  expect_gradient(loss, params, grads, c.name, 1e-6, 2e-6);

  // Parameter gradients accumulate: a second backward (after a fresh forward at the
  // unperturbed point) doubles them.
  loss(params);
  Vec twice = grads;
  vae.backward(params.data(), twice.data(), x.data(), eps.data(), rows, rw, kw);
  for (size_t i = 0; i < grads.size(); ++i) EXPECT_NEAR(twice[i], 2 * grads[i], 1e-15 + 1e-12 * std::abs(grads[i]));
}

INSTANTIATE_TEST_SUITE_P(
    Models, VaeGrad,
    ::testing::Values(VaeCase{"bern_relu_2x2", {6, 5}, {5, 6}, 3, Activation::Relu, Likelihood::Bernoulli},
                      VaeCase{"gauss_fixed_tanh", {5}, {4}, 2, Activation::Tanh, Likelihood::GaussianFixed},
                      VaeCase{"gauss_learned_softplus", {5}, {6}, 3, Activation::Softplus,
                              Likelihood::GaussianLearned},
                      VaeCase{"no_hidden_layers", {}, {}, 2, Activation::Relu, Likelihood::Bernoulli}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(VaeLayout, NamesAndShapesFollowPyTorchLinear) {
  ModelSpec ms;
  ms.encoder = {400};
  ms.decoder = {400};
  ms.latent = 20;
  VaeLayout layout(ms, 784);
  EXPECT_EQ(layout.num_params(), size_t(784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784));
  EXPECT_EQ(layout.view("encoder.layers.0.weight").shape, (std::vector<int>{400, 784}));
  EXPECT_EQ(layout.view("encoder.mu.weight").shape, (std::vector<int>{20, 400}));
  EXPECT_EQ(layout.view("encoder.logvar.bias").shape, (std::vector<int>{20}));
  EXPECT_EQ(layout.view("decoder.out.weight").shape, (std::vector<int>{784, 400}));
  // mu and logvar share one contiguous (2L, H) block so the head is one GEMM.
  EXPECT_EQ(layout.view("encoder.logvar.weight").offset, layout.view("encoder.mu.weight").offset + 20 * 400);
  EXPECT_THROW(layout.view("decoder.logvar.weight"), Error);
}

TEST(VaeLayout, InitIsUniformWithinPyTorchBoundsAndSeeded) {
  ModelSpec ms;
  ms.encoder = {50};
  ms.decoder = {50};
  ms.latent = 4;
  VaeLayout layout(ms, 100);
  Vec a = layout.init_params(1), b = layout.init_params(1), c = layout.init_params(2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  const auto& w = layout.view("encoder.layers.0.weight");
  double bound = 1.0 / std::sqrt(100.0), maxabs = 0, mean = 0;
  for (size_t i = 0; i < w.numel(); ++i) {
    maxabs = std::max(maxabs, std::abs(a[w.offset + i]));
    mean += a[w.offset + i];
  }
  mean /= static_cast<double>(w.numel());
  EXPECT_LE(maxabs, bound);
  EXPECT_GT(maxabs, 0.95 * bound);
  EXPECT_NEAR(mean, 0.0, 0.01);
}

}  // namespace
}  // namespace elbo
