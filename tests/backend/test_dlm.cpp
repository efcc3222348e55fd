// The discretized logistic mixture op (dlm_*) on the CPU reference: backward against
// finite differences in double, the 256 probabilities of a pixel summing to 1, the
// edge bins, the log-scale floor, the mean the image grids show, and the decoder-width
// check of the layout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/util/error.hpp"
#include "test_util.hpp"

namespace elbo {
namespace {

using test_util::expect_gradient;
using test_util::Vec;

// Index of (group, component k, pixel p) in one sample's output, as DlmShape lays it out.
size_t at(const DlmShape& s, int group, int k, int p) { return (static_cast<size_t>(group) * s.components + k) * s.hw + p; }

// Random decoder outputs with log-scales in [-4, 0.5] (clear of the floor at -7) and
// inputs x = byte/255 that include both edge bins in every channel.
struct Case {
  DlmShape s;
  int rows;
  Vec out, x;
};
Case make_case(int C, int K, int rows, int hw, uint64_t seed) {
  Case c{DlmShape{C, hw, K}, rows, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  c.out.resize(rows * c.s.out_width());
  c.x.resize(static_cast<size_t>(rows) * c.s.dim());
  for (int r = 0; r < rows; ++r) {
    double* o = c.out.data() + r * c.s.out_width();
    for (int g = 0; g < c.s.groups(); ++g)
      for (int k = 0; k < K; ++k)
        for (int p = 0; p < hw; ++p) {
          double v = n01(rng);
          if (g >= 1 && g <= C) v = 2.2 * u(rng) - 1.1;        // means around [-1, 1]
          if (g > C && g <= 2 * C) v = -4.0 + 4.5 * u(rng);   // log-scales
          o[at(c.s, g, k, p)] = v;
        }
    for (int ch = 0; ch < C; ++ch)
      for (int p = 0; p < hw; ++p) {
        int b = static_cast<int>(u(rng) * 256) % 256;
        if (p == 0) b = 0;
        if (p == 1) b = 255;
        c.x[static_cast<size_t>(r) * c.s.dim() + ch * hw + p] = b / 255.0;
      }
  }
  return c;
}

struct GradCase {
  int C, K;
};
void PrintTo(const GradCase& c, std::ostream* os) { *os << "C=" << c.C << " K=" << c.K; }
class DlmGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(DlmGrad, BackwardMatchesFiniteDifferences) {
  const auto [C, K] = GetParam();
  Case c = make_case(C, K, 2, 5, 100 + 10 * C + K);
  // Pixel 2 of row 1: a middle bin far in a sharp component's tail (mass < 1e-5),
  // PixelCNN++'s mid-bin density branch.
  for (int k = 0; k < K; ++k)
    for (int ch = 0; ch < C; ++ch) {
      c.out[c.s.out_width() + at(c.s, 1 + ch, k, 2)] = -0.9;
      c.out[c.s.out_width() + at(c.s, 1 + C + ch, k, 2)] = -4.0;
      c.x[c.s.dim() + ch * c.s.hw + 2] = 210 / 255.0;
    }
  CpuBackend<double> be;
  const double w = 0.7;
  auto f = [&](const Vec& o) {
    Vec nll(c.rows);
    be.dlm_forward(c.s, c.rows, o.data(), c.x.data(), nll.data());
    double s = 0;
    for (double v : nll) s += w * v;
    return s;
  };
  Vec dout(c.out.size(), 12345.0);  // every value is written
  be.dlm_backward(c.s, c.rows, c.out.data(), c.x.data(), w, dout.data());
  expect_gradient(f, c.out, dout, "dout", 1e-6, 2e-6);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DlmGrad,
                         ::testing::Values(GradCase{1, 1}, GradCase{1, 3}, GradCase{3, 1}, GradCase{3, 2},
                                           GradCase{2, 2}),
                         [](const auto& info) {
                           return "C" + std::to_string(info.param.C) + "_K" + std::to_string(info.param.K);
                         });

// -log P of one grayscale pixel with byte b.
double pixel_nll(CpuBackend<double>& be, const DlmShape& s, const Vec& out, int b) {
  Vec x{b / 255.0}, nll(1);
  be.dlm_forward(s, 1, out.data(), x.data(), nll.data());
  return nll[0];
}

TEST(Dlm, TheProbabilitiesOfAll256ValuesSumToOne) {
  CpuBackend<double> be;
  const DlmShape s{1, 1, 3};
  // [logits | means | log-scales]: a spread mixture, sharp components at the floor and
  // at both edges, and means beyond [-1, 1] (the edge bins take the rest).
  const std::vector<Vec> outs = {{0.3, -1.0, 2.0, -0.5, 0.1, 0.8, -2.0, -3.0, 0.0},
                                 {0.0, 0.0, 0.0, -1.0, 1.0, 0.0, -7.0, -6.5, -5.0},
                                 {1.0, -2.0, 0.5, -1.6, 1.7, 0.99, 1.5, -1.0, -4.5},
                                 // wide components only: no bin falls below 1e-5, the sum is exact
                                 {0.2, -0.4, 0.1, -0.3, 0.2, 0.6, 0.5, 0.7, 0.4}};
  for (const Vec& out : outs) {
    double total = 0;
    for (int b = 0; b < 256; ++b) {
      const double nll = pixel_nll(be, s, out, b);
      ASSERT_TRUE(std::isfinite(nll)) << "byte " << b;
      total += std::exp(-nll);
    }
    // Exact but for the mid-bin density fallback on bins of mass < 1e-5 (PixelCNN++'s,
    // kept): the sharp components at the floor lose ~1.5e-6 there.
    std::printf("sum of 256 probabilities: 1 - %.3g\n", 1.0 - total);
    const bool wide = &out == &outs.back();
    EXPECT_NEAR(total, 1.0, wide ? 1e-12 : 1e-5) << "mixture with logits " << out[0] << ", " << out[1] << ", " << out[2];
  }
}

TEST(Dlm, EdgeBinsIntegrateToTheEnds) {
  CpuBackend<double> be;
  const DlmShape s{1, 1, 1};
  const double mu = 0.2, ls = -1.3, scale = std::exp(ls);
  const Vec out{0.0, mu, ls};
  auto cdf = [&](double v) { return 1.0 / (1.0 + std::exp(-(v - mu) / scale)); };
  EXPECT_NEAR(pixel_nll(be, s, out, 0), -std::log(cdf(-1.0 + 1.0 / 255)), 1e-12);
  EXPECT_NEAR(pixel_nll(be, s, out, 255), -std::log(1.0 - cdf(1.0 - 1.0 / 255)), 1e-12);
  const double v = 2.0 * 77 / 255 - 1;
  EXPECT_NEAR(pixel_nll(be, s, out, 77), -std::log(cdf(v + 1.0 / 255) - cdf(v - 1.0 / 255)), 1e-12);
  // A far tail stays finite in float too (no log(0)).
  CpuBackend<float> bf;
  std::vector<float> of{0.0f, -1.0f, -7.0f}, xf{1.0f}, nf(1);
  bf.dlm_forward(s, 1, of.data(), xf.data(), nf.data());
  EXPECT_TRUE(std::isfinite(nf[0]));
  EXPECT_GT(nf[0], 100.0f);
}

TEST(Dlm, LogScalesBelowTheFloorAreClampedWithoutGradient) {
  CpuBackend<double> be;
  const DlmShape s{1, 1, 1};
  Vec out{0.0, 0.1, -9.0}, dout(3);
  Vec floor_out{0.0, 0.1, -7.0};
  for (int b : {0, 140, 255}) {
    EXPECT_DOUBLE_EQ(pixel_nll(be, s, out, b), pixel_nll(be, s, floor_out, b)) << "byte " << b;
    Vec x{b / 255.0};
    be.dlm_backward(s, 1, out.data(), x.data(), 1.0, dout.data());
    EXPECT_EQ(dout[2], 0.0) << "byte " << b;
    EXPECT_EQ(dout[0], 0.0) << "one component: its logit has no gradient";
  }
}

TEST(Dlm, MeanIsTheMixtureMeanInZeroOne) {
  CpuBackend<double> be;
  {
    const DlmShape s{1, 2, 2};  // 2 pixels, K = 2: [logits (2x2) | means | log-scales]
    const double l0 = 0.4, l1 = -0.3;
    Vec out{l0, l0, l1, l1, -0.5, 0.9, 0.2, 1.8, -1, -1, -2, -2}, m(2);
    be.dlm_mean(s, 1, out.data(), m.data());
    const double p0 = 1.0 / (1.0 + std::exp(l1 - l0));
    EXPECT_NEAR(m[0], ((p0 * -0.5 + (1 - p0) * 0.2) + 1) / 2, 1e-12);
    EXPECT_DOUBLE_EQ(m[1], 1.0) << "a mean beyond 1 is clamped";
  }
  {
    // RGB, K = 1: E[G] = mean_G + tanh(a) E[R]; E[B] = mean_B + tanh(b) E[R] + tanh(c) E[G].
    const DlmShape s{3, 1, 1};
    Vec out{0.0, 0.5, -0.2, 0.1, -1, -1, -1, 0.3, -0.7, 1.2}, m(3);
    be.dlm_mean(s, 1, out.data(), m.data());
    const double r = 0.5, g = -0.2 + std::tanh(0.3) * r, b = 0.1 + std::tanh(-0.7) * r + std::tanh(1.2) * g;
    EXPECT_NEAR(m[0], (r + 1) / 2, 1e-12);
    EXPECT_NEAR(m[1], (g + 1) / 2, 1e-12);
    EXPECT_NEAR(m[2], (b + 1) / 2, 1e-12);
  }
}

TEST(Dlm, RgbMeansDependOnTheEarlierChannels) {
  // G's likelihood changes with R's value through the coefficient; R's does not change with G's.
  CpuBackend<double> be;
  const DlmShape s{3, 1, 1};
  Vec out{0.0, 0.0, 0.0, 0.0, -2, -2, -2, 1.5, 0.0, 0.0};
  auto nll = [&](int r, int g, int b) {
    Vec x{r / 255.0, g / 255.0, b / 255.0}, n(1);
    be.dlm_forward(s, 1, out.data(), x.data(), n.data());
    return n[0];
  };
  // G at R's value is likelier than G at 128 when R is high (positive coefficient).
  EXPECT_LT(nll(230, 230, 128), nll(230, 128, 128));
  EXPECT_GT(nll(30, 230, 128), nll(30, 40, 128));
}

std::string layout_error(const std::string& yaml, std::vector<int> shape) {
  try {
    VaeLayout layout(parse_spec(yaml, "spec.yaml").model, shape);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(DlmLayout, DecoderWidthFollowsComponentsAndChannels) {
  const std::string head =
      "data: {train: unused}\nmodel:\n  type: conv\n  latent: 2\n"
      "  likelihood: {type: discretized_logistic_mixture, components: 4}\n"
      "  encoder: [flatten]\n  decoder:\n    - {type: linear, features: 16}\n"
      "    - {type: reshape, shape: [1, 4, 4]}\n";
  const std::string bad = head + "    - {type: conv2d, channels: 3, kernel: 3, padding: 1}\n";
  std::string e = layout_error(bad, {3, 4, 4});
  EXPECT_NE(e.find("model.decoder: the last layer produces [3, 4, 4]"), std::string::npos) << e;
  EXPECT_NE(e.find("needs [40, 4, 4] (40 channels = components 4 x (1 logit + 3 means + 3 log-scales + 3 channel "
                   "coefficients))"),
            std::string::npos)
      << e;
  e = layout_error(bad, {1, 4, 4});
  EXPECT_NE(e.find("needs [12, 4, 4] (12 channels = components 4 x (1 logit + 1 means + 1 log-scales))"),
            std::string::npos)
      << e;
  const VaeLayout rgb(parse_spec(head + "    - {type: conv2d, channels: 40, kernel: 3, padding: 1}\n", "s").model,
                      std::vector<int>{3, 4, 4});
  EXPECT_EQ(rgb.output_width(), 40 * 16);
  EXPECT_EQ(rgb.likelihood().dlm.out_channels(), 40);
  // An MLP's output layer is sized to match.
  const VaeLayout mlp(parse_spec("data: {train: unused}\nmodel:\n  likelihood: {type: discretized_logistic_mixture, "
                                 "components: 5}\n",
                                 "s")
                          .model,
                      std::vector<int>{1, 28, 28});
  EXPECT_EQ(mlp.output_width(), 15 * 784);
  e = layout_error("data: {train: unused}\nmodel:\n  likelihood: discretized_logistic_mixture\n", {5, 4, 4});
  EXPECT_NE(e.find("model.likelihood: discretized_logistic_mixture takes images of 1 to 4 channels (this data has 5)"),
            std::string::npos)
      << e;
}

}  // namespace
}  // namespace elbo
