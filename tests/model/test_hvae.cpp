// The hierarchical VAE on the CPU backend: the layout (names, shapes, errors naming
// the stage, the initialization's residual scaling and prior start, per-stage widths
// and decoder blocks), the whole loss gradient against finite differences in double,
// per-group KL weights, the order of grads_ready, and prior sampling against the
// posterior pass.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/generate.hpp"
#include "elbo/model/hvae.hpp"
#include "elbo/model/model.hpp"
#include "elbo/util/error.hpp"
#include "test_util.hpp"

namespace elbo {
namespace {

using test_util::expect_gradient;
using test_util::random_vec;
using test_util::Vec;

// Two stages (4x4, then 2x2), three groups, two encoder blocks.
ModelSpec small_spec(Activation act = Activation::Tanh, Likelihood lik = Likelihood::Bernoulli) {
  ModelSpec m;
  m.type = ModelType::Hierarchical;
  m.width = 3;
  m.bottleneck = 2;
  m.activation = act;
  m.likelihood = lik;
  m.stages = {StageSpec{1, 1, 1, 1}, StageSpec{2, 1, 2, 2}};
  return m;
}

// Three stages whose widths grow and shrink (2 -> 4 -> 3: the encoder pads, then
// truncates; the decoder truncates 4 -> 2 and pads 3 -> 4), per-stage bottlenecks, and
// decoder-only blocks at full resolution (a stage without groups) and with a group.
ModelSpec widths_spec(Activation act = Activation::Tanh, Likelihood lik = Likelihood::Bernoulli) {
  ModelSpec m = small_spec(act, lik);
  const Resample P = Resample::Pool;
  m.stages = {StageSpec{1, 1, 0, 0, P, 1, 2, 2}, StageSpec{2, 1, 1, 1, P, 1, 4, 0}, StageSpec{2, 1, 1, 2, P, 0, 0, 3}};
  return m;
}

TEST(HvaeLayout, PerStageWidthsAndDecoderBlocks) {
  const HvaeLayout L(widths_spec(), {1, 4, 4});
  ASSERT_EQ(L.stages().size(), 3u);
  EXPECT_EQ(L.stages()[0].shape, (TensorShape{2, 4, 4}));
  EXPECT_EQ(L.stages()[1].shape, (TensorShape{4, 2, 2}));
  EXPECT_EQ(L.stages()[1].outer, (TensorShape{2, 4, 4}));
  EXPECT_EQ(L.stages()[2].shape, (TensorShape{3, 1, 1}));  // model.width
  EXPECT_FALSE(L.stages()[0].resizes());
  EXPECT_TRUE(L.stages()[1].resizes() && L.stages()[2].resizes());
  EXPECT_EQ(L.num_groups(), 2);
  EXPECT_EQ(L.decoder_blocks().size(), 2u);
  EXPECT_EQ(L.latent_size(), 2u + 4u);  // the 1x1 group's 2 channels first, then 1 channel at 2x2
  EXPECT_EQ(L.view("encoder.in.weight").shape, (std::vector<int>{2, 1, 3, 3}));
  EXPECT_EQ(L.view("encoder.stages.0.blocks.0.c1.weight").shape, (std::vector<int>{2, 2, 1, 1}));
  EXPECT_EQ(L.view("encoder.stages.1.blocks.0.c2.weight").shape, (std::vector<int>{2, 2, 3, 3}));  // model.bottleneck
  EXPECT_EQ(L.view("encoder.stages.2.blocks.0.c1.weight").shape, (std::vector<int>{3, 3, 1, 1}));
  EXPECT_EQ(L.view("decoder.h_top").shape, (std::vector<int>{3, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.2.groups.0.q.c1.weight").shape, (std::vector<int>{3, 6, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.1.groups.0.prior.c3.weight").shape, (std::vector<int>{2 + 4, 2, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.1.blocks.0.c3.weight").shape, (std::vector<int>{4, 2, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.0.blocks.0.c1.weight").shape, (std::vector<int>{2, 2, 1, 1}));
  EXPECT_EQ(L.view("decoder.out.weight").shape, (std::vector<int>{1, 2, 1, 1}));
  // The flat buffer's order: per decoder stage from the top, its groups, then its blocks.
  auto at = [&](const std::string& n) { return L.view(n).offset; };
  EXPECT_LT(at("decoder.stages.2.groups.0.resnet.c3.bias"), at("decoder.stages.1.groups.0.q.c1.weight"));
  EXPECT_LT(at("decoder.stages.1.groups.0.resnet.c3.bias"), at("decoder.stages.1.blocks.0.c1.weight"));
  EXPECT_LT(at("decoder.stages.1.blocks.0.c3.bias"), at("decoder.stages.0.blocks.0.c1.weight"));
  EXPECT_LT(at("decoder.stages.0.blocks.0.c3.bias"), at("decoder.out.weight"));
  // A stage without groups needs no latent; a stage with groups does.
  ModelSpec m = widths_spec();
  m.stages[1].latent = 0;
  EXPECT_THROW(HvaeLayout(m, {1, 4, 4}), Error);
  m = widths_spec();
  m.stages[0].latent = 0;
  EXPECT_NO_THROW(HvaeLayout(m, {1, 4, 4}));
  for (auto [field, name] : {std::pair{&StageSpec::width, "width"}, {&StageSpec::bottleneck, "bottleneck"},
                             {&StageSpec::dec_blocks, "dec_blocks"}}) {
    m = widths_spec();
    m.stages[2].*field = -1;
    try {
      HvaeLayout bad(m, {1, 4, 4});
      FAIL() << name << " -1 must be refused";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Config);
      EXPECT_NE(std::string(e.what()).find("model.stages[2]: "), std::string::npos) << e.what();
    }
  }
}

// The decoder's residual scaling counts its blocks with its groups: 1/sqrt(2 + 2).
TEST(HvaeLayout, InitScalesDecoderBlocksWithTheGroups) {
  ModelSpec m = widths_spec();
  m.width = m.bottleneck = 16;
  for (StageSpec& st : m.stages) st.width = st.bottleneck = 0;
  m.stages[0].dec_blocks = 1;
  m.stages[1].dec_blocks = 1;
  const HvaeLayout L(m, {1, 4, 4});
  const std::vector<double> p = L.init_params(3);
  auto max_abs = [&](const std::string& name) {
    const ParamView& v = L.view(name);
    double mx = 0;
    for (size_t i = 0; i < v.numel(); ++i) mx = std::max(mx, std::abs(p[v.offset + i]));
    return mx;
  };
  const double bound = 1.0 / std::sqrt(16.0);
  for (const char* name : {"decoder.stages.0.blocks.0.c3.weight", "decoder.stages.1.groups.0.resnet.c3.weight"}) {
    EXPECT_LE(max_abs(name), bound / 2) << name;
    EXPECT_GT(max_abs(name), 0.8 * bound / 2) << name;
  }
  EXPECT_GT(max_abs("decoder.stages.0.blocks.0.c1.weight"), 0.8 * bound);
  // Without decoder blocks the values are those of the same model before they existed:
  // the blocks draw after the values that precede them in the flat buffer.
  m.stages[0].dec_blocks = m.stages[1].dec_blocks = 0;
  const HvaeLayout plain(m, {1, 4, 4});
  const std::vector<double> q = plain.init_params(3);
  for (const char* name : {"encoder.stages.1.blocks.0.c3.weight", "decoder.stages.2.groups.0.q.c2.weight"}) {
    const ParamView& a = L.view(name);
    const ParamView& b = plain.view(name);
    EXPECT_TRUE(std::equal(p.begin() + a.offset, p.begin() + a.offset + a.numel(), q.begin() + b.offset)) << name;
  }
}

TEST(HvaeLayout, NamesShapesAndEpsLayout) {
  const HvaeLayout L(small_spec(), {1, 4, 4});
  EXPECT_EQ(L.num_groups(), 3);
  // Groups top-down: two 2x2 groups of 2 channels, then one 4x4 group of 1 channel.
  EXPECT_EQ(L.groups()[0].stage, 1);
  EXPECT_EQ(L.groups()[2].stage, 0);
  EXPECT_EQ(L.groups()[1].eps_offset, 8u);
  EXPECT_EQ(L.groups()[2].eps_offset, 16u);
  EXPECT_EQ(L.latent_size(), 2 * 2 * 4u + 16u);
  EXPECT_EQ(L.view("encoder.in.weight").shape, (std::vector<int>{3, 1, 3, 3}));
  EXPECT_EQ(L.view("encoder.stages.1.blocks.0.c2.weight").shape, (std::vector<int>{2, 2, 3, 3}));
  EXPECT_EQ(L.view("decoder.h_top").shape, (std::vector<int>{3, 2, 2}));
  EXPECT_EQ(L.view("decoder.stages.1.groups.1.q.c1.weight").shape, (std::vector<int>{2, 6, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.1.groups.0.q.c3.weight").shape, (std::vector<int>{4, 2, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.0.groups.0.prior.c3.weight").shape, (std::vector<int>{2 + 3, 2, 1, 1}));
  EXPECT_EQ(L.view("decoder.stages.0.groups.0.z_proj.weight").shape, (std::vector<int>{3, 1, 1, 1}));
  EXPECT_EQ(L.view("decoder.out.weight").shape, (std::vector<int>{1, 3, 1, 1}));
  // Views are disjoint, in increasing offsets, and sum to num_values.
  size_t values = 0, end = 0;
  std::set<std::string> names;
  for (const ParamView& v : L.views()) {
    EXPECT_GE(v.offset, end) << v.name;
    EXPECT_EQ(v.offset % VaeLayout::kParamAlign, 0u) << v.name;
    end = v.offset + v.numel();
    values += v.numel();
    EXPECT_TRUE(names.insert(v.name).second) << v.name;
  }
  EXPECT_EQ(values, L.num_values());
  EXPECT_LE(end, L.num_params());
  // A learned-variance Gaussian doubles the output channels.
  const HvaeLayout G(small_spec(Activation::Tanh, Likelihood::GaussianLearned), {1, 4, 4});
  EXPECT_EQ(G.output_width(), 32);
}

TEST(HvaeLayout, ErrorsNameTheStage) {
  ModelSpec m = small_spec();
  m.stages.push_back(StageSpec{3, 1, 1, 1});
  try {
    HvaeLayout L(m, {1, 4, 4});
    FAIL() << "a factor that does not divide the resolution must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config);
    EXPECT_NE(std::string(e.what()).find("model.stages[2]: down 3 does not divide the 2x2 resolution of stage 1"),
              std::string::npos)
        << e.what();
  }
  m = small_spec();
  m.stages = {StageSpec{2, 1, 1, 1}};
  try {
    HvaeLayout L(m, {1, 5, 4});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.stages[0]: down 2 does not divide the 5x4 resolution of the input"),
              std::string::npos)
        << e.what();
  }
  m = small_spec();
  m.stages = {StageSpec{1, 1, 0, 1}};
  EXPECT_THROW(HvaeLayout(m, {1, 4, 4}), Error);
  // The mlp/conv layout refuses a hierarchical spec instead of building an MLP from it.
  try {
    VaeLayout v(small_spec(), {1, 4, 4});
    FAIL() << "VaeLayout must refuse model.type hierarchical";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.type hierarchical: the trainer"), std::string::npos) << e.what();
  }
}

TEST(HvaeLayout, InitScalesResidualBranchesAndStartsPriorsAtStandardNormal) {
  ModelSpec m = small_spec();
  m.width = 16;
  m.bottleneck = 16;
  m.stages = {StageSpec{1, 4, 2, 2}, StageSpec{2, 0, 2, 2}};
  const HvaeLayout L(m, {1, 4, 4});
  const std::vector<double> p = L.init_params(3), again = L.init_params(3), other = L.init_params(4);
  EXPECT_EQ(p, again);
  EXPECT_NE(p, other);
  auto max_abs = [&](const std::string& name) {
    const ParamView& v = L.view(name);
    double mx = 0;
    for (size_t i = 0; i < v.numel(); ++i) mx = std::max(mx, std::abs(p[v.offset + i]));
    return mx;
  };
  const double bound = 1.0 / std::sqrt(16.0);  // fan_in of a 1x1 conv from 16 channels
  // Unscaled: close to the PyTorch bound; scaled by 1/sqrt(4 encoder blocks) or 1/sqrt(4 groups).
  EXPECT_GT(max_abs("encoder.stages.0.blocks.0.c1.weight"), 0.8 * bound);
  EXPECT_LE(max_abs("encoder.stages.0.blocks.0.c3.weight"), bound / 2);
  EXPECT_GT(max_abs("encoder.stages.0.blocks.0.c3.weight"), 0.8 * bound / 2);
  EXPECT_LE(max_abs("decoder.stages.0.groups.1.resnet.c3.weight"), bound / 2);
  EXPECT_GT(max_abs("decoder.stages.0.groups.1.resnet.c3.weight"), 0.8 * bound / 2);
  EXPECT_LE(max_abs("decoder.stages.1.groups.0.z_proj.weight"), (1 / std::sqrt(2.0)) / 2);
  EXPECT_EQ(max_abs("decoder.h_top"), 0.0);
  EXPECT_EQ(max_abs("decoder.stages.1.groups.0.prior.c3.weight"), 0.0);
  const ParamView& pb = L.view("decoder.stages.1.groups.0.prior.c3.bias");
  for (int c = 0; c < pb.shape[0]; ++c) {
    const double want = c >= 2 && c < 4 ? std::log(std::exp(1.0) - 1.0) : 0.0;
    EXPECT_DOUBLE_EQ(p[pb.offset + c], want) << c;
  }
}

struct Pass {
  std::vector<double> rec, kl, kl_groups, log_ratio, output;
};

Pass run_forward(Hvae<double>& model, const Vec& params, const Vec& x, const Vec& eps, int rows) {
  model.forward(params.data(), x.data(), eps.data(), rows);
  const int G = model.layout().num_groups();
  Pass p;
  p.rec.assign(model.rec(), model.rec() + rows);
  p.kl.assign(model.kl(), model.kl() + rows);
  p.kl_groups.assign(model.kl_groups(), model.kl_groups() + rows * G);
  p.log_ratio.assign(model.log_ratio(), model.log_ratio() + rows);
  p.output.assign(model.output(), model.output() + size_t(rows) * model.layout().output_width());
  return p;
}

// The whole loss rec_weight * rec + sum_l kl_w[l] * KL_l in double against central
// differences, and grads_ready's order, for the model of `spec` on (1, 4, 4) inputs.
void check_whole_loss_gradient(const ModelSpec& spec, const std::string& tag) {
  CpuBackend<double> be;
  const HvaeLayout L(spec, {1, 4, 4});
  const int rows = 2, G = L.num_groups();
  std::mt19937_64 rng(21);
  // Random parameters everywhere (the initialization zeroes some paths).
  Vec params = random_vec(L.num_params(), rng, -0.6, 0.6);
  const Vec x = random_vec(size_t(rows) * L.input_dim(), rng, 0, 1);
  const Vec eps = random_vec(size_t(rows) * L.latent_size(), rng, -1.5, 1.5);
  const double rec_weight = 0.7;
  Vec kl_w = {0.3, 1.1, 0.0};  // one weight per group, one of them clamped (free bits)
  kl_w.resize(static_cast<size_t>(G), 0.8);
  Hvae<double> model(L, be, rows);
  auto loss = [&](const Vec& p) {
    const Pass r = run_forward(model, p, x, eps, rows);
    double f = 0;
    for (int i = 0; i < rows; ++i) {
      f += rec_weight * r.rec[i];
      for (int g = 0; g < G; ++g) f += kl_w[g] * r.kl_groups[i * G + g];
    }
    return f;
  };
  const Pass r = run_forward(model, params, x, eps, rows);
  for (int i = 0; i < rows; ++i) {
    double sum = 0;
    for (int g = 0; g < G; ++g) {
      EXPECT_GT(r.kl_groups[i * G + g], 0.0);
      sum += r.kl_groups[i * G + g];
    }
    EXPECT_NEAR(r.kl[i], sum, 1e-12);
    EXPECT_TRUE(std::isfinite(r.rec[i]) && std::isfinite(r.log_ratio[i]));
  }
  Vec grads(L.num_params(), 0.0);
  std::vector<size_t> ready;
  model.backward(params.data(), grads.data(), x.data(), eps.data(), rows, rec_weight, kl_w.data(),
                 [&](size_t off) { ready.push_back(off); });
  // grads_ready: offsets never increase, end at 0, and name every layer once.
  ASSERT_FALSE(ready.empty());
  for (size_t i = 1; i < ready.size(); ++i) EXPECT_LT(ready[i], ready[i - 1]) << i;
  EXPECT_EQ(ready.back(), 0u);
  size_t weights = 0;
  for (const ParamView& v : L.views())
    if (v.name.size() > 7 && v.name.compare(v.name.size() - 7, 7, ".weight") == 0) ++weights;
  EXPECT_EQ(ready.size(), weights + 1);  // every conv and decoder.h_top
  // The alignment gaps receive nothing; the finite differences there are 0 too.
  expect_gradient(loss, params, grads, tag, 1e-6, 2e-6);
}

class HvaeGrad : public ::testing::TestWithParam<Likelihood> {};

TEST_P(HvaeGrad, WholeLossGradientMatchesFiniteDifferences) {
  check_whole_loss_gradient(small_spec(Activation::Tanh, GetParam()), std::string("hvae_") + choice_name(GetParam()));
}

// Per-stage widths (pad and truncate both ways) and decoder-only blocks.
TEST_P(HvaeGrad, WithPerStageWidthsAndDecoderBlocks) {
  check_whole_loss_gradient(widths_spec(Activation::Tanh, GetParam()),
                            std::string("hvae_widths_") + choice_name(GetParam()));
}

// resample: conv with per-stage widths: stage 0 changes neither resolution nor width
// (no conv), stage 1 learns 4x4 x 2 -> 2x2 x 4 and back, stage 2 pools and resizes.
TEST(HvaeGradResample, LearnedResamplingWithPerStageWidths) {
  ModelSpec m = widths_spec(Activation::Softplus, Likelihood::GaussianLearned);
  for (StageSpec& st : m.stages) st.resample = Resample::Conv;
  m.stages[2].resample = Resample::Pool;
  const HvaeLayout L(m, {1, 4, 4});
  EXPECT_FALSE(L.stages()[0].learned);
  EXPECT_TRUE(L.stages()[1].learned && !L.stages()[1].resizes());
  EXPECT_TRUE(!L.stages()[2].learned && L.stages()[2].resizes());
  EXPECT_EQ(L.view("encoder.stages.1.down.weight").shape, (std::vector<int>{4, 2, 2, 2}));
  EXPECT_EQ(L.view("decoder.stages.1.up.weight").shape, (std::vector<int>{4, 2, 2, 2}));
  EXPECT_LT(L.view("decoder.stages.1.blocks.0.c3.bias").offset, L.view("decoder.stages.1.up.weight").offset);
  check_whole_loss_gradient(m, "hvae_resample_conv_widths");
}

// resample: conv on every stage, the first included (its down_conv reads the stem, its
// up_conv feeds decoder.out): 4x4 -> 2x2 -> 1x1.
TEST(HvaeGradResample, LearnedResamplingGradientMatchesFiniteDifferences) {
  ModelSpec m = small_spec(Activation::Tanh, Likelihood::GaussianLearned);
  m.stages = {StageSpec{2, 1, 1, 1}, StageSpec{2, 1, 2, 2}};
  for (StageSpec& st : m.stages) st.resample = Resample::Conv;
  check_whole_loss_gradient(m, "hvae_resample_conv");
}

INSTANTIATE_TEST_SUITE_P(Likelihoods, HvaeGrad,
                         ::testing::Values(Likelihood::Bernoulli, Likelihood::GaussianLearned),
                         [](const auto& info) { return std::string(choice_name(info.param)); });

TEST(Hvae, ScalarKlWeightEqualsTheSameWeightPerGroup) {
  CpuBackend<double> be;
  const HvaeLayout L(small_spec(Activation::Softplus), {1, 4, 4});
  const int rows = 3;
  std::mt19937_64 rng(5);
  const Vec params = random_vec(L.num_params(), rng, -0.5, 0.5), x = random_vec(rows * 16, rng, 0, 1),
            eps = random_vec(rows * L.latent_size(), rng);
  Hvae<double> model(L, be, rows);
  Vec g1(L.num_params(), 0.0), g2(L.num_params(), 0.0);
  model.forward(params.data(), x.data(), eps.data(), rows);
  model.backward(params.data(), g1.data(), x.data(), eps.data(), rows, 1.0, 0.4);
  const Vec w(L.num_groups(), 0.4);
  model.backward(params.data(), g2.data(), x.data(), eps.data(), rows, 1.0, w.data());
  EXPECT_EQ(g1, g2);
  double norm = 0;
  for (double v : g1) norm += v * v;
  EXPECT_GT(norm, 0.0);
}

// With every posterior head set to N(0, I) (zero weights, raw bias log(e - 1)) and the
// priors at their N(0, I) start, the posterior pass samples z = eps exactly as the
// prior pass does: the same decoder output, and every group's KL and log-ratio 0.
// Also with per-stage widths and decoder blocks (the prior pass resizes and runs them too).
class HvaeSampling : public ::testing::TestWithParam<bool> {};

TEST_P(HvaeSampling, PriorSamplingMatchesThePosteriorPassWhenTheyAgree) {
  CpuBackend<double> be;
  const HvaeLayout L(GetParam() ? widths_spec(Activation::Relu) : small_spec(Activation::Relu), {1, 4, 4});
  const int rows = 2;
  Vec params = L.init_params(9);
  for (const HvaeGroup& g : L.groups()) {
    const Layer& c3 = g.q.c3;
    std::fill_n(params.begin() + c3.w, size_t(c3.out.c) * c3.in.c, 0.0);
    for (int c = 0; c < c3.out.c; ++c) params[c3.b + c] = c < g.zc ? 0.0 : std::log(std::exp(1.0) - 1.0);
  }
  std::mt19937_64 rng(6);
  const Vec x = random_vec(rows * 16, rng, 0, 1), eps = random_vec(rows * L.latent_size(), rng);
  Hvae<double> model(L, be, rows);
  const Pass post = run_forward(model, params, x, eps, rows);
  for (double k : post.kl_groups) EXPECT_NEAR(k, 0.0, 1e-12);
  for (double k : post.log_ratio) EXPECT_NEAR(k, 0.0, 1e-12);
  model.sample(params.data(), eps.data(), rows);
  const Vec prior(model.output(), model.output() + rows * L.output_width());
  ASSERT_EQ(prior.size(), post.output.size());
  for (size_t i = 0; i < prior.size(); ++i) EXPECT_NEAR(prior[i], post.output[i], 1e-12) << i;
  // Other eps, other samples.
  const Vec eps2 = random_vec(rows * L.latent_size(), rng);
  model.sample(params.data(), eps2.data(), rows);
  const Vec prior2(model.output(), model.output() + rows * L.output_width());
  EXPECT_NE(prior2, prior);
}

INSTANTIATE_TEST_SUITE_P(Specs, HvaeSampling, ::testing::Values(false, true),
                         [](const auto& info) { return std::string(info.param ? "widths_dec_blocks" : "plain"); });

}  // namespace
}  // namespace elbo

namespace elbo {
namespace {

TEST(ModelInterface, FactoriesPickTheModelByTypeAndRunItThroughTheInterface) {
  const ModelSpec hs = small_spec(Activation::Softplus);
  std::unique_ptr<ModelLayout> hl = make_layout(hs, {1, 4, 4});
  ASSERT_NE(dynamic_cast<const HvaeLayout*>(hl.get()), nullptr);
  EXPECT_EQ(hl->kl_parts(), 3);
  EXPECT_EQ(hl->eps_per_row(), 32u);
  ModelSpec vs;
  vs.latent = 5;
  std::unique_ptr<ModelLayout> vl = make_layout(vs, {1, 4, 4});
  ASSERT_NE(dynamic_cast<const VaeLayout*>(vl.get()), nullptr);
  EXPECT_EQ(vl->kl_parts(), 5);
  EXPECT_EQ(vl->eps_per_row(), 5u);
  EXPECT_EQ(vl->view("encoder.mu.weight").shape, (std::vector<int>{5, 400}));

  // Through the interface, the same numbers as the concrete class.
  CpuBackend<double> be;
  const int rows = 2;
  std::mt19937_64 rng(8);
  for (const ModelLayout* L : {hl.get(), vl.get()}) {
    const Vec params = random_vec(L->num_params(), rng, -0.3, 0.3), x = random_vec(rows * 16, rng, 0, 1),
              eps = random_vec(rows * L->eps_per_row(), rng);
    std::unique_ptr<Model<double>> m = make_model(*L, be, rows);
    EXPECT_EQ(&m->model_layout(), L);
    m->forward(params.data(), x.data(), eps.data(), rows);
    Vec g(L->num_params(), 0.0);
    m->backward(params.data(), g.data(), x.data(), eps.data(), rows, 1.0, 1.0);
    Vec rec(m->rec(), m->rec() + rows), kl(m->kl(), m->kl() + rows);
    Vec g2(L->num_params(), 0.0);
    if (const auto* h = dynamic_cast<const HvaeLayout*>(L)) {
      Hvae<double> direct(*h, be, rows);
      direct.forward(params.data(), x.data(), eps.data(), rows);
      direct.backward(params.data(), g2.data(), x.data(), eps.data(), rows, 1.0, 1.0);
      EXPECT_EQ(rec, Vec(direct.rec(), direct.rec() + rows));
      EXPECT_EQ(kl, Vec(direct.kl(), direct.kl() + rows));
    } else {
      Vae<double> direct(dynamic_cast<const VaeLayout&>(*L), be, rows);
      direct.forward(params.data(), x.data(), eps.data(), rows);
      direct.backward(params.data(), g2.data(), x.data(), eps.data(), rows, 1.0, 1.0);
      EXPECT_EQ(rec, Vec(direct.rec(), direct.rec() + rows));
    }
    EXPECT_EQ(g, g2);
  }
}

TEST(ModelInterface, HierarchicalSamplesAndReconstructions) {
  const ModelSpec hs = small_spec(Activation::Relu);
  const HvaeLayout L(hs, {1, 4, 4});
  CpuBackend<float> be;
  const std::vector<double> init = L.init_params(2);
  std::vector<float> params(init.begin(), init.end());
  // 300 samples span two passes of 256: the first 10 are those of a 10-sample call.
  const std::vector<float> many = sample_from_prior(L, be, params.data(), 300, 7);
  const std::vector<float> few = sample_from_prior(L, be, params.data(), 10, 7);
  ASSERT_EQ(many.size(), 300u * 16);
  EXPECT_EQ(std::vector<float>(many.begin(), many.begin() + 160), few);
  for (float v : many) ASSERT_TRUE(v > 0.0f && v < 1.0f) << v;  // Bernoulli means
  EXPECT_NE(std::vector<float>(many.begin(), many.begin() + 16), std::vector<float>(many.begin() + 16, many.begin() + 32));
  EXPECT_NE(sample_from_prior(L, be, params.data(), 10, 8), few);
  // Reconstructions: the posterior pass with eps = 0, as its means.
  std::mt19937_64 rng(3);
  const Vec xd = random_vec(3 * 16, rng, 0, 1);
  const std::vector<float> x(xd.begin(), xd.end());
  const std::vector<float> r = reconstruct(L, be, params.data(), x.data(), 3);
  Hvae<float> model(L, be, 3);
  const std::vector<float> zeros(3 * L.latent_size(), 0.0f);
  model.forward(params.data(), x.data(), zeros.data(), 3);
  std::vector<float> want(3 * 16);
  be.likelihood_mean(Likelihood::Bernoulli, 3, 16, model.output(), want.data());
  EXPECT_EQ(r, want);
}

}  // namespace
}  // namespace elbo
