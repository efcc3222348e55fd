// Optimizer step and schedules; the arithmetic itself lives in Backend::adam_step.
#include "elbo/optim/adam.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

#include "elbo/util/error.hpp"

namespace elbo {

double learning_rate(const OptimSpec& o, int64_t step, int64_t total_steps) {
  if (o.warmup_steps > 0 && step < o.warmup_steps)
    return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.schedule == LrSchedule::Cosine) {
    int64_t span = std::max<int64_t>(1, total_steps - o.warmup_steps - 1);
    double t = std::min(1.0, static_cast<double>(step - o.warmup_steps) / static_cast<double>(span));
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * t));
  }
  return o.lr;
}

double kl_weight(const LossSpec& l, int64_t step) {
  if (l.kl_warmup_steps <= 0) return l.beta;
  double ramp = std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(l.kl_warmup_steps));
  return l.beta * ramp;
}

namespace {

size_t total_size(const std::vector<FlatRange>& ranges) {
  size_t n = 0;
  for (const auto& r : ranges) n += r.size();
  return n;
}

}  // namespace

template <class T>
Adam<T>::Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params)
    : Adam(spec, backend, num_params, {FlatRange{0, num_params}}, nullptr) {}

template <class T>
Adam<T>::Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params, std::vector<FlatRange> owned,
              NormSum norm_sum)
    : m_spec(spec), m_be(backend), m_owned(std::move(owned)), m_norm_sum(std::move(norm_sum)),
      m_m(backend, total_size(m_owned)), m_v(backend, total_size(m_owned)) {
  for (size_t i = 0; i < m_owned.size(); ++i)
    if (m_owned[i].end > num_params || m_owned[i].begin > m_owned[i].end ||
        (i > 0 && m_owned[i].begin < m_owned[i - 1].end))
      throw internal_error("Adam: owned ranges are not increasing, disjoint ranges inside the " +
                           std::to_string(num_params) + " parameters");
  m_be.fill(m_m.data(), T(0), m_m.size());
  m_be.fill(m_v.data(), T(0), m_v.size());
}

template <class T>
double Adam<T>::step(T* params, T* grads, double lr) {
  double local = 0;  // one range (the whole buffer, or one rank of one): exactly one pass as before
  for (const auto& r : m_owned) local += m_be.sum_squares(r.size(), grads + r.begin);
  return step(params, grads, lr, m_norm_sum ? m_norm_sum(local) : local);
}

template <class T>
double Adam<T>::step(T* params, T* grads, double lr, double squared_norm) {
  const double norm = std::sqrt(squared_norm);
  if (!std::isfinite(norm)) return norm;
  if (m_spec.grad_clip > 0 && norm > m_spec.grad_clip)
    for (const auto& r : m_owned)
      m_be.scale(r.size(), static_cast<T>(m_spec.grad_clip / (norm + 1e-6)), grads + r.begin);
  ++m_steps;
  AdamArgs a;
  a.lr = lr;
  a.beta1 = m_spec.beta1;
  a.beta2 = m_spec.beta2;
  a.eps = m_spec.eps;
  a.weight_decay = m_spec.weight_decay;
  a.decoupled = m_spec.type == OptimizerType::AdamW;
  a.step = m_steps;
  size_t off = 0;  // into the packed moments
  for (const auto& r : m_owned) {
    m_be.adam_step(a, r.size(), params + r.begin, grads + r.begin, m_m.data() + off, m_v.data() + off);
    off += r.size();
  }
  return norm;
}

template <class T>
void Adam<T>::load_moments(const T* m_flat, const T* v_flat) {
  std::vector<T> packed(m_m.size());
  for (auto [flat, moment] : {std::pair{m_flat, &m_m}, std::pair{v_flat, &m_v}}) {
    T* out = packed.data();
    for (const auto& r : m_owned) out = std::copy(flat + r.begin, flat + r.end, out);
    m_be.upload(moment->data(), packed.data(), packed.size());
  }
}

template <class T>
void Adam<T>::download_moments(T* m_packed, T* v_packed) {
  m_be.download(m_packed, m_m.data(), m_m.size());
  m_be.download(v_packed, m_v.data(), m_v.size());
}

template class Adam<float>;
template class Adam<double>;

}  // namespace elbo
