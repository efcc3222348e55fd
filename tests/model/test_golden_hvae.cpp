// Golden test of the hierarchical VAE: the C++ model against the same model written
// independently in PyTorch (tests/model/make_golden_hvae.py: torch.distributions for
// the KL and log-densities, F.avg_pool2d and F.interpolate between resolutions, the
// channel pad/truncate between stages of different widths).
// Forward values, per-group KL, the log-ratio, every parameter gradient and three
// optimizer steps agree to 1e-5 relative in double precision; the float path per tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/hvae.hpp"
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
  std::unique_ptr<HvaeLayout> layout;
  int B = 0;
  double beta = 1;
  std::vector<double> x, eps, rec, kl, kl_groups, log_ratio, out, params, grads;
  double loss = 0;
};

Case load_case(hid_t file, const std::string& name) {
  h5::Id g(ELBO_CHECK_H5(H5Gopen2(file, name.c_str(), H5P_DEFAULT)), H5Gclose);
  Case c;
  c.B = static_cast<int>(h5::read_attr_int(g, "B"));
  c.beta = h5::read_attr_double(g, "beta");
  const ModelSpec spec = parse_spec(h5::read_attr_string(g, "spec"), name + " (golden spec)").model;
  c.layout = std::make_unique<HvaeLayout>(spec, int_array_attr(g, "shape"));
  for (auto [key, dst] : {std::pair{"x", &c.x}, {"eps", &c.eps}, {"rec", &c.rec}, {"kl", &c.kl},
                          {"kl_groups", &c.kl_groups}, {"log_ratio", &c.log_ratio}, {"out", &c.out}})
    *dst = h5::read_dataset<double>(g, key);
  c.loss = h5::read_dataset<double>(g, "loss").at(0);
  EXPECT_EQ(c.eps.size(), c.B * c.layout->latent_size()) << name << ": eps per row";
  c.params.assign(c.layout->num_params(), 0.0);
  c.grads.assign(c.layout->num_params(), 0.0);
  for (const auto& v : c.layout->views()) {
    auto p = h5::read_dataset<double>(g, "params/" + v.name);
    auto d = h5::read_dataset<double>(g, "grads/" + v.name);
    EXPECT_EQ(p.size(), v.numel()) << name << ": " << v.name;
    std::copy(p.begin(), p.end(), c.params.begin() + static_cast<std::ptrdiff_t>(v.offset));
    std::copy(d.begin(), d.end(), c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset));
  }
  // Every PyTorch parameter has its view: the names read like the state_dict.
  h5::Id pg(ELBO_CHECK_H5(H5Gopen2(g, "params", H5P_DEFAULT)), H5Gclose);
  size_t count = 0;
  H5Literate(
      pg, H5_INDEX_NAME, H5_ITER_NATIVE, nullptr,
      [](hid_t, const char*, const H5L_info_t*, void* n) -> herr_t {
        ++*static_cast<size_t*>(n);
        return 0;
      },
      &count);
  EXPECT_EQ(count, c.layout->views().size()) << name;
  return c;
}

class GoldenHvae : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenHvae, ForwardAndGradientsMatchPyTorch) {
  h5::Id file = h5::open_file(g_golden_path);
  Case c = load_case(file, GetParam());
  const HvaeLayout& L = *c.layout;
  CpuBackend<double> be;
  Hvae<double> model(L, be, c.B);
  model.forward(c.params.data(), c.x.data(), c.eps.data(), c.B);
  EXPECT_LT(max_rel_err(model.rec(), c.rec), 1e-5);
  EXPECT_LT(max_rel_err(model.kl(), c.kl), 1e-5);
  EXPECT_LT(max_rel_err(model.kl_groups(), c.kl_groups), 1e-5);
  EXPECT_LT(max_rel_err(model.log_ratio(), c.log_ratio), 1e-5);
  EXPECT_LT(max_rel_err(model.output(), c.out), 1e-5);
  double loss = 0;
  for (int r = 0; r < c.B; ++r) loss += (model.rec()[r] + c.beta * model.kl()[r]) / c.B;
  EXPECT_NEAR(loss, c.loss, 1e-5 * std::abs(c.loss));

  std::vector<double> grads(L.num_params(), 0.0);
  model.backward(c.params.data(), grads.data(), c.x.data(), c.eps.data(), c.B, 1.0 / c.B, c.beta / c.B);
  for (const auto& v : L.views()) {
    const std::vector<double> want(c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset),
                                   c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset + v.numel()));
    EXPECT_LT(max_rel_err(grads.data() + v.offset, want), 1e-5) << "gradient of " << v.name;
  }

  // The float32 training path: the same computation, per-tensor normalized error.
  CpuBackend<float> bf;
  Hvae<float> mf(L, bf, c.B);
  std::vector<float> pf(c.params.begin(), c.params.end()), xf(c.x.begin(), c.x.end()),
      ef(c.eps.begin(), c.eps.end()), gf(pf.size(), 0.0f);
  mf.forward(pf.data(), xf.data(), ef.data(), c.B);
  mf.backward(pf.data(), gf.data(), xf.data(), ef.data(), c.B, 1.0f / c.B, static_cast<float>(c.beta / c.B));
  EXPECT_LT(norm_err(mf.rec(), c.rec), 1e-5);
  EXPECT_LT(norm_err(mf.kl_groups(), c.kl_groups), 1e-5);
  for (const auto& v : L.views()) {
    const std::vector<double> want(c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset),
                                   c.grads.begin() + static_cast<std::ptrdiff_t>(v.offset + v.numel()));
    EXPECT_LT(norm_err(gf.data() + v.offset, want), 1e-4) << "float gradient of " << v.name;
  }
}

TEST_P(GoldenHvae, ThreeOptimizerStepsMatchTorchOptim) {
  h5::Id file = h5::open_file(g_golden_path);
  Case c = load_case(file, GetParam());
  const HvaeLayout& L = *c.layout;
  h5::Id g(ELBO_CHECK_H5(H5Gopen2(file, (GetParam() + "/adam").c_str(), H5P_DEFAULT)), H5Gclose);
  OptimSpec o;
  const std::string type = h5::read_attr_string(g, "optimizer");
  o.type = type == "adamw" ? OptimizerType::AdamW : OptimizerType::Adam;
  o.lr = h5::read_attr_double(g, "lr");
  o.beta1 = h5::read_attr_double(g, "beta1");
  o.beta2 = h5::read_attr_double(g, "beta2");
  o.eps = h5::read_attr_double(g, "eps");
  o.weight_decay = h5::read_attr_double(g, "weight_decay");
  const std::vector<double> losses = h5::read_dataset<double>(g, "losses");

  CpuBackend<double> be;
  Hvae<double> model(L, be, c.B);
  Adam<double> opt(o, be, L.num_params());
  std::vector<double> p = c.params, grads(p.size());
  for (size_t s = 0; s < losses.size(); ++s) {
    model.forward(p.data(), c.x.data(), c.eps.data(), c.B);
    double loss = 0;
    for (int r = 0; r < c.B; ++r) loss += (model.rec()[r] + c.beta * model.kl()[r]) / c.B;
    EXPECT_NEAR(loss, losses[s], 1e-5 * std::abs(losses[s])) << "loss before step " << s + 1;
    std::fill(grads.begin(), grads.end(), 0.0);
    model.backward(p.data(), grads.data(), c.x.data(), c.eps.data(), c.B, 1.0 / c.B, c.beta / c.B);
    opt.step(p.data(), grads.data(), o.lr);
  }
  for (const auto& v : L.views()) {
    const std::vector<double> want = h5::read_dataset<double>(g, "params_after/" + v.name);
    EXPECT_LT(max_rel_err(p.data() + v.offset, want), 1e-5) << "parameter " << v.name << " after " << type;
  }
}

// hvae_widths_dec_blocks_tanh: per-stage widths that grow and shrink (pad and truncate,
// both ways), per-stage bottlenecks, decoder-only blocks with and without latent groups;
// hvae_resample_conv_widths: learned resampling that also changes the width (a 1x1 conv
// where down is 1), beside the parameter-free resize.
INSTANTIATE_TEST_SUITE_P(Cases, GoldenHvae,
                         ::testing::Values("hvae_bern_relu", "hvae_gauss_learned_softplus", "hvae_resample_conv",
                                           "hvae_widths_dec_blocks_tanh", "hvae_resample_conv_widths"));

}  // namespace
}  // namespace elbo

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_golden_hvae GOLDEN.h5 (written by tests/model/make_golden_hvae.py)\n");
    return 2;
  }
  elbo::g_golden_path = argv[1];
  return RUN_ALL_TESTS();
}
