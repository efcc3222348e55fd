// Every CUDA op against the CPU reference (normalized error), and a whole VAE
// forward/backward. Skips, saying why, where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "elbo/backend/cpu/cpu_backend.hpp"
#ifdef ELBO_HAVE_CUDA
#include "elbo/backend/cuda/cuda_backend.hpp"
#endif
#include "elbo/config/spec.hpp"
#include "elbo/model/hvae.hpp"
#include "elbo/model/vae.hpp"

namespace elbo {
namespace {

using Vec = std::vector<float>;

Vec random_vec(size_t n, std::mt19937& rng, float lo = -1, float hi = 1) {
  std::uniform_real_distribution<float> u(lo, hi);
  Vec v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

double norm_err(const Vec& a, const Vec& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// EXPECT_LT on a normalized error that also prints the error reached, so a GPU run's
// log states every op's tolerance and how close it came.
#define EXPECT_PARITY(err_expr, tol, what)                                                              \
  do {                                                                                                  \
    const double parity_err_ = (err_expr);                                                              \
    std::ostringstream parity_what_;                                                                    \
    parity_what_ << what;                                                                               \
    std::printf("parity %-28s %-44s err %.2e (tol %.0e)\n",                                              \
                ::testing::UnitTest::GetInstance()->current_test_info()->name(), parity_what_.str().c_str(), \
                parity_err_, double(tol));                                                              \
    EXPECT_LT(parity_err_, tol) << parity_what_.str();                                                  \
  } while (0)

class CudaParity : public ::testing::Test {
 protected:
  void SetUp() override {
    BackendReport r = probe_backends();
    if (!r.cuda_compiled) GTEST_SKIP() << "no GPU: " << r.cuda_detail;
    if (r.cuda_devices == 0) GTEST_SKIP() << "no GPU: " << r.cuda_detail;
    gpu = make_backend<float>(DeviceKind::Cuda, 1);
  }
  Buffer<float> put(const Vec& host) {
    Buffer<float> d(*gpu, host.size());
    gpu->upload(d.data(), host.data(), host.size());
    return d;
  }
  Vec get(const Buffer<float>& d) {
    Vec out(d.size());
    gpu->download(out.data(), d.data(), d.size());
    return out;
  }
  // A whole hierarchical VAE (`model_yaml`: the model section's keys) on 16x16 inputs.
  void check_whole_hvae(const std::string& model_yaml);
  std::unique_ptr<Backend<float>> gpu;
  CpuBackend<float> cpu{1};
  std::mt19937 rng{17};
};

TEST_F(CudaParity, GemmAllTransposes) {
  const int m = 37, n = 53, k = 29;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Vec a = random_vec(m * k, rng), b = random_vec(k * n, rng), c = random_vec(m * n, rng), want = c;
      cpu.gemm(ta, tb, m, n, k, 0.7f, a.data(), ta ? m : k, b.data(), tb ? k : n, 0.3f, want.data(), n);
      Buffer<float> da = put(a), db = put(b), dc = put(c);
      gpu->gemm(ta, tb, m, n, k, 0.7f, da.data(), ta ? m : k, db.data(), tb ? k : n, 0.3f, dc.data(), n);
      EXPECT_PARITY(norm_err(get(dc), want), 1e-5, "gemm trans_a=" << ta << " trans_b=" << tb);
    }
}

// The moving average of the parameters (optim.ema): 50 updates of axpby with a = 1 - d,
// b = d on a buffer larger than one grid pass. Each product is rounded on both sides
// (no FMA), so the GPU must give the CPU's bits: no element may differ.
TEST_F(CudaParity, MovingAverageAxpbyMatchesTheCpuBitForBit) {
  const size_t n = (size_t(1) << 20) + 37;
  const float d = 0.999f, a = static_cast<float>(1.0 - 0.999), b = d;
  Vec ema = random_vec(n, rng), cpu_ema = ema;
  Buffer<float> g_ema = put(ema);
  for (int t = 0; t < 50; ++t) {
    Vec p = random_vec(n, rng);
    Buffer<float> gp = put(p);
    cpu.axpby(n, a, p.data(), b, cpu_ema.data());
    gpu->axpby(n, a, gp.data(), b, g_ema.data());
  }
  const Vec got = get(g_ema);
  size_t differ = 0;
  for (size_t i = 0; i < n; ++i) differ += got[i] != cpu_ema[i];
  EXPECT_PARITY(norm_err(got, cpu_ema), 1e-7, "axpby x50 (ema 0.999)");
  EXPECT_EQ(differ, 0u) << "elements whose bits differ from the CPU's";
}

// Linear layers: cuBLASLt with the bias / bias+ReLU epilogue (Identity, ReLU) and the
// GEMM + kernel path (tanh), against the CPU's GEMM + loop.
TEST_F(CudaParity, LinearForwardWithFusedEpilogues) {
  const int rows = 37, in = 53, out = 29;
  for (Activation act : {Activation::Identity, Activation::Relu, Activation::Tanh}) {
    Vec x = random_vec(size_t(rows) * in, rng), w = random_vec(size_t(out) * in, rng), b = random_vec(out, rng);
    Vec pre(size_t(rows) * out), y(size_t(rows) * out);
    cpu.linear_forward(act, rows, in, out, x.data(), w.data(), b.data(), pre.data(),
                       act == Activation::Identity ? pre.data() : y.data());
    Buffer<float> gx = put(x), gw = put(w), gb = put(b), gpre(*gpu, pre.size()), gy(*gpu, y.size());
    gpu->linear_forward(act, rows, in, out, gx.data(), gw.data(), gb.data(), gpre.data(),
                        act == Activation::Identity ? gpre.data() : gy.data());
    if (act == Activation::Identity)
      EXPECT_PARITY(norm_err(get(gpre), pre), 1e-5, "linear fwd identity");
    else
      EXPECT_PARITY(norm_err(get(gy), y), 1e-5, "linear fwd " << choice_name(act));
  }
}

TEST_F(CudaParity, RandomNumbersAreTheSameStream) {
  Vec want(33 * 7);
  cpu.normal(5, RngStream::Eps, 9, 1000, 33, 7, want.data());
  Buffer<float> d(*gpu, want.size());
  gpu->normal(5, RngStream::Eps, 9, 1000, 33, 7, d.data());
  EXPECT_PARITY(norm_err(get(d), want), 1e-6, "philox normal draws");
}

// cuDNN with FMA math against im2col + FP32 GEMM: the sums run in other orders, so
// agreement is to float rounding over c*r*s terms (normalized error < 1e-5).
TEST_F(CudaParity, ConvolutionsOnCudnn) {
  const ConvShape shapes[] = {{8, 1, 28, 28, 32, 4, 4, 2, 1}, {8, 32, 14, 14, 64, 4, 4, 2, 1},
                              {5, 3, 9, 7, 4, 3, 3, 1, 1}};
  for (const ConvShape& s : shapes) {
    const size_t nx = size_t(s.n) * s.c * s.h * s.w, ny = size_t(s.n) * s.k * s.out_h() * s.out_w(),
                 nw = size_t(s.k) * s.c * s.r * s.s;
    Vec x = random_vec(nx, rng), w = random_vec(nw, rng), dy = random_vec(ny, rng), dw0 = random_vec(nw, rng);
    Vec y(ny), dx(nx), dw = dw0;
    cpu.conv2d_forward(s, x.data(), w.data(), y.data());
    cpu.conv2d_backward_data(s, dy.data(), w.data(), dx.data());
    cpu.conv2d_backward_filter(s, x.data(), dy.data(), dw.data());
    Buffer<float> gx = put(x), gw = put(w), gdy = put(dy), gdw = put(dw0), gy(*gpu, ny), gdx(*gpu, nx);
    gpu->conv2d_forward(s, gx.data(), gw.data(), gy.data());
    gpu->conv2d_backward_data(s, gdy.data(), gw.data(), gdx.data());
    gpu->conv2d_backward_filter(s, gx.data(), gdy.data(), gdw.data());
    EXPECT_PARITY(norm_err(get(gy), y), 1e-5, "conv fwd, c " << s.c << " k " << s.k);
    EXPECT_PARITY(norm_err(get(gdx), dx), 1e-5, "conv bwd data, c " << s.c << " k " << s.k);
    EXPECT_PARITY(norm_err(get(gdw), dw), 1e-5, "conv bwd filter (accum), c " << s.c << " k " << s.k);
  }
}

// train.deterministic: false lets cuDNN take its first-ranked algorithms even where
// they reduce in a varying order: still the same convolution, to float rounding.
TEST_F(CudaParity, ConvolutionsWithAnyCudnnAlgorithm) {
  gpu->set_deterministic(false);
  const ConvShape s{128, 32, 14, 14, 64, 4, 4, 2, 1};
  const size_t nx = size_t(s.n) * s.c * s.h * s.w, ny = size_t(s.n) * s.k * s.out_h() * s.out_w(),
               nw = size_t(s.k) * s.c * s.r * s.s;
  Vec x = random_vec(nx, rng), w = random_vec(nw, rng), dy = random_vec(ny, rng);
  Vec y(ny), dx(nx), dw(nw, 0.0f);
  cpu.conv2d_forward(s, x.data(), w.data(), y.data());
  cpu.conv2d_backward_data(s, dy.data(), w.data(), dx.data());
  cpu.conv2d_backward_filter(s, x.data(), dy.data(), dw.data());
  Buffer<float> gx = put(x), gw = put(w), gdy = put(dy), gdw = put(Vec(nw, 0.0f)), gy(*gpu, ny), gdx(*gpu, nx);
  gpu->conv2d_forward(s, gx.data(), gw.data(), gy.data());
  gpu->conv2d_backward_data(s, gdy.data(), gw.data(), gdx.data());
  gpu->conv2d_backward_filter(s, gx.data(), gdy.data(), gdw.data());
  EXPECT_PARITY(norm_err(get(gy), y), 1e-5, "conv fwd, any algorithm");
  EXPECT_PARITY(norm_err(get(gdx), dx), 1e-5, "conv bwd data, any algorithm");
  EXPECT_PARITY(norm_err(get(gdw), dw), 1e-5, "conv bwd filter, any algorithm");
}

TEST_F(CudaParity, ChannelBiasActivationAndGroupNorm) {
  const int n = 6, c = 8, hw = 49, groups = 4;
  const size_t len = size_t(n) * c * hw;
  for (Activation act : {Activation::Identity, Activation::Relu, Activation::Tanh, Activation::Softplus}) {
    Vec pre = random_vec(len, rng, -2, 2), bias = random_vec(c, rng), dout = random_vec(len, rng), db0 = random_vec(c, rng);
    Vec out(len), dpre(len), db = db0, p = pre;
    cpu.channel_bias_act_forward(act, n, c, hw, bias.data(), p.data(), out.data());
    cpu.channel_bias_act_backward(act, n, c, hw, p.data(), out.data(), dout.data(), dpre.data(), db.data());
    Buffer<float> gp = put(pre), gb = put(bias), gdout = put(dout), gdb = put(db0), gout(*gpu, len), gdpre(*gpu, len);
    gpu->channel_bias_act_forward(act, n, c, hw, gb.data(), gp.data(), gout.data());
    gpu->channel_bias_act_backward(act, n, c, hw, gp.data(), gout.data(), gdout.data(), gdpre.data(), gdb.data());
    EXPECT_PARITY(norm_err(get(gout), out), 1e-6, "channel bias+act fwd " << choice_name(act));
    EXPECT_PARITY(norm_err(get(gdpre), dpre), 1e-6, "channel act bwd " << choice_name(act));
    EXPECT_PARITY(norm_err(get(gdb), db), 1e-6, "channel bias grad " << choice_name(act));
  }
  Vec x = random_vec(len, rng, -3, 3), gamma = random_vec(c, rng, 0.5f, 1.5f), beta = random_vec(c, rng),
      dy = random_vec(len, rng), y(len), st(size_t(n) * groups * 2), dx(len), dg(c, 0.0f), dbeta(c, 0.0f);
  cpu.group_norm_forward(n, c, hw, groups, 1e-5f, x.data(), gamma.data(), beta.data(), y.data(), st.data());
  cpu.group_norm_backward(n, c, hw, groups, x.data(), gamma.data(), st.data(), dy.data(), dx.data(), dg.data(),
                          dbeta.data());
  Buffer<float> gx = put(x), gg = put(gamma), gbeta = put(beta), gdy = put(dy), gy(*gpu, len), gst(*gpu, st.size()),
                gdx(*gpu, len), gdg = put(Vec(c, 0.0f)), gdbeta = put(Vec(c, 0.0f));
  gpu->group_norm_forward(n, c, hw, groups, 1e-5f, gx.data(), gg.data(), gbeta.data(), gy.data(), gst.data());
  gpu->group_norm_backward(n, c, hw, groups, gx.data(), gg.data(), gst.data(), gdy.data(), gdx.data(), gdg.data(),
                           gdbeta.data());
  EXPECT_PARITY(norm_err(get(gy), y), 1e-6, "group norm forward");
  EXPECT_PARITY(norm_err(get(gdx), dx), 1e-5, "group norm dx");
  EXPECT_PARITY(norm_err(get(gdg), dg), 1e-5, "group norm dgamma");
  EXPECT_PARITY(norm_err(get(gdbeta), dbeta), 1e-5, "group norm dbeta");
}

TEST_F(CudaParity, WholeVaeForwardBackwardAndAdam) {
  for (Likelihood lik : {Likelihood::Bernoulli, Likelihood::GaussianFixed, Likelihood::GaussianLearned})
    for (Activation act : {Activation::Relu, Activation::Tanh, Activation::Softplus}) {
      ModelSpec ms;
      ms.encoder = {64, 32};
      ms.decoder = {32, 64};
      ms.latent = 6;
      ms.activation = act;
      ms.likelihood = lik;
      ms.sigma = 0.5;
      const int D = 50, rows = 19;
      VaeLayout layout(ms, D);
      std::vector<double> init = layout.init_params(3);
      Vec p(init.begin(), init.end()), x = random_vec(rows * D, rng, 0, 1), eps = random_vec(rows * ms.latent, rng);
      Vae<float> vc(layout, cpu, rows), vg(layout, *gpu, rows);
      Vec gc(p.size(), 0.0f);
      vc.forward(p.data(), x.data(), eps.data(), rows);
      vc.backward(p.data(), gc.data(), x.data(), eps.data(), rows, 1.0f / rows, 0.7f / rows);
      Buffer<float> dp = put(p), dx = put(x), de = put(eps), dg = put(Vec(p.size(), 0.0f));
      vg.forward(dp.data(), dx.data(), de.data(), rows);
      vg.backward(dp.data(), dg.data(), dx.data(), de.data(), rows, 1.0f / rows, 0.7f / rows);
      Vec rec_c(vc.rec(), vc.rec() + rows), kl_c(vc.kl(), vc.kl() + rows), rec_g(rows), kl_g(rows);
      gpu->download(rec_g.data(), vg.rec(), rows);
      gpu->download(kl_g.data(), vg.kl(), rows);
      std::string tag = std::string(choice_name(lik)) + "/" + choice_name(act);
      EXPECT_PARITY(norm_err(rec_g, rec_c), 1e-5, tag << " rec");
      EXPECT_PARITY(norm_err(kl_g, kl_c), 1e-5, tag << " kl");
      EXPECT_PARITY(norm_err(get(dg), gc), 1e-4, tag << " all gradients");

      // One AdamW step from the same gradients, and the gradient norm.
      AdamArgs args;
      args.decoupled = true;
      args.weight_decay = 0.01;
      Vec m(p.size(), 0.0f), v(p.size(), 0.0f), pc = p;
      cpu.adam_step(args, p.size(), pc.data(), gc.data(), m.data(), v.data());
      Buffer<float> dm = put(Vec(p.size(), 0.0f)), dv = put(Vec(p.size(), 0.0f)), dg2 = put(gc);
      gpu->adam_step(args, p.size(), dp.data(), dg2.data(), dm.data(), dv.data());
      EXPECT_PARITY(norm_err(get(dp), pc), 1e-6, tag << " adamw step");
      EXPECT_NEAR(gpu->sum_squares(gc.size(), dg2.data()), cpu.sum_squares(gc.size(), gc.data()),
                  1e-6 * cpu.sum_squares(gc.size(), gc.data()));
    }
}

// Free bits' backward: posterior_backward with one KL weight per latent dimension (some
// zero, as for clamped groups), alone and through the whole VAE, against the CPU.
TEST_F(CudaParity, PerDimensionKlWeightsInTheBackward) {
  const int rows = 37, L = 9;
  Vec mulv = random_vec(rows * 2 * L, rng), eps = random_vec(rows * L, rng, -2, 2), dz = random_vec(rows * L, rng);
  const Vec w = {0.02f, 0.0f, 0.05f, 0.05f, 0.0f, 0.0f, 0.3f, 0.01f, 0.05f};
  Vec dc(mulv.size());
  cpu.posterior_backward(rows, L, mulv.data(), eps.data(), dz.data(), w.data(), dc.data());
  Buffer<float> gm = put(mulv), ge = put(eps), gz = put(dz), gw = put(w), gd = put(Vec(mulv.size(), 0.0f));
  gpu->posterior_backward(rows, L, gm.data(), ge.data(), gz.data(), gw.data(), gd.data());
  EXPECT_PARITY(norm_err(get(gd), dc), 1e-6, "posterior_backward per-dim weights");
  // A zero weight leaves exactly dz in that dimension's dmu, on both.
  const Vec g = get(gd);
  for (int r = 0; r < rows; ++r) EXPECT_EQ(g[r * 2 * L + 1], dz[r * L + 1]) << "row " << r;

  ModelSpec ms;
  ms.encoder = {64, 32};
  ms.decoder = {32, 64};
  ms.latent = L;
  const int D = 50;
  VaeLayout layout(ms, D);
  std::vector<double> init = layout.init_params(4);
  Vec p(init.begin(), init.end()), x = random_vec(rows * D, rng, 0, 1);
  Vae<float> vc(layout, cpu, rows), vg(layout, *gpu, rows);
  Vec gc(p.size(), 0.0f);
  vc.forward(p.data(), x.data(), eps.data(), rows);
  vc.backward(p.data(), gc.data(), x.data(), eps.data(), rows, 1.0f / rows, w.data());
  Buffer<float> dp = put(p), dx = put(x), dg = put(Vec(p.size(), 0.0f));
  vg.forward(dp.data(), dx.data(), ge.data(), rows);
  vg.backward(dp.data(), dg.data(), dx.data(), ge.data(), rows, 1.0f / rows, gw.data());
  EXPECT_PARITY(norm_err(get(dg), gc), 1e-4, "whole VAE, per-dim KL weights: all gradients");
}

// loss.type iwae: the five importance-weighted ops alone, then whole MLP and conv VAEs'
// forward_iw/backward_iw (plain and DReG), against the CPU.
TEST_F(CudaParity, ImportanceWeightedBoundAndDreg) {
  const int rows = 23, k = 5, L = 7, D = 11;
  Vec mulv = random_vec(rows * 2 * L, rng), eps = random_vec(rows * k * L, rng, -2, 2), x = random_vec(rows * D, rng);
  Vec zc(rows * k * L), lrc(rows * k), xk(rows * k * D);
  cpu.iw_posterior_forward(rows, k, L, mulv.data(), eps.data(), zc.data(), lrc.data());
  cpu.repeat_rows(rows, D, k, x.data(), xk.data());
  Buffer<float> gm = put(mulv), ge = put(eps), gx = put(x), gz(*gpu, zc.size()), glr(*gpu, lrc.size()),
      gxk(*gpu, xk.size());
  gpu->iw_posterior_forward(rows, k, L, gm.data(), ge.data(), gz.data(), glr.data());
  gpu->repeat_rows(rows, D, k, gx.data(), gxk.data());
  EXPECT_PARITY(norm_err(get(gz), zc), 1e-6, "iw_posterior_forward z");
  EXPECT_PARITY(norm_err(get(glr), lrc), 1e-5, "iw_posterior_forward log ratio");
  EXPECT_EQ(get(gxk), xk) << "repeat_rows copies";
  // nll of a few hundred nats, as Fashion-MNIST's: the weights are exponentials of differences.
  Vec nll = random_vec(rows * k, rng, 250, 260), bc(rows), wc(rows * k);
  cpu.iw_weights(rows, k, 0.8f, nll.data(), lrc.data(), bc.data(), wc.data());
  Buffer<float> gn = put(nll), gb(*gpu, rows), gw(*gpu, wc.size());
  gpu->iw_weights(rows, k, 0.8f, gn.data(), glr.data(), gb.data(), gw.data());
  EXPECT_PARITY(norm_err(get(gb), bc), 1e-6, "iw_weights bound");
  EXPECT_PARITY(norm_err(get(gw), wc), 1e-4, "iw_weights weights");
  Vec dz = random_vec(rows * k * L, rng), sc = dz;
  cpu.scale_rows(rows * k, L, wc.data(), 0.5f, sc.data());
  Buffer<float> gdz = put(dz);
  gpu->scale_rows(rows * k, L, put(wc).data(), 0.5f, gdz.data());
  EXPECT_PARITY(norm_err(get(gdz), sc), 1e-6, "scale_rows");
  for (const bool dreg : {false, true}) {
    Vec dc(mulv.size());
    cpu.iw_posterior_backward(rows, k, L, mulv.data(), eps.data(), zc.data(), dz.data(), wc.data(), 0.3f, dreg,
                              dc.data());
    Buffer<float> gd(*gpu, dc.size()), gdz2 = put(dz), gw2 = put(wc), gz2 = put(zc);
    gpu->iw_posterior_backward(rows, k, L, gm.data(), ge.data(), gz2.data(), gdz2.data(), gw2.data(), 0.3f, dreg,
                               gd.data());
    EXPECT_PARITY(norm_err(get(gd), dc), 1e-5, (dreg ? "DReG" : "IWAE") << " iw_posterior_backward");
  }

  ModelSpec ms;
  ms.encoder = {64, 32};
  ms.decoder = {32, 64};
  ms.latent = 6;
  const int Dm = 50, rm = 19;
  const ModelSpec conv = parse_spec(R"(
data: {train: unused}
model:
  type: conv
  latent: 4
  encoder: [{type: conv2d, channels: 6, kernel: 4, stride: 2, padding: 1}, relu, {type: group_norm, groups: 3},
            flatten]
  decoder: [{type: linear, features: 96}, relu, {type: reshape, shape: [6, 4, 4]},
            {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]
)", "conv parity spec").model;
  for (const bool use_conv : {false, true})
    for (const bool dreg : {false, true}) {
      std::unique_ptr<VaeLayout> layout = use_conv ? std::make_unique<VaeLayout>(conv, std::vector<int>{1, 8, 8})
                                                   : std::make_unique<VaeLayout>(ms, Dm);
      const int n = layout->input_dim(), lat = layout->latent();
      std::vector<double> init = layout->init_params(6);
      Vec p(init.begin(), init.end()), xm = random_vec(rm * n, rng, 0, 1), em = random_vec(rm * k * lat, rng);
      Vae<float> vc(*layout, cpu, rm, k), vg(*layout, *gpu, rm, k);
      Vec gc(p.size(), 0.0f);
      vc.forward_iw(p.data(), xm.data(), em.data(), rm, 0.9f);
      vc.backward_iw(p.data(), gc.data(), xm.data(), em.data(), rm, 1.0f / rm, 0.9f, dreg);
      Buffer<float> dp = put(p), dx = put(xm), de = put(em), dg = put(Vec(p.size(), 0.0f));
      vg.forward_iw(dp.data(), dx.data(), de.data(), rm, 0.9f);
      vg.backward_iw(dp.data(), dg.data(), dx.data(), de.data(), rm, 1.0f / rm, 0.9f, dreg);
      Vec bound(rm), rec(rm);
      gpu->download(bound.data(), vg.iw_bound(), rm);
      gpu->download(rec.data(), vg.iw_rec(), rm);
      const std::string tag = std::string(use_conv ? "conv" : "mlp") + (dreg ? " DReG" : " IWAE");
      EXPECT_PARITY(norm_err(bound, Vec(vc.iw_bound(), vc.iw_bound() + rm)), 1e-5, tag << " bound");
      EXPECT_PARITY(norm_err(rec, Vec(vc.iw_rec(), vc.iw_rec() + rm)), 1e-5, tag << " mean rec");
      EXPECT_PARITY(norm_err(get(dg), gc), 1e-4, tag << " all gradients");
    }
}

// A recorded forward/backward (a CUDA graph) launched twice gives the bits of the
// same calls launched one by one; inputs changed between launches are picked up.
TEST_F(CudaParity, GraphReplayEqualsEagerLaunches) {
  ModelSpec ms;
  ms.encoder = {64};
  ms.decoder = {64};
  ms.latent = 5;
  const int D = 40, rows = 16;
  VaeLayout layout(ms, D);
  std::vector<double> init = layout.init_params(8);
  Vec p(init.begin(), init.end());
  Vae<float> vae(layout, *gpu, rows);
  Buffer<float> dp = put(p), dx(*gpu, size_t(rows) * D), de(*gpu, size_t(rows) * 5), dg(*gpu, p.size());
  auto work = [&vae, &g = *gpu, pp = dp.data(), gp = dg.data(), xp = dx.data(), ep = de.data(), n = p.size(), rows] {
    g.fill(gp, 0.0f, n);
    vae.forward(pp, xp, ep, rows);
    vae.backward(pp, gp, xp, ep, rows, 1.0f / rows, 0.5f / rows);
  };
  work();  // once op by op first, as the trainer does: lazy initialisation must not happen while recording
  std::unique_ptr<CapturedWork> graph = gpu->capture(work);
  for (int round = 0; round < 2; ++round) {
    const Vec x = random_vec(size_t(rows) * D, rng, 0, 1), eps = random_vec(size_t(rows) * 5, rng);
    gpu->upload(dx.data(), x.data(), x.size());
    gpu->upload(de.data(), eps.data(), eps.size());
    graph->launch();
    const Vec replayed = get(dg);
    work();
    const Vec eager = get(dg);
    EXPECT_EQ(replayed, eager) << "round " << round;
  }
}

// The bias gradients (column sums over the batch) at the batch sizes the benchmarks
// train with, where a reduction's order matters most.
TEST_F(CudaParity, BiasGradientsAtLargeBatch) {
  for (int rows : {128, 4096}) {
    const int cols = 400;
    Vec pre = random_vec(size_t(rows) * cols, rng, -2, 2), dout = random_vec(pre.size(), rng), db0 = random_vec(cols, rng);
    Vec out(pre.size()), dpre(pre.size()), db = db0;
    for (size_t i = 0; i < pre.size(); ++i) out[i] = pre[i] > 0 ? pre[i] : 0.0f;
    cpu.bias_act_backward(Activation::Relu, rows, cols, pre.data(), out.data(), dout.data(), dpre.data(), db.data());
    Buffer<float> gp = put(pre), go = put(out), gd = put(dout), gdb = put(db0), gdpre(*gpu, pre.size());
    gpu->bias_act_backward(Activation::Relu, rows, cols, gp.data(), go.data(), gd.data(), gdpre.data(), gdb.data());
    EXPECT_PARITY(norm_err(get(gdb), db), 1e-5, "linear bias grad, " << rows << " rows (accum)");
  }
  const int n = 1024, c = 32, hw = 196;
  Vec pre = random_vec(size_t(n) * c * hw, rng, -2, 2), dout = random_vec(pre.size(), rng), bias = random_vec(c, rng);
  Vec out(pre.size()), dpre(pre.size()), db(c, 0.0f), p = pre;
  cpu.channel_bias_act_forward(Activation::Relu, n, c, hw, bias.data(), p.data(), out.data());
  cpu.channel_bias_act_backward(Activation::Relu, n, c, hw, p.data(), out.data(), dout.data(), dpre.data(), db.data());
  Buffer<float> gp = put(pre), gb = put(bias), gd = put(dout), gdb = put(Vec(c, 0.0f)), gout(*gpu, pre.size()),
                gdpre(*gpu, pre.size());
  gpu->channel_bias_act_forward(Activation::Relu, n, c, hw, gb.data(), gp.data(), gout.data());
  gpu->channel_bias_act_backward(Activation::Relu, n, c, hw, gp.data(), gout.data(), gd.data(), gdpre.data(),
                                 gdb.data());
  EXPECT_PARITY(norm_err(get(gdb), db), 1e-5, "channel bias grad, " << n << " samples");
}

// A graph recorded at a small batch keeps working after a larger batch (an evaluation
// batch, an image grid) has grown the cuDNN workspace and the reduction scratch: the
// recording's buffers stay valid, so its replays still give the eager bits (and
// compute-sanitizer sees no access to freed memory).
TEST_F(CudaParity, GraphReplayAfterTheScratchMemoryGrows) {
#ifdef ELBO_HAVE_CUDA
  const ExperimentSpec spec = parse_spec(R"(
data: {train: unused}
model:
  type: conv
  latent: 4
  encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, {type: group_norm, groups: 4}, relu, flatten]
  decoder: [{type: linear, features: 512}, relu, {type: reshape, shape: [8, 8, 8]},
            {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]
)", "graph scratch spec");
  const VaeLayout layout(spec.model, std::vector<int>{1, 16, 16});
  const int small = 4, large = 512, D = layout.input_dim(), L = layout.latent();
  std::vector<double> init = layout.init_params(6);
  const Vec p(init.begin(), init.end());
  Buffer<float> dp = put(p), dg(*gpu, p.size());
  Buffer<float> dx = put(random_vec(size_t(large) * D, rng, 0, 1)), de = put(random_vec(size_t(large) * L, rng));
  Vae<float> vae_small(layout, *gpu, small), vae_large(layout, *gpu, large);
  auto step = [&](Vae<float>& vae, int rows) {
    gpu->fill(dg.data(), 0.0f, p.size());
    vae.forward(dp.data(), dx.data(), de.data(), rows);
    vae.backward(dp.data(), dg.data(), dx.data(), de.data(), rows, 1.0f / rows, 1.0f / rows);
  };
  step(vae_small, small);  // plans and scratch for the small shapes first, as the trainer does
  const Vec eager = get(dg);
  std::unique_ptr<CapturedWork> graph = gpu->capture([&] { step(vae_small, small); });
  auto& cuda = dynamic_cast<CudaBackend&>(*gpu);
  const size_t before = cuda.scratch_bytes();
  step(vae_large, large);
  const size_t after = cuda.scratch_bytes();
  std::printf("scratch memory: %zu bytes at %d rows, %zu after a step at %d rows\n", before, small, after, large);
  EXPECT_GT(after, before) << "the large batch must grow the scratch, or this test checks nothing";
  for (int round = 0; round < 2; ++round) {
    graph->launch();
    EXPECT_EQ(get(dg), eager) << "replay " << round << " after the growth";
  }
#else
  GTEST_SKIP() << "no GPU: built without CUDA";
#endif
}

// A conv VAE (conv, GroupNorm + activation, transposed conv) on cuDNN against the CPU.
TEST_F(CudaParity, WholeConvVaeForwardBackward) {
  const ExperimentSpec spec = parse_spec(R"(
data: {train: unused}
model:
  type: conv
  latent: 6
  encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, {type: group_norm, groups: 4}, relu,
            {type: conv2d, channels: 16, kernel: 3, stride: 2, padding: 1}, relu, flatten]
  decoder: [{type: linear, features: 256}, relu, {type: reshape, shape: [16, 4, 4]},
            {type: conv_transpose2d, channels: 8, kernel: 4, stride: 2, padding: 1}, softplus,
            {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]
)", "conv parity spec");
  const VaeLayout layout(spec.model, std::vector<int>{1, 16, 16});
  const int rows = 11, D = layout.input_dim(), L = layout.latent();
  std::vector<double> init = layout.init_params(4);
  Vec p(init.begin(), init.end()), x = random_vec(size_t(rows) * D, rng, 0, 1), eps = random_vec(rows * L, rng);
  Vae<float> vc(layout, cpu, rows), vg(layout, *gpu, rows);
  Vec gc(p.size(), 0.0f);
  vc.forward(p.data(), x.data(), eps.data(), rows);
  vc.backward(p.data(), gc.data(), x.data(), eps.data(), rows, 1.0f / rows, 1.0f / rows);
  Buffer<float> dp = put(p), dx = put(x), de = put(eps), dg = put(Vec(p.size(), 0.0f));
  vg.forward(dp.data(), dx.data(), de.data(), rows);
  vg.backward(dp.data(), dg.data(), dx.data(), de.data(), rows, 1.0f / rows, 1.0f / rows);
  Vec rec_c(vc.rec(), vc.rec() + rows), rec_g(rows);
  gpu->download(rec_g.data(), vg.rec(), rows);
  EXPECT_PARITY(norm_err(rec_g, rec_c), 1e-5, "conv vae rec");
  const Vec grads_g = get(dg);
  for (const auto& v : layout.views()) {
    Vec a(grads_g.begin() + v.offset, grads_g.begin() + v.offset + v.numel()),
        b(gc.begin() + v.offset, gc.begin() + v.offset + v.numel());
    EXPECT_PARITY(norm_err(a, b), 1e-4, "gradient of " << v.name);
  }
}

// The hierarchical model's ops: channel copies, pooling, unpooling and the Gaussian groups.
TEST_F(CudaParity, HierarchicalOps) {
  const int n = 5, c = 6, h = 12, w = 8, f = 4, zc = 3, hw = h * w;
  {
    const Vec src = random_vec(size_t(n) * c * hw, rng), dst0 = random_vec(size_t(n) * (c + 2) * hw, rng);
    for (int acc = 0; acc < 2; ++acc) {
      Vec want = dst0;
      cpu.channel_copy(n, hw, 4, src.data(), c, 1, want.data(), c + 2, 3, acc);
      Buffer<float> ds = put(src), dd = put(dst0);
      gpu->channel_copy(n, hw, 4, ds.data(), c, 1, dd.data(), c + 2, 3, acc);
      EXPECT_PARITY(norm_err(get(dd), want), 1e-7, "channel_copy accumulate " << acc);
    }
  }
  {
    const Vec x = random_vec(size_t(n) * c * hw, rng), small = random_vec(size_t(n) * c * hw / (f * f), rng);
    Vec pooled(small.size()), dx(x.size()), up(x.size()), dsmall(small.size());
    cpu.avg_pool_forward(n, c, h, w, f, x.data(), pooled.data());
    cpu.avg_pool_backward(n, c, h, w, f, small.data(), dx.data());
    cpu.unpool_forward(n, c, h / f, w / f, f, small.data(), up.data());
    cpu.unpool_backward(n, c, h / f, w / f, f, x.data(), dsmall.data());
    Buffer<float> gx = put(x), gs = put(small), g_pooled = put(pooled), g_dx = put(dx), g_up = put(up),
                  g_dsmall = put(dsmall);
    gpu->avg_pool_forward(n, c, h, w, f, gx.data(), g_pooled.data());
    gpu->avg_pool_backward(n, c, h, w, f, gs.data(), g_dx.data());
    gpu->unpool_forward(n, c, h / f, w / f, f, gs.data(), g_up.data());
    gpu->unpool_backward(n, c, h / f, w / f, f, gx.data(), g_dsmall.data());
    EXPECT_PARITY(norm_err(get(g_pooled), pooled), 1e-6, "avg_pool_forward");
    EXPECT_PARITY(norm_err(get(g_dx), dx), 1e-6, "avg_pool_backward");
    EXPECT_PARITY(norm_err(get(g_up), up), 1e-7, "unpool_forward");
    EXPECT_PARITY(norm_err(get(g_dsmall), dsmall), 1e-6, "unpool_backward");
  }
  {
    const size_t len = size_t(zc) * hw, qs = 2 * len + 3, ps = 2 * len + 7, es = len + 5;
    const Vec q = random_vec(n * qs, rng, -2, 2), p = random_vec(n * ps, rng, -2, 2), eps = random_vec(n * es, rng),
              dz = random_vec(n * len, rng), weight = {0.6f};
    Vec z(n * len), kl(2 * n), ratio(2 * n), dq(q.size(), 0.0f), dpv(p.size(), 0.0f);
    cpu.gaussian_sample(n, zc, hw, q.data(), qs, eps.data(), es, z.data());
    cpu.gaussian_kl_forward(n, zc, hw, q.data(), qs, p.data(), ps, eps.data(), es, kl.data(), ratio.data(), 2);
    cpu.gaussian_kl_backward(n, zc, hw, q.data(), qs, p.data(), ps, eps.data(), es, dz.data(), weight.data(), dq.data(),
                             dpv.data());
    Buffer<float> gq = put(q), gp = put(p), ge = put(eps), gdz = put(dz), gw = put(weight), gz = put(z),
                  gkl = put(Vec(2 * n, 0.0f)), gr = put(Vec(2 * n, 0.0f)), gdq = put(Vec(q.size(), 0.0f)),
                  gdp = put(Vec(p.size(), 0.0f));
    gpu->gaussian_sample(n, zc, hw, gq.data(), qs, ge.data(), es, gz.data());
    gpu->gaussian_kl_forward(n, zc, hw, gq.data(), qs, gp.data(), ps, ge.data(), es, gkl.data(), gr.data(), 2);
    gpu->gaussian_kl_backward(n, zc, hw, gq.data(), qs, gp.data(), ps, ge.data(), es, gdz.data(), gw.data(),
                              gdq.data(), gdp.data());
    EXPECT_PARITY(norm_err(get(gz), z), 1e-6, "gaussian_sample");
    EXPECT_PARITY(norm_err(get(gkl), kl), 1e-5, "gaussian_kl_forward kl");
    EXPECT_PARITY(norm_err(get(gr), ratio), 1e-5, "gaussian_kl_forward log_ratio");
    EXPECT_PARITY(norm_err(get(gdq), dq), 1e-5, "gaussian_kl_backward dq");
    EXPECT_PARITY(norm_err(get(gdp), dpv), 1e-5, "gaussian_kl_backward dp");
  }
}

// A whole hierarchical VAE on the GPU against the CPU: forward, per-group KL,
// log-ratio, every gradient, sampling.
void CudaParity::check_whole_hvae(const std::string& model_yaml) {
  const ExperimentSpec spec = parse_spec("data: {train: unused}\nmodel:\n" + model_yaml, "hierarchical parity spec");
  const HvaeLayout layout(spec.model, std::vector<int>{1, 16, 16});
  const int rows = 7, D = layout.input_dim(), G = layout.num_groups();
  const size_t E = layout.latent_size();
  std::vector<double> init = layout.init_params(5);
  Vec p(init.begin(), init.end());
  for (auto& v : p) v += 0.05f * random_vec(1, rng)[0];  // move the priors and h_top off their zero start
  const Vec x = random_vec(size_t(rows) * D, rng, 0, 1), eps = random_vec(rows * E, rng),
            kl_w = random_vec(G, rng, 0, 1);
  Hvae<float> mc(layout, cpu, rows), mg(layout, *gpu, rows);
  Vec gc(p.size(), 0.0f);
  mc.forward(p.data(), x.data(), eps.data(), rows);
  mc.backward(p.data(), gc.data(), x.data(), eps.data(), rows, 1.0f / rows, kl_w.data());
  Buffer<float> dp = put(p), dx = put(x), de = put(eps), dw = put(kl_w), dg = put(Vec(p.size(), 0.0f));
  mg.forward(dp.data(), dx.data(), de.data(), rows);
  mg.backward(dp.data(), dg.data(), dx.data(), de.data(), rows, 1.0f / rows, dw.data());
  auto fetch = [&](const float* d, size_t n) {
    Vec out(n);
    gpu->download(out.data(), d, n);
    return out;
  };
  EXPECT_PARITY(norm_err(fetch(mg.rec(), rows), Vec(mc.rec(), mc.rec() + rows)), 1e-5, "hvae rec");
  EXPECT_PARITY(norm_err(fetch(mg.kl_groups(), rows * G), Vec(mc.kl_groups(), mc.kl_groups() + rows * G)), 1e-5,
                "hvae kl per group");
  EXPECT_PARITY(norm_err(fetch(mg.log_ratio(), rows), Vec(mc.log_ratio(), mc.log_ratio() + rows)), 1e-4,
                "hvae log ratio");
  const Vec grads_g = get(dg);
  for (const auto& v : layout.views()) {
    Vec a(grads_g.begin() + v.offset, grads_g.begin() + v.offset + v.numel()),
        b(gc.begin() + v.offset, gc.begin() + v.offset + v.numel());
    EXPECT_PARITY(norm_err(a, b), 1e-4, "gradient of " << v.name);
  }
  mc.sample(p.data(), eps.data(), rows);
  mg.sample(dp.data(), de.data(), rows);
  const size_t n_out = size_t(rows) * layout.output_width();
  EXPECT_PARITY(norm_err(fetch(mg.output(), n_out), Vec(mc.output(), mc.output() + n_out)), 1e-5, "hvae prior sample");
}

// Three resolutions, pooling and unpooling, groups at each.
TEST_F(CudaParity, WholeHierarchicalVaeForwardBackwardAndSampling) {
  check_whole_hvae(R"(
  type: hierarchical
  width: 8
  bottleneck: 4
  activation: relu
  stages: [{down: 1, blocks: 1, groups: 1, latent: 2}, {down: 2, blocks: 2, groups: 2, latent: 3},
           {down: 4, blocks: 1, groups: 2, latent: 4, resample: conv}]
)");  // average pooling into stage 1, learned resampling (cuDNN) into stage 2
}

// Per-stage widths that grow and shrink (the stream padded and truncated, both ways),
// decoder-only blocks at full resolution without groups and lower down with them, and
// a width changed by a learned 1x1 conv (resample: conv, down 1).
TEST_F(CudaParity, WholeHierarchicalVaeWithPerStageWidthsAndDecoderBlocks) {
  check_whole_hvae(R"(
  type: hierarchical
  width: 8
  bottleneck: 4
  activation: relu
  stages: [{down: 1, blocks: 1, groups: 0, dec_blocks: 2, width: 4, bottleneck: 2},
           {down: 2, blocks: 2, groups: 2, latent: 3, dec_blocks: 1, width: 12},
           {down: 4, blocks: 1, groups: 2, latent: 4, width: 6, bottleneck: 8},
           {down: 1, blocks: 1, groups: 1, latent: 2, width: 10, resample: conv}]
)");  // the last stage: a learned 1x1 change of width
}

// The discretized logistic mixture (grayscale and RGB, several components) on the GPU
// against the CPU op: -log P per row, every output gradient and the mean; then a
// whole RGB conv VAE with this likelihood.
TEST_F(CudaParity, DiscretizedLogisticMixture) {
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto [C, K] : {std::pair{1, 1}, std::pair{1, 5}, std::pair{3, 4}}) {
    const DlmShape s{C, 150, K};  // more pixels than a block's threads
    const int rows = 7;
    Vec out = random_vec(rows * s.out_width(), rng, -2, 1), x(size_t(rows) * s.dim());
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 17 == 0 ? 0 : i % 17 == 1 ? 255 : byte(rng)) / 255.0f;
    Vec nll(rows), dout(out.size()), mean(x.size());
    cpu.dlm_forward(s, rows, out.data(), x.data(), nll.data());
    cpu.dlm_backward(s, rows, out.data(), x.data(), 0.3f, dout.data());
    cpu.dlm_mean(s, rows, out.data(), mean.data());
    Buffer<float> go = put(out), gx = put(x), gn(*gpu, rows), gd(*gpu, out.size()), gm(*gpu, x.size());
    gpu->dlm_forward(s, rows, go.data(), gx.data(), gn.data());
    gpu->dlm_backward(s, rows, go.data(), gx.data(), 0.3f, gd.data());
    gpu->dlm_mean(s, rows, go.data(), gm.data());
    const std::string tag = "C" + std::to_string(C) + " K" + std::to_string(K);
    EXPECT_PARITY(norm_err(get(gn), nll), 1e-5, tag << " dlm nll");
    EXPECT_PARITY(norm_err(get(gd), dout), 1e-5, tag << " dlm dout");
    EXPECT_PARITY(norm_err(get(gm), mean), 1e-6, tag << " dlm mean");
  }
  const ExperimentSpec spec = parse_spec(R"(
data: {train: unused}
model:
  type: conv
  latent: 6
  likelihood: {type: discretized_logistic_mixture, components: 3}
  encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, relu, flatten]
  decoder: [{type: linear, features: 128}, relu, {type: reshape, shape: [8, 4, 4]},
            {type: conv_transpose2d, channels: 30, kernel: 4, stride: 2, padding: 1}]
)", "dlm parity spec");
  const VaeLayout layout(spec.model, std::vector<int>{3, 8, 8});
  const int rows = 5, D = layout.input_dim(), L = layout.latent();
  std::vector<double> init = layout.init_params(9);
  Vec p(init.begin(), init.end()), x(size_t(rows) * D), eps = random_vec(rows * L, rng);
  for (auto& v : x) v = byte(rng) / 255.0f;
  Vae<float> vc(layout, cpu, rows), vg(layout, *gpu, rows);
  Vec gc(p.size(), 0.0f);
  vc.forward(p.data(), x.data(), eps.data(), rows);
  vc.backward(p.data(), gc.data(), x.data(), eps.data(), rows, 1.0f / rows, 1.0f / rows);
  Buffer<float> dp = put(p), dx = put(x), de = put(eps), dg = put(Vec(p.size(), 0.0f));
  vg.forward(dp.data(), dx.data(), de.data(), rows);
  vg.backward(dp.data(), dg.data(), dx.data(), de.data(), rows, 1.0f / rows, 1.0f / rows);
  Vec rec_c(vc.rec(), vc.rec() + rows), rec_g(rows);
  gpu->download(rec_g.data(), vg.rec(), rows);
  EXPECT_PARITY(norm_err(rec_g, rec_c), 1e-5, "rgb dlm vae rec");
  EXPECT_PARITY(norm_err(get(dg), gc), 1e-4, "rgb dlm vae all gradients");
}

}  // namespace
}  // namespace elbo
