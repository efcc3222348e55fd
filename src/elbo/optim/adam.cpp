// Optimizer step and schedules; the arithmetic itself lives in Backend::adam_step.
#include "elbo/optim/adam.hpp"

#include <cmath>

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

template <class T>
Adam<T>::Adam(const OptimSpec& spec, Backend<T>& backend, size_t num_params)
    : m_spec(spec), m_be(backend), m_n(num_params), m_m(backend, num_params), m_v(backend, num_params) {
  m_be.fill(m_m.data(), T(0), m_n);
  m_be.fill(m_v.data(), T(0), m_n);
}

template <class T>
double Adam<T>::step(T* params, T* grads, double lr) {
  return step(params, grads, lr, m_be.sum_squares(m_n, grads));
}

template <class T>
double Adam<T>::step(T* params, T* grads, double lr, double squared_norm) {
  const double norm = std::sqrt(squared_norm);
  if (!std::isfinite(norm)) return norm;
  if (m_spec.grad_clip > 0 && norm > m_spec.grad_clip)
    m_be.scale(m_n, static_cast<T>(m_spec.grad_clip / (norm + 1e-6)), grads);
  ++m_steps;
  AdamArgs a;
  a.lr = lr;
  a.beta1 = m_spec.beta1;
  a.beta2 = m_spec.beta2;
  a.eps = m_spec.eps;
  a.weight_decay = m_spec.weight_decay;
  a.decoupled = m_spec.type == OptimizerType::AdamW;
  a.step = m_steps;
  m_be.adam_step(a, m_n, params, grads, m_m.data(), m_v.data());
  return norm;
}

template class Adam<float>;
template class Adam<double>;

}  // namespace elbo
