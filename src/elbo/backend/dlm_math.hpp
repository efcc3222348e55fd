// The discretized logistic mixture's per-pixel math, written once for the CPU
// reference (float and double) and the CUDA kernels (float), so the two backends
// cannot drift apart. Internal to backend/: ops reach it through Backend::dlm_*.
//
// What it computes, and the choices made (PixelCNN++, Salimans et al. 2017; VDVAE and
// NVAE use the same):
// - A pixel byte b arrives as x = b/255 (data/sampler.cpp). It is recovered exactly as
//   b = round(255 x) and rescaled to v = 2b/255 - 1 in [-1, 1]: bins of half-width
//   1/255 centred on the 256 values. The edge bins integrate to the ends: b = 0 takes
//   (-inf, v + 1/255], b = 255 takes [v - 1/255, +inf), so the 256 probabilities sum to 1.
// - Component k of channel c is a logistic with mean m_ck = mean_ck + sum_{j<c}
//   tanh(coeff_cjk) v_j (the channel-autoregressive means of PixelCNN++/VDVAE: for RGB
//   the mean of G depends on R, B's on R and G) and log-scale max(ls_ck, -7)
//   (PixelCNN++'s floor; no gradient below it). A component's channels multiply; the
//   mixture weights are softmax(logits): log P = logsumexp_k(logit_k + sum_c log p_ck)
//   - logsumexp_k(logit_k), both log-sum-exps taken online from the largest term.
// - A middle bin's log-mass log(sigmoid(a) - sigmoid(b)), a = (v - m + 1/255)/s, b = (v
//   - m - 1/255)/s, is taken in log space as -softplus(-a) - softplus(b) + log(1 -
//   exp(b - a)), which does not cancel when both CDFs are near 0 or 1. Where the mass is
//   below 1e-5 PixelCNN++ switches to the log-density at the bin centre times the bin
//   width (log pdf(v) - log 127.5); that branch is kept, under the same condition, so
//   the numbers are the ones the papers report.
// - The mean shown in image grids is the mixture's mean per channel, sum_k pi_k
//   E_k[x_c] with E_k[x_c] = mean_ck + sum_{j<c} tanh(coeff_cjk) E_k[x_j] (the logistic
//   is symmetric; the edge bins' clipping is ignored), mapped to [0, 1] and clamped.
#pragma once

#include <cmath>
#include <cstddef>

#include "elbo/backend/backend.hpp"

namespace elbo::dlm {

// Overloads that resolve to the float or double C functions on the host and on the device.
ELBO_HD float exp_(float x) { return expf(x); }
ELBO_HD double exp_(double x) { return exp(x); }
ELBO_HD float log_(float x) { return logf(x); }
ELBO_HD double log_(double x) { return log(x); }
ELBO_HD float log1p_(float x) { return log1pf(x); }
ELBO_HD double log1p_(double x) { return log1p(x); }
ELBO_HD float expm1_(float x) { return expm1f(x); }
ELBO_HD double expm1_(double x) { return expm1(x); }
ELBO_HD float tanh_(float x) { return tanhf(x); }
ELBO_HD double tanh_(double x) { return tanh(x); }
ELBO_HD float abs_(float x) { return fabsf(x); }
ELBO_HD double abs_(double x) { return fabs(x); }

template <class T>
ELBO_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + log1p_(exp_(-abs_(x)));
}
template <class T>
ELBO_HD T sigmoid(T x) {
  const T e = exp_(-abs_(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

constexpr double kMinLogScale = -7.0;                  // PixelCNN++'s floor on the log-scale
constexpr double kHalfBin = 1.0 / 255.0;               // half a bin on the [-1, 1] scale
constexpr double kLogMassFloor = -11.512925464970229;  // log(1e-5): PixelCNN++'s switch to the mid-bin density
constexpr double kLogHalfBins = 4.8481163645776177;    // log(127.5): the bin width is 1/127.5

// The pixel byte of an input value x = b/255 (clamped, so any float maps to a bin).
template <class T>
ELBO_HD int bin_of(T x) {
  const T b = x * T(255) + T(0.5);
  return b <= T(0) ? 0 : b >= T(255) ? 255 : static_cast<int>(b);
}
template <class T>
ELBO_HD T rescaled(int b) {
  return static_cast<T>(b) * T(2.0 / 255.0) - T(1);
}

// log P(bin b | logistic(mu, e^ls)) and its derivatives in mu and ls (the floored log-scale).
template <class T>
struct BinTerm {
  T logp, dmu, dls;
};
template <class T>
ELBO_HD BinTerm<T> bin_term(int b, T v, T mu, T ls) {
  const T inv = exp_(-ls);
  const T c = v - mu;
  const T plus = inv * (c + T(kHalfBin)), minus = inv * (c - T(kHalfBin));
  BinTerm<T> t;
  if (b == 0) {  // log sigmoid(plus): all the mass below the bin's upper edge
    const T s = sigmoid(-plus);
    t.logp = -softplus(-plus);
    t.dmu = -inv * s;
    t.dls = -plus * s;
    return t;
  }
  if (b == 255) {  // log(1 - sigmoid(minus)): all the mass above the lower edge
    const T s = sigmoid(minus);
    t.logp = -softplus(minus);
    t.dmu = inv * s;
    t.dls = minus * s;
    return t;
  }
  const T d = plus - minus;  // 2 inv / 255 > 0
  const T log_mass = -softplus(-plus) - softplus(minus) + log_(-expm1_(-d));
  if (log_mass > T(kLogMassFloor)) {
    const T sp = sigmoid(-plus), sm = sigmoid(minus);
    // d/d(plus) = sigmoid(-plus) + 1/expm1(d), d/d(minus) = -sigmoid(minus) - 1/expm1(d);
    // the 1/expm1 terms cancel in mu and leave d/expm1(d) (-> 1 as d -> 0) in ls.
    const T q = d > T(0) ? d / expm1_(d) : T(1);
    t.logp = log_mass;
    t.dmu = -inv * (sp - sm);
    t.dls = -plus * sp + minus * sm - q;
    return t;
  }
  const T mid = inv * c;
  const T g = T(1) - T(2) * sigmoid(mid);
  t.logp = mid - ls - T(2) * softplus(mid) - T(kLogHalfBins);
  t.dmu = -inv * g;
  t.dls = -mid * g - T(1);
  return t;
}

// A running log-sum-exp: m + log(s) over the values added.
template <class T>
struct OnlineLse {
  T m = T(0), s = T(0);
  bool empty = true;
  ELBO_HD void add(T v) {
    if (empty) {
      m = v;
      s = T(1);
      empty = false;
    } else if (v > m) {
      s = s * exp_(m - v) + T(1);
      m = v;
    } else {
      s += exp_(v - m);
    }
  }
  ELBO_HD T value() const { return m + log_(s); }
};

// One pixel: o points at its first output value, x at its channel 0 (both stride hw).
template <class T>
struct Pixel {
  const DlmShape& s;
  const T* o;
  const T* x;
  int bins[DlmShape::kMaxChannels];
  T v[DlmShape::kMaxChannels];

  // in may be null for mean_pixel, which reads no pixel values.
  ELBO_HD Pixel(const DlmShape& shape, const T* out, const T* in) : s(shape), o(out), x(in) {
    for (int c = 0; c < s.channels && x != nullptr; ++c) {
      bins[c] = bin_of(x[static_cast<size_t>(c) * s.hw]);
      v[c] = rescaled<T>(bins[c]);
    }
  }
  ELBO_HD size_t at(int group, int k) const { return (static_cast<size_t>(group) * s.components + k) * s.hw; }
  ELBO_HD size_t logit(int k) const { return at(0, k); }
  ELBO_HD size_t mean(int c, int k) const { return at(1 + c, k); }
  ELBO_HD size_t log_scale(int c, int k) const { return at(1 + s.channels + c, k); }
  ELBO_HD size_t coeff(int c, int j, int k) const { return at(1 + 2 * s.channels + c * (c - 1) / 2 + j, k); }

  // Component k's mean for channel c given the channels before it.
  ELBO_HD T mu(int c, int k) const {
    T m = o[mean(c, k)];
    for (int j = 0; j < c; ++j) m += tanh_(o[coeff(c, j, k)]) * v[j];
    return m;
  }
  ELBO_HD T floored_log_scale(int c, int k) const {
    const T ls = o[log_scale(c, k)];
    return ls > T(kMinLogScale) ? ls : T(kMinLogScale);
  }
  // logit_k + sum_c log p_ck: component k's joint log-probability, unnormalized.
  ELBO_HD T component(int k) const {
    T acc = o[logit(k)];
    for (int c = 0; c < s.channels; ++c) acc += bin_term(bins[c], v[c], mu(c, k), floored_log_scale(c, k)).logp;
    return acc;
  }
  // log P(x) of the pixel's C values.
  ELBO_HD T log_prob() const {
    OnlineLse<T> joint, logits;
    for (int k = 0; k < s.components; ++k) {
      joint.add(component(k));
      logits.add(o[logit(k)]);
    }
    return joint.value() - logits.value();
  }
  // g (stride hw, like o) = weight * d(-log P(x)) / d o, every output value written.
  // One pass over the components evaluates each bin once: it writes every channel's
  // unscaled d log p_ck and parks component k's joint log-probability in g's logit
  // slot; a second, cheap pass scales them by -weight * responsibility_k.
  ELBO_HD void backward(T weight, T* g) const {
    OnlineLse<T> joint_lse, logits;
    for (int k = 0; k < s.components; ++k) {
      T joint = o[logit(k)];
      for (int c = 0; c < s.channels; ++c) {
        const T raw_ls = o[log_scale(c, k)];
        const BinTerm<T> t = bin_term(bins[c], v[c], mu(c, k), floored_log_scale(c, k));
        joint += t.logp;
        g[mean(c, k)] = t.dmu;
        g[log_scale(c, k)] = raw_ls > T(kMinLogScale) ? t.dls : T(0);
        for (int j = 0; j < c; ++j) {
          const T a = tanh_(o[coeff(c, j, k)]);
          g[coeff(c, j, k)] = t.dmu * (T(1) - a * a) * v[j];
        }
      }
      g[logit(k)] = joint;
      joint_lse.add(joint);
      logits.add(o[logit(k)]);
    }
    const T lse_joint = joint_lse.value(), lse_logits = logits.value();
    for (int k = 0; k < s.components; ++k) {
      const T resp = exp_(g[logit(k)] - lse_joint), prior = exp_(o[logit(k)] - lse_logits);
      const T f = -weight * resp;
      for (int c = 0; c < s.channels; ++c) {
        g[mean(c, k)] *= f;
        g[log_scale(c, k)] *= f;
        for (int j = 0; j < c; ++j) g[coeff(c, j, k)] *= f;
      }
      g[logit(k)] = weight * (prior - resp);
    }
  }
  // m (stride hw) = the mixture's mean per channel in [0, 1].
  ELBO_HD void mean_pixel(T* m) const {
    T lse_logits;
    {
      OnlineLse<T> logits;
      for (int k = 0; k < s.components; ++k) logits.add(o[logit(k)]);
      lse_logits = logits.value();
    }
    T acc[DlmShape::kMaxChannels] = {};
    for (int k = 0; k < s.components; ++k) {
      const T pi = exp_(o[logit(k)] - lse_logits);
      T e[DlmShape::kMaxChannels];
      for (int c = 0; c < s.channels; ++c) {
        e[c] = o[mean(c, k)];
        for (int j = 0; j < c; ++j) e[c] += tanh_(o[coeff(c, j, k)]) * e[j];
        acc[c] += pi * e[c];
      }
    }
    for (int c = 0; c < s.channels; ++c) {
      const T p = (acc[c] + T(1)) * T(0.5);
      m[static_cast<size_t>(c) * s.hw] = p < T(0) ? T(0) : p > T(1) ? T(1) : p;
    }
  }
};

}  // namespace elbo::dlm
