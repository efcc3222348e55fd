// Every op's backward, and the whole VAE loss gradient, against central finite
// differences in double precision on the CPU backend.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <algorithm>
#include <random>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/optim/kl.hpp"
#include "elbo/util/error.hpp"
#include "test_util.hpp"

namespace elbo {
namespace {

using test_util::expect_gradient;
using test_util::random_vec;
using test_util::Vec;

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
                         [](const auto& info) { return std::string(choice_name(info.param)); });

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
  // One weight for every dimension: the KL term is the forward pass's per-row kl.
  const Vec same(L, 0.7);
  auto f = [&](const Vec& m) {
    Vec z(rows * L), kl(rows);
    be.posterior_forward(rows, L, m.data(), eps.data(), z.data(), kl.data());
    double s = 0;
    for (int i = 0; i < rows * L; ++i) s += wz[i] * z[i];
    for (int r = 0; r < rows; ++r) s += same[0] * kl[r];
    return s;
  };
  Vec dm(mulv.size());
  be.posterior_backward(rows, L, mulv.data(), eps.data(), wz.data(), same.data(), dm.data());
  expect_gradient(f, mulv, dm, "dmulv");

  // One weight per dimension (free bits: 0 for a clamped one): sum_rj w_j KL_rj.
  const Vec per_dim = {0.7, 0.0, 1.9, 0.3};
  auto g = [&](const Vec& m) {
    Vec z(rows * L), kl(rows);
    be.posterior_forward(rows, L, m.data(), eps.data(), z.data(), kl.data());
    double s = 0;
    for (int i = 0; i < rows * L; ++i) s += wz[i] * z[i];
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < L; ++j) {
        const double mu = m[r * 2 * L + j], lv = m[r * 2 * L + L + j];
        s += per_dim[j] * -0.5 * (1 + lv - mu * mu - std::exp(lv));
      }
    return s;
  };
  be.posterior_backward(rows, L, mulv.data(), eps.data(), wz.data(), per_dim.data(), dm.data());
  expect_gradient(g, mulv, dm, "dmulv_per_dim");
  // A zero weight leaves only the reparameterization path in that dimension.
  for (int r = 0; r < rows; ++r)
    EXPECT_DOUBLE_EQ(dm[r * 2 * L + 1], wz[r * L + 1]) << "row " << r << ": dmu of the unweighted dimension";
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
                         [](const auto& info) { return std::string(choice_name(info.param)); });

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

// A convolutional VAE with every layer kind: conv2d (stride 2, padding), group_norm,
// fused and stand-alone activations, flatten, linear, reshape, conv_transpose2d with
// output_padding, and a conv2d output layer.
const char* kConvModel = R"(
data: {train: unused}
model:
  type: conv
  latent: 3
  encoder:
    - {type: conv2d, channels: 4, kernel: 3, stride: 2, padding: 1}
    - {type: group_norm, groups: 2}
    - relu
    - {type: conv2d, channels: 4, kernel: 2, stride: 1, padding: 0}
    - tanh
    - flatten
    - {type: linear, features: 6}
    - softplus
  decoder:
    - {type: linear, features: 16}
    - relu
    - {type: reshape, shape: [4, 2, 2]}
    - {type: conv_transpose2d, channels: 3, kernel: 3, stride: 2, padding: 1, output_padding: 1}
    - {type: group_norm, groups: 3}
    - softplus
    - {type: conv2d, channels: CH, kernel: 3, stride: 1, padding: 1}
)";

class ConvVaeGrad : public ::testing::TestWithParam<Likelihood> {};

TEST_P(ConvVaeGrad, WholeLossGradientMatchesFiniteDifferences) {
  const Likelihood lik = GetParam();
  std::string yaml = kConvModel;
  yaml.replace(yaml.find("CH"), 2, lik == Likelihood::GaussianLearned ? "4" : "2");
  yaml += lik == Likelihood::Bernoulli ? "  likelihood: bernoulli\n"
          : lik == Likelihood::GaussianFixed ? "  likelihood: {type: gaussian, sigma: 0.7}\n"
                                             : "  likelihood: {type: gaussian, variance: learned}\n";
  const ExperimentSpec spec = parse_spec(yaml, "conv test spec");
  const VaeLayout layout(spec.model, std::vector<int>{2, 4, 4});
  EXPECT_EQ(layout.decoder().back().out, (TensorShape{lik == Likelihood::GaussianLearned ? 4 : 2, 4, 4}));
  const int rows = 3, D = layout.input_dim(), L = layout.latent();
  CpuBackend<double> be;
  Vae<double> vae(layout, be, rows);
  std::mt19937_64 rng(17);
  Vec params = layout.init_params(5);
  for (auto& p : params) p += 0.03;  // off zero: relu kinks away from the probes, gamma != 1
  Vec x = random_vec(static_cast<size_t>(rows) * D, rng, 0, 1), eps = random_vec(rows * L, rng, -1.5, 1.5);
  const double rw = 1.0 / rows, kw = 0.6 / rows;
  auto loss = [&](const Vec& p) {
    vae.forward(p.data(), x.data(), eps.data(), rows);
    double s = 0;
    for (int r = 0; r < rows; ++r) s += rw * vae.rec()[r] + kw * vae.kl()[r];
    return s;
  };
  loss(params);
  Vec grads(params.size(), 0.0);
  std::vector<size_t> ready;
  vae.backward(params.data(), grads.data(), x.data(), eps.data(), rows, rw, kw,
               [&](size_t offset) { ready.push_back(offset); });
  expect_gradient(loss, params, grads, "conv_vae", 1e-6, 5e-6);
  // Every layer with parameters reports, from the end of the buffer to its start.
  ASSERT_EQ(ready.size(), layout.encoder().size() + layout.decoder().size());
  EXPECT_TRUE(std::is_sorted(ready.rbegin(), ready.rend()));
  EXPECT_EQ(ready.back(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Likelihoods, ConvVaeGrad,
                         ::testing::Values(Likelihood::Bernoulli, Likelihood::GaussianFixed,
                                           Likelihood::GaussianLearned));

// loss.type: iwae. The importance-weighted bound is a deterministic function of the
// parameters once eps is fixed, so its reparameterized gradient has a finite-difference
// check like the ELBO's; DReG changes only the encoder's estimator (tested against
// PyTorch in test_golden.cpp), so here its decoder gradient must equal IWAE's exactly.
struct IwCase {
  const char* name;
  bool conv;
  Likelihood lik;
  int k;
  double beta;
};

void PrintTo(const IwCase& c, std::ostream* os) { *os << c.name; }

class IwaeGrad : public ::testing::TestWithParam<IwCase> {};

TEST_P(IwaeGrad, BoundGradientMatchesFiniteDifferences) {
  const IwCase& c = GetParam();
  ExperimentSpec spec;
  std::unique_ptr<VaeLayout> layout;
  if (c.conv) {
    std::string yaml = kConvModel;
    yaml.replace(yaml.find("CH"), 2, c.lik == Likelihood::GaussianLearned ? "4" : "2");
    yaml += c.lik == Likelihood::GaussianLearned ? "  likelihood: {type: gaussian, variance: learned}\n"
                                                 : "  likelihood: bernoulli\n";
    spec = parse_spec(yaml, "conv test spec");
    layout = std::make_unique<VaeLayout>(spec.model, std::vector<int>{2, 4, 4});
  } else {
    spec.model.encoder = {6};
    spec.model.decoder = {5};
    spec.model.latent = 3;
    spec.model.activation = Activation::Tanh;
    spec.model.likelihood = c.lik;
    spec.model.sigma = 0.6;
    layout = std::make_unique<VaeLayout>(spec.model, 7);
  }
  const int rows = 3, k = c.k, D = layout->input_dim(), L = layout->latent();
  CpuBackend<double> be;
  Vae<double> vae(*layout, be, rows, k);
  std::mt19937_64 rng(29);
  Vec params = layout->init_params(8);
  for (auto& p : params) p += 0.04;
  Vec x = random_vec(static_cast<size_t>(rows) * D, rng, 0, 1);
  Vec eps = random_vec(static_cast<size_t>(rows) * k * L, rng, -1.5, 1.5);
  const double rw = 1.0 / rows;
  auto bound = [&](const Vec& p) {
    vae.forward_iw(p.data(), x.data(), eps.data(), rows, c.beta);
    double s = 0;
    for (int r = 0; r < rows; ++r) s += rw * vae.iw_bound()[r];
    return s;
  };
  bound(params);
  // The bound from its definition: log w = -(nll + beta (log q - log p)) per sample.
  for (int r = 0; r < rows; ++r) {
    std::vector<double> logw(k);
    const double* mu = vae.mulv() + static_cast<size_t>(r) * 2 * L;
    for (int i = 0; i < k; ++i) {
      const double* e = eps.data() + (static_cast<size_t>(r) * k + i) * L;
      double ratio = 0;
      for (int j = 0; j < L; ++j) {
        const double z = mu[j] + std::exp(0.5 * mu[L + j]) * e[j];
        EXPECT_NEAR(vae.z()[(static_cast<size_t>(r) * k + i) * L + j], z, 1e-12);
        ratio += 0.5 * (z * z - e[j] * e[j] - mu[L + j]);
      }
      logw[i] = -(vae.rec()[static_cast<size_t>(r) * k + i] + c.beta * ratio);
    }
    const double top = *std::max_element(logw.begin(), logw.end());
    double sum = 0, mean_rec = 0;
    for (int i = 0; i < k; ++i) {
      sum += std::exp(logw[i] - top);
      mean_rec += vae.rec()[static_cast<size_t>(r) * k + i] / k;
    }
    EXPECT_NEAR(vae.iw_bound()[r], -(top + std::log(sum / k)), 1e-10) << "row " << r;
    EXPECT_NEAR(vae.iw_rec()[r], mean_rec, 1e-10) << "row " << r;
  }
  Vec grads(params.size(), 0.0);
  std::vector<size_t> ready;
  vae.backward_iw(params.data(), grads.data(), x.data(), eps.data(), rows, rw, c.beta, false,
                  [&](size_t offset) { ready.push_back(offset); });
  expect_gradient(bound, params, grads, c.name, 1e-6, 5e-6);
  ASSERT_EQ(ready.size(), layout->encoder().size() + layout->decoder().size());
  EXPECT_TRUE(std::is_sorted(ready.rbegin(), ready.rend()));

  // DReG: the same decoder gradient, a different encoder estimate.
  bound(params);
  Vec dreg(params.size(), 0.0);
  vae.backward_iw(params.data(), dreg.data(), x.data(), eps.data(), rows, rw, c.beta, true);
  const size_t dec_begin = layout->decoder().front().w;
  double enc_diff = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (i >= dec_begin)
      EXPECT_NEAR(dreg[i], grads[i], 1e-12 * (1 + std::abs(grads[i]))) << "decoder parameter " << i;
    else
      enc_diff = std::max(enc_diff, std::abs(dreg[i] - grads[i]));
  }
  if (k > 1) EXPECT_GT(enc_diff, 1e-6) << "DReG's encoder gradient should differ from IWAE's for k > 1";
}

INSTANTIATE_TEST_SUITE_P(
    Bounds, IwaeGrad,
    ::testing::Values(IwCase{"mlp_bern_k4", false, Likelihood::Bernoulli, 4, 1.0},
                      IwCase{"mlp_gauss_fixed_k3_beta", false, Likelihood::GaussianFixed, 3, 0.4},
                      IwCase{"mlp_gauss_learned_k1", false, Likelihood::GaussianLearned, 1, 1.0},
                      IwCase{"conv_bern_k3", true, Likelihood::Bernoulli, 3, 1.0},
                      IwCase{"conv_gauss_learned_k2_beta", true, Likelihood::GaussianLearned, 2, 0.7}),
    [](const auto& info) { return std::string(info.param.name); });

// k = 1: the bound is the one-sample ELBO with the Monte-Carlo KL (log q - log p at the
// sample), and its reparameterized gradient in expectation the ELBO's; with the same eps
// the decoder's gradient equals the ELBO pass's exactly (the KL term does not reach it).
TEST(IwaeGrad, OneSampleIsTheMonteCarloElbo) {
  ModelSpec ms;
  ms.encoder = {5};
  ms.decoder = {6};
  ms.latent = 2;
  const int rows = 4, D = 6;
  VaeLayout layout(ms, D);
  CpuBackend<double> be;
  Vae<double> iw(layout, be, rows, 1), el(layout, be, rows);
  std::mt19937_64 rng(3);
  Vec params = layout.init_params(2);
  Vec x = random_vec(rows * D, rng, 0, 1), eps = random_vec(rows * 2, rng, -1.5, 1.5);
  iw.forward_iw(params.data(), x.data(), eps.data(), rows, 1.0);
  el.forward(params.data(), x.data(), eps.data(), rows);
  Vec ratio(rows);
  be.posterior_log_ratio(rows, 2, el.mulv(), eps.data(), el.z(), ratio.data());
  for (int r = 0; r < rows; ++r) {
    EXPECT_NEAR(iw.iw_bound()[r], el.rec()[r] + ratio[r], 1e-12);
    EXPECT_NEAR(iw.kl()[r], el.kl()[r], 1e-12);
  }
  Vec gi(params.size(), 0.0), ge(params.size(), 0.0);
  iw.backward_iw(params.data(), gi.data(), x.data(), eps.data(), rows, 0.25, 1.0, false);
  el.backward(params.data(), ge.data(), x.data(), eps.data(), rows, 0.25, 0.25);
  for (size_t i = layout.decoder().front().w; i < params.size(); ++i) EXPECT_NEAR(gi[i], ge[i], 1e-12);
}

TEST(ConvLayout, ShapeErrorsNameTheLayer) {
  auto layout_error = [](const std::string& model, std::vector<int> shape) -> std::string {
    try {
      VaeLayout layout(parse_spec(model, "spec.yaml").model, shape);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  const std::string head = "data: {train: unused}\nmodel:\n  type: conv\n  latent: 2\n";
  EXPECT_THAT(layout_error(head + "  encoder: [{type: conv2d, channels: 4, kernel: 9}]\n"
                                  "  decoder: [{type: linear, features: 16}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.encoder[0] (conv2d): kernel 9 is larger than the padded input [1, 4, 4]"));
  EXPECT_THAT(layout_error(head + "  encoder: [relu]\n  decoder: [{type: linear, features: 16}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.encoder[0] (relu): an activation must follow"));
  EXPECT_THAT(layout_error(head + "  encoder: [{type: conv2d, channels: 3, kernel: 3}, {type: group_norm, groups: 2}]\n"
                                  "  decoder: [{type: linear, features: 16}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.encoder[1] (group_norm): 3 channels do not divide into 2 groups"));
  EXPECT_THAT(layout_error(head + "  encoder: [flatten]\n  decoder: [{type: linear, features: 8}, "
                                  "{type: conv_transpose2d, channels: 1, kernel: 2}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.decoder[1] (conv_transpose2d): needs an image input"));
  EXPECT_THAT(layout_error(head + "  encoder: [flatten]\n  decoder: [{type: linear, features: 8}, "
                                  "{type: reshape, shape: [2, 2, 3]}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.decoder[1] (reshape): cannot reshape [8, 1, 1] (8 values) to [2, 2, 3] (12)"));
  EXPECT_THAT(layout_error(head + "  encoder: [flatten]\n  decoder: [{type: linear, features: 15}]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.decoder: the last layer produces [15, 1, 1] per sample but the bernoulli "
                                   "likelihood of [1, 4, 4] data needs [1, 4, 4]"));
  EXPECT_THAT(layout_error(head + "  encoder: [flatten]\n  decoder: [{type: linear, features: 16}, relu]\n", {1, 4, 4}),
              ::testing::HasSubstr("the last layer must have no activation"));
  // The spec parser catches what needs no shapes, naming the entry's key.
  EXPECT_THAT(layout_error(head + "  encoder: [{type: conv3d, channels: 2}]\n  decoder: [relu]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.encoder[0].type: unknown layer 'conv3d'"));
  EXPECT_THAT(layout_error(head + "  encoder: [{type: conv2d, kernel: 3}]\n  decoder: [relu]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.encoder[0].channels: is required"));
  EXPECT_THAT(layout_error(head + "  activation: relu\n  encoder: [flatten]\n  decoder: [relu]\n", {1, 4, 4}),
              ::testing::HasSubstr("model.activation: conv models take activations as entries"));
}

TEST(ConvLayout, NamesAndShapesFollowPyTorchSequential) {
  const ExperimentSpec spec = parse_spec(std::string(R"(
data: {train: unused}
model:
  type: conv
  latent: 8
  encoder: [{type: conv2d, channels: 16, kernel: 4, stride: 2, padding: 1}, relu, {type: group_norm, groups: 4}, flatten]
  decoder: [{type: linear, features: 784}, relu, {type: reshape, shape: [16, 7, 7]},
            {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]
)"), "spec.yaml");
  const VaeLayout layout(spec.model, std::vector<int>{1, 14, 14});
  EXPECT_EQ(layout.view("encoder.layers.0.weight").shape, (std::vector<int>{16, 1, 4, 4}));
  EXPECT_EQ(layout.view("encoder.layers.2.weight").shape, (std::vector<int>{16}));  // GroupNorm gamma
  EXPECT_EQ(layout.view("encoder.mu.weight").shape, (std::vector<int>{8, 16 * 7 * 7}));
  EXPECT_EQ(layout.view("decoder.layers.3.weight").shape, (std::vector<int>{16, 1, 4, 4}));  // (in, out, k, k)
  EXPECT_EQ(layout.decoder().back().out, (TensorShape{1, 14, 14}));
  const Vec p = layout.init_params(3);
  const auto& gamma = layout.view("encoder.layers.2.weight");
  const auto& beta = layout.view("encoder.layers.2.bias");
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(p[gamma.offset + i], 1.0);
    EXPECT_EQ(p[beta.offset + i], 0.0);
  }
  // ConvTranspose2d's bound uses fan_in = weight.size(1) * k * k = 1 * 16, as PyTorch computes it.
  const auto& wt = layout.view("decoder.layers.3.weight");
  double maxabs = 0;
  for (size_t i = 0; i < wt.numel(); ++i) maxabs = std::max(maxabs, std::abs(p[wt.offset + i]));
  EXPECT_LE(maxabs, 0.25);
  EXPECT_GT(maxabs, 0.2);
}

TEST(VaeLayout, NamesAndShapesFollowPyTorchLinear) {
  ModelSpec ms;
  ms.encoder = {400};
  ms.decoder = {400};
  ms.latent = 20;
  VaeLayout layout(ms, 784);
  EXPECT_EQ(layout.num_values(), size_t(784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784));
  // Every view starts on a 64-byte boundary of the flat buffer, except logvar, which
  // shares one matrix with mu; the buffer holds them all.
  for (const auto& v : layout.views()) {
    if (v.name.rfind("encoder.logvar", 0) != 0) EXPECT_EQ(v.offset % VaeLayout::kParamAlign, 0u) << v.name;
    EXPECT_LE(v.offset + v.numel(), layout.num_params()) << v.name;
  }
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


// Free bits: the step's objective is mean_r rec_r + beta * sum_g max(lambda |g|, KLbar_g),
// KLbar_g the batch-mean KL of group g. Its gradient through Vae::backward with the
// per-dimension weights of free_bits() against finite differences of that objective,
// for floors below every group, just above one group's mean (clamped, at the floor),
// just below it (active, at the floor), and above every group.
TEST(FreeBitsGrad, ObjectiveGradientMatchesFiniteDifferences) {
  ModelSpec ms;
  ms.encoder = {6};
  ms.decoder = {5};
  ms.latent = 6;
  ms.activation = Activation::Tanh;
  ms.likelihood = Likelihood::Bernoulli;
  const int D = 7, rows = 4, L = 6;
  VaeLayout layout(ms, D);
  CpuBackend<double> be;
  Vae<double> vae(layout, be, rows);
  std::mt19937_64 rng(29);
  Vec params = layout.init_params(8);
  for (auto& p : params) p += 0.05;
  Vec x = random_vec(rows * D, rng, 0, 1), eps = random_vec(rows * L, rng, -1.5, 1.5);
  const double beta = 0.8;
  LossSpec l;
  l.free_bits_group = 2;
  auto kl_sums = [&](const Vec& p) {
    vae.forward(p.data(), x.data(), eps.data(), rows);
    Vec sums(L, 0.0);
    add_kl_per_dim(rows, L, vae.mulv(), sums.data());
    return sums;
  };
  auto objective = [&](const Vec& p) {
    const Vec sums = kl_sums(p);  // runs the forward pass
    double rec = 0;
    for (int r = 0; r < rows; ++r) rec += vae.rec()[r];
    return rec / rows + beta * free_bits(l, sums.data(), L, rows).objective_kl;
  };
  // The groups' per-dimension mean KL at the probe point, to put floors around.
  const Vec sums0 = kl_sums(params);
  std::vector<double> group_mean;
  for (int g = 0; g < L; g += 2) group_mean.push_back((sums0[g] + sums0[g + 1]) / rows / 2);
  std::vector<double> sorted = group_mean;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_GT(sorted[1], 1.001 * sorted[0]);
  ASSERT_GT(sorted[2], 1.001 * sorted[1]);
  struct Case {
    std::string name;
    double lambda;
    int clamped;
  };
  // The FD probes (h = 1e-6) move a group's mean by far less than the 1e-4 margins.
  const std::vector<Case> cases = {{"off", 0.0, 0},
                                   {"below_all", 0.5 * sorted[0], 0},
                                   {"at_floor_clamped", sorted[1] * (1 + 1e-4), 4},
                                   {"at_floor_active", sorted[1] * (1 - 1e-4), 2},
                                   {"above_all", 2 * sorted[2], 6}};
  for (const Case& c : cases) {
    l.free_bits = c.lambda;
    const Vec sums = kl_sums(params);
    const FreeBits fb = free_bits(l, sums.data(), L, rows);
    EXPECT_EQ(fb.clamped_dims, c.clamped) << c.name;
    Vec w = fb.weights(beta / rows);
    Vec grads(params.size(), 0.0);
    vae.backward(params.data(), grads.data(), x.data(), eps.data(), rows, 1.0 / rows, w.data());
    expect_gradient(objective, params, grads, "free_bits_" + c.name, 1e-6, 2e-6);
    if (c.clamped == 0) {
      // Nothing clamped: exactly the plain ELBO's gradient with the scalar KL weight.
      kl_sums(params);
      Vec plain(params.size(), 0.0);
      vae.backward(params.data(), plain.data(), x.data(), eps.data(), rows, 1.0 / rows, beta / rows);
      EXPECT_EQ(plain, grads) << c.name;
    }
  }
}

}  // namespace
}  // namespace elbo
