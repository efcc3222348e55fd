// MLP VAE forward/backward over the flat buffers, written once for every backend.
#include "elbo/model/vae.hpp"

#include <algorithm>
#include <cmath>

#include "elbo/util/error.hpp"

namespace elbo {

VaeLayout::VaeLayout(const ModelSpec& spec, int input_dim) : m_spec(spec), m_input_dim(input_dim) {
  if (input_dim < 1) throw model_error("model input dimension must be >= 1 (got " + std::to_string(input_dim) + ")");
  if (spec.latent < 1) throw model_error("model.latent must be >= 1 (got " + std::to_string(spec.latent) + ")");
  const int L = spec.latent;
  int in = input_dim;
  for (size_t i = 0; i < spec.encoder.size(); ++i) {
    m_enc.push_back(add_linear(in, spec.encoder[i], {"encoder.layers." + std::to_string(i)}, spec.encoder[i]));
    in = spec.encoder[i];
  }
  // mu and logvar share one (2L, H) matrix so the head is a single GEMM; their
  // names still export separately, as in the PyTorch reference.
  m_enc_head = add_linear(in, 2 * L, {"encoder.mu", "encoder.logvar"}, L);
  in = L;
  for (size_t i = 0; i < spec.decoder.size(); ++i) {
    m_dec.push_back(add_linear(in, spec.decoder[i], {"decoder.layers." + std::to_string(i)}, spec.decoder[i]));
    in = spec.decoder[i];
  }
  if (spec.likelihood == Likelihood::GaussianLearned)
    m_dec_out = add_linear(in, 2 * input_dim, {"decoder.out", "decoder.logvar"}, input_dim);
  else
    m_dec_out = add_linear(in, input_dim, {"decoder.out"}, input_dim);

  m_max_width = std::max({2 * L, m_dec_out.out, input_dim});
  for (int w : spec.encoder) m_max_width = std::max(m_max_width, w);
  for (int w : spec.decoder) m_max_width = std::max(m_max_width, w);
}

VaeLayout::Linear VaeLayout::add_linear(int in, int out, const std::vector<std::string>& names,
                                        size_t rows_per_name) {
  Linear l;
  l.in = in;
  l.out = out;
  l.w = m_num_params;
  m_num_params += static_cast<size_t>(out) * in;
  l.b = m_num_params;
  m_num_params += static_cast<size_t>(out);
  for (size_t k = 0; k < names.size(); ++k) {
    m_views.push_back({names[k] + ".weight", l.w + k * rows_per_name * in,
                       {static_cast<int>(rows_per_name), in}});
    m_views.push_back({names[k] + ".bias", l.b + k * rows_per_name, {static_cast<int>(rows_per_name)}});
  }
  return l;
}

const ParamView& VaeLayout::view(const std::string& name) const {
  for (const auto& v : m_views)
    if (v.name == name) return v;
  throw model_error("no parameter named '" + name + "' in this model");
}

std::vector<double> VaeLayout::init_params(uint64_t seed) const {
  std::vector<double> p(m_num_params);
  auto fill = [&](const Linear& l) {
    double bound = 1.0 / std::sqrt(static_cast<double>(l.in));
    size_t end = l.b + static_cast<size_t>(l.out);
    for (size_t i = l.w; i < end; ++i)
      p[i] = bound * (2.0 * philox_uniform(seed, RngStream::Init, 0, static_cast<uint32_t>(i), 0) - 1.0);
  };
  for (const auto& l : m_enc) fill(l);
  fill(m_enc_head);
  for (const auto& l : m_dec) fill(l);
  fill(m_dec_out);
  return p;
}

template <class T>
Vae<T>::Vae(const VaeLayout& layout, Backend<T>& be, int max_rows)
    : m_layout(layout), m_be(be), m_max_rows(max_rows) {
  ELBO_ASSERT(max_rows >= 1, "a replica needs room for at least one sample");
  const size_t R = static_cast<size_t>(max_rows);
  for (const auto& l : layout.encoder()) {
    m_enc_pre.emplace_back(be, R * l.out);
    m_enc_act.emplace_back(be, R * l.out);
  }
  for (const auto& l : layout.decoder()) {
    m_dec_pre.emplace_back(be, R * l.out);
    m_dec_act.emplace_back(be, R * l.out);
  }
  m_mulv = Buffer<T>(be, R * 2 * layout.latent());
  m_z = Buffer<T>(be, R * layout.latent());
  m_out = Buffer<T>(be, R * layout.output_width());
  m_rec = Buffer<T>(be, R);
  m_kl = Buffer<T>(be, R);
  m_grad_a = Buffer<T>(be, R * layout.max_width());
  m_grad_b = Buffer<T>(be, R * layout.max_width());
}

template <class T>
void Vae<T>::linear_forward(const typename VaeLayout::Linear& l, const T* params, const T* in, int rows,
                            T* pre) {
  // pre (rows, out) = in (rows, in) . W^T ; the bias is added by bias_act_forward.
  m_be.gemm(false, true, rows, l.out, l.in, T(1), in, l.in, params + l.w, l.in, T(0), pre, l.out);
}

template <class T>
void Vae<T>::linear_backward(const typename VaeLayout::Linear& l, const T* params, T* grads, const T* in,
                             const T* dpre, int rows, T* din) {
  // dW (out, in) += dpre^T . in
  m_be.gemm(true, false, l.out, l.in, rows, T(1), dpre, l.out, in, l.in, T(1), grads + l.w, l.in);
  // din (rows, in) = dpre . W   (skipped for the input layer: nothing upstream needs it)
  if (din != nullptr)
    m_be.gemm(false, false, rows, l.in, l.out, T(1), dpre, l.out, params + l.w, l.in, T(0), din, l.in);
}

template <class T>
void Vae<T>::decoder_forward(const T* params, const T* z, int rows) {
  const Activation act = m_layout.spec().activation;
  const T* h = z;
  const auto& dec = m_layout.decoder();
  for (size_t i = 0; i < dec.size(); ++i) {
    linear_forward(dec[i], params, h, rows, m_dec_pre[i].data());
    m_be.bias_act_forward(act, rows, dec[i].out, params + dec[i].b, m_dec_pre[i].data(), m_dec_act[i].data());
    h = m_dec_act[i].data();
  }
  const auto& out = m_layout.decoder_out();
  linear_forward(out, params, h, rows, m_out.data());
  m_be.bias_act_forward(Activation::Identity, rows, out.out, params + out.b, m_out.data(), m_out.data());
}

template <class T>
void Vae<T>::forward(const T* params, const T* x, const T* eps, int rows) {
  encode(params, x, rows);
  const int L = m_layout.latent();
  m_be.posterior_forward(rows, L, m_mulv.data(), eps, m_z.data(), m_kl.data());
  decoder_forward(params, m_z.data(), rows);
  const auto& s = m_layout.spec();
  m_be.likelihood_forward(s.likelihood, static_cast<T>(s.sigma), rows, m_layout.input_dim(), m_out.data(), x,
                          m_rec.data());
}

template <class T>
void Vae<T>::encode(const T* params, const T* x, int rows) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  const Activation act = m_layout.spec().activation;
  const T* h = x;
  const auto& enc = m_layout.encoder();
  for (size_t i = 0; i < enc.size(); ++i) {
    linear_forward(enc[i], params, h, rows, m_enc_pre[i].data());
    m_be.bias_act_forward(act, rows, enc[i].out, params + enc[i].b, m_enc_pre[i].data(), m_enc_act[i].data());
    h = m_enc_act[i].data();
  }
  const auto& head = m_layout.encoder_head();
  linear_forward(head, params, h, rows, m_mulv.data());
  m_be.bias_act_forward(Activation::Identity, rows, head.out, params + head.b, m_mulv.data(), m_mulv.data());
}

template <class T>
void Vae<T>::decode(const T* params, const T* z, int rows) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  decoder_forward(params, z, rows);
}

template <class T>
void Vae<T>::backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight,
                      T kl_weight, const std::function<void(size_t)>& grads_ready) {
  auto done = [&](const typename VaeLayout::Linear& l) {
    if (grads_ready) grads_ready(l.w);  // weight before bias: l.w is where the layer starts
  };
  const Activation act = m_layout.spec().activation;
  const auto& s = m_layout.spec();
  T* g = m_grad_a.data();  // gradient w.r.t. the current layer's output
  T* h = m_grad_b.data();  // gradient w.r.t. its input (written next)

  // Decoder output layer.
  const auto& out = m_layout.decoder_out();
  m_be.likelihood_backward(s.likelihood, static_cast<T>(s.sigma), rows, m_layout.input_dim(), m_out.data(), x,
                           rec_weight, g);
  m_be.bias_act_backward(Activation::Identity, rows, out.out, m_out.data(), m_out.data(), g, g, grads + out.b);
  const auto& dec = m_layout.decoder();
  const T* dec_in = dec.empty() ? m_z.data() : m_dec_act.back().data();
  linear_backward(out, params, grads, dec_in, g, rows, h);
  done(out);
  std::swap(g, h);

  // Decoder hidden layers, last to first; g holds d(activation of layer i).
  for (size_t k = dec.size(); k-- > 0;) {
    m_be.bias_act_backward(act, rows, dec[k].out, m_dec_pre[k].data(), m_dec_act[k].data(), g, g,
                           grads + dec[k].b);
    const T* in = k == 0 ? m_z.data() : m_dec_act[k - 1].data();
    linear_backward(dec[k], params, grads, in, g, rows, h);
    done(dec[k]);
    std::swap(g, h);
  }

  // g = dz. Through the reparameterization and the KL term into (mu | logvar).
  const int L = m_layout.latent();
  m_be.posterior_backward(rows, L, m_mulv.data(), eps, g, kl_weight, h);
  std::swap(g, h);
  const auto& head = m_layout.encoder_head();
  m_be.bias_act_backward(Activation::Identity, rows, head.out, m_mulv.data(), m_mulv.data(), g, g,
                         grads + head.b);
  const auto& enc = m_layout.encoder();
  const T* enc_in = enc.empty() ? x : m_enc_act.back().data();
  linear_backward(head, params, grads, enc_in, g, rows, enc.empty() ? nullptr : h);
  done(head);
  std::swap(g, h);

  for (size_t k = enc.size(); k-- > 0;) {
    m_be.bias_act_backward(act, rows, enc[k].out, m_enc_pre[k].data(), m_enc_act[k].data(), g, g,
                           grads + enc[k].b);
    const T* in = k == 0 ? x : m_enc_act[k - 1].data();
    linear_backward(enc[k], params, grads, in, g, rows, k == 0 ? nullptr : h);
    done(enc[k]);
    std::swap(g, h);
  }
}

template class Vae<float>;
template class Vae<double>;

}  // namespace elbo
