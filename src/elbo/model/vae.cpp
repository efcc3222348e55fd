// The VAE's layers over the flat buffers, written once for every backend: the
// layout (shapes, parameter offsets and names, initialization) and each layer kind's
// forward and backward.
#include "elbo/model/vae.hpp"

#include <algorithm>
#include <cmath>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"

namespace elbo {

namespace {

constexpr double kGroupNormEps = 1e-5;  // PyTorch's default

// Past a layer's last parameter: its bias follows its weight in the flat buffer.
size_t params_end(const Layer& l) {
  return l.b + (l.kind == LayerKind::Linear ? l.out.size() : static_cast<size_t>(l.out.c));
}

std::string shape_text(const TensorShape& s) { return shape_string(std::vector<int>{s.c, s.h, s.w}, "[]"); }

Activation activation_of(LayerType type) {
  return type == LayerType::Relu ? Activation::Relu : type == LayerType::Tanh ? Activation::Tanh : Activation::Softplus;
}

}  // namespace

ConvShape Layer::conv(int rows) const {
  if (kind == LayerKind::Conv2d) return ConvShape{rows, in.c, in.h, in.w, out.c, kernel, kernel, stride, pad};
  // ConvTranspose2d: the convolution from its output (c = out channels) to its input.
  return ConvShape{rows, out.c, out.h, out.w, in.c, kernel, kernel, stride, pad};
}

VaeLayout::VaeLayout(const ModelSpec& spec, const std::vector<int>& input_shape) : m_spec(spec) {
  if (!is_sample_shape(input_shape))
    throw model_error("model input shape must be [C, H, W] with positive sizes (got " +
                      shape_string(input_shape, "[]") + ")");
  m_input = TensorShape{input_shape[0], input_shape[1], input_shape[2]};
  if (spec.type == ModelType::Hierarchical)
    throw model_error(
        "model.type hierarchical: the trainer, evaluation and model files do not take hierarchical "
        "models yet (the model itself: src/elbo/model/hvae.hpp, issue 15)");
  (void)likelihood();  // refuses data the likelihood cannot model
  if (spec.latent < 1) throw model_error("model.latent must be >= 1 (got " + std::to_string(spec.latent) + ")");
  if (spec.type == ModelType::Conv)
    build_conv();
  else
    build_mlp();
  m_max_width = m_input.size();
  for (const auto* list : {&m_enc, &m_dec})
    for (const Layer& l : *list) m_max_width = std::max({m_max_width, l.in.size(), l.out.size()});
}

Layer& VaeLayout::add(std::vector<Layer>& to, Layer l, const std::vector<std::string>& names) {
  size_t wn = 0, bn = 0;
  std::vector<int> wshape;
  switch (l.kind) {
    case LayerKind::Linear:
      wn = l.out.size() * l.in.size();
      bn = l.out.size();
      break;
    case LayerKind::Conv2d:
      wn = static_cast<size_t>(l.out.c) * l.in.c * l.kernel * l.kernel;
      bn = static_cast<size_t>(l.out.c);
      wshape = {l.out.c, l.in.c, l.kernel, l.kernel};
      break;
    case LayerKind::ConvTranspose2d:
      wn = static_cast<size_t>(l.in.c) * l.out.c * l.kernel * l.kernel;
      bn = static_cast<size_t>(l.out.c);
      wshape = {l.in.c, l.out.c, l.kernel, l.kernel};
      break;
    case LayerKind::GroupNorm:
      wn = bn = static_cast<size_t>(l.in.c);
      wshape = {l.in.c};
      break;
  }
  // Every weight and bias starts on a 64-byte boundary of the flat buffer (16 floats):
  // vectorized GPU kernels and cuBLASLt's bias epilogue need aligned pointers. The
  // gaps stay zero (no gradient reaches them), and files store only the named views.
  auto aligned = [](size_t n) { return (n + kParamAlign - 1) / kParamAlign * kParamAlign; };
  l.w = aligned(m_num_params);
  m_num_params = l.w + wn;
  l.b = aligned(m_num_params);
  m_num_params = l.b + bn;
  m_num_values += wn + bn;
  if (l.kind == LayerKind::Linear) {
    // One matrix may export as several names (mu | logvar), each owning a block of rows.
    const int rows_per_name = static_cast<int>(l.out.size() / names.size());
    const int in = static_cast<int>(l.in.size());
    for (size_t k = 0; k < names.size(); ++k) {
      m_views.push_back({names[k] + ".weight", l.w + k * rows_per_name * in, {rows_per_name, in}});
      m_views.push_back({names[k] + ".bias", l.b + k * rows_per_name, {rows_per_name}});
    }
  } else {
    m_views.push_back({names[0] + ".weight", l.w, wshape});
    m_views.push_back({names[0] + ".bias", l.b, {static_cast<int>(bn)}});
  }
  to.push_back(l);
  return to.back();
}

void VaeLayout::build_mlp() {
  const ModelSpec& s = m_spec;
  const int D = static_cast<int>(m_input.size()), L = s.latent;
  auto linear = [](int in, int out, Activation act) {
    Layer l;
    l.kind = LayerKind::Linear;
    l.in = TensorShape{in, 1, 1};
    l.out = TensorShape{out, 1, 1};
    l.act = act;
    return l;
  };
  int in = D;
  for (size_t i = 0; i < s.encoder.size(); ++i) {
    add(m_enc, linear(in, s.encoder[i], s.activation), {"encoder.layers." + std::to_string(i)});
    in = s.encoder[i];
  }
  // mu and logvar share one (2L, H) matrix so the head is a single GEMM; their
  // names still export separately, as in the PyTorch reference.
  add(m_enc, linear(in, 2 * L, Activation::Identity), {"encoder.mu", "encoder.logvar"});
  in = L;
  for (size_t i = 0; i < s.decoder.size(); ++i) {
    add(m_dec, linear(in, s.decoder[i], s.activation), {"decoder.layers." + std::to_string(i)});
    in = s.decoder[i];
  }
  if (s.likelihood == Likelihood::GaussianLearned)
    add(m_dec, linear(in, 2 * D, Activation::Identity), {"decoder.out", "decoder.logvar"});
  else if (s.likelihood == Likelihood::DiscretizedLogisticMixture)  // (K*groups, H, W) values, flat
    add(m_dec, linear(in, static_cast<int>(likelihood().output_width()), Activation::Identity), {"decoder.out"});
  else
    add(m_dec, linear(in, D, Activation::Identity), {"decoder.out"});
}

// Shape inference over a conv model's list; errors name model.KEY[i].
std::vector<Layer> VaeLayout::build_list(const std::vector<LayerSpec>& list, TensorShape shape, const std::string& key,
                                         const std::string& prefix, std::vector<Layer>& to) {
  const size_t first = to.size();
  bool may_activate = false;  // the previous entry is a layer whose output an activation may follow
  for (size_t i = 0; i < list.size(); ++i) {
    const LayerSpec& e = list[i];
    const std::string at = "model." + key + "[" + std::to_string(i) + "] (" + choice_name(e.type) + ")";
    const std::string name = prefix + ".layers." + std::to_string(i);
    auto fail = [&](const std::string& why) { throw config_error(at + ": " + why); };
    if (e.type == LayerType::Relu || e.type == LayerType::Tanh || e.type == LayerType::Softplus) {
      if (!may_activate) fail("an activation must follow a linear, conv2d, conv_transpose2d or group_norm layer");
      to.back().act = activation_of(e.type);
      may_activate = false;
      continue;
    }
    if (e.type == LayerType::Flatten) {
      shape = TensorShape{static_cast<int>(shape.size()), 1, 1};
      continue;
    }
    if (e.type == LayerType::Reshape) {
      const TensorShape t{e.shape[0], e.shape[1], e.shape[2]};
      if (t.size() != shape.size())
        fail("cannot reshape " + shape_text(shape) + " (" + std::to_string(shape.size()) + " values) to " +
             shape_text(t) + " (" + std::to_string(t.size()) + ")");
      shape = t;
      continue;
    }
    Layer l;
    l.in = shape;
    if (e.type == LayerType::Linear) {
      l.kind = LayerKind::Linear;
      l.out = TensorShape{e.features, 1, 1};
    } else if (e.type == LayerType::GroupNorm) {
      l.kind = LayerKind::GroupNorm;
      if (shape.c % e.groups != 0)
        fail(std::to_string(shape.c) + " channels do not divide into " + std::to_string(e.groups) + " groups");
      l.groups = e.groups;
      l.out = shape;
    } else {
      l.kind = e.type == LayerType::Conv2d ? LayerKind::Conv2d : LayerKind::ConvTranspose2d;
      if (shape.h == 1 && shape.w == 1 && !to.empty() && to.back().kind == LayerKind::Linear)
        fail("needs an image input, but the previous layer is linear; put {type: reshape, shape: [C, H, W]} between");
      l.kernel = e.kernel;
      l.stride = e.stride;
      l.pad = e.padding;
      if (l.kind == LayerKind::Conv2d) {
        const int oh = (shape.h + 2 * e.padding - e.kernel) / e.stride + 1,
                  ow = (shape.w + 2 * e.padding - e.kernel) / e.stride + 1;
        if (shape.h + 2 * e.padding < e.kernel || shape.w + 2 * e.padding < e.kernel)
          fail("kernel " + std::to_string(e.kernel) + " is larger than the padded input " + shape_text(shape));
        l.out = TensorShape{e.channels, oh, ow};
      } else {
        const int oh = (shape.h - 1) * e.stride - 2 * e.padding + e.kernel + e.output_padding,
                  ow = (shape.w - 1) * e.stride - 2 * e.padding + e.kernel + e.output_padding;
        if (oh < 1 || ow < 1) fail("the output of " + shape_text(shape) + " would be empty");
        l.out = TensorShape{e.channels, oh, ow};
      }
    }
    add(to, l, {name});
    shape = l.out;
    may_activate = true;
  }
  return std::vector<Layer>(to.begin() + static_cast<std::ptrdiff_t>(first), to.end());
}

void VaeLayout::build_conv() {
  const ModelSpec& s = m_spec;
  if (s.conv_encoder.empty() || s.conv_decoder.empty())
    throw config_error("model.type conv needs model.encoder and model.decoder layer lists");
  build_list(s.conv_encoder, m_input, "encoder", "encoder", m_enc);
  const TensorShape feat = m_enc.empty() ? m_input : m_enc.back().out;
  Layer head;
  head.kind = LayerKind::Linear;
  head.in = TensorShape{static_cast<int>(feat.size()), 1, 1};
  head.out = TensorShape{2 * s.latent, 1, 1};
  add(m_enc, head, {"encoder.mu", "encoder.logvar"});

  build_list(s.conv_decoder, TensorShape{s.latent, 1, 1}, "decoder", "decoder", m_dec);
  if (m_dec.empty()) throw config_error("model.decoder: the list has no layer with parameters");
  TensorShape want = m_input;
  if (s.likelihood == Likelihood::GaussianLearned) want.c *= 2;  // [mean | logvar] channels
  std::string why;
  if (s.likelihood == Likelihood::DiscretizedLogisticMixture) {
    const DlmShape d = likelihood().dlm;
    want.c = d.out_channels();
    why = " (" + std::to_string(want.c) + " channels = components " + std::to_string(d.components) + " x (1 logit + " +
          std::to_string(m_input.c) + " means + " + std::to_string(m_input.c) + " log-scales" +
          (m_input.c > 1 ? " + " + std::to_string(d.groups() - 1 - 2 * m_input.c) + " channel coefficients" : "") +
          "))";
  }
  const Layer& last = m_dec.back();
  // A flat last layer of the right size is fine too: (n, C*H*W) is the same memory as NCHW.
  if (!(last.out == want) && !(last.kind == LayerKind::Linear && last.out.size() == want.size()))
    throw config_error("model.decoder: the last layer produces " + shape_text(last.out) + " per sample but the " +
                       choice_name(s.likelihood) + " likelihood of " + shape_text(m_input) + " data needs " +
                       shape_text(want) + why);
  if (last.act != Activation::Identity)
    throw config_error("model.decoder: the last layer must have no activation (it gives the likelihood's "
                       "parameters, e.g. Bernoulli logits)");
}

std::vector<double> VaeLayout::init_params(uint64_t seed) const {
  std::vector<double> p(m_num_params, 0.0);  // the alignment gaps stay zero
  // Draws are keyed by the value's position among all values (not its offset in the
  // padded buffer), so the initialization does not depend on the alignment.
  uint32_t value = 0;
  auto uniform = [&](size_t begin, size_t n, double bound) {
    for (size_t i = 0; i < n; ++i, ++value)
      p[begin + i] = bound * (2.0 * philox_uniform(seed, RngStream::Init, 0, value, 0) - 1.0);
  };
  for (const auto* list : {&m_enc, &m_dec})
    for (const Layer& l : *list) {
      const size_t nb = l.kind == LayerKind::Linear ? l.out.size() : static_cast<size_t>(l.out.c);
      size_t nw = 0;
      double bound = 0;
      switch (l.kind) {
        case LayerKind::Linear:
          nw = l.out.size() * l.in.size();
          bound = 1.0 / std::sqrt(static_cast<double>(l.in.size()));
          break;
        case LayerKind::Conv2d:
          nw = static_cast<size_t>(l.out.c) * l.in.c * l.kernel * l.kernel;
          bound = 1.0 / std::sqrt(static_cast<double>(l.in.c) * l.kernel * l.kernel);
          break;
        case LayerKind::ConvTranspose2d:
          nw = static_cast<size_t>(l.in.c) * l.out.c * l.kernel * l.kernel;
          bound = 1.0 / std::sqrt(static_cast<double>(l.out.c) * l.kernel * l.kernel);
          break;
        case LayerKind::GroupNorm:
          std::fill_n(p.begin() + static_cast<std::ptrdiff_t>(l.w), l.in.c, 1.0);  // gamma; beta stays 0
          value += static_cast<uint32_t>(2 * l.in.c);
          continue;
      }
      uniform(l.w, nw, bound);
      uniform(l.b, nb, bound);
    }
  return p;
}

template <class T>
std::vector<typename Vae<T>::Acts> Vae<T>::make_acts(const std::vector<Layer>& layers, size_t R) {
  std::vector<Acts> out(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& l = layers[i];
    out[i].pre = Buffer<T>(m_be, R * l.out.size());
    if (l.act != Activation::Identity) out[i].act = Buffer<T>(m_be, R * l.out.size());
    if (l.kind == LayerKind::GroupNorm) out[i].stats = Buffer<T>(m_be, R * l.groups * 2);
  }
  return out;
}

template <class T>
Vae<T>::Vae(const VaeLayout& layout, Backend<T>& be, int max_rows, int iw_samples)
    : m_layout(layout), m_be(be), m_max_rows(max_rows), m_k(iw_samples) {
  ELBO_ASSERT(max_rows >= 1, "a replica needs room for at least one sample");
  ELBO_ASSERT(iw_samples >= 0, "importance samples must be >= 0");
  const size_t R = static_cast<size_t>(max_rows);
  // The decoder and everything after z run once per importance sample.
  const size_t RK = R * static_cast<size_t>(std::max(1, iw_samples));
  m_enc_acts = make_acts(layout.encoder(), R);
  m_dec_acts = make_acts(layout.decoder(), RK);
  m_z = Buffer<T>(be, RK * layout.latent());
  m_rec = Buffer<T>(be, RK);
  m_kl = Buffer<T>(be, R);
  m_kl_weights = Buffer<T>(be, static_cast<size_t>(layout.latent()));
  m_grad_a = Buffer<T>(be, RK * layout.max_width());
  m_grad_b = Buffer<T>(be, RK * layout.max_width());
  if (iw_samples > 0) {
    m_xk = Buffer<T>(be, RK * layout.input_dim());
    m_log_ratio = Buffer<T>(be, RK);
    m_weights = Buffer<T>(be, RK);
    m_bound = Buffer<T>(be, R);
    m_rec_mean = Buffer<T>(be, R);
    m_mean_k = Buffer<T>(be, static_cast<size_t>(iw_samples));
    be.fill(m_mean_k.data(), T(1) / static_cast<T>(iw_samples), m_mean_k.size());
  }
}

template <class T>
void Vae<T>::layer_forward(const Layer& l, const T* params, const T* in, int rows, Acts& a) {
  T* pre = a.pre.data();
  switch (l.kind) {
    case LayerKind::Linear: {
      const int fin = static_cast<int>(l.in.size()), fout = static_cast<int>(l.out.size());
      // pre (rows, out) = in (rows, in) . W^T ; then bias and activation (fused where the backend can).
      m_be.linear_forward(l.act, rows, fin, fout, in, params + l.w, params + l.b, pre, a.out());
      return;
    }
    case LayerKind::Conv2d:
      m_be.conv2d_forward(l.conv(rows), in, params + l.w, pre);
      break;
    case LayerKind::ConvTranspose2d:
      // The transposed convolution is the data gradient of the convolution it reverses.
      m_be.conv2d_backward_data(l.conv(rows), in, params + l.w, pre);
      break;
    case LayerKind::GroupNorm:
      m_be.group_norm_forward(rows, l.in.c, l.in.h * l.in.w, l.groups, static_cast<T>(kGroupNormEps), in,
                              params + l.w, params + l.b, pre, a.stats.data());
      if (l.act != Activation::Identity) m_be.activation_forward(l.act, static_cast<size_t>(rows) * l.out.size(), pre, a.out());
      return;
  }
  m_be.channel_bias_act_forward(l.act, rows, l.out.c, l.out.h * l.out.w, params + l.b, pre, a.out());
}

template <class T>
void Vae<T>::layer_backward(const Layer& l, const T* params, T* grads, const T* in, int rows, Acts& a, T* g, T* din) {
  const T* pre = a.pre.data();
  switch (l.kind) {
    case LayerKind::Linear: {
      const int fin = static_cast<int>(l.in.size()), fout = static_cast<int>(l.out.size());
      m_be.bias_act_backward(l.act, rows, fout, pre, a.out(), g, g, grads + l.b);
      // dW (out, in) += dpre^T . in
      m_be.gemm(true, false, fout, fin, rows, T(1), g, fout, in, fin, T(1), grads + l.w, fin);
      // din (rows, in) = dpre . W   (skipped where nothing upstream needs it)
      if (din != nullptr) m_be.gemm(false, false, rows, fin, fout, T(1), g, fout, params + l.w, fin, T(0), din, fin);
      return;
    }
    case LayerKind::Conv2d: {
      const ConvShape s = l.conv(rows);
      m_be.channel_bias_act_backward(l.act, rows, l.out.c, l.out.h * l.out.w, pre, a.out(), g, g, grads + l.b);
      m_be.conv2d_backward_filter(s, in, g, grads + l.w);
      if (din != nullptr) m_be.conv2d_backward_data(s, g, params + l.w, din);
      return;
    }
    case LayerKind::ConvTranspose2d: {
      // Roles swap: this layer's output gradient is the reversed convolution's input.
      const ConvShape s = l.conv(rows);
      m_be.channel_bias_act_backward(l.act, rows, l.out.c, l.out.h * l.out.w, pre, a.out(), g, g, grads + l.b);
      m_be.conv2d_backward_filter(s, g, in, grads + l.w);
      if (din != nullptr) m_be.conv2d_forward(s, g, params + l.w, din);
      return;
    }
    case LayerKind::GroupNorm: {
      const size_t n = static_cast<size_t>(rows) * l.out.size();
      if (l.act != Activation::Identity) m_be.activation_backward(l.act, n, pre, a.out(), g, g);
      // GroupNorm's input gradient is needed to reach gamma's effect on earlier layers;
      // with no earlier layer it still costs one pass, written to the scratch din.
      T* dx = din != nullptr ? din : (g == m_grad_a.data() ? m_grad_b.data() : m_grad_a.data());
      m_be.group_norm_backward(rows, l.in.c, l.in.h * l.in.w, l.groups, in, params + l.w, a.stats.data(), g, dx,
                               grads + l.w, grads + l.b);
      return;
    }
  }
}

template <class T>
void Vae<T>::decoder_forward(const T* params, const T* z, int rows, const std::function<void(size_t)>& params_needed) {
  const T* h = z;
  const auto& dec = m_layout.decoder();
  for (size_t i = 0; i < dec.size(); ++i) {
    if (params_needed) params_needed(params_end(dec[i]));
    layer_forward(dec[i], params, h, rows, m_dec_acts[i]);
    h = m_dec_acts[i].out();
  }
}

template <class T>
void Vae<T>::encode(const T* params, const T* x, int rows, const std::function<void(size_t)>& params_needed) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  const T* h = x;
  const auto& enc = m_layout.encoder();
  for (size_t i = 0; i < enc.size(); ++i) {
    if (params_needed) params_needed(params_end(enc[i]));
    layer_forward(enc[i], params, h, rows, m_enc_acts[i]);
    h = m_enc_acts[i].out();
  }
}

template <class T>
void Vae<T>::forward(const T* params, const T* x, const T* eps, int rows,
                     const std::function<void(size_t)>& params_needed) {
  encode(params, x, rows, params_needed);
  const int L = m_layout.latent();
  m_be.posterior_forward(rows, L, mulv(), eps, m_z.data(), m_kl.data());
  decoder_forward(params, m_z.data(), rows, params_needed);
  m_layout.likelihood().forward(m_be, rows, output(), x, m_rec.data());
}

template <class T>
void Vae<T>::decode(const T* params, const T* z, int rows) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  decoder_forward(params, z, rows);
}

template <class T>
void Vae<T>::backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight,
                      T kl_weight, const std::function<void(size_t)>& grads_ready) {
  // A backend op, not a host write: a recorded step (CUDA graph) replays it too.
  m_be.fill(m_kl_weights.data(), kl_weight, m_kl_weights.size());
  backward(params, grads, x, eps, rows, rec_weight, m_kl_weights.data(), grads_ready);
}

template <class T>
T* Vae<T>::decoder_backward(const T* params, T* grads, int rows, T* g, T* h,
                            const std::function<void(size_t)>& grads_ready) {
  // Layers sit in the flat buffer in forward order, so each finished layer completes
  // grads[its first parameter, P): the gradient all-reduce may start on that range.
  const auto& dec = m_layout.decoder();
  for (size_t k = dec.size(); k-- > 0;) {
    const T* in = k == 0 ? m_z.data() : m_dec_acts[k - 1].out();
    layer_backward(dec[k], params, grads, in, rows, m_dec_acts[k], g, h);
    if (grads_ready) grads_ready(dec[k].w);
    std::swap(g, h);
  }
  return g;
}

template <class T>
void Vae<T>::encoder_backward(const T* params, T* grads, const T* x, int rows, T* g, T* h,
                              const std::function<void(size_t)>& grads_ready) {
  const auto& enc = m_layout.encoder();
  for (size_t k = enc.size(); k-- > 0;) {
    const T* in = k == 0 ? x : m_enc_acts[k - 1].out();
    layer_backward(enc[k], params, grads, in, rows, m_enc_acts[k], g, k == 0 ? nullptr : h);
    if (grads_ready) grads_ready(enc[k].w);
    std::swap(g, h);
  }
}

template <class T>
void Vae<T>::backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, const T* kl_weights,
                      const std::function<void(size_t)>& grads_ready) {
  T* g = m_grad_a.data();  // gradient w.r.t. the current layer's output
  T* h = m_grad_b.data();  // gradient w.r.t. its input (written next)
  m_layout.likelihood().backward(m_be, rows, output(), x, rec_weight, g);
  g = decoder_backward(params, grads, rows, g, h, grads_ready);
  h = g == m_grad_a.data() ? m_grad_b.data() : m_grad_a.data();
  // g = dz. Through the reparameterization and the KL term into (mu | logvar).
  m_be.posterior_backward(rows, m_layout.latent(), mulv(), eps, g, kl_weights, h);
  encoder_backward(params, grads, x, rows, h, g, grads_ready);
}

template <class T>
void Vae<T>::forward_iw(const T* params, const T* x, const T* eps, int rows, T beta,
                        const std::function<void(size_t)>& params_needed) {
  ELBO_ASSERT(m_k > 0, "an importance-weighted pass on a model sized without importance samples");
  encode(params, x, rows, params_needed);
  const int L = m_layout.latent(), D = m_layout.input_dim(), k = m_k, n = rows * k;
  // The closed-form KL for the log (z from the first rows of eps is scratch, overwritten next).
  m_be.posterior_forward(rows, L, mulv(), eps, m_z.data(), m_kl.data());
  m_be.iw_posterior_forward(rows, k, L, mulv(), eps, m_z.data(), m_log_ratio.data());
  decoder_forward(params, m_z.data(), n, params_needed);
  m_be.repeat_rows(rows, D, k, x, m_xk.data());
  m_layout.likelihood().forward(m_be, n, output(), m_xk.data(), m_rec.data());
  m_be.iw_weights(rows, k, beta, m_rec.data(), m_log_ratio.data(), m_bound.data(), m_weights.data());
  // iw_rec (rows) = nll (rows, k) . (1/k, ..., 1/k)
  m_be.gemm(false, false, rows, 1, k, T(1), m_rec.data(), k, m_mean_k.data(), 1, T(0), m_rec_mean.data(), 1);
}

template <class T>
void Vae<T>::backward_iw(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T beta, bool dreg,
                         const std::function<void(size_t)>& grads_ready) {
  const int n = rows * m_k;
  T* g = m_grad_a.data();
  T* h = m_grad_b.data();
  // d(rec_weight * bound_r) / d nll_ri = rec_weight * w_ri: each sample's likelihood
  // gradient scaled by its normalized weight, then through the decoder as usual.
  m_layout.likelihood().backward(m_be, n, output(), m_xk.data(), rec_weight, g);
  m_be.scale_rows(n, m_layout.output_width(), m_weights.data(), T(1), g);
  g = decoder_backward(params, grads, n, g, h, grads_ready);
  h = g == m_grad_a.data() ? m_grad_b.data() : m_grad_a.data();
  m_be.iw_posterior_backward(rows, m_k, m_layout.latent(), mulv(), eps, m_z.data(), g, m_weights.data(),
                             rec_weight * beta, dreg, h);
  encoder_backward(params, grads, x, rows, h, g, grads_ready);
}

template class Vae<float>;
template class Vae<double>;

}  // namespace elbo
