// The VAE, MLP or convolutional: a list of layers whose parameters are named views
// into ONE flat parameter buffer (and the same offsets into ONE flat gradient
// buffer), with forward and backward written out per layer kind.
// Rule for backward: parameter gradients accumulate (+=), activation gradients are
// written (=).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/likelihood.hpp"
#include "elbo/model/model.hpp"  // ModelLayout, Model, ParamView, TensorShape

namespace elbo {

enum class LayerKind { Linear, Conv2d, ConvTranspose2d, GroupNorm };

// One layer with parameters, and the activation fused after it. Weight layouts are
// PyTorch's: Linear (out, in), Conv2d (out, in, k, k), ConvTranspose2d (in, out, k, k);
// GroupNorm's gamma and beta sit where weight and bias would.
struct Layer {
  LayerKind kind = LayerKind::Linear;
  TensorShape in, out;
  Activation act = Activation::Identity;
  int kernel = 1, stride = 1, pad = 0, groups = 1;
  size_t w = 0, b = 0;  // offsets of weight (or gamma) and bias (or beta) in the flat buffer
  // The convolution this layer computes (read backwards for ConvTranspose2d) on `rows` samples.
  ConvShape conv(int rows) const;
};

// Shape-only description of the network, shared by all replicas and both dtypes:
// encoder layers (the last is the linear head to [mu | logvar]) and decoder layers
// (the last produces the likelihood's parameters in the input's shape).
class VaeLayout final : public ModelLayout {
 public:
  // `input_shape` is [C, H, W] from the data; an MLP flattens it.
  VaeLayout(const ModelSpec& spec, const std::vector<int>& input_shape);
  VaeLayout(const ModelSpec& spec, int input_dim) : VaeLayout(spec, std::vector<int>{1, 1, input_dim}) {}

  const ModelSpec& spec() const override { return m_spec; }
  const TensorShape& input_shape() const override { return m_input; }
  int latent() const { return m_spec.latent; }
  // Width of the decoder output: D, 2D ([mean | logvar]) for a learned variance, or the
  // discretized logistic mixture's K*(1 + 2C + C(C-1)/2) values per pixel.
  int output_width() const override { return static_cast<int>(m_dec.back().out.size()); }
  // Length of the flat buffers (the views plus alignment gaps between layers).
  size_t num_params() const override { return m_num_params; }
  // Trainable values: the sum of the views' sizes, what a user calls the model's size.
  size_t num_values() const override { return m_num_values; }
  static constexpr size_t kParamAlign = 16;  // floats: 64 bytes
  const std::vector<ParamView>& views() const override { return m_views; }
  // eps (rows, L); the KL's parts are the L latent dimensions.
  size_t eps_per_row() const override { return static_cast<size_t>(latent()); }
  int kl_parts() const override { return latent(); }

  const std::vector<Layer>& encoder() const { return m_enc; }
  const std::vector<Layer>& decoder() const { return m_dec; }
  size_t max_width() const { return m_max_width; }  // largest per-sample tensor between layers

  // PyTorch's defaults: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for Linear and convolution
  // weights and biases (fan_in of ConvTranspose2d from weight dim 1, as PyTorch
  // computes it), gamma = 1 and beta = 0 for GroupNorm; drawn from Philox keyed by
  // (seed, element index): identical on every rank.
  std::vector<double> init_params(uint64_t seed) const override;

 private:
  void build_mlp();
  void build_conv();
  // Appends a layer's parameters; names maps each name to the rows of the weight it owns
  // (the linear head exports mu and logvar separately from one matrix).
  Layer& add(std::vector<Layer>& to, Layer l, const std::vector<std::string>& names);
  std::vector<Layer> build_list(const std::vector<LayerSpec>& list, TensorShape shape, const std::string& key,
                                const std::string& prefix, std::vector<Layer>& to);

  ModelSpec m_spec;
  TensorShape m_input;
  size_t m_num_params = 0;
  size_t m_num_values = 0;
  size_t m_max_width = 0;
  std::vector<Layer> m_enc, m_dec;
  std::vector<ParamView> m_views;
};

// Activations of one forward pass, sized for up to `rows` samples. Kept by the
// caller so repeated steps allocate nothing.
template <class T>
class Vae final : public Model<T> {
 public:
  // iw_samples > 0 also sizes the importance-weighted passes (forward_iw, backward_iw)
  // for that many samples per input: the decoder's workspace holds max_rows * k rows.
  Vae(const VaeLayout& layout, Backend<T>& backend, int max_rows, int iw_samples = 0);

  const VaeLayout& layout() const { return m_layout; }
  const ModelLayout& model_layout() const override { return m_layout; }
  int max_rows() const override { return m_max_rows; }
  int iw_samples() const { return m_k; }

  // x (rows, D), eps (rows, L) -> rec[r] = -log p(x_r|z_r), kl[r] = KL(q(z|x_r) || p(z)).
  // Before each layer, `params_needed(end)` (when given) asks for params[0, end) to be
  // final, where end is past the layer's last parameter: a sharded optimizer's
  // all-gather of the later layers then overlaps the earlier layers' forward pass.
  void forward(const T* params, const T* x, const T* eps, int rows,
               const std::function<void(size_t)>& params_needed = {}) override;
  // grads += d/dparams [ rec_weight * sum_r rec[r] + kl_weight * sum_r kl[r] ] for the
  // last forward pass (same params, x, eps, rows). Layers sit in the flat buffer in
  // forward order, so backward finalises it from the end: after each layer,
  // `grads_ready(offset)` (when given) says grads[offset, P) are final, which lets the
  // gradient all-reduce start while the earlier layers are still being differentiated.
  void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T kl_weight,
                const std::function<void(size_t)>& grads_ready = {}) override;
  // The same with one KL weight per latent dimension: kl_weights (L, backend memory)
  // weighs sum_r KL_rj (free bits: 0 for the dimensions of a clamped group).
  void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, const T* kl_weights,
                const std::function<void(size_t)>& grads_ready = {}) override;
  // The importance-weighted bound (Burda et al. 2015) with k = iw_samples() samples per
  // input: eps (rows*k, L), sample i of input r in row r*k + i. The encoder runs once per
  // input, the decoder once per sample. With log w = -(nll + beta (log q - log p)) per
  // sample, iw_bound()[r] = -log (1/k sum_i w_ri) (beta 1: the IWAE bound; below 1, a
  // KL warm-up's tempered one); iw_rec()[r] is the mean nll over the samples and kl()[r]
  // the closed-form KL, so iw_rec + kl is the usual one-sample ELBO's expectation.
  void forward_iw(const T* params, const T* x, const T* eps, int rows, T beta,
                  const std::function<void(size_t)>& params_needed = {});
  // grads += d/dparams [ rec_weight * sum_r iw_bound[r] ] for the last forward_iw (same
  // arguments). dreg: the encoder gets the doubly reparameterized gradient estimator
  // (Tucker et al. 2018) instead of the plain reparameterized one; the decoder's
  // gradient is the same either way. grads_ready as in backward.
  void backward_iw(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T beta, bool dreg,
                   const std::function<void(size_t)>& grads_ready = {});
  // Encoder only: x (rows, D) -> mulv() (rows, 2L) = [mu | logvar]. params_needed as in forward.
  void encode(const T* params, const T* x, int rows, const std::function<void(size_t)>& params_needed = {});
  // Decoder only: z (rows, L) -> decoder output (rows, output_width).
  void decode(const T* params, const T* z, int rows);
  // The prior is N(0, I): z = eps (rows, L), decoded.
  void sample_prior(const T* params, const T* eps, int rows) override { decode(params, eps, rows); }

  // Results of the last pass, in backend memory.
  const T* rec() const override { return m_rec.data(); }  // after forward_iw: (rows*k), per sample
  const T* kl() const override { return m_kl.data(); }
  const T* mulv() const { return m_enc_acts.back().out(); }  // (rows, 2L) = [mu | logvar]
  const T* z() const { return m_z.data(); }                     // (rows, L)
  const T* output() const override { return m_dec_acts.back().out(); }  // (rows, output_width); forward_iw: rows*k
  const T* iw_bound() const { return m_bound.data(); }                  // (rows), after forward_iw
  const T* iw_rec() const { return m_rec_mean.data(); }                 // (rows), after forward_iw

 private:
  // One layer: in -> pre-activation (m_pre[i]) -> output (m_act[i], or pre itself when
  // the activation is the identity); stats holds GroupNorm's per-group [mean, rstd].
  struct Acts {
    Buffer<T> pre, act, stats;
    T* out() { return act.size() > 0 ? act.data() : pre.data(); }
    const T* out() const { return act.size() > 0 ? act.data() : pre.data(); }
  };
  void layer_forward(const Layer& l, const T* params, const T* in, int rows, Acts& a);
  // g holds d(output) on entry and d(pre-activation) after; din (may be null) gets d(input).
  void layer_backward(const Layer& l, const T* params, T* grads, const T* in, int rows, Acts& a, T* g, T* din);
  void decoder_forward(const T* params, const T* z, int rows, const std::function<void(size_t)>& params_needed = {});
  // The layers' backward passes: g holds d(output) on entry; the result (dz for the
  // decoder) is in the returned buffer, the other one is free.
  T* decoder_backward(const T* params, T* grads, int rows, T* g, T* h, const std::function<void(size_t)>& grads_ready);
  void encoder_backward(const T* params, T* grads, const T* x, int rows, T* g, T* h,
                        const std::function<void(size_t)>& grads_ready);
  std::vector<Acts> make_acts(const std::vector<Layer>& layers, size_t rows);

  const VaeLayout& m_layout;
  Backend<T>& m_be;
  int m_max_rows;
  int m_k;                                   // importance samples per input the workspaces hold (0: none)
  std::vector<Acts> m_enc_acts, m_dec_acts;  // per layer; the last encoder one is [mu | logvar]
  Buffer<T> m_z;                             // (rows, L), or (rows*k, L)
  Buffer<T> m_rec, m_kl;                     // (rows), or (rows*k) for rec
  // Importance-weighted passes: the inputs repeated k times (rows*k, D), per sample
  // log q - log p and normalized weights (rows*k), per input bound and mean nll (rows),
  // and k values of 1/k (the mean as a GEMM against it).
  Buffer<T> m_xk, m_log_ratio, m_weights, m_bound, m_rec_mean, m_mean_k;
  Buffer<T> m_kl_weights;     // (L): the scalar backward's weight, repeated
  Buffer<T> m_grad_a, m_grad_b;  // (rows, max width): activation gradients, ping-pong
};

}  // namespace elbo
