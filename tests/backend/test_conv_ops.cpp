// The convolution ops of the CPU reference backend, in double precision:
// forward against a direct 7-loop convolution; backward-data as the exact adjoint of
// forward; both backward ops against central finite differences; transposed
// convolution shapes; per-channel bias + activation and GroupNorm against finite
// differences and their defining statistics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
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

size_t in_size(const ConvShape& s) { return size_t(s.n) * s.c * s.h * s.w; }
size_t out_size(const ConvShape& s) { return size_t(s.n) * s.k * s.out_h() * s.out_w(); }
size_t w_size(const ConvShape& s) { return size_t(s.k) * s.c * s.r * s.s; }

// PyTorch's Conv2d written as loops: the definition the GEMM formulation must match.
Vec direct_conv(const ConvShape& s, const Vec& x, const Vec& w) {
  const int OH = s.out_h(), OW = s.out_w();
  Vec y(out_size(s), 0.0);
  for (int b = 0; b < s.n; ++b)
    for (int k = 0; k < s.k; ++k)
      for (int oh = 0; oh < OH; ++oh)
        for (int ow = 0; ow < OW; ++ow) {
          double acc = 0;
          for (int c = 0; c < s.c; ++c)
            for (int i = 0; i < s.r; ++i)
              for (int j = 0; j < s.s; ++j) {
                const int ih = oh * s.stride - s.pad + i, iw = ow * s.stride - s.pad + j;
                if (ih < 0 || ih >= s.h || iw < 0 || iw >= s.w) continue;
                acc += x[((size_t(b) * s.c + c) * s.h + ih) * s.w + iw] * w[((size_t(k) * s.c + c) * s.r + i) * s.s + j];
              }
          y[((size_t(b) * s.k + k) * OH + oh) * OW + ow] = acc;
        }
  return y;
}

// n, c, h, w, k, r, s, stride, pad: stride 1 and 2, padding, a non-square image and
// kernel, more output than input channels and fewer.
const ConvShape kShapes[] = {
    {2, 3, 6, 5, 4, 3, 3, 1, 1},
    {3, 2, 8, 8, 5, 4, 4, 2, 1},
    {1, 4, 7, 9, 2, 3, 2, 2, 0},
    {2, 1, 5, 5, 3, 5, 5, 1, 2},
    {3, 4, 5, 6, 3, 1, 1, 1, 0},  // 1x1, stride 1, no padding: the pointwise path (the hierarchical model's)
    {4, 5, 1, 1, 3, 1, 1, 1, 0},  // 1x1 on a 1x1 image: the pointwise path as one GEMM over the batch
    {2, 3, 6, 6, 2, 1, 1, 2, 0},  // 1x1 with stride 2: the general path
    {2, 2, 3, 4, 3, 5, 3, 1, 3},  // stride 1, padding wider than the image: rows of zeros only
    {5, 6, 1, 1, 4, 3, 3, 1, 1},  // 3x3 on a 1x1 image: only the center tap meets it (the center-tap path)
    {3, 2, 1, 1, 3, 5, 5, 2, 2},  // 5x5, stride 2 on a 1x1 image: the center-tap path with a wider kernel
};

class Conv : public ::testing::TestWithParam<ConvShape> {};

TEST_P(Conv, ForwardMatchesDirectConvolution) {
  const ConvShape s = GetParam();
  CpuBackend<double> be;
  std::mt19937_64 rng(11);
  const Vec x = random_vec(in_size(s), rng), w = random_vec(w_size(s), rng);
  Vec y(out_size(s));
  be.conv2d_forward(s, x.data(), w.data(), y.data());
  const Vec ref = direct_conv(s, x, w);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], ref[i], 1e-12) << i;
}

TEST_P(Conv, BackwardDataIsTheAdjointOfForward) {
  // <conv(x, w), dy> == <x, conv_backward_data(dy, w)> for every x, dy: this is also
  // what makes backward_data a correct transposed convolution.
  const ConvShape s = GetParam();
  CpuBackend<double> be;
  std::mt19937_64 rng(12);
  const Vec x = random_vec(in_size(s), rng), w = random_vec(w_size(s), rng), dy = random_vec(out_size(s), rng);
  Vec y(out_size(s)), dx(in_size(s), 123.0);  // dx is written, not accumulated
  be.conv2d_forward(s, x.data(), w.data(), y.data());
  be.conv2d_backward_data(s, dy.data(), w.data(), dx.data());
  EXPECT_NEAR(dot(y, dy), dot(x, dx), 1e-10 * std::max(1.0, std::abs(dot(y, dy))));
}

TEST_P(Conv, BackwardOpsMatchFiniteDifferences) {
  const ConvShape s = GetParam();
  CpuBackend<double> be;
  std::mt19937_64 rng(13);
  const Vec x = random_vec(in_size(s), rng), w = random_vec(w_size(s), rng), dy = random_vec(out_size(s), rng);
  auto loss = [&](const Vec& xx, const Vec& ww) {
    Vec y(out_size(s));
    be.conv2d_forward(s, xx.data(), ww.data(), y.data());
    return dot(y, dy);
  };
  Vec dx(in_size(s)), dw(w_size(s), 0.0);
  be.conv2d_backward_data(s, dy.data(), w.data(), dx.data());
  be.conv2d_backward_filter(s, x.data(), dy.data(), dw.data());
  expect_gradient([&](const Vec& v) { return loss(v, w); }, x, dx, "dx", 1e-6, 1e-7);
  expect_gradient([&](const Vec& v) { return loss(x, v); }, w, dw, "dw", 1e-6, 1e-7);
  // The filter gradient accumulates.
  Vec dw2 = dw;
  be.conv2d_backward_filter(s, x.data(), dy.data(), dw2.data());
  for (size_t i = 0; i < dw.size(); ++i) EXPECT_NEAR(dw2[i], 2 * dw[i], 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Conv, ::testing::ValuesIn(kShapes));

TEST(Conv, ChunkedColumnsGiveTheSameResultAsOneChunk) {
  // A batch large enough to be split into several im2col chunks (2^24 floats each).
  // Each chunk is a GEMM of another shape than the one-sample GEMM, and BLAS promises
  // no bitwise equality across shapes (OpenBLAS's Haswell and Zen kernels block the
  // sums differently and differ in the last bit), so the two may differ by rounding
  // only: for a float dot product summed in any order, |fl(y) - y| <= gamma_K *
  // sum_i |x_i w_i| with gamma_K = K u / (1 - K u), u = 2^-24 and K the reduction
  // length, hence two orders differ by at most twice that. A chunk that read the wrong
  // samples or columns misses by O(1).
  const ConvShape s{300, 16, 32, 32, 8, 3, 3, 1, 1};  // 144 x 1024 columns per sample -> 113 per chunk
  CpuBackend<float> be;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> x(in_size(s)), w(w_size(s)), y(out_size(s)), y1(size_t(s.k) * s.out_h() * s.out_w());
  for (auto& v : x) v = u(rng);
  for (auto& v : w) v = u(rng);
  be.conv2d_forward(s, x.data(), w.data(), y.data());
  ConvShape one = s;
  one.n = 1;
  const int K = s.c * s.r * s.s;
  const double unit = std::ldexp(1.0, -24), gamma = K * unit / (1 - K * unit);
  const Vec abs_w = [&] {
    Vec a(w.size());
    for (size_t i = 0; i < w.size(); ++i) a[i] = std::abs(double(w[i]));
    return a;
  }();
  double worst = 0;  // the largest difference as a fraction of its bound, for the log
  for (int b : {0, 150, 299}) {
    be.conv2d_forward(one, x.data() + size_t(b) * s.c * s.h * s.w, w.data(), y1.data());
    Vec abs_x(size_t(s.c) * s.h * s.w);
    for (size_t i = 0; i < abs_x.size(); ++i) abs_x[i] = std::abs(double(x[size_t(b) * abs_x.size() + i]));
    const Vec magnitude = direct_conv(one, abs_x, abs_w);  // sum_i |x_i w_i| per output
    for (size_t i = 0; i < y1.size(); ++i) {
      const double diff = std::abs(double(y1[i]) - double(y[size_t(b) * y1.size() + i]));
      const double bound = 2 * gamma * magnitude[i];
      worst = std::max(worst, diff / bound);
      ASSERT_LE(diff, bound) << "sample " << b << ", output " << i << ": " << y1[i] << " one sample vs "
                             << y[size_t(b) * y1.size() + i] << " in a chunk";
    }
  }
  std::printf("largest difference: %.3g of the rounding bound\n", worst);
}

TEST(ConvTranspose, ShapesFollowPyTorch) {
  // ConvTranspose2d(cin=4 -> cout=2, kernel 4, stride 2, padding 1) maps 7x7 to 14x14:
  // the convolution read backwards has c = cout, k = cin on the 14x14 image.
  const ConvShape s{1, 2, 14, 14, 4, 4, 4, 2, 1};
  EXPECT_EQ(s.out_h(), 7);
  EXPECT_EQ(s.out_w(), 7);
  // With output_padding 1, kernel 3, stride 2, padding 1: 7 -> 14 as well.
  const ConvShape t{1, 2, 14, 14, 4, 3, 3, 2, 1};
  EXPECT_EQ(t.out_h(), 7);
}

class ChannelAct : public ::testing::TestWithParam<Activation> {};

TEST_P(ChannelAct, BiasActivationBackwardMatchesFiniteDifferences) {
  const int n = 2, c = 3, hw = 5;
  CpuBackend<double> be;
  std::mt19937_64 rng(21);
  const Vec pre0 = random_vec(n * c * hw, rng, -2, 2), bias = random_vec(c, rng), wout = random_vec(n * c * hw, rng);
  const Activation act = GetParam();
  auto f = [&](const Vec& p_in, const Vec& b) {
    Vec pre = p_in, out(pre.size());
    be.channel_bias_act_forward(act, n, c, hw, b.data(), pre.data(), act == Activation::Identity ? pre.data() : out.data());
    return dot(act == Activation::Identity ? pre : out, wout);
  };
  Vec pre = pre0, out(pre.size()), dpre(pre.size()), db(c, 0.0);
  be.channel_bias_act_forward(act, n, c, hw, bias.data(), pre.data(), out.data());
  be.channel_bias_act_backward(act, n, c, hw, pre.data(), out.data(), wout.data(), dpre.data(), db.data());
  expect_gradient([&](const Vec& v) { return f(v, bias); }, pre0, dpre, "dpre", 1e-6, 1e-6);
  expect_gradient([&](const Vec& v) { return f(pre0, v); }, bias, db, "dbias", 1e-6, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Activations, ChannelAct,
                         ::testing::Values(Activation::Identity, Activation::Relu, Activation::Tanh,
                                           Activation::Softplus));

TEST(GroupNorm, NormalizesEachGroupOfEachSample) {
  const int n = 3, c = 6, hw = 10, groups = 2;
  CpuBackend<double> be;
  std::mt19937_64 rng(31);
  const Vec x = random_vec(n * c * hw, rng, -3, 5), gamma(c, 1.0), beta(c, 0.0);
  Vec y(x.size()), stats(n * groups * 2);
  be.group_norm_forward(n, c, hw, groups, 1e-5, x.data(), gamma.data(), beta.data(), y.data(), stats.data());
  for (int b = 0; b < n; ++b)
    for (int g = 0; g < groups; ++g) {
      const size_t off = (size_t(b) * c + g * (c / groups)) * hw, len = (c / groups) * hw;
      double m = 0, v = 0;
      for (size_t i = 0; i < len; ++i) m += y[off + i];
      m /= len;
      for (size_t i = 0; i < len; ++i) v += (y[off + i] - m) * (y[off + i] - m);
      v /= len;
      EXPECT_NEAR(m, 0.0, 1e-12);
      EXPECT_NEAR(v, 1.0, 1e-3);  // var / (var + eps)
    }
}

TEST(GroupNorm, BackwardMatchesFiniteDifferences) {
  const int n = 2, c = 4, hw = 3, groups = 2;
  CpuBackend<double> be;
  std::mt19937_64 rng(32);
  const Vec x = random_vec(n * c * hw, rng, -2, 2), gamma = random_vec(c, rng, 0.5, 1.5),
            beta = random_vec(c, rng), wout = random_vec(n * c * hw, rng);
  auto f = [&](const Vec& xx, const Vec& gg, const Vec& bb) {
    Vec y(xx.size()), st(n * groups * 2);
    be.group_norm_forward(n, c, hw, groups, 1e-5, xx.data(), gg.data(), bb.data(), y.data(), st.data());
    return dot(y, wout);
  };
  Vec y(x.size()), st(n * groups * 2), dx(x.size()), dg(c, 0.0), db(c, 0.0);
  be.group_norm_forward(n, c, hw, groups, 1e-5, x.data(), gamma.data(), beta.data(), y.data(), st.data());
  be.group_norm_backward(n, c, hw, groups, x.data(), gamma.data(), st.data(), wout.data(), dx.data(), dg.data(),
                         db.data());
  expect_gradient([&](const Vec& v) { return f(v, gamma, beta); }, x, dx, "dx", 1e-6, 1e-6);
  expect_gradient([&](const Vec& v) { return f(x, v, beta); }, gamma, dg, "dgamma", 1e-6, 1e-6);
  expect_gradient([&](const Vec& v) { return f(x, gamma, v); }, beta, db, "dbeta", 1e-6, 1e-6);
}

}  // namespace
}  // namespace elbo
