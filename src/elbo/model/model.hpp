// What the trainer, evaluation and generation need of a model, whichever its type:
// the flat-buffer layout (ModelLayout: views, size, initialization, eps per row, the
// KL's parts) and the passes (Model<T>: forward, backward with per-part KL weights,
// per-row results, prior sampling). VaeLayout/Vae (mlp, conv) and HvaeLayout/Hvae
// (hierarchical) implement them; make_layout and make_model pick by model.type.
// What only one model has (the Vae's importance-weighted passes and its posterior
// [mu | logvar]; the Hvae's per-group KL) stays on the concrete class.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/likelihood.hpp"

namespace elbo {

// A named tensor inside the flat buffer, in PyTorch's layout (Linear (out, in),
// Conv2d (out, in, k, k), ...), so exported names read like a state_dict.
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

// Per-sample tensor shape (C, H, W); a feature vector is (F, 1, 1).
struct TensorShape {
  int c = 1, h = 1, w = 1;
  size_t size() const { return static_cast<size_t>(c) * h * w; }
  bool operator==(const TensorShape&) const = default;
};

class ModelLayout {
 public:
  virtual ~ModelLayout() = default;
  virtual const ModelSpec& spec() const = 0;
  virtual const TensorShape& input_shape() const = 0;
  int input_dim() const { return static_cast<int>(input_shape().size()); }
  // The likelihood over the input: the op every use of the decoder output calls.
  LikelihoodOp likelihood() const { return LikelihoodOp(spec(), input_shape().c, input_shape().h * input_shape().w); }
  // Width of the decoder output: D, or 2D ([mean | logvar]) for a learned variance.
  virtual int output_width() const = 0;
  // Length of the flat buffers (the views plus alignment gaps).
  virtual size_t num_params() const = 0;
  // Trainable values: the sum of the views' sizes, what a user calls the model's size.
  virtual size_t num_values() const = 0;
  virtual const std::vector<ParamView>& views() const = 0;
  const ParamView& view(const std::string& name) const;
  // Initial parameters (num_params values) from Philox keyed by (seed, value index):
  // identical on every rank.
  virtual std::vector<double> init_params(uint64_t seed) const = 0;
  // Standard normal values one forward pass draws per sample (the columns of eps).
  virtual size_t eps_per_row() const = 0;
  // The KL's parts, each with its weight in backward (free bits): the latent
  // dimensions of a Vae, the latent groups of an Hvae.
  virtual int kl_parts() const = 0;
};

// The layout model.type asks for; errors name the spec's keys.
std::unique_ptr<ModelLayout> make_layout(const ModelSpec& spec, const std::vector<int>& input_shape);

template <class T>
class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelLayout& model_layout() const = 0;
  virtual int max_rows() const = 0;
  // x (rows, D), eps (rows, eps_per_row) -> rec[r] = -log p(x_r | z), kl[r] = the KL
  // term at the sampled z. params_needed(end): params[0, end) must be final next.
  virtual void forward(const T* params, const T* x, const T* eps, int rows,
                       const std::function<void(size_t)>& params_needed = {}) = 0;
  // grads += d/dparams [ rec_weight * sum_r rec[r] + sum_j kl_weights[j] * (part j of sum_r kl[r]) ]
  // for the last forward pass; kl_weights: kl_parts() values in backend memory.
  // grads_ready(offset): grads[offset, P) are final (offsets decrease).
  virtual void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight,
                        const T* kl_weights, const std::function<void(size_t)>& grads_ready = {}) = 0;
  virtual void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T kl_weight,
                        const std::function<void(size_t)>& grads_ready = {}) = 0;
  // The decoder output for latents drawn from the prior with eps (rows, eps_per_row).
  virtual void sample_prior(const T* params, const T* eps, int rows) = 0;
  virtual const T* rec() const = 0;     // (rows)
  virtual const T* kl() const = 0;      // (rows)
  virtual const T* output() const = 0;  // (rows, output_width)
};

// The model for `layout` (from make_layout, or a VaeLayout / HvaeLayout) with
// workspaces for `max_rows` samples.
template <class T>
std::unique_ptr<Model<T>> make_model(const ModelLayout& layout, Backend<T>& backend, int max_rows);

}  // namespace elbo
