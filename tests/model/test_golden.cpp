// Golden test: the C++ VAE against PyTorch (tests/model/make_golden.py). Forward
// values, every parameter gradient and three optimizer steps must agree to 1e-5
// relative in double precision; the float path is checked per tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/optim/adam.hpp"
#include "elbo/util/h5.hpp"
#include "golden_util.hpp"

namespace elbo {
namespace {

std::string g_golden_path;

using golden::int_array_attr;
using golden::max_rel_err;
using golden::norm_err;

struct Case {
  ModelSpec spec;
  int D = 0, L = 0, B = 0;
  double beta = 1;
  std::vector<double> x, eps, rec, kl, mu, logvar, z, out, params, grads;
  double loss = 0;
};

// A choice the golden file stores by its name (the names of config/choices.hpp).
template <class E>
E choice_attr(hid_t g, const char* attr) {
  const std::string text = h5::read_attr_string(g, attr);
  const std::optional<E> e = parse_choice<E>(text);
  if (!e) throw std::runtime_error(std::string("golden attribute ") + attr + ": unknown value '" + text + "'");
  return *e;
}

Case load_case(hid_t file, const std::string& name, const VaeLayout** layout_out, std::unique_ptr<VaeLayout>& holder) {
  h5::Id g(ELBO_CHECK_H5(H5Gopen2(file, name.c_str(), H5P_DEFAULT)), H5Gclose);
  Case c;
  c.D = static_cast<int>(h5::read_attr_int(g, "D"));
  c.L = static_cast<int>(h5::read_attr_int(g, "L"));
  c.B = static_cast<int>(h5::read_attr_int(g, "B"));
  c.beta = h5::read_attr_double(g, "beta");
  if (H5Aexists(g, "spec") > 0) {
    // A conv case: the model comes from the same spec text elbo would read.
    c.spec = parse_spec(h5::read_attr_string(g, "spec"), name + " (golden spec)").model;
    holder = std::make_unique<VaeLayout>(c.spec, int_array_attr(g, "shape"));
  } else {
    c.spec.activation = choice_attr<Activation>(g, "activation");
    c.spec.likelihood = choice_attr<Likelihood>(g, "likelihood");
    c.spec.sigma = h5::read_attr_double(g, "sigma");
    c.spec.encoder = int_array_attr(g, "encoder");
    c.spec.decoder = int_array_attr(g, "decoder");
    c.spec.latent = c.L;
    holder = std::make_unique<VaeLayout>(c.spec, c.D);
  }
  *layout_out = holder.get();
  c.x = h5::read_dataset<double>(g, "x");
  c.eps = h5::read_dataset<double>(g, "eps");
  c.rec = h5::read_dataset<double>(g, "rec");
  c.kl = h5::read_dataset<double>(g, "kl");
  c.mu = h5::read_dataset<double>(g, "mu");
  c.logvar = h5::read_dataset<double>(g, "logvar");
  c.z = h5::read_dataset<double>(g, "z");
  c.out = h5::read_dataset<double>(g, "out");
  c.loss = h5::read_dataset<double>(g, "loss").at(0);
  c.params.assign(holder->num_params(), 0.0);
  c.grads.assign(holder->num_params(), 0.0);
  for (const auto& v : holder->views()) {
    auto p = h5::read_dataset<double>(g, "params/" + v.name);
    auto d = h5::read_dataset<double>(g, "grads/" + v.name);
    EXPECT_EQ(p.size(), v.numel()) << name << ": " << v.name;
    std::copy(p.begin(), p.end(), c.params.begin() + static_cast<std::ptrdiff_t>(v.offset));
    std::copy(d.begin(), d.end(), c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset));
  }
  return c;
}

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, ForwardAndGradientsMatchPyTorch) {
  h5::Id file = h5::open_file(g_golden_path);
  const VaeLayout* layout = nullptr;
  std::unique_ptr<VaeLayout> holder;
  Case c = load_case(file, GetParam(), &layout, holder);
  CpuBackend<double> be;
  Vae<double> vae(*layout, be, c.B);
  vae.forward(c.params.data(), c.x.data(), c.eps.data(), c.B);
  EXPECT_LT(max_rel_err(vae.rec(), c.rec), 1e-5);
  EXPECT_LT(max_rel_err(vae.kl(), c.kl), 1e-5);
  EXPECT_LT(max_rel_err(vae.z(), c.z), 1e-5);
  EXPECT_LT(max_rel_err(vae.output(), c.out), 1e-5);
  std::vector<double> mu, lv;
  for (int r = 0; r < c.B; ++r)
    for (int j = 0; j < c.L; ++j) {
      mu.push_back(vae.mulv()[r * 2 * c.L + j]);
      lv.push_back(vae.mulv()[r * 2 * c.L + c.L + j]);
    }
  EXPECT_LT(max_rel_err(mu.data(), c.mu), 1e-5);
  EXPECT_LT(max_rel_err(lv.data(), c.logvar), 1e-5);
  double loss = 0;
  for (int r = 0; r < c.B; ++r) loss += (vae.rec()[r] + c.beta * vae.kl()[r]) / c.B;
  EXPECT_NEAR(loss, c.loss, 1e-5 * std::abs(c.loss));

  std::vector<double> grads(layout->num_params(), 0.0);
  vae.backward(c.params.data(), grads.data(), c.x.data(), c.eps.data(), c.B, 1.0 / c.B, c.beta / c.B);
  // A bias right before a GroupNorm whose groups are single channels has a gradient
  // of exactly zero (the normalization removes it); both sides then hold round-off,
  // which only an absolute bound against the whole gradient's scale can compare.
  double scale = 0;
  for (double g : c.grads) scale = std::max(scale, std::abs(g));
  auto vanishing = [&](const std::vector<double>& want) {
    return std::all_of(want.begin(), want.end(), [&](double g) { return std::abs(g) < 1e-12 * scale; });
  };
  auto all_below = [&](const auto* got, size_t n, double bound) {
    for (size_t i = 0; i < n; ++i)
      if (std::abs(double(got[i])) > bound) return false;
    return true;
  };
  for (const auto& v : layout->views()) {
    std::vector<double> want(c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset),
                             c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset + v.numel()));
    if (vanishing(want))
      EXPECT_TRUE(all_below(grads.data() + v.offset, v.numel(), 1e-10 * scale)) << "zero gradient of " << v.name;
    else
      EXPECT_LT(max_rel_err(grads.data() + v.offset, want), 1e-5) << "gradient of " << v.name;
  }

  // The float32 training path: the same computation, per-tensor normalized error.
  CpuBackend<float> bf;
  Vae<float> vf(*layout, bf, c.B);
  std::vector<float> pf(c.params.begin(), c.params.end()), xf(c.x.begin(), c.x.end()),
      ef(c.eps.begin(), c.eps.end()), gf(pf.size(), 0.0f);
  vf.forward(pf.data(), xf.data(), ef.data(), c.B);
  vf.backward(pf.data(), gf.data(), xf.data(), ef.data(), c.B, 1.0f / c.B, static_cast<float>(c.beta / c.B));
  EXPECT_LT(norm_err(vf.rec(), c.rec), 1e-5);
  for (const auto& v : layout->views()) {
    std::vector<double> want(c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset),
                             c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset + v.numel()));
    if (vanishing(want))
      EXPECT_TRUE(all_below(gf.data() + v.offset, v.numel(), 1e-5 * scale)) << "zero float gradient of " << v.name;
    else
      EXPECT_LT(norm_err(gf.data() + v.offset, want), 1e-5) << "float gradient of " << v.name;
  }
}

TEST_P(Golden, ThreeOptimizerStepsMatchTorchOptim) {
  h5::Id file = h5::open_file(g_golden_path);
  const VaeLayout* layout = nullptr;
  std::unique_ptr<VaeLayout> holder;
  Case c = load_case(file, GetParam(), &layout, holder);
  h5::Id g(ELBO_CHECK_H5(H5Gopen2(file, (GetParam() + "/adam").c_str(), H5P_DEFAULT)), H5Gclose);
  OptimSpec o;
  o.type = choice_attr<OptimizerType>(g, "optimizer");
  o.lr = h5::read_attr_double(g, "lr");
  o.beta1 = h5::read_attr_double(g, "beta1");
  o.beta2 = h5::read_attr_double(g, "beta2");
  o.eps = h5::read_attr_double(g, "eps");
  o.weight_decay = h5::read_attr_double(g, "weight_decay");
  std::vector<double> losses = h5::read_dataset<double>(g, "losses");

  CpuBackend<double> be;
  Vae<double> vae(*layout, be, c.B);
  Adam<double> opt(o, be, layout->num_params());
  std::vector<double> p = c.params, grads(p.size());
  for (size_t s = 0; s < losses.size(); ++s) {
    vae.forward(p.data(), c.x.data(), c.eps.data(), c.B);
    double loss = 0;
    for (int r = 0; r < c.B; ++r) loss += (vae.rec()[r] + c.beta * vae.kl()[r]) / c.B;
    EXPECT_NEAR(loss, losses[s], 1e-5 * std::abs(losses[s])) << "loss before step " << s + 1;
    std::fill(grads.begin(), grads.end(), 0.0);
    vae.backward(p.data(), grads.data(), c.x.data(), c.eps.data(), c.B, 1.0 / c.B, c.beta / c.B);
    opt.step(p.data(), grads.data(), o.lr);
  }
  for (const auto& v : layout->views()) {
    std::vector<double> want = h5::read_dataset<double>(g, "params_after/" + v.name);
    EXPECT_LT(max_rel_err(p.data() + v.offset, want), 1e-5) << "parameter " << v.name << " after " << o.type;
  }
}

// loss.type iwae at the case's parameters: the per-input bounds, the reparameterized
// gradient of their mean and DReG's, against torch.distributions and autograd
// (make_golden.py's importance_weighted: an independent formulation of both).
TEST_P(Golden, ImportanceWeightedBoundAndDregMatchPyTorch) {
  h5::Id file = h5::open_file(g_golden_path);
  const VaeLayout* layout = nullptr;
  std::unique_ptr<VaeLayout> holder;
  Case c = load_case(file, GetParam(), &layout, holder);
  h5::Id g(ELBO_CHECK_H5(H5Gopen2(file, (GetParam() + "/iwae").c_str(), H5P_DEFAULT)), H5Gclose);
  const int k = static_cast<int>(h5::read_attr_int(g, "k"));
  const std::vector<double> eps = h5::read_dataset<double>(g, "eps");
  ASSERT_EQ(eps.size(), static_cast<size_t>(c.B) * k * c.L);
  CpuBackend<double> be;
  Vae<double> vae(*layout, be, c.B, k);
  vae.forward_iw(c.params.data(), c.x.data(), eps.data(), c.B, c.beta);
  EXPECT_LT(max_rel_err(vae.rec(), h5::read_dataset<double>(g, "rec")), 1e-8);
  EXPECT_LT(max_rel_err(vae.iw_bound(), h5::read_dataset<double>(g, "bound")), 1e-8);
  for (const bool dreg : {false, true}) {
    std::vector<double> grads(layout->num_params(), 0.0);
    vae.backward_iw(c.params.data(), grads.data(), c.x.data(), eps.data(), c.B, 1.0 / c.B, c.beta, dreg);
    double scale = 0;
    for (const auto& v : layout->views())
      for (double w : h5::read_dataset<double>(g, (dreg ? "dreg_grads/" : "grads/") + v.name))
        scale = std::max(scale, std::abs(w));
    for (const auto& v : layout->views()) {
      const std::vector<double> want = h5::read_dataset<double>(g, (dreg ? "dreg_grads/" : "grads/") + v.name);
      // Against the whole gradient's scale: GroupNorm makes some biases' gradients vanish.
      double worst = 0;
      for (size_t i = 0; i < want.size(); ++i)
        worst = std::max(worst, std::abs(grads[v.offset + i] - want[i]) / std::max(std::abs(want[i]), 1e-3 * scale));
      EXPECT_LT(worst, 1e-6) << (dreg ? "DReG" : "IWAE") << " gradient of " << v.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, Golden, ::testing::Values("bern_relu", "gauss_learned_tanh", "gauss_fixed_softplus",
                                                          "conv_bern", "conv_gauss_learned"));

}  // namespace
}  // namespace elbo

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_golden GOLDEN.h5 (written by tests/model/make_golden.py)\n");
    return 2;
  }
  elbo::g_golden_path = argv[1];
  return RUN_ALL_TESTS();
}
