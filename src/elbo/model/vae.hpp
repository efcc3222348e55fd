// The MLP VAE: a table of named views into ONE flat parameter buffer (and the same
// offsets into ONE flat gradient buffer), with forward and backward written out.
// Rule for backward: parameter gradients accumulate (+=), activation gradients are
// written (=).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"

namespace elbo {

// A named tensor inside the flat buffer, in PyTorch nn.Linear layout
// (weight (out, in), bias (out)), so exported names read like a state_dict.
struct ParamView {
  std::string name;
  size_t offset = 0;
  std::vector<int> shape;
  size_t numel() const {
    size_t n = 1;
    for (int d : shape) n *= static_cast<size_t>(d);
    return n;
  }
};

// Shape-only description of the network, shared by all replicas and both dtypes.
class VaeLayout {
 public:
  VaeLayout(const ModelSpec& spec, int input_dim);

  struct Linear {
    int in = 0, out = 0;
    size_t w = 0, b = 0;  // offsets of weight (out, in) and bias (out)
  };

  const ModelSpec& spec() const { return m_spec; }
  int input_dim() const { return m_input_dim; }
  int latent() const { return m_spec.latent; }
  // Width of the decoder output: D, or 2D ([mean | logvar]) for a learned variance.
  int output_width() const { return m_dec_out.out; }
  size_t num_params() const { return m_num_params; }
  const std::vector<ParamView>& views() const { return m_views; }
  const ParamView& view(const std::string& name) const;

  const std::vector<Linear>& encoder() const { return m_enc; }
  const Linear& encoder_head() const { return m_enc_head; }  // -> (mu | logvar), 2L outputs
  const std::vector<Linear>& decoder() const { return m_dec; }
  const Linear& decoder_out() const { return m_dec_out; }
  int max_width() const { return m_max_width; }

  // PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
  // biases, drawn from Philox keyed by (seed, element index): identical on every rank.
  std::vector<double> init_params(uint64_t seed) const;

 private:
  Linear add_linear(int in, int out, const std::vector<std::string>& names, size_t rows_per_name);

  ModelSpec m_spec;
  int m_input_dim = 0;
  size_t m_num_params = 0;
  int m_max_width = 0;
  std::vector<Linear> m_enc, m_dec;
  Linear m_enc_head, m_dec_out;
  std::vector<ParamView> m_views;
};

// Activations of one forward pass, sized for up to `rows` samples. Kept by the
// caller so repeated steps allocate nothing.
template <class T>
class Vae {
 public:
  Vae(const VaeLayout& layout, Backend<T>& backend, int max_rows);

  const VaeLayout& layout() const { return m_layout; }
  int max_rows() const { return m_max_rows; }

  // x (rows, D), eps (rows, L) -> rec[r] = -log p(x_r|z_r), kl[r] = KL(q(z|x_r) || p(z)).
  void forward(const T* params, const T* x, const T* eps, int rows);
  // grads += d/dparams [ rec_weight * sum_r rec[r] + kl_weight * sum_r kl[r] ] for the
  // last forward pass (same params, x, eps, rows). Layers sit in the flat buffer in
  // forward order, so backward finalises it from the end: after each layer,
  // `grads_ready(offset)` (when given) says grads[offset, P) are final, which lets the
  // gradient all-reduce start while the earlier layers are still being differentiated.
  void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T kl_weight,
                const std::function<void(size_t)>& grads_ready = {});
  // Encoder only: x (rows, D) -> mulv() (rows, 2L) = [mu | logvar].
  void encode(const T* params, const T* x, int rows);
  // Decoder only: z (rows, L) -> decoder output (rows, output_width).
  void decode(const T* params, const T* z, int rows);

  // Results of the last pass, in backend memory.
  const T* rec() const { return m_rec.data(); }
  const T* kl() const { return m_kl.data(); }
  const T* mulv() const { return m_mulv.data(); }    // (rows, 2L) = [mu | logvar]
  const T* z() const { return m_z.data(); }          // (rows, L)
  const T* output() const { return m_out.data(); }   // (rows, output_width)

 private:
  void linear_forward(const typename VaeLayout::Linear& l, const T* params, const T* in, int rows, T* pre);
  void linear_backward(const typename VaeLayout::Linear& l, const T* params, T* grads, const T* in,
                       const T* dpre, int rows, T* din);
  void decoder_forward(const T* params, const T* z, int rows);

  const VaeLayout& m_layout;
  Backend<T>& m_be;
  int m_max_rows;
  // Per hidden layer: pre-activation and activation, (rows, width).
  std::vector<Buffer<T>> m_enc_pre, m_enc_act, m_dec_pre, m_dec_act;
  Buffer<T> m_mulv;           // (rows, 2L)
  Buffer<T> m_z;              // (rows, L)
  Buffer<T> m_out;            // (rows, output_width)
  Buffer<T> m_rec, m_kl;      // (rows)
  Buffer<T> m_grad_a, m_grad_b;  // (rows, max width): activation gradients, ping-pong
};

}  // namespace elbo
