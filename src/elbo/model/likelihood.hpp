// The decoder's likelihood p(x|z) as the models call it: the spec's type and the
// shapes its backend op needs (the discretized logistic mixture reads the channels,
// the pixels per channel and K), so each model makes one call per use whatever the type.
#pragma once

#include <cmath>
#include <string>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

// A negative log-likelihood of D 8-bit values in bits/dim, nats / (D ln 2): the unit
// of PixelCNN++, NVAE and VDVAE.
inline double bits_per_dim(double nats, int dim) { return nats / (dim * std::log(2.0)); }

struct LikelihoodOp {
  Likelihood type = Likelihood::Bernoulli;
  double sigma = 1.0;
  DlmShape dlm;  // discretized_logistic_mixture only
  int dim = 0;   // D = C * H * W values per sample

  LikelihoodOp(const ModelSpec& spec, int channels, int hw) : type(spec.likelihood), sigma(spec.sigma) {
    dim = channels * hw;
    dlm = DlmShape{channels, hw, spec.components};
    if (is_dlm() && (channels < 1 || channels > DlmShape::kMaxChannels))
      throw config_error("model.likelihood: discretized_logistic_mixture takes images of 1 to " +
                         std::to_string(DlmShape::kMaxChannels) + " channels (this data has " +
                         std::to_string(channels) + ")");
  }
  bool is_dlm() const { return type == Likelihood::DiscretizedLogisticMixture; }
  // Decoder output values per sample: D, 2D ([mean | logvar]) or the mixture's K*groups per pixel.
  size_t output_width() const {
    if (is_dlm()) return dlm.out_width();
    return static_cast<size_t>(dim) * (type == Likelihood::GaussianLearned ? 2 : 1);
  }

  // nll[r] = -log p(x_r | out_r), nats.
  template <class T>
  void forward(Backend<T>& be, int rows, const T* out, const T* x, T* nll) const {
    if (is_dlm())
      be.dlm_forward(dlm, rows, out, x, nll);
    else
      be.likelihood_forward(type, static_cast<T>(sigma), rows, dim, out, x, nll);
  }
  // dout (written) = weight * d nll / d out.
  template <class T>
  void backward(Backend<T>& be, int rows, const T* out, const T* x, T weight, T* dout) const {
    if (is_dlm())
      be.dlm_backward(dlm, rows, out, x, weight, dout);
    else
      be.likelihood_backward(type, static_cast<T>(sigma), rows, dim, out, x, weight, dout);
  }
  // mean (rows, D): what image grids show.
  template <class T>
  void mean(Backend<T>& be, int rows, const T* out, T* m) const {
    if (is_dlm())
      be.dlm_mean(dlm, rows, out, m);
    else
      be.likelihood_mean(type, rows, dim, out, m);
  }
};

}  // namespace elbo
